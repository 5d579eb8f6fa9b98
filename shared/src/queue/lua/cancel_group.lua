-- ARGV: prefix, group, slot hold ms. Cancels every queued, gated, parked, in-flight or dead job
-- of the group (`cancel_one`). Returns the number of jobs cancelled.
local group, hold = ARGV[2], tonumber(ARGV[3])
local n = 0
for _, id in ipairs(redis.call('SMEMBERS', P .. 'group:' .. group)) do
  n = n + cancel_one(id, hold)
end
return n
