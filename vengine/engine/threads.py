"""Thread counts for torch and numba from the cores this process may really use.

torch sizes its pool from the machine's cores, not from the CPU affinity mask or the cgroup
quota of a container; oversubscribed, decode on a loaded 2-core box ran 10-20x slower than on
one thread. Each count is the smaller of the affinity mask and the quota unless the user sets it.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from vengine.errors import ConfigError

MAX_THREADS = 4096


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us` quota; None: no quota."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cores() -> int:
    """Cores this process can run on: the affinity mask, capped by the cgroup quota (>= 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def set_threads(n: int | None = None) -> int:
    """Use n threads in torch and numba (None: OMP_NUM_THREADS if set, else available_cores());
    returns the count. numba's pool is sized through NUMBA_NUM_THREADS when it is not imported
    yet, so that setting threads never pays numba's import."""
    if n is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        n = int(env) if env.isdigit() and int(env) >= 1 else available_cores()
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_THREADS:
        raise ConfigError(f"threads must be an int in [1, {MAX_THREADS}], got {n!r}",
                          field="threads")
    import torch

    torch.set_num_threads(n)
    numba = sys.modules.get("numba")
    if numba is None:
        os.environ["NUMBA_NUM_THREADS"] = str(n)
    else:
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    return n
