"""The generator's validity check: batched on tensors (what ``sample()`` runs) against one structure at a time.

Usage: ``python benchmarks/validity.py [--n 20000] [--device auto]``

Checks ``--n`` structures (the shared data's binaries repeated, and as many random cells, so that
valid and invalid ones mix as in raw samples) with ``core.metrics.validity_problems`` on the
device and with ``core.structures.validity_problem`` per structure on the host, prints structures/s for each and
whether the verdicts agree.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from core.settings import apply_process_defaults

apply_process_defaults()  # one BLAS/OpenMP thread per process and quiet Prefect, unless the environment says otherwise

import numpy as np
import torch
from pymatgen.core import Lattice, Structure

from core.device import device_label, resolve_device
from core.metrics import validity_problems
from core.settings import get_settings
from core.structures import validity_problem


def structures(n: int) -> list[Structure]:
    """Half real binaries (repeated), half random cells of 1-12 atoms."""
    with gzip.open(Path(get_settings().shared_data) / "mp-binary-elasticity-2025.1-train.json.gz") as fh:
        real = [Structure.from_dict(r["structure"]) for r in json.load(fh)[:500] if len(r["structure"]["sites"]) <= 20]
    rng = np.random.default_rng(0)
    out = [real[i % len(real)] for i in range(n // 2)]
    while len(out) < n:
        k = int(rng.integers(1, 13))
        cell = rng.normal(size=(3, 3)) * rng.uniform(1, 4) + np.eye(3) * rng.uniform(2, 6)
        out.append(Structure(Lattice(cell), ["Cu"] * k, rng.uniform(size=(k, 3))))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = resolve_device(args.device)
    items = structures(args.n)
    validity_problems(items[:100], device=str(device))  # warm-up
    t0 = time.perf_counter()
    batched = validity_problems(items, device=str(device))
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    loop = [validity_problem(s) for s in items]
    t_loop = time.perf_counter() - t0
    valid = sum(p is None for p in batched)
    print(f"{len(items)} structures ({valid} valid), 1 torch thread, batched on {device_label(device)}")
    print(f"  batched (core.metrics.validity_problems): {len(items) / t_batched:9.0f} structures/s")
    print(f"  one at a time (validity_problem, host):     {len(items) / t_loop:9.0f} structures/s")
    print(f"  speedup {t_loop / t_batched:.1f}x; verdicts identical: {batched == loop}")


if __name__ == "__main__":
    main()
