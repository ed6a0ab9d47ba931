"""The ``active-learning`` flow: train -> generate -> screen -> label -> record, for N iterations.

Embedded mode (default) runs each stage flow in this process as a subflow against the lake.
Deployed mode dispatches each stage with ``run_deployment`` to its work pool (training,
generation and screening where the GPUs are, DFT where the cluster is) and waits for it.

Every stage resumes: training is cached on its data snapshot, generation skips targets that
already have candidates, screening and labeling only touch candidates without a terminal state,
and an iteration whose ``iterations`` rows exist is skipped. Rerunning a finished loop recomputes
nothing; killing it anywhere and rerunning finishes the work with no duplicate rows.
"""

from __future__ import annotations

import base64
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.deployments import run_deployment
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field, model_validator

from core import plots
from core.cgcnn import ConfigName as CGCNNConfigName
from core.generator.configs import PresetName as GeneratorPreset
from core.sizes import DEFAULT_SIZE, SIZES, RunSize, SizeName, size_help
from core.targets import DesignText, parse_design
from flows.generate import DEFAULT_TARGETS, GenerateParams, GenerateSettings, TargetK, Targets, generate
from flows.label import LabelParams, LabelSettings, label
from flows.locking import loop_lock
from flows.screen import ScreenParams, ScreenSettings, screen
from flows.train import TrainParams, TrainSettings, train
from storage import Lake
from storage.iterations import iteration_metrics
from tasks.generate import latent_snapshot

DEPLOYMENTS = {
    "train": "train/gpu",
    "generate": "generate/gpu",
    "screen": "screen/gpu",
    "label": "label/hpc",
}
"""Stage -> deployment (flow name / deployment name) used in deployed mode; see prefect.yaml."""


SIZED_FIELDS = tuple(name for name in RunSize.model_fields if name != "cost")
"""The loop fields a run size sets when the user leaves them at 0 or "size" (``core.sizes``)."""


class LoopParams(BaseModel):
    """Parameters of the active-learning loop (rendered as a form in the Prefect UI).

    The loop's own fields (targets, run size and the cost knobs it sets, warm start, mode) come first; each
    stage's settings are that stage's own model (``TrainSettings``, ``GenerateSettings``, ``ScreenSettings``,
    ``LabelSettings``), the same fields the stage's form shows when it runs alone.
    """

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    lake_url: str = ""
    """Lake root, a path or an fsspec URL; empty: $MATLOOP_LAKE, else ./lake."""
    targets: Targets = list(DEFAULT_TARGETS)
    """Target K_vrh values, GPa."""
    focus_target: TargetK = 350.0
    """The target the summary leads with."""
    design: DesignText = ""
    """A design target instead of the K targets, e.g. "k_vrh in [330, 370] and g_vrh/k_vrh <= 0.57" (the
    generator is conditioned on the centre of its K window, every stage checks each condition it can evaluate,
    the label checks them all); it replaces targets and focus_target. Empty: the K targets."""
    size: SizeName = Field(DEFAULT_SIZE, description="Run size (sets every field left at 0 or 'size'): " + size_help())
    iterations: int = Field(0, ge=0)
    """How many iterations to run, starting at ``first_iteration``; 0: the size's."""
    first_iteration: int = Field(0, ge=0)
    """Index of the first iteration (finished iterations are skipped)."""
    samples_per_kept: int = Field(0, ge=0)
    """Generator samples per kept candidate (keep ratio 1:N); 0: the size's."""
    n_kept: int = Field(0, ge=0)
    """Candidates kept per target and iteration; 0: the size's."""
    label_source: Literal["size", "dft", "fam"] = "size"
    """Who labels the stage-II survivors: DFT (the reference work), or the FAM (its K becomes the label,
    marked fam:<model> on every row: cheap enough for many iterations on a laptop); size: the size's."""
    predictor_config: Literal[("size", *get_args(CGCNNConfigName))] = "size"  # type: ignore[valid-type]
    """CGCNN config name (small, default); size: the size's."""
    generator_config: Literal[("size", *get_args(GeneratorPreset))] = "size"  # type: ignore[valid-type]
    """Generator config name (small, paper); size: the size's."""
    warm_start: bool = True
    """Iterations after the first fine-tune the previous iteration's predictor and generator."""
    mode: Literal["embedded", "deployed"] = "embedded"
    """embedded: stages run in this process; deployed: each stage runs on its work pool."""
    train: TrainSettings = Field(default_factory=TrainSettings)
    """Train stage: CGCNN overrides, the weight of new labels, feedback on/off, training seed."""
    generate: GenerateSettings = Field(default_factory=GenerateSettings)
    """Generate stage: sampling seed, keep-best ranker, frozen grader."""
    screen: ScreenSettings = Field(default_factory=ScreenSettings)
    """Screen stages I and II: tolerances, foundation atomic model and its relax/match/elastic settings."""
    label: LabelSettings = Field(default_factory=LabelSettings)
    """Label stage: DFT preset and overrides, strains, retries, runner and SLURM settings, label limit."""

    @model_validator(mode="after")
    def _focus_is_a_target(self) -> LoopParams:
        """The focus target must be one of the targets (the summary leads with its rows); a design is the one target."""
        if self.design:
            self.targets = [parse_design(self.design).generator_k]
            self.focus_target = self.targets[0]
        if self.focus_target not in self.targets:
            raise ValueError(f"focus_target {self.focus_target:g} is not one of the targets {self.targets}")
        return self

    @model_validator(mode="after")
    def _fill_from_size(self) -> LoopParams:
        """Fields left at 0 or "size" take the size's value; the run's parameters keep the size, so a resume
        resolves the same way."""
        size = SIZES[self.size]
        for name in SIZED_FIELDS:
            if getattr(self, name) in (0, "size"):
                setattr(self, name, getattr(size, name))
        return self


def _parents(lake: Lake, params: LoopParams, iteration: int) -> dict[str, str | None]:
    """The models the previous iteration used (its ``iterations`` rows): what a warm start fine-tunes."""
    none = {"parent_predictor": None, "parent_generator": None}
    if not params.warm_start or iteration == 0:
        return none
    rows = lake.query(
        "SELECT predictor_model_id, generator_model_id FROM iterations WHERE iteration = ? LIMIT 1", [iteration - 1]
    ).to_pylist()
    if not rows:
        return none
    return {"parent_predictor": rows[0]["predictor_model_id"], "parent_generator": rows[0]["generator_model_id"]}


def _stage_params(params: LoopParams, lake: Lake, iteration: int, loop_run_id: str = "") -> dict[str, BaseModel]:
    """Each stage's own parameter model: its settings from the loop's, plus what this iteration fixes
    (``loop_run_id``: the lock the stages join)."""
    run = {"lake_url": lake.url, "loop_run_id": loop_run_id}
    return {
        "train": TrainParams(
            **params.train.model_dump(),
            **run,
            what=["predictor", "shear_predictor", "generator"]
            if params.design and parse_design(params.design).asks_for_g  # stage I then checks G too
            else ["predictor", "generator"],
            predictor_config=params.predictor_config,
            generator_config=params.generator_config,
            labels_before=iteration,
            **_parents(lake, params, iteration),
        ),
        "generate": GenerateParams(
            **(params.generate.model_dump() | {"seed": params.generate.seed + iteration}),
            **run,
            iteration=iteration,
            targets=params.targets,
            design=params.design,
            samples_per_kept=params.samples_per_kept,
            n_kept=params.n_kept,
        ),
        "screen": ScreenParams(**params.screen.model_dump(), **run, iteration=iteration),
        "label": LabelParams(**params.label.model_dump(), **run, iteration=iteration, source=params.label_source),
    }


_EMBEDDED: dict[str, Callable[[Any], Any]] = {"train": train, "generate": generate, "screen": screen, "label": label}


def _run_stage(stage: str, stage_params: BaseModel, mode: str) -> None:
    """Run one stage in-process, or on its work pool and wait; a stage that does not complete raises."""
    if mode == "embedded":
        _EMBEDDED[stage](stage_params)
        return
    run = run_deployment(
        name=DEPLOYMENTS[stage], parameters={"params": stage_params.model_dump(mode="json")}, timeout=None
    )
    if not run.state or not run.state.is_completed():
        raise RuntimeError(f"stage {stage} ({DEPLOYMENTS[stage]}) ended {run.state.name if run.state else 'unknown'}")


def _finished(lake: Lake, iteration: int, targets: list[float]) -> bool:
    rows = lake.query("SELECT target FROM iterations WHERE iteration = ?", [iteration]).column("target").to_pylist()
    return set(targets) <= set(rows)


@flow(name="active-learning", log_prints=True)
def active_learning(params: LoopParams | None = None) -> list[dict[str, Any]]:
    """Run the loop; returns the ``iterations`` rows written (or found) for each iteration.

    Args:
        params: Targets, run size and every stage's settings; the default size is ``laptop`` (about an
            hour on 2 CPU cores), ``paper`` runs the reference work's scale.
    """
    params = params or LoopParams()
    logger = get_run_logger()
    lake = Lake(params.lake_url)
    run_id = str(flow_run.get_id() or "") or None
    with loop_lock(lake) as holder:  # a second loop on this lake is refused here, naming this run
        logger.info("holding the loop lock of %s as %s", lake.url, holder.describe())
        with lake.exclusive("ingest"):  # no writer can be mid-write now: clear what killed writers left
            swept = lake.sweep_partial()
        if swept:
            logger.info("removed %d partial files that killed writers left: %s", len(swept), ", ".join(swept[:5]))
        return _iterations(params, lake, run_id, holder.token, logger)


def _iterations(params: LoopParams, lake: Lake, run_id: str | None, token: str, logger: Any) -> list[dict[str, Any]]:
    """The loop's iterations, under its lock; stage flows join the lock with ``token``."""
    summaries: list[dict[str, Any]] = []
    for iteration in range(params.first_iteration, params.first_iteration + params.iterations):
        if _finished(lake, iteration, params.targets):
            logger.info("iteration %d is already recorded: skipped", iteration)
            summaries += lake.query("SELECT * FROM iterations WHERE iteration = ?", [iteration]).to_pylist()
            continue
        wall: dict[str, float] = {}
        stages = _stage_params(params, lake, iteration, token)
        for stage, stage_params in stages.items():
            logger.info("iteration %d: %s (%s)", iteration, stage, params.mode)
            t0 = time.perf_counter()
            _run_stage(stage, stage_params, params.mode)
            wall[stage] = round(time.perf_counter() - t0, 2)
        rows = iteration_metrics(lake, iteration, wall, params.samples_per_kept, params.label_source)
        lake.append("iterations", rows, run_id=run_id)
        report(lake, params, iteration, rows)
        summaries += rows
    return summaries


def report(lake: Lake, params: LoopParams, iteration: int, rows: list[dict[str, Any]]) -> None:
    """The iteration's artifacts: markdown summary, funnel table, and plots stored in the lake."""
    history = lake.query("SELECT * FROM iterations ORDER BY iteration, target").to_pylist()
    generations = lake.query("SELECT * FROM generations ORDER BY iteration, target").to_pylist()
    graded = any(g["k_grader_raw_json"] for g in generations)
    k_column = "k_grader_raw_json" if graded else "k_head_raw_json"
    samples = {(g["iteration"], g["target"]): json.loads(g[k_column] or "[]") for g in generations}
    dft = lake.query(
        "SELECT iteration, dft_k FROM candidates WHERE status = 'labeled' AND dft_k IS NOT NULL"
    ).to_pylist()
    by_iteration: dict[int, list[float]] = {}
    for r in dft:
        by_iteration.setdefault(r["iteration"], []).append(r["dft_k"])
    links = []
    with tempfile.TemporaryDirectory() as tmp:
        figures = {
            "mape_per_target.png": lambda p: plots.mape_per_target(
                history, p, "mape_gnn", "MAPE of stage-I CGCNN K (kept) vs target"
            ),
            "k_of_samples.png": lambda p: plots.k_distributions(
                samples, p, f"{'grader' if graded else 'generator head'} K of raw samples (GPa)"
            ),
            "dft_k_histogram.png": lambda p: plots.dft_k_histogram(by_iteration, p, params.focus_target),
        }
        if graded:
            figures["mape_raw_per_target.png"] = lambda p: plots.mape_per_target(
                history, p, "mape_grader_raw", "MAPE of frozen-grader K (raw samples) vs target"
            )
        latents = latent_snapshot(lake, iteration)
        if latents is not None:
            figures["latent_tsne.png"] = lambda p: plots.latent_map(*latents, p)
        for name, draw in figures.items():
            png = draw(Path(tmp) / name)
            rel = lake.put_file(png, "plots", f"iteration={iteration}", name)
            links += [f"**{name}** ([file in the lake]({lake.uri(rel)}))", "", embedded_image(png, name), ""]
    focus = next((r for r in rows if r["target"] == params.focus_target), rows[0] if rows else None)
    table = [{k: r[k] for k in _FUNNEL_COLUMNS} for r in rows]
    create_table_artifact(table, key=f"funnel-{iteration}", description=f"Funnel of iteration {iteration}")
    lines = [f"# Iteration {iteration}", ""]
    if focus:
        labeled = (
            f"DFT K {focus['dft_k_mean']:.0f} ± {focus['dft_k_std'] or 0:.0f} GPa"
            if focus["dft_k_mean"] is not None
            else "nothing labeled yet"
        )
        lines += [
            f"Focus target {focus['target']:g} GPa: {focus['n_kept']} kept, {focus['n_gnn_pass']} passed the GNN, "
            f"{focus['n_fam_pass']} passed the FAM, {focus['n_labeled']} labeled; "
            f"MAPE {_fmt(focus['mape_gnn'])}; {labeled}.",
            "",
        ]
    lines += ["| " + " | ".join(_FUNNEL_COLUMNS) + " |", "|" + "---|" * len(_FUNNEL_COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r[k]) for k in _FUNNEL_COLUMNS) + " |" for r in rows]
    walls = json.loads(rows[0]["wall_times_json"]) if rows else {}
    lines += ["", "Wall time per stage: " + (", ".join(f"{k} {v:.0f} s" for k, v in walls.items()) or "-"), ""]
    lines += condition_lines(lake, iteration)
    lines += cost_lines(lake, iteration)
    lines += ["## Plots", "", *links]
    create_markdown_artifact("\n".join(lines), key=f"iteration-{iteration}", description=f"Iteration {iteration}")


_FUNNEL_COLUMNS = (
    "target",
    "n_generated",
    "n_kept",
    "n_gnn_pass",
    "n_fam_pass",
    "n_labeled",
    "n_failed",
    "mape_gnn",
    "dft_k_mean",
    "dft_k_std",
    "validity",
    "uniqueness",
    "novelty",
)


def condition_lines(lake: Lake, iteration: int) -> list[str]:
    """Per target and condition: how many candidates met it at each stage, of those the stage could check."""
    rows = lake.query("SELECT * FROM condition_funnel WHERE iteration = ?", [iteration]).to_pylist()
    lines = [
        "## Conditions",
        "",
        "| target | condition | candidates | stage I | stage II (FAM) | label |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['target']:g} | `{r['condition']}` | {r['n_candidates']} | {r['n_gnn_pass']}/{r['n_gnn_checked']} | "
        f"{r['n_fam_pass']}/{r['n_fam_checked']} | {r['n_label_met']}/{r['n_label_checked']} |"
        for r in rows
    ]
    return [*lines, "", "Met / checked: a stage checks the conditions it can evaluate (stage I: K only).", ""]


def cost_lines(lake: Lake, iteration: int) -> list[str]:
    """The iteration's cost ledger as markdown: per stage, and per discovery (``storage.ledger``)."""
    stages = lake.query("SELECT * FROM cost_per_stage WHERE iteration = ?", [iteration]).to_pylist()
    per = lake.query("SELECT * FROM cost_per_discovery WHERE iteration = ?", [iteration]).to_pylist()
    lines = ["## Cost", "", "| stage | jobs | failed | wall (s) | CPU (s) | GPU (s) |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {r['stage']} | {r['n_jobs']} | {r['n_failed']} | {_seconds(r['wall_s'])} | {_seconds(r['cpu_s'])} | "
        f"{_seconds(r['gpu_s'])} |"
        for r in stages
    ]
    if per and per[0]["n_discovered"]:
        lines += [
            "",
            f"{per[0]['n_discovered']} structures labeled within 20 % of target: "
            f"{_fmt(per[0]['cpu_hours_per_discovery'])} CPU-hours and {_fmt(per[0]['gpu_hours_per_discovery'])} "
            "GPU-hours each (`SELECT * FROM cost_per_discovery`).",
        ]
    return [*lines, ""]


def embedded_image(png: Path, title: str) -> str:
    """A markdown image carrying the PNG itself (data URI): the Prefect UI shows it with no file server."""
    return f"![{title}](data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()})"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}" if value < 10 else f"{value:.0f}"
