"""Stage I throughput: candidates per second through CGCNN prediction and deduplication.

Builds 10,000 generated-like structures from the metallic reference structures (the generator
learns from them, so its output looks like them): each is a random reference cell, with one
element substituted by another metal in half of them, strained by up to 3 % and rattled by
0.05 Å; 10 % are near-copies of a reference structure and 5 % near-copies of another candidate,
so both duplicate paths do real work. Then times, as screen_gnn runs them, graph building +
ensemble prediction (the default 4-member architecture; untrained weights cost the same) and
``core.dedup.find_duplicates`` against the reference structures of the same formulas.

Measured on the shared 2-core machine, one torch thread beats two by 3-4x in prediction (two
threads oversubscribe cores that other processes also use), hence the default.
Run: .venv/bin/python benchmarks/stage1.py [--n 10000] [--threads 1]
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
from pymatgen.core import Structure

from core.cgcnn import PRESETS, Ensemble
from core.dedup import find_duplicates
from core.graphs import GraphCache
from core.structures import excluded_reason, structure_id, to_row

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def reference_structures(max_sites: int = 20) -> list[Structure]:
    """Metallic structures of the MP binary set with at most ``max_sites`` sites."""
    records = json.loads(gzip.decompress((SHARED / "mp-binary-elasticity-2025.1-train.json.gz").read_bytes()))
    out = []
    for rec in records:
        s = Structure.from_dict(rec["structure"])
        if len(s) <= max_sites and excluded_reason([e.symbol for e in s.composition.elements]) is None:
            out.append(s)
    return out


def generated_like(refs: list[Structure], n: int, seed: int = 0) -> list[Structure]:
    """n perturbed, partly substituted copies of reference structures (see the module docstring)."""
    rng = np.random.default_rng(seed)
    metals = sorted({e.symbol for s in refs for e in s.composition.elements})
    out: list[Structure] = []
    for i in range(n):
        roll = rng.random()
        if roll < 0.05 and out:
            base, strain, rattle, substitute = out[rng.integers(len(out))], 0.005, 0.01, False
        elif roll < 0.15:
            base, strain, rattle, substitute = refs[rng.integers(len(refs))], 0.005, 0.01, False
        else:
            base, strain, rattle, substitute = refs[rng.integers(len(refs))], 0.03, 0.05, rng.random() < 0.5
        s = base.copy()
        if substitute:
            old = s.composition.elements[rng.integers(len(s.composition.elements))].symbol
            present = {e.symbol for e in s.composition.elements}
            s.replace_species({old: str(rng.choice([m for m in metals if m not in present]))})
        s.apply_strain(rng.uniform(-strain, strain, 3))
        s.perturb(rattle, min_distance=0.0)
        out.append(s)
        if (i + 1) % 2000 == 0:
            print(f"  built {i + 1} structures", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    refs = reference_structures()
    print(f"{len(refs)} metallic reference structures; building {args.n} generated-like candidates")
    batch = generated_like(refs, args.n)
    rows = [to_row(s) for s in batch]  # generate writes these rows; not timed
    known = [(structure_id(s), s) for s in refs]

    config = PRESETS.resolve("default", {"device": "cpu"})
    ensemble = Ensemble.untrained(config)
    t0 = time.perf_counter()
    cache = GraphCache(config.graph)
    graphs = cache.graphs(rows)
    t1 = time.perf_counter()
    pred = ensemble.predict_graphs(graphs)
    t2 = time.perf_counter()
    batch_formulas = {r["reduced_formula"] for r in rows}
    known_same_formula = [(sid, s) for sid, s in known if s.composition.reduced_formula in batch_formulas]
    dups = find_duplicates([(r["structure_id"], s) for r, s in zip(rows, batch, strict=True)], known_same_formula)
    t3 = time.perf_counter()

    n = len(rows)
    n_known = sum(d.known for d in dups.values())
    print(f"\n{n} candidates, {args.threads} torch thread(s), default CGCNN ({config.n_models} members)")
    print(f"graphs:      {t1 - t0:7.1f} s  {n / (t1 - t0):8.0f} candidates/s")
    print(f"prediction:  {t2 - t1:7.1f} s  {n / (t2 - t1):8.0f} candidates/s  (mean K {pred.k_vrh.mean():.0f} GPa)")
    print(
        f"dedup:       {t3 - t2:7.1f} s  {n / (t3 - t2):8.0f} candidates/s  "
        f"({n_known} duplicates of known, {len(dups) - n_known} within the batch; "
        f"{len(known_same_formula)} known structures share a formula with the batch)"
    )
    print(f"stage I:     {t3 - t0:7.1f} s  {n / (t3 - t0):8.0f} candidates/s")


if __name__ == "__main__":
    main()
