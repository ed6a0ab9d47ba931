"""The cost ledger: what a unit of work cost (core.costs), the jobs rows that carry it, and the views that sum them."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from core.costs import Cost, measured
from storage import Lake
from storage.records import record_work
from storage.rows import job_row

FIXTURE = Path(__file__).parent / "fixtures" / "lake-b4aec63"


def _busy(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_measured_counts_cpu_and_gpu_time():
    with measured() as cost:
        _busy(0.05)
    assert cost.cpu_s >= 0.04 and cost.wall_s >= cost.cpu_s * 0.5 and cost.gpu_s == 0.0
    with measured("cuda:0 (NVIDIA H200)") as on_gpu:
        time.sleep(0.02)
    assert on_gpu.gpu_s == on_gpu.wall_s >= 0.02  # the device was held for the whole block
    assert Cost(4.0, 2.0, 1.0).share(4) == Cost(1.0, 0.5, 0.25)
    assert Cost(3.0, 1.0).on("cuda:1").gpu_s == 3.0 and Cost(3.0, 1.0, 3.0).on("cpu").gpu_s == 0.0


def test_per_thread_cost_leaves_out_other_threads_work():
    """DFT jobs share one process on threads: each job counts its own thread's CPU, not its neighbours'."""
    other = threading.Thread(target=_busy, args=(0.3,))
    with measured(per_thread=True) as mine, measured() as process:
        other.start()
        other.join()
    assert process.cpu_s > 0.1  # the process did the other thread's work
    assert mine.cpu_s < process.cpu_s / 4


def test_measured_fills_the_cost_when_the_work_fails():
    with pytest.raises(RuntimeError), measured() as cost:
        _busy(0.02)
        raise RuntimeError("scf did not converge")
    assert cost.cpu_s > 0 and cost.wall_s > 0


def _candidate(iteration: int, sid: str, target: float, status: str, dft_k: float | None = None) -> dict:
    return {"iteration": iteration, "structure_id": sid, "target": target, "status": status, "dft_k": dft_k}


DUCTILE = "k_vrh in [330, 400] and g_vrh/k_vrh <= 0.57"


def _label(ductile: bool) -> str:
    """A design candidate's conditions_json after its label: K in its window, Pugh's ratio met or not."""
    ratio = {"value": 0.5 if ductile else 0.7, "verdict": "pass" if ductile else "fail", "why": "-"}
    k = {"value": 360.0, "verdict": "pass", "why": "360"}
    return json.dumps({"label": {"k_vrh in [330, 400]": k, "g_vrh/k_vrh <= 0.57": ratio}})


@pytest.fixture
def ledger_lake(tmp_path) -> Lake:
    """Two iterations' candidates and a job of each stage with known costs (seconds chosen to add up exactly)."""
    lake = Lake(tmp_path / "lake")
    lake.append(
        "candidates",
        [
            _candidate(0, "a", 350.0, "labeled", 340.0),  # discovered (3 % off)
            _candidate(0, "b", 350.0, "labeled", 200.0),  # labeled, 43 % off: not a discovery
            _candidate(0, "c", 350.0, "rejected"),
            _candidate(1, "a", 300.0, "rejected"),  # "a" again: its jobs stay with iteration 0
            _candidate(1, "d", 350.0, "labeled", 380.0),  # discovered (9 % off)
            {**_candidate(1, "e", 350.0, "labeled", 350.0), "design": DUCTILE, "conditions_json": _label(False)},
            {**_candidate(1, "f", 350.0, "labeled", 390.0), "design": DUCTILE, "conditions_json": _label(True)},
        ],
    )
    jobs = [
        job_row("gnn", "gnn-m-a", "predict", {"model_id": "m"}, Cost(1.0, 1.0), structure_id="a", device="cpu"),
        job_row("gnn", "gnn-m-c", "predict", {"model_id": "m"}, Cost(1.0, 1.0), structure_id="c", device="cpu"),
        job_row("fam", "fam-a", "relax+elastic", {}, Cost(10.0, 8.0, 10.0), structure_id="a", device="cuda:0"),
        job_row("fam", "fam-d", "relax+elastic", {}, Cost(10.0, 8.0, 10.0), structure_id="d", device="cuda:0"),
        job_row("fam", "fam-seed", "relax+elastic", {}, Cost(99.0, 99.0), structure_id="seed", device="cpu"),
    ]
    failed = {**job_row("dft", "dft-b", "relax", {}, Cost(50.0, 50.0), structure_id="b"), "state": "failed"}
    retried = {**failed, "attempt": 2, "state": "completed", "cpu_s": 60.0, "wall_time_s": 60.0}
    jobs += [failed, retried, job_row("dft", "dft-a", "relax", {}, Cost(40.0, 40.0), structure_id="a")]
    jobs += [job_row("dft", "dft-d", "relax", {}, Cost(30.0, 30.0), structure_id="d")]
    lake.append("jobs", jobs)
    record_work(lake, "train", "train-m", "cgcnn", {"seed": 0}, {"wall_s": 100.0, "cpu_s": 100.0}, "cpu", 0)
    record_work(lake, "train", "train-m2", "cgcnn", {"seed": 1}, {"wall_s": 200.0, "cpu_s": 200.0}, "cpu", 1)
    record_work(lake, "generate", "gen-1", "sample", {}, {"wall_s": 5.0, "cpu_s": 5.0}, "cpu", 1)
    return lake


def test_cost_per_stage_and_iteration_sum_the_job_rows(ledger_lake):
    stages = {(r["iteration"], r["stage"]): r for r in ledger_lake.query("SELECT * FROM cost_per_stage").to_pylist()}
    assert set(stages) == {(0, "gnn"), (0, "fam"), (0, "dft"), (0, "train"), (1, "fam"), (1, "dft"), (1, "train"),
                           (1, "generate")}  # fmt: skip
    assert stages[(0, "dft")]["cpu_s"] == 150.0 and stages[(0, "dft")]["n_jobs"] == 3  # every attempt was paid for
    assert stages[(0, "dft")]["n_failed"] == 1
    assert stages[(0, "fam")]["gpu_s"] == 10.0 and stages[(0, "gnn")]["n_jobs"] == 2
    per_iteration = {r["iteration"]: r for r in ledger_lake.query("SELECT * FROM cost_per_iteration").to_pylist()}
    assert per_iteration[0]["cpu_s"] == 2 * 1.0 + 8.0 + 150.0 + 100.0
    assert per_iteration[1]["cpu_s"] == 8.0 + 30.0 + 200.0 + 5.0  # the seed structure's job is in neither


def test_cost_per_discovery_is_one_query_that_matches_the_job_rows(ledger_lake):
    rows = {r["iteration"]: r for r in ledger_lake.query("SELECT * FROM cost_per_discovery").to_pylist()}
    assert set(rows) == {0, 1, None}  # None: the whole loop
    # "e" is on its K target but not ductile: a design counts a structure whose label met every condition ("f")
    assert rows[0]["n_discovered"] == 1 and rows[1]["n_discovered"] == 2 and rows[None]["n_discovered"] == 3
    attributed = (
        ledger_lake.query(
            "SELECT sum(cpu_s) AS cpu FROM jobs WHERE iteration IS NOT NULL "
            "OR structure_id IN (SELECT structure_id FROM candidates)"
        )
        .column("cpu")[0]
        .as_py()
    )
    assert rows[None]["cpu_s"] == attributed == 260.0 + 243.0
    assert rows[None]["cpu_hours_per_discovery"] == pytest.approx(attributed / 3 / 3600)
    assert rows[0]["gpu_hours_per_discovery"] == pytest.approx(10.0 / 3600)


def test_a_rerun_writes_no_twin_job_row(ledger_lake):
    before = ledger_lake.query("SELECT count(*) AS n FROM jobs_history").column("n")[0].as_py()
    record_work(ledger_lake, "generate", "gen-1", "sample", {}, {"wall_s": 5.0, "cpu_s": 5.0}, "cpu", 1)
    assert ledger_lake.query("SELECT count(*) AS n FROM jobs_history").column("n")[0].as_py() == before


def test_a_lake_written_before_the_ledger_still_reads(tmp_path):
    """Jobs rows of older code have no cpu_s, gpu_s or iteration: they read as NULL and every view works."""
    shutil.copytree(FIXTURE, tmp_path / "lake")
    lake = Lake(tmp_path / "lake")
    jobs = lake.query("SELECT cpu_s, gpu_s, iteration FROM jobs").to_pylist()
    assert jobs and all(r == {"cpu_s": None, "gpu_s": None, "iteration": None} for r in jobs)
    for view in ("job_costs", "cost_per_stage", "cost_per_iteration", "cost_per_discovery"):
        lake.query(f"SELECT * FROM {view}")
    assert lake.write_catalog().exists()
