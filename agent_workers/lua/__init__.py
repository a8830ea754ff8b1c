"""The server-side scripts, one ``.lua`` file each, loaded by name.

* ``commit.lua``: the parameter store's compare-and-set commit (agent_workers/params.py);
* ``pop_and_record.lua``: the Redis transport's atomic pop-and-record-as-unacknowledged
  (agent_workers/worker/kombu_redis.py);
* ``heartbeat.lua`` and ``reclaim.lua``: fast reclaim's heartbeat and its sweep of dead workers' messages
  (agent_workers/worker/reclaim.py);
* ``push.lua``: the client's all-or-nothing chunk of a bulk publish, with its sent marker
  (agent_workers/client/publisher.py);
* ``store_result.lua``: the result writer's store-unless-final (agent_workers/worker/results.py).
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files


@cache
def source(name: str) -> str:
    """The text of ``<name>.lua``."""
    return files(__name__).joinpath(f"{name}.lua").read_text(encoding="utf-8")
