"""The ``screen`` flow: stage I (CGCNN) and stage II (foundation atomic model) for one iteration.

Stage I moves candidates ``generated -> gnn_pass | rejected``; stage II moves ``gnn_pass ->
fam_pass | rejected``. Each stage touches only candidates still waiting for it, so a rerun
resumes where a crashed run stopped, and stage II's compute is cached per batch of structures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from core.fam import FAM_NAMES, FamSettings
from flows.locking import stage_lock
from storage import Lake

Stage = Literal["gnn", "fam"]


def fam_name(name: str) -> str:
    """A FAM name (auto, mace-mp-0, sevennet-0) or a MACE model file's path (it may exist only on the worker)."""
    if name in FAM_NAMES or name.endswith(".model") or "/" in name or Path(name).expanduser().is_file():
        return name
    raise ValueError(f"unknown FAM {name!r}: use one of {', '.join(FAM_NAMES)} or a path to a MACE model file")


FamName = Annotated[str, AfterValidator(fam_name)]
"""A foundation atomic model: a known name or a MACE model file."""


class ScreenParams(BaseModel):
    """Parameters of the screen flow (rendered as a form in the Prefect UI)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    iteration: int = Field(0, ge=0)
    """Active-learning iteration whose candidates are screened."""
    lake_url: str = ""
    """Lake root, a path or an fsspec URL; empty: $MATLOOP_LAKE, else ./lake."""
    stages: list[Stage] = Field(["gnn", "fam"], min_length=1)
    """Stages to run, in funnel order."""
    gnn_tolerance: float = Field(0.30, gt=0)
    """Stage I keeps candidates whose predicted K_vrh is within this fraction of the target."""
    gnn_model_id: str | None = None
    """CGCNN model id; None = the latest registered predictor."""
    fam_tolerance: float = Field(0.20, gt=0)
    """Stage II keeps Born-stable candidates whose FAM K_vrh is within this fraction of the target."""
    fam_model: FamName = "auto"
    """auto (MACE-MP-0 if available, else SevenNet-0), mace-mp-0, sevennet-0, or a MACE model file."""
    fam_settings: FamSettings = Field(default_factory=FamSettings)
    """Relaxation, structure matching and elastic settings of stage II."""
    fam_batch_size: int = Field(16, ge=1)
    """Structures per stage-II task (one cached unit of work)."""
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
            from tasks.gnn_screen import screen_gnn  # stage I pulls in the predictor stack; load it only when run

            summary["gnn"] = screen_gnn(lake_url, params.iteration, params.gnn_tolerance, params.gnn_model_id)
        if "fam" in params.stages:
            from tasks.fam import screen_fam

            summary["fam"] = screen_fam(
                lake_url,
                params.iteration,
                params.fam_tolerance,
                params.fam_model,
                params.fam_settings,
                params.fam_batch_size,
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
