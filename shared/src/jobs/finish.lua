-- Finishes a teardown (a FencedScript: the lease check runs first): a compare-and-set of
-- the deployment record plus everything the finished teardown frees, in one atomic call.
-- Keys, ARGV[4]: the deployment hash `d:<id>`.
-- Args, ARGV[5..7]: the record as read (compared byte for byte), the new record, and the
--   operations as JSON (see `FinishOps` in state.rs): del, hdel, release, srem, zadd, ztrim,
--   expire_ms.
-- A record changed since it was read is an error: the job reads again and decides again.
local d, expected, new, opsjson = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
if (redis.call('HGET', d, 'record') or '') ~= expected then
  return redis.error_reply('deployment record changed since it was read')
end
redis.call('HSET', d, 'record', new)
local ops = cjson.decode(opsjson)
for _, k in ipairs(ops.del) do redis.call('DEL', k) end
for _, f in ipairs(ops.hdel) do redis.call('HDEL', d, f) end
-- Reservations: [ids key, owners key, [owners...]], freed as alloc.rs `release` frees them.
for _, r in ipairs(ops.release) do
  local ids, owners = r[1], r[2]
  for _, o in ipairs(r[3]) do
    local id = redis.call('HGET', owners, o)
    if id then
      if redis.call('HGET', ids, id) == o then redis.call('HDEL', ids, id) end
      redis.call('HDEL', owners, o)
    end
  end
end
for _, m in ipairs(ops.srem) do redis.call('SREM', m[1], m[2]) end
for _, z in ipairs(ops.zadd) do redis.call('ZADD', z[1], z[2], z[3]) end
for _, z in ipairs(ops.ztrim) do redis.call('ZREMRANGEBYSCORE', z[1], '-inf', '(' .. z[2]) end
-- A prune: the removed VMs' records leave their scope, counters adjusted as step.lua keeps
-- them (`s:<state>`, `n:<node>:<state>` count each VM once by its derived state).
if #ops.forget_vms > 0 then
  local vmk, stk, fk, vsk, ck = ops.scope_keys[1], ops.scope_keys[2], ops.scope_keys[3],
    ops.scope_keys[4], ops.scope_keys[5]
  for _, vm in ipairs(ops.forget_vms) do
    local st = redis.call('HGET', vsk, vm)
    if st then
      local state, node = string.match(st, '^([^|]*)|(.*)$')
      if state then
        redis.call('HINCRBY', ck, 's:' .. state, -1)
        redis.call('HINCRBY', ck, 'n:' .. node .. ':' .. state, -1)
      end
      redis.call('HDEL', vsk, vm)
    end
    redis.call('HDEL', vmk, vm)
    for _, step in ipairs(ops.vm_steps) do
      redis.call('HDEL', stk, vm .. '|' .. step)
      redis.call('SREM', fk, vm .. '|' .. step)
    end
  end
end
for _, id in ipairs(ops.forget_jobs) do
  local f = redis.call('HMGET', jk(id), 'state', 'group', 'slots', 'waiting_on')
  if f[1] and f[1] ~= 'running' then forget(id, f[1], f[2], f[3], f[4]) end
end
for _, m in ipairs(ops.forget_matching) do
  local group, pattern = m[1], m[2]
  local gk = P .. 'group:' .. group
  local found = {}
  local cursor = '0'
  repeat
    local r = redis.call('SSCAN', gk, cursor, 'MATCH', pattern, 'COUNT', 500)
    cursor = r[1]
    for _, id in ipairs(r[2]) do found[#found + 1] = id end
  until cursor == '0'
  for _, id in ipairs(found) do
    local f = redis.call('HMGET', jk(id), 'state', 'group', 'slots', 'waiting_on')
    if f[1] and f[1] ~= 'running' then forget(id, f[1], f[2], f[3], f[4]) end
  end
end
if ops.expire_ms > 0 then redis.call('PEXPIRE', d, ops.expire_ms) end
return 1
