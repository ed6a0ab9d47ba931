"""Crystals as tensors: the flat batch layout every generator network reads and writes, and its lattice code.

One row per atom (types, fractional coordinates, crystal index) and one per crystal (lattice, atom
count). The lattice is coded as the lower Cholesky factor of the cell's metric tensor, scaled by
N^(1/3), diagonal as logs: rotation invariant, and every value decodes to a cell of positive volume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pymatgen.core import Structure
from torch import Tensor

LAT_DIM = 6
"""Numbers per lattice code."""


@dataclass
class CrystalTensors:
    """A batch of crystals as flat tensors: one row per atom (``types``, ``frac``, ``batch``), one per crystal."""

    types: Tensor  # (N,) vocabulary index
    frac: Tensor  # (N, 3) in [0, 1)
    lattice: Tensor  # (B, 6) ``lattice_params``, not standardized
    num_atoms: Tensor  # (B,)
    batch: Tensor  # (N,) crystal index of each atom

    @property
    def n_crystals(self) -> int:
        return int(self.num_atoms.numel())

    def to(self, device: torch.device | str) -> CrystalTensors:
        parts = (self.types, self.frac, self.lattice, self.num_atoms, self.batch)
        return CrystalTensors(*(t.to(device) for t in parts))


@dataclass
class Crystal:
    types: np.ndarray
    frac: np.ndarray
    lattice: np.ndarray


_TRIL = (np.array([0, 1, 1, 2, 2, 2]), np.array([0, 0, 1, 0, 1, 2]))
_DIAG = np.array([True, False, True, False, False, True])


def lattice_params(matrix: np.ndarray, n_atoms: int) -> np.ndarray:
    """Six numbers for a cell: the lower Cholesky factor of its metric tensor / N^(1/3), diagonal as logs."""
    chol = np.linalg.cholesky(matrix @ matrix.T) / n_atoms ** (1 / 3)
    values = chol[_TRIL]
    values[_DIAG] = np.log(values[_DIAG])
    return values


def lattice_matrices(params: Tensor, num_atoms: Tensor) -> Tensor:
    """The (B, 3, 3) lattices (rows are vectors, Å) of ``lattice_params`` rows; always of positive volume."""
    diag = torch.as_tensor(_DIAG, device=params.device)
    values = torch.where(diag, torch.exp(params.clamp(-10.0, 10.0)), params)
    chol = params.new_zeros(len(params), 3, 3)
    chol[:, _TRIL[0], _TRIL[1]] = values
    return chol * num_atoms.to(params.dtype).pow(1 / 3).reshape(-1, 1, 1)


def crystal_of(structure: Structure, index: dict[str, int]) -> Crystal:
    """Niggli-reduced cell of a structure as arrays; raises ValueError for an element outside the vocabulary."""
    reduced = structure.get_reduced_structure()
    symbols = [site.specie.symbol for site in reduced]
    unknown = sorted(set(symbols) - set(index))
    if unknown:
        raise ValueError(f"elements {unknown} are not in the generator's vocabulary")
    lat = lattice_params(reduced.lattice.matrix, len(reduced))
    return Crystal(np.array([index[s] for s in symbols]), np.mod(reduced.frac_coords, 1.0), lat)


def collate(crystals: Sequence[Crystal]) -> CrystalTensors:
    num = torch.tensor([len(c.types) for c in crystals])
    return CrystalTensors(
        types=torch.from_numpy(np.concatenate([c.types for c in crystals])).long(),
        frac=torch.from_numpy(np.concatenate([c.frac for c in crystals])).float(),
        lattice=torch.from_numpy(np.stack([c.lattice for c in crystals])).float(),
        num_atoms=num,
        batch=torch.repeat_interleave(torch.arange(len(crystals)), num),
    )


def split(x: CrystalTensors) -> list[Crystal]:
    """The crystals of a batch as arrays on the host: the inverse of ``collate``."""
    bounds = np.cumsum(x.num_atoms.cpu().numpy())[:-1]
    types = np.split(x.types.cpu().numpy(), bounds)
    fracs = np.split(x.frac.cpu().numpy().astype(float), bounds)
    lattices = x.lattice.cpu().numpy().astype(float)
    return [Crystal(t, f, lat) for t, f, lat in zip(types, fracs, lattices, strict=True)]
