"""Duplicate detection for candidate structures, within a batch and against known structures.

Two structures are duplicates when pymatgen's ``StructureMatcher`` (ltol 0.2, stol 0.3,
angle_tol 5, primitive cells, volume scaling, no supercells) fits them. The matcher is
expensive (milliseconds per pair), so pairs are never enumerated blindly:

1. Same ``structure_id`` (core.structures' canonical id): a duplicate without any fit.
2. Bucket by reduced formula. A structure alone in its bucket is unique; nothing is computed.
3. Inside a bucket, reduce each structure once (Niggli, then primitive cell, exactly as the
   matcher does) and bucket again by the primitive cell's site count: with
   ``attempt_supercell=False`` the matcher refuses structures whose reduced cells differ in size,
   so this split loses no match.
4. Each batch structure, in the given order, is fitted against the known structures of its
   bucket and then against the batch structures already accepted as unique.

Space group is deliberately not a bucket key: the matcher tolerates distortions (stol 0.3 of the
mean site spacing) that change a spglib space group, so a space-group split would miss real
duplicates of noisy generated structures.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from pymatgen.core import Structure
from pymatgen.core.structure_matcher import StructureMatcher
from tqdm import tqdm

MATCHER_SETTINGS = {"ltol": 0.2, "stol": 0.3, "angle_tol": 5.0}
"""The reference work's matcher tolerances."""


@dataclass(frozen=True)
class Duplicate:
    """Batch entry ``index`` matches ``of`` (an id), which is a known structure or an earlier batch entry."""

    index: int
    of: str
    known: bool

    @property
    def reason(self) -> str:
        where = "a known structure" if self.known else "an earlier candidate in this batch"
        return f"duplicate of {where} {self.of}"


def make_matcher() -> StructureMatcher:
    """The matcher with the reference tolerances (primitive cells, scaled volumes, no supercells)."""
    return StructureMatcher(**MATCHER_SETTINGS, primitive_cell=True, scale=True, attempt_supercell=False)


def _reduced(structure: Structure) -> Structure:
    """Niggli-reduced primitive cell, the same reduction StructureMatcher applies before fitting."""
    niggli = structure.get_reduced_structure(reduction_algo="niggli")
    return Structure.from_sites(niggli.get_primitive_structure())


class UniqueIndex:
    """Reduced structures by the only keys the matcher can fit across: reduced formula and primitive site count.

    ``match`` fits a structure only against the entries of its own bucket; ``add`` files one. Stage I's
    duplicate check and the generator's keep-best both use it, so a candidate kept for a target is never a
    stage-I duplicate of another candidate kept for that target.
    """

    def __init__(self) -> None:
        self.matcher = make_matcher()
        self._buckets: dict[tuple[str, int], list[tuple[str, Structure]]] = defaultdict(list)

    @staticmethod
    def reduce(structure: Structure) -> Structure:
        """The cell ``match`` and ``add`` take (reduce once, then match against many)."""
        return _reduced(structure)

    def match(self, reduced: Structure) -> str | None:
        """Id of the first entry that fits ``reduced`` (a ``reduce``d cell), or None."""
        refs = self._buckets[_bucket(reduced)]
        return next((sid for sid, ref in refs if self.matcher.fit(ref, reduced, skip_structure_reduction=True)), None)

    def add(self, sid: str, reduced: Structure) -> None:
        """File ``reduced`` (a ``reduce``d cell) under ``sid``."""
        self._buckets[_bucket(reduced)].append((sid, reduced))


def _bucket(reduced: Structure) -> tuple[str, int]:
    return reduced.composition.reduced_formula, len(reduced)


def find_duplicates(
    batch: Sequence[tuple[str, Structure]],
    known: Sequence[tuple[str, Structure]] = (),
    *,
    progress: bool = False,
) -> dict[int, Duplicate]:
    """Duplicates in ``batch`` (id, structure) pairs, by batch index; entries not returned are unique.

    Order matters inside the batch: the first of a group of equal structures is kept and the later
    ones point to it, so pass the batch best-first. Known structures are never compared with each other.
    """
    result: dict[int, Duplicate] = {}
    known_ids = {sid for sid, _ in known}
    seen_ids: dict[str, int] = {}
    pending: list[int] = []
    for i, (sid, _) in enumerate(batch):
        if sid in known_ids:
            result[i] = Duplicate(i, sid, known=True)
        elif sid in seen_ids:
            result[i] = Duplicate(i, batch[seen_ids[sid]][0], known=False)
        else:
            seen_ids[sid] = i
            pending.append(i)

    def formula(structure: Structure) -> str:
        return structure.composition.reduced_formula

    crowd = Counter(formula(batch[i][1]) for i in pending)
    known_index, unique = UniqueIndex(), UniqueIndex()
    for sid, structure in known:
        if formula(structure) in crowd:
            crowd[formula(structure)] += 1
            known_index.add(sid, UniqueIndex.reduce(structure))
    crowded = [i for i in pending if crowd[formula(batch[i][1])] > 1]  # a formula alone needs no fit
    for i in tqdm(crowded, desc="dedup", disable=not progress, leave=False):
        sid, structure = batch[i]
        reduced = UniqueIndex.reduce(structure)
        if (match := known_index.match(reduced)) is not None:
            result[i] = Duplicate(i, match, known=True)
        elif (match := unique.match(reduced)) is not None:
            result[i] = Duplicate(i, match, known=False)
        else:
            unique.add(sid, reduced)
    return dict(sorted(result.items()))
