"""Does a generator conditioned on K and G carry both into its samples? ``small-kg`` beside ``small``.

Both presets are trained on the metallic, at most 20-site train split of ../shared/data (both files; G from the
records that have one), with the same seed. Two frozen CGCNN graders (``default`` config, one on log10 K and one
on log10 G, trained once on the same split and cached in ``--out``) grade every sample; neither is a ranker.
Per cell (a K target and an asked Pugh ratio G/K, so G = ratio x K) both generators draw ``--n`` raw samples,
``small-kg`` asked for K and G, ``small`` for K alone (it cannot be asked for G: the baseline), and the script
prints on the raw samples and on the ``--kept`` best of them by each generator's head (keep-best on every
property asked for):

- the graded K's MAPE against the K target and the graded G's MAPE against the asked G;
- the median graded G/K and the share of samples whose graded G/K is within 20 % of the asked ratio;
- for ``small-kg``, the head's G MAPE (its own score), validity and the single-element share.

    .venv/bin/python benchmarks/conditions.py [--targets 100 350] [--ratios 0.3 0.6] [--n 150] [--kept 15]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from core.settings import apply_process_defaults

apply_process_defaults()  # one BLAS/OpenMP thread per process and quiet Prefect, unless the environment says otherwise

import numpy as np
import torch
from generator import SHARED, grader_ensemble, reference_moduli

from core.cgcnn import Ensemble
from core.generator import PRESETS, CDVAEGenerator, SampleBatch, keep_best
from core.metrics import mape, validity
from core.structures import to_row

RATIO_WINDOW = 0.2
"""A sample "has the asked ratio" when its graded G/K is within this fraction of it."""


def graded(ensemble: Ensemble, batch: SampleBatch) -> np.ndarray:
    return ensemble.predict_rows([to_row(s) for s in batch.structures]).gpa if len(batch) else np.zeros(0)


def figures(batch: SampleBatch, k: np.ndarray, g: np.ndarray, k_target: float, g_target: float) -> dict[str, float]:
    ratio, asked = g / k, g_target / k_target
    head_g = batch.property_scores.get("g_vrh") if batch.property_scores else None
    return {
        "mape_k": mape(k, k_target),
        "mape_g": mape(g, g_target),
        "ratio_median": float(np.median(ratio)),
        "ratio_within": float(np.mean(np.abs(ratio - asked) <= RATIO_WINDOW * asked)),
        "mape_head_g": mape(head_g, g_target) if head_g is not None else float("nan"),
        "validity": validity(batch.structures),
        "single_element": float(np.mean([len(s.composition.elements) == 1 for s in batch.structures])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[100.0, 350.0], help="K targets, GPa")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.6], help="asked G/K (Pugh) ratios")
    parser.add_argument("--n", type=int, default=150, help="raw samples per cell")
    parser.add_argument("--kept", type=int, default=15, help="kept per cell by the head (the keep-best filter)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    data = reference_moduli(SHARED, PRESETS["small"].max_atoms)
    train_s, train_k, train_g = data["train"]
    print(f"train split: {len(train_s)} structures, {sum(g is not None for g in train_g)} with G", flush=True)
    k_grader = grader_ensemble(None, args.out, {s: (v[0], v[1]) for s, v in data.items()})
    g_grader = grader_ensemble(
        None, args.out, {s: (v[0], v[2]) for s, v in data.items()}, name="cgcnn-g-grader.pt", target="g_vrh"
    )
    generators = {}
    for preset in ("small", "small-kg"):
        start = time.perf_counter()
        generator = CDVAEGenerator(PRESETS.resolve(preset, {"seed": args.seed}), device="cpu")
        generator.train(train_s, train_k, other_labels={"g_vrh": train_g} if preset == "small-kg" else None)
        generators[preset] = generator
        print(f"trained {preset} in {time.perf_counter() - start:.0f} s", flush=True)

    columns = ("mape_k", "mape_g", "ratio_median", "ratio_within", "mape_head_g", "validity", "single_element")
    print(f"\n{'K':>5} {'G/K':>5} {'G':>5}  {'generator':9} {'set':5}" + "".join(f"{c:>15}" for c in columns))
    for k_target in args.targets:
        for ratio in args.ratios:
            g_target = ratio * k_target
            for preset, generator in generators.items():
                asked = {"k_vrh": k_target, "g_vrh": g_target} if preset == "small-kg" else k_target
                raw = generator.sample([asked], args.n, seed=args.seed)
                kept = keep_best(raw, args.kept)
                for name, batch in (("raw", raw), ("kept", kept)):
                    row = figures(batch, graded(k_grader, batch), graded(g_grader, batch), k_target, g_target)
                    print(
                        f"{k_target:5.0f} {ratio:5.2f} {g_target:5.0f}  {preset:9} {name:5}"
                        + "".join(f"{row[c]:15.3f}" for c in columns),
                        flush=True,
                    )
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
