"""One shape per result row (storage/rows.py), and lakes written before it still read (tests/fixtures)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from core.elastic import ElasticResult
from core.failures import FailureClass
from core.structures import formula_of
from storage import Lake
from storage.queries import elastic_tensors, labeled_k_vrh
from storage.rows import MODULI, ElasticPayload, JobRow, Origin, elastic_rows, label_rows

LEGACY = Path(__file__).parent / "fixtures" / "lake-b4aec63"
CUBIC = [[250.0, 120, 120, 0, 0, 0], [120, 250, 120, 0, 0, 0], [120, 120, 250, 0, 0, 0]] + [
    [0.0] * (3 + i) + [80.0] + [0.0] * (2 - i) for i in range(3)
]


@pytest.fixture
def legacy_lake(tmp_path) -> Lake:
    """A copy of the lake written by b4aec63's code (never the committed fixture itself)."""
    shutil.copytree(LEGACY, tmp_path / "lake")
    return Lake(tmp_path / "lake")


def _result(**changes) -> ElasticResult:
    base = {"c_voigt": CUBIC, "k_voigt": 163.3, "k_reuss": 163.3, "k_vrh": 163.3, "g_voigt": 74.0}
    base |= {"g_reuss": 72.0, "g_vrh": 73.0, "born_stable": True, "min_eigenvalue": 80.0, "fit_rmse": 0.4}
    return ElasticResult(**(base | changes))


def test_every_old_tensor_shape_reads_as_one_payload(legacy_lake):
    tensors = elastic_tensors(legacy_lake)
    methods = {method.split(":")[0] for _, method, _ in tensors}
    assert methods == {"dataset", "fam", "dft"}  # bare lists (datasets, seed), the FAM dict, the DFT dict
    for _, _, payload in tensors:
        assert len(payload.c_voigt) == 6 and all(len(row) == 6 for row in payload.c_voigt)
        assert payload.min_eigenvalue is not None and payload.born_stable == (payload.min_eigenvalue > 0)
    dft = [p for _, m, p in tensors if m.startswith("dft:")]
    assert dft[0].eos_v0 == pytest.approx(33.1) and dft[0].settings["code"] == "gpaw"
    # a bare list gets its Born criterion computed: the cubic test matrix's lowest eigenvalue is C44
    assert ElasticPayload.from_json(json.dumps(CUBIC)).min_eigenvalue == pytest.approx(80.0)


def test_old_lake_keeps_working_for_the_loop_queries(legacy_lake):
    labels = labeled_k_vrh(legacy_lake).to_pylist()
    assert {r["method"].split(":")[0] for r in labels} == {"dataset", "dft", "fam"}
    assert len({r["structure_id"] for r in labels}) == len(labels) >= 5
    classes = legacy_lake.query("SELECT error_class FROM jobs WHERE error_class IS NOT NULL").column(0).to_pylist()
    assert classes and all(FailureClass(c) for c in classes)  # the FAM's classes are part of the taxonomy


def test_fam_and_dft_write_the_same_tensor_shape():
    fam = elastic_rows("s1", Origin(method="fam:sevennet-0"), _result())
    dft = elastic_rows("s1", Origin(method="dft:gpaw/abc"), _result(eos_v0=33.1), settings={"code": "gpaw"})
    for rows in (fam, dft):
        names = [r["name"] for r in rows]
        assert names == [*MODULI[:6], "born_stable", "elastic_tensor"]  # eos_k is None here: not written
        tensor = rows[-1]
        assert tensor["value"] == 80.0 and tensor["uncertainty"] == 0.4
        assert set(json.loads(tensor["value_json"])) == set(ElasticPayload.model_fields)
    assert ElasticPayload.from_json(dft[-1]["value_json"]).settings == {"code": "gpaw"}


def test_a_calculation_with_missing_points_records_them_and_no_moduli():
    rows = elastic_rows("s1", Origin(method="dft:x"), ElasticResult(missing=["strain:xx+0.01"]))
    assert [r["name"] for r in rows] == ["elastic_tensor"]
    payload = ElasticPayload.from_json(rows[0]["value_json"])
    assert payload.c_voigt is None and payload.missing == ["strain:xx+0.01"] and rows[0]["value"] is None


def test_label_rows_skip_missing_and_non_finite_values_and_carry_units():
    rows = label_rows("s1", Origin(method="dataset:x"), {"k_vrh": 200.0, "g_vrh": float("nan"), "eos_k": None})
    assert [(r["name"], r["unit"], r["method"]) for r in rows] == [("k_vrh", "GPa", "dataset:x")]


def test_job_rows_accept_only_declared_error_classes():
    common = {"job_id": "j", "structure_id": "s", "stage": "fam", "calculation": "relax+elastic"}
    common |= {"inputs_hash": "s", "settings_json": "{}", "settings_hash": "h", "state": "failed"}
    assert JobRow(**common, error_class="unphysical").row()["error_class"] == "unphysical"
    with pytest.raises(ValidationError):
        JobRow(**common, error_class="gremlins")


def test_one_formula_style_for_every_writer():
    assert formula_of(["Ti", "Al", "Al", "Al"]) == "Al3Ti1"
    assert formula_of(["Nb", "Cu"]) == "Cu1Nb1"
