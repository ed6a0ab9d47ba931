"""The ``label`` flow (stage III): DFT relaxation, elastic tensor, K_vrh and Born stability of the
candidates that passed the FAM screen; ``fam_pass`` -> ``labeled`` | ``failed``.

Per structure: one relaxation job, then one job per strain and EOS point of the relaxed cell
(``core.elastic.deformations``), fanned out on the chosen task runner: in-process threads, a
local Dask cluster, or SLURM jobs through prefect-dask's ``DaskTaskRunner`` with a dask-jobqueue
``SLURMCluster`` (the ``hpc`` work pool's job variables fill :class:`SlurmOptions`). The tensor is
fitted only from a complete strain set (``core.elastic.fit``); a point that still fails after its
retries leaves the candidate ``failed`` with the missing labels in its reason.

Results: ``properties`` rows with method ``dft:<code>/<physics hash>`` on the relaxed structure
(a ``structures`` row with source ``dft-relaxed`` when relaxing changed its id), so the structure
joins ``storage.queries.labeled_k_vrh``; the candidate row gets dft_method/dft_k/dft_verdict/
dft_reason. Only candidates still at ``fam_pass`` are read, so a rerun picks up exactly the
structures without a terminal state, and the task cache makes finished jobs free.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Annotated, Any, Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run as runtime_flow_run
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from core.dft import DftSettings, preset, resolve
from core.dft import PresetName as DftPreset
from core.elastic import ElasticResult, ElasticSettings, deformations, fit
from core.failures import FaultInjection, as_failure
from core.structures import from_atoms, from_row, split_of, to_atoms, to_row
from flows.locking import stage_lock
from storage import Lake
from storage.candidates import advance, current
from storage.queries import LOOP_LABEL_FLAG
from tasks.common import in_lake
from tasks.dft import atoms_from_dict, atoms_to_dict, dft_point, dft_relax

REPO = Path(__file__).resolve().parent.parent


class SlurmOptions(BaseSettings):
    """SLURM job variables for the Dask workers that run the DFT jobs (one worker per SLURM job).

    Defaults come from the ``hpc`` work pool's environment (MATLOOP_SLURM_PARTITION, _ACCOUNT,
    _CORES, _MEMORY, _WALLTIME, _PROLOGUE with one shell line per line); parameters override them.
    """

    model_config = SettingsConfigDict(env_prefix="MATLOOP_SLURM_", use_attribute_docstrings=True)

    partition: str | None = None
    """SLURM partition (empty: the cluster's default)."""
    account: str | None = None
    """SLURM account to charge (empty: the user's default)."""
    cores: int = Field(1, ge=1)
    """CPU cores per SLURM job (one Dask worker process per job runs one DFT job at a time)."""
    memory: str = "2GB"
    """Memory per SLURM job, e.g. 2GB."""
    walltime: str = "01:00:00"
    """Wall-time limit per SLURM job, HH:MM:SS."""
    max_jobs: int = Field(4, ge=1)
    """Most SLURM jobs at once (Dask adapts between 0 and this)."""
    job_script_prologue: Annotated[list[str], NoDecode] = Field(
        [], validation_alias=AliasChoices("job_script_prologue", "MATLOOP_SLURM_PROLOGUE")
    )
    """Shell lines run before the worker starts (module load, venv activation, ...)."""
    job_extra_directives: list[str] = []
    """Extra ``#SBATCH`` lines, e.g. ``--qos=debug``."""
    log_directory: str | None = None
    """Where SLURM writes worker logs (default: the submit directory)."""

    @field_validator("partition", "account", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return value or None

    @field_validator("job_script_prologue", mode="before")
    @classmethod
    def _lines(cls, value: Any) -> Any:
        return [line for line in value.splitlines() if line.strip()] if isinstance(value, str) else value

    def cluster_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``dask_jobqueue.SLURMCluster``."""
        prologue = [
            f"cd {REPO}",
            "export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1",
            *self.job_script_prologue,
        ]
        kwargs: dict[str, Any] = {
            "queue": self.partition,
            "account": self.account,
            "cores": self.cores,
            "processes": 1,
            "memory": self.memory,
            "walltime": self.walltime,
            "job_script_prologue": prologue,
            "job_extra_directives": self.job_extra_directives,
            "python": sys.executable,
            "worker_extra_args": ["--nthreads", "1"],
        }
        if self.log_directory:
            kwargs["log_directory"] = self.log_directory
        return kwargs


class LabelParams(BaseModel):
    """Parameters of the label flow (rendered as a form in the Prefect UI)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    iteration: int = Field(0, ge=0)
    """Iteration whose fam_pass candidates are labeled."""
    lake_url: str = ""
    """Lake root, a path or an fsspec URL; empty: $MATLOOP_LAKE, else ./lake."""
    preset: DftPreset = "test"
    """DFT preset (core.dft.PRESETS): test, gpaw-tight, vasp, qe (emt: a non-DFT stand-in for smoke tests)."""
    overrides: dict[str, Any] = {}
    """Field overrides on the preset, e.g. {"ecut": 400}."""
    elastic: ElasticSettings = Field(default_factory=ElasticSettings)
    """Strain set, symmetry reduction, ionic relaxation and EOS check of the DFT elastic tensor."""
    max_attempts: int = Field(3, ge=1, le=10)
    """Attempts per job, the first included; transient failures retry with escalated settings."""
    faults: FaultInjection = Field(default_factory=FaultInjection)
    """Fault injection (tests, benchmarks): a fraction of jobs fail with a chosen class."""
    runner: Literal["local", "dask", "slurm"] = "local"
    """local: threads in this process; dask: a local Dask cluster of processes; slurm: SLURM jobs via Dask."""
    workers: int = Field(1, ge=1)
    """Threads (local) or worker processes (dask) running DFT jobs at once."""
    slurm: SlurmOptions = Field(default_factory=SlurmOptions)
    """SLURM job settings of the slurm runner (defaults from the hpc pool's MATLOOP_SLURM_* variables)."""
    limit: int = Field(0, ge=0)
    """Label at most this many structures in this run (0: all), those whose FAM K is closest to target
    first (the rest stay fam_pass for a later run)."""
    source: Literal["dft", "fam"] = "dft"
    """dft: label by DFT (the reference work). fam: promote the stage-II FAM K of each survivor to its
    label (rows marked fam:<model> and loop_label): cheap enough for many iterations on a laptop."""
    loop_run_id: str = ""
    """Flow-run id of the active-learning run this stage belongs to (it shares that run's lake lock); empty:
    a run of its own, which takes the lake's loop lock itself and is refused while a loop runs."""

    @model_validator(mode="after")
    def _overrides_fit_the_preset(self) -> LabelParams:
        """The overrides must make valid settings of the preset (checked here, not at the first DFT job)."""
        self.settings()
        return self

    def settings(self) -> DftSettings:
        return preset(self.preset, **self.overrides)


def task_runner(params: LabelParams) -> TaskRunner:
    """The task runner that executes the DFT jobs, chosen by ``params.runner``."""
    if params.runner == "local":
        return ThreadPoolTaskRunner(max_workers=params.workers)
    from prefect_dask import DaskTaskRunner

    if params.runner == "dask":
        return DaskTaskRunner(cluster_kwargs={"n_workers": params.workers, "threads_per_worker": 1, "processes": True})
    return DaskTaskRunner(
        cluster_class="dask_jobqueue.SLURMCluster",
        cluster_kwargs=params.slurm.cluster_kwargs(),
        adapt_kwargs={"minimum_jobs": 0, "maximum_jobs": params.slurm.max_jobs},
    )


class StructureOutcome(BaseModel):
    """What labeling one structure produced (the flow's return value, one per structure)."""

    structure_id: str
    verdict: Literal["labeled", "failed"]
    reason: str | None = None
    k_vrh: float | None = None
    method: str | None = None
    relaxed_id: str | None = None
    missing: list[str] = Field(default_factory=list)


def _failure_text(exc: BaseException, max_attempts: int) -> str:
    failure = as_failure(exc)
    when = f"after {max_attempts} attempts" if failure.transient and max_attempts > 1 else "at once"
    return f"{failure.failure.value} {when}: {failure.message}"


def _property_rows(
    structure_id: str, result: ElasticResult, settings: DftSettings, iteration: int, relax_energy: float, natoms: int
) -> list[dict[str, Any]]:
    """properties rows of one DFT elastic calculation (scalars that exist, plus the tensor with its flags)."""
    common = {
        "structure_id": structure_id,
        "method": settings.method,
        "settings_hash": settings.physics_hash(),
        "flags": list(result.flags),
        "iteration": iteration,
    }
    scalars = {
        name: getattr(result, name) for name in ("k_vrh", "k_voigt", "k_reuss", "g_vrh", "g_voigt", "g_reuss", "eos_k")
    }
    rows = [
        {**common, "name": name, "value": value, "unit": "GPa"} for name, value in scalars.items() if value is not None
    ]
    rows.append({**common, "name": "energy_per_atom", "value": relax_energy / natoms, "unit": "eV/atom"})
    if result.born_stable is not None:
        rows.append({**common, "name": "born_stable", "value": float(result.born_stable), "unit": None})
    tensor = {
        "c_voigt": result.c_voigt,
        "missing": result.missing,
        "residual_stress": result.residual_stress,
        "fit_rmse": result.fit_rmse,
        "min_eigenvalue": result.min_eigenvalue,
        "eos_v0": result.eos_v0,
        "settings": settings.model_dump(mode="json"),
    }
    rows.append(
        {
            **common,
            "name": "elastic_tensor",
            "value": None,
            "value_json": json.dumps(tensor),
            "unit": "GPa",
            "uncertainty": result.fit_rmse,
        }
    )
    return rows


def _record(
    lake: Lake, iteration: int, candidates: list[dict[str, Any]], outcome: StructureOutcome, run_id: str | None
) -> None:
    """Advance every candidate row of this structure (one per target) to the outcome."""
    advance(
        lake,
        [
            {
                "iteration": iteration,
                "structure_id": c["structure_id"],
                "target": c["target"],
                "dft_method": outcome.method,
                "dft_k": outcome.k_vrh,
                "dft_verdict": outcome.verdict,
                "dft_reason": outcome.reason,
                "status": outcome.verdict,
            }
            for c in candidates
        ],
        stage="label",
        run_id=run_id,
    )


@flow(name="label-dft", log_prints=True)
def label_dft(lake_url: str, iteration: int, work: list[dict[str, Any]], params: LabelParams) -> list[StructureOutcome]:
    """Run the DFT jobs of ``work`` (structure_id, atoms, candidates) on this flow's task runner and
    write each structure's results as soon as its strain set is complete."""
    logger = get_run_logger()
    lake = Lake(lake_url)
    run_id = runtime_flow_run.get_id()
    base = params.settings()
    retries = params.max_attempts - 1
    relax_task = in_lake(dft_relax, lake_url).with_options(retries=retries)
    point_task = in_lake(dft_point, lake_url).with_options(retries=retries)

    relax_futures = {
        item["structure_id"]: relax_task.submit(
            lake_url,
            item["structure_id"],
            item["atoms"],
            resolve(base, atoms_from_dict(item["atoms"])),
            params.faults,
            params.max_attempts,
        )
        for item in work
    }
    outcomes: dict[str, StructureOutcome] = {}
    pending: dict[str, tuple[Any, list[Any], dict[str, Any], DftSettings, float]] = {}
    for item in work:
        sid = item["structure_id"]
        try:
            relaxed_info = relax_futures[sid].result()
        except Exception as exc:
            outcomes[sid] = StructureOutcome(
                structure_id=sid, verdict="failed", reason="relax " + _failure_text(exc, params.max_attempts)
            )
            _record(lake, iteration, item["candidates"], outcomes[sid], run_id)
            continue
        relaxed = atoms_from_dict(relaxed_info["atoms"])
        # The strain set uses the settings the relaxation succeeded with, k-mesh fixed on the relaxed cell.
        settings = resolve(DftSettings.model_validate({**relaxed_info["settings"], "kpts": None}), relaxed)
        plan = deformations(relaxed, params.elastic)
        futures = {
            d.label: point_task.submit(
                lake_url,
                sid,
                d.label,
                atoms_to_dict(d.atoms),
                settings,
                params.elastic,
                params.faults,
                params.max_attempts,
            )
            for d in plan
        }
        pending[sid] = (relaxed, plan, futures, settings, relaxed_info["energy"])
        logger.info("%s relaxed in %d steps; %d strain/EOS jobs submitted", sid, relaxed_info["n_steps"], len(plan))

    for item in work:
        sid = item["structure_id"]
        if sid not in pending:
            continue
        relaxed, plan, futures, settings, energy = pending[sid]
        results: dict[str, Any] = {}
        errors: dict[str, str] = {}
        for label, future in futures.items():
            try:
                value = future.result()
                results[label] = (value["stress"], value["energy"])
            except Exception as exc:
                results[label] = None
                errors[label] = _failure_text(exc, params.max_attempts)
        outcomes[sid] = _write_structure(
            lake, iteration, item, relaxed, plan, results, errors, settings, energy, params, run_id
        )
    return [outcomes[item["structure_id"]] for item in work]


def _write_structure(
    lake: Lake,
    iteration: int,
    item: dict[str, Any],
    relaxed: Any,
    plan: list[Any],
    results: dict[str, Any],
    errors: dict[str, str],
    settings: DftSettings,
    energy: float,
    params: LabelParams,
    run_id: str | None,
) -> StructureOutcome:
    """Fit, write structures/properties rows, and advance the candidates of one structure."""
    sid = item["structure_id"]
    result = fit(relaxed, plan, results, params.elastic)
    structure = from_atoms(relaxed)
    row = to_row(structure)
    relaxed_id = row["structure_id"]
    if relaxed_id != sid:
        lake.append(
            "structures",
            [{**row, "source": "dft-relaxed", "source_id": sid, "parent_ids": [sid], "split": split_of(relaxed_id)}],
            run_id=run_id,
        )
    lake.append(
        "properties", _property_rows(relaxed_id, result, settings, iteration, energy, len(relaxed)), run_id=run_id
    )
    if result.missing:
        reason = "missing points (no fit from a partial set): " + "; ".join(
            f"{label}: {errors.get(label, 'no usable result')}" for label in result.missing
        )
        outcome = StructureOutcome(
            structure_id=sid,
            verdict="failed",
            reason=reason,
            method=settings.method,
            relaxed_id=relaxed_id,
            missing=result.missing,
        )
    elif result.k_vrh is None:
        outcome = StructureOutcome(
            structure_id=sid,
            verdict="failed",
            method=settings.method,
            relaxed_id=relaxed_id,
            reason="elastic matrix is singular: no Reuss bound, no K_vrh",
        )
    else:
        outcome = StructureOutcome(
            structure_id=sid,
            verdict="labeled",
            k_vrh=result.k_vrh,
            method=settings.method,
            relaxed_id=relaxed_id,
            reason=", ".join(result.flags) or None,
        )
    _record(lake, iteration, item["candidates"], outcome, run_id)
    return outcome


def _label_with_fam(
    lake: Lake, iteration: int, candidates: list[dict[str, Any]], relaxed: dict[str, Any] | None, run_id: Any
) -> StructureOutcome:
    """Label source ``fam``: the stage-II K becomes the training label of the FAM-relaxed structure."""
    first = candidates[0]
    sid, method = first["structure_id"], f"fam:{first['fam_model']}"
    labeled_id = relaxed["structure_id"] if relaxed else sid
    lake.append_new(  # a rerun after a kill between this write and the candidate's: the label once
        "properties",
        [
            {
                "structure_id": labeled_id,
                "name": "k_vrh",
                "value": first["fam_k"],
                "unit": "GPa",
                "method": method,
                "model_id": first["fam_model"],
                "flags": [LOOP_LABEL_FLAG],
                "iteration": iteration,
            }
        ],
        run_id=run_id,
    )
    outcome = StructureOutcome(
        structure_id=sid,
        verdict="labeled",
        k_vrh=first["fam_k"],
        method=method,
        relaxed_id=labeled_id,
        reason="labeled by the FAM (label source fam)",
    )
    _record(lake, iteration, candidates, outcome, run_id)
    return outcome


def _fam_miss(candidates: list[dict[str, Any]]) -> float:
    """How far the FAM K is from the nearest target it was screened for (labeling order: closest first)."""
    misses = [abs(c["fam_k"] - c["target"]) / c["target"] for c in candidates if c.get("fam_k") is not None]
    return min(misses, default=math.inf)


@flow(name="label", log_prints=True)
def label(params: LabelParams | None = None) -> list[StructureOutcome]:
    """Stage III: label the candidates of ``params.iteration`` that passed the FAM screen (DFT, or the FAM's K).

    Args:
        params: The iteration, the DFT preset and overrides, retries, the runner and its SLURM settings.
    """
    params = params or LabelParams()
    logger = get_run_logger()
    lake = Lake(params.lake_url)
    params.settings()  # fail fast on an unknown preset or a bad override
    with stage_lock(lake, "label", params.loop_run_id):
        by_structure: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for cand in current(lake, params.iteration, status="fam_pass"):
            by_structure[cand["structure_id"]].append(cand)
        ids = sorted(by_structure, key=lambda sid: (_fam_miss(by_structure[sid]), sid))[: params.limit or None]
        if not ids:
            logger.info("iteration %d: no candidates at fam_pass, nothing to label", params.iteration)
            return []
        rows = {
            r["structure_id"]: r
            for r in lake.query("SELECT * FROM structures WHERE list_contains(?, structure_id)", [ids]).to_pylist()
        }
        # DFT starts from the stage-II geometry: near a PBE minimum already, so the DFT relaxation is short.
        rows.update(
            {
                r["parent_ids"][0]: r
                for r in lake.query(
                    "SELECT * FROM structures WHERE source = 'fam-relaxed' AND list_has_any(parent_ids, ?) "
                    "ORDER BY created_at",
                    [ids],
                ).to_pylist()
            }
        )
        run_id = runtime_flow_run.get_id()
        if params.source == "fam":
            return [_label_with_fam(lake, params.iteration, by_structure[sid], rows.get(sid), run_id) for sid in ids]
        work, outcomes = [], []
        for sid in ids:
            if sid not in rows:
                outcome = StructureOutcome(
                    structure_id=sid, verdict="failed", reason="bad_input at once: no structures row for this candidate"
                )
                _record(lake, params.iteration, by_structure[sid], outcome, run_id)
                outcomes.append(outcome)
                continue
            work.append(
                {
                    "structure_id": sid,
                    "atoms": atoms_to_dict(to_atoms(from_row(rows[sid]))),
                    "candidates": by_structure[sid],
                }
            )
        logger.info(
            "iteration %d: labeling %d structures with preset %r on %s",
            params.iteration,
            len(work),
            params.preset,
            params.runner,
        )
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        if work:
            outcomes += label_dft.with_options(task_runner=task_runner(params))(
                lake.url, params.iteration, work, params
            )
        n_ok = sum(o.verdict == "labeled" for o in outcomes)
        logger.info("iteration %d: %d labeled, %d failed", params.iteration, n_ok, len(outcomes) - n_ok)
        return outcomes
