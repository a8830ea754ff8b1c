"""Hypothesis profiles for the fuzz suite: ``fast`` (the default, in ``make test``) and ``long`` (``make fuzz``),
chosen by ``HYPOTHESIS_PROFILE``."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

_COMMON = dict(
    deadline=None,  # each example is a worker round trip
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    # Every shrink step is a worker round trip that waits for results which may never come: report the failing
    # example as found instead of shrinking it for minutes.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    database=None,  # no .hypothesis directory in the tree; failures print their reproducing example
)
settings.register_profile("fast", max_examples=25, **_COMMON)
settings.register_profile("long", max_examples=500, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))
