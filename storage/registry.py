"""The model registry: checkpoints kept in the lake and described by rows of the ``models`` table.

Generic over ``kind`` (``cgcnn``, ``generator``, ...): a row records where the checkpoint lives
(relative to the lake root), which structures it was trained on (ids and a hash of ids + labels),
its hyperparameters, its metrics and a settings hash, so every prediction row that names a
model id can be traced back to exactly what produced it. Nothing here imports an ML framework.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from core.provenance import canonical_json, settings_hash
from core.settings import get_settings
from storage.lake import Lake

PREDICTOR_KIND = "cgcnn"
SHEAR_PREDICTOR_KIND = "cgcnn-g"
"""A CGCNN ensemble on G_vrh: stage I's predictor for a design's G and G/K conditions."""
GENERATOR_KIND = "generator"
ModelKind = Literal["cgcnn", "cgcnn-g", "generator"]
"""The kinds of model the platform trains (``models.kind``)."""

_SAFE_ID = re.compile(r"^[A-Za-z0-9._+-]+$")


class ModelNotFoundError(LookupError):
    """No registered model with that id (or none of that kind yet)."""


@dataclass(frozen=True)
class ModelRecord:
    """One registered model, with its JSON columns decoded."""

    model_id: str
    kind: str
    path: str
    data_snapshot: list[str]
    data_hash: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    settings_hash: str

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> ModelRecord:
        return cls(
            model_id=row["model_id"],
            kind=row["kind"],
            path=row["path"],
            data_snapshot=list(row["data_snapshot"] or []),
            data_hash=row["data_hash"] or "",
            config=json.loads(row["config_json"] or "{}"),
            metrics=json.loads(row["metrics_json"] or "{}"),
            settings_hash=row["settings_hash"] or "",
        )


def snapshot_hash(structure_ids: Sequence[str], labels: Iterable[float | Sequence[float | None]] | None = None) -> str:
    """Hash of a training set: its sorted ids and, if given, their labels (one value or several per structure,
    None for an unknown one; rounded to 1e-9)."""

    def rounded(v: float | Sequence[float | None] | None) -> Any:
        if v is None or isinstance(v, int | float):
            return None if v is None else round(float(v), 9)
        return [rounded(x) for x in v]

    values = [None] * len(structure_ids) if labels is None else [rounded(v) for v in labels]
    text = canonical_json(sorted(zip(structure_ids, values, strict=True), key=lambda p: p[0]))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def register_model(
    lake: Lake,
    *,
    kind: str,
    checkpoint: str | Path,
    data_snapshot: Sequence[str],
    data_hash: str,
    config: Mapping[str, Any] | Any,
    metrics: Mapping[str, Any],
    model_id: str | None = None,
    run_id: str | None = None,
) -> ModelRecord:
    """Copy a local checkpoint into ``<lake>/models/<kind>/<model_id><suffix>`` and append its row.

    The default id, ``<kind>-<12 hex>``, hashes kind, data hash and config, so registering the same
    training again supersedes the row instead of adding a twin.
    """
    for label, value in (("kind", kind), ("model_id", model_id)):
        if value is not None and not _SAFE_ID.match(value):
            raise ValueError(f"{label} {value!r} may hold only letters, digits and ._+-")
    config_dict = config.model_dump(mode="json") if hasattr(config, "model_dump") else dict(config)
    config_hash = settings_hash(config_dict)
    model_id = model_id or f"{kind}-{settings_hash({'kind': kind, 'data': data_hash, 'config': config_hash})}"
    src = Path(checkpoint)
    if not src.is_file():
        raise FileNotFoundError(f"checkpoint {src} does not exist")
    rel = lake.put_file(src, "models", kind, model_id + "".join(src.suffixes))
    row = {
        "model_id": model_id,
        "kind": kind,
        "path": rel,
        "data_snapshot": list(data_snapshot),
        "data_hash": data_hash,
        "config_json": canonical_json(config_dict),
        "metrics_json": canonical_json(metrics),
        "settings_hash": config_hash,
    }
    lake.append("models", [row], run_id=run_id)
    return ModelRecord.from_row(row)


def get_model(lake: Lake, model_id: str) -> ModelRecord:
    """The registered model with this id; ModelNotFoundError if there is none."""
    rows = lake.query("SELECT * FROM models WHERE model_id = ?", [model_id]).to_pylist()
    if not rows:
        raise ModelNotFoundError(f"no model {model_id!r} in the registry of {lake.url}")
    return ModelRecord.from_row(rows[0])


def latest_model(lake: Lake, kind: str) -> ModelRecord:
    """The most recently registered model of a kind; ModelNotFoundError if none was trained yet."""
    rows = lake.query("SELECT * FROM models WHERE kind = ? ORDER BY created_at DESC LIMIT 1", [kind]).to_pylist()
    if not rows:
        raise ModelNotFoundError(f"no {kind} model registered in {lake.url}; train one first (matloop train ...)")
    return ModelRecord.from_row(rows[0])


def resolve_model(lake: Lake, kind: str, model_id: str | None = None) -> ModelRecord:
    """The model ``model_id`` (checked to be of ``kind``), or the latest of ``kind`` when None."""
    record = latest_model(lake, kind) if model_id is None else get_model(lake, model_id)
    if record.kind != kind:
        raise ValueError(f"model {record.model_id!r} is a {record.kind} model, not {kind}")
    return record


def checkpoint_path(lake: Lake, record: ModelRecord) -> Path:
    """A local path to the model's checkpoint: in place for a local lake, else downloaded once to the cache."""
    if lake.local:
        path = Path(lake.path(record.path))
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint of {record.model_id} missing at {path}")
        return path
    local = Path(get_settings().cache_dir).expanduser() / "models" / settings_hash(lake.url) / record.path
    if not local.is_file():
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(local.name + ".tmp")
        lake.fs.get_file(lake.path(record.path), str(tmp))
        tmp.replace(local)
    return local
