"""FAM benchmark: K_vrh accuracy against Materials Project DFT, and relax+elastic throughput.

Usage: ``python benchmarks/fam.py [--n 100] [--speed-n 16] [--models sevennet-0,mace-mp-0]``

Accuracy: for each FAM that can be loaded here, relax and compute K_vrh for ``--n`` metallic
structures (<= 4 atoms, 0 < K <= 500 GPa) drawn deterministically from ``../shared/data`` and
compare with the DFT K_VRH: MAE (GPa), MAPE and the fraction within 20 %.

Speed: structures per minute for stage II (relax + elastic) on two-atom cells, in one process with
one torch thread: (a) one at a time with ASE and the full 24-strain set, (b) one at a time with
the symmetry-reduced set, (c) everything batched (torch-sim). benchmarks/peer_elastic.py compares with matcalc.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from core.settings import apply_process_defaults

apply_process_defaults()  # one BLAS/OpenMP thread per process and quiet Prefect, unless the environment says otherwise

import numpy as np
from pymatgen.core import Structure

from core.elastic import ElasticSettings
from core.fam import (
    FamSettings,
    FamUnavailableError,
    fam_calculator,
    fam_outcomes,
)
from core.settings import get_settings, set_torch_threads
from core.structures import excluded_reason, to_atoms


def reference_set(data: Path, n: int, max_sites: int = 4) -> list[tuple[str, Structure, float]]:
    """(id, structure, DFT K_VRH) for ``n`` metallic structures, chosen by a hash of the id (stable across runs)."""
    items: dict[str, tuple[str, Structure, float]] = {}
    with gzip.open(data / "elastic_tensor_2015.json.gz") as fh:
        table = json.load(fh)
    for row in table["data"]:
        rec = dict(zip(table["columns"], row, strict=True))
        items[rec["material_id"]] = (rec["material_id"], Structure.from_dict(rec["structure"]), rec["K_VRH"])
    with gzip.open(data / "mp-binary-elasticity-2025.1-train.json.gz") as fh:
        for rec in json.load(fh):
            entry = (rec["mp_id"], Structure.from_dict(rec["structure"]), rec["bulk_modulus_vrh"])
            items.setdefault(rec["mp_id"], entry)
    keep = [
        it
        for it in items.values()
        if len(it[1]) <= max_sites
        and it[2] is not None
        and 0 < it[2] <= 500
        and excluded_reason([el.symbol for el in it[1].composition.elements]) is None
    ]
    keep.sort(key=lambda it: hashlib.sha256(it[0].encode()).hexdigest())
    return keep[:n]


def accuracy(model: str, refs: list[tuple[str, Structure, float]], settings: FamSettings) -> None:
    try:
        calc, name = fam_calculator(model)
    except FamUnavailableError as exc:
        print(f"{model}: not available here ({exc})")
        return
    t0 = time.perf_counter()
    outcomes = fam_outcomes([to_atoms(s) for _, s, _ in refs], calc, name, settings)
    pred, true, failed = [], [], 0
    for o, (_, _, k_dft) in zip(outcomes, refs, strict=True):
        if o.elastic is None or o.elastic.k_vrh is None:
            failed += 1
            continue
        pred.append(o.elastic.k_vrh)
        true.append(k_dft)
    minutes = (time.perf_counter() - t0) / 60
    p, t = np.array(pred), np.array(true)
    err = np.abs(p - t)
    print(f"{name}: {len(p)}/{len(refs)} structures with K (no tensor for {failed}: unconverged, changed or failed)")
    print(
        f"  K_vrh vs DFT: MAE {err.mean():.1f} GPa, MAPE {np.mean(err / t):.1%}, "
        f"within 20 % {np.mean(err / t <= 0.2):.1%}, median abs error {np.median(err):.1f} GPa"
    )
    print(f"  {len(refs) / minutes:.1f} structures/min (stage II batched, 1 thread)")


def speed(n: int) -> None:
    calc, name = fam_calculator("sevennet-0")
    cells = [to_atoms(s) for _, s, _ in reference_set(Path(get_settings().shared_data), 400, max_sites=2)][:n]
    full = ElasticSettings(use_symmetry=False, eos_strains=())
    modes = {
        "one at a time, full strain set": FamSettings(batched=False, elastic=full),
        "one at a time, symmetry-reduced": FamSettings(batched=False),
        "batched, symmetry-reduced": FamSettings(batched=True),
    }
    rates = {}
    for label, settings in modes.items():
        t0 = time.perf_counter()
        fam_outcomes(cells, calc, name, settings)
        rates[label] = len(cells) / ((time.perf_counter() - t0) / 60)
        print(f"  {label:34s} {rates[label]:6.1f} structures/min ({len(cells)} two-atom cells, {name}, 1 thread)")
    base = rates["one at a time, full strain set"]
    print(
        f"  speedup batched+symmetry vs one at a time: {rates['batched, symmetry-reduced'] / base:.1f}x "
        f"(two processes on the 2 cores would double each rate)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="structures for the accuracy figure")
    parser.add_argument("--speed-n", type=int, default=16, help="two-atom structures for the speed figure")
    parser.add_argument("--models", default="sevennet-0,mace-mp-0", help="comma-separated FAMs to try")
    args = parser.parse_args()
    set_torch_threads()
    refs = reference_set(Path(get_settings().shared_data), args.n)
    print(f"accuracy on {len(refs)} metallic structures (<= 4 atoms) from {get_settings().shared_data}")
    for model in args.models.split(","):
        accuracy(model.strip(), refs, FamSettings())
    print("speed (relax + elastic):")
    speed(args.speed_n)


if __name__ == "__main__":
    main()
