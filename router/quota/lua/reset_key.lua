-- Forget a key's counters, exhaustion and cooldowns of a day. Mirrors logic.key_fields.
--
-- KEYS[1] day map, KEYS[2] the provider's epoch (bumped: the key may serve again); ARGV[1] key
-- Fields of a key: `<kind>|<key>` or `<kind>|<key>|<model>` with kind u, m, x, c or a
-- (router/quota/keys.py); the cursor and the fair-share fields (fs, fu|client) stay.
-- Returns the number of fields deleted.

local day_map, key = KEYS[1], ARGV[1]
local doomed = {}
for _, field in ipairs(redis.call('HKEYS', day_map)) do
  local kind, name = string.match(field, '^([^|]*)|([^|]*)')
  if name == key and (kind == 'u' or kind == 'm' or kind == 'x' or kind == 'c' or kind == 'a') then
    doomed[#doomed + 1] = field
  end
end
local deleted = 0
-- HDEL in batches: unpack() has a limit on the number of values.
for i = 1, #doomed, 1000 do
  deleted = deleted + redis.call('HDEL', day_map, unpack(doomed, i, math.min(i + 999, #doomed)))
end
redis.call('INCR', KEYS[2])
return deleted
