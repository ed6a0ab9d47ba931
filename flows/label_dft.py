"""The ``label-dft`` subflow of stage III: DFT relaxation, then one job per strain and EOS point, per structure.

``flows.label`` chooses the structures and the task runner; this subflow fans the jobs out on that runner
(threads, a local Dask cluster, SLURM jobs): every relaxation first, then the strain sets of all relaxed cells
side by side. ``core.elastic`` fits each complete set, ``core.labeling`` decides the outcome (no fit from a
partial strain set) and ``storage`` writes the DFT rows and advances the candidates as each set completes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run as runtime_flow_run

from core.dft import DftSettings, resolve
from core.elastic import Deformation, ElasticResult, ElasticSettings, deformations, fit
from core.failures import FaultInjection
from core.labeling import StructureOutcome, dft_outcome, failed_outcome, failure_text
from core.structures import from_atoms
from storage import Lake
from storage.candidates import record_label
from storage.records import record_dft_results
from tasks.common import in_lake
from tasks.dft import atoms_from_dict, atoms_to_dict, dft_point, dft_relax


@dataclass
class DftJobs:
    """What every DFT job of one run shares: the lake, the cached tasks with their retries, and the settings."""

    lake_url: str
    base: DftSettings
    elastic: ElasticSettings
    faults: FaultInjection
    max_attempts: int
    relax_task: Any = field(init=False)
    point_task: Any = field(init=False)

    def __post_init__(self) -> None:
        self.relax_task = in_lake(dft_relax, self.lake_url).with_options(retries=self.max_attempts - 1)
        self.point_task = in_lake(dft_point, self.lake_url).with_options(retries=self.max_attempts - 1)

    def relax(self, sid: str, atoms: dict[str, Any]) -> Any:
        """Submit one structure's relaxation, with the base settings resolved on its cell (k-mesh, spin)."""
        return self.relax_task.submit(
            self.lake_url, sid, atoms, resolve(self.base, atoms_from_dict(atoms)), self.faults, self.max_attempts
        )


@dataclass
class StrainSet:
    """One structure's DFT work in flight: its relaxed cell, the strain/EOS plan and one future per point."""

    relaxed: Any
    plan: list[Deformation]
    settings: DftSettings
    energy: float
    futures: dict[str, Any]

    @classmethod
    def submit(cls, jobs: DftJobs, sid: str, relaxed_info: dict[str, Any]) -> StrainSet:
        """One job per point of the relaxed cell, with the settings the relaxation succeeded with (k-mesh fixed
        on the relaxed cell)."""
        relaxed = atoms_from_dict(relaxed_info["atoms"])
        settings = resolve(DftSettings.model_validate({**relaxed_info["settings"], "kpts": None}), relaxed)
        plan = deformations(relaxed, jobs.elastic)
        futures = {
            d.label: jobs.point_task.submit(
                jobs.lake_url,
                sid,
                d.label,
                atoms_to_dict(d.atoms),
                settings,
                jobs.elastic,
                jobs.faults,
                jobs.max_attempts,
            )
            for d in plan
        }
        return cls(relaxed, plan, settings, relaxed_info["energy"], futures)

    def collect(self, elastic: ElasticSettings, max_attempts: int) -> tuple[ElasticResult, dict[str, str]]:
        """Wait for every point; the tensor fitted from the complete set, and the error of each point that failed."""
        results: dict[str, Any] = {}
        errors: dict[str, str] = {}
        for point, future in self.futures.items():
            try:
                value = future.result()
                results[point] = (value["stress"], value["energy"])
            except Exception as exc:
                results[point], errors[point] = None, failure_text(exc, max_attempts)
        return fit(self.relaxed, self.plan, results, elastic), errors


@flow(name="label-dft", log_prints=True)
def label_dft(
    lake_url: str,
    iteration: int,
    work: list[dict[str, Any]],
    settings: DftSettings,
    elastic: ElasticSettings,
    faults: FaultInjection,
    max_attempts: int,
) -> list[StructureOutcome]:
    """Run the DFT jobs of ``work`` (structure_id, atoms, candidates) on this flow's task runner and write each
    structure's results as soon as its strain set is complete."""
    logger = get_run_logger()
    lake, run_id = Lake(lake_url), runtime_flow_run.get_id()
    jobs = DftJobs(lake_url, settings, elastic, faults, max_attempts)
    relaxing = {item["structure_id"]: jobs.relax(item["structure_id"], item["atoms"]) for item in work}
    outcomes: dict[str, StructureOutcome] = {}
    in_flight: dict[str, StrainSet] = {}
    for item in work:  # every relaxation first, so the strain sets of all structures run side by side
        sid = item["structure_id"]
        try:
            relaxed_info = relaxing[sid].result()
        except Exception as exc:
            outcomes[sid] = failed_outcome(sid, "relax " + failure_text(exc, max_attempts))
            record_label(lake, iteration, item["candidates"], outcomes[sid], run_id)
            continue
        in_flight[sid] = StrainSet.submit(jobs, sid, relaxed_info)
        logger.info(
            "%s relaxed in %d steps; %d strain/EOS jobs submitted",
            sid,
            relaxed_info["n_steps"],
            len(in_flight[sid].plan),
        )
    for item in work:
        sid = item["structure_id"]
        if strain_set := in_flight.get(sid):
            result, errors = strain_set.collect(elastic, max_attempts)
            relaxed_id = record_dft_results(
                lake,
                iteration,
                sid,
                from_atoms(strain_set.relaxed),
                strain_set.energy,
                strain_set.settings,
                result,
                run_id,
            )
            outcomes[sid] = dft_outcome(sid, relaxed_id, strain_set.settings.method, result, errors)
            record_label(lake, iteration, item["candidates"], outcomes[sid], run_id)
    return [outcomes[item["structure_id"]] for item in work]
