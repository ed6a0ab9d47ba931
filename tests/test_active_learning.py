"""The loop in embedded mode: one tiny iteration, a rerun that recomputes nothing, a crash that resumes."""

from __future__ import annotations

import json

import pytest

from flows.active_learning import LoopParams, active_learning
from storage import Lake
from storage.ingest import ingest

pytestmark = pytest.mark.slow


def tiny(lake: Lake, **overrides) -> LoopParams:
    settings = {
        "lake_url": lake.url,
        "targets": [250.0, 350.0],
        "focus_target": 350.0,
        "iterations": 1,
        "n_kept": 3,
        "samples_per_kept": 4,
        "screen": {"gnn_tolerance": 5.0, "fam_tolerance": 5.0},
        "label": {"limit": 1},
        "label_source": "dft",
        "predictor_config": "small",
        "generator_config": "small",
    }
    return LoopParams(**{**settings, **overrides})


def history_counts(lake: Lake) -> dict[str, int]:
    return {t: lake.query(f"SELECT count(*) n FROM {t}_history").column("n")[0].as_py() for t in lake.counts()}


@pytest.fixture(scope="module")
def seeded(tmp_path_factory, prefect_server):
    lake = Lake(tmp_path_factory.mktemp("al") / "lake")
    ingest(lake, "seed")
    return lake


def test_crash_then_rerun_finishes_without_duplicates(seeded, monkeypatch):
    import flows.active_learning as al

    def node_lost(params):
        raise RuntimeError("node lost during labeling")

    monkeypatch.setitem(al._EMBEDDED, "label", node_lost)
    with pytest.raises(RuntimeError, match="node lost"):
        active_learning(tiny(seeded))
    assert seeded.counts()["iterations"] == 0
    screened = seeded.query("SELECT count(*) n FROM candidates WHERE gnn_verdict IS NOT NULL").column("n")[0].as_py()
    assert screened == 6  # the work before the crash is kept
    monkeypatch.undo()

    rows = active_learning(tiny(seeded))
    assert sorted(r["target"] for r in rows) == [250.0, 350.0]
    assert all(r["n_kept"] == 3 and r["n_generated"] == 12 for r in rows)
    # no candidate was generated or screened twice
    dupes = seeded.query(
        "SELECT stage, structure_id, target, count(*) n FROM candidates_history GROUP BY ALL HAVING n > 1"
    ).to_pylist()
    assert dupes == []
    assert seeded.counts()["models"] == 2
    # the cost ledger: every stage of the iteration paid for, each job counted once
    stages = seeded.query("SELECT stage, n_jobs, cpu_s FROM cost_per_stage WHERE iteration = 0").to_pylist()
    assert {r["stage"] for r in stages} == {"train", "generate", "gnn", "fam", "dft"}
    assert all(r["cpu_s"] > 0 for r in stages)
    total = seeded.query("SELECT cpu_s FROM cost_per_discovery WHERE iteration IS NULL").column("cpu_s")[0].as_py()
    assert total == pytest.approx(sum(r["cpu_s"] for r in stages))


def test_rerun_of_a_finished_iteration_recomputes_nothing(seeded):
    before = history_counts(seeded)
    rows = active_learning(tiny(seeded))
    assert len(rows) == 2
    assert history_counts(seeded) == before


def test_bad_parameters_fail_clearly(seeded):
    with pytest.raises(ValueError, match="focus_target"):
        active_learning(tiny(seeded, focus_target=123.0))


def test_fam_labeled_iterations_warm_start_and_train_on_their_labels(tmp_path_factory, prefect_server):
    """Two iterations labeled by the FAM: iteration 1 fine-tunes iteration 0's models on iteration 0's labels."""
    from core.fam import FamSettings

    lake = Lake(tmp_path_factory.mktemp("fam-loop") / "lake")
    ingest(lake, "seed")
    loose = FamSettings(ltol=0.6, stol=1.0, angle_tol=20.0)  # so that a tiny generator's samples reach labeling
    screen = {"gnn_tolerance": 5.0, "fam_tolerance": 5.0, "fam_settings": loose}
    rows = active_learning(tiny(lake, iterations=2, label_source="fam", label={"limit": 0}, screen=screen))
    assert {(r["iteration"], r["label_source"]) for r in rows} == {(0, "fam"), (1, "fam")}
    first = {r["iteration"]: r for r in rows if r["target"] == 350.0}
    models = {r["model_id"]: r for r in lake.query("SELECT * FROM models").to_pylist()}
    for column, kind in (("predictor_model_id", "cgcnn"), ("generator_model_id", "generator")):
        child = models[first[1][column]]
        assert child["kind"] == kind
        assert json.loads(child["config_json"])["parent_model_id"] == first[0][column]
    labeled = (
        lake.query(
            "SELECT p.structure_id FROM properties p WHERE list_contains(p.flags, 'loop_label') AND p.iteration = 0"
        )
        .column("structure_id")
        .to_pylist()
    )
    assert labeled, "no candidate of iteration 0 was labeled: nothing to learn from"
    assert lake.query("SELECT count(*) n FROM jobs WHERE stage = 'dft'").column("n")[0].as_py() == 0
    assert set(labeled) <= set(models[first[1]["generator_model_id"]]["data_snapshot"])
    assert set(labeled) <= set(models[first[1]["predictor_model_id"]]["data_snapshot"])
    assert all(r["mape_head_raw"] is not None and r["mape_fam_kept"] is not None for r in rows)


def test_the_iteration_report_shows_its_plots_in_the_ui(seeded):
    """The markdown artifact of the iteration run above carries every plot as an image (a data URI the UI
    renders), the t-SNE map included although the tiny loop labels at most one structure."""
    import base64
    import re

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["iteration-0"])))
    text = next(a.data for a in found if seeded.url in a.data)  # this lake's loop, not another test's
    images = dict(re.findall(r"!\[([^\]]+)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", text))
    assert {"mape_per_target.png", "k_of_samples.png", "dft_k_histogram.png", "latent_tsne.png"} <= set(images)
    assert all(base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n" for data in images.values())
    assert " ± - GPa" not in text and "{" not in text.split("Wall time per stage:")[1].splitlines()[0]
    assert "| 350 | `k_vrh = 350` |" in text.split("## Conditions")[1]  # the single-K target is one condition
    cost = text.split("## Cost")[1].split("## Plots")[0]
    assert {"| train |", "| generate |", "| gnn |", "| fam |", "| dft |"} <= {
        line[: line.index("|", 1) + 1] for line in cost.splitlines() if line.startswith("| ")
    }


def test_a_design_target_runs_and_every_stage_records_its_conditions(tmp_path_factory, prefect_server):
    """The loop with a design (K window and Pugh's ratio): one target at the window's centre, each stage's verdict
    per condition on every candidate, the funnel per condition in the lake and in the iteration's report."""
    lake = Lake(tmp_path_factory.mktemp("design-loop") / "lake")
    ingest(lake, "seed")
    design = "k_vrh in [300, 400] and g_vrh/k_vrh <= 0.57"
    screen = {"gnn_tolerance": 5.0, "fam_tolerance": 5.0, "fam_shear": True}  # let the FAM's G decide at stage II
    rows = active_learning(tiny(lake, design=design, label_source="fam", label={"limit": 0}, screen=screen))
    assert [r["target"] for r in rows] == [350.0]
    cands = lake.query("SELECT * FROM candidates WHERE iteration = 0").to_pylist()
    assert cands and {c["design"] for c in cands} == {design}
    stages = [set(json.loads(c["conditions_json"])) for c in cands]
    assert all("gnn" in s for s in stages) and any("fam" in s for s in stages)
    funnel = {r["condition"]: r for r in lake.query("SELECT * FROM condition_funnel").to_pylist()}
    assert set(funnel) == {"k_vrh in [300, 400]", "g_vrh/k_vrh <= 0.57"}
    # the seed set's G is SevenNet-0's, too soft to train on: no shear predictor, so stage I leaves G/K unknown
    assert funnel["g_vrh/k_vrh <= 0.57"]["n_gnn_checked"] == 0
    assert lake.query("SELECT count(*) AS n FROM models WHERE kind = 'cgcnn-g'").to_pylist()[0]["n"] == 0
    assert funnel["k_vrh in [300, 400]"]["n_gnn_checked"] == funnel["k_vrh in [300, 400]"]["n_candidates"]
    assert funnel["g_vrh/k_vrh <= 0.57"]["n_fam_checked"] > 0
    from flows.cli.workflow import DEMO_QUERIES  # the summary `matloop run` and `make demo` print

    summary = {title: lake.query(sql).to_pylist() for title, sql in DEMO_QUERIES.items()}
    assert len(summary["each condition of the last iteration, met/checked per stage"]) == 2
    assert {r["stage"] for r in summary["what the last iteration cost"]} >= {"train", "generate", "gnn"}
