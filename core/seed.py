"""The offline seed set: alloy prototypes over metallic elements, relaxed and labeled with a FAM.

A fresh machine with no network still gets training data: :func:`prototypes` enumerates
unary fcc/bcc/hcp and binary B2, L1_0, L1_2, D0_3, D0_19 and C15 (Laves) cells, :func:`label`
relaxes each with a foundation model and computes its elastic tensor, and :func:`write_seed`
stores the survivors (relaxed, still the same prototype, Born-stable, 0 < K <= 500 GPa) as one
small Parquet file, committed with the project at ``core/data/seed.parquet``.

Every row says it is FAM-labeled: ``method = "fam:<model>"``, structures ``source = "seed"``.
:func:`storage.ingest.seed_rows` turns the file into ``structures`` and ``properties`` rows for the lake.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from ase.calculators.calculator import Calculator
from pymatgen.core import Element, Lattice, Structure

from core.fam import FamOutcome, FamSettings, fam_outcomes
from core.provenance import settings_hash
from core.structures import split_of, to_atoms

SEED_PATH = Path(__file__).parent / "data" / "seed.parquet"
SOURCE = "seed"
MAX_K_GPA = 500.0
"""The reference work's upper bound on K_vrh: labels above it are not kept."""

UNARY_ELEMENTS = (
    "Al",
    "Ti",
    "V",
    "Cr",
    "Fe",
    "Co",
    "Ni",
    "Cu",
    "Zr",
    "Nb",
    "Mo",
    "Ru",
    "Rh",
    "Pd",
    "Ag",
    "Hf",
    "Ta",
    "W",
    "Re",
    "Os",
    "Ir",
    "Pt",
    "Au",
    "Mg",
    "Zn",
    "Sc",
    "Y",
    "Cd",
    "Sn",
    "Pb",
)
BINARY_ELEMENTS = ("Al", "Ti", "Ni", "Cu", "Nb", "Mo", "Ta", "W", "Re", "Ir")
"""Default binary palette: soft to very stiff metals, so the seed set spans the targets (60-400 GPa)."""
UNARY_PROTOTYPES = ("fcc", "bcc", "hcp")
BINARY_PROTOTYPES = ("B2", "L1_0", "L1_2", "D0_3", "D0_19", "C15")
DEFAULT_BINARY_PROTOTYPES = ("B2", "L1_0", "L1_2", "D0_3")
"""Cells of at most 4 atoms, so the committed set builds in minutes; D0_19 (8) and C15 (6) on request."""


def _atomic_volume(symbol: str) -> float:
    """Å^3 per atom of a close-packed crystal of this element, from its metallic radius (nn = 2r)."""
    el = Element(symbol)
    r = float(el.metallic_radius or el.atomic_radius or 1.5)
    return 4 * math.sqrt(2) * r**3


def _cubic(a_sites: Sequence[Sequence[float]], b_sites: Sequence[Sequence[float]], a: str, b: str) -> Structure:
    return Structure(Lattice.cubic(1.0), [a] * len(a_sites) + [b] * len(b_sites), [*a_sites, *b_sites])


def prototype(name: str, a: str, b: str | None = None) -> Structure:
    """One prototype cell with element ``a`` (the majority or first species) and ``b``, at a guessed volume.

    Binary prototypes: B2 (CsCl, AB), L1_0 (CuAu, AB, tetragonal), L1_2 (Cu3Au, A3B), D0_3
    (Fe3Al/BiF3, A3B), D0_19 (Ni3Sn, A3B, hexagonal) and C15 (MgCu2 Laves, B A2: A on 16d).
    The volume is the sum of the elements' close-packed atomic volumes; the relaxation fixes it.
    """
    if name in UNARY_PROTOTYPES:
        if b is not None:
            raise ValueError(f"{name} is a unary prototype")
        s = {
            "fcc": Structure(Lattice([[0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]]), [a], [[0, 0, 0]]),
            "bcc": Structure(Lattice([[-0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.5, 0.5, -0.5]]), [a], [[0, 0, 0]]),
            "hcp": Structure(
                Lattice.hexagonal(1.0, math.sqrt(8 / 3)), [a, a], [[1 / 3, 2 / 3, 0.25], [2 / 3, 1 / 3, 0.75]]
            ),
        }[name]
    elif name in BINARY_PROTOTYPES:
        if b is None or b == a:
            raise ValueError(f"{name} needs two different elements")
        half = 0.5
        if name == "B2":
            s = _cubic([[0, 0, 0]], [[half] * 3], a, b)
        elif name == "L1_0":
            s = Structure(Lattice.tetragonal(1 / math.sqrt(2), 1.0), [a, b], [[0, 0, 0], [half] * 3])
        elif name == "L1_2":
            s = _cubic([[half, half, 0], [half, 0, half], [0, half, half]], [[0, 0, 0]], a, b)
        elif name == "D0_3":
            fcc = Lattice([[0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
            s = Structure(fcc, [a, a, a, b], [[0.25] * 3, [half] * 3, [0.75] * 3, [0, 0, 0]])
        elif name == "D0_19":
            s = Structure.from_spacegroup(
                "P6_3/mmc", Lattice.hexagonal(1.0, 0.8), [b, a], [[1 / 3, 2 / 3, 0.25], [5 / 6, 2 / 3, 0.25]]
            )
        else:  # C15: b on 8a, a on 16d (MgCu2 with Cu = a), origin choice 1 as pymatgen uses
            # a realistic size (7 Å) so get_primitive_structure's absolute tolerance works
            s = Structure.from_spacegroup("Fd-3m", Lattice.cubic(7.0), [b, a], [[0, 0, 0], [5 / 8] * 3])
            s = s.get_primitive_structure()
    else:
        raise ValueError(f"unknown prototype {name!r}; known: {', '.join(UNARY_PROTOTYPES + BINARY_PROTOTYPES)}")
    s.scale_lattice(sum(_atomic_volume(site.specie.symbol) for site in s))
    return s


def prototypes(
    unary: Sequence[str] = UNARY_ELEMENTS,
    binary: Sequence[str] = BINARY_ELEMENTS,
    unary_prototypes: Sequence[str] = UNARY_PROTOTYPES,
    binary_prototypes: Sequence[str] = DEFAULT_BINARY_PROTOTYPES,
) -> Iterator[tuple[str, Structure]]:
    """Every (label, structure): unary prototypes over ``unary``, binary ones over ordered pairs of ``binary``.

    Ordered pairs because A3B and AB3 (and AB2 / A2B) are different crystals; the AB prototypes
    (B2, L1_0) are symmetric, so they take each unordered pair once.
    """
    for el, proto in itertools.product(unary, unary_prototypes):
        yield f"{proto}:{el}", prototype(proto, el)
    for a, b in itertools.permutations(binary, 2):
        for proto in binary_prototypes:
            if proto in ("B2", "L1_0") and a > b:
                continue
            yield f"{proto}:{a}-{b}", prototype(proto, a, b)


def _keep(outcome: FamOutcome) -> str | None:
    """Why a labeled prototype is not fit for the seed set, or None if it is."""
    el = outcome.elastic
    if outcome.error:
        return outcome.error
    if not outcome.relax_converged or not outcome.matches_input:
        return "did not relax to the same prototype"
    if el is None or el.k_vrh is None:
        return "no elastic tensor"
    if not el.born_stable:
        return "Born-unstable"
    if not 0 < el.k_vrh <= MAX_K_GPA:
        return f"K_vrh {el.k_vrh:.0f} GPa outside (0, {MAX_K_GPA:g}]"
    return None


def label(
    items: Sequence[tuple[str, Structure]],
    calculator: Calculator,
    model_name: str,
    settings: FamSettings | None = None,
    batch_size: int = 32,
    progress: Callable[[int, int, str], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Relax and label prototypes; returns (seed rows for the kept ones, {label: reason} for the dropped).

    ``progress(done, total, label)`` is called after each structure.
    """
    settings = settings or FamSettings()
    shash = settings_hash(settings)
    rows: list[dict[str, Any]] = []
    dropped: dict[str, str] = {}
    done = 0
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        atoms = [to_atoms(s) for _, s in chunk]
        for (name, _), outcome in zip(chunk, fam_outcomes(atoms, calculator, model_name, settings), strict=True):
            reason = _keep(outcome)
            if reason:
                dropped[name] = reason
            else:
                rows.append(seed_row(name, outcome, shash))
            done += 1
            if progress:
                progress(done, len(items), name)
    return rows, dropped


def seed_row(name: str, outcome: FamOutcome, shash: str) -> dict[str, Any]:
    """One row of the seed file: the relaxed structure's columns plus its FAM labels and provenance."""
    el = outcome.elastic
    assert el is not None and outcome.relaxed is not None
    return {
        **outcome.relaxed,
        "source": SOURCE,
        "source_id": name,
        "split": split_of(outcome.relaxed["structure_id"]),
        "method": f"fam:{outcome.model_name}",
        "settings_hash": shash,
        "k_vrh": el.k_vrh,
        "g_vrh": el.g_vrh,
        "k_voigt": el.k_voigt,
        "k_reuss": el.k_reuss,
        "g_voigt": el.g_voigt,
        "g_reuss": el.g_reuss,
        "eos_k": el.eos_k,
        "c_voigt": el.c_voigt,
        "flags": el.flags,
        "energy_per_atom": outcome.energy_per_atom,
    }


def write_seed(rows: Sequence[dict[str, Any]], path: str | Path = SEED_PATH) -> Path:
    """Write the seed rows as one zstd Parquet file (deduplicated by structure_id, sorted), atomically."""
    unique = {r["structure_id"]: r for r in rows}
    table = pa.Table.from_pylist([unique[k] for k in sorted(unique)])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(path)
    return path
