"""Acquisition: which stage-II survivors are labeled, by each policy, under a limit and a DFT budget."""

from __future__ import annotations

import math

import pytest
from test_label import emt_cells, seed_candidates

from core.acquisition import AcquisitionSettings, choose, in_window_probability, score
from flows.label import LabelParams, label
from storage.candidates import advance, current


def survivor(target: float, fam_k: float, gnn_k: float | None = None, gnn_k_std: float | None = None) -> dict:
    return {"target": target, "fam_k": fam_k, "gnn_k": gnn_k or fam_k, "gnn_k_std": gnn_k_std}


# A fixed candidate set: id -> its candidate rows (one per target it was screened for).
POOL = {
    "near": [survivor(350.0, 352.0, gnn_k_std=5.0)],  # FAM K on target, the ensemble agrees
    "edge": [survivor(350.0, 415.0, gnn_k_std=8.0)],  # at the window's edge
    "spread": [survivor(350.0, 330.0, gnn_k=300.0, gnn_k_std=90.0)],  # the ensemble disagrees most
    "two": [survivor(300.0, 250.0, gnn_k_std=10.0), survivor(250.0, 255.0, gnn_k_std=10.0)],  # near its 2nd target
}


def chosen(choices) -> list[str]:
    return [c.structure_id for c in choices if c.chosen]


def test_closest_labels_the_fam_k_nearest_its_target_first():
    choices = choose(POOL, AcquisitionSettings(policy="closest"), limit=2)
    assert [c.structure_id for c in choices] == ["near", "two", "spread", "edge"]  # "two": 2 % off its 2nd target
    assert chosen(choices) == ["near", "two"]
    assert [c.note for c in choices[2:]] == ["over the limit of 2"] * 2
    assert choices[0].score == pytest.approx(-2 / 350)


def test_uncertain_labels_the_widest_ensemble_spread_first():
    choices = choose(POOL, AcquisitionSettings(policy="uncertain"), limit=1)
    assert chosen(choices) == ["spread"]
    assert choices[0].score == pytest.approx(90.0 / 300.0)
    assert [c.structure_id for c in choices] == ["spread", "two", "edge", "near"]


def test_in_window_probability_follows_the_fam_k_and_its_width():
    settings = AcquisitionSettings(window=0.2, fam_relative_error=0.05)
    assert in_window_probability(POOL["near"][0], settings) > 0.99
    at_edge = in_window_probability(POOL["edge"][0], settings)
    assert 0.4 < at_edge < 0.6  # 415 GPa, the window ends at 420 GPa: about a coin toss
    assert in_window_probability(survivor(350.0, 600.0, gnn_k_std=5.0), settings) < 1e-6
    on_target = in_window_probability(survivor(350.0, 350.0, gnn_k_std=0.0), AcquisitionSettings())
    assert on_target == pytest.approx(math.erf(2.5 / math.sqrt(2)))  # the window is 2.5 FAM errors wide each way


def test_expected_improvement_per_cpu_hour_under_a_budget():
    settings = AcquisitionSettings(policy="expected_improvement", budget_cpu_hours=3.0)
    hours = {"near": 4.0, "edge": 1.0, "spread": 1.0, "two": 1.0}  # "near" alone would spend more than the budget
    choices = choose(POOL, settings, cost_of=hours.get)
    by_id = {c.structure_id: c for c in choices}
    assert set(chosen(choices)) == {"edge", "spread", "two"}
    assert "over the budget" in by_id["near"].note and "~4.00" in by_id["near"].note
    assert by_id["two"].score == pytest.approx(
        max(in_window_probability(r, settings) for r in POOL["two"]) / 1.0
    )  # the better of its two targets, per hour
    unpriced = choose(POOL, settings, limit=1, cost_of=lambda _sid: None)  # no DFT history: the limit alone
    assert chosen(unpriced) == ["near"]


def test_a_structure_without_a_fam_k_is_never_preferred():
    assert score([{"target": 350.0, "fam_k": None}], AcquisitionSettings()) == -math.inf


def test_the_label_flow_records_policy_score_and_note_per_candidate(lake, prefect_server):
    ids = seed_candidates(lake, emt_cells(3), target=150.0)
    spreads = dict(zip(ids, (5.0, 40.0, 10.0), strict=True))
    advance(
        lake,
        [
            {"iteration": 0, "structure_id": sid, "target": 150.0, "gnn_k": 150.0, "gnn_k_std": s}
            for sid, s in spreads.items()
        ],
        stage="gnn",
    )
    params = LabelParams(lake_url=lake.url, preset="emt", limit=1, acquisition={"policy": "uncertain"})
    [outcome] = label(params)
    assert outcome.structure_id == ids[1]  # the widest spread
    rows = {c["structure_id"]: c for c in current(lake, 0)}
    assert {r["acquisition_policy"] for r in rows.values()} == {"uncertain"}
    assert rows[ids[1]]["acquisition_score"] == pytest.approx(40.0 / 150.0) and rows[ids[1]]["status"] == "labeled"
    assert rows[ids[0]]["status"] == "fam_pass" and rows[ids[0]]["acquisition_note"] == "over the limit of 1"

    # A budget too small for one structure at what labeling has cost per atom so far: nothing more is labeled.
    budget = {"policy": "uncertain", "budget_cpu_hours": 1e-12}
    tiny = LabelParams.model_validate({**params.model_dump(), "limit": 0, "acquisition": budget})
    assert label(tiny) == []
    notes = {c["structure_id"]: c["acquisition_note"] for c in current(lake, 0) if c["status"] == "fam_pass"}
    assert set(notes) == {ids[0], ids[2]} and all("over the budget" in n for n in notes.values())
    n_rows = lake.query("SELECT count(*) n FROM candidates_history").column("n")[0].as_py()
    assert (
        label(tiny) == [] and lake.query("SELECT count(*) n FROM candidates_history").column("n")[0].as_py() == n_rows
    )
