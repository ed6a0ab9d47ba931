"""Training a model, either kind (the CGCNN predictor, the conditional generator), as one cached Prefect task.

``train_model`` reads the lake's labeled data once (``training_data``), fits the kind's model from scratch or
fine-tunes ``parent_model_id`` (warm start), and registers it in ``models``. Loop-labeled rows all train (never
validate or test) and are drawn ``new_label_weight`` times as often as seed rows; ``feedback=False`` leaves them out
(the benchmark's no-feedback arm); ``labels_before`` keeps loop labels of earlier iterations only, so a resumed
iteration trains on the data it started with.

The cache key is (lake, kind, config, data hash, parent, weighting, task source) plus the hash of every source
file the model depends on (``core.provenance.source_hash`` of the kind's package and the ``core`` modules it
imports): unchanged data, config and code return the registered model at once; a new label, a config edit or a
code change trains a new one. Even with the Prefect cache gone, a model already registered for the same data hash
and settings hash is returned instead of retrained.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from prefect.cache_policies import CachePolicy

from core import plots
from core.cgcnn import CGCNNConfig, Ensemble, evaluate, train_ensemble
from core.costs import measured
from core.device import device_label
from core.graphs import GraphCache
from core.provenance import settings_hash, source_hash
from core.settings import get_settings
from storage.lake import Lake
from storage.queries import DEFAULT_NEW_LABEL_WEIGHT, labeled_k_vrh
from storage.records import record_work
from storage.registry import (
    GENERATOR_KIND,
    PREDICTOR_KIND,
    SHEAR_PREDICTOR_KIND,
    ModelKind,
    checkpoint_path,
    register_model,
    resolve_model,
    snapshot_hash,
)
from tasks.common import CACHE_POLICY, compute_task, run_logger

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class TrainingData:
    """The labeled data at one moment (structure columns + ``k_vrh``, ``g_vrh`` + ``from_loop``, K > 0) and its
    hash."""

    rows: list[dict[str, Any]]
    new_label_weight: float = DEFAULT_NEW_LABEL_WEIGHT

    @property
    def structure_ids(self) -> list[str]:
        return [r["structure_id"] for r in self.rows]

    @property
    def data_hash(self) -> str:
        return snapshot_hash(self.structure_ids, [(r["k_vrh"], r.get("g_vrh")) for r in self.rows])

    @property
    def by_split(self) -> dict[str, list[dict[str, Any]]]:
        """Rows by the split they are used in: the seed data's fixed split, every loop-labeled row in train."""
        out: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
        for r in self.rows:
            out["train" if r["from_loop"] else r["split"]].append(r)
        return out

    def labeled(self, name: str) -> TrainingData:
        """The rows with a positive ``name`` label (every row has K; G only where the label's method gave one)."""
        return TrainingData([r for r in self.rows if (r.get(name) or 0) > 0], self.new_label_weight)

    def too_few(self, name: str, splits: Sequence[str] = ("train",)) -> str:
        """Why ``name`` cannot be learned from these rows (fewer than 2 labels in one of ``splits``), or ""."""
        counts = {split: len(self.labeled(name).by_split[split]) for split in splits}
        if min(counts.values()) >= 2:
            return ""
        found = " and ".join(f"{n} {split}" for split, n in counts.items())
        if name == "g_vrh":
            return f"only {found} structures have a DFT or dataset G label (need 2; a FAM's G, the seed set's, is none)"
        return f"only {found} structures have a {name} label (need 2)"

    @property
    def train_weights(self) -> np.ndarray:
        """How often each train row is drawn relative to a seed row."""
        return np.array([self.new_label_weight if r["from_loop"] else 1.0 for r in self.by_split["train"]])


def training_data(
    lake_url: str,
    new_label_weight: float = DEFAULT_NEW_LABEL_WEIGHT,
    feedback: bool = True,
    labels_before: int | None = None,
) -> TrainingData:
    """Rows of ``storage.queries.labeled_k_vrh`` usable for a log10 target (K > 0); without ``feedback`` the
    loop's labels are left out, with ``labels_before`` those of that iteration and later."""
    rows = labeled_k_vrh(Lake(lake_url), labels_before=labels_before).to_pylist()
    return TrainingData([r for r in rows if r["k_vrh"] > 0 and (feedback or not r["from_loop"])], new_label_weight)


class Saveable(Protocol):
    def save(self, path: str | Path) -> Path: ...


@dataclass
class Fitted:
    """A trained model, its metrics, and what draws its figures once it has an id (lake-relative paths)."""

    model: Saveable
    metrics: dict[str, Any]
    figures: Callable[[Lake, str, Path], dict[str, str]] = field(default=lambda lake, model_id, tmp: {})


def _fit_predictor(lake: Lake, data: TrainingData, config: dict[str, Any], parent_model_id: str | None) -> Fitted:
    """A CGCNN ensemble on log10 of its target modulus (train split to fit, val to stop early), evaluated on val
    and test: K_vrh, or G_vrh on the rows that have it (the shear predictor)."""
    logger = run_logger()
    cfg = CGCNNConfig.model_validate(config)
    data = data.labeled(cfg.target)
    by_split = data.by_split
    for split in ("train", "val"):
        if len(by_split[split]) < 2:
            raise ValueError(f"need at least 2 labeled {split} structures, have {len(by_split[split])}")
    logger.info(
        "training %d-member CGCNN on %s for %s", cfg.n_models, {s: len(v) for s, v in by_split.items()}, cfg.target
    )
    cache = GraphCache(cfg.graph, Path(get_settings().cache_dir).expanduser() / "graphs")
    graphs = {s: (cache.graphs(rows), np.log10([r[cfg.target] for r in rows])) for s, rows in by_split.items()}
    cache.save()
    parent = (
        Ensemble.load(checkpoint_path(lake, resolve_model(lake, predictor_kind(cfg.target), parent_model_id)))
        if parent_model_id
        else None
    )
    ensemble = train_ensemble(
        graphs["train"], graphs["val"], cfg, parent=parent, weights=data.train_weights, log=logger.info
    )
    metrics: dict[str, Any] = {**ensemble.metrics, "device": device_label(ensemble.device)}
    for split in ("val", "test"):
        if by_split[split]:
            metrics[split] = evaluate(ensemble, *graphs[split])
    ensemble.metrics = metrics
    plot_split = "test" if by_split["test"] else "val"

    def parity(lake: Lake, model_id: str, tmp: Path) -> dict[str, str]:
        pred = ensemble.predict_graphs(graphs[plot_split][0])
        summary = metrics[plot_split]["ensemble"]
        png = plots.parity_plot(
            10.0 ** graphs[plot_split][1],
            pred.k_vrh,
            pred.k_vrh_std,
            tmp / "parity.png",
            f"{model_id}\n{plot_split}: MAE log10 {summary['mae_log10']:.3f}, {summary['mae_gpa']:.1f} GPa",
            cfg.target[0].upper() + cfg.target[1:],  # K_vrh, G_vrh
        )
        logger.info("%s: %s MAE log10 %.4f", model_id, plot_split, summary["mae_log10"])
        return {"parity": lake.put_file(png, "figures", f"parity-{model_id}.png")}

    return Fitted(ensemble, metrics, parity)


def _fit_generator(lake: Lake, data: TrainingData, config: dict[str, Any], parent_model_id: str | None) -> Fitted:
    """The conditional generator on the train split (seed rows and the loop's labels, weighted)."""
    from core.generator import CDVAEConfig, CDVAEGenerator, load_generator
    from core.structures import from_row

    rows = data.by_split["train"]
    if len(rows) < 2:
        raise ValueError(
            f"need at least 2 labeled train-split structures to train the generator, have {len(rows)}; "
            "run `matloop ingest` first"
        )
    structures, k_vrh, weights = [from_row(r) for r in rows], [float(r["k_vrh"]) for r in rows], data.train_weights
    if parent_model_id:
        generator = load_generator(checkpoint_path(lake, resolve_model(lake, GENERATOR_KIND, parent_model_id)))
    else:
        generator = CDVAEGenerator(CDVAEConfig.model_validate(config))
    conditioned = generator.config_dict.get("properties", ["k_vrh"])[1:]  # labels beyond K the generator learns
    for name in conditioned:
        if missing := data.too_few(name):
            raise ValueError(
                f"the generator is conditioned on {name}, but {missing}: ingest data with it (the shared MP file "
                "has G) or label structures with DFT first"
            )
    others = {name: [r.get(name) for r in rows] for name in conditioned}
    fit = generator.finetune if parent_model_id else generator.train
    metrics = fit(structures, k_vrh, weights=weights, other_labels=others)
    return Fitted(generator, {**metrics, "device": device_label(generator.device)})


FITTERS: dict[str, tuple[str, Callable[[Lake, TrainingData, dict[str, Any], str | None], Fitted]]] = {
    PREDICTOR_KIND: ("core.cgcnn", _fit_predictor),
    SHEAR_PREDICTOR_KIND: ("core.cgcnn", _fit_predictor),
    GENERATOR_KIND: ("core.generator", _fit_generator),
}
"""Model kind -> (the package its code lives in, the function that fits it); add a model kind here."""


def model_code_hash(kind: ModelKind) -> str:
    """Hash of the kind's package (subpackages included) and of every ``core`` module it imports."""
    return source_hash(FITTERS[kind][0])


def _code_key(_context: Any, inputs: dict[str, Any]) -> str:
    return f"{inputs['kind']}-{model_code_hash(inputs['kind'])}"


@compute_task(name="train-model", retries=0, cache_policy=CACHE_POLICY + CachePolicy.from_cache_key_fn(_code_key))
def train_model(
    lake_url: str,
    kind: ModelKind,
    config: dict[str, Any],
    data_hash: str,
    parent_model_id: str | None = None,
    new_label_weight: float = DEFAULT_NEW_LABEL_WEIGHT,
    feedback: bool = True,
    labels_before: int | None = None,
) -> dict[str, Any]:
    """Train a model of ``kind`` with ``config`` on the lake's labeled data (or fine-tune ``parent_model_id``);
    register it. ``data_hash`` is the hash of ``training_data`` as the caller read it (the cache key's data
    part); the task refuses to train on data that changed since. Returns model id, metrics and figure paths."""
    logger = run_logger()
    lake = Lake(lake_url)
    data = training_data(lake_url, new_label_weight, feedback, labels_before)
    if data.data_hash != data_hash:
        raise RuntimeError(
            f"labeled data changed since it was read (hash {data.data_hash}, expected {data_hash}); rerun"
        )
    record_config = {
        **config,
        "code": model_code_hash(kind),
        "parent_model_id": parent_model_id,
        "new_label_weight": new_label_weight,
        "feedback": feedback,
    }
    existing = lake.query(
        "SELECT model_id, metrics_json FROM models WHERE kind = ? AND data_hash = ? AND settings_hash = ? "
        "ORDER BY created_at DESC LIMIT 1",
        [kind, data_hash, settings_hash(record_config)],
    ).to_pylist()
    if existing:
        logger.info(
            "%s already registered for data %s and these settings: %s", kind, data_hash, existing[0]["model_id"]
        )
        return {"model_id": existing[0]["model_id"], "metrics": json.loads(existing[0]["metrics_json"]), "figures": {}}
    n_loop = sum(bool(r["from_loop"]) for r in data.rows)
    logger.info(
        "%s %s on %d labeled structures, %d of them loop labels weighted %g (data hash %s)",
        f"fine-tuning {parent_model_id}:" if parent_model_id else "training",
        kind,
        len(data.rows),
        n_loop,
        new_label_weight,
        data_hash,
    )
    with measured() as cost:
        fitted = FITTERS[kind][1](lake, data, config, parent_model_id)
    with tempfile.TemporaryDirectory() as tmp:
        record = register_model(
            lake,
            kind=kind,
            checkpoint=fitted.model.save(Path(tmp) / "model.pt"),
            data_snapshot=data.structure_ids,
            data_hash=data_hash,
            config=record_config,
            metrics=fitted.metrics,
        )
        figures = fitted.figures(lake, record.model_id, Path(tmp))
    device = fitted.metrics.get("device")
    record_work(
        lake, "train", f"train-{record.model_id}", kind, record_config, asdict(cost.on(device)), device, labels_before
    )
    logger.info("registered %s %s", kind, record.model_id)
    return {"model_id": record.model_id, "metrics": fitted.metrics, "figures": figures}


PREDICTOR_TARGETS: dict[ModelKind, str] = {PREDICTOR_KIND: "k_vrh", SHEAR_PREDICTOR_KIND: "g_vrh"}
"""The CGCNN model kinds and the modulus each one predicts (``CGCNNConfig.target``)."""


def predictor_kind(target: str) -> ModelKind:
    """The model kind of a CGCNN ensemble on ``target`` (K_vrh: the predictor; G_vrh: the shear predictor)."""
    return next(kind for kind, name in PREDICTOR_TARGETS.items() if name == target)


def load_predictor(lake: Lake, model_id: str | None = None, kind: ModelKind = PREDICTOR_KIND) -> tuple[str, Ensemble]:
    """The registered CGCNN ensemble of ``kind`` ``model_id`` (latest when None), loaded from its checkpoint."""
    record = resolve_model(lake, kind, model_id)
    return record.model_id, Ensemble.load(checkpoint_path(lake, record))
