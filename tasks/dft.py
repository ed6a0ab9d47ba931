"""Prefect tasks for DFT jobs: one task per calculation (a relaxation or one strain/EOS point).

Each task run is one *job*; each of its attempts is one row in ``jobs`` (the settings actually
used, the failure class and message, wall time, host). A failed attempt raises
:class:`~core.failures.DftFailure`; Prefect's ``retry_condition_fn`` (:func:`retry_transient`)
retries transient classes and lets bad input fail at once. The next attempt reads the classes of
the earlier attempts of the same task run from ``jobs`` and escalates its settings with
:func:`core.dft.escalate` (escalation is data in ``core.dft.ESCALATION``).

Tasks are cached on their inputs and source (``tasks.common.compute_task``), with results in the
lake: a (structure, settings) pair that succeeded once is never computed again, in this run or
a later one. Failed runs are not cached, so a rerun tries them again.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
from ase import Atoms
from prefect import get_run_logger
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.runtime import task_run as runtime_task_run
from prefect.states import State

from core.costs import measured
from core.dft import DftSettings, escalate, run_point, run_relax
from core.elastic import ElasticSettings
from core.failures import (
    DftFailure,
    FailureClass,
    FaultInjection,
    as_failure,
    classify_exception,
    is_transient,
    lost_class,
)
from core.provenance import canonical_json, settings_hash
from storage import Lake
from storage.records import lost_attempt
from storage.rows import JobRow
from tasks.common import compute_task

DFT_CACHE = (INPUTS - "faults" - "max_attempts") + TASK_SOURCE
"""A DFT result depends on the structure and the settings, not on the retry budget or on the faults injected into
attempts that fail: a rerun with another budget, or without injection, reuses every completed calculation."""

AtomsDict = dict[str, Any]
"""A JSON-able cell: symbols, cell (3x3 Å), scaled_positions. Hashable by Prefect's cache policy."""


def atoms_to_dict(atoms: Atoms) -> AtomsDict:
    return {
        "symbols": atoms.get_chemical_symbols(),
        "cell": np.asarray(atoms.cell[:]).tolist(),
        "scaled_positions": atoms.get_scaled_positions(wrap=False).tolist(),
    }


def atoms_from_dict(data: AtomsDict) -> Atoms:
    return Atoms(symbols=data["symbols"], cell=data["cell"], scaled_positions=data["scaled_positions"], pbc=True)


def _host() -> str:
    """This machine's name, with the SLURM job id when the attempt runs inside a SLURM job."""
    job = os.environ.get("SLURM_JOB_ID")
    return socket.gethostname() + (f" slurm:{job}" if job else "")


def retry_transient(task: Any, task_run: Any, state: State) -> bool:
    """Prefect retry condition: retry transient failure classes, never bad input or unknown bugs."""
    try:
        state.result()
    except DftFailure as exc:
        return exc.transient
    except Exception as exc:
        return is_transient(classify_exception(exc))
    return False


def _in_dask_worker() -> bool:
    """Whether this runs on a Dask worker (the ``dask`` and ``slurm`` runners), which may run a task again."""
    if "distributed" not in sys.modules:
        return False
    from distributed import get_worker

    try:
        get_worker()
    except ValueError:
        return False
    return True


def may_have_history(task_run_id: Any, run_count: int) -> bool:
    """Whether ``jobs`` can hold earlier attempts of this job, so that they must be read: a Prefect retry (run count
    above 1), a task on a Dask worker (Dask runs it again, same task run, after its worker is lost), or a job outside
    a task run (its id is not one run's). The first attempt of a task run on threads has none: reading the table
    would cost a scan of every ``jobs`` file per calculation for nothing."""
    return task_run_id is None or run_count > 1 or _in_dask_worker()


def _attempt_history(lake: Lake, job_id: str, run_count: int, max_attempts: int) -> tuple[int, list[FailureClass]]:
    """The number of the attempt about to start, and the failure classes of the job's earlier attempts in order.

    The number is Prefect's run count, or one past the last attempt ``jobs`` holds when an attempt died with its
    process (a cancelled SLURM job, a killed worker) and Dask ran the task again on another worker; each such
    attempt, still ``running``, is recorded as lost first (``node_lost``, or ``walltime`` where SLURM says so).
    """
    rows = lake.query("SELECT * FROM jobs WHERE job_id = ? ORDER BY attempt", [job_id]).to_pylist()
    lost = [
        lost_attempt(r, lost_class(r["host"]), retrying=r["attempt"] < max_attempts).row()
        for r in rows
        if r["state"] == "running"
    ]
    if lost:
        lake.append("jobs", lost)
        rows = [r for r in rows if r["state"] != "running"] + lost
    attempt = max([run_count, *(r["attempt"] + 1 for r in rows)])
    return attempt, [
        FailureClass(r["error_class"]) for r in sorted(rows, key=lambda r: r["attempt"]) if r["error_class"]
    ]


def _run_job(
    lake_url: str,
    structure_id: str,
    calculation: str,
    base: DftSettings,
    scope: Literal["point", "structure"],
    faults: FaultInjection,
    max_attempts: int,
    compute: Any,
) -> tuple[Any, DftSettings, int]:
    """One attempt of a job: escalate from the earlier attempts, run, record the attempt in ``jobs``."""
    lake = Lake(lake_url)
    logger = get_run_logger()
    task_run_id = runtime_task_run.get_id()
    job_id = str(task_run_id or f"{structure_id}/{calculation}/{base.full_hash()}")
    run_count = max(int(runtime_task_run.get_run_count() or 1), 1)
    attempt, earlier = (
        _attempt_history(lake, job_id, run_count, max_attempts)
        if may_have_history(task_run_id, run_count)
        else (run_count, [])
    )
    if attempt > max_attempts:  # Dask ran the task again after its last attempt was lost: nothing left to spend
        raise DftFailure(earlier[-1] if earlier else FailureClass.NODE_LOST, f"all {max_attempts} attempts used")
    settings, steps = escalate(base, earlier, scope)
    if steps:
        logger.info("%s %s attempt %d escalated: %s", structure_id, calculation, attempt, "; ".join(steps))
    job = {
        "job_id": job_id,
        "structure_id": structure_id,
        "stage": "dft",
        "calculation": calculation,
        "inputs_hash": settings_hash({"structure_id": structure_id, "calculation": calculation, "base": base}),
        "settings_json": canonical_json(settings),
        "settings_hash": settings.full_hash(),
        "attempt": attempt,
        "host": _host(),
        "device": "cpu",
    }
    lake.append("jobs", [JobRow(**job, state="running").row()])  # what remains if this process dies mid-job
    try:
        with measured(per_thread=True) as cost:  # jobs share this process on threads: count this thread's CPU only
            faults.check(f"{structure_id}/{calculation}", calculation, attempt)
            with tempfile.TemporaryDirectory(prefix="matloop-dft-") as workdir:
                value = compute(settings, Path(workdir))
    except Exception as exc:
        failure = as_failure(exc)
        retrying = failure.transient and attempt < max_attempts
        row = JobRow(
            **job,
            state="retrying" if retrying else "failed",
            error_class=failure.failure,
            error_message=failure.message[:2000],
            **cost.columns(),
        )
        lake.append("jobs", [row.row()])
        logger.warning("%s %s attempt %d/%d: %s", structure_id, calculation, attempt, max_attempts, failure)
        raise failure from exc
    lake.append("jobs", [JobRow(**job, state="completed", **cost.columns()).row()])
    return value, settings, attempt


@compute_task(name="dft-relax", cache_policy=DFT_CACHE, retry_condition_fn=retry_transient)
def dft_relax(
    lake_url: str,
    structure_id: str,
    atoms: AtomsDict,
    settings: DftSettings,
    faults: FaultInjection,
    max_attempts: int,
) -> dict[str, Any]:
    """Relax one structure's cell and positions with DFT. Returns the relaxed cell, energy and the
    settings that succeeded (an escalation may have changed physics fields: the strain set must use them).
    Set ``retries=max_attempts - 1`` with ``.with_options``."""

    def compute(s: DftSettings, workdir: Path) -> tuple[Atoms, float, int]:
        return run_relax(atoms_from_dict(atoms), s, workdir)

    (relaxed, energy, n_steps), used, attempt = _run_job(
        lake_url, structure_id, "relax", settings, "structure", faults, max_attempts, compute
    )
    return {
        "atoms": atoms_to_dict(relaxed),
        "energy": energy,
        "n_steps": n_steps,
        "settings": used.model_dump(mode="json"),
        "attempts": attempt,
    }


@compute_task(name="dft-point", cache_policy=DFT_CACHE, retry_condition_fn=retry_transient)
def dft_point(
    lake_url: str,
    structure_id: str,
    label: str,
    atoms: AtomsDict,
    settings: DftSettings,
    elastic_settings: ElasticSettings,
    faults: FaultInjection,
    max_attempts: int,
) -> dict[str, Any]:
    """Stress and energy of one strained (or EOS-scaled) cell. ``settings`` are resolved on the
    reference cell; escalation here never changes physics fields. Set ``retries`` with ``.with_options``."""

    def compute(s: DftSettings, workdir: Path) -> tuple[np.ndarray, float]:
        return run_point(atoms_from_dict(atoms), s, elastic_settings, workdir)

    (stress, energy), used, attempt = _run_job(
        lake_url, structure_id, label, settings, "point", faults, max_attempts, compute
    )
    return {
        "stress": np.asarray(stress).tolist(),
        "energy": energy,
        "settings": used.model_dump(mode="json"),
        "attempts": attempt,
    }
