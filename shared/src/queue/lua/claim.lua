-- ARGV: prefix, worker id, lease ms, token prefix, max jobs, max parks per call.
-- Returns {wait_ms_hint, {{id, token, attempt, max_attempts, lease_losses, kind, payload, group,
-- created_at}...}}
local worker, lease, tp = ARGV[2], tonumber(ARGV[3]), ARGV[4]
local k, max_parks = tonumber(ARGV[5]), tonumber(ARGV[6])

-- Promote due scheduled jobs in bounded steps (never an unbounded unpack).
local due = redis.call('ZRANGEBYSCORE', P .. 'scheduled', '-inf', NOW, 'WITHSCORES', 'LIMIT', 0, 500)
for i = 1, #due, 2 do
  local id = due[i]
  redis.call('ZREM', P .. 'scheduled', id)
  local f = redis.call('HMGET', jk(id), 'state', 'group')
  if f[1] == 'scheduled' then
    transition(id, 'scheduled', 'ready', f[2])
    redis.call('ZADD', P .. 'ready', due[i + 1], id)
  end
end

local out, n, parks = {}, 0, 0
while n < k and parks < max_parks do
  local r = redis.call('ZPOPMIN', P .. 'ready')
  if #r == 0 then break end
  local id, score = r[1], r[2]
  local key = jk(id)
  local f = redis.call('HMGET', key, 'state', 'slots', 'kind', 'payload', 'max_attempts',
    'lease_losses', 'group', 'created_at')
  if f[1] == 'ready' then
    local blocked = try_slots(id, split(f[2]))
    if blocked then
      transition(id, 'ready', 'waiting', f[7])
      redis.call('HSET', key, 'waiting_on', blocked)
      redis.call('ZADD', P .. 'wait:' .. blocked, score, id)
      redis.call('SADD', P .. 'waitkeys', blocked)
      parks = parks + 1
    else
      n = n + 1
      local token = tp .. ':' .. n
      local attempt = redis.call('HINCRBY', key, 'attempts', 1)
      local lu = NOW + lease
      redis.call('HSET', key, 'token', token, 'worker', worker, 'lease_until', lu, 'started_at', NOW)
      transition(id, 'ready', 'running', f[7])
      redis.call('ZADD', P .. 'inflight', lu, id)
      out[#out + 1] = {id, token, attempt, tonumber(f[5]), tonumber(f[6]), f[3], f[4], f[7] or '',
        tonumber(f[8]) or 0}
    end
  end
end

local hint = -1
if n == 0 then
  local nx = redis.call('ZRANGE', P .. 'scheduled', 0, 0, 'WITHSCORES')
  if #nx > 0 then hint = math.max(0, tonumber(nx[2]) - NOW) end
end
return {hint, out}
