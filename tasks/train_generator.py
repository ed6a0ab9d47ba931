"""Training the conditional generator as a cached Prefect task that registers it in ``models``.

Iteration 0 trains from scratch; later iterations fine-tune the previous iteration's model (warm
start, ``parent_model_id``) on the seed train split plus every structure the loop labeled, each
loop label drawn ``new_label_weight`` times as often as a seed row. ``feedback=False`` leaves the
loop's labels out (the same fine-tuning schedule with no new data: the benchmark's control arm).

The cache key is (lake, config name, parent, weighting, task source) plus the training snapshot's
hash and the hash of the generator's code (``core.provenance.source_hash``: core/generator and every core module it
imports): rerunning on unchanged data,
config and code returns the registered model id without training; a new label, a config edit or a
code change trains a new model. Even with the Prefect cache gone, a model already registered for
the same data hash and settings hash (which include the parent id and the weighting) is returned
instead of retrained.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from pymatgen.core import Structure

from core.device import device_label
from core.generator import PRESETS, CDVAEConfig, CDVAEGenerator, load_generator
from core.provenance import settings_hash, source_hash
from core.structures import from_row
from storage.lake import Lake
from storage.queries import DEFAULT_NEW_LABEL_WEIGHT, training_rows
from storage.registry import checkpoint_path, register_model, resolve_model, snapshot_hash
from tasks.common import CACHE_POLICY, compute_task, run_logger

GENERATOR_KIND = "generator"


def generator_code_hash() -> str:
    """Hash of the generator package's source (subpackages included) and of every ``core`` module it imports."""
    return source_hash("core.generator")


@dataclass(frozen=True)
class TrainingSet:
    """Training data: train-split rows with K_vrh > 0 plus loop-labeled rows, their draw weights and hash."""

    rows: list[dict[str, Any]]
    new_label_weight: float = DEFAULT_NEW_LABEL_WEIGHT

    @property
    def weights(self) -> list[float]:
        return [self.new_label_weight if r["from_loop"] else 1.0 for r in self.rows]

    @property
    def n_from_loop(self) -> int:
        return sum(bool(r["from_loop"]) for r in self.rows)

    @property
    def structure_ids(self) -> list[str]:
        return [r["structure_id"] for r in self.rows]

    @property
    def k_vrh(self) -> list[float]:
        return [float(r["k_vrh"]) for r in self.rows]

    @property
    def data_hash(self) -> str:
        return snapshot_hash(self.structure_ids, self.k_vrh)

    def structures(self) -> list[Structure]:
        return [from_row(r) for r in self.rows]


def training_set(
    lake_url: str,
    new_label_weight: float = DEFAULT_NEW_LABEL_WEIGHT,
    feedback: bool = True,
    labels_before: int | None = None,
) -> TrainingSet:
    """``storage.queries.training_rows``: the train split and, with ``feedback``, the loop-labeled rows
    (of iterations before ``labels_before`` when given)."""
    rows = [r for r in training_rows(Lake(lake_url), labels_before) if feedback or not r["from_loop"]]
    return TrainingSet(rows, new_label_weight)


def _data_and_code_key(_context: Any, inputs: dict[str, Any]) -> str:
    data = training_set(
        inputs["lake_url"],
        inputs.get("new_label_weight", 1.0),
        inputs.get("feedback", True),
        inputs.get("labels_before"),
    )
    return f"{data.data_hash}-{generator_code_hash()}"


def _config(config_name: str, model_seed: int | None) -> CDVAEConfig:
    config = PRESETS.resolve(config_name)
    return config if model_seed is None else config.model_copy(update={"seed": model_seed})


def _config_record(config: CDVAEConfig, parent_model_id: str | None, new_label_weight: float) -> dict[str, Any]:
    """What the registry stores as the model's config: hyperparameters, generator class, code hash, parent."""
    return {
        **config.model_dump(mode="json"),
        "generator": CDVAEGenerator.name,
        "code": generator_code_hash(),
        "parent_model_id": parent_model_id,
        "new_label_weight": new_label_weight,
    }


@compute_task(
    name="train-generator",
    retries=0,
    cache_policy=CACHE_POLICY + CachePolicy.from_cache_key_fn(_data_and_code_key),
)
def train_generator(
    lake_url: str,
    config_name: str = "small",
    parent_model_id: str | None = None,
    new_label_weight: float = DEFAULT_NEW_LABEL_WEIGHT,
    feedback: bool = True,
    model_seed: int | None = None,
    labels_before: int | None = None,
) -> str:
    """Train the generator, or fine-tune ``parent_model_id``, on the training rows; return the new model id.

    ``model_seed`` overrides the config's training seed (independently trained models of one config);
    ``labels_before`` keeps loop labels of earlier iterations only.
    """
    logger = run_logger()
    lake = Lake(lake_url)
    config = _config(config_name, model_seed)
    data = training_set(lake_url, new_label_weight, feedback, labels_before)
    record_config = _config_record(config, parent_model_id, new_label_weight)
    existing = lake.query(
        "SELECT model_id FROM models WHERE kind = ? AND data_hash = ? AND settings_hash = ? "
        "ORDER BY created_at DESC LIMIT 1",
        [GENERATOR_KIND, data.data_hash, settings_hash(record_config)],
    ).to_pylist()
    if existing:
        logger.info(
            "generator already registered for data %s and config %s: %s",
            data.data_hash,
            config_name,
            existing[0]["model_id"],
        )
        return existing[0]["model_id"]
    if len(data.rows) < 2:
        raise ValueError(
            f"need at least 2 labeled train-split structures to train the generator, have "
            f"{len(data.rows)}; run `matloop ingest` first"
        )
    logger.info(
        "%s generator (%s config) on %d structures, %d of them loop labels weighted %g (data hash %s)",
        f"fine-tuning {parent_model_id}:" if parent_model_id else "training",
        config_name,
        len(data.rows),
        data.n_from_loop,
        new_label_weight,
        data.data_hash,
    )
    if parent_model_id:
        generator = load_generator(checkpoint_path(lake, resolve_model(lake, GENERATOR_KIND, parent_model_id)))
        metrics = generator.finetune(data.structures(), data.k_vrh, weights=data.weights)
    else:
        generator = CDVAEGenerator(config)
        metrics = generator.train(data.structures(), data.k_vrh, weights=data.weights)
    metrics = {**metrics, "device": device_label(generator.device)}
    logger.info("generator trained: %s", metrics)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = generator.save(Path(tmp) / "generator.pt")
        record = register_model(
            lake,
            kind=GENERATOR_KIND,
            checkpoint=checkpoint,
            data_snapshot=data.structure_ids,
            data_hash=data.data_hash,
            config=record_config,
            metrics=metrics,
        )
    logger.info("registered %s", record.model_id)
    return record.model_id
