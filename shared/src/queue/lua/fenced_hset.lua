-- A write on behalf of a job, applied only while the caller still holds its lease.
-- ARGV: prefix, id, token, target key (same hash tag), field, value, field, value...
-- Returns 1 written, 0 stale.
local id, token, target = ARGV[2], ARGV[3], ARGV[4]
if redis.call('HGET', jk(id), 'token') ~= token then return 0 end
for i = 5, #ARGV, 2 do redis.call('HSET', target, ARGV[i], ARGV[i + 1]) end
return 1
