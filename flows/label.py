"""The ``label`` flow (stage III): the candidates that passed the FAM screen, ``fam_pass`` -> ``labeled`` | ``failed``.

Select the survivors from the lake, let ``core.acquisition`` choose which to label, then label them by the FAM's K
or by DFT: the ``label-dft`` subflow (``flows.label_dft``) on the task runner ``deployments.runners`` picks
(threads, a local Dask cluster, SLURM jobs). Only candidates still at ``fam_pass`` are read, so a rerun picks up
exactly the structures without a terminal state, and the task cache makes finished jobs free.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run as runtime_flow_run
from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.acquisition import AcquisitionSettings, choose
from core.dft import PRESETS, DftSettings, cannot_compute
from core.dft import PresetName as DftPreset
from core.elastic import ElasticSettings
from core.failures import FaultInjection, lost_class
from core.labeling import StructureOutcome, failed_outcome, fam_label_outcome
from core.settings import SlurmOptions
from core.structures import from_row, to_atoms
from deployments.runners import Runner, task_runner
from flows.label_dft import label_dft
from flows.locking import stage_lock
from storage import Lake
from storage.candidates import Status, current, record_acquisition, record_label
from storage.queries import dft_hours_estimate, label_inputs
from storage.records import close_lost_jobs, record_fam_label
from tasks.dft import atoms_to_dict


class LabelSettings(BaseModel):
    """How survivors are labeled: DFT preset, strains, retries and where the jobs run; in this flow's form and
    in the loop's."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

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
    runner: Runner = "local"
    """local: threads in this process; dask: a local Dask cluster of processes; slurm: SLURM jobs via Dask."""
    workers: int = Field(1, ge=1)
    """Threads (local) or worker processes (dask) running DFT jobs at once."""
    slurm: SlurmOptions = Field(default_factory=SlurmOptions)
    """SLURM job settings of the slurm runner (defaults from the hpc pool's MATLOOP_SLURM_* variables)."""
    limit: int = Field(0, ge=0)
    """Label at most this many structures in this run (0: all), best by the acquisition policy first (the rest
    stay fam_pass for a later run)."""
    acquisition: AcquisitionSettings = Field(default_factory=AcquisitionSettings)
    """Which survivors are labeled first (closest to target, most uncertain, expected improvement) and the DFT
    budget in CPU-hours."""

    @model_validator(mode="after")
    def _overrides_fit_the_preset(self) -> LabelSettings:
        """The overrides must make valid settings of the preset (checked here, not at the first DFT job)."""
        self.settings()
        return self

    def settings(self) -> DftSettings:
        return PRESETS.resolve(self.preset, self.overrides)


class LabelParams(LabelSettings):
    """Parameters of the label flow (rendered as a form in the Prefect UI): the settings and what to label."""

    iteration: int = Field(0, ge=0)
    """Iteration whose fam_pass candidates are labeled."""
    lake_url: str = ""
    """Lake root, a path or an fsspec URL; empty: $MATLOOP_LAKE, else ./lake."""
    source: Literal["dft", "fam"] = "dft"
    """dft: label by DFT (the reference work). fam: promote the stage-II FAM K of each survivor to its
    label (rows marked fam:<model> and loop_label): cheap enough for many iterations on a laptop."""
    loop_run_id: str = ""
    """Flow-run id of the active-learning run this stage belongs to (it shares that run's lake lock); empty:
    a run of its own, which takes the lake's loop lock itself and is refused while a loop runs."""


def _refusal(settings: DftSettings, row: dict[str, Any] | None) -> str | None:
    """Why a chosen structure cannot be labeled by DFT at all, said before any job runs (and spends anything)."""
    if row is None:
        return "no structures row for this candidate"
    return cannot_compute(settings, row["species"])


def _label_with_fam(
    lake: Lake, iteration: int, candidates: list[dict[str, Any]], relaxed: dict[str, Any] | None, run_id: Any
) -> StructureOutcome:
    """Label source ``fam``: the stage-II K becomes the training label of the FAM-relaxed structure."""
    first = candidates[0]
    outcome = fam_label_outcome(
        first["structure_id"],
        relaxed["structure_id"] if relaxed else first["structure_id"],
        first["fam_model"],
        first["fam_k"],
    )
    record_fam_label(lake, iteration, outcome, first["fam_model"], first["fam_k"], run_id)
    record_label(lake, iteration, candidates, outcome, run_id)
    return outcome


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
        run_id = runtime_flow_run.get_id()
        if closed := close_lost_jobs(lake, lost_class, run_id):
            logger.warning("%d DFT attempts left running by a killed run recorded as lost", closed)
        by_structure: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for cand in current(lake, params.iteration, status=Status.FAM_PASS):
            by_structure[cand["structure_id"]].append(cand)
        if not by_structure:
            logger.info("iteration %d: no candidates at fam_pass, nothing to label", params.iteration)
            return []
        generated, relaxed = label_inputs(lake, list(by_structure))
        priced = dft_hours_estimate(lake, generated | relaxed) if params.acquisition.budget_cpu_hours else None
        choices = choose(by_structure, params.acquisition, params.limit, priced)
        record_acquisition(lake, params.iteration, by_structure, choices, params.acquisition.policy, run_id)
        ids = [c.structure_id for c in choices if c.chosen]
        logger.info(
            "iteration %d: %d of %d survivors chosen by %s%s",
            params.iteration,
            len(ids),
            len(choices),
            params.acquisition.policy,
            f" within {params.acquisition.budget_cpu_hours:g} CPU-hours" if params.acquisition.budget_cpu_hours else "",
        )
        if params.source == "fam":
            return [_label_with_fam(lake, params.iteration, by_structure[sid], relaxed.get(sid), run_id) for sid in ids]
        # DFT starts from the stage-II geometry: near a PBE minimum already, so the DFT relaxation is short.
        rows = generated | relaxed
        settings = params.settings()
        refused = {sid: _refusal(settings, rows.get(sid)) for sid in ids}
        outcomes = [failed_outcome(sid, f"bad_input at once: {why}") for sid, why in refused.items() if why]
        for outcome in outcomes:
            record_label(lake, params.iteration, by_structure[outcome.structure_id], outcome, run_id)
        work = [
            {
                "structure_id": sid,
                "atoms": atoms_to_dict(to_atoms(from_row(rows[sid]))),
                "candidates": by_structure[sid],
            }
            for sid in ids
            if not refused[sid]
        ]
        logger.info(
            "iteration %d: labeling %d structures with preset %r on %s",
            params.iteration,
            len(work),
            params.preset,
            params.runner,
        )
        if work:
            runner = task_runner(params.runner, params.workers, params.slurm)
            outcomes += label_dft.with_options(task_runner=runner)(
                lake.url, params.iteration, work, params.settings(), params.elastic, params.faults, params.max_attempts
            )
        n_ok = sum(o.verdict == "labeled" for o in outcomes)
        logger.info("iteration %d: %d labeled, %d failed", params.iteration, n_ok, len(outcomes) - n_ok)
        return outcomes
