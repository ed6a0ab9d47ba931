"""Training the CGCNN predictor as a cached Prefect task, with its parity plot and registry row.

The cache key is (lake, config, data hash, code hash): the flow reads the labeled data first and
passes its hash in, so a retrain on unchanged data with unchanged code and config returns the
registered model at once, and any new label, config change or edit of core/cgcnn.py or
core/graphs.py trains a new model.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core import plots
from core.cgcnn import CGCNNConfig, Ensemble, evaluate, train_ensemble
from core.device import device_label
from core.graphs import GraphCache
from core.settings import get_settings
from storage.lake import Lake
from storage.queries import DEFAULT_NEW_LABEL_WEIGHT, labeled_k_vrh
from storage.registry import checkpoint_path, register_model, resolve_model, snapshot_hash
from tasks.common import compute_task, run_logger

PREDICTOR_KIND = "cgcnn"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Snapshot:
    """The labeled training data at one moment: rows (structure columns + k_vrh) and their hash."""

    rows: list[dict[str, Any]]
    data_hash: str

    @property
    def structure_ids(self) -> list[str]:
        return [r["structure_id"] for r in self.rows]


def labeled_snapshot(lake_url: str, labels_before: int | None = None) -> Snapshot:
    """Rows of ``labeled_k_vrh`` usable for a log10 target (K > 0), and the hash of ids + labels."""
    rows = [r for r in labeled_k_vrh(Lake(lake_url), labels_before=labels_before).to_pylist() if r["k_vrh"] > 0]
    return Snapshot(rows, snapshot_hash([r["structure_id"] for r in rows], [r["k_vrh"] for r in rows]))


def split_rows(rows: list[dict[str, Any]], feedback: bool = True) -> dict[str, list[dict[str, Any]]]:
    """Rows by the split they are used in: loop-labeled rows all train (with ``feedback``; none without)."""
    out: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for r in rows:
        if r["from_loop"]:
            if feedback:
                out["train"].append(r)
        else:
            out[r["split"]].append(r)
    return out


@compute_task(name="train-predictor", retries=0)
def train_predictor(
    lake_url: str,
    config: dict[str, Any],
    data_hash: str,
    code: str,
    parent_model_id: str | None = None,
    new_label_weight: float = DEFAULT_NEW_LABEL_WEIGHT,
    feedback: bool = True,
    labels_before: int | None = None,
) -> dict[str, Any]:
    """Train a CGCNN ensemble on the lake's labeled data (or fine-tune ``parent_model_id``); register it.

    ``data_hash`` must match the data the task reads (it is the cache key's data part), and
    ``code`` is ``core.cgcnn.code_hash()``, the model code's part of the key. Loop-labeled rows
    train (never validate or test) and are drawn ``new_label_weight`` times as often as seed rows;
    ``feedback=False`` leaves them out; ``labels_before`` keeps loop labels of earlier iterations only.
    Returns id, metrics and plot path.
    """
    logger = run_logger()
    lake = Lake(lake_url)
    cfg = CGCNNConfig.model_validate(config)
    snapshot = labeled_snapshot(lake_url, labels_before)
    if snapshot.data_hash != data_hash:
        raise RuntimeError(
            f"labeled data changed since the flow read it (hash {snapshot.data_hash}, expected {data_hash}); rerun"
        )
    by_split = split_rows(snapshot.rows, feedback)
    for split in ("train", "val"):
        if len(by_split[split]) < 2:
            raise ValueError(f"need at least 2 labeled {split} structures, have {len(by_split[split])}")
    logger.info("training %d-member CGCNN on %s", cfg.n_models, {s: len(v) for s, v in by_split.items()})

    cache = GraphCache(cfg.graph, Path(get_settings().cache_dir).expanduser() / "graphs")
    data = {s: (cache.graphs(rows), np.log10([r["k_vrh"] for r in rows])) for s, rows in by_split.items()}
    cache.save()
    weights = np.array([new_label_weight if r["from_loop"] else 1.0 for r in by_split["train"]])
    parent = load_predictor(lake, parent_model_id)[1] if parent_model_id else None
    if parent is not None:
        logger.info(
            "fine-tuning %s (%d loop labels weighted %g)", parent_model_id, int((weights != 1).sum()), new_label_weight
        )
    ensemble = train_ensemble(data["train"], data["val"], cfg, parent=parent, weights=weights, log=logger.info)
    metrics: dict[str, Any] = {**ensemble.metrics, "device": device_label(ensemble.device)}
    for split in ("val", "test"):
        if by_split[split]:
            metrics[split] = evaluate(ensemble, *data[split])
    ensemble.metrics = metrics

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = ensemble.save(Path(tmp) / "ensemble.pt")
        record = register_model(
            lake,
            kind=PREDICTOR_KIND,
            checkpoint=ckpt,
            data_snapshot=snapshot.structure_ids,
            data_hash=data_hash,
            config={
                **cfg.model_dump(mode="json"),
                "code": code,
                "parent_model_id": parent_model_id,
                "new_label_weight": new_label_weight,
                "feedback": feedback,
            },
            metrics=metrics,
        )
        plot_split = "test" if by_split["test"] else "val"
        graphs, log10_true = data[plot_split]
        pred = ensemble.predict_graphs(graphs)
        summary = metrics[plot_split]["ensemble"]
        png = plots.parity_plot(
            10.0**log10_true,
            pred.k_vrh,
            pred.k_vrh_std,
            Path(tmp) / "parity.png",
            f"{record.model_id}\n{plot_split}: MAE log10 {summary['mae_log10']:.3f}, {summary['mae_gpa']:.1f} GPa",
        )
        plot_path = lake.put_file(png, "figures", f"parity-{record.model_id}.png")
    logger.info("registered %s: %s MAE log10 %.4f", record.model_id, plot_split, summary["mae_log10"])
    return {"model_id": record.model_id, "metrics": metrics, "parity_plot": plot_path}


def load_predictor(lake: Lake, model_id: str | None = None) -> tuple[str, Ensemble]:
    """The registered CGCNN ensemble ``model_id`` (latest when None), loaded from its checkpoint."""
    record = resolve_model(lake, PREDICTOR_KIND, model_id)
    return record.model_id, Ensemble.load(checkpoint_path(lake, record))
