-- Records one step of a job and keeps the deployment's progress summary exact, in one
-- atomic, fenced call (a FencedScript: the lease check runs first). `status` then reads a
-- few counters instead of every step record of every VM.
-- Keys, ARGV[4..9]: deployment hash, steps hash, failed set, VM states hash, counts hash,
--   events stream.
-- Args, ARGV[10..16]: field (`<subject>|<step>`), record JSON, state, step, subject,
--   error ('' for none), node of a VM's step ('' for a student's or a node's step).
local dkey, steps, failed, vmst, counts, events = ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local field, rec, state, step, subject, err, node =
  ARGV[10], ARGV[11], ARGV[12], ARGV[13], ARGV[14], ARGV[15], ARGV[16]

redis.call('HSET', steps, field, rec)
if state == 'failed' then
  redis.call('SADD', failed, field)
else
  redis.call('SREM', failed, field)
end
local ev = {'subject', subject, 'step', step, 'state', state}
if err ~= '' then
  ev[#ev + 1] = 'error'
  ev[#ev + 1] = err
end
redis.call('XADD', events, 'MAXLEN', '~', 10000, '*', unpack(ev))
if node == '' then return 1 end

-- The VM's state follows from its steps' records (the same rule as the producer's
-- per-VM status): failed if a step failed, done if all are, else by its clone's state.
local list = redis.call('HGET', dkey, 'vmsteps')
if not list then return 1 end
local fields, member = {}, false
for name in string.gmatch(list, '[^\n]+') do
  fields[#fields + 1] = subject .. '|' .. name
  if name == step then member = true end
end
if not member then return 1 end
local recs = redis.call('HMGET', steps, unpack(fields))
local any_failed, all_done, clone = false, true, nil
for i, r in ipairs(recs) do
  local s = nil
  if r then s = cjson.decode(r).state end
  if i == 1 then clone = s end
  if s == 'failed' then any_failed = true end
  if s ~= 'done' then all_done = false end
end
local vm
if any_failed then vm = 'failed'
elseif all_done then vm = 'done'
elseif clone == nil then vm = 'pending'
elseif clone == 'running' then vm = 'cloning'
elseif clone == 'retrying' then vm = 'retrying'
else vm = 'configuring' end

-- Counts: `s:<state>` per deployment and `n:<node>:<state>` per node; a VM with no
-- entry yet is pending (the producer knows the totals).
local new = vm .. '|' .. node
local old = redis.call('HGET', vmst, subject)
if old == new then return 1 end
if old then
  local os, on = string.match(old, '^([^|]*)|(.*)$')
  redis.call('HINCRBY', counts, 's:' .. os, -1)
  redis.call('HINCRBY', counts, 'n:' .. on .. ':' .. os, -1)
end
redis.call('HSET', vmst, subject, new)
redis.call('HINCRBY', counts, 's:' .. vm, 1)
redis.call('HINCRBY', counts, 'n:' .. node .. ':' .. vm, 1)
return 1
