"""The ``train`` flow: train what is asked (the CGCNN predictor, the generator) on the current labeled data.

Both kinds go through one cached task, ``tasks.train.train_model``, keyed on (lake, kind, config, data hash,
parent, weighting, code hash): rerunning the flow on unchanged data returns the registered models without
training. The flow publishes a Prefect table
artifact of the predictor's metrics (ensemble and each member, validation and test) and links the
parity plot saved in the lake under ``figures/``.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel, ConfigDict, Field

from core.cgcnn import PRESETS as PREDICTOR_PRESETS
from core.cgcnn import ConfigName as CGCNNConfigName
from core.generator.configs import PRESETS as GENERATOR_PRESETS
from core.generator.configs import PresetName as GeneratorPreset
from flows.locking import stage_lock
from storage import Lake
from storage.queries import DEFAULT_NEW_LABEL_WEIGHT
from storage.registry import GENERATOR_KIND, PREDICTOR_KIND, SHEAR_PREDICTOR_KIND, ModelKind
from tasks.common import in_lake
from tasks.train import PREDICTOR_TARGETS, train_model, training_data

What = Literal["predictor", "shear_predictor", "generator"]
KINDS: dict[str, ModelKind] = {
    "predictor": PREDICTOR_KIND,
    "shear_predictor": SHEAR_PREDICTOR_KIND,
    "generator": GENERATOR_KIND,
}
"""A form's model names -> the registry's kinds."""


class TrainSettings(BaseModel):
    """How the models are trained: the train stage's settings, in this flow's form and in the loop's."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    predictor_overrides: dict[str, Any] = {}
    """Field overrides on the named CGCNN config, e.g. {"n_models": 2, "graph": {"cutoff": 6.0}}."""
    new_label_weight: float = Field(DEFAULT_NEW_LABEL_WEIGHT, gt=0)
    """How many times as often a loop-labeled structure is drawn as a seed row."""
    feedback: bool = True
    """Train on the loop's labels; False keeps to the seed data (the benchmark's no-feedback arm)."""
    model_seed: int | None = None
    """Training seed of both models instead of their configs' (independently trained models of one config)."""


class TrainParams(TrainSettings):
    """Parameters of the train flow (rendered as a form in the Prefect UI): the settings and what to train."""

    lake_url: str = ""
    """Lake root, a path or an fsspec URL; empty: $MATLOOP_LAKE, else ./lake."""
    what: list[What] = ["predictor"]
    """Models to train: "predictor" (CGCNN ensemble on K), "shear_predictor" (the same config on G, stage I's
    predictor for a design's G and G/K conditions), "generator" (the conditional generator)."""
    predictor_config: CGCNNConfigName = "default"
    """Named CGCNN config (core.cgcnn.PRESETS): default, small."""
    generator_config: GeneratorPreset = "small"
    """Named generator config (core.generator.PRESETS): small, small-kg (conditioned on K and G), paper."""
    parent_predictor: str | None = None
    """Fine-tune this registered CGCNN ensemble (warm start) instead of training from scratch."""
    parent_generator: str | None = None
    """Fine-tune this registered generator (warm start) instead of training from scratch."""
    parent_shear_predictor: str | None = None
    """Fine-tune this registered shear (G) predictor (warm start) instead of training from scratch."""
    labels_before: int | None = None
    """Train on loop labels of iterations before this one only; the loop sets its iteration, so a resumed
    iteration trains on the data it started with. None: every label in the lake."""
    loop_run_id: str = ""
    """Flow-run id of the active-learning run this stage belongs to (it shares that run's lake lock); empty:
    a run of its own, which takes the lake's loop lock itself and is refused while a loop runs."""


def metrics_table(model_id: str, metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (split, ensemble or member) with MAE of log10 K and in GPa."""
    rows = []
    for split in ("val", "test"):
        if split not in metrics:
            continue
        entries = [("ensemble", metrics[split]["ensemble"])]
        entries += [(f"member {k}", m) for k, m in enumerate(metrics[split]["members"])]
        for who, m in entries:
            rows.append(
                {
                    "model_id": model_id,
                    "split": split,
                    "model": who,
                    "n": m["n"],
                    "mae_log10": round(m["mae_log10"], 4),
                    "mae_gpa": round(m["mae_gpa"], 2),
                }
            )
    return rows


def _config(params: TrainParams, kind: ModelKind) -> dict[str, Any]:
    """The named config of ``kind`` with the form's overrides and training seed applied."""
    seed = {} if params.model_seed is None else {"seed": params.model_seed}
    if kind in PREDICTOR_TARGETS:
        target = {"target": PREDICTOR_TARGETS[kind]}
        config = PREDICTOR_PRESETS.resolve(params.predictor_config, {**params.predictor_overrides, **seed, **target})
    else:
        config = GENERATOR_PRESETS.resolve(params.generator_config, seed)
    return config.model_dump(mode="json")


@flow(name="train", log_prints=True)
def train(params: TrainParams | None = None) -> dict[str, str]:
    """Train the requested models; returns ``{"predictor": model_id, ...}`` for those asked (``What`` names).

    Args:
        params: Which models to train, their named configs, and whether to fine-tune registered ones.
    """
    params = params or TrainParams()
    lake = Lake(params.lake_url)
    with stage_lock(lake, "train", params.loop_run_id):
        logger = get_run_logger()
        data = training_data(lake.url, params.new_label_weight, params.feedback, params.labels_before)
        logger.info("%d labeled structures (data hash %s)", len(data.rows), data.data_hash)
        trained: dict[str, str] = {}
        for what in params.what:
            kind = KINDS[what]
            if kind == SHEAR_PREDICTOR_KIND and (missing := data.too_few("g_vrh", ("train", "val"))):
                logger.warning("no shear predictor trained: %s; stage I leaves G conditions unknown", missing)
                continue
            config = _config(params, kind)
            result = in_lake(train_model, lake.url)(
                lake.url,
                kind,
                config,
                data.data_hash,
                {
                    PREDICTOR_KIND: params.parent_predictor,
                    SHEAR_PREDICTOR_KIND: params.parent_shear_predictor,
                    GENERATOR_KIND: params.parent_generator,
                }[kind],
                params.new_label_weight,
                params.feedback,
                params.labels_before,
            )
            trained[what] = result["model_id"]
            if kind in PREDICTOR_TARGETS:
                parity = result["figures"].get("parity", f"figures/parity-{result['model_id']}.png")
                create_table_artifact(
                    table=metrics_table(result["model_id"], result["metrics"]),
                    key=f"{what.replace('_', '-')}-metrics",
                    description=f"CGCNN {result['model_id']}: MAE of log10 {config['target']} and in GPa. "
                    f"Parity plot: {lake.url}/{parity}",
                )
        return trained
