"""End to end against a real Prefect server on localhost with real process workers.

The `active-learning/default` deployment is triggered the way a user does from a terminal
(`prefect deployment run ... --watch`); the loop dispatches each stage to the `gpu` and `hpc`
pools with run_deployment. The test then checks every stage's rows and the artifacts.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter

import pytest
from test_label import KILL_ONE_POINT, KILLED_POINT, emt_cells, seed_candidates  # tests/ is on sys.path

from deployments.stack import Stack, free_port
from storage import Lake
from storage.ingest import ingest

pytestmark = [pytest.mark.slow, pytest.mark.server]


def test_loop_deployment_runs_every_stage_on_its_pool(tmp_path):
    lake = Lake(tmp_path / "lake")
    ingest(lake, "seed")
    tiny = {
        "lake_url": lake.url,
        "targets": [300.0],
        "focus_target": 300.0,
        "iterations": 1,
        "n_kept": 4,
        "samples_per_kept": 4,
        "screen": {
            "gnn_tolerance": 5.0,
            "fam_tolerance": 5.0,
            # loose structure matching so that a candidate of the tiny generator reaches DFT
            "fam_settings": {"ltol": 0.6, "stol": 1.0, "angle_tol": 20.0},
        },
        # one structure, one attempt, few steps, loose k-points and clamped ions: the tiny generator's crystals can
        # hold ten atoms (Os4Ru6), which GPAW takes ~20 minutes to label on 2 cores; this test is about the routing
        # of the stage to the hpc pool, so a DFT job that ran there and ended failed counts as much as a label
        "label": {
            "limit": 1,
            "max_attempts": 1,
            "overrides": {"kspacing": 1.2, "relax_steps": 5},
            "elastic": {"strains": [-0.01, 0.01], "eos_strains": [], "relax_ions": False},
        },
        "label_source": "dft",  # the default size (laptop) labels with the FAM
        "predictor_config": "small",
        "generator_config": "small",
        "mode": "deployed",
    }
    with Stack(lake.url, port=free_port(), home=tmp_path / "prefect") as stack:
        run = subprocess.run(
            [
                stack.prefect,
                "deployment",
                "run",
                "active-learning/default",
                "--params",
                json.dumps({"params": tiny}),
                "--watch",
                "--watch-timeout",
                "1500",
            ],
            env=stack.env,
            capture_output=True,
            text=True,
            timeout=1600,
        )
        logs = {p.name: p.read_text()[-3000:] for p in stack.log_dir.glob("*.log")}
        assert run.returncode == 0 and "Completed" in run.stdout, (run.stdout[-3000:], run.stderr[-3000:], logs)
        wide = {**stack.env, "COLUMNS": "400"}  # rich cuts table cells to the terminal width
        flows = subprocess.run(
            [stack.prefect, "flow-run", "ls", "--limit", "20"], env=wide, capture_output=True, text=True
        ).stdout
        artifacts = subprocess.run([stack.prefect, "artifact", "ls"], env=wide, capture_output=True, text=True).stdout
    for flow_name in ("active-learning", "train", "generate", "screen", "label"):
        assert flow_name in flows
    assert "iteration-0" in artifacts and "funnel-0" in artifacts
    counts = lake.counts()
    assert counts["models"] >= 2  # predictor and generator
    stages = set(lake.query("SELECT DISTINCT stage FROM candidates_history").column("stage").to_pylist())
    assert {"generate", "gnn", "fam", "label"} <= stages
    assert lake.query("SELECT count(*) n FROM jobs WHERE stage = 'fam'").column("n")[0].as_py() > 0
    rows = lake.query("SELECT * FROM iterations WHERE iteration = 0").to_pylist()
    print(rows)
    assert [r["target"] for r in rows] == [300.0] and rows[0]["n_kept"] == 4
    assert rows[0]["n_fam_pass"] >= 1
    dft = lake.query("SELECT state FROM jobs WHERE stage = 'dft'").column("state").to_pylist()
    assert dft and set(dft) <= {"completed", "failed"}  # the label flow ran DFT on the hpc pool, to an end
    labeled = lake.query("SELECT status FROM candidates WHERE dft_verdict IS NOT NULL").column("status").to_pylist()
    assert labeled and set(labeled) <= {"labeled", "failed"}
    assert lake.fs.exists(lake.path("plots", "iteration=0", "mape_per_target.png"))


def _run_deployment(stack: Stack, name: str, params: dict, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """``prefect deployment run NAME --watch``, as a user types it."""
    argv = [stack.prefect, "deployment", "run", name, "--params", json.dumps({"params": params}), "--watch"]
    return subprocess.run(
        [*argv, "--watch-timeout", str(timeout)], env=stack.env, capture_output=True, text=True, timeout=timeout + 60
    )


def test_a_deployed_label_run_whose_process_dies_crashes_and_a_rerun_finishes_it(tmp_path):
    """The flow-run process a worker started dies in the middle of a DFT point (as under an OOM kill): Prefect
    shows the run crashed, and running the deployment again labels the structure, computing only what had not
    completed."""
    lake = Lake(tmp_path / "lake")
    seed_candidates(lake, emt_cells(1))
    params = {"lake_url": lake.url, "preset": "emt"}
    with Stack(lake.url, port=free_port(), home=tmp_path / "prefect") as stack:
        killed = _run_deployment(stack, "label/hpc", {**params, "faults": KILL_ONE_POINT.model_dump(mode="json")})
        wide = {**stack.env, "COLUMNS": "400"}
        states = subprocess.run(
            [stack.prefect, "flow-run", "ls", "--flow-name", "label", "--limit", "5"],
            env=wide,
            capture_output=True,
            text=True,
        ).stdout
        assert "CRASHED" in states.upper(), (killed.stdout[-2000:], states)
        assert [r["calculation"] for r in lake.read("jobs", "state = 'running'").to_pylist()] == [KILLED_POINT]
        rerun = _run_deployment(stack, "label/hpc", params)
        logs = {p.name: p.read_text()[-3000:] for p in stack.log_dir.glob("*.log")}
        assert rerun.returncode == 0 and "Completed" in rerun.stdout, (rerun.stdout[-3000:], logs)
    jobs = lake.read("jobs").to_pylist()
    assert not [j for j in jobs if j["state"] == "running"]
    lost = [j for j in jobs if j["calculation"] == KILLED_POINT and j["state"] == "failed"]
    assert [j["error_class"] for j in lost] == ["node_lost"]
    done = Counter(j["calculation"] for j in jobs if j["state"] == "completed")
    assert len(done) == 12 and set(done.values()) == {1}, done  # the rerun took the finished ones from the cache
    assert [c["status"] for c in lake.read("candidates").to_pylist()] == ["labeled"]
