"""Stage II against its peer: matloop's batched FAM elastic path and matcalc's ``ElasticityCalc``, side by side.

Usage: ``python benchmarks/peer_elastic.py [--n 24] [--model sevennet-0] [--fmax 0.05] [--device auto]``
(matcalc is the ``bench`` extra: ``pip install -e '.[bench]'``).

Both run in this one process, on the same structures, with the same calculator object, one torch
thread on the CPU: ``--n`` held-out (test split) metallic Materials Project binaries of at most
``--max-sites`` sites from ``../shared/data``. matloop does all of stage II (batched relaxation
to ``--fmax``, structure-match gate, the full elastic tensor with relaxed ions, Born check);
matcalc runs ``ElasticityCalc(relax_structure=True, fmax=--fmax)`` at its defaults otherwise
(24 strained cells, clamped ions). A third row runs matloop with clamped ions, to tell the
protocol's effect on the MAE from the model's. Printed: seconds per structure and structures per
minute for each, the speed ratio of stage II to matcalc, and each one's K_vrh MAE against the DFT
values, over the structures all gave a K for and over each one's own. On a GPU, the same script
prints the GPU figures.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from core.settings import apply_process_defaults

apply_process_defaults()  # one BLAS/OpenMP thread per process and quiet Prefect, unless the environment says otherwise

import numpy as np
import torch
from pymatgen.core import Structure

from core.device import device_label, resolve_device
from core.fam import FamSettings, fam_calculator, fam_outcomes
from core.settings import get_settings, set_torch_threads
from core.structures import excluded_reason, split_of, structure_id, to_atoms


def held_out_binaries(data: Path, n: int, max_sites: int) -> list[tuple[str, Structure, float]]:
    """(mp id, structure, DFT K_vrh) of ``n`` test-split metallic binaries, in a fixed order (hash of the id)."""
    with gzip.open(data / "mp-binary-elasticity-2025.1-train.json.gz") as fh:
        records = json.load(fh)
    keep = []
    for rec in records:
        s = Structure.from_dict(rec["structure"])
        k = rec["bulk_modulus_vrh"]
        if len(s) > max_sites or k is None or not 0 < k <= 500:
            continue
        if excluded_reason([el.symbol for el in s.composition.elements]) or split_of(structure_id(s)) != "test":
            continue
        keep.append((hashlib.sha256(rec["mp_id"].encode()).hexdigest(), rec["mp_id"], s, float(k)))
    keep.sort()
    return [(mid, s, k) for _, mid, s, k in keep[:n]]


def run_matloop(
    refs: list[tuple[str, Structure, float]], calc: Any, name: str, fmax: float, relax_ions: bool = True
) -> list[float | None]:
    settings = FamSettings(fmax=fmax)
    if not relax_ions:
        settings = settings.model_copy(update={"elastic": settings.elastic.model_copy(update={"relax_ions": False})})
    outcomes = fam_outcomes([to_atoms(s) for _, s, _ in refs], calc, name, settings)
    return [o.elastic.k_vrh if o.elastic and o.matches_input else None for o in outcomes]


def run_matcalc(refs: list[tuple[str, Structure, float]], calc: Any, fmax: float) -> list[float | None]:
    from matcalc import ElasticityCalc

    out: list[float | None] = []
    for _, s, _ in refs:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = ElasticityCalc(calc, relax_structure=True, fmax=fmax, units_GPa=True).calc(s)
            out.append(float(result["bulk_modulus_vrh"]))
        except Exception as exc:  # a peer failure is a missing K, as it is for matloop
            print(f"  matcalc failed on {s.composition.reduced_formula}: {type(exc).__name__}: {exc}")
            out.append(None)
    return out


def mae(pred: list[float | None], true: list[float], mask: list[bool]) -> float:
    errors = [abs(p - t) for p, t, m in zip(pred, true, mask, strict=True) if m and p is not None]
    return float(np.mean(errors)) if errors else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=24, help="held-out structures")
    parser.add_argument("--max-sites", type=int, default=8)
    parser.add_argument("--model", default="sevennet-0", help="FAM for both (sevennet-0, mace-mp-0 or a file)")
    parser.add_argument("--fmax", type=float, default=0.05, help="relaxation threshold for both, eV/Å")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:n]")
    parser.add_argument("--skip-peer", action="store_true", help="time matloop only (no matcalc here)")
    parser.add_argument("--per-structure", action="store_true", help="print each structure's K from each method")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    set_torch_threads()
    device = resolve_device(args.device)
    refs = held_out_binaries(Path(get_settings().shared_data), args.n, args.max_sites)
    calc, name = fam_calculator(args.model, device=str(device))
    print(
        f"{len(refs)} held-out metallic binaries (<= {args.max_sites} sites, {sum(len(s) for _, s, _ in refs)} atoms), "
        f"{name} on {device_label(device)}, {torch.get_num_threads()} torch thread(s), fmax {args.fmax} eV/Å"
    )
    run_matloop(refs[:2], calc, name, args.fmax)  # warm-up: model load, first-call costs, caches
    methods = {
        "matloop stage II": lambda: run_matloop(refs, calc, name, args.fmax),
        "matloop, clamped ions": lambda: run_matloop(refs, calc, name, args.fmax, relax_ions=False),
    }
    if not args.skip_peer:
        run_matcalc(refs[:1], calc, args.fmax)
        methods["matcalc ElasticityCalc"] = lambda: run_matcalc(refs, calc, args.fmax)
    true = [k for _, _, k in refs]
    k_of: dict[str, list[float | None]] = {}
    seconds: dict[str, float] = {}
    for label, run in methods.items():
        t0 = time.perf_counter()
        k_of[label] = run()
        seconds[label] = time.perf_counter() - t0
    both = [all(k_of[m][i] is not None for m in k_of) for i in range(len(refs))]
    if args.per_structure:
        print(f"{'structure':22s} {'sites':>5s} {'DFT K':>7s} " + " ".join(f"{m.split()[0]:>9s}" for m in k_of))
        for i, (mid, s, k) in enumerate(refs):
            ks = " ".join("        -" if k_of[m][i] is None else f"{k_of[m][i]:9.1f}" for m in k_of)
            print(f"{mid + ' ' + s.composition.reduced_formula:22s} {len(s):5d} {k:7.1f} {ks}")
    figures: dict[str, Any] = {"n": len(refs), "model": name, "device": device_label(device), "fmax": args.fmax}
    print(f"{'method':24s} {'s/structure':>11s} {'per min':>8s} {'with K':>7s} {'MAE own':>8s} {'MAE common':>10s}")
    for label in methods:
        per = seconds[label] / len(refs)
        own = [k is not None for k in k_of[label]]
        row = {
            "s_per_structure": per,
            "per_min": 60 / per,
            "with_k": sum(own),
            "mae_own": mae(k_of[label], true, own),
            "mae_common": mae(k_of[label], true, both),
        }
        figures[label] = row
        print(
            f"{label:24s} {per:11.2f} {row['per_min']:8.1f} {row['with_k']:7d} "
            f"{row['mae_own']:7.1f}  {row['mae_common']:9.1f}   (K_vrh MAE vs DFT, GPa; common: {sum(both)} structures)"
        )
    if "matcalc ElasticityCalc" in methods:
        ratio = seconds["matcalc ElasticityCalc"] / seconds["matloop stage II"]
        figures["speedup"] = ratio
        print(f"matloop is {ratio:.2f}x as fast as matcalc per structure (goal: >= 3x at an equal or lower MAE)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
