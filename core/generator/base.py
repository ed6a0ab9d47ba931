"""The generator interface the flows program against, and the keep-the-best selection they share.

Any conditional generator (this package's CDVAE, a diffusion model, MatterGen behind an adapter)
implements ``Generator``: ``train`` on labelled structures, ``sample`` crystals for target
property values with a seed, ``score`` structures with its own property head, ``save``/``load``
a checkpoint. The flows only call these, so a new generator plugs in by registering its class in
``GENERATORS`` (core/generator/__init__.py) under the ``generator`` name its checkpoints carry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, overload

import numpy as np
from pymatgen.core import Structure

from core.dedup import UniqueIndex
from core.structures import structure_id, validity_problem


@dataclass(frozen=True)
class SampleBatch:
    """Generated structures with the target each was asked for and the generator's property score (GPa)."""

    structures: list[Structure]
    targets: np.ndarray
    scores: np.ndarray
    problems: list[str | None] | None = None
    """Why each sample is invalid (``core.metrics.validity_problems``), None where valid; None if not checked."""
    decoders: list[str] | None = None
    """How each sample's coordinates were made (e.g. ``template``, ``langevin``), where the generator says."""
    draws: int | None = None
    """How many crystals were drawn to return these (more than returned where duplicates were drawn again)."""
    conditions: list[dict[str, float]] | None = None
    """What each sample was asked for, property -> value (GPa), where more than K can be asked; None: ``targets``."""
    property_scores: dict[str, np.ndarray] | None = None
    """The property head's value of each property it predicts, per sample (``scores`` is its K_vrh)."""

    def __post_init__(self) -> None:
        if not len(self.structures) == len(self.targets) == len(self.scores):
            raise ValueError("structures, targets and scores must have the same length")
        for name in ("problems", "decoders", "conditions"):
            if getattr(self, name) is not None and len(getattr(self, name)) != len(self.structures):
                raise ValueError(f"{name} must have one entry per structure")
        if any(len(v) != len(self.structures) for v in (self.property_scores or {}).values()):
            raise ValueError("property_scores must have one entry per structure for each property")

    def __len__(self) -> int:
        return len(self.structures)

    def take(self, indices: Sequence[int]) -> SampleBatch:
        """The samples at ``indices``, in that order (a subset has no draw count of its own)."""
        idx = np.asarray(indices, dtype=int)
        problems = None if self.problems is None else [self.problems[i] for i in idx]
        decoders = None if self.decoders is None else [self.decoders[i] for i in idx]
        conditions = None if self.conditions is None else [self.conditions[i] for i in idx]
        scores = None if self.property_scores is None else {k: v[idx] for k, v in self.property_scores.items()}
        return SampleBatch(
            [self.structures[i] for i in idx],
            self.targets[idx],
            self.scores[idx],
            problems,
            decoders,
            conditions=conditions,
            property_scores=scores,
        )

    def target_groups(self) -> list[tuple[dict[str, float], np.ndarray]]:
        """Each distinct target (property -> value) and its samples' indices, by ascending K, then K alone first."""
        conditions = self.conditions or [{"k_vrh": float(t)} for t in self.targets]
        groups: dict[tuple[tuple[str, float], ...], list[int]] = {}
        for i, condition in enumerate(conditions):
            groups.setdefault(tuple(sorted(condition.items())), []).append(i)
        order = sorted(groups, key=lambda key: (dict(key)["k_vrh"], len(key), key))
        return [(dict(key), np.asarray(groups[key], dtype=int)) for key in order]

    def relative_error(self, condition: Mapping[str, float], idx: np.ndarray) -> np.ndarray:
        """Per sample at ``idx``: the summed relative distance of its scores to each value asked for (K by
        ``scores``, the other properties by ``property_scores``, where the batch has them)."""
        err = np.abs(self.scores[idx] - condition["k_vrh"]) / max(abs(condition["k_vrh"]), 1e-9)
        for name, value in condition.items():
            if name != "k_vrh" and self.property_scores is not None and name in self.property_scores:
                err = err + np.abs(self.property_scores[name][idx] - value) / max(abs(value), 1e-9)
        return err


class Generator(ABC):
    """A conditional crystal generator: targets in, structures and property-head scores out."""

    name: ClassVar[str]
    """Written into every checkpoint so ``load_generator`` finds the class again."""

    @abstractmethod
    def train(
        self,
        structures: Sequence[Structure],
        k_vrh: Sequence[float],
        *,
        weights: Sequence[float] | None = None,
        progress: bool = False,
        other_labels: Mapping[str, Sequence[float | None]] | None = None,
    ) -> dict[str, Any]:
        """Fit from scratch on structures labelled with K_vrh (GPa), each drawn in proportion to its weight.

        ``other_labels``: labels of the other properties the generator is conditioned on (None where unknown)."""

    def finetune(
        self,
        structures: Sequence[Structure],
        k_vrh: Sequence[float],
        *,
        weights: Sequence[float] | None = None,
        progress: bool = False,
        other_labels: Mapping[str, Sequence[float | None]] | None = None,
    ) -> dict[str, Any]:
        """Continue training this model on (new, weighted) data: the active-learning loop's warm start.

        Optional: a generator that cannot warm-start is retrained from scratch by the loop.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot be fine-tuned: it does not implement finetune()")

    @abstractmethod
    def sample(self, targets: Sequence[float | Mapping[str, float]], n: int, seed: int) -> SampleBatch:
        """``n`` structures per target, reproducible for a given seed, scored by the property head.

        A target is a K_vrh (GPa), or property -> value for a generator conditioned on several moduli (always
        with ``k_vrh``; a property left out is left free)."""

    @abstractmethod
    def score(self, structures: Sequence[Structure]) -> np.ndarray:
        """The property head's K_vrh (GPa) for each structure."""

    def latents(self, structures: Sequence[Structure]) -> np.ndarray:
        """The generator's latent code of each structure, shape (n, latent_dim) (e.g. for a t-SNE plot).

        Optional: a generator without an encoder (a plain diffusion model) has no latent per structure.
        """
        raise NotImplementedError(f"{type(self).__name__} has no latent space: it does not implement latents()")

    @abstractmethod
    def save(self, path: str | Path) -> Path:
        """Write a safe checkpoint (tensors and JSON only, loadable with ``weights_only=True``)."""

    @classmethod
    @abstractmethod
    def load(cls, path: str | Path, device: str | None = None) -> Generator:
        """Read a checkpoint written by ``save``."""

    @property
    @abstractmethod
    def config_dict(self) -> dict[str, Any]:
        """The hyperparameters, as JSON-able data (for the models table)."""


@overload
def keep_best(batch: SampleBatch, n_kept: int) -> SampleBatch: ...
@overload
def keep_best(batch: SampleBatch, n_kept: int, *, with_index: Literal[True]) -> tuple[SampleBatch, np.ndarray]: ...
def keep_best(
    batch: SampleBatch, n_kept: int, *, with_index: bool = False
) -> SampleBatch | tuple[SampleBatch, np.ndarray]:
    """Per target, the ``n_kept`` valid, distinct structures whose score is closest (relatively) to the target.

    Samples are ranked by |score - target| / target (summed over the properties a target asks for, the others
    scored by ``property_scores``) and taken from the top while skipping invalid
    structures (``batch.problems``, else ``core.structures.validity_problem``) and duplicates of a structure
    already kept for that target: same ``structure_id``, else a fit by stage I's matcher (``core.dedup``), so
    copies of one crystal, which score alike and so rank side by side, do not fill the kept set. A target may
    get fewer than ``n_kept`` if too few samples are valid and distinct. ``with_index`` also returns the kept
    samples' indices in ``batch``.
    """
    if n_kept < 1:
        raise ValueError("n_kept must be at least 1")
    keep: list[int] = []
    for condition, idx in batch.target_groups():
        err = batch.relative_error(condition, idx)
        seen: set[str] = set()
        kept_here, n_here = UniqueIndex(), 0
        for i in idx[np.argsort(err, kind="stable")]:
            s = batch.structures[i]
            if (batch.problems[i] if batch.problems is not None else validity_problem(s)) is not None:
                continue
            sid = structure_id(s)
            if sid in seen:
                continue
            seen.add(sid)
            reduced = UniqueIndex.reduce(s)
            if kept_here.match(reduced) is not None:
                continue
            kept_here.add(sid, reduced)
            keep.append(int(i))
            n_here += 1
            if n_here == n_kept:
                break
    kept = batch.take(keep)
    return (kept, np.asarray(keep, dtype=int)) if with_index else kept


@dataclass(frozen=True)
class Generation:
    """One generate step: every sample drawn, the kept ones, and the scores that chose them."""

    samples: SampleBatch
    """All samples, scored by the generator's own property head."""
    kept_index: np.ndarray
    """Indices of the kept samples in ``samples``."""
    ranked_by: np.ndarray
    """The scores keep-best ranked on (the head's, or a ranker's), one per sample."""

    @property
    def kept(self) -> SampleBatch:
        """The kept samples, with the head's scores."""
        return self.samples.take(self.kept_index)


def generate(
    generator: Generator,
    targets: Sequence[float | Mapping[str, float]],
    n_kept: int,
    samples_per_kept: int,
    seed: int,
    rank: Callable[[list[Structure]], np.ndarray] | None = None,
) -> Generation:
    """Sample ``n_kept * samples_per_kept`` structures per target and keep the best ``n_kept`` (the 1/N rule).

    ``rank`` scores the samples for keep-best (K in GPa per structure); None ranks by the generator's head.
    """
    if samples_per_kept < 1:
        raise ValueError("samples_per_kept must be at least 1")
    samples = generator.sample(targets, n_kept * samples_per_kept, seed)
    ranking = samples if rank is None else replace(samples, scores=np.asarray(rank(samples.structures), dtype=float))
    _, index = keep_best(ranking, n_kept, with_index=True)
    return Generation(samples, index, ranking.scores)
