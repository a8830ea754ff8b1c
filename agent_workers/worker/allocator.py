"""The process's C allocator: glibc's malloc thresholds pinned where a forward pass stops paying page faults.

torch's CPU allocator asks malloc for every intermediate tensor and frees it when the op that read it is done. A
CNN at batch 64 allocates activations of several MB per layer. glibc hands blocks over ``M_MMAP_THRESHOLD`` to
``mmap`` and gives a heap's free top back to the kernel once it passes ``M_TRIM_THRESHOLD``; both start at 128 KiB
and glibc raises them as large blocks are freed (up to 32 MiB and 64 MiB), but the heaps of a thread's own arena
still shrink and grow around each batch. The worker computes in its compute thread (worker/pipeline.py), so every
batch touched its activations' pages anew: on 2 cores a 57k-parameter CNN's forward pass took 4,000–5,000 minor
page faults per batch of 64 and ~0.12–0.16 ms of kernel time per image, ~40 % of the pass (none on the main thread,
whose heap glibc keeps). With the two thresholds pinned at glibc's own ceilings from the start: ~0 faults, the pass
as fast as on the main thread (docs/benchmarks.md, "The compute thread's page faults").

The cost: up to ``TRIM_THRESHOLD`` of freed memory per arena stays with the process instead of going back to the
kernel, and blocks up to ``MMAP_THRESHOLD`` come from the heaps. ``AGENT_WORKERS_MALLOC_TUNING=0`` leaves glibc's
defaults (and its ``MALLOC_*_`` variables, or an allocator put in with ``LD_PRELOAD``) in charge. Nothing happens on
a C library other than glibc.
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger(__name__)

#: Blocks up to this size come from malloc's heaps (glibc's dynamic threshold's ceiling on 64-bit).
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Free memory at a heap's top kept up to this size (twice the above, the ratio glibc's dynamic rule keeps).
TRIM_THRESHOLD = 64 * 1024 * 1024
# malloc.h's parameter numbers for mallopt
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_tuned = False


def tune() -> bool:
    """Pin glibc's mmap and trim thresholds for this process (once; a forked child inherits them).

    Returns:
        True when they are set (now or earlier), False on another C library or when glibc refused.
    """
    global _tuned
    if _tuned:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = (
            libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        )
    except (OSError, AttributeError) as exc:
        log.warning("cannot tune glibc's malloc (%s); the forward pass may pay page faults per batch", exc)
        return False
    if not ok:
        log.warning("glibc refused the malloc thresholds; the forward pass may pay page faults per batch")
        return False
    _tuned = True
    return True
