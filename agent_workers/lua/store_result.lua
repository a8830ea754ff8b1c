-- KEYS: 1 the result key (celery-task-meta-<id>)
-- ARGV: 1 the record (JSON, Celery's format), 2 expiry in seconds (0: none)
-- Stores a result unless the key already holds a final one (SUCCESS, FAILURE, REVOKED): one task id, one final
-- answer, whatever redeliveries and retries race. Then publishes it, as Celery's backend does for its waiters.
local current = redis.call('GET', KEYS[1])
if current then
  -- Celery and orjson both write "status" first; decode the whole record only when it is not.
  local status = string.match(current, '^%s*{%s*"status"%s*:%s*"(%u+)"')
  if not status then
    local ok, record = pcall(cjson.decode, current)
    if ok and type(record) == 'table' then status = record.status end
  end
  if status == 'SUCCESS' or status == 'FAILURE' or status == 'REVOKED' then
    return 0
  end
end
local ttl = tonumber(ARGV[2])
if ttl and ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
