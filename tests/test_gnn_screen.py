"""Stage I of the screen and the model registry it reads."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from core.cgcnn import PRESETS, Ensemble
from core.screening import gnn_verdicts
from core.structures import split_of, to_row
from storage.registry import (
    ModelNotFoundError,
    checkpoint_path,
    get_model,
    latest_model,
    register_model,
    resolve_model,
)

torch.set_num_threads(1)


def _constant_model(tmp_path: Path, k_gpa: float, target: str = "k_vrh") -> Path:
    """A small ensemble whose every prediction is k_gpa (to within 0.1 %): a fixed point for verdict tests."""
    ensemble = Ensemble.untrained(PRESETS.resolve("small", {"device": "cpu", "target": target}))
    for member in ensemble.members:
        member.target_mean.fill_(float(np.log10(k_gpa)))
        member.target_std.fill_(1e-4)
    return ensemble.save(tmp_path / f"constant-{target}.pt")


def _register(lake, tmp_path: Path, k_gpa: float = 100.0, data: tuple[str, ...] = ("ml-a", "ml-b")) -> str:
    return register_model(
        lake,
        kind="cgcnn",
        checkpoint=_constant_model(tmp_path, k_gpa),
        data_snapshot=list(data),
        data_hash="h" + "".join(data),
        config=PRESETS.resolve("small"),
        metrics={"test": 0.1},
    ).model_id


def test_registry_register_latest_resolve(lake, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no cgcnn model"):
        latest_model(lake, "cgcnn")
    first = _register(lake, tmp_path)
    second = _register(lake, tmp_path, data=("ml-a", "ml-b", "ml-c"))
    assert first != second and first.startswith("cgcnn-")
    assert latest_model(lake, "cgcnn").model_id == second
    record = get_model(lake, first)
    assert record.data_snapshot == ["ml-a", "ml-b"] and record.metrics == {"test": 0.1}
    assert record.config["n_models"] == 2 and record.settings_hash
    path = checkpoint_path(lake, record)
    assert path.is_file() and path.is_relative_to(Path(lake.root))
    assert Ensemble.load(path, expected=PRESETS.resolve("small")).config.n_models == 2
    assert _register(lake, tmp_path) == first  # same data and config: the same id, superseding its row
    with pytest.raises(ValueError, match="not generator"):
        resolve_model(lake, "generator", first)
    with pytest.raises(ModelNotFoundError):
        get_model(lake, "cgcnn-nope")


def _structure(lattice: Lattice, species: list[str], coords: list[list[float]]) -> Structure:
    return Structure(lattice, species, coords)


NOVEL = _structure(Lattice.tetragonal(3.0, 6.2), ["Ni", "Ti", "Al"], [[0, 0, 0], [0.5, 0.5, 0.27], [0, 0, 0.52]])
NOVEL_COPY = _structure(Lattice.tetragonal(3.02, 6.2), ["Ni", "Ti", "Al"], [[0, 0, 0], [0.5, 0.5, 0.28], [0, 0, 0.52]])
W = _structure(Lattice.cubic(3.16), ["W", "W"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def _candidates(known_copy: Structure) -> list[tuple[Structure, float, str]]:
    """(structure, target, expected outcome)."""
    return [
        (NOVEL, 300.0, "off_target"),
        (NOVEL_COPY, 110.0, "duplicate_batch"),  # 9 % off: the closer NOVEL@100 is kept
        (NOVEL, 100.0, "passed"),
        (W, 100.0, "single_element"),
        (known_copy, 100.0, "duplicate_known"),
    ]


def test_gnn_verdicts_order_of_checks() -> None:
    known = _structure(Lattice.cubic(3.0), ["Ni", "Al"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    copy = _structure(Lattice.cubic(3.05), ["Ni", "Al"], [[0, 0, 0], [0.5, 0.52, 0.5]])
    cases = _candidates(copy)
    rows = {to_row(s)["structure_id"]: to_row(s) for s, _, _ in cases}
    todo = [{"iteration": 1, "structure_id": to_row(s)["structure_id"], "target": t} for s, t, _ in cases]
    preds = {sid: {"k_vrh": 100.0, "k_vrh_std": 4.0} for sid in rows}
    decided = gnn_verdicts(todo, rows, preds, [to_row(known)], tolerance=0.3, model_id="cgcnn-x")
    assert [o for _, o in decided] == [o for _, _, o in cases]
    by_outcome = {o: u for u, o in decided}
    assert by_outcome["passed"]["status"] == "gnn_pass" and by_outcome["passed"]["gnn_verdict"] == "pass"
    assert all(u["status"] == "rejected" and u["gnn_verdict"] == "reject" for u, o in decided if o != "passed")
    assert "67% off target 300 GPa" in by_outcome["off_target"]["gnn_reason"]
    assert by_outcome["duplicate_known"]["gnn_reason"].endswith(to_row(known)["structure_id"])
    assert all(u["gnn_k"] == 100.0 and u["gnn_model_id"] == "cgcnn-x" for u, _ in decided)


@pytest.mark.slow
def test_screen_gnn_end_to_end_and_rerun(lake, shared_data: Path, tmp_path: Path, prefect_server) -> None:
    from flows.screen import screen_gnn
    from storage.candidates import current
    from storage.ingest import ingest

    records = json.loads(gzip.decompress((shared_data / "mp-binary-elasticity-2025.1-train.json.gz").read_bytes()))
    subset = tmp_path / "seed.json.gz"
    subset.write_bytes(gzip.compress(json.dumps(records[:60]).encode()))
    ingest(lake, str(subset))
    seed_row = lake.query("SELECT * FROM structures WHERE nelements = 2 ORDER BY structure_id LIMIT 1").to_pylist()[0]
    seed = Structure(Lattice(seed_row["lattice"]), seed_row["species"], seed_row["frac_coords"])
    known_copy = seed.copy()
    known_copy.apply_strain(0.01)
    model_id = _register(lake, tmp_path)

    cases = _candidates(known_copy)
    structures = {to_row(s)["structure_id"]: to_row(s) for s, _, _ in cases}
    lake.append("structures", [{**r, "source": "generated", "split": split_of(sid)} for sid, r in structures.items()])
    lake.append(
        "candidates",
        [
            {
                "iteration": 2,
                "structure_id": to_row(s)["structure_id"],
                "target": t,
                "status": "generated",
                "stage": "generate",
            }
            for s, t, _ in cases
        ],
    )

    counts = screen_gnn(lake.url, 2)
    assert counts["model_id"] == model_id
    assert {
        k: counts[k]
        for k in (
            "screened",
            "passed",
            "rejected",
            "single_element",
            "off_target",
            "duplicate_known",
            "duplicate_batch",
        )
    } == {
        "screened": 5,
        "passed": 1,
        "rejected": 4,
        "single_element": 1,
        "off_target": 1,
        "duplicate_known": 1,
        "duplicate_batch": 1,
    }
    rows = {(c["structure_id"], c["target"]): c for c in current(lake, 2)}
    for s, target, outcome in cases:
        row = rows[(to_row(s)["structure_id"], target)]
        assert row["status"] == ("gnn_pass" if outcome == "passed" else "rejected")
        assert row["stage"] == "gnn" and row["gnn_k"] == pytest.approx(100.0, rel=1e-2)
    preds = lake.query("SELECT * FROM properties WHERE method = ?", [f"cgcnn@{model_id}"]).to_pylist()
    assert {p["structure_id"] for p in preds} == set(structures)
    assert all(p["uncertainty"] is not None and p["iteration"] == 2 and p["unit"] == "GPa" for p in preds)

    again = screen_gnn(lake.url, 2)
    assert again["screened"] == 0
    assert lake.query("SELECT count(*) AS n FROM candidates_history WHERE stage = 'gnn'").to_pylist()[0]["n"] == 5


def test_predict_cli_files_sql_and_json(lake, tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.setenv("MATLOOP_LAKE", lake.url)  # --lake sets it; restored after the test
    model_id = _register(lake, tmp_path, k_gpa=250.0)
    lake.append("structures", [{**to_row(s), "source": "generated", "split": "train"} for s in (NOVEL, W)])
    cif = tmp_path / "novel.cif"
    NOVEL.to(filename=str(cif))
    runner = CliRunner()
    args = ["--lake", lake.url, "predict"]

    out = runner.invoke(app, [*args, str(cif), "--json"])
    assert out.exit_code == 0, out.output
    (row,) = json.loads(out.output)
    assert row["model_id"] == model_id and row["formula"] == "TiAlNi"
    assert row["k_vrh"] == pytest.approx(250.0, rel=1e-3) and row["k_vrh_std"] >= 0

    out = runner.invoke(app, [*args, "--sql", "SELECT * FROM structures WHERE nelements = 1"])
    assert out.exit_code == 0, out.output
    assert "W" in out.output and "250.0" in out.output

    out = runner.invoke(app, [*args, "--sql", "SELECT structure_id FROM structures"])
    assert out.exit_code != 0 and "must return structure columns" in out.output
    out = runner.invoke(app, [*args, "--model", "cgcnn-missing", str(cif)])
    assert out.exit_code == 2 and "no model 'cgcnn-missing'" in out.output


@pytest.mark.slow
def test_stage_one_checks_a_designs_g_conditions_with_the_shear_predictor(lake, tmp_path: Path, prefect_server) -> None:
    """With a shear predictor registered, stage I predicts G for candidates whose design asks for G, records it
    as a ``g_vrh`` prediction row, and decides the G/K condition; K-only candidates get no G prediction."""
    from flows.screen import screen_gnn
    from storage.candidates import current

    _register(lake, tmp_path, k_gpa=350.0)
    shear_id = register_model(
        lake,
        kind="cgcnn-g",
        checkpoint=_constant_model(tmp_path, 300.0, target="g_vrh"),
        data_snapshot=["ml-a", "ml-b"],
        data_hash="hg",
        config=PRESETS.resolve("small", {"target": "g_vrh"}),
        metrics={},
    ).model_id
    cells = [_structure(Lattice.cubic(a), ["Ni", "Al"], [[0, 0, 0], [0.5, 0.5, 0.5]]) for a in (2.8, 3.2)]
    rows = [to_row(c) for c in cells]
    lake.append("structures", [{**r, "source": "generated", "split": split_of(r["structure_id"])} for r in rows])
    design = "k_vrh in [330, 370] and g_vrh/k_vrh <= 0.57"
    lake.append(
        "candidates",
        [
            {
                "iteration": 0,
                "structure_id": rows[0]["structure_id"],
                "target": 350.0,
                "status": "generated",
                "stage": "generate",
                "design": design,
            },
            {
                "iteration": 0,
                "structure_id": rows[1]["structure_id"],
                "target": 350.0,
                "status": "generated",
                "stage": "generate",
            },
        ],
    )
    screen_gnn(lake.url, 0)
    by_id = {c["structure_id"]: c for c in current(lake, 0)}
    designed = by_id[rows[0]["structure_id"]]
    checks = json.loads(designed["conditions_json"])["gnn"]
    assert checks["g_vrh/k_vrh <= 0.57"]["verdict"] == "fail"  # 300 / 350 = 0.86 > 0.57 x 1.3
    assert checks["g_vrh/k_vrh <= 0.57"]["value"] == pytest.approx(300 / 350, rel=1e-2)
    assert designed["status"] == "rejected" and "g_vrh/k_vrh <= 0.57" in designed["gnn_reason"]
    assert by_id[rows[1]["structure_id"]]["status"] == "gnn_pass"
    g_rows = lake.query("SELECT * FROM properties WHERE name = 'g_vrh'").to_pylist()
    assert [(r["structure_id"], r["method"]) for r in g_rows] == [(rows[0]["structure_id"], f"cgcnn@{shear_id}")]
    assert g_rows[0]["value"] == pytest.approx(300.0, rel=1e-2) and g_rows[0]["uncertainty"] is not None
