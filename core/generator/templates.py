"""Prototype decoding: a decoded composition placed on the site pattern of a nearby training crystal.

The CDVAE decodes from z the number of atoms and the composition well (the property follows the
composition), but its coordinate denoiser puts many atoms off any symmetric site: those samples
relax under a foundation model into another structure, and stage II rejects them. Metallic
alloys of a few sites mostly crystallize in a few dozen prototypes (B2, L1_2, D0_3, C15, ...), and
a training crystal is a local minimum of its own chemistry. So the template decoder keeps the
decoded number of atoms and composition, and takes the cell shape and fractional coordinates from
a training crystal that

- has the same number of atoms and the same multiset of element counts (e.g. 3 + 1; where the bank
  has none, the nearest such pattern of as many atoms and elements: 9 + 7 becomes 10 + 6),
- is not a prototype the training set already has with that composition (the sample would be a
  training duplicate; prototypes told apart by space group and Wyckoff letters, ``prototype_key``), and
- is among the ``k`` nearest to z in latent space (so K, which z carries, chooses the prototype too);

drawn uniformly among those ``k`` with the sampler's seeded generator. Decoded elements take the
template's sites group by group (most numerous first, ties in atomic-number order), and the cell is
scaled by Vegard's rule: the template's volume times the ratio of the summed cubed metallic radii
of the new and the old atoms. A sample with no compatible template (no pattern of its size) is left
to the Langevin decoder (``TemplateBank.place`` returns None for it).

What this gives up: every sample is a new decoration of a prototype the training set already has;
it never invents a new arrangement of sites (the Langevin decoder can). Measured side by side in
``benchmarks/generator.py`` (``--sampling decoder=template``).
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import spglib
import torch
from pymatgen.core import Element
from torch import Tensor

from core.generator.crystals import Crystal, lattice_matrices

_DIAG = np.array([True, False, True, False, False, True])
"""Which of the six lattice-code numbers are log-diagonal entries (see ``crystals.lattice_params``)."""


@cache
def _cubed_radius(symbol: str) -> float:
    """Metallic radius cubed (Å^3), atomic radius where pymatgen has no metallic one: Vegard's volume unit."""
    element = Element(symbol)
    with warnings.catch_warnings():  # pymatgen warns for every element without a metallic radius
        warnings.simplefilter("ignore", UserWarning)
        radius = element.metallic_radius or element.atomic_radius or 1.5
    return float(radius) ** 3


def prototype_key(crystal: Crystal, symprec: float = 0.1) -> tuple:
    """Space group and the sorted Wyckoff letters of a crystal's sites: equal for one prototype's decorations.

    A crystal spglib cannot analyse gets a key of its own (never equal to another's).
    """
    matrix = lattice_matrices(torch.from_numpy(crystal.lattice)[None].double(), torch.tensor([len(crystal.types)]))
    try:
        data = spglib.get_symmetry_dataset((matrix[0].numpy(), crystal.frac, crystal.types), symprec=symprec)
    except (TypeError, ValueError, RuntimeError):
        data = None
    if data is None:
        return ("unknown", id(crystal))
    return (int(data.number), tuple(sorted(data.wyckoffs)))


def _composition(types: np.ndarray) -> tuple[tuple[int, int], ...]:
    """(type, count) pairs of a crystal's cell."""
    values, counts = np.unique(types, return_counts=True)
    return tuple(zip(values.tolist(), counts.tolist(), strict=True))


def _groups(types: np.ndarray) -> tuple[tuple[int, int], ...]:
    """(count, type) per element, most numerous first, ties by type index (the vocabulary is in Z order)."""
    values, counts = np.unique(types, return_counts=True)
    return tuple(sorted(zip(counts.tolist(), values.tolist(), strict=True), key=lambda g: (-g[0], g[1])))


@dataclass
class TemplateBank:
    """Training crystals (Niggli cells as lattice codes and fractional coordinates) with their encoder means."""

    crystals: list[Crystal]
    latents: Tensor  # (n, latent_dim), on the model's device
    prototypes: list[tuple] | None = None
    """``prototype_key`` of each crystal; computed when not given (spglib, a few ms per crystal)."""

    def __post_init__(self) -> None:
        if len(self.crystals) != len(self.latents):
            raise ValueError("one latent per template crystal")
        if self.prototypes is None:
            self.prototypes = [prototype_key(c) for c in self.crystals]
        self._by_pattern: dict[tuple[int, ...], list[int]] = defaultdict(list)
        self._groups = [_groups(c.types) for c in self.crystals]
        for i, groups in enumerate(self._groups):
            self._by_pattern[tuple(n for n, _ in groups)].append(i)
        self._known: dict[tuple, set[tuple]] = defaultdict(set)
        """The prototypes the bank has for each composition: decorating one of those again is no new crystal."""
        for crystal, prototype in zip(self.crystals, self.prototypes, strict=True):
            self._known[_composition(crystal.types)].add(prototype)
        self._near: dict[tuple[int, ...], list[tuple[int, ...]]] = {}

    def __len__(self) -> int:
        return len(self.crystals)

    def place(
        self, z: Tensor, types: Sequence[np.ndarray], vocab: Sequence[str], k: int, gen: torch.Generator
    ) -> list[Crystal | None]:
        """One crystal per latent: the decoded ``types`` (one array per crystal) on a template's sites.

        Where no template has the decoded counts pattern, the nearest pattern of as many atoms and
        elements that has one is used (counts moved by the fewest atoms: 16 atoms 9 + 7 become 10 + 6,
        say): alloys favour the simple stoichiometries the bank holds. None where no pattern of that
        size has a template that is not a known prototype of the composition.
        """
        if len(z) != len(types):
            raise ValueError("one type array per latent")
        if not len(z):
            return []
        draws = torch.rand(len(z), generator=gen, device=gen.device).cpu().numpy()
        distances = torch.cdist(z.float(), self.latents.float()).cpu().numpy()
        out: list[Crystal | None] = []
        for row, (atom_types, u) in enumerate(zip(types, draws, strict=True)):
            groups = _groups(np.asarray(atom_types))
            elements = [t for _, t in groups]
            pool: list[int] = []
            for pattern in self._patterns_near(tuple(n for n, _ in groups)):
                known = self._known.get(tuple(sorted(zip(elements, pattern, strict=True))), set())
                pool = [i for i in self._by_pattern[pattern] if self.prototypes[i] not in known]
                if pool:
                    break
            if not pool:
                out.append(None)
                continue
            nearest = np.asarray(pool)[np.argsort(distances[row, pool], kind="stable")[:k]]
            out.append(self._decorate(int(nearest[int(u * len(nearest))]), elements, vocab))
        return out

    def _patterns_near(self, pattern: tuple[int, ...]) -> list[tuple[int, ...]]:
        """The bank's counts patterns of as many atoms and elements as ``pattern``, fewest atoms moved first."""
        if pattern not in self._near:  # thousands of samples share a few dozen patterns
            same_size = [p for p in self._by_pattern if len(p) == len(pattern) and sum(p) == sum(pattern)]
            self._near[pattern] = sorted(
                same_size, key=lambda p: (sum(abs(a - b) for a, b in zip(p, pattern, strict=True)), p)
            )
        return self._near[pattern]

    def _elements(self, index: int) -> list[int]:
        return [t for _, t in self._groups[index]]

    def _decorate(self, index: int, elements: list[int], vocab: Sequence[str]) -> Crystal:
        """Template ``index`` with its element groups replaced by ``elements`` and its cell scaled by Vegard's rule."""
        template = self.crystals[index]
        mapping = dict(zip(self._elements(index), elements, strict=True))
        types = np.array([mapping[int(t)] for t in template.types])
        old = sum(_cubed_radius(vocab[int(t)]) for t in template.types)
        new = sum(_cubed_radius(vocab[int(t)]) for t in types)
        scale = (new / old) ** (1 / 3)
        lattice = template.lattice.copy()
        lattice[_DIAG] += np.log(scale)
        lattice[~_DIAG] *= scale
        return Crystal(types, template.frac.copy(), lattice)

    # ---- persistence: tensors only, so a checkpoint stays loadable with weights_only=True ----
    def state(self) -> dict[str, Tensor | str]:
        """The bank as flat tensors (the ``CrystalTensors`` layout plus the latents) and its prototypes as JSON."""
        return {
            "prototypes_json": json.dumps(self.prototypes),
            "types": torch.from_numpy(np.concatenate([c.types for c in self.crystals])).long(),
            "frac": torch.from_numpy(np.concatenate([c.frac for c in self.crystals])).double(),
            "lattice": torch.from_numpy(np.stack([c.lattice for c in self.crystals])).double(),
            "num_atoms": torch.tensor([len(c.types) for c in self.crystals]),
            "latents": self.latents.cpu(),
        }

    @classmethod
    def from_state(cls, state: dict[str, Tensor | str], device: torch.device | str) -> TemplateBank:
        """The bank ``state()`` wrote, latents on ``device``."""
        bounds = np.cumsum(state["num_atoms"].numpy())[:-1]
        types = np.split(state["types"].numpy(), bounds)
        fracs = np.split(state["frac"].numpy(), bounds)
        crystals = [Crystal(t, f, lat) for t, f, lat in zip(types, fracs, state["lattice"].numpy(), strict=True)]
        prototypes = [_as_tuple(key) for key in json.loads(state["prototypes_json"])]
        return cls(crystals, state["latents"].to(device), prototypes)


def _as_tuple(value: object) -> object:
    """JSON lists back to the (nested) tuples ``prototype_key`` makes."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list) else value
