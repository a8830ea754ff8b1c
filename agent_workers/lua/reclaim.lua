-- KEYS: 1 the heartbeats (sorted set: worker id -> last beat, Redis time), 2 kombu's unacked index (sorted set)
-- ARGV: 1 seconds without a heartbeat after which a worker is dead, 2 the held-set key prefix
--       ('<prefix><worker id>' is the set of delivery tags that worker holds), 3 the caller's own id, 4 at most
--       this many dead workers per call
-- Claims the messages of dead workers, atomically: every tag a dead worker holds that is still unacknowledged gets
-- index score 0 (older than any visibility timeout), its held set and heartbeat are deleted, and the tags are
-- returned for the caller to restore with kombu's own QoS.restore_by_tag. Should the caller die before restoring,
-- score 0 makes kombu's visibility sweep (any worker's, every few seconds) restore them: claimed is never lost.
-- The held-set keys are built here, not passed: a broker is one Redis (kombu has no Cluster broker).
-- Returns {dead worker ids, claimed tags}.
local t = redis.call('TIME')
local cutoff = tonumber(t[1]) + tonumber(t[2]) / 1000000 - tonumber(ARGV[1])
local dead = redis.call('ZRANGE', KEYS[1], '-inf', '(' .. cutoff, 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[4]))
local workers, tags = {}, {}
for _, id in ipairs(dead) do
  if id ~= ARGV[3] then
    local held = ARGV[2] .. id
    for _, tag in ipairs(redis.call('SMEMBERS', held)) do
      if redis.call('ZSCORE', KEYS[2], tag) then
        redis.call('ZADD', KEYS[2], 'XX', 0, tag)
        tags[#tags + 1] = tag
      end
    end
    redis.call('DEL', held)
    redis.call('ZREM', KEYS[1], id)
    workers[#workers + 1] = id
  end
end
return {workers, tags}
