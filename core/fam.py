"""Foundation atomic models (FAM) and the stage-II physics: relax, check the structure held, elastic tensor.

Models:

- ``mace-mp-0``: MACE-MP-0 (medium) through mace-torch, from the local cache or downloaded to
  it when the network allows (:func:`mace_mp_checkpoint`).
- ``sevennet-0``: SevenNet-0, whose weights ship inside the ``sevenn`` wheel: the offline
  fallback. Its bulk moduli are usable, its shear constants far too soft, so decisions use K and
  G is indicative only.
- ``sevennet-l3i5``: SevenNet-l3i5 (higher angular order, about 5x the cost of SevenNet-0), also shipped
  in the ``sevenn`` wheel; its shear constants are measured against DFT in benchmarks/fam.py.
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
from pymatgen.core import Structure

from core.batched import Failure, SinglePoint, relax_cells, single_points
from core.device import resolve_device
from core.elastic import (
    ElasticResult,
    ElasticSettings,
    IonResponse,
    deformations,
    displaced_cells,
    displacement_plan,
    elastic_constants,
    fit,
    reference_cell,
)
from core.failures import FailureClass
from core.relax import RelaxResult, UnphysicalResultError, relax
from core.settings import get_settings
from core.structures import from_atoms, to_row, validity_problem

log = logging.getLogger(__name__)

MACE_MP_0_URL = "https://github.com/ACEsuit/mace-mp/releases/download/mace_mp_0/2023-12-03-mace-128-L1_epoch-199.model"
"""MACE-MP-0 medium, the model of the MACE-MP-0 paper (Batatia et al., arXiv:2401.00096)."""
FAM_NAMES = ("auto", "mace-mp-0", "sevennet-0", "sevennet-l3i5")
SEVENNET_CHECKPOINTS = {"sevennet-0": "7net-0", "sevennet-l3i5": "7net-l3i5"}
"""SevenNet models by matloop name -> the ``sevenn`` pretrained name (weights inside the wheel)."""
DOWNLOAD_TIMEOUT_S = 60


class FamUnavailableError(RuntimeError):
    """The requested foundation model cannot be loaded (no weights, no network)."""


class FamSettings(BaseModel):
    """Stage-II settings: relaxation, structure matching and the elastic calculation. Hashed into every cache key."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    fmax: float = Field(0.05, gt=0)
    """eV/Å: relaxation force threshold (cell forces included)."""
    steps: int = Field(300, ge=1)
    """Relaxation step limit; a structure still above fmax after it is rejected as unconverged."""
    optimizer: Literal["FIRE", "BFGS"] = "FIRE"
    """Optimizer of the one-at-a-time (ASE) path; the batched path always uses FIRE."""
    fire_dt_start: float = Field(0.3, gt=0, le=1.0)
    """First FIRE time step of the batched relaxation: 0.3 takes 30 % fewer steps than ASE's 0.1 to the
    same fmax, from relaxed and from rattled cells alike (FIRE still caps each step at 0.2 Å)."""
    batched: bool = True
    """Relax, strain and evaluate whole batches of structures per model call (torch-sim), not one at a time (ASE)."""
    ltol: float = 0.2
    """StructureMatcher fractional length tolerance: does the relaxed structure still match the input?"""
    stol: float = 0.3
    """StructureMatcher site tolerance (in units of (V/n)^(1/3))."""
    angle_tol: float = 5.0
    """StructureMatcher angle tolerance, degrees."""
    elastic: ElasticSettings = ElasticSettings(strains=(-0.01, 0.01), eos_strains=(), ion_fmax=1e-3)
    """Central differences at ±1 % and no EOS cross-check: the fewest cells that give the full tensor
    (the DFT stage keeps the four-point fit and the EOS). Ions are relaxed wherever a strain moves
    them by more than noise (1 meV/Å): under 1 % strain, forces of a few meV/Å already change C11
    of hcp Ti by 10 GPa (tests/test_batched.py)."""
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
    error_class: FailureClass | None = None
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


def fam_calculator(name: str = "auto", device: str | None = None, dtype: str = "float64") -> tuple[Calculator, str]:
    """An ASE calculator for a foundation model on ``device``, and the name of the model actually used.

    ``name`` is ``auto``, ``mace-mp-0``, ``sevennet-0``, ``sevennet-l3i5`` or a path to a MACE model file; ``device``
    is resolved by :func:`core.device.resolve_device` (None: ``MATLOOP_DEVICE``, default auto).
    Raises FamUnavailableError when the model cannot be had and ValueError for an unknown name.
    """
    device = str(resolve_device(device))
    if name == "auto":
        try:
            return fam_calculator("mace-mp-0", device, dtype)
        except FamUnavailableError as exc:
            log.warning("MACE-MP-0 unavailable (%s); falling back to SevenNet-0", exc)
            return fam_calculator("sevennet-0", device, dtype)
    if name == "mace-mp-0":
        return _mace_calculator(mace_mp_checkpoint(), dtype, device), "mace-mp-0"
    if name in SEVENNET_CHECKPOINTS:
        from sevenn.calculator import SevenNetCalculator

        return SevenNetCalculator(SEVENNET_CHECKPOINTS[name], device=device), name
    path = Path(name).expanduser()
    if path.is_file():
        return _mace_calculator(path, dtype, device), _file_tag(path)
    raise ValueError(f"unknown FAM {name!r}: use one of {', '.join(FAM_NAMES)} or a path to a MACE model file")


def calculator_device(calculator: Calculator) -> torch.device:
    """The device the calculator's network sits on (CPU for a calculator without a torch network)."""
    net = (getattr(calculator, "models", None) or [getattr(calculator, "model", None)])[0]
    params = list(net.parameters()) if isinstance(net, torch.nn.Module) else []
    return params[0].device if params else torch.device("cpu")


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


# ---------- batched models (torch-sim) ----------
def torchsim_model(calculator: Calculator) -> Any:
    """A torch-sim model wrapping a copy of the calculator's network (MACE or SevenNet), on the calculator's device.

    SevenNet 0.10.4 predates what torch-sim 0.3 expects; two shims make it run: the
    ``DATA_MODALITY`` key and a ``modal_map = None`` attribute on a copy of the network.
    Raises ValueError for a calculator with no batched wrapper.
    """
    if getattr(calculator, "models", None):
        from torch_sim.models.mace import MaceModel

        net = copy.deepcopy(calculator.models[0])
        param = next(net.parameters())
        return MaceModel(net, device=param.device, dtype=param.dtype)
    if hasattr(calculator, "type_map") and hasattr(calculator, "model"):
        import sevenn._keys as keys
        from torch_sim.models.sevennet import SevenNetModel

        if not hasattr(keys, "DATA_MODALITY"):
            keys.DATA_MODALITY = "data_modality"
        net = copy.deepcopy(calculator.model)
        net.modal_map = None
        return SevenNetModel(net, device=next(net.parameters()).device)
    raise ValueError(f"no batched (torch-sim) wrapper for {type(calculator).__name__}")


def elastic_batch(
    model: Any, cells: Sequence[Atoms], settings: ElasticSettings, known: Sequence[SinglePoint | None] | None = None
) -> list[ElasticResult | Failure]:
    """Elastic tensors of many relaxed cells from batched single points: every strained cell of every structure.

    Ions are relaxed at fixed cell (``relax_ions``) only for structures whose strained cells
    feel forces above ``ion_fmax`` (a strain that breaks a symmetry holding atoms in place), and
    then by linear response (:class:`core.elastic.IonResponse`): three displaced reference cells per
    symmetry-distinct atom instead of one relaxation per strained cell. A structure any of whose cells fails is a
    :class:`Failure` (the caller may redo it one at a time); the others are unaffected. ``known``
    holds each cell's own single point where one is at hand (a relaxation's last step), which is
    then not recomputed.
    """
    refs = [reference_cell(a, settings) for a in cells]
    plans = [deformations(r, settings, oriented=True) for r in refs]
    known = list(known) if known is not None else [None] * len(cells)
    missing = [s for s, k in enumerate(known) if k is None]
    points = single_points(model, [d.atoms for plan in plans for d in plan] + [refs[s] for s in missing])
    computed = dict(zip(missing, points[len(points) - len(missing) :], strict=True))
    ref_points = [computed[s] if k is None else _rotated(k, cells[s], refs[s]) for s, k in enumerate(known)]
    offsets = np.cumsum([0, *(len(p) for p in plans)])
    per_structure = [points[offsets[s] : offsets[s + 1]] for s in range(len(plans))]
    out: list[ElasticResult | Failure] = [Failure("not computed")] * len(cells)
    needs_response: list[int] = []
    for s, (ref, pts) in enumerate(zip(ref_points, per_structure, strict=True)):
        failed = next((p for p in [ref, *pts] if isinstance(p, Failure)), None)
        if failed is not None:
            out[s] = failed
        elif (
            settings.relax_ions
            and len(refs[s]) > 1
            and settings.ion_steps > 0
            and max(np.linalg.norm(p.forces - ref.forces, axis=1).max() for p in pts) > settings.ion_fmax
        ):
            needs_response.append(s)
        else:
            results = {d.label: (p.stress, p.energy) for d, p in zip(plans[s], pts, strict=True)}
            out[s] = fit(refs[s], plans[s], results, settings)
    disp_plans = {s: displacement_plan(refs[s], settings.symprec) for s in needs_response}
    displaced = [displaced_cells(refs[s], disp_plans[s], settings.ion_step) for s in needs_response]
    disp_points = iter(single_points(model, [c for group in displaced for c in group]))
    for s, group in zip(needs_response, displaced, strict=True):
        disp = [next(disp_points) for _ in group]
        failed = next((p for p in disp if isinstance(p, Failure)), None)
        if failed is not None:
            out[s] = failed
            continue
        ref = ref_points[s]
        response = IonResponse.from_displacements(
            disp_plans[s], ref.forces, ref.stress, [(p.forces, p.stress) for p in disp], settings.ion_step
        )
        pts = zip(plans[s], per_structure[s], strict=True)
        results = {d.label: response.relax(p.forces, p.stress, p.energy) for d, p in pts}
        result = fit(refs[s], plans[s], results, settings)
        if response.min_eigenvalue < 0:
            result.flags.append("ions_unstable")
        out[s] = result
    return out


# ---------- one structure ----------
def _matcher(settings: FamSettings) -> StructureMatcher:
    return StructureMatcher(ltol=settings.ltol, stol=settings.stol, angle_tol=settings.angle_tol)


def _classify(exc: BaseException) -> FailureClass:
    if isinstance(exc, UnphysicalResultError | FloatingPointError):
        return FailureClass.UNPHYSICAL
    if isinstance(exc, KeyError | ValueError) and "know" in str(exc).lower():
        return FailureClass.UNKNOWN_ELEMENT
    return FailureClass.CALCULATOR_ERROR


def fam_outcome(
    atoms: Atoms,
    calculator: Calculator,
    model_name: str,
    settings: FamSettings | None = None,
    progress: Callable[[str], None] | None = None,
) -> FamOutcome:
    """One structure, one at a time (ASE): relax, check it still matches, compute the elastic tensor.

    The reference path and the fallback of :func:`fam_outcomes`. Never raises for a bad
    structure: the failure is returned with its class so a batch goes on.
    """
    settings = settings or FamSettings()
    failed = _precheck(atoms, calculator, model_name)
    if failed is not None:
        return failed
    out = FamOutcome(model_name=model_name)
    try:
        relaxed = relax(atoms, calculator, fmax=settings.fmax, steps=settings.steps, optimizer=settings.optimizer)
        out = _after_relax(out, from_atoms(atoms), relaxed, settings)
        if out.relax_converged and out.matches_input:
            out.elastic = elastic_constants(relaxed.atoms, calculator, settings.elastic, progress)
    except Exception as exc:  # any calculator failure is recorded, never fatal to the batch
        out.error_class, out.error = _classify(exc), f"{type(exc).__name__}: {exc}"
    return out


def _rotated(point: SinglePoint, cell: Atoms, rotated: Atoms) -> SinglePoint:
    """A single point of ``cell`` expressed in the frame of ``rotated``, a rigidly rotated copy of it."""
    rot_t = np.linalg.solve(np.asarray(cell.cell[:]), np.asarray(rotated.cell[:]))  # new rows = old rows @ R^T
    u, _, vt = np.linalg.svd(rot_t)
    rot = (u @ vt).T
    return SinglePoint(point.energy, point.forces @ rot.T, rot @ point.stress @ rot.T)


def _precheck(atoms: Atoms, calculator: Calculator, model_name: str) -> FamOutcome | None:
    """The outcome of a structure that cannot be computed at all (unknown element, bad input), else None."""
    unknown = _unknown_elements(atoms, calculator)
    if unknown:
        error = f"{model_name} does not know {', '.join(unknown)}"
        return FamOutcome(model_name=model_name, error_class=FailureClass.UNKNOWN_ELEMENT, error=error)
    problem = validity_problem(from_atoms(atoms))
    if problem:
        return FamOutcome(model_name=model_name, error_class=FailureClass.BAD_INPUT, error=problem)
    return None


def _after_relax(
    out: FamOutcome, input_structure: Structure, relaxed: RelaxResult, settings: FamSettings
) -> FamOutcome:
    """The outcome with the relaxation recorded and the structure-match gate decided."""
    final = from_atoms(relaxed.atoms)
    return out.model_copy(
        update={
            "relaxed": to_row(final),
            "relax_converged": relaxed.converged,
            "relax_steps": relaxed.n_steps,
            "energy_per_atom": relaxed.energy / len(relaxed.atoms),
            "matches_input": validity_problem(final) is None and bool(_matcher(settings).fit(input_structure, final)),
        }
    )


def fam_outcomes(
    atoms_list: Sequence[Atoms],
    calculator: Calculator,
    model_name: str,
    settings: FamSettings | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[FamOutcome]:
    """Stage II for many structures, one outcome each, in order: relaxed, matched, elastic tensor.

    Batched (``settings.batched`` and a model torch-sim can wrap): every relaxation in one
    batch, then every strained cell of every structure (:func:`elastic_batch`), on the
    calculator's device. A structure the batch could not finish is redone one at a time
    (:func:`fam_outcome`), which records its own failure; the others keep their batched
    results. ``progress`` hears one line per phase.
    """
    settings = settings or FamSettings()
    say = progress or (lambda _msg: None)
    outcomes: list[FamOutcome | None] = [_precheck(a, calculator, model_name) for a in atoms_list]
    model = _batch_model(calculator) if settings.batched else None
    todo = [i for i, o in enumerate(outcomes) if o is None]
    if model is not None and todo:
        cells = [atoms_list[i] for i in todo]
        relaxed = relax_cells(model, cells, settings.fmax, settings.steps, dt_start=settings.fire_dt_start)
        say(f"relaxed {len(todo)} structures batched")
        ready: list[tuple[int, RelaxResult]] = []
        for i, r in zip(todo, relaxed, strict=True):
            if isinstance(r, Failure):
                log.info("structure %d left the batch (%s); redoing it one at a time", i, r.reason)
                continue
            o = _after_relax(FamOutcome(model_name=model_name), from_atoms(atoms_list[i]), r, settings)
            outcomes[i] = o
            if o.relax_converged and o.matches_input:
                ready.append((i, r))
        if ready:
            known = [None if r.stress is None else SinglePoint(r.energy, r.forces, r.stress) for _, r in ready]
            elastic = elastic_batch(model, [r.atoms for _, r in ready], settings.elastic, known)
            say(f"elastic tensors of {len(ready)} structures batched")
            for (i, _), e in zip(ready, elastic, strict=True):
                if isinstance(e, Failure):
                    log.info("structure %d: batched elastic tensor failed (%s); redoing it one at a time", i, e.reason)
                    outcomes[i] = None
                else:
                    outcomes[i] = outcomes[i].model_copy(update={"elastic": e})
    return [
        o if o is not None else fam_outcome(a, calculator, model_name, settings)
        for a, o in zip(atoms_list, outcomes, strict=True)
    ]


def _batch_model(calculator: Calculator) -> Any | None:
    """The torch-sim model for this calculator, or None (one at a time) when there is none."""
    try:
        return torchsim_model(calculator)
    except ValueError as exc:
        log.info("%s; computing one structure at a time", exc)
        return None


def verdict(
    outcome: FamOutcome, target: float, tolerance: float, failed_conditions: list[str] | None = None
) -> tuple[Literal["pass", "reject", "error"], str]:
    """Stage-II decision for one candidate: pass only if relaxed, unchanged, complete, Born-stable and near target.

    The single-K case decides on K_vrh alone (not G: SevenNet-0's shear constants are too soft to trust); a
    design target's candidate passes the structural checks and then every condition (``failed_conditions``, from
    ``core.targets.stage_checks``: a G condition then uses the FAM's G, which only DFT confirms).
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
    if failed_conditions is not None:
        if failed_conditions:
            return "reject", "condition not met: " + "; ".join(failed_conditions)
        return "pass", f"K_vrh {el.k_vrh:.1f} GPa, every condition met (tolerance {tolerance:.0%}), Born-stable"
    off = (el.k_vrh - target) / target
    if abs(off) > tolerance:
        return "reject", f"K_vrh {el.k_vrh:.1f} GPa is {off:+.0%} off target {target:g} GPa (tolerance {tolerance:.0%})"
    return "pass", f"K_vrh {el.k_vrh:.1f} GPa within {tolerance:.0%} of {target:g} GPa, Born-stable"
