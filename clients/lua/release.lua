-- clients/lua/release.lua -- give a lease back (the loader failed).
-- KEYS[1] the key; ARGV[1] the token. Deletes the key if it holds the token.
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
