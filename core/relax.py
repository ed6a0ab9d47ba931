"""Structure relaxation with any ASE calculator: positions and (optionally) the cell.

The cell is relaxed through ASE's :class:`FrechetCellFilter` (cell degrees of freedom as the
matrix logarithm of the deformation, which keeps large cell changes well conditioned). A
calculator that returns non-finite or exploding energies, forces or stresses raises
:class:`UnphysicalResultError` at once, so a bad structure fails quickly with a clear reason
instead of wandering for hundreds of steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.filters import FrechetCellFilter
from ase.optimize import BFGS, FIRE

OPTIMIZERS = {"FIRE": FIRE, "BFGS": BFGS}
MAX_FORCE = 1.0e3
"""eV/Å: a force beyond this means the calculator has left its domain (overlapping atoms, unknown chemistry)."""


class UnphysicalResultError(RuntimeError):
    """The calculator returned NaN/inf or exploding values for this structure."""


@dataclass
class RelaxResult:
    """A relaxed copy of the input (no calculator attached) and how the relaxation went."""

    atoms: Atoms = field(repr=False)
    converged: bool
    n_steps: int | None
    """Optimizer steps taken; None where a batched optimizer does not track them per structure."""
    energy: float
    """eV per cell, at the final geometry."""
    max_force: float
    """eV/Å, largest atomic force at the final geometry."""
    forces: np.ndarray | None = field(default=None, repr=False)
    """eV/Å (n x 3) at the final geometry, where the optimizer kept them (the batched one does)."""
    stress: np.ndarray | None = field(default=None, repr=False)
    """eV/Å^3 (3 x 3, positive in tension) at the final geometry, where the optimizer kept it."""


def _check(atoms: Atoms) -> None:
    """Raise UnphysicalResultError if the calculator's current results are non-finite or exploding."""
    energy = atoms.get_potential_energy()
    forces = atoms.get_forces()
    if not np.isfinite(energy) or not np.isfinite(forces).all():
        raise UnphysicalResultError("calculator returned a non-finite energy or forces")
    fmax = float(np.linalg.norm(forces, axis=1).max()) if len(atoms) else 0.0
    if fmax > MAX_FORCE:
        raise UnphysicalResultError(f"forces exploded ({fmax:.3g} eV/Å > {MAX_FORCE:g})")


def relax(
    atoms: Atoms,
    calculator: Calculator,
    fmax: float = 0.05,
    steps: int = 200,
    optimizer: Literal["FIRE", "BFGS"] = "FIRE",
    cell: bool = True,
) -> RelaxResult:
    """Relax positions (and the cell if ``cell``) until the largest force is below ``fmax`` eV/Å.

    With ``cell=True`` the convergence criterion also covers the cell's generalized forces
    (stress times volume), as ``FrechetCellFilter`` exposes them. The input is not modified.
    Raises ValueError for bad input and UnphysicalResultError for a calculator gone wrong;
    a relaxation that runs out of ``steps`` returns with ``converged=False``.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose from {sorted(OPTIMIZERS)}")
    if fmax <= 0 or steps < 0:
        raise ValueError("fmax must be positive and steps non-negative")
    if len(atoms) == 0:
        raise ValueError("cannot relax an empty structure")
    if cell and not all(atoms.pbc):
        raise ValueError("cell relaxation needs a structure periodic in all three directions")
    work = atoms.copy()
    work.calc = calculator
    _check(work)
    target = FrechetCellFilter(work) if cell else work
    opt = OPTIMIZERS[optimizer](target, logfile=None)
    opt.attach(lambda: _check(work), interval=1)
    converged = bool(opt.run(fmax=fmax, steps=steps))
    energy = float(work.get_potential_energy())
    max_force = float(np.linalg.norm(work.get_forces(), axis=1).max())
    out = work.copy()
    out.calc = None
    return RelaxResult(atoms=out, converged=converged, n_steps=int(opt.nsteps), energy=energy, max_force=max_force)
