"""The HPC path against a real SLURM: a single-node controller and node on localhost (Debian
slurm-wlm + munge), the label flow fanning its DFT jobs out as SLURM jobs through prefect-dask's
DaskTaskRunner and a dask-jobqueue SLURMCluster, then everything torn down (jobs cancelled before
slurmd stops, daemons stopped by PID)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from test_label import KILL_ONE_POINT, KILLED_POINT, emt_cells, seed_candidates  # tests/ is on sys.path

from core.settings import SlurmOptions
from flows.label import LabelParams, label
from storage.candidates import current
from storage.queries import labeled_k_vrh

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
SLURM_DIR = Path(__file__).resolve().parent.parent / "deployments" / "slurm"


@pytest.fixture
def slurm(tmp_path, monkeypatch):
    """A running single-node SLURM; yields its state folder and stops it afterwards."""
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(b) is None]
    if missing or os.geteuid() != 0:
        pytest.skip(f"needs root and Debian's slurm-wlm + munge (missing: {missing or 'root'})")
    state = tmp_path / "slurm"
    start = subprocess.run([str(SLURM_DIR / "start.sh"), str(state)], capture_output=True, text=True, timeout=60)
    try:
        assert start.returncode == 0, start.stderr
        monkeypatch.setenv("SLURM_CONF", str(state / "slurm.conf"))
        yield state
    finally:
        subprocess.run([str(SLURM_DIR / "stop.sh"), str(state)], capture_output=True, text=True, timeout=60)
    leftovers = [f for f in ("slurmd.pid.launch", "slurmctld.pid.launch", "munge/munged.pid") if (state / f).exists()]
    assert not leftovers, f"daemons not stopped: {leftovers}"


def _slurm_options(tmp_path: Path, walltime: str = "00:10:00") -> SlurmOptions:
    return SlurmOptions(
        partition="debug",
        cores=1,
        memory="1GB",
        walltime=walltime,
        max_jobs=2,
        log_directory=str(tmp_path / "worker-logs"),
    )


def test_label_flow_runs_dft_jobs_as_slurm_jobs(lake, prefect_server, slurm, tmp_path):
    ids = seed_candidates(lake, emt_cells(1))
    params = LabelParams(
        lake_url=lake.url,
        preset="emt",
        runner="slurm",
        slurm=_slurm_options(tmp_path),
    )
    outcomes = label(params)
    assert [o.verdict for o in outcomes] == ["labeled"], outcomes
    assert current(lake, 0)[0]["status"] == "labeled"
    assert labeled_k_vrh(lake).num_rows == 1
    jobs = lake.read("jobs").to_pylist()
    assert {j["structure_id"] for j in jobs} == set(ids)
    # every DFT attempt ran inside a SLURM job (the task records SLURM_JOB_ID next to the host)
    assert jobs and all(" slurm:" in j["host"] for j in jobs), [j["host"] for j in jobs]
    assert any((tmp_path / "worker-logs").iterdir())  # the SLURM jobs' own logs


def _point_attempts(lake) -> list[tuple[int, str, str | None]]:
    rows = sorted(lake.read("jobs", f"calculation = '{KILLED_POINT}'").to_pylist(), key=lambda r: r["attempt"])
    assert all(" slurm:" in r["host"] for r in rows), rows
    assert len({r["host"] for r in rows}) == len(rows)  # each attempt in a SLURM job of its own
    return [(r["attempt"], r["state"], r["error_class"]) for r in rows]


def test_a_slurm_job_cancelled_under_a_dft_point_is_recorded_lost_and_the_point_retried(
    lake, prefect_server, slurm, tmp_path
):
    seed_candidates(lake, emt_cells(1))
    params = LabelParams(lake_url=lake.url, preset="emt", runner="slurm", slurm=_slurm_options(tmp_path))
    outcome = label(params.model_copy(update={"faults": KILL_ONE_POINT}))[0]  # the point's job runs scancel on itself
    assert outcome.verdict == "labeled", outcome
    assert _point_attempts(lake) == [(1, "retrying", "node_lost"), (2, "completed", None)]
    assert not lake.read("jobs", "state = 'running'").num_rows


def test_a_slurm_job_past_its_walltime_under_a_dft_point_is_recorded_as_walltime(lake, prefect_server, slurm, tmp_path):
    seed_candidates(lake, emt_cells(1))
    hang = KILL_ONE_POINT.model_copy(update={"effect": "hang"})  # the point sleeps until SLURM ends its job
    params = LabelParams(
        lake_url=lake.url,
        preset="emt",
        runner="slurm",
        slurm=_slurm_options(tmp_path, walltime="00:01:00"),
        faults=hang,
    )
    outcome = label(params)[0]
    assert outcome.verdict == "labeled", outcome
    assert _point_attempts(lake) == [(1, "retrying", "walltime"), (2, "completed", None)]
