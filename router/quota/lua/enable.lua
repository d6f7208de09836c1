-- Enable a key again (RedisStore.enable).
--
-- KEYS[1] disabled map, KEYS[2] the provider's epoch (bumped: the key may serve again);
-- ARGV[1] key name. Returns the number of records deleted (0 or 1).

local deleted = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('INCR', KEYS[2])
return deleted
