-- Disable a key for a secret, and say what it replaced (RedisStore.disable).
--
-- KEYS[1] disabled map, KEYS[2] the provider's epoch (bumped: the pool totals change);
-- ARGV[1] key name, ARGV[2] record "fingerprint|reason"
-- Returns the record it replaced (nil: the key was not disabled).

local before = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('INCR', KEYS[2])
return before
