-- ARGV: prefix, group, slot hold ms. Cancels every queued, gated, parked, in-flight or dead job
-- of the group; in-flight ones lose their token at once (their ack is refused, renewal fails).
-- Returns the number of jobs cancelled.
local group, hold = ARGV[2], tonumber(ARGV[3])
local n = 0
for _, id in ipairs(redis.call('SMEMBERS', P .. 'group:' .. group)) do
  local key = jk(id)
  local f = redis.call('HMGET', key, 'state', 'waiting_on', 'slots')
  local st = f[1]
  local hit = true
  if st == 'ready' then redis.call('ZREM', P .. 'ready', id)
  elseif st == 'scheduled' then redis.call('ZREM', P .. 'scheduled', id)
  elseif st == 'gated' then redis.call('SREM', P .. 'gated', id)
  elseif st == 'waiting' then redis.call('ZREM', P .. 'wait:' .. (f[2] or ''), id)
  elseif st == 'dead' then redis.call('ZREM', P .. 'dead', id)
  elseif st == 'running' then
    redis.call('ZREM', P .. 'inflight', id)
    redis.call('HDEL', key, 'token', 'lease_until')
    -- Its Proxmox task may still run: keep the slots for one lease, then the reaper frees them.
    if f[3] and f[3] ~= '' then redis.call('ZADD', P .. 'slotheld', NOW + hold, id) end
  else hit = false end
  if hit then
    transition(id, st, 'cancelled', group)
    n = n + 1
  end
end
return n
