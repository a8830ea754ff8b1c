-- KEYS: 1 the queue's list, 2 this chunk's sent marker
-- ARGV: 1 the marker's time to live (seconds), 2.. the messages, in the order LPUSH takes them
-- One chunk of a bulk publish, all or nothing: the messages and a marker saying they were queued, so a producer
-- whose reply was lost asks the marker instead of guessing (agent_workers/client/publisher.py).
redis.call('LPUSH', KEYS[1], unpack(ARGV, 2))
redis.call('SET', KEYS[2], 1, 'EX', ARGV[1])
return 1
