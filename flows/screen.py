"""The ``screen`` flow: stage I (CGCNN) and stage II (foundation atomic model) for one iteration.

Each stage has the same shape: select the candidates waiting for it (``storage.candidates.current``), call
its cached task (``tasks.predict.predict``, ``tasks.fam.fam_batch``), let ``core.screening`` decide, and
record through ``storage`` (``properties``, ``jobs``, ``structures`` and the candidates' new rows). Stage I
moves ``generated -> gnn_pass | rejected``; stage II ``gnn_pass -> fam_pass | rejected``. A stage touches
only candidates still waiting for it, so a rerun resumes where a crashed run stopped, and the cached tasks
make the finished work free.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from core.fam import FAM_NAMES, FamSettings
from core.hull import chemical_system, e_above_hull
from core.targets import design_of
from flows.locking import stage_lock
from storage import Lake
from storage.candidates import Status, advance, current
from storage.queries import dedup_references, known_phases, structure_rows
from storage.records import record_fam_batch, record_predictions
from storage.registry import ModelRecord
from tasks.common import in_lake, run_logger

Stage = Literal["gnn", "fam"]


def fam_name(name: str) -> str:
    """A FAM name (``core.fam.FAM_NAMES``) or a MACE model file's path (it may exist only on the worker)."""
    if name in FAM_NAMES or name.endswith(".model") or "/" in name or Path(name).expanduser().is_file():
        return name
    raise ValueError(f"unknown FAM {name!r}: use one of {', '.join(FAM_NAMES)} or a path to a MACE model file")


FamName = Annotated[str, AfterValidator(fam_name)]
"""A foundation atomic model: a known name or a MACE model file."""


class ScreenSettings(BaseModel):
    """Tolerances and models of stages I and II, in this flow's form and in the loop's."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    gnn_tolerance: float = Field(0.30, gt=0)
    """Stage I keeps candidates whose predicted K_vrh is within this fraction of the target."""
    fam_tolerance: float = Field(0.20, gt=0)
    """Stage II keeps Born-stable candidates whose FAM K_vrh is within this fraction of the target."""
    fam_model: FamName = "auto"
    """auto (MACE-MP-0 if available, else SevenNet-0), mace-mp-0, sevennet-0, sevennet-l3i5, or a MACE model file."""
    fam_settings: FamSettings = Field(default_factory=FamSettings)
    """Relaxation, structure matching (StructureMatcher ltol/stol/angle_tol) and elastic settings of stage II."""
    fam_batch_size: int = Field(16, ge=1)
    """Structures per stage-II task (one cached unit of work)."""
    fam_shear: bool = False
    """Let the FAM's G decide a design's G and G/K conditions at stage II. Off: the offline FAMs' shear is about
    20 GPa too soft (benchmarks/fam.py), so those conditions wait for stage I's shear predictor and the label;
    turn it on for a FAM whose G you have checked against DFT."""


class ScreenParams(ScreenSettings):
    """Parameters of the screen flow (rendered as a form in the Prefect UI): the settings and what to screen."""

    iteration: int = Field(0, ge=0)
    """Active-learning iteration whose candidates are screened."""
    lake_url: str = ""
    """Lake root, a path or an fsspec URL; empty: $MATLOOP_LAKE, else ./lake."""
    stages: list[Stage] = Field(["gnn", "fam"], min_length=1)
    """Stages to run, in funnel order."""
    gnn_model_id: str | None = None
    """CGCNN model id; None = the latest registered predictor."""
    loop_run_id: str = ""
    """Flow-run id of the active-learning run this stage belongs to (it shares that run's lake lock); empty:
    a run of its own, which takes the lake's loop lock itself and is refused while a loop runs."""

    @field_validator("stages")
    @classmethod
    def _funnel_order(cls, stages: list[Stage]) -> list[Stage]:
        """Each stage once, in funnel order (stage II screens what stage I passed)."""
        if stages != sorted(set(stages), key=["gnn", "fam"].index):
            raise ValueError(f"stages must be distinct and in funnel order (gnn, fam), got {stages}")
        return stages


@flow(name="screen", log_prints=True)
def screen(params: ScreenParams | None = None) -> dict[str, Any]:
    """Run the requested stages for one iteration; returns each stage's counts keyed by stage name.

    Args:
        params: The iteration, the stages to run (gnn, fam) and each stage's tolerance and model.
    """
    params = params or ScreenParams()
    lake = Lake(params.lake_url)
    with stage_lock(lake, "screen", params.loop_run_id):
        logger = get_run_logger()
        lake_url = lake.url
        summary: dict[str, Any] = {}
        if "gnn" in params.stages:
            summary["gnn"] = screen_gnn(lake_url, params.iteration, params.gnn_tolerance, params.gnn_model_id)
        if "fam" in params.stages:
            summary["fam"] = screen_fam(
                lake_url,
                params.iteration,
                params.fam_tolerance,
                params.fam_model,
                params.fam_settings,
                params.fam_batch_size,
                params.fam_shear,
            )
        create_table_artifact(
            key=f"screen-iteration-{params.iteration}",
            table=[
                {"stage": stage, **{k: v for k, v in counts.items() if not isinstance(v, dict)}}
                for stage, counts in summary.items()
            ],
            description=f"Screen funnel, iteration {params.iteration}",
        )
        logger.info("screen iteration %d: %s", params.iteration, summary)
        return summary


def _run_id() -> str | None:
    run = flow_run.get_id()
    return str(run) if run else None


def screen_gnn(lake_url: str, iteration: int, tolerance: float = 0.30, model_id: str | None = None) -> dict:
    """Stage I for one iteration: predict, filter, deduplicate, record. Returns counts per outcome.

    ``model_id`` None uses the latest registered CGCNN. Returns ``{"iteration", "model_id",
    "screened", "passed", "rejected", "single_element", "off_target", "duplicate_known",
    "duplicate_batch"}``.
    """
    # stage I pulls in the predictor stack: loaded only when it runs
    from core.screening import GNN_OUTCOMES, gnn_verdicts
    from storage.registry import PREDICTOR_KIND, resolve_model

    if tolerance <= 0:
        raise ValueError(f"tolerance must be positive, got {tolerance}")
    logger = run_logger()
    lake = Lake(lake_url)
    record = resolve_model(lake, PREDICTOR_KIND, model_id)
    todo = current(lake, iteration, status=Status.GENERATED)
    counts: dict[str, Any] = {"iteration": iteration, "model_id": record.model_id, "screened": len(todo)}
    counts.update(dict.fromkeys(("rejected", *GNN_OUTCOMES), 0))
    if not todo:
        logger.info("iteration %d: no generated candidates to screen", iteration)
        return counts

    ids = sorted({c["structure_id"] for c in todo})
    rows = {r["structure_id"]: r for r in structure_rows(lake, ids)}
    logger.info("iteration %d: predicting K for %d structures (%d candidates)", iteration, len(ids), len(todo))
    run_id = _run_id()
    predictions = _predictions(lake, iteration, record, ids, run_id)
    shear = _shear_predictions(lake, iteration, [c for c in todo if design_of(c).asks_for_g], run_id)
    known = dedup_references(lake, ids, sorted({r["reduced_formula"] for r in rows.values()}), iteration)
    decided = gnn_verdicts(todo, rows, predictions, known, tolerance, record.model_id, shear)
    advance(lake, [update for update, _ in decided], stage="gnn", run_id=run_id)
    tally = Counter(outcome for _, outcome in decided)
    counts.update(tally)
    counts["rejected"] = len(decided) - tally["passed"]
    logger.info("iteration %d stage I: %s", iteration, counts)
    return counts


def _predictions(
    lake: Lake, iteration: int, record: ModelRecord, structure_ids: list[str], run_id: str | None
) -> dict[str, dict[str, Any]]:
    """The registered CGCNN ensemble ``record``'s prediction per structure (cached task), recorded as properties
    and ``gnn`` jobs: K from the predictor, G from the shear predictor."""
    from tasks.predict import predict

    task = in_lake(predict, lake.url)
    predictions = {p["structure_id"]: p for p in task(lake.url, record.model_id, structure_ids, record.kind)}
    record_predictions(lake, iteration, record, predictions, run_id)
    return predictions


def _shear_predictions(
    lake: Lake, iteration: int, candidates: list[dict[str, Any]], run_id: str | None
) -> dict[str, dict[str, Any]] | None:
    """The shear predictor's G per structure of these candidates, where one is registered; None (the G conditions
    stay unknown at stage I) where none is or no candidate's design asks for G."""
    from storage.registry import SHEAR_PREDICTOR_KIND, ModelNotFoundError, resolve_model

    if not candidates:
        return None
    try:
        record = resolve_model(lake, SHEAR_PREDICTOR_KIND)
    except ModelNotFoundError:
        run_logger().info("no shear predictor registered: the designs' G conditions stay unknown at stage I")
        return None
    return _predictions(lake, iteration, record, sorted({c["structure_id"] for c in candidates}), run_id)


def needs_hull(candidates: list[dict[str, Any]]) -> bool:
    """Whether any candidate's design has a condition on ``e_above_hull`` (only then is a hull built)."""
    return any(c.get("design") and "e_above_hull" in design_of(c).properties for c in candidates)


def hull_distances(
    lake: Lake,
    outcomes: dict[str, Any],
    model: str,
    settings: FamSettings,
    hulls: dict[tuple[str, ...], list[tuple[str, float]]],
) -> dict[str, float]:
    """eV/atom above its system's FAM hull of each relaxed outcome; ``hulls`` keeps each system's references
    for the rest of the stage (``tasks.fam.fam_references``, cached)."""
    from tasks.fam import fam_references, structure_input

    task = in_lake(fam_references, lake.url)
    out = {}
    for sid, o in outcomes.items():
        if o.relaxed is None or o.energy_per_atom is None:
            continue
        formula = o.relaxed["reduced_formula"]
        system = chemical_system(formula)
        if system not in hulls:
            known = [structure_input(r) for r in known_phases(lake, system)]
            refs = task(list(system), known, model, settings)
            hulls[system] = [(r["formula"], r["energy_per_atom"]) for r in refs]
        try:
            out[sid] = e_above_hull(formula, o.energy_per_atom, hulls[system])
        except ValueError as exc:  # an element whose every prototype failed to relax: the condition stays unknown
            run_logger().warning("%s: no e_above_hull: %s", sid, exc)
    return out


def screen_fam(
    lake_url: str,
    iteration: int,
    tolerance: float = 0.20,
    model: str = "auto",
    settings: FamSettings | None = None,
    batch_size: int = 16,
    fam_shear: bool = False,
) -> dict[str, Any]:
    """Stage II for one iteration: ``gnn_pass`` -> ``fam_pass`` | ``rejected``. Returns counts. ``fam_shear`` lets
    the FAM's G decide G and G/K conditions (``ScreenSettings.fam_shear``).

    Each distinct structure is computed once, in deterministic batches (so reruns hit the cache), and every
    batch is recorded before the next starts. Returns ``{"iteration", "model", "screened", "passed",
    "rejected", "errors", "reasons"}``.
    """
    from core.fam import FamOutcome
    from core.screening import fam_verdicts
    from tasks.fam import fam_batch, resolve_model, structure_input

    if tolerance <= 0 or batch_size < 1:
        raise ValueError("tolerance must be positive and batch_size at least 1")
    settings = settings or FamSettings()
    logger = run_logger()
    lake = Lake(lake_url)
    todo = current(lake, iteration, status=Status.GNN_PASS)
    model = resolve_model(model)
    counts: dict[str, Any] = {"iteration": iteration, "model": model, "screened": len(todo)}
    counts |= {"passed": 0, "rejected": 0, "errors": 0, "reasons": {}}
    if not todo:
        logger.info("iteration %d: no %s candidates for stage II", iteration, Status.GNN_PASS)
        return counts
    ids = sorted({c["structure_id"] for c in todo})
    rows = {r["structure_id"]: r for r in structure_rows(lake, ids)}  # raises LookupError naming missing ids
    run_id = _run_id()
    task = in_lake(fam_batch, lake_url)
    hulls: dict[tuple[str, ...], list[tuple[str, float]]] | None = {} if needs_hull(todo) else None
    reasons: Counter[str] = Counter()
    logger.info(
        "iteration %d stage II: %d structures (%d candidates) with %s in batches of %d",
        iteration,
        len(ids),
        len(todo),
        model,
        batch_size,
    )
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        results = {r["structure_id"]: r for r in task([structure_input(rows[s]) for s in chunk], model, settings)}
        outcomes = {sid: FamOutcome.model_validate(r["outcome"]) for sid, r in results.items()}
        record_fam_batch(lake, iteration, results, outcomes, model, settings, run_id)
        distances = hull_distances(lake, outcomes, model, settings, hulls) if hulls is not None else {}
        decided = fam_verdicts(todo, outcomes, tolerance, distances, fam_shear)
        for update, reason in decided:
            counts[{"pass": "passed", "reject": "rejected", "error": "errors"}[update["fam_verdict"]]] += 1
            reasons[reason] += 1
        advance(lake, [update for update, _ in decided], stage="fam", run_id=run_id)
        logger.info(
            "stage II: %d/%d structures done (%d passed so far)",
            min(start + batch_size, len(ids)),
            len(ids),
            counts["passed"],
        )
    counts["reasons"] = dict(reasons)
    logger.info("iteration %d stage II: %s", iteration, counts)
    return counts
