-- ARGV: prefix, slot key, cap ('' removes the cap). Wakes parked jobs if there is room now.
local s = ARGV[2]
if ARGV[3] == '' then redis.call('HDEL', P .. 'caps', s) else redis.call('HSET', P .. 'caps', s, ARGV[3]) end
local n = free_count(s)
if n > 0 then wake(s, n) end
return 1
