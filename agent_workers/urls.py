"""What a service URL may say: the rules a Sentinel URL must follow for kombu, Celery and redis-py alike.

Read by :mod:`agent_workers.config` (settings refused at start-up) and :mod:`agent_workers.redis_clients` (clients
built from a URL), so both apply the same rule.
"""

from __future__ import annotations

from urllib.parse import urlparse


def sentinel_url_problem(url: str) -> str | None:
    """What is wrong with a ``sentinel://a:26379;sentinel://b:26379/db`` URL, or None (also for other schemes).

    kombu and Celery read the database and the credentials from the FIRST sentinel's part only, so a ``/db`` or a
    password written on a later part alone is silently ignored (database 0, no password).
    """
    parts = [urlparse(p.strip()) for p in url.split(";")]
    if parts[0].scheme != "sentinel":
        return None
    first = parts[0]
    for part in parts:
        if part.scheme != "sentinel" or not part.hostname:
            return "every ';'-separated part of a Sentinel URL must be sentinel://host:port"
        if (
            (part.path.strip("/") and part.path.strip("/") != first.path.strip("/"))
            or (part.password and part.password != first.password)
            or (part.username and part.username != first.username)
        ):
            return (
                "kombu and Celery take the database and the password of a Sentinel URL from its first part "
                "only; write them on the first sentinel (sentinel://:password@host:26379/2;sentinel://host2:26379)"
            )
    return None
