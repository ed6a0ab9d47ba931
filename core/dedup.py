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

from collections import defaultdict
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


def _first_match(matcher: StructureMatcher, reduced: Structure, refs: Sequence[tuple[str, Structure]]) -> str | None:
    """Id of the first reference that fits ``reduced`` (all already reduced), or None."""
    return next((ref_id for ref_id, ref in refs if matcher.fit(ref, reduced, skip_structure_reduction=True)), None)


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
    matcher = make_matcher()
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

    by_formula: dict[str, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
    for i in pending:
        by_formula[batch[i][1].composition.reduced_formula][0].append(i)
    for k, (_, structure) in enumerate(known):
        formula = structure.composition.reduced_formula
        if formula in by_formula:
            by_formula[formula][1].append(k)

    crowded = [(b, kn) for b, kn in by_formula.values() if len(b) + len(kn) > 1]
    for batch_idx, known_idx in tqdm(crowded, desc="dedup buckets", disable=not progress, leave=False):
        reduced_known: dict[int, list[tuple[str, Structure]]] = defaultdict(list)
        for k in known_idx:
            red = _reduced(known[k][1])
            reduced_known[len(red)].append((known[k][0], red))
        unique: dict[int, list[tuple[str, Structure]]] = defaultdict(list)
        for i in batch_idx:
            sid, structure = batch[i]
            red = _reduced(structure)
            n = len(red)
            match = _first_match(matcher, red, reduced_known[n])
            if match is not None:
                result[i] = Duplicate(i, match, known=True)
                continue
            match = _first_match(matcher, red, unique[n])
            if match is not None:
                result[i] = Duplicate(i, match, known=False)
            else:
                unique[n].append((sid, red))
    return dict(sorted(result.items()))
