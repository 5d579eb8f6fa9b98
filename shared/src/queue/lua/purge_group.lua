-- ARGV: prefix, group, batch. Deletes up to `batch` jobs of the group that are not running:
-- their records, history, successor sets and index entries (see `forget` in lib.lua). A
-- cancelled job still holding slots (its Proxmox task may run: `slotheld`) is marked and
-- left to the reaper, which forgets it when it frees the slots. Returns the jobs deleted.
local group, batch = ARGV[2], tonumber(ARGV[3])
local gk = P .. 'group:' .. group
local n = 0
local cursor = '0'
repeat
  local r = redis.call('SSCAN', gk, cursor, 'COUNT', 200)
  cursor = r[1]
  for _, id in ipairs(r[2]) do
    if n >= batch then return n end
    local f = redis.call('HMGET', jk(id), 'state', 'slots', 'waiting_on')
    if not f[1] then
      -- Its record expired (a done job past its retention): only the membership is left.
      redis.call('SREM', gk, id)
      redis.call('DEL', P .. 'succ:' .. id, P .. 'hist:' .. id)
    elseif f[1] == 'running' then
      -- Claimed and not fenced: never delete a live job.
    elseif redis.call('ZSCORE', P .. 'slotheld', id) then
      redis.call('HSET', jk(id), 'forget', 1)
    else
      forget(id, f[1], group, f[2], f[3])
      n = n + 1
    end
  end
until cursor == '0'
if redis.call('SCARD', gk) == 0 then redis.call('DEL', gk, P .. 'gcounts:' .. group) end
return n
