"""The worker side: the Celery app and its bootsteps, the dynamic batcher (policy, result writer), the inference
engine, remote control, metrics, and ``kombu_redis`` — the only module that knows kombu's Redis internals.

The request path: ``kombu_redis`` (pop) -> ``batcher`` (buffer, group, validate) -> ``inference`` (one forward pass)
-> ``results`` (one pipelined write of Celery's result record) -> ``kombu_redis.ack_all``.
"""
