"""What the stages write besides the candidate rows (``storage.candidates``) and the models (``storage.registry``):
stage-I predictions, stage-II FAM results, a structure's DFT results, the FAM loop labels, and the ``jobs`` rows
of the cost ledger (``storage.ledger``).

The flows build no rows: they hand over what their tasks returned, and these functions write it in the
shapes of ``storage.rows``. Writes a cached task's rerun would repeat use ``append_new``, so a rerun
after a kill writes each row once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from pymatgen.core import Structure

from core.costs import Cost
from core.dft import DftSettings
from core.elastic import ElasticResult
from core.failures import FailureClass
from core.labeling import StructureOutcome
from core.provenance import settings_hash
from core.structures import to_row
from storage.lake import Lake
from storage.queries import LOOP_LABEL_FLAG
from storage.registry import ModelRecord
from storage.rows import (
    JobRow,
    Origin,
    PredictionPayload,
    elastic_rows,
    fam_rows,
    job_row,
    prediction_row,
    scalar_row,
    structure_row,
)

if TYPE_CHECKING:
    from core.fam import FamOutcome, FamSettings


def record_predictions(
    lake: Lake, iteration: int, record: ModelRecord, predictions: Mapping[str, Mapping[str, Any]], run_id: Any
) -> None:
    """Stage I: one CGCNN prediction row per structure (``predictions`` as ``tasks.predict.predict`` returns)."""
    origin = Origin(
        method=f"cgcnn@{record.model_id}",
        model_id=record.model_id,
        settings_hash=record.settings_hash,
        iteration=iteration,
    )
    rows = [
        prediction_row(
            sid, origin, p["property"], p[p["property"]], p[f"{p['property']}_std"], PredictionPayload.model_validate(p)
        )
        for sid, p in predictions.items()
    ]
    lake.append_new("properties", rows, run_id=run_id)
    jobs = [
        job_row(
            "gnn",
            f"gnn-{record.model_id}-{sid}",
            "predict",
            {"model_id": record.model_id},
            Cost(**p["cost"]),
            structure_id=sid,
            device=p["device"],
        )
        for sid, p in predictions.items()
    ]
    lake.append_new("jobs", jobs, run_id=run_id)


def record_work(
    lake: Lake,
    stage: Literal["train", "generate"],
    job_id: str,
    calculation: str,
    settings: Mapping[str, Any],
    cost: Mapping[str, float],
    device: str | None,
    iteration: int | None,
    run_id: Any = None,
) -> None:
    """The ``jobs`` row of a model trained or a target sampled (work on many structures, so it names its
    iteration); a cached rerun writes no twin."""
    row = job_row(stage, job_id, calculation, settings, Cost(**cost), iteration=iteration, device=device)
    lake.append_new("jobs", [row], run_id=run_id)


def record_fam_batch(
    lake: Lake,
    iteration: int,
    results: Mapping[str, Mapping[str, Any]],
    outcomes: Mapping[str, FamOutcome],
    model: str,
    settings: FamSettings,
    run_id: Any,
) -> None:
    """Stage II, one batch: a job row per structure, its FAM energy and elastic rows, and each relaxed structure
    (``results`` as ``tasks.fam.fam_batch`` returns, by structure id; ``outcomes`` parsed from them)."""
    chunk = sorted(results)
    job_settings = {"model": model, "settings": settings}
    shash = settings_hash(job_settings)
    jobs = [
        job_row(
            "fam",
            f"fam-{outcomes[sid].model_name}-{sid}-{shash}",
            "relax+elastic",
            job_settings,
            Cost(**results[sid]["cost"]),
            structure_id=sid,
            error_class=outcomes[sid].error_class,
            error=outcomes[sid].error,
            host=results[sid]["host"],
            device=results[sid].get("device"),
        )
        for sid in chunk
    ]
    lake.append_new("jobs", jobs, run_id=run_id)
    properties = [
        row
        for sid in chunk
        for row in fam_rows(
            sid,
            outcomes[sid].model_name,
            outcomes[sid].energy_per_atom,
            outcomes[sid].elastic,
            shash,
            iteration,
        )
    ]
    lake.append_new("properties", properties, run_id=run_id)
    relaxed = [
        structure_row(o.relaxed, "fam-relaxed", f"fam:{o.model_name}", [sid])
        for sid, o in outcomes.items()
        if o.relaxed is not None
    ]
    lake.append_new("structures", relaxed, run_id=run_id)


def lost_attempt(running: Mapping[str, Any], failure: FailureClass, *, retrying: bool) -> JobRow:
    """The row that closes an attempt whose process died while it was ``running``, with the class and a message
    naming the host it died on: ``retrying`` when the job gets another attempt, else ``failed``."""
    fields = {k: running[k] for k in JobRow.model_fields if k in running and k not in ("state", "error_message")}
    return JobRow(
        **fields | {"error_class": failure},
        state="retrying" if retrying else "failed",
        error_message=f"{failure}: the process running attempt {running['attempt']} on {running['host']} died "
        "before it finished (cancelled, killed or its node lost)",
    )


def close_lost_jobs(lake: Lake, lost_class: Callable[[str | None], FailureClass], run_id: Any) -> int:
    """Close every DFT attempt still ``running`` as failed (``lost_class`` says why from its host): called by a
    label run under the lake's label lock, when no other DFT job of this lake can be alive, so these are the jobs
    of a run that was killed; their task runs never resume (a rerun starts new ones, the cache keeping what
    completed). Returns how many were closed."""
    running = lake.query("SELECT * FROM jobs WHERE stage = 'dft' AND state = 'running'").to_pylist()
    rows = [lost_attempt(r, lost_class(r["host"]), retrying=False).row() for r in running]
    lake.append("jobs", rows, run_id=run_id)
    return len(rows)


def record_dft_results(
    lake: Lake,
    iteration: int,
    structure_id: str,
    relaxed: Structure,
    energy: float,
    settings: DftSettings,
    result: ElasticResult,
    run_id: Any,
) -> str:
    """Write the DFT-relaxed structure (when relaxing changed its id), its energy per atom and its elastic
    rows; returns the relaxed structure's id, the one the labels are on."""
    relaxed_row = to_row(relaxed)
    relaxed_id = relaxed_row["structure_id"]
    if relaxed_id != structure_id:
        lake.append(
            "structures", [structure_row(relaxed_row, "dft-relaxed", structure_id, [structure_id])], run_id=run_id
        )
    origin = Origin(
        method=settings.method, settings_hash=settings.physics_hash(), iteration=iteration, flags=tuple(result.flags)
    )
    rows = [scalar_row(relaxed_id, origin, "energy_per_atom", energy / len(relaxed), "eV/atom")]
    rows += elastic_rows(relaxed_id, origin, result, settings=settings.model_dump(mode="json"))
    lake.append("properties", rows, run_id=run_id)
    return relaxed_id


def record_fam_label(
    lake: Lake, iteration: int, outcome: StructureOutcome, fam_model: str, fam_k: float, run_id: Any
) -> None:
    """Write the stage-II K of a FAM-relaxed structure as its training label (flagged ``loop_label``).

    ``append_new``: a rerun after a kill between this write and the candidate's writes the label once.
    """
    origin = Origin(method=outcome.method, model_id=fam_model, iteration=iteration, flags=(LOOP_LABEL_FLAG,))
    lake.append_new("properties", [scalar_row(outcome.relaxed_id, origin, "k_vrh", fam_k, "GPa")], run_id=run_id)
