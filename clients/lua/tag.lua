-- clients/lua/tag.lua -- Redis Cluster's second step: a tag set in another slot.
-- KEYS[1] the tag set; ARGV[1] the key, ARGV[2] a ttl in seconds (0: leave
-- the set's expiry alone, else keep it at least twice the ttl).
redis.call('SADD', KEYS[1], ARGV[1])
local ttl = tonumber(ARGV[2])
if ttl > 0 and redis.call('TTL', KEYS[1]) < 2 * ttl then redis.call('EXPIRE', KEYS[1], 2 * ttl) end
return 1
