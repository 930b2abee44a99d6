"""The CPUs this process may use: what the stages size their threads and worker processes by."""

from __future__ import annotations

import os


def machine_threads() -> int:
    """CPUs available to this process (its affinity mask where the OS has one, e.g. under taskset or a container
    cpuset), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)
