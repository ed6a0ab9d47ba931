"""Quality figures of generated crystals: validity, uniqueness, novelty, reconstruction, MAPE to target.

Structure comparison uses pymatgen's StructureMatcher with CDVAE's tolerances (``MATCHER``),
so two samples that differ only by noise-level displacements or cell setting count as the
same crystal; candidates are bucketed by reduced formula first, since only structures with the
same formula can match. The active-learning loop reports the same figures per iteration.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from pydantic import BaseModel
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from core.device import resolve_device
from core.structures import MIN_DISTANCE

MATCHER = {"stol": 0.5, "angle_tol": 10.0, "ltol": 0.3}
"""StructureMatcher tolerances of CDVAE's reconstruction and novelty metrics."""


def _matcher() -> StructureMatcher:
    return StructureMatcher(**MATCHER)


def _by_formula(structures: Iterable[Structure]) -> dict[str, list[Structure]]:
    buckets: dict[str, list[Structure]] = defaultdict(list)
    for s in structures:
        buckets[s.composition.reduced_formula].append(s)
    return buckets


def validity_problems(structures: Sequence[Structure], device: str | None = None) -> list[str | None]:
    """Per structure, why it is invalid (non-finite, insane volume, flat cell, atoms closer than 0.5 Å) or None.

    The rules of :func:`core.structures.validity_problem`, in its order and with its messages, evaluated for
    many structures at once on tensors (on ``device``, default ``MATLOOP_DEVICE``): cells, volumes and every
    periodic pair distance in a few batched operations instead of a neighbour search per structure. Once no two faces of
    a cell are closer than the minimum distance, a pair closer than that lies within the 27
    neighbouring cells, so those images are all it searches.
    """
    if not structures:
        return []
    dev = resolve_device(device)
    order = sorted(range(len(structures)), key=lambda i: len(structures[i]))  # chunks of similar size pad little
    out: list[str | None] = [None] * len(structures)
    start = 0
    while start < len(order):
        size = 1
        while (
            start + size < len(order)
            and 27 * len(structures[order[start + size]]) ** 2 * (size + 1) <= VALIDITY_PAIR_BUDGET
        ):
            size += 1
        chunk = order[start : start + size]
        for i, problem in zip(chunk, _tensor_problems([structures[i] for i in chunk], dev), strict=True):
            out[i] = problem
        start += size
    return out


VALIDITY_PAIR_BUDGET = 4_000_000
"""Pair-image distances per tensor chunk of :func:`validity_problems` (about 100 MB in float64)."""
_SHIFTS = np.array([(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)], dtype=float)


def _tensor_problems(structures: Sequence[Structure], device: torch.device) -> list[str | None]:
    counts = np.array([len(s) for s in structures])
    n_max = int(counts.max())
    lattice = np.stack([s.lattice.matrix for s in structures])
    frac = np.zeros((len(structures), n_max, 3))
    for b, s in enumerate(structures):
        frac[b, : len(s)] = s.frac_coords
    lat = torch.as_tensor(lattice, device=device)
    f = torch.as_tensor(frac, device=device)
    atom = torch.arange(n_max, device=device)[None, :] < torch.as_tensor(counts, device=device)[:, None]
    finite = torch.isfinite(lat).flatten(1).all(1) & (torch.isfinite(f).all(2) | ~atom).all(1)
    eye = torch.eye(3, dtype=lat.dtype, device=device).expand_as(lat)
    lat = torch.where(finite[:, None, None], lat, eye)
    f = torch.where(torch.isfinite(f), f, torch.zeros_like(f))
    det = torch.linalg.det(lat).abs()
    solid = det > 1e-12
    inv = torch.linalg.inv(torch.where(solid[:, None, None], lat, eye))
    heights = (1.0 / inv.pow(2).sum(1).sqrt()).amin(1)
    delta = f[:, :, None, :] - f[:, None, :, :]
    delta = delta - torch.round(delta)
    shifts = torch.as_tensor(_SHIFTS, dtype=lat.dtype, device=device)
    images = (delta[:, :, :, None, :] + shifts).reshape(len(structures), -1, 3)
    dist = torch.bmm(images, lat).norm(dim=-1).reshape(len(structures), n_max, n_max, len(_SHIFTS))
    pair = atom[:, :, None] & atom[:, None, :]
    self_image = torch.eye(n_max, dtype=torch.bool, device=device)[None, :, :, None] & (shifts.abs().sum(1) == 0)
    dist = torch.where(pair[..., None] & ~self_image, dist, torch.full_like(dist, math.inf))
    dmin = dist.flatten(1).amin(1)
    rows = zip(
        finite.tolist(),
        solid.tolist(),
        heights.tolist(),
        (det.cpu().numpy() / counts).tolist(),
        dmin.tolist(),
        strict=True,
    )
    out: list[str | None] = []
    for ok, has_volume, height, vpa, d in rows:
        if not ok:
            out.append("non-finite lattice or coordinates")
        elif not 1.0 < vpa < 200.0 or not has_volume:
            out.append(f"volume per atom {vpa:.2f} Å^3 outside (1, 200)")
        elif height < MIN_DISTANCE:
            out.append(f"flat cell: opposite faces {height:.2f} Å apart")
        elif d < MIN_DISTANCE:
            out.append(f"atoms {d:.2f} Å apart (minimum {MIN_DISTANCE} Å)")
        else:
            out.append(None)
    return out


def validity(structures: Sequence[Structure]) -> float:
    """Fraction of structures with no validity problem."""
    if not structures:
        return float("nan")
    return sum(p is None for p in validity_problems(structures)) / len(structures)


class DistinctFilter:
    """Admits a structure unless it matches one admitted before (the uniqueness metric's matcher, by formula).

    ``by_space_group`` also buckets by space group (spglib at 0.1 Å): for crystals already snapped to their
    group, as generated samples are, it finds the same duplicates without matching every pair of a large
    formula group (10,000 samples of a few formulas would otherwise take hours).
    """

    def __init__(self, by_space_group: bool = False) -> None:
        self._admitted: dict[tuple[str, int], list[Structure]] = defaultdict(list)
        self._matcher = _matcher()
        self._by_space_group = by_space_group

    def admit(self, structure: Structure) -> bool:
        """True (and remembered) when ``structure`` matches nothing admitted so far."""
        group_number = _space_group_number(structure) if self._by_space_group else 0
        reduced = self._matcher._get_reduced_structure(structure, primitive_cell=True)  # once, not once per pair
        group = self._admitted[(structure.composition.reduced_formula, group_number)]
        if any(self._matcher.fit(reduced, other, skip_structure_reduction=True) for other in group):
            return False
        group.append(reduced)
        return True


def _space_group_number(structure: Structure) -> int:
    try:
        return SpacegroupAnalyzer(structure, symprec=0.1).get_space_group_number()
    except Exception:  # spglib refuses a degenerate cell: its own bucket
        return 0


def distinct(structures: Sequence[Structure]) -> list[Structure]:
    """One representative per group of matching structures (first seen wins)."""
    admitted = DistinctFilter()
    return [s for s in structures if admitted.admit(s)]


def uniqueness(structures: Sequence[Structure]) -> float:
    """Distinct structures (StructureMatcher classes) over all structures."""
    if not structures:
        return float("nan")
    return len(distinct(structures)) / len(structures)


def is_novel(structures: Sequence[Structure], reference: Sequence[Structure]) -> list[bool]:
    """Per structure, True when no reference (training) structure matches it."""
    ref = _by_formula(reference)
    matcher = _matcher()
    return [not any(matcher.fit(s, r) for r in ref.get(s.composition.reduced_formula, ())) for s in structures]


def novelty(structures: Sequence[Structure], reference: Sequence[Structure]) -> float:
    """Fraction of structures that match no reference (training) structure."""
    if not structures:
        return float("nan")
    return float(np.mean(is_novel(structures, reference)))


def match_rate(originals: Sequence[Structure], reconstructions: Sequence[Structure]) -> float:
    """Fraction of pairs where the reconstruction matches its original (the VAE's reconstruction rate)."""
    if len(originals) != len(reconstructions):
        raise ValueError("originals and reconstructions must pair up")
    if not originals:
        return float("nan")
    matcher = _matcher()
    return float(np.mean([matcher.fit(a, b) for a, b in zip(originals, reconstructions, strict=True)]))


def mape(predictions: Sequence[float] | np.ndarray, target: float) -> float:
    """Mean absolute percentage error of predictions against one target value, as a fraction (0.4 = 40 %)."""
    p = np.asarray(predictions, dtype=float)
    if p.size == 0:
        return float("nan")
    if target == 0:
        raise ValueError("MAPE is undefined for a zero target")
    return float(np.mean(np.abs(p - target)) / abs(target))


class GenerationMetrics(BaseModel):
    """Validity over all samples; uniqueness and novelty over the valid ones (as CDVAE reports them)."""

    n: int
    n_valid: int
    validity: float
    uniqueness: float
    novelty: float


def generation_metrics(structures: Sequence[Structure], reference: Sequence[Structure]) -> GenerationMetrics:
    """Validity, uniqueness and novelty (against ``reference``, the training set) of a batch of samples."""
    valid = [s for s, p in zip(structures, validity_problems(structures), strict=True) if p is None]
    return GenerationMetrics(
        n=len(structures),
        n_valid=len(valid),
        validity=len(valid) / len(structures) if structures else float("nan"),
        uniqueness=uniqueness(valid),
        novelty=novelty(valid, reference),
    )
