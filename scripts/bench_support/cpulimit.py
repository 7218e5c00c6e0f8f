"""A CPU quota per scheduler process (``bench.py --cpu-quota F``), to measure several
schedulers where each one's CPU is the limit rather than the machine's.

Each process is put into a control group of its own whose CFS quota is ``F`` of one core
(cgroup v1's ``cpu`` controller, or cgroup v2's ``cpu.max``), so K processes get K times
the CPU of one while the machine has cores to spare. Standard library only (runs in the
parent). Needs a writable cgroup hierarchy (root in a container that mounts it so).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

_PERIOD_US = 100_000
_V1 = Path("/sys/fs/cgroup/cpu")
_V2 = Path("/sys/fs/cgroup")


class CpuQuota:
    """Control groups of ``share`` of one core each, one per process placed; removed on
    :meth:`close`."""

    def __init__(self, share: float) -> None:
        if not 0 < share <= 64:
            raise ValueError(f"--cpu-quota must be a share of a core in (0, 64], not {share!r}")
        self._quota_us = max(1_000, round(share * _PERIOD_US))
        if (_V1 / "cpu.cfs_quota_us").exists():
            self._root, self._v2 = _V1, False
        elif (_V2 / "cgroup.controllers").exists():
            self._root, self._v2 = _V2, True
        else:
            raise RuntimeError("--cpu-quota needs a cgroup v1 cpu controller or cgroup v2")
        if not os.access(self._root, os.W_OK):
            raise RuntimeError(f"--cpu-quota needs write access to {self._root}")
        self._groups: list[Path] = []

    def place(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into a new group of its own."""
        group = self._root / f"taskiq_beat_bench_{os.getpid()}_{pid}"
        group.mkdir()
        self._groups.append(group)
        if self._v2:
            (group / "cpu.max").write_text(f"{self._quota_us} {_PERIOD_US}\n")
        else:
            (group / "cpu.cfs_period_us").write_text(f"{_PERIOD_US}\n")
            (group / "cpu.cfs_quota_us").write_text(f"{self._quota_us}\n")
        (group / "cgroup.procs").write_text(f"{pid}\n")

    def close(self) -> None:
        """Remove the groups (their processes have exited; a group still holding one is
        left behind rather than its process moved)."""
        for group in self._groups:
            with contextlib.suppress(OSError):
                group.rmdir()
        self._groups.clear()
