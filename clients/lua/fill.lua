-- clients/lua/fill.lua -- fill a key under a lease.
-- KEYS[1] the key, KEYS[2..] its tag sets; ARGV[1] the token, ARGV[2] the
-- value, ARGV[3] its ttl in seconds. Only if the key still holds the token:
-- writes the value and lists the key in its tag sets, each set's expiry kept
-- at least twice the ttl (as cachekit does). Returns 1 if it filled, else 0.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local ttl = tonumber(ARGV[3])
redis.call('SET', KEYS[1], ARGV[2], 'EX', ttl)
for i = 2, #KEYS do
  redis.call('SADD', KEYS[i], KEYS[1])
  if redis.call('TTL', KEYS[i]) < 2 * ttl then redis.call('EXPIRE', KEYS[i], 2 * ttl) end
end
return 1
