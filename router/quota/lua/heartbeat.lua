-- One replica says it is alive, forgets replicas long gone, counts the live ones, and reads
-- the day-map fields it asks for (the counts behind its local allowance, store.on_error:
-- fail_open). Times are Redis's own clock, so the replicas' clocks need not agree.
--
-- KEYS[1] replicas hash (replica id -> last heartbeat, Unix ms), KEYS[2..] day maps to read
-- ARGV[1] replica id, ARGV[2] live window ms, ARGV[3] forget after ms,
-- then per day map (KEYS[i + 1]): n, then n field names
-- Returns {live replicas (this one included), {values of the first map}, {...}, ...};
-- an absent field is nil (false in Lua).

local replicas = KEYS[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live_since = now - tonumber(ARGV[2])
local forget_before = now - tonumber(ARGV[3])
redis.call('HSET', replicas, ARGV[1], string.format('%d', now))
local live = 0
local all = redis.call('HGETALL', replicas)
for i = 1, #all, 2 do
  local seen = tonumber(all[i + 1])
  if seen == nil or seen < forget_before then
    redis.call('HDEL', replicas, all[i])
  elseif seen >= live_since then
    live = live + 1
  end
end
local reply = {live}
local a = 4
for i = 2, #KEYS do
  local n = tonumber(ARGV[a])
  local fields = {}
  for j = 1, n do fields[j] = ARGV[a + j] end
  a = a + n + 1
  if n > 0 then
    reply[i] = redis.call('HMGET', KEYS[i], unpack(fields))
  else
    reply[i] = {}
  end
end
return reply
