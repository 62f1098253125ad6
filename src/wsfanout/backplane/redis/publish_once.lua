-- History off, a message with an idempotency key. KEYS: the key. ARGV: channel, frame,
-- the key's ttl in ms. Returns 1 once published, 0 when the stream had the key.
if not redis.call('SET', KEYS[1], '', 'NX', 'PX', ARGV[3]) then
  return 0
end
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
