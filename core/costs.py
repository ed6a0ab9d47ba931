"""What a unit of work cost: wall, CPU and GPU seconds, measured around it (the ``jobs`` table's ledger columns).

CPU seconds are the process's CPU time over the work (every thread of a torch or BLAS computation counted), or
the calling thread's alone where several jobs share one process on threads (``per_thread``: DFT jobs on the
local runner). GPU seconds are the wall time the work held a CUDA device; 0 on the CPU. A batch's cost is shared
evenly among its structures (``Cost.share``), so a view summing job rows sums to what the batch cost.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class Cost:
    """Seconds spent: wall clock, CPU time, and GPU (device-held wall) time."""

    wall_s: float = 0.0
    cpu_s: float = 0.0
    gpu_s: float = 0.0

    def share(self, n: int) -> Cost:
        """One of ``n`` equal shares (a batched computation's cost per structure)."""
        n = max(1, n)
        return Cost(self.wall_s / n, self.cpu_s / n, self.gpu_s / n)

    def on(self, device: str | None) -> Cost:
        """This cost with its GPU seconds set for work that ran on ``device`` (all of its wall time on a GPU)."""
        return Cost(self.wall_s, self.cpu_s, self.wall_s if str(device).startswith("cuda") else 0.0)

    def columns(self) -> dict[str, float]:
        """The ledger columns of a ``jobs`` row (``wall_time_s``, ``cpu_s``, ``gpu_s``)."""
        return {"wall_time_s": self.wall_s, "cpu_s": self.cpu_s, "gpu_s": self.gpu_s}


@contextmanager
def measured(device: str | None = "cpu", per_thread: bool = False) -> Iterator[Cost]:
    """Measure the enclosed work: the yielded ``Cost`` is filled in when the block ends (also on an exception)."""
    clock = time.thread_time if per_thread else time.process_time
    cost = Cost()
    wall0, cpu0 = time.perf_counter(), clock()
    try:
        yield cost
    finally:
        cost.wall_s = time.perf_counter() - wall0
        cost.cpu_s = clock() - cpu0
        cost.gpu_s = cost.on(device).gpu_s
