-- A provider's day map and disabled map, read at one instant (RedisStore.snapshot).
-- One script, not a MULTI pipeline: one keyed command, routed and redirected alike on every
-- topology (a Cluster client follows MOVED for a command, not inside a transaction).
--
-- KEYS[1] day map, KEYS[2] disabled map (one hash tag: one slot)
-- Returns {HGETALL of the day map, HGETALL of the disabled map} (flat field, value lists).

return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])}
