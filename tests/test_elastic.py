"""Elastic maths: moduli against the 2015 Materials Project data set, the fit against pymatgen, symmetry, EOS, relax."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT
from pymatgen.core.elasticity.elastic import ElasticTensor
from pymatgen.core.elasticity.strain import Strain
from pymatgen.core.elasticity.stress import Stress

from core.elastic import (
    EV_PER_A3_TO_GPA,
    ElasticSettings,
    deformations,
    elastic_constants,
    fit,
    fit_voigt,
    moduli,
    voigt_strain,
)
from core.relax import UnphysicalResultError, relax

MODULI_TOL_GPA = 0.02
"""The file stores moduli computed by pymatgen from the same tensor, rounded: we must agree to 0.02 GPa."""


def _records(path: Path) -> list[dict]:
    with gzip.open(path) as fh:
        data = json.load(fh)
    return [dict(zip(data["columns"], row, strict=True)) for row in data["data"]]


def test_moduli_match_every_entry_of_elastic_tensor_2015(shared_data: Path) -> None:
    records = _records(shared_data / "elastic_tensor_2015.json.gz")
    assert len(records) == 1181
    worst = dict.fromkeys(("k_vrh", "g_vrh", "k_voigt", "k_reuss", "g_voigt", "g_reuss"), 0.0)
    born = 0
    for rec in records:
        m = moduli(rec["elastic_tensor"]["data"])
        born += m.born_stable
        for ours, theirs in (
            ("k_vrh", "K_VRH"),
            ("g_vrh", "G_VRH"),
            ("k_voigt", "K_Voigt"),
            ("k_reuss", "K_Reuss"),
            ("g_voigt", "G_Voigt"),
            ("g_reuss", "G_Reuss"),
        ):
            err = abs(getattr(m, ours) - rec[theirs])
            assert err < MODULI_TOL_GPA, f"{rec['material_id']} {ours}: {getattr(m, ours)} vs {rec[theirs]}"
            worst[ours] = max(worst[ours], err)
    print(
        f"\nelastic_tensor_2015: {len(records)} entries, K/G V/R/H within {MODULI_TOL_GPA} GPa "
        f"(worst {max(worst.values()):.4f} GPa); Born-stable {born}/{len(records)}"
    )
    assert born == len(records)  # the published set holds mechanically stable materials only


def test_moduli_guards() -> None:
    with pytest.raises(ValueError, match="6x6"):
        moduli(np.eye(3))
    with pytest.raises(ValueError, match="non-finite"):
        moduli(np.full((6, 6), np.nan))
    singular = np.zeros((6, 6))
    singular[:3, :3] = 100.0  # a liquid-like matrix: no shear stiffness, compliance undefined
    m = moduli(singular)
    assert m.k_voigt == pytest.approx(100.0) and m.k_reuss is None and m.k_vrh is None
    assert not m.born_stable


def test_fit_recovers_tensor_and_agrees_with_pymatgen(shared_data: Path) -> None:
    """Synthetic stresses from a real tensor plus a residual stress: our fit and pymatgen's give the tensor back."""
    c = np.asarray(_records(shared_data / "elastic_tensor_2015.json.gz")[0]["elastic_tensor"]["data"])
    sigma0 = np.array([[0.3, 0.1, 0.0], [0.1, -0.2, 0.0], [0.0, 0.0, 0.5]])  # GPa
    strains, stresses = [], []
    for i in range(6):
        for s in (-0.01, -0.005, 0.005, 0.01):
            e = voigt_strain(i, s)
            strains.append(e)
            stresses.append(sigma0 + np.asarray(Stress.from_voigt(c @ Strain(e).voigt)))
    ours, intercept, rmse = fit_voigt(strains, stresses)
    theirs = ElasticTensor.from_independent_strains(
        [Strain(e) for e in strains], [Stress(s) for s in stresses], eq_stress=Stress(sigma0)
    ).voigt
    np.testing.assert_allclose(ours, c, atol=1e-8)
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    np.testing.assert_allclose(intercept, Stress(sigma0).voigt, atol=1e-10)
    assert rmse < 1e-8
    with pytest.raises(ValueError, match="span"):
        fit_voigt(strains[:4], stresses[:4])


@pytest.mark.parametrize(
    ("atoms", "n_strain_full", "n_strain_reduced"),
    [
        (bulk("Cu", "fcc", a=3.6), 24, 6),
        (bulk("Cu", "fcc", a=3.6, orthorhombic=True), 24, 12),
        (bulk("Cu", "hcp", a=2.55, c=4.16), 24, 18),
    ],
)
def test_symmetry_reduced_strain_set_gives_the_full_tensor(atoms, n_strain_full, n_strain_reduced) -> None:
    ref = relax(atoms, EMT(), fmax=1e-4, steps=500).atoms
    full = elastic_constants(ref, EMT(), ElasticSettings(use_symmetry=False))
    reduced = elastic_constants(ref, EMT(), ElasticSettings())
    assert sum(d.kind == "strain" for d in deformations(ref, ElasticSettings(use_symmetry=False))) == n_strain_full
    assert sum(d.kind == "strain" for d in deformations(ref, ElasticSettings())) == n_strain_reduced
    for name in ("k_voigt", "k_reuss", "k_vrh", "g_voigt", "g_reuss", "g_vrh"):
        assert getattr(reduced, name) == pytest.approx(getattr(full, name), rel=2e-3), name
    assert reduced.born_stable and full.born_stable
    assert not reduced.flags and not reduced.missing
    assert reduced.eos_k == pytest.approx(reduced.k_voigt, rel=0.05)  # isotropic scaling probes K_voigt


def test_emt_copper_matches_known_constants() -> None:
    """EMT copper: C11 ~ 172, C12 ~ 115, C44 ~ 89 GPa (EMT's published fit); K = (C11 + 2 C12) / 3."""
    result = elastic_constants(relax(bulk("Cu", "fcc", a=3.6), EMT(), fmax=1e-4).atoms, EMT())
    c = np.asarray(result.c_voigt)
    assert c[0, 0] == pytest.approx(171, abs=5) and c[0, 1] == pytest.approx(115, abs=5)
    assert c[3, 3] == pytest.approx(89, abs=5)
    assert result.k_vrh == pytest.approx((c[0, 0] + 2 * c[0, 1]) / 3, rel=1e-6)
    assert result.fit_rmse < 0.5 and max(map(abs, result.residual_stress)) < 0.5


def _emt_points(ref, plan, extra_energy=lambda d, atoms: 0.0) -> dict:
    """(stress, energy) of every deformation with EMT; ``extra_energy`` distorts chosen points."""
    results = {}
    for d in plan:
        a = d.atoms.copy()
        a.calc = EMT()
        results[d.label] = (a.get_stress(voigt=False), a.get_potential_energy() + extra_energy(d, a))
    return results


def test_missing_points_are_listed_and_never_fitted_around() -> None:
    ref = bulk("Cu", "fcc", a=3.61)
    plan = deformations(ref)
    results = _emt_points(ref, plan)
    complete = fit(ref, plan, results)
    assert complete.c_voigt is not None and complete.missing == []
    dropped = plan[0].label
    eos_label = next(d.label for d in plan if d.kind == "eos")
    partial = fit(ref, plan, {**results, dropped: None, eos_label: (None, float("nan"))})
    assert partial.c_voigt is None and partial.k_vrh is None and partial.eos_k is None
    assert set(partial.missing) == {dropped, eos_label}
    assert {"missing_strains", "missing_eos"} <= set(partial.flags)


def test_eos_disagreement_is_flagged() -> None:
    ref = bulk("Cu", "fcc", a=3.61)
    plan = deformations(ref)

    def stiffer_eos(d, atoms):  # a stiffer E(V) than the stresses say: K_eos far above K_voigt
        return 3.0 * (atoms.get_volume() / ref.get_volume() - 1) ** 2 * ref.get_volume() if d.kind == "eos" else 0.0

    result = fit(ref, plan, _emt_points(ref, plan, stiffer_eos))
    assert "eos_disagrees" in result.flags
    assert result.eos_k > result.k_voigt + 100


class _NaNCalculator(Calculator):
    implemented_properties = ("energy", "forces", "stress")

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        n = len(self.atoms)
        self.results = {"energy": float("nan"), "forces": np.zeros((n, 3)), "stress": np.zeros(6)}


def test_relax_converges_and_rejects_unphysical_calculators() -> None:
    squeezed = bulk("Cu", "fcc", a=3.45)
    result = relax(squeezed, EMT(), fmax=0.01)
    assert result.converged and result.n_steps > 0 and result.max_force < 0.01
    assert result.atoms.calc is None and squeezed.cell.volume < result.atoms.cell.volume
    a = result.atoms.cell.lengths()[0] * np.sqrt(2)
    assert a == pytest.approx(3.59, abs=0.02)  # EMT copper's lattice constant
    assert pytest.approx(160.2, abs=0.1) == EV_PER_A3_TO_GPA
    with pytest.raises(UnphysicalResultError, match="non-finite"):
        relax(bulk("Cu"), _NaNCalculator())
    with pytest.raises(ValueError, match="optimizer"):
        relax(bulk("Cu"), EMT(), optimizer="LBFGS")  # type: ignore[arg-type]


def test_settings_validation() -> None:
    with pytest.raises(ValueError):
        ElasticSettings(strains=(0.0, 0.01))
    with pytest.raises(ValueError):
        ElasticSettings(eos_strains=(-0.01, 0.0, 0.01))
    assert ElasticSettings(eos_strains=()).eos_strains == ()
