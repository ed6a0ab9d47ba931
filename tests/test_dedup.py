"""Duplicate detection: StructureMatcher semantics, buckets that avoid needless fits."""

from __future__ import annotations

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure
from pymatgen.core.structure_matcher import StructureMatcher

from core.dedup import find_duplicates
from core.structures import structure_id


def _b2(a: float = 3.0, elements: tuple[str, str] = ("Ni", "Ti")) -> Structure:
    return Structure(Lattice.cubic(a), list(elements), [[0, 0, 0], [0.5, 0.5, 0.5]])


def _l10(a: float = 3.9) -> Structure:
    return Structure(
        Lattice.tetragonal(a, a * 0.93),
        ["Ni", "Ni", "Ti", "Ti"],
        [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]],
    )


def _rattled(s: Structure, amount: float, seed: int) -> Structure:
    rng = np.random.default_rng(seed)
    out = s.copy()
    for i in range(len(out)):
        out.translate_sites([i], rng.normal(0, amount, 3), frac_coords=False)
    return out


def _item(s: Structure) -> tuple[str, Structure]:
    return structure_id(s), s


@pytest.fixture
def fit_calls(monkeypatch) -> list[int]:
    """Count StructureMatcher.fit calls."""
    calls: list[int] = []
    original = StructureMatcher.fit

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StructureMatcher, "fit", counting)
    return calls


def test_duplicates_of_known_and_within_batch() -> None:
    known = [_item(_b2())]
    batch = [
        _item(_rattled(_b2(3.05) * (2, 2, 1), 0.03, 0)),  # known, as a strained rattled supercell
        _item(_l10()),  # new
        _item(_rattled(_l10(3.95), 0.03, 1)),  # same as the previous one
        _item(_b2(elements=("Ni", "Al"))),  # other formula
    ]
    dups = find_duplicates(batch, known)
    assert set(dups) == {0, 2}
    assert dups[0].known and dups[0].of == known[0][0]
    assert not dups[2].known and dups[2].of == batch[1][0]
    assert "known structure" in dups[0].reason and "earlier candidate" in dups[2].reason


def test_same_formula_different_crystal_is_unique() -> None:
    # B2 and L1_0 NiTi share the reduced formula but are different crystals
    assert find_duplicates([_item(_l10())], [_item(_b2())]) == {}


def test_identical_ids_need_no_fit(fit_calls: list[int]) -> None:
    s = _l10()
    dups = find_duplicates([_item(s), _item(s * (1, 1, 2))], [])
    assert set(dups) == {1} and dups[1].of == structure_id(s)
    assert fit_calls == []


def test_buckets_skip_other_formulas_and_sizes(fit_calls: list[int]) -> None:
    batch = [_item(_b2(elements=pair)) for pair in [("Ni", "Al"), ("Co", "Ti"), ("Fe", "Al"), ("Cu", "Zn")]]
    known = [_item(_b2(elements=("Ni", "Ti"))), _item(_b2(elements=("Pd", "Ti")))]
    assert find_duplicates(batch, known) == {}
    assert fit_calls == []  # every formula alone in its bucket
    # same formula, but primitive cells of 4 and 2 sites: the matcher would refuse, so no fit is tried
    four_site = Structure(
        Lattice.from_parameters(4.1, 4.5, 4.9, 84, 97, 101),
        ["Ni", "Ni", "Ti", "Ti"],
        [[0, 0, 0], [0.41, 0.13, 0.52], [0.23, 0.61, 0.17], [0.72, 0.44, 0.81]],
    )
    assert len(four_site.get_primitive_structure()) == 4
    assert find_duplicates([_item(four_site)], [_item(_b2())]) == {}
    assert fit_calls == []


def test_batch_order_decides_which_copy_survives() -> None:
    a, b = _item(_l10()), _item(_rattled(_l10(), 0.02, 5))
    assert set(find_duplicates([a, b])) == {1}
    assert set(find_duplicates([b, a])) == {1}
