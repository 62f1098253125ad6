-- KEYS: pg. ARGV: most names. Returns the count, then up to that many names.
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1e6
local count = redis.call('ZCOUNT', KEYS[1], t, '+inf')
local names = redis.call('ZRANGEBYSCORE', KEYS[1], t, '+inf', 'LIMIT', 0, tonumber(ARGV[1]))
table.insert(names, 1, count)
return names
