-- KEYS: meta, history[, idempotency key]. ARGV: channel, head, tail, size, ttl, meta ttl,
-- node[, the key's ttl in ms]. Returns the offset, or 0 when the stream had the key.
if KEYS[3] and not redis.call('SET', KEYS[3], '', 'NX', 'PX', ARGV[8]) then
  return 0
end
local now = redis.call('TIME')
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  redis.call('DEL', KEYS[2])
  local run = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)')
  redis.call('HSET', KEYS[1], 'e', ARGV[7] .. now[1] .. now[2], 'r', run)
end
local offset = redis.call('HINCRBY', KEYS[1], 'o', 1)
local frame = ARGV[2] .. ',"offset":' .. offset .. ARGV[3]
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[4], offset .. '-0', 't', now[1], 'd', frame)
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('PUBLISH', ARGV[1], frame)
return offset
