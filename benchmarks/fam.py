"""FAM benchmark: K_vrh accuracy against Materials Project DFT, and relax+elastic throughput.

Usage: ``python benchmarks/fam.py [--n 100] [--speed-n 16] [--models sevennet-0,mace-mp-0]``

Accuracy: for each FAM that can be loaded here, relax and compute K_vrh for ``--n`` metallic
structures (<= 4 atoms, 0 < K <= 500 GPa) drawn deterministically from ``../shared/data`` and
compare with the DFT K_VRH: MAE (GPa), MAPE and the fraction within 20 %; and G_VRH where the data has it:
MAE, mean signed error (a soft model's is negative), the G/K error and how often the Pugh verdict
(G/K <= 0.57: ductile) agrees with DFT's, which decides whether a model can grade a design's G/K condition.

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

PUGH = 0.57
"""Pugh's ratio G/K below which an alloy is taken to be ductile (a design condition, core.targets)."""


def reference_set(data: Path, n: int, max_sites: int = 4) -> list[tuple[str, Structure, float, float | None]]:
    """(id, structure, DFT K_VRH, DFT G_VRH) for ``n`` metallic structures, chosen by a hash of the id (stable
    across runs)."""
    items: dict[str, tuple[str, Structure, float, float | None]] = {}
    with gzip.open(data / "elastic_tensor_2015.json.gz") as fh:
        table = json.load(fh)
    for row in table["data"]:
        rec = dict(zip(table["columns"], row, strict=True))
        struct = Structure.from_dict(rec["structure"])
        items[rec["material_id"]] = (rec["material_id"], struct, rec["K_VRH"], rec["G_VRH"])
    with gzip.open(data / "mp-binary-elasticity-2025.1-train.json.gz") as fh:
        for rec in json.load(fh):
            struct = Structure.from_dict(rec["structure"])
            entry = (rec["mp_id"], struct, rec["bulk_modulus_vrh"], rec.get("shear_modulus_vrh"))
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


def accuracy(model: str, refs: list[tuple[str, Structure, float, float | None]], settings: FamSettings) -> None:
    try:
        calc, name = fam_calculator(model)
    except FamUnavailableError as exc:
        print(f"{model}: not available here ({exc})")
        return
    t0 = time.perf_counter()
    outcomes = fam_outcomes([to_atoms(s) for _, s, _, _ in refs], calc, name, settings)
    pred, true, shear, failed = [], [], [], 0
    for o, (_, _, k_dft, g_dft) in zip(outcomes, refs, strict=True):
        if o.elastic is None or o.elastic.k_vrh is None:
            failed += 1
            continue
        pred.append(o.elastic.k_vrh)
        true.append(k_dft)
        if g_dft and o.elastic.g_vrh is not None:
            shear.append((o.elastic.g_vrh, g_dft, o.elastic.k_vrh, k_dft))
    minutes = (time.perf_counter() - t0) / 60
    p, t = np.array(pred), np.array(true)
    err = np.abs(p - t)
    print(f"{name}: {len(p)}/{len(refs)} structures with K (no tensor for {failed}: unconverged, changed or failed)")
    print(
        f"  K_vrh vs DFT: MAE {err.mean():.1f} GPa, MAPE {np.mean(err / t):.1%}, "
        f"within 20 % {np.mean(err / t <= 0.2):.1%}, median abs error {np.median(err):.1f} GPa"
    )
    if shear:
        g, g_t, k, k_t = (np.array(v) for v in zip(*shear, strict=True))
        ratio, ratio_t = g / k, g_t / k_t
        print(
            f"  G_vrh vs DFT ({len(g)} with a DFT G): MAE {np.abs(g - g_t).mean():.1f} GPa, mean signed error "
            f"{(g - g_t).mean():+.1f} GPa, MAPE {np.mean(np.abs(g - g_t) / g_t):.1%}; G/K MAE "
            f"{np.abs(ratio - ratio_t).mean():.3f}; Pugh verdict (G/K <= {PUGH:g}) as DFT's for "
            f"{np.mean((ratio <= PUGH) == (ratio_t <= PUGH)):.0%} ({np.mean(ratio_t <= PUGH):.0%} ductile by DFT)"
        )
    print(f"  {len(refs) / minutes:.1f} structures/min (stage II batched, 1 thread)")


def speed(n: int) -> None:
    calc, name = fam_calculator("sevennet-0")
    cells = [to_atoms(s) for _, s, _, _ in reference_set(Path(get_settings().shared_data), 400, max_sites=2)][:n]
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
    parser.add_argument("--speed-n", type=int, default=16, help="two-atom structures for the speed figure (0: none)")
    parser.add_argument("--models", default="sevennet-0,mace-mp-0", help="comma-separated FAMs to try")
    args = parser.parse_args()
    set_torch_threads()
    refs = reference_set(Path(get_settings().shared_data), args.n)
    print(f"accuracy on {len(refs)} metallic structures (<= 4 atoms) from {get_settings().shared_data}")
    for model in args.models.split(","):
        accuracy(model.strip(), refs, FamSettings())
    if args.speed_n:
        print("speed (relax + elastic):")
        speed(args.speed_n)


if __name__ == "__main__":
    main()
