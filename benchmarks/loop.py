"""Does the loop learn? N active-learning iterations on a fresh lake, with the feedback arm beside a control arm.

Each arm runs the embedded ``active-learning`` flow (the code path a user runs) on its own fresh lake
seeded with both files of ../shared/data, targets 60-400 GPa with focus 350, warm-started
iterations, and labels from the FAM (``--labels fam``, default) or DFT (``--labels dft``). The
control arm (``--no-feedback``, or both arms with ``--compare``) runs the same iterations and the
same fine-tuning schedule with zero new labels, so a gain from a better generator is not credited
to the loop. Raw samples are graded by a frozen CGCNN ensemble trained once on the seed train split
(``default`` config, saved as ``<out>/cgcnn-grader.pt`` and reused; never the ranker nor the
fine-tuned stage-I predictor).

Every number printed is read back from the lake's ``iterations`` table (one row per iteration and
target), so a run's figures are reproducible from its lake alone: n sampled, n kept, n passing each
stage, MAPE of the generator's head, of the grader on raw samples and kept candidates, of the FAM K
of the candidates stage II screened (a failed or changed structure counts as 100 %), the number of
new structures whose label is within 20 % of target, mean and spread of the labeled K, stage-II
survival and wall time per stage. With ``--seeds N`` each condition runs N independently seeded
loops and the summary gives mean ± std over seeds.

Usage (from the repo root)::

    .venv/bin/python benchmarks/loop.py --labels fam --preset small [--iterations 3] [--seeds 1] [--compare]
        [--json rows.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from core.settings import apply_process_defaults

apply_process_defaults()  # one BLAS/OpenMP thread per process and quiet Prefect, unless the environment says otherwise

import numpy as np
from generator import SHARED, grader_ensemble, reference_data

from core.generator import PRESETS
from flows.active_learning import LoopParams, active_learning
from flows.train import TrainSettings
from storage import Lake
from storage.ingest import ingest

TARGETS = (60.0, 100.0, 200.0, 250.0, 300.0, 350.0, 400.0)
FOCUS = 350.0
SOURCES = ("elastic_tensor_2015.json.gz", "mp-binary-elasticity-2025.1-train.json.gz")
COLUMNS = (
    ("iteration", "it", "{:d}"),
    ("target", "target", "{:.0f}"),
    ("n_generated", "sampled", "{:d}"),
    ("n_kept", "kept", "{:d}"),
    ("n_gnn_pass", "I", "{:d}"),
    ("n_fam_pass", "II", "{:d}"),
    ("n_labeled", "labeled", "{:d}"),
    ("mape_head_raw", "head", "{:.3f}"),
    ("mape_grader_raw", "CGCNN raw", "{:.3f}"),
    ("mape_grader_kept", "CGCNN kept", "{:.3f}"),
    ("mape_fam_kept", "FAM", "{:.3f}"),
    ("n_within_20", "<=20%", "{:d}"),
    ("dft_k_mean", "K mean", "{:.0f}"),
    ("dft_k_std", "K std", "{:.0f}"),
    ("fam_survival", "II/I", "{:.2f}"),
)
JSON_KEYS = {
    "mape_head_raw": "mape_head",
    "mape_grader_raw": "mape_cgcnn",
    "mape_fam_kept": "mape_fam",
    "n_within_20": "n_within_20",
    "dft_k_mean": "k_mean",
    "dft_k_std": "k_std",
}


def _cell(value: Any, fmt: str, width: int) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return f"{'-':>{width}}"
    return f"{fmt.format(value):>{width}}"


def print_rows(rows: list[dict[str, Any]]) -> None:
    widths = [max(len(title), 6) for _, title, _ in COLUMNS]
    print("  ".join(f"{title:>{w}}" for (_, title, _), w in zip(COLUMNS, widths, strict=True)) + "  wall s/stage")
    for r in rows:
        cells = [_cell(r.get(k), fmt, w) for (k, _, fmt), w in zip(COLUMNS, widths, strict=True)]
        print("  ".join(cells) + "  " + json.dumps(json.loads(r["wall_times_json"] or "{}")), flush=True)


def seeded_lake(root: Path) -> Lake:
    lake = Lake(root)
    for name in SOURCES:
        ingest(lake, str(SHARED / name))
    return lake


def run_arm(args: argparse.Namespace, grader: Path, feedback: bool, seed: int) -> list[dict[str, Any]]:
    """One loop on a fresh lake; returns its ``iterations`` rows, read back from the lake."""
    arm = "feedback" if feedback else "control"
    root = args.out / f"loop-{args.labels}-{args.preset}-{arm}-seed{seed}" / "lake"
    lake = seeded_lake(root)
    params = LoopParams(
        lake_url=lake.url,
        targets=args.targets,
        focus_target=FOCUS,
        iterations=args.iterations,
        n_kept=args.kept,
        samples_per_kept=args.ratio,
        label_source=args.labels,
        predictor_config=args.predictor,
        generator_config=args.preset,
        train={"feedback": feedback, "new_label_weight": args.weight, "model_seed": seed},
        generate={"grader": str(grader), "seed": seed},
        screen={"fam_model": args.fam_model},
        label={"limit": args.dft_limit},
    )
    t0 = time.perf_counter()
    active_learning(params)
    print(f"\n{arm} arm, seed {seed}: {args.iterations} iterations in {time.perf_counter() - t0:.0f} s ({root})")
    rows = lake.query("SELECT * FROM iterations ORDER BY iteration, target").to_pylist()
    print_rows(rows)
    return [{**r, "arm": arm, "seed": seed} for r in rows]


def json_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows as ``--json`` writes them: arm, seed, iteration, target and the figures under their short names."""
    return [
        {"arm": r["arm"], "seed": r["seed"], "iteration": r["iteration"], "target": r["target"]}
        | {new: r[old] for old, new in JSON_KEYS.items()}
        for r in rows
    ]


def summarize(rows: list[dict[str, Any]]) -> None:
    """At the focus target: mean ± std over seeds of each figure (``json_rows``), per arm and iteration."""
    print(f"\nat {FOCUS:g} GPa, mean ± std over seeds")
    keys = list(JSON_KEYS.values())
    print(f"{'arm':>9} {'it':>3} " + " ".join(f"{k:>16}" for k in keys))
    for arm in ("feedback", "control"):
        for it in sorted({r["iteration"] for r in rows}):
            sel = [r for r in rows if r["arm"] == arm and r["iteration"] == it and r["target"] == FOCUS]
            if not sel:
                continue
            cells = []
            for k in keys:
                values = np.array([np.nan if r[k] is None else float(r[k]) for r in sel])
                text = f"{np.nanmean(values):.3f}" if np.isfinite(values).any() else "-"
                if len(values) > 1 and np.isfinite(values).sum() > 1:
                    text += f"±{np.nanstd(values):.3f}"
                cells.append(f"{text:>16}")
            print(f"{arm:>9} {it:>3} " + " ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels", choices=("fam", "dft"), default="fam")
    parser.add_argument("--targets", type=float, nargs="+", default=list(TARGETS), help="must include 350")
    parser.add_argument("--preset", default="small", help="generator preset")
    parser.add_argument("--predictor", default="small", help="stage-I CGCNN config of the loop")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=1, help="independent loops per arm")
    parser.add_argument("--no-feedback", action="store_true", help="run the control arm only")
    parser.add_argument("--compare", action="store_true", help="run the feedback and the control arm")
    parser.add_argument("--parallel", action="store_true", help="with --compare: the two arms in two processes")
    parser.add_argument("--kept", type=int, default=10, help="candidates kept per target and iteration")
    parser.add_argument("--ratio", type=int, default=50, help="samples per kept candidate (the reference: 500)")
    parser.add_argument("--weight", type=float, default=None, help="new-label weight (default: the loop's)")
    parser.add_argument("--dft-limit", type=int, default=0, help="label at most this many per iteration (0: all)")
    parser.add_argument("--fam-model", default="sevennet-0")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--json", type=Path, help="write the rows as a JSON list here")
    args = parser.parse_args()
    if args.weight is None:
        args.weight = TrainSettings.model_fields["new_label_weight"].default
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    PRESETS[args.preset]  # an unknown preset fails before anything runs

    data = reference_data(SHARED, PRESETS[args.preset].max_atoms)
    grader_ensemble(None, args.out, data)  # trains and saves the frozen grader once
    grader = args.out / "cgcnn-grader.pt"
    arms = [True, False] if args.compare else [not args.no_feedback]
    started = time.perf_counter()
    if args.compare and args.parallel:
        rows = run_arms_in_parallel(args)
    else:
        rows = []
        for feedback in arms:
            for seed in range(args.seeds):
                rows += json_rows(run_arm(args, grader, feedback, seed))
                write_json(args.json, rows)  # after every loop, so a stopped run keeps the seeds it finished
    summarize(rows)
    print(f"\ntotal {time.perf_counter() - started:.0f} s for {len(arms)} arm(s) x {args.seeds} seed(s)")
    if args.json:
        write_json(args.json, rows)
        print(f"wrote {args.json}")


def write_json(path: Path | None, rows: list[dict[str, Any]]) -> None:
    """``--json``: the rows so far, replaced atomically (a reader never sees half a file)."""
    if path is None:
        return
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(json.dumps(rows, indent=1, default=float))
    partial.replace(path)


def run_arms_in_parallel(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``--compare --parallel``: each arm in its own process (one core each), their rows merged."""
    children = []
    for flag in ([], ["--no-feedback"]):
        out = args.out / f"rows-{'control' if flag else 'feedback'}.json"
        argv = [a for a in sys.argv[1:] if a not in ("--compare", "--parallel")]
        if "--json" in argv:
            i = argv.index("--json")
            del argv[i : i + 2]
        env = {**os.environ, "PREFECT_HOME": str(args.out / f"prefect-{out.stem}")}  # one server database each
        cmd = [sys.executable, __file__, *argv, *flag, "--json", str(out)]
        children.append((subprocess.Popen(cmd, env=env), out))
    for child, _ in children:
        if child.wait() != 0:
            raise RuntimeError(f"an arm failed (exit {child.returncode})")
    return [r for _, out in children for r in json.loads(out.read_text())]


if __name__ == "__main__":
    main()
