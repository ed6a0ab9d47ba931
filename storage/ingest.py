"""Loading a source into the lake: resolve it, skip what is already there, append the rest."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from core.ingest import (
    IngestError,
    IngestFilters,
    IngestReport,
    Record,
    fetch_matbench,
    prepare,
    read_folder,
    read_json_source,
)
from core.settings import get_settings
from core.structures import formula_of
from storage.lake import Lake
from storage.rows import MODULI, Origin, label_rows
from storage.schemas import STRUCTURES

DATASET_LABELS = ("k_vrh", "g_vrh", "formation_energy_per_atom")
"""The scalar labels a dataset record may carry (its tensor is written too)."""

NAMED_SOURCES = ("matbench_log_kvrh", "seed")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+@-]*")


def source_name(source: str) -> str:
    """The partition-safe name a source's rows carry (``dataset:<name>`` in ``properties.method``)."""
    if source in NAMED_SOURCES:
        return source
    path = Path(source)
    stem = path.name
    for suffix in (".gz", ".json"):
        stem = stem.removesuffix(suffix)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-") or "source"
    return f"folder-{name}" if path.is_dir() else name


def read_source(source: str, properties_csv: Path | None = None) -> Iterable[Record]:
    """Records of a named dataset, a matbench/matminer/MP JSON(.gz) file, or a folder of structure files."""
    if source == "matbench_log_kvrh":
        return read_json_source(fetch_matbench(Path(get_settings().cache_dir).expanduser()))
    path = Path(source)
    if path.is_dir():
        return read_folder(path, properties_csv)
    if path.is_file():
        return read_json_source(path)
    raise IngestError(f"unknown source {source!r}: give {', '.join(NAMED_SOURCES)}, a JSON(.gz) file or a folder")


def ingest(
    lake: Lake,
    source: str,
    *,
    filters: IngestFilters | None = None,
    name: str | None = None,
    properties_csv: Path | None = None,
    run_id: str | None = None,
    progress: Callable[[Iterable[Record]], Iterable[Record]] = lambda it: it,
) -> IngestReport:
    """Ingest one source; a second ingest of the same source adds nothing."""
    if source == "seed":
        return ingest_seed(lake, run_id=run_id)
    if name and not _SAFE_NAME.fullmatch(name):  # the name becomes a partition folder and a method tag
        raise IngestError(f"source name {name!r} may hold only letters, digits and ._+@- (no '/', no spaces)")
    name = name or source_name(source)
    records = read_source(source, properties_csv)
    with lake.exclusive("ingest"):  # what is there, then what to add: one writer at a time
        known_structures = {r["structure_id"] for r in lake.query("SELECT structure_id FROM structures").to_pylist()}
        known_labels = {
            r["structure_id"]
            for r in lake.query(
                "SELECT structure_id FROM properties WHERE name = 'k_vrh' AND method = ?", [f"dataset:{name}"]
            ).to_pylist()
        }
        known_quarantine = {
            r["record_id"] for r in lake.query("SELECT record_id FROM quarantine WHERE source = ?", [name]).to_pylist()
        }
        out = prepare(records, name, filters, known_structures, known_labels, known_quarantine, progress)
        origin = Origin(method=f"dataset:{name}")
        properties = [
            row
            for sid, props in out.labels
            for row in label_rows(sid, origin, {k: props.get(k) for k in DATASET_LABELS}, props.get("elastic_tensor"))
        ]
        # Structures first: a property never refers to a structure that is not there.
        lake.append("structures", out.structures, run_id=run_id)
        lake.append("properties", properties, run_id=run_id)
        lake.append("quarantine", out.quarantine, run_id=run_id)
    return out.report


def seed_rows(path: str | Path | None = None) -> dict[str, list[dict[str, Any]]]:
    """The seed file (``core/data/seed.parquet``, or ``path``) as ``structures`` and ``properties`` rows."""
    import pyarrow.parquet as pq

    from core.seed import SEED_PATH

    path = Path(path or SEED_PATH)
    if not path.is_file():
        raise FileNotFoundError(f"no seed set at {path}; build it with `matloop seed`")
    structures, properties = [], []
    for row in pq.read_table(path).to_pylist():
        structure = {k: row[k] for k in STRUCTURES.names if k in row}
        structures.append(structure | {"formula": formula_of(row["species"]), "parent_ids": []})
        origin = Origin(
            method=row["method"], model_id=row["method"].removeprefix("fam:"), settings_hash=row["settings_hash"]
        )
        origin = origin.model_copy(update={"flags": tuple(row["flags"] or ())})
        values = {name: row[name] for name in (*MODULI, "energy_per_atom")}
        properties += label_rows(row["structure_id"], origin, values, row["c_voigt"])
    return {"structures": structures, "properties": properties}


def ingest_seed(lake: Lake, run_id: str | None = None) -> IngestReport:
    """The committed, FAM-labeled seed set (``core/data/seed.parquet``): rows the lake lacks are added."""
    from core.seed import SOURCE

    rows = seed_rows()
    with lake.exclusive("ingest"):
        return _add_seed(lake, rows, SOURCE, run_id)


def _add_seed(lake: Lake, rows: dict[str, list[dict]], source: str, run_id: str | None) -> IngestReport:
    have = {r["structure_id"] for r in lake.query("SELECT structure_id FROM structures").to_pylist()}
    labels = {
        (r["structure_id"], r["name"], r["method"])
        for r in lake.query("SELECT structure_id, name, method FROM properties").to_pylist()
    }
    structures = [r for r in rows["structures"] if r["structure_id"] not in have]
    properties = [r for r in rows["properties"] if (r["structure_id"], r["name"], r["method"]) not in labels]
    lake.append("structures", structures, run_id=run_id)
    lake.append("properties", properties, run_id=run_id)
    report = IngestReport(source, read=len(rows["structures"]), landed=len(structures))
    report.already_present = report.read - report.landed
    return report
