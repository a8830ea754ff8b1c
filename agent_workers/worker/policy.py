"""How large a batch may grow and how long its first request may wait: fixed, or learned from measured costs."""

from __future__ import annotations

from collections import deque

from agent_workers.config import BatchSettings


class BatchPolicy:
    """How large a batch may grow and how long its first request may wait.

    ``fixed`` mode uses the settings as they are. ``adaptive`` mode learns the batch cost ``t(n) ≈ a·n + b`` online
    (least squares over recent batches, as BentoML's CORK dispatcher does) and caps the batch size and the wait so
    that wait + compute stays within ``latency_target_ms``.
    """

    HISTORY = 64

    def __init__(self, settings: BatchSettings) -> None:
        self.settings = settings
        self._samples: deque[tuple[int, float]] = deque(maxlen=self.HISTORY)
        self._a = 0.0
        self._b = 0.0
        self._fitted = 0  # samples seen at the last fit (estimate() refits lazily, only when asked)
        self._seen = 0

    def observe(self, size: int, seconds: float) -> None:
        """Record how long a batch of ``size`` took to compute."""
        self._samples.append((size, seconds))
        self._seen += 1
        if self.settings.mode == "adaptive" and len(self._samples) >= 8:
            self._fit()

    def estimate(self, size: int) -> float:
        """Predicted compute seconds of a batch of ``size`` in any mode, fitted on demand from what was observed
        (0 before the first batch); the deadline check's cost model."""
        if self._samples and self._fitted != self._seen:
            self._fit()
        return self.predicted(size)

    def _fit(self) -> None:
        self._fitted = self._seen
        samples = list(self._samples)  # one C-level copy: the compute thread may append meanwhile
        n = [float(s) for s, _ in samples]
        t = [float(x) for _, x in samples]
        mean_n, mean_t = sum(n) / len(n), sum(t) / len(t)
        var = sum((x - mean_n) ** 2 for x in n)
        if var == 0:
            self._a, self._b = mean_t / max(mean_n, 1.0), 0.0
            return
        a = sum((x - mean_n) * (y - mean_t) for x, y in zip(n, t, strict=True)) / var
        self._a = max(a, 0.0)
        self._b = max(mean_t - self._a * mean_n, 0.0)

    def predicted(self, size: int) -> float:
        """Predicted compute seconds of a batch of ``size`` (adaptive mode)."""
        return self._a * size + self._b

    @property
    def max_batch_size(self) -> int:
        limit = self.settings.max_batch_size
        if self.settings.mode != "adaptive" or self._a <= 0:
            return limit
        budget = self.settings.latency_target_ms / 1000.0 / 2
        return max(1, min(limit, int((budget - self._b) / self._a + 1e-9)))

    @property
    def max_wait(self) -> float:
        """Seconds the oldest request may wait for its batch to fill."""
        wait = self.settings.max_wait_ms / 1000.0
        if self.settings.mode != "adaptive" or self._a <= 0:
            return wait
        slack = self.settings.latency_target_ms / 1000.0 - self.predicted(self.max_batch_size)
        return max(0.0, min(wait, slack / 2))
