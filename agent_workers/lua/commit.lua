-- KEYS: 1 head, 2 applied (zset update id -> version), 3 history, then n staging chunks, then n blob chunks
-- ARGV: 1 expected version, 2 update id ('' = none), 3 history record, 4 n, 5 keep versions,
--       6 epoch ('' = any), 7 set the staleness barrier (1/0), 8 dedup window (update ids), 9 blob key prefix,
--       10 history length, 11 how many of the n chunks hold the parameters (the rest: optimizer state),
--       12... further update ids of a group commit (several steps applied in this one version)
local n = tonumber(ARGV[4])
local function drop_staging()
  for i = 1, n do redis.call('DEL', KEYS[3 + i]) end
end
local ids = {}
if ARGV[2] ~= '' then ids[1] = ARGV[2] end
for i = 12, #ARGV do ids[#ids + 1] = ARGV[i] end
-- Every id is checked before anything changes: a group holding one id already applied is refused whole, and the
-- reply names each such id with its version, so the caller drops them and commits the rest.
local dup = {}
for _, id in ipairs(ids) do
  local done = redis.call('ZSCORE', KEYS[2], id)
  if done then dup[#dup + 1] = id; dup[#dup + 1] = tonumber(done) end
end
if #dup > 0 then drop_staging(); return {'duplicate', dup[2], unpack(dup)} end
local head = redis.call('HMGET', KEYS[1], 'version', 'epoch')
local cur = tonumber(head[1])
if cur == nil then drop_staging(); return {'missing', -1} end
if ARGV[6] ~= '' and head[2] ~= ARGV[6] then drop_staging(); return {'replaced', cur} end
if cur ~= tonumber(ARGV[1]) then drop_staging(); return {'conflict', cur} end
for i = 1, n do
  if redis.call('EXISTS', KEYS[3 + i]) == 0 then drop_staging(); return {'nostaging', cur} end
end
local new = cur + 1
for i = 1, n do
  redis.call('RENAME', KEYS[3 + i], KEYS[3 + n + i])
  redis.call('PERSIST', KEYS[3 + n + i])
end
local p = tonumber(ARGV[11])
redis.call('HSET', KEYS[1], 'version', new, 'blob', KEYS[4 + n], 'chunks', n, 'pchunks', p)
if n > 1 then redis.call('HSET', KEYS[1], 'chunks:' .. new, n) end
if p < n then redis.call('HSET', KEYS[1], 'pchunks:' .. new, p) end
if ARGV[7] == '1' then redis.call('HSET', KEYS[1], 'barrier', new) end
if #ids > 0 then
  for _, id in ipairs(ids) do redis.call('ZADD', KEYS[2], new, id) end
  -- The window counts ids, not versions: keep the newest ARGV[8] ids (a group commit adds several per version, and
  -- trimming by version let the set grow to window x group size).
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(tonumber(ARGV[8]) + 1))
end
redis.call('LPUSH', KEYS[3], ARGV[3])
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[10]) - 1)
-- Collect the version that just left the retention window. Its chunk keys are derived from the blob prefix
-- rather than declared: they share the model's hash tag, hence the slot, and the client cannot know how many
-- chunks an old version had without another round trip.
local old = new - tonumber(ARGV[5])
if old >= 0 then
  local m = tonumber(redis.call('HGET', KEYS[1], 'chunks:' .. old) or '1')
  redis.call('DEL', ARGV[9] .. old)
  for i = 1, m - 1 do redis.call('DEL', ARGV[9] .. old .. ':' .. i) end
  if m > 1 then redis.call('HDEL', KEYS[1], 'chunks:' .. old) end
  redis.call('HDEL', KEYS[1], 'pchunks:' .. old)
end
return {'committed', new}
