"""Benchmark of the conditional generator: validity, uniqueness, novelty, conditioning MAPE, speed, reconstruction.

Usage (from the repo root)::

    .venv/bin/python benchmarks/generator.py [--checkpoint gen.pt] [--cgcnn ensemble.pt] [--n 1000]

Without ``--checkpoint`` it trains the ``small`` config on the metallic, at most 20-site, train-split
structures of ../shared/data (both files, what ``matloop ingest`` would load; ``--train-on mp`` takes
the MP binary file only, 1,401 structures) and saves it beside the output. Novelty is measured
against the train split of both files.
The conditioning table reports, per target, the MAPE of the CGCNN-ensemble prediction of the
valid samples against the target when ``--cgcnn`` is given (the reference work's metric), and
always the generator's own property-head MAPE. Reconstruction is measured on the test split.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from pymatgen.core import Structure

from core.generator import CDVAEGenerator, get_config, load_generator
from core.metrics import generation_metrics, mape, match_rate, sample_problem
from core.structures import excluded_reason, split_of, structure_id, to_row

TARGETS = (60.0, 100.0, 200.0, 250.0, 300.0, 350.0, 400.0)


def reference_data(
    shared: Path, max_sites: int, with_2015: bool = True
) -> dict[str, tuple[list[Structure], list[float]]]:
    """Metallic structures with K > 0 and at most ``max_sites`` sites from the reference files, by split."""
    records: list[tuple[dict, float]] = []
    with gzip.open(shared / "mp-binary-elasticity-2025.1-train.json.gz") as fh:
        records += [(r["structure"], r["bulk_modulus_vrh"]) for r in json.load(fh)]
    if with_2015:
        with gzip.open(shared / "elastic_tensor_2015.json.gz") as fh:
            table = json.load(fh)
        cols = table["columns"]
        records += [(row[cols.index("structure")], row[cols.index("K_VRH")]) for row in table["data"]]
    out: dict[str, tuple[list[Structure], list[float]]] = {s: ([], []) for s in ("train", "val", "test")}
    seen: set[str] = set()
    for d, k in records:
        s = Structure.from_dict(d)
        if not k or k <= 0 or len(s) > max_sites or excluded_reason([e.symbol for e in s.composition.elements]):
            continue
        sid = structure_id(s)
        if sid in seen:
            continue
        seen.add(sid)
        out[split_of(sid)][0].append(s)
        out[split_of(sid)][1].append(float(k))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="generator checkpoint; default: train the small config")
    parser.add_argument("--cgcnn", type=Path, help="CGCNN ensemble checkpoint for the conditioning MAPE")
    parser.add_argument("--n", type=int, default=1000, help="samples for validity/uniqueness/novelty")
    parser.add_argument("--recon", type=int, default=100, help="test structures to reconstruct")
    parser.add_argument(
        "--train-on",
        choices=("all", "mp"),
        default="all",
        help="training data without --checkpoint: both reference files, or the MP binary file only",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default=None)
    parser.add_argument("--shared", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    max_sites = get_config("small").max_atoms
    data = reference_data(args.shared, max_sites)
    print("reference structures by split:", {k: len(v[0]) for k, v in data.items()})
    if args.checkpoint:
        generator = load_generator(args.checkpoint, device=args.device)
    else:
        generator = CDVAEGenerator(get_config("small"), device=args.device)
        t0 = time.perf_counter()
        train = data["train"] if args.train_on == "all" else reference_data(args.shared, max_sites, False)["train"]
        generator.train(*train, progress=True)
        print(f"trained small config in {time.perf_counter() - t0:.0f} s")
        generator.save(args.out / "generator-small.pt")
    print("training metrics:", json.dumps(generator.metrics))

    per_target = math.ceil(args.n / len(TARGETS))
    t0 = time.perf_counter()
    batch = generator.sample(list(TARGETS), per_target, seed=0)
    elapsed = time.perf_counter() - t0
    device = getattr(generator, "device", "cpu")
    print(
        f"\nspeed: {len(batch)} samples in {elapsed:.1f} s = {len(batch) / elapsed:.1f} samples/s "
        f"({device}, {args.threads} threads)"
    )

    quality = generation_metrics(batch.structures, data["train"][0])
    print(
        f"validity {quality.validity:.3f} ({quality.n_valid}/{quality.n}), uniqueness {quality.uniqueness:.3f}, "
        f"novelty {quality.novelty:.3f} (uniqueness and novelty over valid samples)"
    )

    problems = [sample_problem(s) for s in batch.structures]
    kinds = Counter(p.split(" ")[0] if p else "valid" for p in problems)
    print("sample problems:", dict(kinds.most_common()))
    valid = np.array([p is None for p in problems])
    cgcnn_k = None
    if args.cgcnn:
        from core.cgcnn import Ensemble

        rows = [to_row(s) for s, ok in zip(batch.structures, valid, strict=True) if ok]
        cgcnn_k = np.full(len(batch), np.nan)
        cgcnn_k[valid] = Ensemble.load(args.cgcnn).predict_rows(rows).k_vrh
    else:
        print("no --cgcnn checkpoint: the conditioning table shows the generator's own property-head MAPE only")
    print(f"\n{'target':>7} {'valid':>6} {'head K med':>10} {'head MAPE':>9} {'CGCNN K med':>11} {'CGCNN MAPE':>10}")
    for t in TARGETS:
        sel = (batch.targets == t) & valid
        head = batch.scores[sel]
        line = f"{t:7.0f} {sel.sum():6d} {np.median(head):10.1f} {mape(head, t):9.3f}"
        if cgcnn_k is not None:
            line += f" {np.median(cgcnn_k[sel]):11.1f} {mape(cgcnn_k[sel], t):10.3f}"
        print(line)

    test_s = data["test"][0][: args.recon]
    if isinstance(generator, CDVAEGenerator):
        recon = generator.reconstruct(test_s, seed=0)
        print(f"\nreconstruction match rate on {len(test_s)} test structures: {match_rate(test_s, recon):.3f}")


if __name__ == "__main__":
    main()
