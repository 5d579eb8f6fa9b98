-- Any worker may run this at any time: every step is atomic and checks state.
-- ARGV: prefix, batch, slot hold ms, history length, dead retention ms.
-- Returns {requeued, dead, slots_freed, purged}.
local batch, hold, hmax, dead_ret = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local requeued, dead, freed, purged = 0, 0, 0, 0

for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'inflight', '-inf', NOW, 'LIMIT', 0, batch)) do
  redis.call('ZREM', P .. 'inflight', id)
  local key = jk(id)
  local f = redis.call('HMGET', key, 'state', 'worker', 'group', 'max_lease_losses', 'attempts',
    'started_at', 'score', 'slots')
  if f[1] == 'running' then
    redis.call('HDEL', key, 'token', 'lease_until')
    -- A lost lease is not the handler's failure: give the attempt back, count it apart.
    redis.call('HINCRBY', key, 'attempts', -1)
    local ll = redis.call('HINCRBY', key, 'lease_losses', 1)
    local msg = 'lease expired (worker ' .. (f[2] or '?') .. ')'
    redis.call('HSET', key, 'last_error', msg)
    push_history(id, {attempt = tonumber(f[5]), outcome = 'lease_lost', error = msg, worker = f[2],
      started_at = tonumber(f[6]), ended_at = NOW}, hmax)
    if ll >= tonumber(f[4]) then
      transition(id, 'running', 'dead', f[3])
      redis.call('HSET', key, 'dead_at', NOW)
      redis.call('ZADD', P .. 'dead', NOW, id)
      release_slots(id, split(f[8]))
      dead = dead + 1
    else
      -- Keeps its slots into the re-delivery: the task it started may still be running.
      transition(id, 'running', 'ready', f[3])
      redis.call('ZADD', P .. 'ready', tonumber(f[7]) or NOW, id)
      if f[8] and f[8] ~= '' then redis.call('ZADD', P .. 'slotheld', NOW + hold, id) end
      requeued = requeued + 1
    end
  end
end

-- Slots kept for a re-delivery that did not happen within the hold time.
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'slotheld', '-inf', NOW, 'LIMIT', 0, batch)) do
  local f = redis.call('HMGET', jk(id), 'state', 'slots', 'forget', 'group', 'waiting_on')
  if f[1] ~= 'running' then
    release_slots(id, split(f[2]))
    freed = freed + 1
    -- Purged with its group while it kept its slots: nothing else of it is needed now.
    if f[3] == '1' and f[1] then forget(id, f[1], f[4], '', f[5]) end
  else
    redis.call('ZREM', P .. 'slotheld', id)
  end
end

-- Safety net: wake parked jobs of any slot that has room (e.g. after a cap was raised).
for _, s in ipairs(redis.call('SMEMBERS', P .. 'waitkeys')) do
  local n = free_count(s)
  if n > 0 then wake(s, n)
  elseif redis.call('EXISTS', P .. 'wait:' .. s) == 0 then redis.call('SREM', P .. 'waitkeys', s) end
end

-- Bounded dead-letter retention.
if dead_ret > 0 then
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'dead', '-inf', NOW - dead_ret, 'LIMIT', 0, batch)) do
    redis.call('ZREM', P .. 'dead', id)
    local g = redis.call('HGET', jk(id), 'group')
    transition(id, 'dead', nil, g)
    -- Its successor set too: nothing will ever ack it now.
    redis.call('DEL', jk(id), P .. 'hist:' .. id, P .. 'succ:' .. id)
    if g and g ~= '' then redis.call('SREM', P .. 'group:' .. g, id) end
    purged = purged + 1
  end
end
return {requeued, dead, freed, purged}
