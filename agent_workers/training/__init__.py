"""Training: a step's arithmetic (``optim``), its compare-and-set protocol (``steps``), group commits (``groups``)
and uploaded datasets (``datasets``, torch-free: the client imports it to upload).

Nothing here imports the worker: the worker's trainer calls in, never the other way round.
"""
