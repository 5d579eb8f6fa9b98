-- Hands a job back without spending its attempt. ARGV: prefix, id, token, delay ms, hold ms
-- (hold > 0: the job keeps its slots until claimed again or until the hold passes, when the
-- reaper frees them; its outside work still runs). Returns 1 released, 2 already applied by
-- this token, 0 stale.
local id, token, delay, hold = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5] or '0')
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
if hold > 0 and f[5] and f[5] ~= '' then
  redis.call('ZADD', P .. 'slotheld', NOW + hold, id)
else
  release_slots(id, split(f[5]))
end
if delay > 0 then
  schedule(id, f[3], f[4], NOW + delay)
else
  -- Back at its old place in line.
  transition(id, f[3], 'ready', f[4])
  redis.call('ZADD', P .. 'ready', tonumber(f[6]) or NOW, id)
end
return 1
