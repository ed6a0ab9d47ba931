"""DFT settings as data, named presets, escalation on retry, and the ASE calculator factory.

One :class:`DftSettings` describes a calculation for any code (GPAW embedded here, VASP or
Quantum ESPRESSO on production clusters). Its fields fall in two groups:

- *physics* fields (code, functional, cutoff, k-mesh, smearing, spin) decide the number you get.
  They are fixed for every point of one strain/EOS set, and their hash is the ``<hash>`` in the
  ``dft:<code>/<hash>`` method string, so two labels with the same method are comparable.
- *convergence* fields (mixing, SCF steps, eigensolver, tolerances, ionic steps) decide whether
  and how fast a calculation converges, not what it converges to. Retries may change them for
  a single point.

The k-mesh is given as a spacing (VASP's KSPACING convention, 1/Å including 2π) and turned into
an explicit mesh once, on the reference cell (:func:`resolve`): a strained copy of the cell
then gets the same mesh, so no point of a strain set silently uses a different one.

Escalation on retry is data (:data:`ESCALATION`): for each failure class, the steps the n-th
failure of that class applies, cumulatively. A step that touches a physics field is applied
only where the whole set is recomputed (the relaxation, scope ``"structure"``), never to one
point of a strain set (scope ``"point"``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.units import Bohr, Ry
from pydantic import BaseModel, ConfigDict, Field

from core import gpaw_setups
from core.elastic import ElasticSettings, evaluate
from core.failures import DftFailure, FailureClass, as_failure, classify_text
from core.presets import Presets
from core.provenance import settings_hash

Code = Literal["gpaw", "vasp", "qe", "emt"]
Smearing = Literal["fermi-dirac", "marzari-vanderbilt", "methfessel-paxton", "gaussian"]
Eigensolver = Literal["davidson", "rmm-diis", "cg"]
Scope = Literal["point", "structure"]

PHYSICS_FIELDS: tuple[str, ...] = ("code", "xc", "ecut", "kspacing", "kpts", "smearing", "smearing_width", "spinpol")
"""Fields that change the computed number; fixed within a strain set and hashed into the method."""


class DftSettings(BaseModel):
    """Everything that defines one DFT calculation, code-independent where possible.

    Units: eV for energies and smearing, 1/Å (with 2π, VASP convention) for the k-spacing,
    eV/Å for forces. ``emt`` is ASE's effective-medium potential: not DFT, a cheap stand-in
    with the same code path for smoke tests and fault-injection benchmarks.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    code: Code = "gpaw"
    xc: str = "PBE"
    ecut: float = Field(300.0, gt=0)
    """Plane-wave cutoff, eV."""
    kspacing: float = Field(0.5, gt=0)
    """Largest k-point spacing, 1/Å (2π included): N_i = ceil(|b_i| / kspacing)."""
    kpts: tuple[int, int, int] | None = None
    """Explicit Monkhorst-Pack mesh (Γ-centred); set by :func:`resolve` from the reference cell."""
    smearing: Smearing = "fermi-dirac"
    smearing_width: float = Field(0.1, gt=0)
    """eV."""
    spinpol: bool = False
    scf_tol: float = Field(1e-5, gt=0)
    """SCF energy convergence, eV (per cell; GPAW takes it per valence electron, see the factory)."""
    force_tol: float = Field(0.01, gt=0)
    """Ionic relaxation threshold, eV/Å."""
    max_scf_steps: int = Field(100, ge=1)
    mixing_beta: float = Field(0.05, gt=0, le=1)
    eigensolver: Eigensolver = "davidson"
    relax_steps: int = Field(100, ge=0)
    symmetry: bool = True
    """Reduce the k-points by the cell's symmetry; off (every k-point, slower, the same result) is the retry of a
    cell whose symmetry analysis fails."""
    relax_optimizer: Literal["BFGS", "FIRE"] = "BFGS"
    """BFGS needs few force calls on the smooth DFT surface near a (FAM-relaxed) minimum; FIRE is the fallback."""
    pseudopotentials: str = "default"
    """Setups/POTCAR/UPF family: GPAW 'paw', VASP setups name, or a QE file pattern with {symbol}."""
    generated_setups: tuple[str, ...] = ()
    """GPAW datasets generated for elements the wheel lacks (``core.gpaw_setups``); set by :func:`resolve`."""

    def physics(self) -> dict[str, Any]:
        """The physics fields only (see module docstring); generated datasets too, where the cell needs any."""
        fields = {name: getattr(self, name) for name in PHYSICS_FIELDS}
        return fields | ({"generated_setups": self.generated_setups} if self.generated_setups else {})

    def physics_hash(self) -> str:
        """12-hex hash of the physics fields: the ``<hash>`` of ``dft:<code>/<hash>``."""
        return settings_hash(self.physics())

    def full_hash(self) -> str:
        """12-hex hash of every field: identifies one attempt's settings in ``jobs``."""
        return settings_hash(self)

    @property
    def method(self) -> str:
        """The properties.method string for numbers computed with these settings."""
        return f"dft:{self.code}/{self.physics_hash()}"


PRESETS: Presets[DftSettings] = Presets(
    "DFT preset",
    {
        # GPAW, loose: a 1-2 atom metallic cell labels (relax + symmetry-reduced strains + EOS) in about a minute.
        "test": DftSettings(
            code="gpaw",
            ecut=300.0,
            kspacing=0.6,
            smearing="fermi-dirac",
            smearing_width=0.2,
            scf_tol=1e-4,
            force_tol=0.05,
            max_scf_steps=60,
            relax_steps=40,
        ),
        # GPAW, tighter: K within a few % of converged PBE for bcc W / fcc Ir at minutes per structure on 2 cores.
        "gpaw-tight": DftSettings(
            code="gpaw",
            ecut=450.0,
            kspacing=0.3,
            smearing="fermi-dirac",
            smearing_width=0.1,
            scf_tol=1e-5,
            force_tol=0.02,
            max_scf_steps=100,
            relax_steps=100,
        ),
        # Production (HPC): PBE, 700 eV, k-spacing 0.1 1/Å, ediff 1e-5 eV, forces 0.01 eV/Å.
        "vasp": DftSettings(
            code="vasp",
            ecut=700.0,
            kspacing=0.1,
            smearing="methfessel-paxton",
            smearing_width=0.1,
            scf_tol=1e-5,
            force_tol=0.01,
            max_scf_steps=120,
            mixing_beta=0.4,
            pseudopotentials="recommended",
        ),
        "qe": DftSettings(
            code="qe",
            ecut=700.0,
            kspacing=0.1,
            smearing="marzari-vanderbilt",
            smearing_width=0.1,
            scf_tol=1e-5,
            force_tol=0.01,
            max_scf_steps=120,
            mixing_beta=0.4,
            pseudopotentials="{symbol}.pbe-spn-kjpaw_psl.1.0.0.UPF",
        ),
        # Not DFT: ASE's EMT (Al Cu Ag Au Ni Pd Pt) through the same code path, for smoke tests and benchmarks.
        "emt": DftSettings(code="emt", ecut=1.0, kspacing=1.0, scf_tol=1e-5, force_tol=0.02, relax_steps=100),
    },
)


PresetName = Literal[tuple(PRESETS)]  # type: ignore[valid-type]
"""The named DFT presets, as a type: a form shows them as choices."""


# ---------- k-points ----------
def kpoint_mesh(cell: np.ndarray | Sequence[Sequence[float]], kspacing: float) -> tuple[int, int, int]:
    """Monkhorst-Pack mesh with spacing at most ``kspacing`` (1/Å, 2π included, as VASP's KSPACING)."""
    recip = 2 * math.pi * np.linalg.inv(np.asarray(cell, dtype=float)).T
    n = [max(1, math.ceil(float(np.linalg.norm(b)) / kspacing - 1e-9)) for b in recip]
    return (n[0], n[1], n[2])


def resolve(settings: DftSettings, reference: Atoms) -> DftSettings:
    """Fix the k-mesh on the reference cell, so every strained copy of it uses the same mesh, and name the GPAW
    datasets its elements need generated."""
    update: dict[str, Any] = {}
    if settings.kpts is None:
        update["kpts"] = kpoint_mesh(reference.cell[:], settings.kspacing)
    if _default_gpaw(settings):
        update["generated_setups"] = gpaw_setups.generated_tags(reference.get_chemical_symbols(), settings.xc)
    return settings.model_copy(update=update) if update else settings


def _default_gpaw(settings: DftSettings) -> bool:
    return settings.code == "gpaw" and settings.pseudopotentials == "default"


def cannot_compute(settings: DftSettings, symbols: Sequence[str]) -> str | None:
    """Why the code cannot compute these elements at all (said before anything runs), or None."""
    return gpaw_setups.refusal(symbols, settings.xc) if _default_gpaw(settings) else None


# ---------- escalation ----------
class EscalationStep(BaseModel):
    """One retry change: set some fields to values and/or multiply numeric fields by factors."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    name: str
    set: dict[str, Any] = Field(default_factory=dict)
    scale: dict[str, float] = Field(default_factory=dict)

    @property
    def touches_physics(self) -> bool:
        """True if the step changes a physics field (allowed only when the whole set is recomputed)."""
        return bool((set(self.set) | set(self.scale)) & set(PHYSICS_FIELDS))

    def apply(self, settings: DftSettings) -> DftSettings:
        data = settings.model_dump()
        data.update(self.set)
        for name, factor in self.scale.items():
            value = data[name] * factor
            data[name] = round(value) if isinstance(data[name], int) else value
        return DftSettings.model_validate(data)


ESCALATION: dict[FailureClass, tuple[EscalationStep, ...]] = {
    FailureClass.SCF_UNCONVERGED: (
        EscalationStep(name="halve mixing, double SCF steps", scale={"mixing_beta": 0.5, "max_scf_steps": 2}),
        EscalationStep(name="conjugate-gradient eigensolver", set={"eigensolver": "cg"}),
        EscalationStep(name="double smearing", scale={"smearing_width": 2.0}),
    ),
    FailureClass.RELAX_UNCONVERGED: (
        EscalationStep(
            name="FIRE optimizer, double ionic steps", set={"relax_optimizer": "FIRE"}, scale={"relax_steps": 2}
        ),
        EscalationStep(name="tighter SCF for cleaner forces", scale={"scf_tol": 0.1, "max_scf_steps": 1.5}),
    ),
    FailureClass.SYMMETRY: (EscalationStep(name="symmetry off", set={"symmetry": False}),),
    # Scheduler problems: the settings are not at fault; retry as they were.
    FailureClass.WALLTIME: (),
    FailureClass.NODE_LOST: (),
    FailureClass.BAD_INPUT: (),
}
"""For each failure class, the change its 1st, 2nd, ... occurrence makes (cumulative). Data, not code."""


def escalate(
    base: DftSettings,
    failures: Sequence[FailureClass | str],
    scope: Scope = "point",
    ladder: Mapping[FailureClass, Sequence[EscalationStep]] | None = None,
) -> tuple[DftSettings, list[str]]:
    """Settings for the attempt after ``failures`` (the classes of the earlier attempts, in order).

    The n-th failure of a class applies that class's n-th step. At ``"point"`` scope steps that
    change physics fields are left out of the ladder, so one strain point never gets a different
    cutoff, k-mesh or smearing from its siblings. Returns the settings and the applied step names.
    """
    ladder = ESCALATION if ladder is None else ladder
    seen: dict[FailureClass, int] = {}
    settings, applied = base, []
    for failure in failures:
        cls = FailureClass(failure)
        steps = [s for s in ladder.get(cls, ()) if scope == "structure" or not s.touches_physics]
        n = seen.get(cls, 0)
        seen[cls] = n + 1
        if n < len(steps):
            settings = steps[n].apply(settings)
            applied.append(steps[n].name)
    return settings, applied


# ---------- calculators ----------
_VASP_ISMEAR = {"fermi-dirac": -1, "gaussian": 0, "methfessel-paxton": 1}
_VASP_ALGO = {"davidson": "Normal", "rmm-diis": "VeryFast", "cg": "All"}
_QE_SMEARING = {"fermi-dirac": "fd", "gaussian": "gaussian", "methfessel-paxton": "mp", "marzari-vanderbilt": "mv"}
_QE_DIAGONALIZATION = {"davidson": "david", "rmm-diis": "rmm-davidson", "cg": "cg"}
QE_OUTPUT = "espresso.pwo"


def dft_calculator(
    settings: str | DftSettings,
    directory: str | os.PathLike[str] | None = None,
    *,
    atoms: Atoms | None = None,
    **overrides: Any,
) -> Calculator:
    """An ASE calculator for a preset name or settings (plus field overrides).

    ``atoms`` (the reference cell) resolves the k-mesh when the settings do not fix it yet and
    names the QE pseudopotentials. ``directory`` holds the code's files (GPAW's log; VASP/QE
    inputs and outputs); it is required for VASP and QE.
    """
    s = (
        PRESETS.resolve(settings, overrides)
        if isinstance(settings, str)
        else (DftSettings.model_validate({**settings.model_dump(), **overrides}) if overrides else settings)
    )
    if s.kpts is None:
        if atoms is None:
            raise ValueError("the k-mesh is not fixed: pass the reference cell as atoms= or resolve() the settings")
        s = resolve(s, atoms)
    if directory is not None:
        Path(directory).mkdir(parents=True, exist_ok=True)
    if s.code == "emt":
        from ase.calculators.emt import EMT

        return EMT()
    if s.code == "gpaw":
        return _gpaw(s, directory)
    if directory is None:
        raise ValueError(f"{s.code} runs in a directory: pass directory=")
    if s.code == "vasp":
        return _vasp(s, Path(directory))
    if atoms is None:
        raise ValueError("Quantum ESPRESSO needs the atoms to name its pseudopotentials: pass atoms=")
    return _qe(s, Path(directory), sorted(set(atoms.get_chemical_symbols())))


def _gpaw(s: DftSettings, directory: str | os.PathLike[str] | None) -> Calculator:
    from gpaw import GPAW

    if s.smearing == "gaussian":
        raise ValueError("GPAW has no Gaussian smearing; use fermi-dirac, marzari-vanderbilt or methfessel-paxton")
    txt = None if directory is None else str(Path(directory) / "gpaw.txt")
    return GPAW(
        mode={"name": "pw", "ecut": s.ecut},
        xc=s.xc,
        kpts={"size": s.kpts, "gamma": True},
        occupations={"name": s.smearing, "width": s.smearing_width},
        convergence={"energy": s.scf_tol},  # GPAW: eV per valence electron
        maxiter=s.max_scf_steps,
        mixer={"beta": s.mixing_beta},
        eigensolver=s.eigensolver,
        spinpol=s.spinpol,
        setups="paw" if s.pseudopotentials == "default" else s.pseudopotentials,
        symmetry={} if s.symmetry else "off",
        txt=txt,
    )


def _vasp(s: DftSettings, directory: Path) -> Calculator:
    from ase.calculators.vasp import Vasp

    if s.smearing not in _VASP_ISMEAR:
        raise ValueError(f"VASP has no {s.smearing} smearing; use {', '.join(_VASP_ISMEAR)}")
    return Vasp(
        directory=str(directory),
        xc=s.xc,
        setups=s.pseudopotentials,
        encut=s.ecut,
        kpts=s.kpts,
        gamma=True,
        ismear=_VASP_ISMEAR[s.smearing],
        sigma=s.smearing_width,
        ediff=s.scf_tol,
        ediffg=-s.force_tol,
        nelm=s.max_scf_steps,
        amix=s.mixing_beta,
        algo=_VASP_ALGO[s.eigensolver],
        ispin=2 if s.spinpol else 1,
        isym=2 if s.symmetry else 0,
        prec="Accurate",
        lreal=False,
        lwave=False,
        lcharg=False,
        ibrion=-1,
        nsw=0,
        isif=2,
    )


def _qe(s: DftSettings, directory: Path, symbols: Sequence[str]) -> Calculator:
    from ase.calculators.espresso import Espresso, EspressoProfile

    profile = EspressoProfile(
        command=os.environ.get("ASE_ESPRESSO_COMMAND", "pw.x"),
        pseudo_dir=os.environ.get("ESPRESSO_PSEUDO", str(Path.home() / "espresso" / "pseudo")),
    )
    input_data = {
        "control": {"calculation": "scf", "tprnfor": True, "tstress": True, "forc_conv_thr": s.force_tol / (Ry / Bohr)},
        "system": {
            "ecutwfc": s.ecut / Ry,
            "ecutrho": 8 * s.ecut / Ry,  # PAW/ultrasoft charge-density cutoff
            "occupations": "smearing",
            "smearing": _QE_SMEARING[s.smearing],
            "degauss": s.smearing_width / Ry,
            "nspin": 2 if s.spinpol else 1,
            "nosym": not s.symmetry,
        },
        "electrons": {
            "conv_thr": s.scf_tol / Ry,
            "electron_maxstep": s.max_scf_steps,
            "mixing_beta": s.mixing_beta,
            "diagonalization": _QE_DIAGONALIZATION[s.eigensolver],
        },
    }
    return Espresso(
        directory=str(directory),
        profile=profile,
        input_data=input_data,
        pseudopotentials={el: s.pseudopotentials.format(symbol=el) for el in symbols},
        kpts=s.kpts,
        koffset=(0, 0, 0),
    )


# ---------- running one calculation, with failures classified ----------
_OUTPUT_FILES: dict[str, tuple[str, ...]] = {
    "vasp": ("OUTCAR", "vasp.out"),
    "qe": (QE_OUTPUT, "espresso.err"),
}


def classify_output(code: str, directory: str | os.PathLike[str] | None) -> FailureClass | None:
    """The failure class the code's output files in ``directory`` show, or None (also for GPAW/EMT)."""
    if directory is None:
        return None
    text = []
    for name in _OUTPUT_FILES.get(code, ()):
        path = Path(directory) / name
        if path.is_file():
            text.append(path.read_text(errors="replace"))
    return classify_text("\n".join(text)) if text else None


def _check_converged(settings: DftSettings, calc: Calculator, directory: str | os.PathLike[str] | None) -> None:
    """VASP and QE can finish 'successfully' with an unconverged SCF: read their verdict and raise."""
    if settings.code == "vasp" and getattr(calc, "converged", None) is False:
        raise DftFailure(FailureClass.SCF_UNCONVERGED, f"VASP: EDIFF {settings.scf_tol} not reached in NELM steps")
    if settings.code == "qe":
        found = classify_output("qe", directory)
        if found is not None:
            raise DftFailure(found, f"Quantum ESPRESSO output in {directory} shows {found.value}")


def _bad_input(atoms: Atoms, settings: DftSettings) -> None:
    """Refuse a cell no calculation can succeed on; generate the GPAW datasets it needs (once per machine)."""
    from core.structures import from_atoms, validity_problem

    if len(atoms) == 0:
        raise DftFailure(FailureClass.BAD_INPUT, "empty cell")
    problem = validity_problem(from_atoms(atoms))
    if problem:
        raise DftFailure(FailureClass.BAD_INPUT, problem)
    if _default_gpaw(settings):
        try:
            gpaw_setups.ensure(atoms.get_chemical_symbols(), settings.xc)  # refuses what GPAW cannot do
        except ValueError as exc:
            raise DftFailure(FailureClass.BAD_INPUT, str(exc)) from exc


def _classify(exc: Exception, settings: DftSettings, directory: str | os.PathLike[str] | None) -> DftFailure:
    found = None if isinstance(exc, DftFailure) else classify_output(settings.code, directory)
    return DftFailure(found, f"{type(exc).__name__}: {exc}") if found else as_failure(exc)


def run_relax(
    atoms: Atoms, settings: DftSettings, directory: str | os.PathLike[str] | None = None
) -> tuple[Atoms, float, int]:
    """Relax cell and positions; returns (relaxed atoms, energy eV, steps). Raises DftFailure (classified).

    The relaxation is driven by ASE (core.relax, one code path for every calculator). On a
    production cluster with VASP/QE the same task runs each ionic step as a code invocation.
    """
    from core.relax import relax

    _bad_input(atoms, settings)
    try:
        calc = dft_calculator(settings, directory, atoms=atoms)
        result = relax(
            atoms.copy(),
            calc,
            fmax=settings.force_tol,
            steps=settings.relax_steps,
            optimizer=settings.relax_optimizer,
            cell=True,
        )
        _check_converged(settings, calc, directory)
    except Exception as exc:
        raise _classify(exc, settings, directory) from exc
    if not result.converged:
        raise DftFailure(
            FailureClass.RELAX_UNCONVERGED,
            f"forces/stress above {settings.force_tol} eV/Å after {result.n_steps} of {settings.relax_steps} steps",
        )
    return result.atoms, float(result.energy), int(result.n_steps)


def run_point(
    atoms: Atoms,
    settings: DftSettings,
    elastic_settings: ElasticSettings,
    directory: str | os.PathLike[str] | None = None,
) -> tuple[np.ndarray, float]:
    """(3x3 stress eV/Å^3, energy eV) of one deformed cell, ions relaxed at fixed cell as the elastic
    settings ask (core.elastic.evaluate). ``settings`` must already be resolved on the reference cell.
    Raises DftFailure (classified)."""
    if settings.kpts is None:
        raise ValueError("resolve() the settings on the reference cell before running strain points")
    _bad_input(atoms, settings)
    try:
        calc = dft_calculator(settings, directory, atoms=atoms)
        stress, energy = evaluate(atoms, calc, elastic_settings)
        _check_converged(settings, calc, directory)
    except Exception as exc:
        raise _classify(exc, settings, directory) from exc
    if not (np.isfinite(stress).all() and math.isfinite(energy)):
        raise DftFailure(FailureClass.SCF_UNCONVERGED, "non-finite stress or energy")
    return stress, energy
