"""`matloop elastic FILE` as a user runs it: with the FAM and with a DFT preset, text and JSON."""

from __future__ import annotations

import json

import pytest
from ase.build import bulk
from ase.io import write
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()
pytestmark = pytest.mark.slow


@pytest.fixture
def tungsten(tmp_path):
    path = tmp_path / "W.cif"
    write(path, bulk("W", "bcc", a=3.18))
    return path


def test_elastic_with_the_fam(tungsten):
    text = runner.invoke(app, ["elastic", str(tungsten), "--fam", "sevennet-0"])
    assert text.exit_code == 0, text.output
    assert "fam:sevennet-0" in text.output and "EOS K" in text.output and "Born" in text.output
    result = json.loads(runner.invoke(app, ["elastic", str(tungsten), "--fam", "sevennet-0", "--json"]).output)
    assert result["method"] == "fam:sevennet-0" and result["relaxed"]
    assert 250 < result["k_vrh"] < 350  # SevenNet-0 W: about 300 GPa (PBE 305.6)
    assert abs(result["eos_k"] - result["k_vrh"]) < 15
    assert result["born_stable"] is True


@pytest.mark.dft
def test_elastic_with_a_dft_preset(tungsten):
    out = runner.invoke(app, ["elastic", str(tungsten), "--dft", "test", "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.output)
    assert result["method"].startswith("dft:gpaw/")
    assert 270 < result["k_vrh"] < 350  # GPAW `test` preset: 314.6 GPa measured; PBE 305.6
    assert result["born_stable"] is True


def test_unreadable_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.cif"
    bad.write_text("not a structure")
    out = runner.invoke(app, ["elastic", str(bad)])
    assert out.exit_code != 0 and "cannot read" in out.output
