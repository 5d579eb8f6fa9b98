-- ARGV: prefix, 'job' or 'group', name. Dead jobs go back to ready with the same id, attempts
-- and lease losses reset; their history is kept. Returns the number of jobs revived.
local ids
if ARGV[2] == 'job' then ids = {ARGV[3]} else ids = redis.call('SMEMBERS', P .. 'group:' .. ARGV[3]) end
local n = 0
for _, id in ipairs(ids) do
  local key = jk(id)
  local f = redis.call('HMGET', key, 'state', 'group')
  if f[1] == 'dead' then
    redis.call('ZREM', P .. 'dead', id)
    redis.call('HSET', key, 'attempts', 0, 'lease_losses', 0, 'score', NOW, 'run_at', NOW)
    redis.call('HDEL', key, 'dead_at')
    transition(id, 'dead', 'ready', f[2])
    redis.call('ZADD', P .. 'ready', NOW, id)
    n = n + 1
  end
end
return n
