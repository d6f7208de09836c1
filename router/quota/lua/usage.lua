-- Add a batch of answers' tokens and cost to their quota days (router/quota/spending.py), and
-- their tokens to the clients' tokens-per-minute windows (router/quota/rates.py). Applies once
-- per batch token: a retry after a lost reply finds the marker and adds nothing.
--
-- KEYS[1] marker of this batch, KEYS[2] the rates hash, KEYS[3..m+2] the maps to add to (usage
-- maps, clients day maps, provider day maps; router/quota/keys.py; one hash tag)
-- ARGV[1] marker ttl ms, ARGV[2] rates ttl ms, ARGV[3] m, then per map (KEYS[i + 2]): ttl ms,
-- n, n pairs (field, delta); then t, t triples (rates field, at_ms, tokens)
-- Returns 1 when applied now, 0 when the batch was applied before.

if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
  return 0
end
local m = tonumber(ARGV[3])
local a = 4
for i = 3, m + 2 do
  local map = KEYS[i]
  local ttl = ARGV[a]
  local n = tonumber(ARGV[a + 1])
  a = a + 2
  for _ = 1, n do
    redis.call('HINCRBY', map, ARGV[a], ARGV[a + 1])
    a = a + 2
  end
  -- A duration from the caller's clock, never an instant on Redis's (as reserve.lua).
  redis.call('PEXPIRE', map, ttl)
end

-- rates.window and rates.add at `at_ms`: the seconds of the last minute, then the tokens.
local function fmt(x) return string.format('%d', x) end
local t = tonumber(ARGV[a])
a = a + 1
for _ = 1, t do
  local field, at_ms, tokens = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  a = a + 3
  local second = math.floor(at_ms / 1000)
  local kept = {}
  for s, c in string.gmatch(redis.call('HGET', KEYS[2], field) or '', '(%-?%d+):(%d+)') do
    if tonumber(s) >= second - 60 then kept[#kept + 1] = {tonumber(s), tonumber(c)} end
  end
  if #kept > 0 and kept[#kept][1] == second then
    kept[#kept][2] = kept[#kept][2] + tokens
  else
    kept[#kept + 1] = {second, tokens}
  end
  local parts = {}
  for i, b in ipairs(kept) do parts[i] = fmt(b[1]) .. ':' .. fmt(b[2]) end
  redis.call('HSET', KEYS[2], field, table.concat(parts, ','))
end
if t > 0 then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
return 1
