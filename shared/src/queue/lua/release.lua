-- Hands a job back without spending its attempt. ARGV: prefix, id, token, delay ms.
-- Returns 1 released, 2 already applied by this token, 0 stale.
local id, token, delay = ARGV[2], ARGV[3], tonumber(ARGV[4])
local key = jk(id)
local f = redis.call('HMGET', key, 'token', 'settled_token', 'state', 'group', 'slots', 'score')
if f[1] ~= token then
  if f[2] == token then return 2 end
  return 0
end
redis.call('HDEL', key, 'token', 'lease_until')
redis.call('HSET', key, 'settled_token', token)
redis.call('HINCRBY', key, 'attempts', -1)
redis.call('ZREM', P .. 'inflight', id)
release_slots(id, split(f[5]))
if delay > 0 then
  schedule(id, f[3], f[4], NOW + delay)
else
  -- Back at its old place in line.
  transition(id, f[3], 'ready', f[4])
  redis.call('ZADD', P .. 'ready', tonumber(f[6]) or NOW, id)
end
return 1
