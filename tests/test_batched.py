"""Batched stage II: the same answers as one at a time, one bad structure failing alone, the device setting honoured."""

from __future__ import annotations

import logging
from pathlib import Path

import mace  # noqa: F401  (before e3nn)
import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.emt import EMT
from test_fam import build_tiny_mace

from core import fam
from core.batched import Failure, chunks, relax_cells, single_points
from core.device import device_label, resolve_device
from core.elastic import (
    DisplacementPlan,
    ElasticSettings,
    IonResponse,
    displaced_cells,
    displacement_plan,
    elastic_constants,
    reference_cell,
    strained,
    voigt_strain,
)
from core.fam import FamSettings, fam_calculator, fam_outcome, fam_outcomes, torchsim_model
from core.relax import relax


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[object, str]:
    return fam_calculator(str(build_tiny_mace(tmp_path_factory.mktemp("batched") / "tiny.model")), device="cpu")


def _hcp_ni() -> object:
    """Relaxed hcp Ni (EMT): its atoms sit where symmetry holds them, but shear moves them."""
    return relax(bulk("Ni", "hcp", a=2.5, c=4.1), EMT(), fmax=1e-4, steps=500).atoms


def _response(cell: object, plan: DisplacementPlan, step: float = 0.005) -> IonResponse:
    calc = EMT()
    ref = cell.copy()
    ref.calc = calc
    displaced = []
    for c in displaced_cells(cell, plan, step):
        c.calc = calc
        displaced.append((c.get_forces(), c.get_stress(voigt=False)))
    return IonResponse.from_displacements(plan, ref.get_forces(), ref.get_stress(voigt=False), displaced, step)


def test_ion_response_matches_an_explicit_relaxation() -> None:
    """Linear response (symmetry-reduced or not) gives the stress-strain slope of cells whose ions relax.

    Compared as central differences over +-1 % shear, which is what the elastic fit uses (the
    second-order part of a relaxation cancels there).
    """
    ref = reference_cell(_hcp_ni(), ElasticSettings())
    n = len(ref)
    identity = (np.eye(3), np.arange(n))
    full = DisplacementPlan(
        tuple((k, axis) for k in range(n) for axis in np.eye(3)),
        tuple((j, *identity) for j in range(n)),
        {k: (identity,) for k in range(n)},
    )
    reduced = displacement_plan(ref, 1e-3)
    assert len(reduced.displaced) == 1  # one orbit of two atoms; one generic direction spans its -6m2 site
    slopes: dict[str, np.ndarray] = {}
    responses = {"full": _response(ref, full), "reduced": _response(ref, reduced)}
    for sign in (1, -1):
        cell = strained(ref, voigt_strain(5, 0.01 * sign))  # xy shear
        cell.calc = EMT()
        clamped = cell.get_stress(voigt=False)
        if sign == 1:
            assert np.abs(cell.get_forces()).max() > 0.01  # the shear does push the atoms
        relaxed = relax(cell, EMT(), fmax=1e-5, steps=2000, cell=False).atoms
        relaxed.calc = EMT()
        results = {"clamped": clamped, "exact": relaxed.get_stress(voigt=False)}
        for label, response in responses.items():
            results[label] = response.relax(cell.get_forces(), clamped, cell.get_potential_energy())[0]
        for label, stress in results.items():
            slopes[label] = slopes.get(label, 0) + sign * stress / 0.02
    change = np.abs(slopes["exact"] - slopes["clamped"]).max()
    assert change > 0.05  # relaxing the ions matters here (eV/Å^3 per unit strain)
    for label in responses:
        assert np.abs(slopes[label] - slopes["exact"]).max() < 0.02 * change, label


def test_batched_stage_two_agrees_with_one_at_a_time(tiny) -> None:
    """Same K (within 1 GPa) batched as one at a time with tightly relaxed ions, on cells that need ion relaxation."""
    calc, name = tiny
    settings = FamSettings(fmax=1e-3, steps=500, elastic=ElasticSettings(strains=(-0.01, 0.01), eos_strains=()))
    tight = settings.model_copy(
        update={"elastic": settings.elastic.model_copy(update={"ion_fmax": 1e-4, "ion_steps": 2000})}
    )
    cells = [bulk("Cu", "fcc", a=3.6), bulk("CuAl", "cesiumchloride", a=3.0), bulk("Cu", "hcp", a=2.6, c=4.2)]
    batched = fam_outcomes(cells, calc, name, settings)
    for atoms, b in zip(cells, batched, strict=True):
        one = fam_outcome(atoms, calc, name, tight.model_copy(update={"batched": False}))
        assert b.error is None and one.error is None, (b.error, one.error)
        assert b.elastic.k_vrh == pytest.approx(one.elastic.k_vrh, abs=1.0)
        assert b.elastic.g_vrh == pytest.approx(one.elastic.g_vrh, abs=1.0)


class _Poisoned(torch.nn.Module):
    """A torch-sim model that raises (like a TorchScript error) for any batch holding a cell with a short a axis."""

    def __init__(self, inner: object) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def __getattr__(self, name: str) -> object:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, state: object) -> dict:
        self.calls += 1
        if (torch.linalg.norm(state.row_vector_cell[:, 0], dim=1) < 2.2).any():
            raise RuntimeError(
                "The following operation failed in the TorchScript interpreter.\nTraceback ...\nRuntimeError: nan"
            )
        return self.inner(state)


def test_a_bad_structure_fails_alone_and_the_rest_finish_batched(tiny, monkeypatch, caplog) -> None:
    calc, name = tiny
    poisoned = _Poisoned(torchsim_model(calc))
    monkeypatch.setattr(fam, "_batch_model", lambda _calc: poisoned)
    one_at_a_time: list[int] = []
    real = fam.fam_outcome

    def spy(atoms, *args, **kwargs):
        one_at_a_time.append(len(atoms))
        return real(atoms, *args, **kwargs)

    monkeypatch.setattr(fam, "fam_outcome", spy)
    bad = bulk("Cu", "sc", a=2.1)  # a valid cell, which only the poisoned model refuses
    cells = [bulk("Cu", "fcc", a=3.6), bad, bulk("Al", "fcc", a=4.0), bulk("CuAl", "cesiumchloride", a=3.0)]
    with caplog.at_level(logging.INFO):
        outcomes = fam_outcomes(cells, calc, name, FamSettings(fmax=0.05, steps=100))
    assert one_at_a_time == [1]  # only the bad cell left the batch (and got its own, one-at-a-time outcome)
    for i in (0, 2, 3):
        assert outcomes[i].error is None and outcomes[i].elastic is not None and outcomes[i].elastic.k_vrh is not None
    assert "left the batch" in caplog.text and "TorchScript interpreter" not in caplog.text.split("Traceback")[0][-200:]
    assert "Traceback" not in caplog.text


def test_non_finite_and_raising_cells_are_failures_with_reasons(tiny) -> None:
    model = torchsim_model(tiny[0])
    good = [bulk("Cu", "fcc", a=3.6), bulk("Al", "fcc", a=4.0)]
    nan = bulk("Cu", "fcc", a=3.6, cubic=True)
    nan.positions[1] = np.nan
    points = single_points(model, [good[0], nan, good[1]])
    assert isinstance(points[1], Failure) and "non-finite" in points[1].reason
    assert all(not isinstance(p, Failure) for p in (points[0], points[2]))
    relaxed = relax_cells(model, [good[0], nan, good[1]], fmax=0.05, steps=50)
    assert isinstance(relaxed[1], Failure) and relaxed[0].n_steps is not None and relaxed[2].energy < 0


def test_site_symmetry_cuts_the_displacements() -> None:
    """A site with symmetry needs one displacement, a general one three; and the plan covers every atom."""
    b2 = bulk("CuAl", "cesiumchloride", a=3.0)
    plan = displacement_plan(b2, 1e-3)
    assert [k for k, _ in plan.displaced] == [0, 1] and all(img is not None for img in plan.images)
    rattled = bulk("Cu", "fcc", a=3.6, cubic=True)
    rattled.rattle(0.05, seed=1)
    assert len(displacement_plan(rattled, 1e-3).displaced) == 3 * len(rattled)


def test_chunks_keep_calls_small() -> None:
    cells = [bulk("Cu", "fcc", a=3.6, cubic=True)] * 10  # 4 atoms each
    groups = chunks(cells, 10)
    assert [len(g) for g in groups] == [2, 2, 2, 2, 2] and [i for g in groups for i in g] == list(range(10))
    assert chunks([bulk("Cu", "fcc", a=3.6, cubic=True).repeat(3)], 10) == [[0]]


def test_device_setting_reaches_every_model(tiny, monkeypatch, tmp_path: Path) -> None:
    from core.cgcnn import CGCNN, CGCNNConfig, Ensemble
    from core.generator import CDVAEGenerator
    from core.generator.configs import PRESETS

    monkeypatch.setenv("MATLOOP_DEVICE", "cpu")
    assert resolve_device() == torch.device("cpu") and resolve_device("auto") == torch.device("cpu")
    calc, _ = fam_calculator(str(build_tiny_mace(tmp_path / "t.model")))
    assert fam.calculator_device(calc).type == "cpu"
    assert torch.device(torchsim_model(calc).device).type == "cpu"
    config = CGCNNConfig(n_models=1)
    ensemble = Ensemble(config, [CGCNN(config)])
    assert ensemble.device.type == "cpu" and next(ensemble.members[0].parameters()).device.type == "cpu"
    assert CDVAEGenerator(PRESETS["small"]).device.type == "cpu"
    assert device_label("cpu") == "cpu"
    monkeypatch.setenv("MATLOOP_DEVICE", "cuda:3")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            fam_calculator(str(tmp_path / "t.model"))
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu please")


@pytest.mark.slow
def test_stage_two_elastic_by_sevennet_needs_no_relaxation_per_strain() -> None:
    """SevenNet-0 (in the wheel) on hcp Ti, whose atoms move under strain: batched equals a tight one-at-a-time run.

    The forces a 1 % strain puts on its atoms are a few meV/Å, yet relaxing them lowers C11 by ~10 GPa.
    """
    calc, _ = fam_calculator("sevennet-0", device="cpu")
    cell = relax(bulk("Ti", "hcp", a=2.95, c=4.68), calc, fmax=1e-3, steps=300).atoms
    settings = FamSettings().elastic
    batched = fam.elastic_batch(torchsim_model(calc), [cell], settings)[0]
    one = elastic_constants(cell, calc, settings.model_copy(update={"ion_fmax": 5e-4, "ion_steps": 500}))
    assert batched.k_vrh == pytest.approx(one.k_vrh, abs=1.0) and batched.g_vrh == pytest.approx(one.g_vrh, abs=1.0)


def test_a_known_reference_point_in_another_frame_gives_the_same_tensor(tiny) -> None:
    """elastic_batch reuses a relaxation's last single point, rotated into the crystal's standard frame."""
    model = torchsim_model(tiny[0])
    cell = bulk("Cu", "hcp", a=2.6, c=4.2)
    cell.rotate(23, "z", rotate_cell=True)  # not in standard orientation
    cell.rotate(11, "x", rotate_cell=True)
    point = single_points(model, [cell])[0]
    settings = FamSettings().elastic
    fresh = fam.elastic_batch(model, [cell], settings)[0]
    reused = fam.elastic_batch(model, [cell], settings, known=[point])[0]
    assert np.allclose(fresh.c_voigt, reused.c_voigt, atol=1e-6) and fresh.k_vrh == pytest.approx(reused.k_vrh)
