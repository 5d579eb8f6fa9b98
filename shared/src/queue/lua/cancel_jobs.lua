-- ARGV: prefix, slot hold ms, job ids. Cancels each of those jobs that is not finished
-- (`cancel_one`); unknown and finished ones are left as they are. Returns the number cancelled.
local hold = tonumber(ARGV[2])
local n = 0
for i = 3, #ARGV do
  n = n + cancel_one(ARGV[i], hold)
end
return n
