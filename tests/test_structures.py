"""Canonical structure ids, conversions, validity."""

from __future__ import annotations

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from core.structures import (
    excluded_reason,
    from_atoms,
    from_row,
    min_distance,
    split_of,
    structure_id,
    to_atoms,
    to_row,
    validity_problem,
)


def b2() -> Structure:
    return Structure(Lattice.cubic(2.87), ["Fe", "Al"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def l12() -> Structure:
    return Structure(
        Lattice.cubic(3.57), ["Ni", "Ni", "Ni", "Al"], [[0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5], [0, 0, 0]]
    )


def hcp() -> Structure:
    return Structure(Lattice.hexagonal(2.51, 4.07), ["Co", "Co"], [[1 / 3, 2 / 3, 0.25], [2 / 3, 1 / 3, 0.75]])


@pytest.mark.parametrize("make", [b2, l12, hcp])
def test_same_crystal_same_id(make):
    s = make()
    sid = structure_id(s)
    supercell = s.copy()
    supercell.make_supercell([[2, 0, 0], [0, 1, 1], [0, -1, 1]])
    translated = s.copy()
    translated.translate_sites(list(range(len(s))), [0.137, 0.291, 0.413])
    permuted = Structure(s.lattice, [site.specie for site in s][::-1], s.frac_coords[::-1])
    primitive = s.get_primitive_structure()
    niggli = s.get_reduced_structure("niggli")
    conventional = s.to_conventional()
    rotated_setting = Structure(
        Lattice(s.lattice.matrix[[1, 2, 0]]), [site.specie for site in s], s.frac_coords[:, [1, 2, 0]]
    )
    for other in (supercell, translated, permuted, primitive, niggli, conventional, rotated_setting):
        assert structure_id(other) == sid


def test_different_crystals_different_ids():
    ids = {
        structure_id(b2()),
        structure_id(Structure(Lattice.cubic(2.88), ["Fe", "Al"], [[0, 0, 0], [0.5, 0.5, 0.5]])),  # other volume
        structure_id(Structure(Lattice.cubic(2.87), ["Co", "Al"], [[0, 0, 0], [0.5, 0.5, 0.5]])),  # other species
        structure_id(l12()),
        structure_id(Structure(Lattice.cubic(3.57), ["Al", "Al", "Al", "Ni"], l12().frac_coords)),  # swapped
        structure_id(hcp()),
        structure_id(Structure(Lattice.hexagonal(2.51, 4.2), ["Co", "Co"], hcp().frac_coords)),  # other c/a
    }
    assert len(ids) == 7
    # a distortion of one site by 0.05 Å is a different crystal
    moved = b2()
    moved.translate_sites([1], [0.05 / 2.87, 0, 0])
    assert structure_id(moved) != structure_id(b2())


@pytest.mark.parametrize("make", [b2, l12, hcp])
def test_lossless_round_trips(make):
    s = make()
    back = from_row(to_row(s))
    assert np.allclose(back.lattice.matrix, s.lattice.matrix)
    assert np.allclose(back.frac_coords, s.frac_coords)
    assert [x.specie.symbol for x in back] == [x.specie.symbol for x in s]
    atoms = to_atoms(s)
    assert atoms.pbc.all()
    again = from_atoms(atoms)
    assert np.allclose(again.lattice.matrix, s.lattice.matrix)
    assert np.allclose(again.frac_coords, s.frac_coords)
    assert structure_id(again) == structure_id(s)


def test_row_fields():
    row = to_row(l12())
    assert row["reduced_formula"] == "AlNi3"  # pymatgen orders by electronegativity
    assert row["elements"] == ["Al", "Ni"]
    assert row["nsites"] == 4 and row["nelements"] == 2
    assert row["volume"] == pytest.approx(3.57**3)


def test_validity_and_min_distance():
    assert min_distance(b2()) == pytest.approx(2.87 * np.sqrt(3) / 2)
    assert validity_problem(b2()) is None
    close = Structure(Lattice.cubic(3.0), ["Fe", "Fe"], [[0, 0, 0], [0.1, 0, 0]])
    assert "apart" in validity_problem(close)
    huge = Structure(Lattice.cubic(30.0), ["Fe"], [[0, 0, 0]])
    assert "volume" in validity_problem(huge)
    flat = Structure(Lattice([[40.0, 0, 0], [0, 40.0, 0], [0, 0, 0.01]]), ["Fe"], [[0, 0, 0]])
    assert "flat cell" in validity_problem(flat)  # rejected before any neighbour search


def test_split_is_deterministic_and_balanced():
    ids = [f"ml-{i:020x}" for i in range(5000)]
    splits = [split_of(i) for i in ids]
    assert splits == [split_of(i) for i in ids]
    frac = {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}
    assert frac["train"] == pytest.approx(0.8, abs=0.03)
    assert frac["val"] == pytest.approx(0.1, abs=0.02)


def test_excluded_elements():
    assert excluded_reason(["Fe", "Al"]) is None
    assert excluded_reason(["Fe", "O"]) == "non-metal O"
    assert excluded_reason(["Ar", "Cu"]) == "noble gas Ar"
    assert excluded_reason(["U", "Fe"]) == "actinide U"
