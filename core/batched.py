"""Batched model evaluation: single points and relaxations of many cells in few model calls, on any device.

Built on torch-sim's model wrappers (MACE, SevenNet) and its FIRE optimizers, with two things
torch-sim 0.3 leaves to the caller:

- **One bad structure never takes a batch down.** A structure whose results turn non-finite
  leaves the batch as a :class:`Failure` with its reason while the others go on; a model call
  that raises is split in halves until the structure that raises is alone, and only that one
  fails (one log line, never the model's traceback).
- **Per-structure bookkeeping.** Each relaxation stops when its own forces (and cell forces)
  are below ``fmax`` or its own step budget is spent, and reports its step count.

Results are plain numpy (ASE conventions: eV, eV/Å, stress in eV/Å^3 positive in tension).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from ase import Atoms

from core.relax import MAX_FORCE, RelaxResult

log = logging.getLogger(__name__)

MAX_ATOMS_PER_CALL = {"cpu": 32, "cuda": 8192}
"""Atoms per model call: enough to amortise the call, few enough to stay in cache (CPU: measured best at
16-32 atoms with SevenNet-0, one thread) or in memory (GPU)."""


@dataclass(frozen=True)
class SinglePoint:
    """Energy (eV), forces (n x 3, eV/Å) and stress (3 x 3, eV/Å^3, positive in tension) of one cell."""

    energy: float
    forces: np.ndarray = field(repr=False)
    stress: np.ndarray = field(repr=False)

    @property
    def max_force(self) -> float:
        return float(np.linalg.norm(self.forces, axis=1).max()) if len(self.forces) else 0.0


@dataclass(frozen=True)
class Failure:
    """Why one structure of a batch has no result (its own failure: the rest of the batch is unaffected)."""

    reason: str


T = TypeVar("T")


def _short(exc: BaseException) -> str:
    """Type and last line of an exception: TorchScript errors carry a whole traceback in their message."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    name = type(exc).__name__
    return last if last.startswith(name) else f"{name}: {last}".rstrip(": ")


def input_problem(atoms: Atoms) -> str | None:
    """Why a cell cannot go to a model at all (non-finite numbers, no volume), or None."""
    if not (np.isfinite(atoms.positions).all() and np.isfinite(atoms.cell[:]).all()):
        return "bad_input: non-finite positions or cell"
    if len(atoms) == 0 or abs(atoms.cell.volume) < 1e-6:
        return "bad_input: empty cell or zero volume"
    return None


def isolating(
    run: Callable[[list[Atoms]], list[T | Failure]], cells: list[Atoms], _top: bool = True
) -> list[T | Failure]:
    """``run(cells)``, splitting the batch in halves when a call raises until the raising cell is alone.

    Cells that cannot go to a model at all fail first, without a call.
    """
    problems = [input_problem(a) for a in cells]
    if any(problems):
        good = [a for a, p in zip(cells, problems, strict=True) if p is None]
        results = iter(isolating(run, good, _top) if good else [])
        return [Failure(p) if p else next(results) for p in problems]
    try:
        return run(cells)
    except Exception as exc:  # the model's own failure: isolate it rather than lose the batch
        if len(cells) == 1:
            return [Failure(_short(exc))]
        if _top:
            log.warning("a batch of %d cells failed (%s); isolating the cause", len(cells), _short(exc))
        mid = len(cells) // 2
        return isolating(run, cells[:mid], False) + isolating(run, cells[mid:], False)


def chunks(cells: Sequence[Atoms], max_atoms: int) -> list[list[int]]:
    """Consecutive index groups of at most ``max_atoms`` atoms (a larger cell goes alone)."""
    groups: list[list[int]] = [[]]
    size = 0
    for i, a in enumerate(cells):
        if groups[-1] and size + len(a) > max_atoms:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += len(a)
    return [g for g in groups if g]


def _max_atoms(model: Any) -> int:
    return MAX_ATOMS_PER_CALL.get(torch.device(model.device).type, 256)


def _per_system(values: torch.Tensor, system: torch.Tensor, n: int) -> list[np.ndarray]:
    array = values.detach().cpu().numpy()
    index = system.cpu().numpy()
    return [array[index == i] for i in range(n)]


def _finite(*arrays: np.ndarray | float) -> bool:
    return all(np.isfinite(a).all() for a in arrays)


def _bad_values(energy: float, forces: np.ndarray, stress: np.ndarray | None = None) -> str | None:
    if not _finite(energy, forces, *([] if stress is None else [stress])):
        return "unphysical: the model returned non-finite energy, forces or stress"
    if len(forces) and np.linalg.norm(forces, axis=1).max() > MAX_FORCE:
        return f"unphysical: forces exploded (> {MAX_FORCE:g} eV/Å)"
    return None


def _state(model: Any, cells: Sequence[Atoms]) -> Any:
    import torch_sim as ts

    return ts.io.atoms_to_state(list(cells), model.device, model.dtype)


# ---------- single points ----------
def single_points(model: Any, cells: Sequence[Atoms]) -> list[SinglePoint | Failure]:
    """Energy, forces and stress of every cell, in model calls of many cells each."""
    out: list[SinglePoint | Failure] = [Failure("not evaluated")] * len(cells)
    for group in chunks(cells, _max_atoms(model)):
        for i, r in zip(group, isolating(lambda c: _single_points(model, c), [cells[i] for i in group]), strict=True):
            out[i] = r
    return out


def _single_points(model: Any, cells: list[Atoms]) -> list[SinglePoint | Failure]:
    state = _state(model, cells)
    result = model(state)  # no torch.no_grad(): forces and stress are autograd derivatives
    energies = result["energy"].detach().cpu().numpy().astype(float)
    stresses = result["stress"].detach().cpu().numpy().astype(float)
    forces = _per_system(result["forces"], state.system_idx, len(cells))
    out: list[SinglePoint | Failure] = []
    for e, f, s in zip(energies, forces, stresses, strict=True):
        bad = _bad_values(float(e), f, s)
        out.append(Failure(bad) if bad else SinglePoint(float(e), f.astype(float), s))
    return out


# ---------- relaxation ----------
def relax_cells(
    model: Any, cells: Sequence[Atoms], fmax: float, steps: int, *, cell: bool = True, dt_start: float = 0.1
) -> list[RelaxResult | Failure]:
    """Relax positions (and the cell if ``cell``, with Frechet-cell FIRE) of every cell, batched.

    ``dt_start`` is FIRE's first time step (ASE's default 0.1; the step length stays capped at 0.2 Å).

    Each structure leaves the batch when its largest force (and cell force) is below ``fmax``
    eV/Å, when it has taken ``steps`` steps (``converged=False``), or when its results turn
    non-finite or explode (a :class:`Failure`).
    """
    if fmax <= 0 or steps < 0:
        raise ValueError("fmax must be positive and steps non-negative")
    out: list[RelaxResult | Failure] = [Failure("not relaxed")] * len(cells)
    for group in chunks(cells, _max_atoms(model)):
        run = lambda c: _relax_group(model, c, fmax, steps, cell, dt_start)  # noqa: E731
        for i, r in zip(group, isolating(run, [cells[i] for i in group]), strict=True):
            out[i] = r
    return out


def _relax_group(
    model: Any, cells: list[Atoms], fmax: float, steps: int, cell: bool, dt_start: float
) -> list[RelaxResult | Failure]:
    import torch_sim as ts
    from torch_sim.optimizers import fire

    init_fn, update_fn = (ts.frechet_cell_fire if cell else fire)(model=model, dt_start=dt_start)
    converged_fn = ts.generate_force_convergence_fn(force_tol=fmax, include_cell_forces=cell)
    state = init_fn(_state(model, cells))
    remaining = list(range(len(cells)))  # original index of each system still in the batch
    taken = np.zeros(len(cells), dtype=int)
    out: list[RelaxResult | Failure] = [Failure("not relaxed")] * len(cells)
    while remaining:
        converged = converged_fn(state, None).cpu().numpy()
        energies = state.energy.detach().cpu().numpy()
        forces = _per_system(state.forces, state.system_idx, len(remaining))
        bad = [_bad_values(float(e), f) for e, f in zip(energies, forces, strict=True)]
        leaving = [k for k, sys in enumerate(remaining) if converged[k] or bad[k] or taken[sys] >= steps]
        if leaving:
            popped = state.pop(leaving) if len(leaving) < len(remaining) else state.split()
            for k, single in zip(leaving, popped, strict=True):
                sys = remaining[k]
                out[sys] = Failure(bad[k]) if bad[k] else _relax_result(single, bool(converged[k]), int(taken[sys]))
            remaining = [sys for k, sys in enumerate(remaining) if k not in set(leaving)]
            if not remaining:
                break
        state = update_fn(state)
        taken[remaining] += 1
    return out


def _relax_result(single: Any, converged: bool, n_steps: int) -> RelaxResult | Failure:
    import torch_sim as ts

    atoms = ts.io.state_to_atoms(single)[0]
    atoms.calc = None
    forces = single.forces.detach().cpu().numpy().astype(float)
    if not np.isfinite(atoms.cell[:]).all() or not np.isfinite(atoms.positions).all():
        return Failure("unphysical: the relaxed cell or positions are non-finite")
    stress = getattr(single, "stress", None)
    return RelaxResult(
        atoms=atoms,
        converged=converged,
        n_steps=n_steps,
        energy=float(single.energy.detach().cpu().numpy().reshape(-1)[0]),
        max_force=float(np.linalg.norm(forces, axis=1).max()) if len(forces) else 0.0,
        forces=forces,
        stress=None if stress is None else stress.detach().cpu().numpy().reshape(3, 3).astype(float),
    )
