"""Reading reference data into lake rows: source readers, the reference work's filters, quarantine.

Every source is read into ``Record``s (an id, a structure dict or a reason it is unreadable,
and properties in GPa / eV). ``prepare`` turns records into ``structures``, ``properties`` and
``quarantine`` rows: a record that cannot be trusted (unreadable, unknown element, atoms
closer than 0.5 Å, a NaN or missing K) goes to quarantine with its reason, a record outside
the alloy domain is dropped by a named filter and counted, and the rest lands. Nothing here
writes: callers append the rows, so ingest stays testable without a lake.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import math
import shutil
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field, model_validator
from pymatgen.core import Element

from core.structures import (
    MIN_DISTANCE,
    cell_heights,
    describe_many,
    excluded_reason,
    formula_of,
    reduced_formula,
    split_of,
)

MATBENCH_LOG_KVRH_URL = "https://ml.materialsproject.org/projects/matbench_log_kvrh.json.gz"
MATBENCH_LOG_KVRH_SHA256 = "44b113ddb7e23aa18731a62c74afa7e5aa654199e0db5f951c8248a00955c9cd"
STRUCTURE_FILE_SUFFIXES = (".cif", ".vasp", ".poscar", ".extxyz", ".xyz")
_K_KEYS = ("K_VRH", "k_vrh", "bulk_modulus_vrh", "log10(K_VRH)")
_G_KEYS = ("G_VRH", "g_vrh", "shear_modulus_vrh", "log10(G_VRH)")
_EFORM_KEYS = ("formation_energy_per_atom", "e_form")


class IngestError(RuntimeError):
    """A source that cannot be read at all (missing file, no network for a download, bad checksum)."""


class IngestFilters(BaseModel):
    """The reference work's dataset filters; set a field to None (or False) to switch it off."""

    metals_only: bool = Field(
        True, description="drop non-metals (H B C N O F P S Cl Se Br I At), noble gases, actinides"
    )
    max_sites: int | None = Field(20, ge=1, description="drop cells with more atoms than this")
    k_vrh_min: float | None = Field(0.0, allow_inf_nan=False, description="drop K_vrh <= this (GPa)")
    k_vrh_max: float | None = Field(500.0, allow_inf_nan=False, description="drop K_vrh > this (GPa)")
    max_formation_energy: float | None = Field(
        0.150, allow_inf_nan=False, description="eV/atom; applied where the source has it"
    )

    @model_validator(mode="after")
    def _range_is_not_empty(self) -> IngestFilters:
        """A K_vrh window that keeps nothing is a typo, not a filter."""
        if self.k_vrh_min is not None and self.k_vrh_max is not None and self.k_vrh_min >= self.k_vrh_max:
            raise ValueError(f"k_vrh_min {self.k_vrh_min:g} must be below k_vrh_max {self.k_vrh_max:g}")
        return self


@dataclass
class Record:
    """One entry of a source, before any check."""

    record_id: str
    structure: dict[str, Any] | None  # {"lattice": 3x3, "species": [...], "frac_coords": nx3}
    properties: dict[str, Any] = field(default_factory=dict)  # k_vrh, g_vrh (GPa), formation energy, tensor
    error: str | None = None  # why the structure could not be read


@dataclass
class IngestReport:
    """What an ingest did, for the command's summary and the tests."""

    source: str
    read: int = 0
    landed: int = 0
    already_present: int = 0
    """Records whose structure (with its labels) is in the lake already."""
    repeated_in_source: int = 0
    """Records repeating a structure that an earlier record of the same source already brought."""
    filtered: Counter[str] = field(default_factory=Counter)
    quarantined: Counter[str] = field(default_factory=Counter)

    def lines(self) -> list[str]:
        out = [
            f"source {self.source}: read {self.read}, landed {self.landed}, already in the lake {self.already_present}"
            + (f", repeated within the source {self.repeated_in_source}" if self.repeated_in_source else "")
        ]
        out += [f"  filtered ({name}): {n}" for name, n in sorted(self.filtered.items())]
        out += [f"  quarantined ({name}): {n}" for name, n in sorted(self.quarantined.items())]
        return out


# ---------- structure dicts ----------
def _structure_arrays(d: dict[str, Any]) -> dict[str, Any]:
    """Lattice, species and fractional coordinates from a pymatgen Structure dict (no Structure built)."""
    lattice = np.asarray(d["lattice"]["matrix"], dtype=float)
    species, frac = [], []
    for site in d["sites"]:
        occupancy = site["species"]
        if len(occupancy) != 1 or abs(float(occupancy[0].get("occu", 1.0)) - 1.0) > 1e-6:
            raise ValueError("disordered site (partial occupancy) is not supported")
        species.append(occupancy[0]["element"])
        frac.append(site["abc"])
    return {"lattice": lattice, "species": species, "frac_coords": np.asarray(frac, dtype=float)}


MAX_FRACTIONAL = 10.0
"""A fractional coordinate beyond this is an error in the file, not a position: wrapping it into the
cell would turn it into noise (1e30 mod 1 is 0)."""


def check_cif_values(path: Path) -> None:
    """Raise ValueError for a CIF whose raw cell or fractional coordinates cannot describe a crystal.

    Checked on the raw values because ASE's reader wraps every site into the cell and builds some
    cell from any six numbers.
    """
    from ase.io.cif import parse_cif

    for block in parse_cif(str(path)):
        for tag in ("_atom_site_fract_x", "_atom_site_fract_y", "_atom_site_fract_z"):
            for value in block.get(tag) or []:
                if not isinstance(value, int | float):
                    raise ValueError(f"{tag} {value!r} is not a number")
                if not (math.isfinite(value) and abs(value) <= MAX_FRACTIONAL):
                    raise ValueError(f"{tag} {value:g} is outside ±{MAX_FRACTIONAL:g}")
        lengths = [block.get(f"_cell_length_{axis}") for axis in "abc"]
        angles = [block.get(f"_cell_angle_{name}") for name in ("alpha", "beta", "gamma")]
        if any(isinstance(v, int | float) and not v > 0 for v in lengths):
            raise ValueError(f"cell lengths {lengths} must be positive")
        if all(isinstance(v, int | float) for v in angles) and not _angles_make_a_cell(*angles):
            raise ValueError(f"cell angles {angles} do not make a cell")


def _angles_make_a_cell(alpha: float, beta: float, gamma: float) -> bool:
    """Each angle in (0, 180), their sum below 360 and each below the sum of the other two."""
    return (
        all(0 < x < 180 for x in (alpha, beta, gamma))
        and alpha + beta + gamma < 360
        and (max(alpha, beta, gamma) < alpha + beta + gamma - max(alpha, beta, gamma))
    )


def _structure_from_file(path: Path) -> dict[str, Any]:
    from ase.io import read  # local: ASE's IO registry is slow to import

    if path.suffix.lower() == ".cif":
        check_cif_values(path)
    atoms = read(path)
    return {
        "lattice": np.asarray(atoms.cell[:], dtype=float),
        "species": atoms.get_chemical_symbols(),
        "frac_coords": atoms.get_scaled_positions(wrap=False),
    }


def _number(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _first(row: dict[str, Any], keys: Iterable[str]) -> tuple[str | None, Any]:
    for k in keys:
        if k in row and row[k] is not None:
            return k, row[k]
    return None, None


def _properties(row: dict[str, Any]) -> dict[str, Any]:
    """K, G (GPa; log10 columns converted), formation energy and elastic tensor from a source row."""
    props: dict[str, Any] = {}
    for name, keys in (("k_vrh", _K_KEYS), ("g_vrh", _G_KEYS)):
        key, value = _first(row, keys)
        value = _number(value)
        if key is not None and key.startswith("log10(") and value is not None:
            value = 10.0**value
        props[name] = value
    props["formation_energy_per_atom"] = _number(_first(row, _EFORM_KEYS)[1])
    tensor = row.get("elastic_tensor")
    if isinstance(tensor, dict) and "data" in tensor:
        tensor = tensor["data"]
    if tensor is not None:
        props["elastic_tensor"] = tensor
    return props


def _record(record_id: str, row: dict[str, Any], structure: Any) -> Record:
    try:
        if isinstance(structure, str):
            structure = json.loads(structure)
        arrays = _structure_arrays(structure)
    except Exception as exc:  # any malformed entry is quarantined, never fatal
        return Record(record_id, None, _properties(row), error=f"{type(exc).__name__}: {exc}")
    return Record(record_id, arrays, _properties(row))


# ---------- readers ----------
def _load_json(path: Path) -> Any:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise IngestError(f"no such file: {path}") from None
    except EOFError:
        raise IngestError(
            f"{path} is truncated: the gzip stream ends early (an incomplete download or copy?)"
        ) from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IngestError(f"{path} is not readable JSON: {exc}") from None


def read_json_source(path: Path) -> Iterator[Record]:
    """A matbench/matminer table (pandas ``split`` JSON) or a JSON list of records (the MP export).

    The file is read and its shape checked at once, so an unreadable source fails before anything is written.
    """
    data = _load_json(path)
    if not (isinstance(data, dict) and {"columns", "data"} <= set(data)) and not isinstance(data, list):
        raise IngestError(f"{path}: expected a matbench/matminer table or a list of records")
    return _json_records(data)


def _json_records(data: Any) -> Iterator[Record]:
    """The records of a loaded source; an entry of the wrong shape is one unreadable record, not a crash."""
    if isinstance(data, dict):
        columns = data["columns"]
        index = data.get("index") or list(range(len(data["data"])))
        for idx, values in zip(index, data["data"], strict=False):
            if not isinstance(values, list) or len(values) != len(columns):
                yield Record(str(idx), None, {}, error=f"row has {_size(values)} values for {len(columns)} columns")
                continue
            row = dict(zip(columns, values, strict=True))
            yield _record(str(row.get("material_id") or row.get("mp_id") or idx), row, row.get("structure"))
    else:
        for idx, row in enumerate(data):
            if not isinstance(row, dict):
                yield Record(str(idx), None, {}, error=f"entry is a {type(row).__name__}, not a record (JSON object)")
                continue
            yield _record(str(row.get("mp_id") or row.get("material_id") or idx), row, row.get("structure"))


def _size(values: Any) -> int:
    return len(values) if isinstance(values, list) else 1


def read_folder(folder: Path, properties_csv: Path | None = None) -> Iterator[Record]:
    """Structure files (CIF, POSCAR, extxyz) in a folder, with properties from a CSV keyed by file name.

    The CSV needs a ``file`` column and any of ``k_vrh``, ``g_vrh`` (GPa), ``formation_energy_per_atom``.
    """
    if not folder.is_dir():
        raise IngestError(f"not a folder: {folder}")
    csv_path = properties_csv or folder / "properties.csv"
    table: dict[str, dict[str, Any]] = {}
    if csv_path.exists():
        with open(csv_path, newline="") as fh:
            table = {r["file"]: r for r in csv.DictReader(fh)}
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and (p.suffix.lower() in STRUCTURE_FILE_SUFFIXES or p.name.upper().startswith("POSCAR"))
    )
    for path in files:
        row = {k: (v if v != "" else None) for k, v in table.get(path.name, {}).items()}
        try:
            arrays = _structure_from_file(path)
        except Exception as exc:
            yield Record(path.name, None, _properties(row), error=f"{type(exc).__name__}: {exc}")
            continue
        yield Record(path.name, arrays, _properties(row))


def fetch_matbench(cache_dir: Path, url: str | None = None, sha256: str | None = None, timeout: float = 60) -> Path:
    """Download matbench_log_kvrh once into the cache, verify its checksum, return the local path."""
    url = url or MATBENCH_LOG_KVRH_URL
    sha256 = sha256 or MATBENCH_LOG_KVRH_SHA256
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / url.rsplit("/", 1)[-1]
    if not target.exists():
        tmp = target.with_suffix(target.suffix + ".part")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
                shutil.copyfileobj(response, out)
        except (urllib.error.URLError, OSError) as exc:
            tmp.unlink(missing_ok=True)
            raise IngestError(
                f"could not download {url} ({exc}). Without network access, download the file elsewhere "
                f"and run `matloop ingest <path to {target.name}>`."
            ) from None
        tmp.replace(target)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    if digest != sha256:
        bad = target.with_suffix(target.suffix + ".bad")
        target.replace(bad)
        raise IngestError(f"checksum mismatch for {url}: expected {sha256}, got {digest} (kept as {bad})")
    return target


# ---------- checks, filters, rows ----------
def _quarantine_reason(rec: Record) -> tuple[str, str] | None:
    if rec.structure is None:
        return "unreadable", rec.error or "no structure"
    for symbol in set(rec.structure["species"]):
        if not Element.is_valid_symbol(symbol):
            return "unknown_element", f"unknown element {symbol!r}"
    lattice = np.asarray(rec.structure["lattice"], dtype=float)
    frac = np.asarray(rec.structure["frac_coords"], dtype=float)
    if lattice.shape != (3, 3) or not np.isfinite(lattice).all():
        return "bad_cell", "the lattice is not a finite 3x3 matrix"
    if np.linalg.det(lattice) < 0:
        return "bad_cell", "left-handed cell: a negative cell length, or angles that do not make a cell"
    if abs(np.linalg.det(lattice)) < 1e-6 or cell_heights(lattice).min() < MIN_DISTANCE:
        return "unreadable", "degenerate (flat or singular) cell"
    if not np.isfinite(frac).all() or np.abs(frac).max(initial=0.0) > MAX_FRACTIONAL:
        return "bad_coordinates", f"fractional coordinates non-finite or outside ±{MAX_FRACTIONAL:g}"
    k = rec.properties.get("k_vrh")
    if k is None or not math.isfinite(k):
        return "bad_property", f"k_vrh is {'missing' if k is None else k}"
    return None


def _filter_reason(rec: Record, elements: list[str], nsites: int, filters: IngestFilters) -> str | None:
    if filters.metals_only and excluded_reason(elements):
        return "metals_only"
    if filters.max_sites is not None and nsites > filters.max_sites:
        return "max_sites"
    k = rec.properties["k_vrh"]
    if (filters.k_vrh_min is not None and k <= filters.k_vrh_min) or (
        filters.k_vrh_max is not None and k > filters.k_vrh_max
    ):
        return "k_vrh_range"
    e_form = rec.properties.get("formation_energy_per_atom")
    limit = filters.max_formation_energy
    if limit is not None and e_form is not None and math.isfinite(e_form) and e_form > limit:
        return "formation_energy"
    return None


@dataclass
class Prepared:
    """Structure rows ready to append, the labels each accepted record carries, quarantine rows, and the report.

    ``labels`` pairs a structure id with the record's properties (``k_vrh``, ``g_vrh``,
    ``formation_energy_per_atom``, ``elastic_tensor``); ``storage.rows`` turns them into ``properties`` rows.
    """

    structures: list[dict[str, Any]]
    labels: list[tuple[str, dict[str, Any]]]
    quarantine: list[dict[str, Any]]
    report: IngestReport


def prepare(
    records: Iterable[Record],
    source: str,
    filters: IngestFilters | None = None,
    known_structures: set[str] | frozenset[str] = frozenset(),
    known_labels: set[str] | frozenset[str] = frozenset(),
    known_quarantine: set[str] | frozenset[str] = frozenset(),
    progress: Callable[[Iterable[Record]], Iterable[Record]] = lambda it: it,
) -> Prepared:
    """Check, filter and convert records into rows, skipping what the lake already holds.

    ``known_structures``: structure ids in the lake; ``known_labels``: ids that already have a K from
    this source; ``known_quarantine``: record ids of this source already quarantined.
    """
    filters = filters or IngestFilters()
    report = IngestReport(source)
    out = Prepared([], [], [], report)
    seen: set[str] = set(known_structures)
    labeled: set[str] = set(known_labels)
    records = list(progress(records))
    problems = [_quarantine_reason(rec) for rec in records]
    checkable = [i for i, p in enumerate(problems) if p is None]
    described = dict(
        zip(
            checkable,
            describe_many(
                [
                    (
                        records[i].structure["lattice"],
                        records[i].structure["species"],
                        records[i].structure["frac_coords"],
                    )
                    for i in checkable
                ]
            ),
            strict=True,
        )
    )
    for index, rec in enumerate(records):
        report.read += 1
        problem = problems[index]
        if problem is None:
            s = rec.structure
            sid, dmin = described[index]
            if dmin < MIN_DISTANCE:
                problem = ("overlapping_atoms", f"atoms {dmin:.3f} Å apart")
        if problem is not None:
            report.quarantined[problem[0]] += 1
            if rec.record_id not in known_quarantine:
                out.quarantine.append(
                    {"source": source, "record_id": rec.record_id, "reason": problem[0], "detail": problem[1]}
                )
            continue
        elements = sorted(set(s["species"]))
        reason = _filter_reason(rec, elements, len(s["species"]), filters)
        if reason:
            report.filtered[reason] += 1
            continue
        if sid in labeled:
            if sid in known_labels:
                report.already_present += 1
            else:
                report.repeated_in_source += 1
            continue
        report.landed += 1
        if sid not in seen:
            seen.add(sid)
            out.structures.append(_structure_row(sid, s, elements, source, rec.record_id))
        labeled.add(sid)
        out.labels.append((sid, rec.properties))
    return out


def _structure_row(sid: str, s: dict[str, Any], elements: list[str], source: str, source_id: str) -> dict[str, Any]:
    species = list(s["species"])
    return {
        "structure_id": sid,
        "formula": formula_of(species),
        "reduced_formula": reduced_formula(species),
        "elements": elements,
        "nelements": len(elements),
        "nsites": len(species),
        "lattice": np.asarray(s["lattice"]).tolist(),
        "species": species,
        "frac_coords": np.asarray(s["frac_coords"]).tolist(),
        "volume": abs(float(np.linalg.det(s["lattice"]))),
        "source": source,
        "source_id": source_id,
        "parent_ids": [],
        "split": split_of(sid),
    }
