"""A bounded soak: sustained load with periodic SIGKILLs, then an account of every request.

``agent-workers soak`` (``make soak``) starts a ``redis-server`` of its own on a free port (broker, results and
parameters; ``--broker-url`` puts the queue on another broker, e.g. RabbitMQ), starts ``--workers`` inference
worker processes and sends ``--requests`` predictions paced evenly over ``--duration`` seconds. Every
``--kill-every`` seconds it SIGKILLs worker 0 (the *victim*) and starts a replacement at once, as systemd or
Kubernetes would; the other workers are never killed, so their memory over the whole run shows whether anything
leaks. It prints a line every ``--report-every`` seconds and, after the queue drained, the account:

* **sent**: requests published;
* **completed**: requests with a stored result; **lost** = sent - completed;
* **duplicated**: requests computed more than once (a killed worker computed and stored them but died before its
  ack, so the broker redelivered them; their results are identical and simply stored again);
* **failed** / **wrong**: results that are a failure, or whose output differs from torch run locally;
* worker **RSS** over time, and its growth between the first and the last fifth of the run.

It writes ``soak.json`` and ``soak.png`` to ``--out`` (docs/benchmarks) and exits 1 when anything was lost, failed or
wrong. ``--drain`` measures throughput instead: the workers start first, then all requests are published at once
and the run times how long the workers take to clear them (no kills); docs/scaling.md compares 1 and 2 workers.

Modules: ``runner`` (the workers, the producer, the killer), ``account`` (what became of every request, worker
memory, the summary and the files) and ``plot``.
"""

from agent_workers.tools.soak.runner import Sample, Soak, SoakConfig, run

__all__ = ["Sample", "Soak", "SoakConfig", "run"]
