-- KEYS: 1 the heartbeats (sorted set: worker id -> last beat)
-- ARGV: 1 this worker's id
-- One heartbeat, scored with Redis's own clock (TIME) so that workers on hosts with skewed clocks agree on who is
-- dead. Fast reclaim: agent_workers/worker/reclaim.py.
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], tonumber(t[1]) + tonumber(t[2]) / 1000000, ARGV[1])
return 1
