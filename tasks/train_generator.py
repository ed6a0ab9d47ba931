"""Training the conditional generator as a cached Prefect task that registers it in ``models``.

The cache key is (lake, config name, task source) plus the training snapshot's hash and the hash
of the generator's code (core/generator/*.py): rerunning on unchanged data, config and code
returns the registered model id without training; a new label, a config edit or a code change
trains a new model. Even with the Prefect cache gone, a model already registered for the same
data hash and settings hash is returned instead of retrained.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from pymatgen.core import Structure

from core.generator import CDVAEGenerator, get_config
from core.provenance import settings_hash
from core.structures import from_row
from storage.lake import Lake
from storage.queries import labeled_k_vrh
from storage.registry import register_model, snapshot_hash
from tasks.common import CACHE_POLICY, compute_task, run_logger

GENERATOR_KIND = "generator"
_CODE_DIR = Path(__file__).resolve().parent.parent / "core" / "generator"


def generator_code_hash() -> str:
    """Hash of the generator package's source: a code change means a new model."""
    digest = hashlib.sha256()
    for path in sorted(_CODE_DIR.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


@dataclass(frozen=True)
class TrainingSet:
    """The generator's training data: train-split rows with K_vrh > 0 (the head learns log K), and their hash."""

    rows: list[dict[str, Any]]

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


def training_set(lake_url: str) -> TrainingSet:
    """``labeled_k_vrh`` on the train split with K > 0."""
    return TrainingSet([r for r in labeled_k_vrh(Lake(lake_url), split="train").to_pylist() if r["k_vrh"] > 0])


def _data_and_code_key(_context: Any, inputs: dict[str, Any]) -> str:
    return f"{training_set(inputs['lake_url']).data_hash}-{generator_code_hash()}"


def _config_record(config_name: str) -> dict[str, Any]:
    """What the registry stores as the model's config: hyperparameters, generator class, code hash."""
    return {
        **get_config(config_name).model_dump(mode="json"),
        "generator": CDVAEGenerator.name,
        "code": generator_code_hash(),
    }


@compute_task(
    name="train-generator",
    retries=0,
    cache_policy=CACHE_POLICY + CachePolicy.from_cache_key_fn(_data_and_code_key),
)
def train_generator(lake_url: str, config_name: str = "small") -> str:
    """Train the generator (VAE with property head, then the latent prior) on the train split; return its model id."""
    logger = run_logger()
    lake = Lake(lake_url)
    config = get_config(config_name)
    data = training_set(lake_url)
    record_config = _config_record(config_name)
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
        "training generator (%s config) on %d structures (data hash %s)", config_name, len(data.rows), data.data_hash
    )
    generator = CDVAEGenerator(config)
    metrics = generator.train(data.structures(), data.k_vrh)
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
