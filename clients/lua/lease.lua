-- clients/lua/lease.lua -- take a lease (used by clients/node and clients/python).
-- KEYS[1] the key, KEYS[2..] its tag sets; ARGV[1] the token, ARGV[2] lease ms.
-- Returns the key's string if it has one; else stores the token in the key
-- (expiring after the lease time), lists the key in its tag sets (so that a
-- tag flush revokes the lease too) and returns the token.
local v = redis.call('GET', KEYS[1])
if v then return v end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
for i = 2, #KEYS do redis.call('SADD', KEYS[i], KEYS[1]) end
return ARGV[1]
