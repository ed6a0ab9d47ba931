"""The ``generate`` flow: conditional generation of candidates for each target K_vrh.

For every target it samples ``n_kept * samples_per_kept`` crystals with the registered generator,
keeps the ``n_kept`` valid, distinct ones whose property-head score is closest to the target, and
writes them to ``structures`` (source "generated") and ``candidates`` (status "generated").
Targets that already have candidates in the iteration are skipped, so a rerun resumes and never
undoes later stages. A Prefect table artifact summarizes the batch.
"""

from __future__ import annotations

from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.targets import DesignText, parse_design
from flows.locking import stage_lock
from storage import Lake
from storage.candidates import current, record_generated
from storage.records import record_work
from tasks.common import in_lake
from tasks.generate import load_registered_generator, sample_candidates

DEFAULT_TARGETS = (60.0, 100.0, 200.0, 250.0, 300.0, 350.0, 400.0)

TargetK = Annotated[float, Field(gt=0, allow_inf_nan=False)]
"""A target K_vrh in GPa: a finite, positive number."""
Targets = Annotated[list[TargetK], Field(min_length=1)]
"""One or more target K_vrh values."""


class GenerateSettings(BaseModel):
    """How candidates are drawn and ranked: the generate stage's settings, in this flow's form and in the loop's."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    seed: int = 0
    """Sampling seed (each target derives its own from it; the loop adds the iteration)."""
    ranker: str = "head"
    """What ranks samples for keep-best: "head" (the generator's property head) or a CGCNN checkpoint path."""
    grader: str | None = None
    """Path of a frozen CGCNN checkpoint that grades every raw sample (recorded in ``generations``)."""


class GenerateParams(GenerateSettings):
    """Parameters of the generate flow (rendered as a form in the Prefect UI): the settings, targets and counts."""

    lake_url: str = ""
    """Lake root, a path or an fsspec URL; empty: $MATLOOP_LAKE, else ./lake."""
    iteration: int = Field(0, ge=0)
    """Active-learning iteration the candidates belong to."""
    targets: Targets = list(DEFAULT_TARGETS)
    """Target K_vrh values, GPa."""
    samples_per_kept: int = Field(500, ge=1)
    """Samples drawn per kept candidate (keep the best 1/N by property-head score)."""
    n_kept: int = Field(10, ge=1)
    """Candidates kept per target."""
    model_id: str | None = None
    """Generator model id; None = the latest registered generator."""
    design: DesignText = ""
    """A design target instead of the K targets, e.g. "k_vrh in [330, 370] and g_vrh/k_vrh <= 0.57" (the
    generator is asked for the centre of its K window, and of a two-sided G or G/K window where the generator is
    conditioned on G too; every stage checks each condition); empty: none."""
    loop_run_id: str = ""
    """Flow-run id of the active-learning run this stage belongs to (it shares that run's lake lock); empty:
    a run of its own, which takes the lake's loop lock itself and is refused while a loop runs."""

    @model_validator(mode="after")
    def _design_sets_the_target(self) -> GenerateParams:
        """A design's generator condition is the one target."""
        if self.design:
            self.targets = [parse_design(self.design).generator_k]
        return self


def _design_conditions(design: str, properties: list[str], logger: Any) -> dict[str, float] | None:
    """What a design asks the generator for beyond K, limited to what it is conditioned on (None: K alone)."""
    if not design:
        return None
    asked = parse_design(design).generator_conditions
    fed = {name: value for name, value in asked.items() if name in properties}
    for name in sorted(set(asked) - set(fed)):
        logger.info(
            "the design asks for %s = %.0f GPa; generator conditioned on %s only: the screens check it",
            name,
            asked[name],
            ", ".join(properties),
        )
    return fed if len(fed) > 1 else None


@flow(name="generate", log_prints=True)
def generate(params: GenerateParams | None = None) -> dict[str, Any]:
    """Generate and record candidates; returns the model id and per-target statistics.

    Args:
        params: Targets, how many candidates to keep per target and how many samples to draw for each.
    """
    params = params or GenerateParams()
    lake = Lake(params.lake_url)
    with stage_lock(lake, "generate", params.loop_run_id):
        logger = get_run_logger()
        lake_url = lake.url
        model_id, generator = load_registered_generator(lake_url, params.model_id)
        conditions = _design_conditions(params.design, generator.config_dict.get("properties", ["k_vrh"]), logger)
        done = {row["target"] for row in current(lake, params.iteration)}
        run_id = str(flow_run.get_id() or "") or None
        summary: list[dict[str, Any]] = []
        for target in params.targets:
            if float(target) in done:
                logger.info("iteration %d already has candidates for %.0f GPa; skipping", params.iteration, target)
                summary.append({"target": target, "n_sampled": 0, "n_kept": 0, "note": "already generated"})
                continue
            result = in_lake(sample_candidates, lake_url)(
                lake_url,
                model_id,
                float(target),
                params.n_kept,
                params.samples_per_kept,
                params.seed,
                params.grader,
                params.ranker,
                conditions,
            )
            stats = result["stats"]
            record_work(
                lake,
                "generate",
                f"generate-{params.iteration}-{float(target):g}-{model_id}-{params.seed}",
                "sample",
                {"n_kept": params.n_kept, "samples_per_kept": params.samples_per_kept, "ranker": params.ranker},
                result["cost"],
                result["device"],
                params.iteration,
                run_id,
            )  # before the candidates: a rerun after a kill between the two writes no twin and loses no cost
            written = record_generated(
                lake, params.iteration, model_id, float(target), result["kept"], run_id, stats, params.design or None
            )
            summary.append(
                {
                    "target": target,
                    "n_sampled": stats["n_sampled"],
                    "n_kept": written,
                    "validity": round(stats["validity"], 3),
                    "head_mape_kept": round(stats["mape_head_kept"], 3),
                    "head_mape_all": round(stats["mape_head_raw"], 3),
                    "grader_mape_all": round(stats["mape_grader_raw"], 3) if "mape_grader_raw" in stats else None,
                    "head_g_mape_kept": round(stats["mape_head_g_kept"], 3) if "mape_head_g_kept" in stats else None,
                    "note": "",
                }
            )
        create_table_artifact(
            table=summary,
            key=f"generate-iteration-{params.iteration}",
            description=(
                f"Generated candidates, iteration {params.iteration}, generator {model_id}: samples drawn, kept "
                f"(valid, distinct, closest by property head), validity of all samples, and the property head's "
                f"MAPE to the target (kept / all samples; G: to the G a design asked for, kept)."
            ),
        )
        return {"model_id": model_id, "iteration": params.iteration, "targets": summary}
