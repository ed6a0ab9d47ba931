"""Stage II end to end on a real lake with a real (tiny) MACE model: verdicts, rows, failures, rerun, cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ase.build import bulk
from test_fam import build_tiny_mace  # pytest puts tests/ on sys.path

from core.fam import FamSettings
from core.structures import from_atoms, split_of, to_row


def _seed_candidates(lake, iteration: int) -> dict[str, str]:
    """Three gnn_pass candidates: Cu and CuAl (the tiny model knows them) and W (it does not)."""
    cells = {
        "Cu": bulk("Cu", "fcc", a=3.6),
        "CuAl": bulk("CuAl", "cesiumchloride", a=3.0),
        "W": bulk("W", "bcc", a=3.17),
    }
    ids = {}
    structures, candidates = [], []
    for name, atoms in cells.items():
        row = to_row(from_atoms(atoms))
        ids[name] = row["structure_id"]
        structures.append(
            {**row, "source": "generated", "source_id": name, "parent_ids": [], "split": split_of(row["structure_id"])}
        )
        for target in (1.0, 300.0):
            candidates.append(
                {
                    "iteration": iteration,
                    "structure_id": row["structure_id"],
                    "target": target,
                    "status": "gnn_pass",
                    "gnn_verdict": "pass",
                    "stage": "gnn",
                }
            )
    lake.append("structures", structures)
    lake.append("candidates", candidates)
    return ids


@pytest.mark.slow
def test_screen_flow_stage_two_end_to_end(lake, tmp_path: Path, prefect_server) -> None:
    from flows.screen import ScreenParams, screen
    from storage.candidates import current

    model = build_tiny_mace(tmp_path / "tiny.model")
    ids = _seed_candidates(lake, iteration=3)
    params = ScreenParams(
        iteration=3,
        lake_url=lake.url,
        stages=["fam"],
        fam_model=str(model),
        fam_tolerance=0.9,
        fam_settings=FamSettings(steps=60),
        fam_batch_size=2,
    )
    summary = screen(params)["fam"]
    assert summary["screened"] == 6 and summary["errors"] == 2  # W, at both targets
    assert summary["passed"] + summary["rejected"] + summary["errors"] == 6

    rows = {(r["structure_id"], r["target"]): r for r in current(lake, 3)}
    w = rows[(ids["W"], 300.0)]
    assert w["fam_verdict"] == "error" and "unknown_element" in w["fam_reason"] and w["status"] == "rejected"
    cu = rows[(ids["Cu"], 300.0)]
    assert cu["fam_model"].startswith("mace:tiny.model@") and cu["fam_k"] is not None
    assert cu["fam_verdict"] == "reject" and "off target" in cu["fam_reason"]  # tiny model: K of a few GPa
    assert all(r["stage"] == "fam" and r["status"] in {"fam_pass", "rejected"} for r in rows.values())

    props = lake.query("SELECT name, method, settings_hash FROM properties WHERE structure_id = ?", [ids["Cu"]])
    names = set(props.column("name").to_pylist())
    assert {"k_vrh", "g_vrh", "elastic_tensor", "energy_per_atom"} <= names
    assert set(props.column("method").to_pylist()) == {f"fam:{cu['fam_model']}"}
    jobs = {r["structure_id"]: r for r in lake.read("jobs").to_pylist()}
    assert jobs[ids["W"]]["state"] == "failed" and jobs[ids["W"]]["error_class"] == "unknown_element"
    assert jobs[ids["Cu"]]["state"] == "completed" and jobs[ids["Cu"]]["wall_time_s"] > 0
    assert jobs[ids["Cu"]]["cpu_s"] > 0 and jobs[ids["Cu"]]["gpu_s"] == 0  # the ledger: CPU time, no GPU held
    assert {j["device"] for j in jobs.values()} == {"cpu"}  # where the model ran, on every job row
    relaxed = lake.query("SELECT parent_ids FROM structures WHERE source = 'fam-relaxed'").column("parent_ids")
    assert sorted(p[0] for p in relaxed.to_pylist()) == sorted([ids["Cu"], ids["CuAl"]])

    # A rerun finds nothing left at gnn_pass and writes nothing.
    before = lake.counts()
    assert screen(params)["fam"]["screened"] == 0
    assert lake.counts() == before


@pytest.mark.slow
def test_fam_batch_is_cached_on_structure_model_and_settings(lake, tmp_path: Path, prefect_server) -> None:
    from prefect import flow

    from tasks.common import in_lake
    from tasks.fam import fam_batch, structure_input

    model = str(build_tiny_mace(tmp_path / "tiny.model"))
    rows = [structure_input(to_row(from_atoms(bulk("Cu", "fcc", a=3.6))))]
    settings = FamSettings(steps=40)

    @flow
    def twice() -> tuple[list, list, list]:
        task = in_lake(fam_batch, lake.url)
        first = task(rows, model, settings)
        second = task(rows, model, settings)
        other = task(rows, model, settings.model_copy(update={"fmax": 0.04}))
        return first, second, other

    first, second, other = twice()
    assert first == second  # served from the cache: identical, including the cost recorded
    assert other[0]["cost"] != first[0]["cost"]  # new settings: recomputed


@pytest.mark.slow
def test_a_design_on_e_above_hull_is_checked_against_the_systems_fam_hull(lake, prefect_server) -> None:
    """B2 NiAl (the ground state) is on the hull its system's FAM references make, rock-salt NiAl far above it; the
    hull holds fcc/bcc/hcp Ni and Al and the known phase the lake has (B2 NiAl from the data)."""
    from core.hull import chemical_system
    from flows.screen import ScreenParams, screen
    from storage.candidates import current
    from storage.queries import known_phases

    design = "k_vrh in [20, 400] and e_above_hull <= 0.05"
    b2, b1 = bulk("NiAl", "cesiumchloride", a=2.88), bulk("NiAl", "rocksalt", a=5.0)
    known = to_row(from_atoms(bulk("NiAl", "cesiumchloride", a=2.86)))
    lake.append("structures", [{**known, "source": "mp-binary", "split": split_of(known["structure_id"])}])
    ids = {}
    for name, atoms in (("b2", b2), ("b1", b1)):
        row = to_row(from_atoms(atoms))
        ids[name] = row["structure_id"]
        lake.append("structures", [{**row, "source": "generated", "split": split_of(row["structure_id"])}])
        candidate = {"iteration": 0, "structure_id": row["structure_id"], "target": 210.0, "design": design}
        lake.append("candidates", [{**candidate, "status": "gnn_pass"}])
    assert [r["structure_id"] for r in known_phases(lake, chemical_system("NiAl"))] == [known["structure_id"]]
    params = ScreenParams(lake_url=lake.url, stages=["fam"], fam_model="sevennet-0", fam_tolerance=0.2)
    screen(params)
    rows = {r["structure_id"]: r for r in current(lake, 0)}
    fam = {name: json.loads(rows[sid]["conditions_json"])["fam"] for name, sid in ids.items()}
    checks = {name: verdicts["e_above_hull <= 0.05"] for name, verdicts in fam.items()}
    assert checks["b2"]["verdict"] == "pass" and abs(checks["b2"]["value"]) < 0.05, checks  # on the hull
    assert checks["b1"]["verdict"] == "fail" and checks["b1"]["value"] > 0.2, checks
    assert rows[ids["b1"]]["status"] == "rejected"  # (its reason: Born-unstable, which stage II names first)
    assert rows[ids["b2"]]["status"] == "fam_pass"
