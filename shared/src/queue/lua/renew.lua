-- ARGV: prefix, id, token, lease ms. Returns the new lease end (ms) or 0 when stale.
local id, token = ARGV[2], ARGV[3]
local key = jk(id)
if redis.call('HGET', key, 'token') ~= token then return 0 end
local lu = NOW + tonumber(ARGV[4])
redis.call('HSET', key, 'lease_until', lu)
redis.call('ZADD', P .. 'inflight', 'XX', lu, id)
return lu
