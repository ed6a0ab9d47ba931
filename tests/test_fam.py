"""FAM calculators: the real mace-torch path with a tiny ScaleShiftMACE, the download code on local files, verdicts."""

from __future__ import annotations

from pathlib import Path

import mace  # noqa: F401  (before e3nn)
import numpy as np
import pytest
import torch
from ase.build import bulk
from e3nn import o3
from mace import modules

from core import fam
from core.batched import relax_cells
from core.elastic import ElasticResult, ElasticSettings
from core.fam import FamOutcome, FamSettings, FamUnavailableError, fam_calculator, fam_outcome, verdict

TINY_ELEMENTS = (13, 29)  # Al, Cu


def build_tiny_mace(path: Path) -> Path:
    """A real (untrained) ScaleShiftMACE on Al and Cu with ZBL pair repulsion, saved like a MACE model file."""
    torch.manual_seed(0)
    model = modules.ScaleShiftMACE(
        r_max=4.0,
        num_bessel=4,
        num_polynomial_cutoff=5,
        max_ell=1,
        interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        interaction_cls_first=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        num_interactions=1,
        num_elements=len(TINY_ELEMENTS),
        hidden_irreps=o3.Irreps("8x0e"),
        MLP_irreps=o3.Irreps("8x0e"),
        gate=torch.nn.functional.silu,
        atomic_energies=np.array([-3.0, -4.0]),
        avg_num_neighbors=12.0,
        atomic_numbers=list(TINY_ELEMENTS),
        correlation=2,
        pair_repulsion=True,
        atomic_inter_scale=1.0,
        atomic_inter_shift=0.0,
    )
    torch.save(model.double(), path)
    return path


@pytest.fixture(scope="session")
def tiny_mace(tmp_path_factory) -> Path:
    return build_tiny_mace(tmp_path_factory.mktemp("fam") / "tiny.model")


@pytest.fixture
def quick() -> FamSettings:
    """Loose settings so the tiny model's tests stay fast."""
    return FamSettings(fmax=0.05, steps=60)


def test_mace_file_path_loads_and_labels(tiny_mace: Path, quick: FamSettings) -> None:
    calc, name = fam_calculator(str(tiny_mace))
    assert name.startswith("mace:tiny.model@") and len(name.split("@")[1]) == 8
    assert fam.supported_numbers(calc) == set(TINY_ELEMENTS)
    outcome = fam_outcome(bulk("Cu", "fcc", a=3.6), calc, name, quick)
    assert outcome.error is None, outcome.error
    assert outcome.relax_converged and outcome.matches_input
    el = outcome.elastic
    assert el is not None and el.c_voigt is not None and not el.missing
    assert np.isfinite(el.k_vrh) and el.eos_k is None  # stage II skips the EOS cross-check by default
    assert outcome.relaxed["species"] == ["Cu"] and outcome.model_name == name


def test_unknown_element_is_a_recorded_failure(tiny_mace: Path, quick: FamSettings) -> None:
    calc, name = fam_calculator(str(tiny_mace))
    outcome = fam_outcome(bulk("W", "bcc", a=3.17), calc, name, quick)
    assert outcome.error_class == "unknown_element" and "W" in outcome.error
    decision, reason = verdict(outcome, 300.0, 0.2)
    assert decision == "error" and "unknown_element" in reason


def test_overlapping_atoms_are_bad_input(tiny_mace: Path, quick: FamSettings) -> None:
    calc, name = fam_calculator(str(tiny_mace))
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.positions[1] = atoms.positions[0] + 0.1
    assert fam_outcome(atoms, calc, name, quick).error_class == "bad_input"


def test_batched_relaxation_agrees_with_ase(tiny_mace: Path, quick: FamSettings) -> None:
    """torch-sim's batched Frechet-cell FIRE and ASE's reach the same minimum (the tiny model's is shallow:
    compare energies, which are flat there, not volumes)."""
    calc, _ = fam_calculator(str(tiny_mace))
    cells = [bulk("Cu", "fcc", a=3.5), bulk("Al", "fcc", a=4.0), bulk("CuAl", "cesiumchloride", a=3.0)]
    batched = relax_cells(fam.torchsim_model(calc), cells, quick.fmax, quick.steps)
    for atoms, b in zip(cells, batched, strict=True):
        one = fam.relax(atoms, calc, fmax=quick.fmax, steps=quick.steps)
        assert b.converged and b.max_force < quick.fmax and (b.n_steps > 0) == (one.n_steps > 0)
        assert b.energy / len(atoms) == pytest.approx(one.energy / len(atoms), abs=5e-3)
        start = atoms.copy()
        start.calc = calc
        assert b.energy <= start.get_potential_energy() + 1e-9


def test_mace_mp_download_code_on_a_local_file(tiny_mace: Path, tmp_path: Path, monkeypatch) -> None:
    """The download path (urllib to a .part file, then rename) on a file:// URL; then the cache serves it."""
    source = tmp_path / "remote" / "mace-mp-0-medium.model"
    source.parent.mkdir()
    source.write_bytes(tiny_mace.read_bytes())
    cache = tmp_path / "cache"
    monkeypatch.setenv("MATLOOP_CACHE_DIR", str(cache))
    monkeypatch.setattr(fam, "MACE_MP_0_URL", source.as_uri())
    path = fam.mace_mp_checkpoint()
    assert path == cache / "fam" / source.name and path.read_bytes() == source.read_bytes()
    assert not list(path.parent.glob("*.part"))
    source.unlink()  # now only the cache has it
    calc, name = fam_calculator("mace-mp-0")
    assert name == "mace-mp-0" and fam.supported_numbers(calc) == set(TINY_ELEMENTS)


def test_unreachable_weights_raise_clearly(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MATLOOP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(fam, "MACE_MP_0_URL", (tmp_path / "nowhere.model").as_uri())
    with pytest.raises(FamUnavailableError, match="could not be downloaded"):
        fam.mace_mp_checkpoint()
    assert not list((tmp_path / "fam").glob("*"))  # no truncated file left behind
    with pytest.raises(ValueError, match="unknown FAM"):
        fam_calculator("chgnet")


@pytest.mark.slow
def test_auto_falls_back_to_sevennet0(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MATLOOP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(fam, "MACE_MP_0_URL", (tmp_path / "nowhere.model").as_uri())
    calc, name = fam_calculator("auto")
    assert name == "sevennet-0" and 74 in fam.supported_numbers(calc)


def _outcome(**kw) -> FamOutcome:
    base = {
        "model_name": "m",
        "relax_converged": True,
        "relax_steps": 5,
        "matches_input": True,
        "elastic": ElasticResult(k_vrh=300.0, born_stable=True, min_eigenvalue=50.0, c_voigt=[[0.0] * 6] * 6),
    }
    return FamOutcome(**{**base, **kw})


@pytest.mark.parametrize(
    ("outcome", "expected", "words"),
    [
        (_outcome(), "pass", "within"),
        (_outcome(elastic=ElasticResult(k_vrh=200.0, born_stable=True, min_eigenvalue=5.0)), "reject", "-33%"),
        (_outcome(elastic=ElasticResult(k_vrh=300.0, born_stable=False, min_eigenvalue=-4.0)), "reject", "Born"),
        (_outcome(matches_input=False), "reject", "no longer matches"),
        (_outcome(relax_converged=False), "reject", "did not converge"),
        (_outcome(elastic=ElasticResult(missing=["strain:xx:+0.01"])), "error", "strain:xx:+0.01"),
        (_outcome(error="boom", error_class="unphysical"), "error", "unphysical"),
    ],
)
def test_verdict_order_and_reasons(outcome: FamOutcome, expected: str, words: str) -> None:
    decision, reason = verdict(outcome, 300.0, 0.2)
    assert decision == expected and words in reason


@pytest.mark.slow
def test_sevennet0_tungsten_bulk_modulus() -> None:
    """SevenNet-0 (shipped in the wheel): W K_vrh ~ 300 GPa from the tensor and the EOS (DFT 304 GPa)."""
    calc, name = fam_calculator("sevennet-0")
    with_eos = FamSettings().elastic.model_copy(update={"eos_strains": ElasticSettings().eos_strains})
    outcome = fam_outcome(bulk("W", "bcc", a=3.2), calc, name, FamSettings(elastic=with_eos))
    assert outcome.elastic.k_vrh == pytest.approx(303, abs=15)
    assert outcome.elastic.eos_k == pytest.approx(outcome.elastic.k_vrh, abs=5)
    assert verdict(outcome, 300.0, 0.2)[0] == "pass"


@pytest.mark.slow
def test_sevennet_l3i5_loads_offline_and_gives_tungsten_a_bulk_modulus() -> None:
    """SevenNet-l3i5 (also in the wheel, no download): a second offline FAM, named as such on its rows."""
    calc, name = fam_calculator("sevennet-l3i5", device="cpu")
    assert name == "sevennet-l3i5"
    outcome = fam_outcome(bulk("W", "bcc", a=3.2), calc, name, FamSettings())
    assert outcome.model_name == "sevennet-l3i5" and outcome.elastic.k_vrh == pytest.approx(304, rel=0.15)
