"""Deployed and in-process training side by side: the same ``train`` flow, small models, the committed seed set.

In process: ``flows.train.train`` called here (the embedded path). Deployed: the ``train/gpu`` deployment run through
a real Prefect server and a process worker of the ``gpu`` pool (``deployments.stack.Stack``, what ``matloop serve``
starts), as a user types ``prefect deployment run train/gpu --watch``. Each lake's ``jobs`` rows of stage ``train``
give each model's training time; the figure is their ratio (issue 15's goal: within 20 %; it was 612 s vs 11 s when
the deployment pinned 4 threads on 2 cores). The deployed command's own wall time is printed too: it adds the
worker's pick-up and the flow-run process's start-up.

    .venv/bin/python benchmarks/deployed.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from core.settings import apply_process_defaults

apply_process_defaults()  # one BLAS/OpenMP thread per process and quiet Prefect, unless the environment says otherwise

from deployments.stack import Stack, free_port
from storage import Lake
from storage.ingest import ingest

PARAMS = {"what": ["predictor", "generator"], "predictor_config": "small", "generator_config": "small", "model_seed": 0}


def training_seconds(lake: Lake) -> dict[str, float]:
    """Wall seconds of each model trained in the lake (``jobs``, stage ``train``), by model kind."""
    rows = lake.query("SELECT calculation, sum(wall_time_s) s FROM jobs WHERE stage = 'train' GROUP BY 1").to_pylist()
    return {r["calculation"]: float(r["s"]) for r in rows}


def main() -> None:
    from prefect.testing.utilities import prefect_test_harness

    from flows.train import TrainParams, train

    with tempfile.TemporaryDirectory(prefix="matloop-deployed-") as tmp:
        root = Path(tmp)
        embedded, deployed = Lake(root / "embedded"), Lake(root / "deployed")
        for lake in (embedded, deployed):
            ingest(lake, "seed")
        with prefect_test_harness(server_startup_timeout=180):
            t0 = time.perf_counter()
            train(TrainParams(lake_url=embedded.url, **PARAMS))
            embedded_wall = time.perf_counter() - t0
        with Stack(deployed.url, port=free_port(), home=root / "prefect", progress=print) as stack:
            argv = [stack.prefect, "deployment", "run", "train/gpu", "--params"]
            argv += [json.dumps({"params": {"lake_url": deployed.url, **PARAMS}}), "--watch", "--watch-timeout", "1800"]
            t0 = time.perf_counter()
            run = subprocess.run(argv, env=stack.env, capture_output=True, text=True, timeout=1900)
            deployed_wall = time.perf_counter() - t0
        if run.returncode != 0:
            raise SystemExit(f"the deployed run failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
        a, b = training_seconds(embedded), training_seconds(deployed)
        print(f"{'model':<12}{'in process s':>14}{'deployed s':>12}{'ratio':>8}")
        for kind in sorted(a):
            there = b.get(kind, float("nan"))
            print(f"{kind:<12}{a[kind]:14.1f}{there:12.1f}{there / a[kind]:8.2f}")
        total_a, total_b = sum(a.values()), sum(b.values())
        print(f"{'both':<12}{total_a:14.1f}{total_b:12.1f}{total_b / total_a:8.2f}  (goal: within 20 %)")
        print(f"wall: in-process flow {embedded_wall:.1f} s; `prefect deployment run --watch` {deployed_wall:.1f} s")


if __name__ == "__main__":
    main()
