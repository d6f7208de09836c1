-- The clients day map and fields of free providers' day maps, read at one instant
-- (RedisStore.client_usage).
--
-- KEYS[1] clients day map, KEYS[2..] day maps of free providers (one hash tag: one slot)
-- ARGV the fields to read from each day map
-- Returns {HGETALL of the clients map, {values of KEYS[2]'s fields}, ...}; an absent field
-- is nil (false in Lua).

local reply = {redis.call('HGETALL', KEYS[1])}
for i = 2, #KEYS do
  local values = {}
  -- HMGET in batches: unpack() has a limit on the number of values.
  for first = 1, #ARGV, 1000 do
    local got = redis.call('HMGET', KEYS[i], unpack(ARGV, first, math.min(first + 999, #ARGV)))
    for j = 1, #got do values[#values + 1] = got[j] end
  end
  reply[i] = values
end
return reply
