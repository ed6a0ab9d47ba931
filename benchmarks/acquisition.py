"""Acquisition policies side by side under one label budget: which survivors teach the loop most?

A replay of the loop's label decision on the shared Materials Project data, so that every label is a real DFT K
and three iterations of three policies over several seeds fit a 2-core CPU (no generator, no FAM: the pool of
candidates is the data's own structures). Per policy and seed, iteration i:

1. train the CGCNN ensemble (``small`` config, 3 members for a spread) on the seed set plus every structure
   labeled so far, warm-started from iteration i-1's ensemble, loop labels drawn 10 times as often (the loop's
   defaults); the val split stops training early;
2. predict the pool; the *survivors* are those predicted within the stage-I window (30 %) of the target;
3. the policy (``core.acquisition.choose``, the label flow's own code) labels ``--budget`` of them: their DFT K
   from the data; a label within 20 % of the target is a *confirmed* structure.

Seed set: the train split of both shared files, metallic, at most ``--max-sites`` sites, with all but
``--keep-high`` of its structures above ``--high`` GPa moved to the pool (the sparse end the loop is for). Pool: those
plus the test split. The stand-in for the FAM's K is the ensemble's K, with ``fam_relative_error`` set to the
predictor's own error (``--predictor-error``) for expected_improvement's window probability.

Prints per policy the confirmed structures per iteration and over all iterations, mean and standard deviation
over seeds (same seeds for every policy: iteration 0's ensemble is the same for all).

    .venv/bin/python benchmarks/acquisition.py [--seeds 3] [--iterations 3] [--budget 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from core.settings import apply_process_defaults

apply_process_defaults()  # one BLAS/OpenMP thread per process and quiet Prefect, unless the environment says otherwise

import numpy as np
from generator import SHARED, reference_data

from core.acquisition import AcquisitionSettings, choose
from core.cgcnn import PRESETS, Ensemble, train_ensemble
from core.graphs import GraphCache
from core.settings import set_torch_threads
from core.structures import to_row
from storage.queries import DEFAULT_NEW_LABEL_WEIGHT

POLICIES = ("closest", "uncertain", "expected_improvement")
STAGE_I_WINDOW = 0.30
CONFIRM_WINDOW = 0.20


def split_data(max_sites: int, high: float, keep_high: int) -> dict[str, list[tuple[dict, float]]]:
    """Rows and K of the seed set, the validation set and the pool."""
    data = reference_data(SHARED, max_sites)
    rows = {s: [(to_row(st), k) for st, k in zip(*data[s], strict=True)] for s in data}
    high_rows = sorted((r for r in rows["train"] if r[1] > high), key=lambda r: r[0]["structure_id"])
    seed = [r for r in rows["train"] if r[1] <= high] + high_rows[:keep_high]
    return {"seed": seed, "val": rows["val"], "pool": high_rows[keep_high:] + rows["test"]}


def run_policy(
    policy: str, seed_k: int, sets: dict[str, list[tuple[dict, float]]], cache: GraphCache, args: argparse.Namespace
) -> dict[str, Any]:
    """Three (``--iterations``) rounds of train -> predict pool -> choose -> label for one policy and seed."""
    config = PRESETS.resolve("small", {"n_models": 3, "seed": 1000 * seed_k, "max_epochs": args.epochs})
    settings = AcquisitionSettings(policy=policy, window=CONFIRM_WINDOW, fam_relative_error=args.predictor_error)
    val = (cache.graphs([r for r, _ in sets["val"]]), np.log10([k for _, k in sets["val"]]))
    labeled: list[tuple[dict, float]] = []
    pool = list(sets["pool"])
    parent: Ensemble | None = None
    out: dict[str, Any] = {"policy": policy, "seed": seed_k, "iterations": []}
    for iteration in range(args.iterations):
        t0 = time.perf_counter()
        train_rows = sets["seed"] + labeled
        weights = np.array([1.0] * len(sets["seed"]) + [DEFAULT_NEW_LABEL_WEIGHT] * len(labeled))
        train = (cache.graphs([r for r, _ in train_rows]), np.log10([k for _, k in train_rows]))
        parent = train_ensemble(train, val, config, parent=parent, weights=weights)
        pred = parent.predict_graphs(cache.graphs([r for r, _ in pool]))
        survivors = {
            row["structure_id"]: [
                {"target": args.target, "fam_k": float(k), "gnn_k": float(k), "gnn_k_std": float(std), "dft": dft}
            ]
            for (row, dft), k, std in zip(pool, pred.k_vrh, pred.k_vrh_std, strict=True)
            if abs(k - args.target) <= STAGE_I_WINDOW * args.target
        }
        picked = {c.structure_id for c in choose(survivors, settings, limit=args.budget) if c.chosen}
        confirmed = sum(abs(survivors[sid][0]["dft"] - args.target) <= CONFIRM_WINDOW * args.target for sid in picked)
        labeled += [(row, dft) for row, dft in pool if row["structure_id"] in picked]
        pool = [(row, dft) for row, dft in pool if row["structure_id"] not in picked]
        in_pool = sum(abs(d - args.target) <= CONFIRM_WINDOW * args.target for _, d in pool)
        out["iterations"].append(
            {"survivors": len(survivors), "labeled": len(picked), "confirmed": confirmed, "left_in_window": in_pool}
        )
        print(
            f"  {policy:21s} seed {seed_k} iteration {iteration}: {len(survivors):3d} survivors, "
            f"{len(picked)} labeled, {confirmed} confirmed ({in_pool} in-window structures left in the pool; "
            f"{time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    out["confirmed"] = sum(i["confirmed"] for i in out["iterations"])
    return out


def _mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--budget", type=int, default=5, help="labels per iteration (fewer than the survivors)")
    parser.add_argument("--target", type=float, default=350.0)
    parser.add_argument("--high", type=float, default=250.0, help="seed structures above this K go to the pool")
    parser.add_argument("--keep-high", type=int, default=10, help="... all but this many")
    parser.add_argument("--max-sites", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--predictor-error", type=float, default=0.15, help="relative K error of the ensemble")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    set_torch_threads()
    t0 = time.perf_counter()
    sets = split_data(args.max_sites, args.high, args.keep_high)
    cache = GraphCache(PRESETS["small"].graph)
    n_in = sum(abs(k - args.target) <= CONFIRM_WINDOW * args.target for _, k in sets["pool"])
    print(
        f"seed set {len(sets['seed'])} ({sum(k > args.high for _, k in sets['seed'])} above {args.high:g} GPa), "
        f"val {len(sets['val'])}, pool {len(sets['pool'])} ({n_in} within 20 % of {args.target:g} GPa); "
        f"budget {args.budget} labels per iteration, {args.iterations} iterations, {args.seeds} seeds",
        flush=True,
    )
    runs = [run_policy(p, s, sets, cache, args) for s in range(args.seeds) for p in args.policies]
    print(f"\nconfirmed structures within 20 % of {args.target:g} GPa (DFT K of the data), mean ± std over seeds:")
    print(f"{'policy':22s} " + " ".join(f"{'it ' + str(i):>13s}" for i in range(args.iterations)) + f" {'total':>13s}")
    for policy in args.policies:
        mine = [r for r in runs if r["policy"] == policy]
        per_it = [_mean_std([r["iterations"][i]["confirmed"] for r in mine]) for i in range(args.iterations)]
        print(
            f"{policy:22s} "
            + " ".join(f"{v:>13s}" for v in per_it)
            + f" {_mean_std([r['confirmed'] for r in mine]):>13s}"
        )
    print(f"\nwall time {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
