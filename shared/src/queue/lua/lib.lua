-- Shared prelude of every queue script (prepended in Rust; see store.rs).
-- ARGV[1] is the key prefix, e.g. "{lf}:". KEYS[1] is always "<prefix>ready" so that a
-- cluster client routes the call to the slot of the hash tag; every other key shares the tag.
local P = ARGV[1]
local NOW
do
  local t = redis.call('TIME')
  NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function jk(id) return P .. 'job:' .. id end

local function split(s)
  local out = {}
  if not s or s == '' then return out end
  for part in string.gmatch(s, '[^\n]+') do out[#out + 1] = part end
  return out
end

-- Every state change goes through here so that the per-queue and per-group counters stay
-- exact: old may be false/nil for a new job, new may be nil when a job is forgotten.
local function transition(id, old, new, group)
  if old and old ~= '' then
    redis.call('HINCRBY', P .. 'counts', old, -1)
    if group and group ~= '' then redis.call('HINCRBY', P .. 'gcounts:' .. group, old, -1) end
  end
  if new then
    redis.call('HINCRBY', P .. 'counts', new, 1)
    if group and group ~= '' then redis.call('HINCRBY', P .. 'gcounts:' .. group, new, 1) end
    redis.call('HSET', jk(id), 'state', new)
  end
end

-- Puts a job in ready (due now) or scheduled (due later); score is its place in line.
local function schedule(id, old, group, at)
  if at > NOW then
    transition(id, old, 'scheduled', group)
    redis.call('ZADD', P .. 'scheduled', at, id)
  else
    transition(id, old, 'ready', group)
    redis.call('ZADD', P .. 'ready', at, id)
  end
end

-- A key named `mutex:...` is held by one job at a time without a `caps` entry (one key per
-- object, e.g. a VM's power, would otherwise need one entry each).
local function is_mutex(s)
  return string.sub(s, 1, 6) == 'mutex:'
end

local function cap_of(s)
  if is_mutex(s) then return 1 end
  local c = redis.call('HGET', P .. 'caps', s)
  if not c then return nil end
  return tonumber(c)
end

local function free_count(s)
  local cap = cap_of(s)
  if not cap then return 1000 end
  return cap - redis.call('SCARD', P .. 'slot:' .. s)
end

-- Moves up to n jobs parked on slot s back to ready, with their old score (their place).
local function wake(s, n)
  local wk = P .. 'wait:' .. s
  if n > 1000 then n = 1000 end
  for _ = 1, n do
    local r = redis.call('ZPOPMIN', wk)
    if #r == 0 then break end
    local f = redis.call('HMGET', jk(r[1]), 'state', 'group')
    if f[1] == 'waiting' then
      transition(r[1], 'waiting', 'ready', f[2])
      redis.call('ZADD', P .. 'ready', r[2], r[1])
    end
  end
  if redis.call('EXISTS', wk) == 0 then redis.call('SREM', P .. 'waitkeys', s) end
end

-- Acquires every slot of a job or none. Returns nil on success, else the first full slot key.
-- A job that already holds a slot (kept across a lost lease) keeps it.
local function try_slots(id, slots)
  for _, s in ipairs(slots) do
    local sk = P .. 'slot:' .. s
    if redis.call('SISMEMBER', sk, id) == 0 then
      local cap = cap_of(s)
      if cap and redis.call('SCARD', sk) >= cap then return s end
    end
  end
  for _, s in ipairs(slots) do
    local sk = P .. 'slot:' .. s
    redis.call('SADD', sk, id)
    if not is_mutex(s) then
      local held = redis.call('SCARD', sk)
      local hwm = tonumber(redis.call('HGET', P .. 'slothwm', s) or '0')
      if held > hwm then redis.call('HSET', P .. 'slothwm', s, held) end
    end
  end
  redis.call('ZREM', P .. 'slotheld', id)
  return nil
end

local function release_slots(id, slots)
  redis.call('ZREM', P .. 'slotheld', id)
  for _, s in ipairs(slots) do redis.call('SREM', P .. 'slot:' .. s, id) end
  for _, s in ipairs(slots) do
    local f = free_count(s)
    if f > 0 then wake(s, f) end
  end
end

-- Deletes a job that is not running: its record, history and successor set, its entry in
-- the index of its state and in its group (the group's set and counters go with the last
-- member). Slots it still holds are freed.
local function forget(id, st, group, slots, waiting_on)
  if st == 'ready' then redis.call('ZREM', P .. 'ready', id)
  elseif st == 'scheduled' then redis.call('ZREM', P .. 'scheduled', id)
  elseif st == 'gated' then redis.call('SREM', P .. 'gated', id)
  elseif st == 'waiting' then redis.call('ZREM', P .. 'wait:' .. (waiting_on or ''), id)
  elseif st == 'dead' then redis.call('ZREM', P .. 'dead', id) end
  release_slots(id, split(slots))
  transition(id, st, nil, group)
  redis.call('DEL', jk(id), P .. 'hist:' .. id, P .. 'succ:' .. id)
  if group and group ~= '' then
    local gk = P .. 'group:' .. group
    redis.call('SREM', gk, id)
    if redis.call('SCARD', gk) == 0 then redis.call('DEL', gk, P .. 'gcounts:' .. group) end
  end
end

local function push_history(id, entry, max)
  local hk = P .. 'hist:' .. id
  redis.call('LPUSH', hk, cjson.encode(entry))
  redis.call('LTRIM', hk, 0, max - 1)
end

-- Runs `cmd key <items...>` in slices of at most 1000 items (`width` items per entry, so
-- ZADD's score/member pairs stay together): never an unbounded unpack.
local function bulk(cmd, key, items, width)
  local step = 1000 - (1000 % width)
  for i = 1, #items, step do
    redis.call(cmd, key, unpack(items, i, math.min(i + step - 1, #items)))
  end
end

-- Enqueues a batch of job specs (see spec.rs `WireSpec`). Per spec: 1 if created, 0 if the
-- key already exists (whatever its state: the key is the idempotency key). Per job only the
-- hash and its gates are written one by one; the counters, the group set and the ready,
-- scheduled and gated indexes are written once per batch.
local function enqueue_all(json)
  local out = {}
  if json == nil or json == '' then return out end
  local ready, scheduled, gated = {}, {}, {}
  local members = {}   -- group -> ids
  local tally = {}     -- group -> state -> n
  for i, s in ipairs(cjson.decode(json)) do
    local id = s.k
    local key = jk(id)
    if redis.call('EXISTS', key) == 1 then
      out[i] = 0
    else
      out[i] = 1
      local run_at = NOW + (tonumber(s.d) or 0)
      local group = s.g or ''
      local pending = 0
      for _, g in ipairs(s.gate or {}) do
        if redis.call('HGET', jk(g), 'state') ~= 'done' then
          redis.call('SADD', P .. 'succ:' .. g, id)
          pending = pending + 1
        end
      end
      local state
      if pending > 0 then
        state = 'gated'
        gated[#gated + 1] = id
      elseif run_at > NOW then
        state = 'scheduled'
        scheduled[#scheduled + 1] = run_at
        scheduled[#scheduled + 1] = id
      else
        state = 'ready'
        ready[#ready + 1] = run_at
        ready[#ready + 1] = id
      end
      redis.call('HSET', key, 'kind', s.kind, 'payload', s.p, 'attempts', 0,
        'max_attempts', s.m, 'lease_losses', 0, 'max_lease_losses', s.ml, 'group', group,
        'slots', table.concat(s.s or {}, '\n'), 'run_at', run_at, 'score', run_at,
        'created_at', NOW, 'gate_pending', pending, 'state', state)
      if s.f then redis.call('HSET', key, 'forget', 1) end
      local t = tally[group]
      if not t then
        t = {}
        tally[group] = t
      end
      t[state] = (t[state] or 0) + 1
      if group ~= '' then
        local m = members[group]
        if not m then
          m = {}
          members[group] = m
        end
        m[#m + 1] = id
      end
    end
  end
  bulk('ZADD', P .. 'ready', ready, 2)
  bulk('ZADD', P .. 'scheduled', scheduled, 2)
  bulk('SADD', P .. 'gated', gated, 1)
  for group, ids in pairs(members) do bulk('SADD', P .. 'group:' .. group, ids, 1) end
  for group, t in pairs(tally) do
    for state, n in pairs(t) do
      redis.call('HINCRBY', P .. 'counts', state, n)
      if group ~= '' then redis.call('HINCRBY', P .. 'gcounts:' .. group, state, n) end
    end
  end
  return out
end

-- Cancels one job if it is not finished: out of whatever line it waits in; an in-flight one
-- loses its token at once (its ack is refused, renewal fails) and, since its Proxmox task may
-- still run, keeps its slots for `hold` ms before the reaper frees them. Returns 1 if cancelled.
local function cancel_one(id, hold)
  local key = jk(id)
  local f = redis.call('HMGET', key, 'state', 'waiting_on', 'slots', 'group')
  local st = f[1]
  if st == 'ready' then redis.call('ZREM', P .. 'ready', id)
  elseif st == 'scheduled' then redis.call('ZREM', P .. 'scheduled', id)
  elseif st == 'gated' then redis.call('SREM', P .. 'gated', id)
  elseif st == 'waiting' then redis.call('ZREM', P .. 'wait:' .. (f[2] or ''), id)
  elseif st == 'dead' then redis.call('ZREM', P .. 'dead', id)
  elseif st == 'running' then
    redis.call('ZREM', P .. 'inflight', id)
    redis.call('HDEL', key, 'token', 'lease_until')
    if f[3] and f[3] ~= '' then redis.call('ZADD', P .. 'slotheld', NOW + hold, id) end
  else return 0 end
  transition(id, st, 'cancelled', f[4])
  return 1
end
