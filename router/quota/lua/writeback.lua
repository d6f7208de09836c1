-- Add the calls a replica counted locally while Redis was away (fail_open) to the day maps.
-- Applies once per batch token: a retry after a lost reply finds the marker and adds nothing.
--
-- KEYS[1] marker of this batch, KEYS[2..m+1] the day maps and clients day maps to add to,
-- KEYS[m+2..] the epochs of the providers concerned (bumped: reserve.lua rebuilds its index)
-- ARGV[1] marker ttl ms, ARGV[2] map ttl ms, ARGV[3] m, then per map (KEYS[i + 1]): n, n pairs
-- (field, delta)
-- Returns 1 when applied now, 0 when the batch was applied before.

if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
  return 0
end
local ttl = ARGV[2]
local m = tonumber(ARGV[3])
local a = 4
for i = 2, m + 1 do
  local map = KEYS[i]
  local n = tonumber(ARGV[a])
  a = a + 1
  for _ = 1, n do
    -- A release may meet a count already given back elsewhere: never below zero (logic.py).
    if redis.call('HINCRBY', map, ARGV[a], ARGV[a + 1]) < 0 then
      redis.call('HSET', map, ARGV[a], '0')
    end
    a = a + 2
  end
  -- As reserve.lua, a duration and never an instant on Redis's clock: yesterday stays
  -- readable for at least a day, then the map expires by itself.
  redis.call('PEXPIRE', map, ttl)
end
for i = m + 2, #KEYS do redis.call('INCR', KEYS[i]) end
return 1
