"""Crystal structures: the row format, lossless conversions, canonical ids, validity checks.

A ``structure_id`` is a hash of invariants of the crystal, not of the cell it is written in:
the reduced formula, the volume per atom, and the multiset of per-site environments (each
site's species with the sorted species-and-distance list of its neighbours within a cutoff
scaled to the atomic volume). Supercells, site permutations, translations and other cell
settings give the same invariants; crystals that differ by more than the rounding (0.01 Å,
0.01 Å^3/atom) give different ones. Distances cannot tell mirror images apart, so enantiomorphs
(P6_222 and P6_422 CrSi2) share an id, as they share every elastic modulus; StructureMatcher
matches them too. It is pure numpy, about a millisecond per small cell.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import multiprocessing
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
from ase import Atoms
from pymatgen.core import Composition, Element, Lattice, Structure

DISTANCE_DECIMALS = 2
VOLUME_DECIMALS = 2
MIN_DISTANCE = 0.5
"""Å: two atoms closer than this make a structure invalid."""
_CUTOFF_FACTOR = 2.0
"""Neighbour cutoff in units of (V/N)^(1/3); the nearest neighbour always lies within it (Hermite bound ~1.12)."""

MAX_IMAGE_REACH = 60
"""Periodic images searched per direction at most; a flatter cell is rejected, not searched."""

SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


# ---------- conversions ----------
def formula_of(species: Sequence[str]) -> str:
    """``structures.formula``: the cell's element counts in alphabetical order (``Al3Ti1``), whoever writes it."""
    return "".join(f"{el}{n}" for el, n in sorted(Counter(species).items()))


def to_row(structure: Structure) -> dict[str, Any]:
    """The structural columns of a ``structures`` row (ids and provenance added by the caller)."""
    comp = structure.composition
    elements = sorted({el.symbol for el in comp.elements})
    species = [site.specie.symbol for site in structure]
    return {
        "structure_id": structure_id(structure),
        "formula": formula_of(species),
        "reduced_formula": comp.reduced_formula,
        "elements": elements,
        "nelements": len(elements),
        "nsites": len(structure),
        "lattice": structure.lattice.matrix.tolist(),
        "species": species,
        "frac_coords": structure.frac_coords.tolist(),
        "volume": float(structure.volume),
    }


def from_row(row: dict[str, Any]) -> Structure:
    """A pymatgen Structure from a ``structures`` row."""
    return Structure(
        Lattice(np.asarray(row["lattice"], dtype=float)),
        list(row["species"]),
        np.asarray(row["frac_coords"], dtype=float),
    )


def to_atoms(structure: Structure) -> Atoms:
    """ASE Atoms with the same cell, species and positions (periodic in 3-D)."""
    return Atoms(
        symbols=[site.specie.symbol for site in structure],
        cell=structure.lattice.matrix,
        scaled_positions=structure.frac_coords,
        pbc=True,
    )


def from_atoms(atoms: Atoms) -> Structure:
    """A pymatgen Structure from ASE Atoms."""
    lattice = Lattice(np.asarray(atoms.cell[:]))
    return Structure(lattice, atoms.get_chemical_symbols(), atoms.get_scaled_positions(wrap=False))


# ---------- geometry ----------
@functools.lru_cache(maxsize=256)
def _offset_grid(reach: tuple[int, int, int]) -> np.ndarray:
    ranges = [np.arange(-r, r + 1) for r in reach]
    return np.stack(np.meshgrid(*ranges, indexing="ij"), axis=-1).reshape(-1, 3)


def cell_heights(lattice: np.ndarray) -> np.ndarray:
    """Distances between opposite faces of the cell (Å); near zero for a flat cell."""
    inv = np.linalg.inv(lattice)
    return 1.0 / np.sqrt((inv * inv).sum(axis=0))


def _image_offsets(lattice: np.ndarray, cutoff: float) -> np.ndarray:
    """Integer lattice translations that can hold a neighbour within ``cutoff`` of the home cell."""
    reach = np.ceil(cutoff / cell_heights(lattice))
    if reach.max() > MAX_IMAGE_REACH:
        raise ValueError(f"cell too flat for a neighbour search (face spacing {cell_heights(lattice).min():.3g} Å)")
    return _offset_grid(tuple(int(r) for r in reach))


def pair_distances(lattice: np.ndarray, frac: np.ndarray, cutoff: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (i, j, d) with 0 < d <= cutoff between site i and any periodic image of site j."""
    cart = np.mod(frac, 1.0) @ lattice
    shifts = _image_offsets(lattice, cutoff) @ lattice
    # vec[i, j, k] = cart[j] + shifts[k] - cart[i]
    vec = (cart[None, :, :] - cart[:, None, :])[:, :, None, :] + shifts[None, None, :, :]
    d2 = np.einsum("ijkx,ijkx->ijk", vec, vec)
    mask = (d2 <= cutoff * cutoff) & (d2 > 1e-16)
    i, j, _ = np.nonzero(mask)
    return i, j, np.sqrt(d2[mask])


def min_distance(structure: Structure) -> float:
    """Shortest interatomic distance, periodic images included."""
    return describe(structure.lattice.matrix, [s.specie.symbol for s in structure], structure.frac_coords)[1]


# ---------- identity ----------
def describe(lattice: np.ndarray, species: list[str], frac: np.ndarray) -> tuple[str, float]:
    """(structure_id, shortest interatomic distance) from raw arrays, with one neighbour search.

    Each site's environment is encoded as integers (neighbour element index, distance in units
    of 10^-DISTANCE_DECIMALS Å), sorted, so the fingerprint needs no per-neighbour Python work.
    """
    lattice = np.asarray(lattice, dtype=float)
    frac = np.asarray(frac, dtype=float)
    n = len(species)
    vpa = abs(float(np.linalg.det(lattice))) / n
    i, j, d = pair_distances(lattice, frac, _CUTOFF_FACTOR * vpa ** (1 / 3))
    dmin = float(d.min()) if d.size else math.inf
    elements = sorted(set(species))
    kind = np.array([elements.index(x) for x in species], dtype=np.int64)
    code = kind[j] * 10**9 + np.rint(d * 10**DISTANCE_DECIMALS).astype(np.int64)
    order = np.lexsort((code, i))
    i, code = i[order], code[order]
    bounds = np.searchsorted(i, np.arange(n + 1))
    envs = Counter(kind[k].tobytes() + code[bounds[k] : bounds[k + 1]].tobytes() for k in range(n))
    g = math.gcd(*envs.values())
    counts = Counter(species)
    gc = math.gcd(*counts.values())
    fingerprint = {
        "composition": [(el, counts[el] // gc) for el in elements],
        "vpa": f"{vpa:.{VOLUME_DECIMALS}f}",
        "envs": sorted((env.hex(), c // g) for env, c in envs.items()),
    }
    blob = json.dumps(fingerprint, separators=(",", ":"))
    return "ml-" + hashlib.sha256(blob.encode()).hexdigest()[:20], dmin


def _describe_args(args: tuple[np.ndarray, list[str], np.ndarray]) -> tuple[str, float]:
    return describe(*args)


def describe_many(
    items: Sequence[tuple[np.ndarray, list[str], np.ndarray]], workers: int | None = None, parallel_above: int = 2000
) -> list[tuple[str, float]]:
    """``describe`` for many structures; above ``parallel_above`` items it uses one process per core."""
    workers = workers or os.cpu_count() or 1
    if len(items) <= parallel_above or workers == 1:
        return [describe(*it) for it in items]
    ctx = multiprocessing.get_context("spawn")  # no fork: the caller may hold threads (DuckDB, torch)
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return list(pool.map(_describe_args, items, chunksize=max(64, len(items) // (8 * workers))))


def structure_id(structure: Structure) -> str:
    """Canonical id: equal for the same crystal in any cell, setting, origin or site order."""
    return describe(structure.lattice.matrix, [s.specie.symbol for s in structure], structure.frac_coords)[0]


def split_of(structure_id: str) -> str:
    """train | val | test, fixed forever by the id (so every model uses the same split)."""
    u = int(hashlib.sha256(structure_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    edge = 0.0
    for name, frac in SPLIT_FRACTIONS.items():
        edge += frac
        if u < edge:
            return name
    return "test"


# ---------- checks ----------
NON_METALS = frozenset(["H", "B", "C", "N", "O", "F", "P", "S", "Cl", "Se", "Br", "I", "At"])
"""The reference work's non-metals (plus noble gases and actinides, see ``excluded_reason``)."""


def excluded_reason(elements: list[str]) -> str | None:
    """Why a composition is outside the metallic-alloy domain, or None if it is inside."""
    for symbol in elements:
        el = Element(symbol)
        if symbol in NON_METALS:
            return f"non-metal {symbol}"
        if el.is_noble_gas:
            return f"noble gas {symbol}"
        if el.is_actinoid:
            return f"actinide {symbol}"
    return None


def symmetrize(structure: Structure, symprec: float) -> Structure:
    """The primitive standard cell of ``structure`` idealized to the space group spglib finds at ``symprec`` (Å).

    A generated crystal that sits within ``symprec`` of a symmetric arrangement (a B2 cell with
    one atom 0.05 Å off its site, say) becomes that arrangement: forces then respect the
    symmetry, so a relaxation keeps it, where from the distorted P1 cell it would fall to the
    symmetric minimum and no longer match the input. A crystal with no symmetry beyond P1 at this
    tolerance, or one spglib cannot analyse, comes back unchanged.
    """
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    try:
        analyzer = SpacegroupAnalyzer(structure, symprec=symprec)
        if analyzer.get_space_group_number() == 1:
            return structure
        return analyzer.get_primitive_standard_structure()
    except (ValueError, TypeError, RuntimeError):  # spglib found no dataset
        return structure


def validity_problem(structure: Structure) -> str | None:
    """Why a structure is physically invalid (overlapping atoms, degenerate cell), or None."""
    vpa = structure.volume / len(structure)
    if not np.isfinite(structure.lattice.matrix).all() or not np.isfinite(structure.frac_coords).all():
        return "non-finite lattice or coordinates"
    if not 1.0 < vpa < 200.0:
        return f"volume per atom {vpa:.2f} Å^3 outside (1, 200)"
    spacing = float(cell_heights(structure.lattice.matrix).min())
    if spacing < MIN_DISTANCE:
        return f"flat cell: opposite faces {spacing:.2f} Å apart"
    dmin = min_distance(structure)
    if dmin < MIN_DISTANCE:
        return f"atoms {dmin:.2f} Å apart (minimum {MIN_DISTANCE} Å)"
    return None


def reduced_formula(species: list[str]) -> str:
    return Composition(Counter(species)).reduced_formula
