"""Operator tools behind the CLI: the demo, benchmarks, the soak and the training report, and the supervisor that
starts their worker processes. Imported by ``agent_workers.cli`` only, never by the client or the worker, except
``agent_workers.tools.baselines``: the benchmark's baseline tasks, a worker plugin (``AGENT_WORKERS_PLUGINS``)."""
