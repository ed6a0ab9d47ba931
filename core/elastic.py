"""Elastic constants from finite strains, K and G in Voigt/Reuss/Hill forms, Born stability, and an EOS check.

One implementation for every calculator: the FAM screen runs it in-process
(:func:`elastic_constants`), the DFT stage builds the same deformations (:func:`deformations`),
runs each one as a job and fits the results with :func:`fit`.

Conventions (the same as pymatgen and the Materials Project):

- Strains are Green-Lagrange strains applied through a symmetric deformation gradient
  (no rigid rotation), written in Voigt form with engineering shear (``gamma_yz = 2 E_yz``),
  component order xx, yy, zz, yz, xz, xy.
- Stresses are what ASE calculators return (``atoms.get_stress(voigt=False)``, eV/Å^3, positive
  in tension), converted to GPa for the fit; ``sigma = sigma_0 + C epsilon`` is fitted with the
  residual stress ``sigma_0`` of the reference cell as an intercept, so a slightly unrelaxed cell
  does not bias C.
- Moduli come from pymatgen's :class:`ElasticTensor` (IEEE Voigt matrix in GPa).

A symmetry-reduced strain set is the default: a strain that a point-group operation of the
crystal maps onto an already planned strain is not computed; its stress is the rotated stress of
the planned one (``sigma' = R sigma R^T`` for ``epsilon' = R epsilon R^T``). For a cubic cell that
is 2 of 6 strain directions. The fit then uses every symmetry image of every computed point.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import spglib
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.eos import EquationOfState
from ase.units import GPa
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pymatgen.core.elasticity.elastic import ElasticTensor
from pymatgen.core.elasticity.strain import Strain, convert_strain_to_deformation

from core.relax import relax

VOIGT_LABELS = ("xx", "yy", "zz", "yz", "xz", "xy")
_VOIGT_INDEX = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))
_ENGINEERING_SHEAR = np.array([1.0, 1.0, 1.0, 2.0, 2.0, 2.0])
EV_PER_A3_TO_GPA = 1.0 / GPa
"""eV/Å^3 -> GPa (160.2)."""

StressEnergy = tuple[np.ndarray | Sequence[Sequence[float]] | None, float | None]
"""What a calculation of one deformation returns: (3x3 stress in eV/Å^3 or None, energy in eV or None)."""


class ElasticSettings(BaseModel):
    """How the elastic tensor and the EOS bulk modulus are computed. Part of every cache key and settings hash."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    strains: tuple[float, ...] = (-0.01, -0.005, 0.005, 0.01)
    """Magnitudes applied to each Voigt component (normal and engineering shear)."""
    use_symmetry: bool = True
    """Compute only strains not related by a point-group operation (exact for a symmetric cell)."""
    symprec: float = 1e-3
    """Symmetry tolerance (Å) used to find the point group of the relaxed cell."""
    eos_strains: tuple[float, ...] = (-0.02, -0.01, 0.0, 0.01, 0.02)
    """Isotropic linear strains for the Birch-Murnaghan EOS (±2 % linear is ±6 % in volume)."""
    relax_ions: bool = True
    """Relax positions (cell fixed) at each strained cell: relaxed-ion constants, as DFT databases report."""
    ion_fmax: float = Field(0.01, gt=0)
    """Force threshold (eV/Å) of the fixed-cell ionic relaxation."""
    ion_steps: int = Field(100, ge=0)
    """Step limit of that relaxation one at a time; 0 gives clamped-ion constants."""
    ion_step: float = Field(0.01, gt=0, le=0.05)
    """Å: finite displacement of the batched ionic response (:class:`IonResponse`), which replaces that relaxation."""
    eos_rel_tol: float = Field(0.15, gt=0)
    """Flag ``eos_disagrees`` when |K_eos - K_voigt| exceeds this fraction of K_voigt ..."""
    eos_abs_tol: float = Field(10.0, ge=0)
    """... and also exceeds this many GPa (so soft metals are not flagged for a few GPa)."""

    @field_validator("strains")
    @classmethod
    def _check_strains(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or any(s == 0 or abs(s) > 0.05 for s in value):
            raise ValueError("strains must be non-empty, non-zero and at most 5 % in magnitude")
        if len(set(value)) != len(value):
            raise ValueError("strains must be distinct")
        return tuple(value)

    @field_validator("eos_strains")
    @classmethod
    def _check_eos(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if value and (len(set(value)) < 5 or any(abs(s) > 0.1 for s in value)):
            raise ValueError("eos_strains needs at least 5 distinct linear strains of at most 10 % (or none at all)")
        return tuple(value)


@dataclass(frozen=True)
class Deformation:
    """One cell to compute: a strained copy of the reference cell and where it enters the fit.

    ``kind`` is "strain" (elastic tensor) or "eos" (isotropic scaling). ``strain`` is the
    Green-Lagrange strain (3x3). ``images`` are the Cartesian point-group rotations R under which
    this point also stands for the strain R E R^T (only the identity without symmetry reduction).
    """

    label: str
    kind: Literal["strain", "eos"]
    atoms: Atoms = field(repr=False)
    strain: np.ndarray = field(repr=False)
    images: tuple[np.ndarray, ...] = field(default=(), repr=False)


class Moduli(BaseModel):
    """Polycrystalline averages and stability of one 6x6 elastic matrix (GPa)."""

    k_voigt: float
    k_reuss: float | None
    k_vrh: float | None
    g_voigt: float
    g_reuss: float | None
    g_vrh: float | None
    min_eigenvalue: float
    """Smallest eigenvalue of the symmetrized Voigt matrix; Born-stable when positive."""
    born_stable: bool


class ElasticResult(BaseModel):
    """The elastic calculation of one structure. Moduli in GPa; None where they could not be computed."""

    c_voigt: list[list[float]] | None = None
    """6x6 Voigt matrix, GPa, fitted only when every strain point is present."""
    k_voigt: float | None = None
    k_reuss: float | None = None
    k_vrh: float | None = None
    g_voigt: float | None = None
    g_reuss: float | None = None
    g_vrh: float | None = None
    born_stable: bool | None = None
    min_eigenvalue: float | None = None
    eos_k: float | None = None
    """Birch-Murnaghan bulk modulus from isotropic scaling (equals K_voigt in the linear limit)."""
    eos_v0: float | None = None
    """EOS equilibrium volume, Å^3 per cell."""
    residual_stress: list[float] | None = None
    """Fitted stress of the unstrained cell (Voigt, GPa): large values mean the cell was not relaxed."""
    fit_rmse: float | None = None
    """Root-mean-square stress residual of the linear fit, GPa: large values mean non-linear or noisy stresses."""
    flags: list[str] = Field(default_factory=list)
    missing: list[str] = Field(default_factory=list)
    """Labels of deformations with no usable result; a tensor is never fitted from a partial set."""
    n_calculations: int = 0


# ---------- moduli ----------
def moduli(c_voigt: np.ndarray | Sequence[Sequence[float]]) -> Moduli:
    """K and G (Voigt, Reuss, Hill) and the general Born criterion of a 6x6 Voigt matrix in GPa.

    Reuss bounds need the compliance matrix; for a singular matrix they are None (and the
    structure is not Born-stable). Born stability is the general criterion: every eigenvalue
    of the symmetric Voigt matrix is positive (Mouhat & Coudert, PRB 90, 224104 (2014)).
    """
    c = np.asarray(c_voigt, dtype=float)
    if c.shape != (6, 6):
        raise ValueError(f"an elastic matrix in Voigt form is 6x6, got shape {c.shape}")
    if not np.isfinite(c).all():
        raise ValueError("the elastic matrix holds non-finite values")
    c = 0.5 * (c + c.T)
    tensor = ElasticTensor.from_voigt(c)
    min_eig = float(np.linalg.eigvalsh(c).min())
    k_reuss = g_reuss = None
    if np.linalg.cond(c) < 1e12:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            k_reuss, g_reuss = float(tensor.k_reuss), float(tensor.g_reuss)
        k_reuss = k_reuss if math.isfinite(k_reuss) else None
        g_reuss = g_reuss if math.isfinite(g_reuss) else None
    k_voigt, g_voigt = float(tensor.k_voigt), float(tensor.g_voigt)
    return Moduli(
        k_voigt=k_voigt,
        k_reuss=k_reuss,
        k_vrh=None if k_reuss is None else 0.5 * (k_voigt + k_reuss),
        g_voigt=g_voigt,
        g_reuss=g_reuss,
        g_vrh=None if g_reuss is None else 0.5 * (g_voigt + g_reuss),
        min_eigenvalue=min_eig,
        born_stable=min_eig > 0,
    )


# ---------- strains and symmetry ----------
def voigt_strain(component: int, amount: float) -> np.ndarray:
    """The 3x3 Green-Lagrange strain with one Voigt component set (engineering shear for 3..5)."""
    if not 0 <= component < 6:
        raise ValueError(f"Voigt component must be 0..5, got {component}")
    e6 = np.zeros(6)
    e6[component] = amount
    return np.asarray(Strain.from_voigt(e6))


def strained(atoms: Atoms, strain: np.ndarray) -> Atoms:
    """A copy of ``atoms`` deformed so that its Green-Lagrange strain is ``strain`` (no rotation)."""
    f = np.asarray(convert_strain_to_deformation(strain, shape="symmetric")).real
    out = atoms.copy()
    out.calc = None
    out.set_cell(np.asarray(atoms.cell[:]) @ f.T, scale_atoms=True)
    return out


def point_group_rotations(atoms: Atoms, symprec: float) -> list[np.ndarray]:
    """The crystal's point-group operations as Cartesian orthogonal matrices (identity first)."""
    cell = (np.asarray(atoms.cell[:]), atoms.get_scaled_positions(), atoms.get_atomic_numbers())
    sym = spglib.get_symmetry(cell, symprec=symprec)
    a = cell[0]
    rotations: list[np.ndarray] = [np.eye(3)]
    for w in [] if sym is None else sym["rotations"]:
        r = a.T @ w @ np.linalg.inv(a.T)
        u, _, vt = np.linalg.svd(r)  # nearest orthogonal matrix: removes the cell's residual distortion
        r = u @ vt
        if not _close_to_any(r, np.array(rotations), 1e-6):
            rotations.append(r)
    return rotations


def _close_to_any(matrix: np.ndarray, stack: np.ndarray, atol: float) -> bool:
    """``np.allclose(matrix, m, atol=atol)`` for any m of ``stack`` (k x 3 x 3), in one array operation."""
    if len(stack) == 0:
        return False
    return bool((np.abs(stack - matrix) <= atol + 1e-5 * np.abs(matrix)).all(axis=(1, 2)).any())


def standard_orientation(atoms: Atoms, symprec: float) -> Atoms:
    """A rigidly rotated copy whose symmetry axes lie along x, y, z (spglib's standard orientation).

    Moduli do not depend on orientation, but the symmetry reduction only finds equivalent
    strains (xx ~ yy ~ zz for a cubic cell) when the crystal axes are the Cartesian axes.
    """
    cell = (np.asarray(atoms.cell[:]), atoms.get_scaled_positions(), atoms.get_atomic_numbers())
    dataset = spglib.get_symmetry_dataset(cell, symprec=symprec)
    out = atoms.copy()
    out.calc = None
    if dataset is not None:
        out.set_cell(np.asarray(atoms.cell[:]) @ np.asarray(dataset.std_rotation_matrix).T, scale_atoms=True)
    return out


def _strain_plan(atoms: Atoms, settings: ElasticSettings) -> list[tuple[str, np.ndarray, tuple[np.ndarray, ...]]]:
    """(label, strain, images) for the strain points to compute, reduced by symmetry if asked."""
    full = [(f"strain:{VOIGT_LABELS[i]}:{s:+g}", voigt_strain(i, s)) for i in range(6) for s in settings.strains]
    rotations = point_group_rotations(atoms, settings.symprec) if settings.use_symmetry else [np.eye(3)]
    plan: list[tuple[str, np.ndarray, tuple[np.ndarray, ...]]] = []
    covered = np.zeros((0, 3, 3))
    stack = np.array(rotations)
    for label, strain in full:
        if _close_to_any(strain, covered, 1e-3 * np.abs(strain).max()):
            continue
        plan.append((label, strain, tuple(rotations)))
        covered = np.concatenate([covered, stack @ strain @ stack.transpose(0, 2, 1)])
    return plan


def reference_cell(atoms: Atoms, settings: ElasticSettings | None = None) -> Atoms:
    """The cell every deformation is built from: ``atoms``, rotated into standard orientation with ``use_symmetry``."""
    settings = settings or ElasticSettings()
    if len(atoms) == 0 or not all(atoms.pbc):
        raise ValueError("elastic constants need a non-empty cell periodic in all three directions")
    if atoms.cell.volume <= 1e-6:
        raise ValueError("the cell has zero volume")
    return standard_orientation(atoms, settings.symprec) if settings.use_symmetry else atoms


def deformations(atoms: Atoms, settings: ElasticSettings | None = None, *, oriented: bool = False) -> list[Deformation]:
    """Every cell to compute for the elastic tensor and the EOS of the (relaxed) reference cell ``atoms``.

    With ``use_symmetry`` the cell is first rotated rigidly into its standard orientation (unless
    ``oriented`` says it already is, as :func:`reference_cell` returns it), so the strains (and
    the fitted ``c_voigt``) refer to the crystal's standard axes.
    """
    settings = settings or ElasticSettings()
    atoms = atoms if oriented else reference_cell(atoms, settings)
    plan = _strain_plan(atoms, settings)
    out = [Deformation(label, "strain", strained(atoms, e), e, images) for label, e, images in plan]
    for s in settings.eos_strains:
        e = np.eye(3) * (0.5 * ((1 + s) ** 2 - 1))  # Green-Lagrange strain of an isotropic scaling by 1+s
        out.append(Deformation(f"eos:{s:+g}", "eos", strained(atoms, e), e, (np.eye(3),)))
    return out


# ---------- fit ----------
def _usable(result: StressEnergy | None, kind: str) -> bool:
    if result is None:
        return False
    stress, energy = result
    if kind == "strain":
        return stress is not None and np.asarray(stress, dtype=float).shape == (3, 3) and np.isfinite(stress).all()
    return energy is not None and math.isfinite(energy)


def fit_voigt(
    strains: Sequence[np.ndarray], stresses_gpa: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, float]:
    """Least-squares ``sigma = sigma_0 + C epsilon`` over 3x3 strains and stresses (GPa).

    Returns the symmetrized 6x6 C, the intercept sigma_0 (Voigt) and the RMS residual (GPa).
    Raises ValueError if the strains do not span all six Voigt components.
    """
    rows, cols = np.array(_VOIGT_INDEX).T
    eps = np.asarray(strains, dtype=float)[:, rows, cols] * _ENGINEERING_SHEAR  # Voigt, as Strain(e).voigt
    sig = np.asarray(stresses_gpa, dtype=float)[:, rows, cols]
    design = np.hstack([eps, np.ones((len(eps), 1))])
    if np.linalg.matrix_rank(eps) < 6:
        raise ValueError("the strain set does not span all six Voigt components")
    coef, *_ = np.linalg.lstsq(design, sig, rcond=None)
    c = coef[:6].T
    rmse = float(np.sqrt(np.mean((design @ coef - sig) ** 2)))
    return 0.5 * (c + c.T), coef[6], rmse


def fit_eos(volumes: Sequence[float], energies: Sequence[float]) -> tuple[float, float]:
    """Birch-Murnaghan fit: (bulk modulus in GPa, equilibrium volume in Å^3). Raises ValueError if it fails."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            v0, _, b = EquationOfState(list(volumes), list(energies), eos="birchmurnaghan").fit()
        except (RuntimeError, ValueError, np.linalg.LinAlgError) as exc:
            raise ValueError(f"Birch-Murnaghan fit failed: {exc}") from exc
    k = float(b) * EV_PER_A3_TO_GPA
    if not (math.isfinite(k) and k > 0 and min(volumes) * 0.8 < v0 < max(volumes) * 1.2):
        raise ValueError(f"Birch-Murnaghan fit is unphysical (K {k:.3g} GPa, V0 {float(v0):.3g} Å^3)")
    return k, float(v0)


def fit(
    atoms: Atoms,
    deformations: Sequence[Deformation],
    results: Mapping[str, StressEnergy | None],
    settings: ElasticSettings | None = None,
) -> ElasticResult:
    """Fit the elastic tensor and the EOS from per-deformation (stress, energy) results keyed by label.

    ``atoms`` is the reference cell. A missing or non-finite result is listed in ``missing`` and
    the quantity that needs it is not fitted (flag ``missing_strains`` / ``missing_eos``).
    """
    settings = settings or ElasticSettings()
    out = ElasticResult(n_calculations=sum(1 for d in deformations if _usable(results.get(d.label), d.kind)))
    strain_defs = [d for d in deformations if d.kind == "strain"]
    eos_defs = [d for d in deformations if d.kind == "eos"]
    out.missing = [d.label for d in deformations if not _usable(results.get(d.label), d.kind)]

    if strain_defs and not any(d.kind == "strain" and d.label in out.missing for d in deformations):
        strains, stresses = [], []
        for d in strain_defs:
            sigma = np.asarray(results[d.label][0], dtype=float) * EV_PER_A3_TO_GPA
            for r in d.images or (np.eye(3),):
                strains.append(r @ d.strain @ r.T)
                stresses.append(r @ sigma @ r.T)
        c, sigma0, rmse = fit_voigt(strains, stresses)
        m = moduli(c)
        out = out.model_copy(
            update={
                "c_voigt": c.tolist(),
                "residual_stress": sigma0.tolist(),
                "fit_rmse": rmse,
                **m.model_dump(),
            }
        )
    elif strain_defs:
        out.flags.append("missing_strains")

    if eos_defs:
        ok = [d for d in eos_defs if d.label not in out.missing]
        if len(ok) == len(eos_defs):
            try:
                out.eos_k, out.eos_v0 = fit_eos([d.atoms.get_volume() for d in ok], [results[d.label][1] for d in ok])
            except ValueError:
                out.flags.append("eos_fit_failed")
        else:
            out.flags.append("missing_eos")

    if out.eos_k is not None and out.k_voigt is not None:
        diff = abs(out.eos_k - out.k_voigt)
        if diff > settings.eos_rel_tol * abs(out.k_voigt) and diff > settings.eos_abs_tol:
            out.flags.append("eos_disagrees")
    if out.born_stable is False:
        out.flags.append("born_unstable")
    return out


# ---------- relaxed-ion constants by linear response ----------
@dataclass(frozen=True)
class DisplacementPlan:
    """Which atoms of a cell to displace, along which directions, and how the rest follow by symmetry.

    ``displaced`` holds (atom, unit direction) pairs: one representative atom per symmetry orbit,
    moved along as few of x, y, z as its site symmetry needs to span all three (one for a cubic
    site). ``site_ops[k]`` are the (R, perm) operations that leave representative k in place;
    ``images[j]`` is (k, R, perm): an operation with Cartesian rotation R that takes
    representative k to atom j and atom i to ``perm[i]``.
    """

    displaced: tuple[tuple[int, np.ndarray], ...]
    images: tuple[tuple[int, np.ndarray, np.ndarray], ...] = field(repr=False)
    site_ops: dict[int, tuple[tuple[np.ndarray, np.ndarray], ...]] = field(repr=False)


def _space_group_ops(reference: Atoms, symprec: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """(Cartesian rotation, atom permutation) of each space-group operation of the cell."""
    frac = reference.get_scaled_positions()
    numbers = reference.get_atomic_numbers()
    lattice = np.asarray(reference.cell[:])
    sym = spglib.get_symmetry((lattice, frac, numbers), symprec=symprec)
    raw = [(np.eye(3), np.zeros(3))] if sym is None else zip(sym["rotations"], sym["translations"], strict=True)
    tol = max(symprec / min(np.linalg.norm(lattice, axis=1)), 1e-5) * 10
    ops = []
    for w, t in raw:
        delta = (frac @ np.asarray(w, dtype=float).T + t)[:, None, :] - frac[None, :, :]
        delta -= np.round(delta)
        match = (np.abs(delta).max(axis=2) < tol) & (numbers[:, None] == numbers[None, :])
        if not match.any(axis=1).all():
            continue  # not a clean permutation at this tolerance: skip the operation
        u, _, vt = np.linalg.svd(lattice.T @ np.asarray(w, dtype=float) @ np.linalg.inv(lattice.T))
        ops.append((u @ vt, match.argmax(axis=1)))
    return ops


def displacement_plan(reference: Atoms, symprec: float) -> DisplacementPlan:
    """Representatives and directions to displace for ``reference``'s force constants (all of them without symmetry)."""
    ops = _space_group_ops(reference, symprec)
    images: list[tuple[int, np.ndarray, np.ndarray] | None] = [None] * len(reference)
    displaced: list[tuple[int, np.ndarray]] = []
    site_ops: dict[int, tuple[tuple[np.ndarray, np.ndarray], ...]] = {}
    for k in range(len(reference)):
        if images[k] is not None:
            continue
        for rot, perm in ops:
            if images[int(perm[k])] is None:
                images[int(perm[k])] = (k, rot, perm)
        site_ops[k] = tuple((rot, perm) for rot, perm in ops if perm[k] == k)
        spanned: list[np.ndarray] = []
        for direction in _CANDIDATE_DIRECTIONS:
            images_of_direction = [rot @ direction for rot, _ in site_ops[k]]
            if _rank(spanned + images_of_direction) > _rank(spanned):
                displaced.append((k, direction))
                spanned += images_of_direction
            if _rank(spanned) == 3:
                break
    return DisplacementPlan(tuple(displaced), tuple(images), site_ops)  # type: ignore[arg-type]


_CANDIDATE_DIRECTIONS = (np.array([1.0, 2.0, 3.0]) / np.sqrt(14.0), *np.eye(3))
"""Displacement directions tried in turn: a generic one first, whose images under a site's symmetry
already span all three directions on any site with an axis or two mirrors (one cell instead of three)."""


def _rank(vectors: list[np.ndarray]) -> int:
    return int(np.linalg.matrix_rank(np.array(vectors), tol=1e-6)) if vectors else 0


def displaced_cells(reference: Atoms, plan: DisplacementPlan, step: float) -> list[Atoms]:
    """The reference cell with one representative atom moved ``step`` Å along a planned direction, in plan order."""
    if step <= 0:
        raise ValueError("the displacement step must be positive")
    cells = []
    for k, direction in plan.displaced:
        cell = reference.copy()
        cell.calc = None
        cell.positions[k] += step * direction
        cells.append(cell)
    return cells


@dataclass(frozen=True)
class IonResponse:
    """How the ions of a cell respond at fixed cell, to first order: what replaces an ionic relaxation.

    From finite displacements of the reference cell: the force constants Phi (eV/Å^2) and the
    stress gradient dsigma/du (eV/Å^4). A strained cell whose ions feel the extra forces dF
    relaxes by u = Phi^+ dF, which changes its stress by (dsigma/du) u and its energy by
    -dF.u / 2: the relaxed-ion elastic constants C_relaxed = C_clamped - Lambda^T Phi^-1 Lambda
    / V of Wu, Vanderbilt & Hamann (PRB 72, 035105 (2005)), at the cost of three single points
    per symmetry-distinct atom instead of one relaxation per strained cell.
    """

    hessian_pinv: np.ndarray = field(repr=False)
    stress_gradient: np.ndarray = field(repr=False)
    reference_forces: np.ndarray = field(repr=False)
    min_eigenvalue: float
    """Smallest force-constant eigenvalue outside the three translations, eV/Å^2; negative: unstable ions."""

    @classmethod
    def from_displacements(
        cls,
        plan: DisplacementPlan,
        reference_forces: np.ndarray,
        reference_stress: np.ndarray,
        displaced: Sequence[tuple[np.ndarray, np.ndarray]],
        step: float,
    ) -> IonResponse:
        """Build from the reference's (forces, stress) and those of :func:`displaced_cells`, in plan order."""
        f0 = np.asarray(reference_forces, dtype=float)
        n = len(f0)
        if len(displaced) != len(plan.displaced):
            raise ValueError(f"the plan needs {len(plan.displaced)} displaced cells, got {len(displaced)}")
        measured: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        for (k, direction), (forces, stress) in zip(plan.displaced, displaced, strict=True):
            response = -(np.asarray(forces, dtype=float) - f0) / step  # Phi[i, :, k, :] @ direction, per atom i
            d_stress = (np.asarray(stress, dtype=float) - reference_stress) / step
            measured.setdefault(k, []).append((direction, response, d_stress))
        block = {k: _site_block(n, plan.site_ops[k], rows) for k, rows in measured.items()}
        phi = np.zeros((n, 3, n, 3))
        grad = np.zeros((n, 3, 3, 3))
        for j, (k, rot, perm) in enumerate(plan.images):
            phi_k, grad_k = block[k]
            phi[perm, :, j, :] = np.einsum("ab,ibc,dc->iad", rot, phi_k, rot)
            grad[j] = np.einsum("ca,aij,ki,lj->ckl", rot, grad_k, rot, rot)
        translations = np.kron(np.ones((n, 1)), np.eye(3)) / np.sqrt(n)  # orthonormal (3n, 3)
        project = np.eye(3 * n) - translations @ translations.T
        phi = phi.reshape(3 * n, 3 * n)
        phi = project @ (0.5 * (phi + phi.T)) @ project  # symmetric, translations exactly free
        values, vectors = np.linalg.eigh(phi)
        scale = max(float(np.abs(values).max()), 1e-12)
        free = values > 1e-4 * scale  # drops the translations (~0) and any unstable (negative) mode
        pinv = (vectors[:, free] / values[free]) @ vectors[:, free].T
        rest = np.sort(values)[3:]
        return cls(pinv, grad.reshape(3 * n, 3, 3), f0, float(rest.min()) if len(rest) else 0.0)

    def relax(self, forces: np.ndarray, stress: np.ndarray, energy: float) -> tuple[np.ndarray, float]:
        """(stress, energy) of a strained cell after its ions relax, from its clamped-ion values."""
        d_f = (np.asarray(forces, dtype=float) - self.reference_forces).ravel()
        u = self.hessian_pinv @ d_f
        return np.asarray(stress, dtype=float) + np.tensordot(u, self.stress_gradient, axes=1), energy - 0.5 * d_f @ u


def _site_block(
    n: int,
    site_ops: Sequence[tuple[np.ndarray, np.ndarray]],
    rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    """Phi[:, :, k, :] (n, 3, 3) and dsigma/du_k (3, 3, 3) of one representative atom k, by least squares.

    Each measured (direction d, force response r, stress response s) also stands, under every
    operation (R, perm) that keeps k in place, for the direction R d with response R r[i] on atom
    perm[i] and stress response R s R^T; together they span all three directions.
    """
    dirs, forces, stresses = [], [], []
    for direction, response, d_stress in rows:
        for rot, perm in site_ops:
            dirs.append(rot @ direction)
            image = np.empty_like(response)
            image[perm] = response @ rot.T
            forces.append(image)
            stresses.append(rot @ d_stress @ rot.T)
    v = np.array(dirs)  # (m, 3)
    pinv = np.linalg.pinv(v)  # (3, m)
    phi_k = np.einsum("bm,mia->iab", pinv, np.array(forces))  # Phi[i, a, k, b]
    grad_k = np.einsum("bm,mij->bij", pinv, np.array(stresses))
    return phi_k, grad_k


# ---------- in-process convenience ----------
def evaluate(atoms: Atoms, calculator: Calculator, settings: ElasticSettings) -> tuple[np.ndarray, float]:
    """(3x3 stress in eV/Å^3, energy in eV) of one deformed cell, ions relaxed at fixed cell if asked."""
    work = atoms.copy()
    if settings.relax_ions and len(work) > 1 and settings.ion_steps > 0:
        work = relax(work, calculator, fmax=settings.ion_fmax, steps=settings.ion_steps, cell=False).atoms
    work.calc = calculator
    stress = np.asarray(work.get_stress(voigt=False), dtype=float)
    energy = float(work.get_potential_energy())
    return stress, energy


def elastic_constants(
    atoms: Atoms,
    calculator: Calculator,
    settings: ElasticSettings | None = None,
    progress: Callable[[str], None] | None = None,
) -> ElasticResult:
    """Elastic tensor, moduli and EOS K of the reference cell ``atoms`` with an in-process calculator.

    A deformation whose calculation raises or returns non-finite numbers is recorded as missing
    (never fitted around). ``progress`` is called with each label as it finishes.
    """
    settings = settings or ElasticSettings()
    plan = deformations(atoms, settings)
    results: dict[str, StressEnergy | None] = {}
    for d in plan:
        try:
            results[d.label] = evaluate(d.atoms, calculator, settings)
        except (RuntimeError, ValueError, FloatingPointError, np.linalg.LinAlgError):
            results[d.label] = None
        if progress:
            progress(d.label)
    return fit(atoms, plan, results, settings)
