"""Foundation atomic models (FAM) and the stage-II physics: relax, check the structure held, elastic tensor.

Models:

- ``mace-mp-0``: MACE-MP-0 (medium) through mace-torch, from the local cache or downloaded to
  it when the network allows (:func:`mace_mp_checkpoint`).
- ``sevennet-0``: SevenNet-0, whose weights ship inside the ``sevenn`` wheel: the offline
  fallback. Its bulk moduli are usable, its shear constants far too soft, so decisions use K and
  G is indicative only.
- a path to a MACE ``.model`` file (a fine-tuned or test model).
- ``auto``: MACE-MP-0 if it can be had, else SevenNet-0.

The model actually used is returned as ``model_name`` and recorded on every row (``fam:<name>``).
CHGNet is deliberately not offered: its stresses are not smooth enough for finite strains.

The expensive part (:func:`fam_outcome`) does not depend on the target, so it is cached per
(structure, model, settings); :func:`verdict` turns an outcome into pass/reject for a target.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import shutil
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import mace  # noqa: F401  (mace before e3nn: e3nn's torch.load patch otherwise breaks model loading)
import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator
from pydantic import BaseModel, ConfigDict, Field
from pymatgen.analysis.structure_matcher import StructureMatcher

from core.elastic import ElasticResult, ElasticSettings, elastic_constants
from core.relax import RelaxResult, UnphysicalResultError, relax
from core.settings import get_settings
from core.structures import from_atoms, to_row, validity_problem

log = logging.getLogger(__name__)

MACE_MP_0_URL = "https://github.com/ACEsuit/mace-mp/releases/download/mace_mp_0/2023-12-03-mace-128-L1_epoch-199.model"
"""MACE-MP-0 medium, the model of the MACE-MP-0 paper (Batatia et al., arXiv:2401.00096)."""
FAM_NAMES = ("auto", "mace-mp-0", "sevennet-0")
DOWNLOAD_TIMEOUT_S = 60


class FamUnavailableError(RuntimeError):
    """The requested foundation model cannot be loaded (no weights, no network)."""


class FamSettings(BaseModel):
    """Stage-II settings: relaxation, structure matching and the elastic calculation. Hashed into every cache key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    fmax: float = Field(0.05, gt=0)
    """eV/Å: relaxation force threshold (cell forces included)."""
    steps: int = Field(300, ge=1)
    optimizer: Literal["FIRE", "BFGS"] = "FIRE"
    batched: bool = True
    """Relax a batch of structures in one model call per step (torch-sim) instead of one at a time (ASE)."""
    ltol: float = 0.2
    stol: float = 0.3
    angle_tol: float = 5.0
    elastic: ElasticSettings = ElasticSettings()
    dtype: Literal["float32", "float64"] = "float64"
    """MACE precision; float64 because finite-strain stresses need it (SevenNet runs float32 only)."""


class FamOutcome(BaseModel):
    """What the FAM made of one structure, independent of any target. Numbers in GPa, eV, Å."""

    model_name: str
    relaxed: dict[str, Any] | None = None
    """The relaxed structure as a ``structures`` row (structure columns only)."""
    relax_converged: bool | None = None
    relax_steps: int | None = None
    energy_per_atom: float | None = None
    matches_input: bool | None = None
    elastic: ElasticResult | None = None
    error_class: str | None = None
    """bad_input | unknown_element | unphysical | calculator_error, when the calculation failed."""
    error: str | None = None


# ---------- model loading ----------
def _cache_dir() -> Path:
    path = Path(get_settings().cache_dir).expanduser() / "fam"
    path.mkdir(parents=True, exist_ok=True)
    return path


def mace_mp_checkpoint(url: str | None = None, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path to the MACE-MP-0 checkpoint in the cache, downloading it there first if it is missing.

    The download streams to a ``.part`` file and renames it when complete, so an interrupted
    download never leaves a truncated checkpoint. Any urllib URL works (``https://``, ``file://``).
    Raises FamUnavailableError when the file is not cached and cannot be fetched.
    """
    url = url or MACE_MP_0_URL
    target = Path(cache_dir or _cache_dir()) / Path(url.split("?")[0]).name
    if target.is_file():
        return target
    part = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(part, "wb") as out:
            if "text/html" in (response.headers.get("Content-Type") or ""):
                raise FamUnavailableError(f"{url} returned an HTML page, not a model file")
            shutil.copyfileobj(response, out, length=1 << 20)
        os.replace(part, target)
    except (OSError, ValueError) as exc:
        part.unlink(missing_ok=True)
        raise FamUnavailableError(
            f"MACE-MP-0 weights are not in {target.parent} and could not be downloaded: {exc}"
        ) from exc
    return target


def _file_tag(path: Path) -> str:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    return f"mace:{path.name}@{digest}"


def _mace_calculator(path: Path, dtype: str, device: str) -> Calculator:
    from mace.calculators import MACECalculator

    return MACECalculator(model_paths=str(path), device=device, default_dtype=dtype)


def fam_calculator(name: str = "auto", device: str = "cpu", dtype: str = "float64") -> tuple[Calculator, str]:
    """An ASE calculator for a foundation model, and the name of the model actually used.

    ``name`` is ``auto``, ``mace-mp-0``, ``sevennet-0`` or a path to a MACE model file.
    Raises FamUnavailableError when the model cannot be had and ValueError for an unknown name.
    """
    if name == "auto":
        try:
            return fam_calculator("mace-mp-0", device, dtype)
        except FamUnavailableError as exc:
            log.warning("MACE-MP-0 unavailable (%s); falling back to SevenNet-0", exc)
            return fam_calculator("sevennet-0", device, dtype)
    if name == "mace-mp-0":
        return _mace_calculator(mace_mp_checkpoint(), dtype, device), "mace-mp-0"
    if name == "sevennet-0":
        from sevenn.calculator import SevenNetCalculator

        return SevenNetCalculator("7net-0", device=device), "sevennet-0"
    path = Path(name).expanduser()
    if path.is_file():
        return _mace_calculator(path, dtype, device), _file_tag(path)
    raise ValueError(f"unknown FAM {name!r}: use one of {', '.join(FAM_NAMES)} or a path to a MACE model file")


def supported_numbers(calculator: Calculator) -> set[int] | None:
    """Atomic numbers the model knows, or None if the calculator does not say."""
    models = getattr(calculator, "models", None)
    if models:  # MACE
        return {int(z) for z in models[0].atomic_numbers}
    type_map = getattr(calculator, "type_map", None)  # SevenNet
    return {int(z) for z in type_map} if type_map else None


def _unknown_elements(atoms: Atoms, calculator: Calculator) -> list[str]:
    known = supported_numbers(calculator)
    if known is None:
        return []
    return sorted({s for s, z in zip(atoms.get_chemical_symbols(), atoms.numbers, strict=True) if int(z) not in known})


# ---------- batched relaxation (torch-sim) ----------
def torchsim_model(calculator: Calculator) -> Any:
    """A torch-sim model wrapping a copy of the calculator's network (MACE or SevenNet), for batched work.

    SevenNet 0.10.4 predates what torch-sim 0.3 expects; two shims make it run: the
    ``DATA_MODALITY`` key and a ``modal_map = None`` attribute on a copy of the network.
    """
    if getattr(calculator, "models", None):
        from torch_sim.models.mace import MaceModel

        net = copy.deepcopy(calculator.models[0])
        dtype = next(net.parameters()).dtype
        return MaceModel(net, device=torch.device("cpu"), dtype=dtype)
    if hasattr(calculator, "type_map") and hasattr(calculator, "model"):
        import sevenn._keys as keys
        from torch_sim.models.sevennet import SevenNetModel

        if not hasattr(keys, "DATA_MODALITY"):
            keys.DATA_MODALITY = "data_modality"
        net = copy.deepcopy(calculator.model)
        net.modal_map = None
        return SevenNetModel(net, device=torch.device("cpu"))
    raise ValueError(f"no batched (torch-sim) wrapper for {type(calculator).__name__}")


def relax_batch(atoms_list: Sequence[Atoms], calculator: Calculator, settings: FamSettings) -> list[RelaxResult]:
    """Relax cells and positions of many structures together with torch-sim's Frechet-cell FIRE.

    Converged structures leave the batch as they converge; each gets at most ``settings.steps``
    steps. Raises whatever the model raises: callers fall back to one-at-a-time relaxation.
    """
    import torch_sim as ts

    model = torchsim_model(calculator)
    state = ts.io.atoms_to_state(list(atoms_list), model.device, model.dtype)
    converged_fn = ts.generate_force_convergence_fn(force_tol=settings.fmax, include_cell_forces=True)
    final = ts.optimize(
        system=state,
        model=model,
        optimizer=ts.frechet_cell_fire,
        convergence_fn=converged_fn,
        max_steps=settings.steps,
        autobatcher=False,
    )
    converged = converged_fn(final, None).tolist()
    energies = final.energy.detach().cpu().numpy()
    forces = final.forces.detach().cpu().numpy()
    system = final.system_idx.cpu().numpy()
    out = []
    for i, atoms in enumerate(ts.io.state_to_atoms(final)):
        f = forces[system == i]
        if not (np.isfinite(energies[i]) and np.isfinite(f).all() and np.isfinite(atoms.cell[:]).all()):
            raise FloatingPointError(f"non-finite result for structure {i} of the batch")
        atoms.calc = None
        out.append(
            RelaxResult(
                atoms=atoms,
                converged=bool(converged[i]),
                n_steps=None,
                energy=float(energies[i]),
                max_force=float(np.linalg.norm(f, axis=1).max()),
            )
        )
    return out


# ---------- one structure ----------
def _matcher(settings: FamSettings) -> StructureMatcher:
    return StructureMatcher(ltol=settings.ltol, stol=settings.stol, angle_tol=settings.angle_tol)


def _classify(exc: BaseException) -> str:
    if isinstance(exc, UnphysicalResultError | FloatingPointError):
        return "unphysical"
    if isinstance(exc, KeyError | ValueError) and "know" in str(exc).lower():
        return "unknown_element"
    return "calculator_error"


def fam_outcome(
    atoms: Atoms,
    calculator: Calculator,
    model_name: str,
    settings: FamSettings | None = None,
    relaxed: RelaxResult | None = None,
    progress: Callable[[str], None] | None = None,
) -> FamOutcome:
    """Relax (unless ``relaxed`` is given), check the relaxed structure still matches, compute the elastic tensor.

    Never raises for a bad structure: the failure is returned with its class so a batch goes on.
    """
    settings = settings or FamSettings()
    out = FamOutcome(model_name=model_name)
    unknown = _unknown_elements(atoms, calculator)
    if unknown:
        error = f"{model_name} does not know {', '.join(unknown)}"
        return out.model_copy(update={"error_class": "unknown_element", "error": error})
    input_structure = from_atoms(atoms)
    problem = validity_problem(input_structure)
    if problem:
        return out.model_copy(update={"error_class": "bad_input", "error": problem})
    try:
        if relaxed is None:
            relaxed = relax(atoms, calculator, fmax=settings.fmax, steps=settings.steps, optimizer=settings.optimizer)
        final = from_atoms(relaxed.atoms)
        out.relaxed = to_row(final)
        out.relax_converged = relaxed.converged
        out.relax_steps = relaxed.n_steps
        out.energy_per_atom = relaxed.energy / len(atoms)
        out.matches_input = validity_problem(final) is None and bool(_matcher(settings).fit(input_structure, final))
        if relaxed.converged and out.matches_input:
            out.elastic = elastic_constants(relaxed.atoms, calculator, settings.elastic, progress)
    except Exception as exc:  # any calculator failure is recorded, never fatal to the batch)
        out.error_class, out.error = _classify(exc), f"{type(exc).__name__}: {exc}"
    return out


def verdict(outcome: FamOutcome, target: float, tolerance: float) -> tuple[Literal["pass", "reject", "error"], str]:
    """Stage-II decision for one candidate: pass only if relaxed, unchanged, complete, Born-stable and near target.

    Decisions use K_vrh (not G: SevenNet-0's shear constants are too soft to trust).
    """
    if target <= 0 or tolerance <= 0:
        raise ValueError("target and tolerance must be positive")
    if outcome.error:
        return "error", f"{outcome.error_class}: {outcome.error}"
    if not outcome.relax_converged:
        steps = "the step limit" if outcome.relax_steps is None else f"{outcome.relax_steps} steps"
        return "reject", f"relaxation did not converge within {steps}"
    if not outcome.matches_input:
        return "reject", "relaxed structure no longer matches the input (StructureMatcher)"
    el = outcome.elastic
    if el is None or el.k_vrh is None:
        missing = ", ".join(el.missing) if el else "no elastic result"
        return "error", f"elastic tensor incomplete ({missing})"
    if not el.born_stable:
        return "reject", f"Born-unstable (smallest eigenvalue of C {el.min_eigenvalue:.1f} GPa)"
    off = (el.k_vrh - target) / target
    if abs(off) > tolerance:
        return "reject", f"K_vrh {el.k_vrh:.1f} GPa is {off:+.0%} off target {target:g} GPa (tolerance {tolerance:.0%})"
    return "pass", f"K_vrh {el.k_vrh:.1f} GPa within {tolerance:.0%} of {target:g} GPa, Born-stable"


def relax_all(atoms_list: Sequence[Atoms], calculator: Calculator, settings: FamSettings) -> list[RelaxResult | None]:
    """Relax many structures: batched when the settings ask and the model allows, else one at a time.

    A batch that fails as a whole (one structure poisoning it) is redone one at a time; the
    entries left None are those the per-structure path (``fam_outcome``) must relax itself.
    """
    if not settings.batched or len(atoms_list) < 2:
        return [None] * len(atoms_list)
    ok = [
        i
        for i, a in enumerate(atoms_list)
        if not _unknown_elements(a, calculator) and validity_problem(from_atoms(a)) is None
    ]
    results: list[RelaxResult | None] = [None] * len(atoms_list)
    try:
        for i, r in zip(ok, relax_batch([atoms_list[i] for i in ok], calculator, settings), strict=True):
            results[i] = r
    except Exception as exc:  # fall back to the per-structure path, which records each failure
        log.warning("batched relaxation failed (%s: %s); relaxing one at a time", type(exc).__name__, exc)
        return [None] * len(atoms_list)
    return results


def set_torch_threads() -> None:
    """One torch thread per process (MATLOOP_TORCH_THREADS overrides): more threads oversubscribe small machines."""
    torch.set_num_threads(int(os.environ.get("MATLOOP_TORCH_THREADS", "1")))
