-- ARGV: prefix, id, token, error, worker, retryable (1/0), delay ms, history length, hold ms
-- (hold > 0: the job keeps its slots until claimed again or until the hold passes, when the
-- reaper frees them: work it started outside may still run).
-- Returns 1 rescheduled, 3 dead, 2 already applied by this token, 0 stale.
local id, token, err, worker = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local retryable, delay, hmax = ARGV[6] == '1', tonumber(ARGV[7]), tonumber(ARGV[8])
local hold = tonumber(ARGV[9] or '0')
local key = jk(id)
local f = redis.call('HMGET', key, 'token', 'settled_token', 'state', 'group', 'slots', 'attempts',
  'max_attempts', 'started_at')
if f[1] ~= token then
  if f[2] == token then return 2 end
  return 0
end
redis.call('HDEL', key, 'token', 'lease_until')
redis.call('HSET', key, 'settled_token', token, 'last_error', err)
redis.call('ZREM', P .. 'inflight', id)
push_history(id, {attempt = tonumber(f[6]), outcome = 'failed', error = err, worker = worker,
  started_at = tonumber(f[8]), ended_at = NOW}, hmax)
if hold > 0 and f[5] and f[5] ~= '' then
  redis.call('ZADD', P .. 'slotheld', NOW + hold, id)
else
  release_slots(id, split(f[5]))
end
if (not retryable) or tonumber(f[6]) >= tonumber(f[7]) then
  transition(id, f[3], 'dead', f[4])
  redis.call('HSET', key, 'dead_at', NOW)
  redis.call('ZADD', P .. 'dead', NOW, id)
  return 3
end
redis.call('HSET', key, 'run_at', NOW + delay, 'score', NOW + delay)
schedule(id, f[3], f[4], NOW + delay)
return 1
