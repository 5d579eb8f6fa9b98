-- ARGV: prefix, id, token, follow-ups JSON ('' for none), done retention ms.
-- Returns {1} applied (+ per follow-up 1/0), {2} already applied by this token, {0} stale.
local id, token = ARGV[2], ARGV[3]
local key = jk(id)
local f = redis.call('HMGET', key, 'token', 'settled_token', 'state', 'group', 'slots', 'forget')
if f[1] ~= token then
  if f[2] == token then return {2, {}} end
  return {0, {}}
end
redis.call('HDEL', key, 'token', 'lease_until')
redis.call('HSET', key, 'settled_token', token, 'done_at', NOW)
redis.call('ZREM', P .. 'inflight', id)
transition(id, f[3], 'done', f[4])
redis.call('HINCRBY', P .. 'stats', 'acked', 1)
release_slots(id, split(f[5]))

-- Release successors whose last open gate this was.
local sk = P .. 'succ:' .. id
for _, sid in ipairs(redis.call('SMEMBERS', sk)) do
  local s = redis.call('HMGET', jk(sid), 'state', 'group', 'run_at')
  if s[1] == 'gated' then
    local left = redis.call('HINCRBY', jk(sid), 'gate_pending', -1)
    if left <= 0 then
      redis.call('SREM', P .. 'gated', sid)
      schedule(sid, 'gated', s[2], math.max(tonumber(s[3]) or 0, NOW))
    end
  end
end
redis.call('DEL', sk)

local created = enqueue_all(ARGV[4])
-- A job that asked to be forgotten leaves nothing (its successors are released above).
if f[6] == '1' then
  forget(id, 'done', f[4], '', nil)
  return {1, created}
end
local ttl = tonumber(ARGV[5])
if ttl > 0 then
  redis.call('PEXPIRE', key, ttl)
  redis.call('PEXPIRE', P .. 'hist:' .. id, ttl)
end
return {1, created}
