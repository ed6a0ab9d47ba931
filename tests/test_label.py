"""The label flow end to end on a real lake: EMT (cheap, same code path) for retries, escalation,
fault injection, caching and resume; one real-GPAW structure (marked dft + slow)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from ase.build import bulk

from core.failures import FailureClass, FaultInjection
from core.structures import from_atoms, split_of, to_row
from flows.label import LabelParams, label
from storage import Lake
from storage.candidates import advance, current, n_open
from storage.queries import labeled_k_vrh
from storage.rows import ElasticPayload
from tasks.dft import dft_point, dft_relax, may_have_history

EMT_CELLS = {"Cu": 3.61, "Ni": 3.52, "Pd": 3.89, "Al": 4.05}
REPO = Path(__file__).resolve().parent.parent
KILLED_POINT = "strain:xx:+0.005"
KILL_ONE_POINT = FaultInjection(fraction=1.0, effect="kill", only=KILLED_POINT)
"""The first attempt of one strain point dies with its process, as under a lost node or a cancelled job."""

# A label run whose process dies in the middle of a strain point (local runner: the jobs run on its threads).
KILLED_LABEL_RUN = f"""
import sys
from core.failures import FaultInjection
from flows.label import LabelParams, label
faults = FaultInjection.model_validate_json({KILL_ONE_POINT.model_dump_json()!r})
label(LabelParams(lake_url=sys.argv[1], preset="emt", faults=faults))
"""


def seed_candidates(lake: Lake, atoms_list, iteration: int = 0, target: float = 150.0) -> list[str]:
    """structures rows and fam_pass candidates, as stages I-II would leave them."""
    rows, updates = [], []
    for atoms in atoms_list:
        row = to_row(from_atoms(atoms))
        rows.append({**row, "source": "generated", "split": split_of(row["structure_id"])})
        updates.append(
            {
                "iteration": iteration,
                "structure_id": row["structure_id"],
                "target": target,
                "fam_model": "test",
                "fam_k": target,
                "fam_verdict": "pass",
                "status": "fam_pass",
            }
        )
    lake.append("structures", rows)
    advance(lake, updates, stage="screen")
    return [r["structure_id"] for r in rows]


def emt_cells(n: int = 2):
    # slightly off the EMT lattice constant, so the relaxation has work to do
    return [bulk(el, "fcc", a=a * 1.01) for el, a in list(EMT_CELLS.items())[:n]]


def test_label_emt_labels_joins_training_data_and_rerun_recomputes_nothing(lake, prefect_server):
    ids = seed_candidates(lake, emt_cells(2))
    assert n_open(lake) == n_open(lake, 0) == 2 and n_open(lake, 1) == 0
    params = LabelParams(lake_url=lake.url, preset="emt")
    outcomes = label(params)
    assert [o.verdict for o in outcomes] == ["labeled", "labeled"], outcomes
    assert n_open(lake) == 0
    cands = current(lake, 0)
    assert {c["status"] for c in cands} == {"labeled"}
    assert all(c["dft_method"].startswith("dft:emt/") and c["dft_k"] > 0 for c in cands)
    training = labeled_k_vrh(lake).to_pylist()
    relaxed = {o.relaxed_id for o in outcomes}
    assert relaxed <= {r["structure_id"] for r in training}
    assert {r["method"] for r in training} == {outcomes[0].method}
    assert set(ids).isdisjoint(relaxed)  # relaxing changed the cell: a dft-relaxed row with its parent
    parents = lake.query("SELECT parent_ids FROM structures WHERE source = 'dft-relaxed'").column(0).to_pylist()
    assert sorted(p[0] for p in parents) == sorted(ids)
    jobs = lake.read("jobs").to_pylist()
    assert jobs and all(j["state"] == "completed" and j["attempt"] == 1 and j["host"] for j in jobs)
    # rerun: every candidate is terminal, nothing is read or computed
    assert label(params) == []
    assert lake.counts()["jobs"] == len(jobs)


def test_transient_failures_escalate_then_succeed_and_every_attempt_is_a_job_row(lake, prefect_server, monkeypatch):
    import tasks.dft

    scans: list[int] = []  # the run count of every attempt that read the jobs table for its job's history
    history = tasks.dft._attempt_history

    def spy(lake_: Lake, job_id: str, run_count: int, max_attempts: int):
        scans.append(run_count)
        return history(lake_, job_id, run_count, max_attempts)

    monkeypatch.setattr(tasks.dft, "_attempt_history", spy)
    seed_candidates(lake, emt_cells(1))
    faults = FaultInjection(
        fraction=1.0, failure=FailureClass.SCF_UNCONVERGED, seed=1, min_failed_attempts=2, max_failed_attempts=2
    )
    outcomes = label(LabelParams(lake_url=lake.url, preset="emt", faults=faults, max_attempts=3))
    assert outcomes[0].verdict == "labeled"
    assert sorted(scans) == [2] * 12 + [3] * 12  # the retries read it; no first attempt on threads did
    history = lake.read("jobs", history=True).to_pylist()
    by_job: dict[str, list[dict]] = {}
    for row in history:
        by_job.setdefault(row["job_id"], []).append(row)
    assert len(by_job) == 12  # relax + 11 strain/EOS points of a cubic cell
    for history_rows in by_job.values():
        opened = sorted(r["attempt"] for r in history_rows if r["state"] == "running")
        assert opened == [1, 2, 3]  # each attempt is recorded when it starts, in case its process dies
        rows = sorted((r for r in history_rows if r["state"] != "running"), key=lambda r: r["attempt"])
        assert [r["state"] for r in rows] == ["retrying", "retrying", "completed"]
        assert [r["error_class"] for r in rows[:2]] == ["scf_unconverged"] * 2
        # attempt 2 halved the mixing; attempt 3 switched the eigensolver
        betas = [float(__import__("json").loads(r["settings_json"])["mixing_beta"]) for r in rows]
        assert betas[1] == pytest.approx(betas[0] / 2)
        assert '"eigensolver":"cg"' in rows[2]["settings_json"]
        # physics never changes within a strain point's retries
        assert len({r["settings_json"].split('"smearing_width":')[1][:6] for r in rows}) == 1


def test_bad_input_fails_at_once_with_reason(lake, prefect_server):
    seed_candidates(lake, emt_cells(1))
    faults = FaultInjection(fraction=1.0, failure=FailureClass.BAD_INPUT, seed=0)
    outcomes = label(LabelParams(lake_url=lake.url, preset="emt", faults=faults, max_attempts=3))
    assert outcomes[0].verdict == "failed"
    assert outcomes[0].reason.startswith("relax bad_input at once")
    jobs = lake.read("jobs").to_pylist()
    assert len(jobs) == 1 and jobs[0]["state"] == "failed" and jobs[0]["error_class"] == "bad_input"
    history = sorted(lake.read("jobs", history=True).to_pylist(), key=lambda r: r["created_at"])
    assert [r["state"] for r in history] == ["running", "failed"]
    cand = current(lake, 0)[0]
    assert cand["status"] == "failed" and cand["dft_verdict"] == "failed" and "bad_input" in cand["dft_reason"]


def test_missing_strain_point_is_named_and_no_tensor_is_fitted(lake, prefect_server):
    seed_candidates(lake, emt_cells(1))
    # node_lost on every attempt of about 30 % of the strain points: those points stay missing
    faults = FaultInjection(
        fraction=0.3,
        failure=FailureClass.NODE_LOST,
        seed=3,
        only="strain:",
        min_failed_attempts=5,
        max_failed_attempts=5,
    )
    outcome = label(LabelParams(lake_url=lake.url, preset="emt", faults=faults, max_attempts=2))[0]
    assert outcome.verdict == "failed" and outcome.missing
    for point in outcome.missing:
        assert point in outcome.reason
    assert "node_lost after 2 attempts" in outcome.reason
    assert labeled_k_vrh(lake).num_rows == 0
    tensor = lake.query("SELECT value, value_json, flags FROM properties WHERE name = 'elastic_tensor'").to_pylist()
    assert tensor and tensor[0]["value"] is None
    payload = ElasticPayload.from_json(tensor[0]["value_json"])
    assert payload.c_voigt is None and sorted(payload.missing) == sorted(outcome.missing)


def test_rerun_picks_up_exactly_the_unfinished_structures(lake, prefect_server):
    ids = seed_candidates(lake, emt_cells(3))
    first = label(LabelParams(lake_url=lake.url, preset="emt", limit=1))
    assert len(first) == 1
    done = first[0].structure_id
    jobs_before = {j["structure_id"] for j in lake.read("jobs").to_pylist()}
    assert jobs_before == {done}
    second = label(LabelParams(lake_url=lake.url, preset="emt"))
    assert sorted(o.structure_id for o in second) == sorted(set(ids) - {done})
    assert {j["structure_id"] for j in lake.read("jobs").to_pylist()} == set(ids)
    assert {c["status"] for c in current(lake, 0)} == {"labeled"}


def test_dft_jobs_lease_no_prefect_concurrency_slot():
    """A task tag makes Prefect lease a tag-concurrency slot through its API around every run: measured on bcc W
    (`test` preset, 12 jobs of about 0.9 s), the leases took 4-6 s of a 19 s label run. DFT concurrency is the
    runner's ``workers`` and the SLURM job limit instead."""
    assert dft_relax.tags == set() and dft_point.tags == set()


def test_a_first_attempt_on_threads_skips_the_jobs_scan_and_every_other_attempt_reads_it():
    """Earlier attempts can exist only for a retry, a task Dask may have run before, or a job outside a task run;
    only then is ``jobs`` read (a scan of every ``jobs`` file: half of the platform's time per DFT calculation)."""
    import distributed

    assert not may_have_history("run-1", 1)
    assert may_have_history("run-1", 2) and may_have_history(None, 1)
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        assert client.submit(may_have_history, "run-1", 1).result()  # on a Dask worker: the task may be a rerun


@pytest.mark.dft
@pytest.mark.slow
def test_label_one_tungsten_cell_with_gpaw(lake, prefect_server):
    seed_candidates(lake, [bulk("W", "bcc", a=3.20)], target=300.0)
    outcome = label(LabelParams(lake_url=lake.url, preset="test"))[0]
    assert outcome.verdict == "labeled", outcome.reason
    assert outcome.method.startswith("dft:gpaw/")
    assert 250 < outcome.k_vrh < 360  # PBE 305.6 GPa; the loose preset is within ~15 %
    born = lake.query("SELECT value FROM properties WHERE name = 'born_stable'").column(0).to_pylist()
    assert born == [1.0]


def test_a_label_run_killed_mid_job_resumes_and_records_the_lost_attempt(lake, prefect_server):
    from prefect.settings import PREFECT_API_URL

    seed_candidates(lake, emt_cells(1))
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": PREFECT_API_URL.value()}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_LABEL_RUN, lake.url], env=env, capture_output=True, text=True, timeout=600
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    running = lake.read("jobs", "state = 'running'").to_pylist()
    assert [r["calculation"] for r in running] == [KILLED_POINT]  # what a killed process leaves
    n_done_before = lake.read("jobs", "state = 'completed'").num_rows
    assert n_done_before >= 1  # the relaxation at least

    outcome = label(LabelParams(lake_url=lake.url, preset="emt"))[0]
    assert outcome.verdict == "labeled", outcome
    jobs = lake.read("jobs").to_pylist()
    assert not [j for j in jobs if j["state"] == "running"]
    (lost,) = [j for j in jobs if j["job_id"] == running[0]["job_id"]]
    assert (lost["state"], lost["error_class"]) == ("failed", "node_lost")
    assert "died before it finished" in lost["error_message"] and lost["host"] in lost["error_message"]
    # the rerun computed the killed point and what had not started; what completed before the kill came from
    # the task cache: every calculation completed exactly once
    done = Counter(j["calculation"] for j in jobs if j["state"] == "completed")
    assert len(done) == 12 and set(done.values()) == {1}, done
    assert labeled_k_vrh(lake).num_rows == 1


@pytest.mark.slow
def test_a_dask_worker_killed_under_a_strain_point_is_recorded_lost_and_the_point_retried(lake, prefect_server):
    seed_candidates(lake, emt_cells(1))
    params = LabelParams(lake_url=lake.url, preset="emt", runner="dask", workers=1, faults=KILL_ONE_POINT)
    outcome = label(params)[0]
    assert outcome.verdict == "labeled", outcome
    rows = sorted(lake.read("jobs", f"calculation = '{KILLED_POINT}'").to_pylist(), key=lambda r: r["attempt"])
    assert [(r["attempt"], r["state"], r["error_class"]) for r in rows] == [
        (1, "retrying", "node_lost"),
        (2, "completed", None),
    ]
    assert len({r["job_id"] for r in rows}) == 1  # Dask ran the same task run again on the restarted worker
    assert not lake.read("jobs", "state = 'running'").num_rows


def test_an_element_gpaw_cannot_do_is_refused_before_any_job(lake, prefect_server):
    ids = seed_candidates(lake, [bulk("Rf", "fcc", a=4.5)])  # no dataset in the wheel, none GPAW can generate
    outcome = label(LabelParams(lake_url=lake.url, preset="test"))[0]
    assert outcome.verdict == "failed"
    assert outcome.reason == "bad_input at once: GPAW has no PAW dataset for Rf (PBE) and cannot generate one"
    assert lake.counts()["jobs"] == 0  # said before anything ran
    assert current(lake, 0)[0]["dft_reason"] == outcome.reason and current(lake, 0)[0]["structure_id"] == ids[0]
