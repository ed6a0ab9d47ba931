"""The generate flow and generator training as Prefect runs against a real lake."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from test_generator import TINY, metallic_records
from typer.testing import CliRunner

from core.generator import CDVAEGenerator
from core.structures import from_row
from flows.cli import app
from flows.generate import GenerateParams, generate
from flows.train import TrainParams, train
from storage.candidates import current
from storage.ingest import ingest
from storage.registry import GENERATOR_KIND, latest_model, register_model
from tasks.train import _fit_generator, training_data


def train_split(lake_url: str, **kwargs):
    """(structures, K, rows) of the training data's train split, as the generator is fit on it."""
    rows = training_data(lake_url, **kwargs).by_split["train"]
    return [from_row(r) for r in rows], [float(r["k_vrh"]) for r in rows], rows


@pytest.fixture
def seeded_lake(lake, shared_data, tmp_path):
    """A lake holding 150 metallic MP binaries, ingested through the real ingest path."""
    source = tmp_path / "mp-subset.json.gz"
    with gzip.open(source, "wt") as fh:
        json.dump(metallic_records(shared_data, 150), fh)
    ingest(lake, str(source))
    return lake


@pytest.fixture
def registered(seeded_lake, tmp_path):
    """A tiny generator trained on the lake's train split and registered like tasks.train.train_model does."""
    torch.set_num_threads(1)
    data = training_data(seeded_lake.url)
    structures, k_vrh, _ = train_split(seeded_lake.url)
    generator = CDVAEGenerator(TINY, device="cpu")
    metrics = generator.train(structures, k_vrh)
    record = register_model(
        seeded_lake,
        kind=GENERATOR_KIND,
        checkpoint=generator.save(tmp_path / "tiny.pt"),
        data_snapshot=data.structure_ids,
        data_hash=data.data_hash,
        config=generator.config_dict,
        metrics=metrics,
    )
    return seeded_lake, record.model_id


def test_generate_flow_writes_structures_and_candidates_and_resumes(registered, prefect_server):
    lake, model_id = registered
    params = GenerateParams(lake_url=lake.url, iteration=1, targets=[100.0, 300.0], samples_per_kept=5, n_kept=3)
    result = generate(params)
    assert result["model_id"] == model_id
    rows = current(lake, 1)
    assert rows and {r["target"] for r in rows} == {100.0, 300.0}
    assert all(r["status"] == "generated" and r["stage"] == "generate" for r in rows)
    assert all(r["generator_model_id"] == model_id and r["generator_score"] > 0 for r in rows)
    assert sum(s["n_kept"] for s in result["targets"]) == len(rows)
    generated = lake.query("SELECT * FROM structures WHERE source = 'generated'").to_pylist()
    assert generated and all(g["parent_ids"] == [] and g["split"] in {"train", "val", "test"} for g in generated)
    assert {g["structure_id"] for g in generated} <= {r["structure_id"] for r in rows}

    # a rerun resumes: targets already generated are skipped and no candidate row is rewritten
    before = lake.query("SELECT count(*) AS n FROM candidates_history").to_pylist()[0]["n"]
    again = generate(params.model_copy(update={"targets": [100.0, 300.0, 200.0]}))
    notes = {t["target"]: t["note"] for t in again["targets"]}
    assert notes[100.0] == notes[300.0] == "already generated"
    after = lake.query("SELECT count(*) AS n FROM candidates_history").to_pylist()[0]["n"]
    assert after - before == sum(1 for r in current(lake, 1) if r["target"] == 200.0)


def test_generate_command_writes_cif_extxyz_and_scores(registered, tmp_path):
    lake, model_id = registered
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "--lake",
            lake.url,
            "generate",
            "--target",
            "250",
            "--n",
            "2",
            "--samples-per-kept",
            "4",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["model_id"] == model_id
    cifs = sorted(out.glob("*.cif"))
    lines = (out / "scores.csv").read_text().splitlines()
    assert len(cifs) == summary["targets"][0]["n_kept"] == len(lines) - 1 >= 1
    assert (out / "structures.extxyz").read_text().count("generator_score") == len(cifs)


@pytest.mark.slow
def test_a_k_and_g_generator_learns_the_lakes_g_labels_and_a_design_asks_it_for_g(
    seeded_lake, prefect_server, tmp_path
):
    """The train task hands a K-and-G generator the G labels of the K labels' method; the generate flow asks it for
    the centre of a design's G/K window (as G = ratio x K), and the generations row records what was asked."""
    torch.set_num_threads(1)
    data = training_data(seeded_lake.url)
    rows = data.by_split["train"]
    config = TINY.model_copy(update={"properties": ("k_vrh", "g_vrh")}).model_dump()
    fitted = _fit_generator(seeded_lake, data, config, None)
    assert fitted.metrics["n_labels_by_property"] == {
        "k_vrh": len(rows),
        "g_vrh": sum(1 for r in rows if (r["g_vrh"] or 0) > 0),
    }
    assert fitted.metrics["n_labels_by_property"]["g_vrh"] > 0.9 * len(rows)  # the MP records carry G
    record = register_model(
        seeded_lake,
        kind=GENERATOR_KIND,
        checkpoint=fitted.model.save(tmp_path / "tiny-kg.pt"),
        data_snapshot=data.structure_ids,
        data_hash=data.data_hash,
        config=fitted.model.config_dict,
        metrics=fitted.metrics,
    )
    design = "k_vrh in [100, 200] and g_vrh/k_vrh in [0.3, 0.5]"
    result = generate(GenerateParams(lake_url=seeded_lake.url, design=design, samples_per_kept=4, n_kept=3))
    assert result["targets"][0]["head_g_mape_kept"] is not None
    row = seeded_lake.query("SELECT * FROM generations").to_pylist()[0]
    assert row["generator_model_id"] == record.model_id and row["target"] == 150.0
    assert json.loads(row["conditions_json"]) == {"k_vrh": 150.0, "g_vrh": 60.0}
    assert 0 <= row["mape_head_g_raw"] < 5 and row["mape_head_g_kept"] is not None
    assert {c["design"] for c in current(seeded_lake, 0)} == {design}


@pytest.mark.slow
def test_a_k_only_generator_is_asked_for_k_alone_by_a_design_with_a_g_window(registered, prefect_server):
    lake, _ = registered
    generate(
        GenerateParams(
            lake_url=lake.url, design="k_vrh in [100, 200] and g_vrh in [40, 80]", n_kept=2, samples_per_kept=3
        )
    )
    row = lake.query("SELECT * FROM generations").to_pylist()[0]
    assert row["target"] == 150.0 and row["conditions_json"] is None and row["mape_head_g_raw"] is None


@pytest.mark.slow
def test_train_generator_registers_and_is_cached(seeded_lake, prefect_server):
    params = TrainParams(lake_url=seeded_lake.url, what=["generator"])
    model_id = train(params)["generator"]
    record = latest_model(seeded_lake, GENERATOR_KIND)
    assert record.model_id == model_id and record.config["name"] == "small"
    assert record.data_hash == training_data(seeded_lake.url).data_hash
    assert record.metrics["n_train"] == len(train_split(seeded_lake.url)[2]) and record.metrics["device"] == "cpu"
    assert train(params)["generator"] == model_id  # unchanged data, config, code: no retraining
    assert seeded_lake.query("SELECT count(*) AS n FROM models_history").to_pylist()[0]["n"] == 1


def test_keep_best_follows_the_configured_ranker(registered, prefect_server, tmp_path):
    """With a CGCNN ranker the kept candidates are the best by that model, not by the generator's head."""
    from core.cgcnn import PRESETS as CGCNN_PRESETS
    from core.cgcnn import Ensemble
    from core.generator import SampleBatch, keep_best, load_generator
    from core.metrics import mape
    from core.structures import structure_id, to_row
    from storage.registry import checkpoint_path, resolve_model
    from tasks.generate import derive_seed

    lake, model_id = registered
    ranker = Ensemble.untrained(CGCNN_PRESETS.resolve("small", {"device": "cpu"})).save(tmp_path / "ranker.pt")
    params = GenerateParams(
        lake_url=lake.url, iteration=2, targets=[300.0], samples_per_kept=6, n_kept=3, ranker=str(ranker)
    )
    generate(params)
    kept = {r["structure_id"] for r in current(lake, 2)}
    generator = load_generator(checkpoint_path(lake, resolve_model(lake, GENERATOR_KIND, model_id)), device="cpu")
    batch = generator.sample([300.0], 18, derive_seed(0, 300.0))
    by_ranker = Ensemble.load(ranker).predict_rows([to_row(s) for s in batch.structures]).k_vrh
    expected = keep_best(SampleBatch(batch.structures, batch.targets, by_ranker), 3)
    by_head = keep_best(batch, 3)
    assert kept == {structure_id(s) for s in expected.structures}
    assert kept != {structure_id(s) for s in by_head.structures}  # the two rankers disagree on this batch
    stats = lake.query("SELECT ranker, mape_head_raw, n_sampled, n_drawn FROM generations WHERE iteration = 2")
    assert stats.to_pylist() == [
        {
            "ranker": str(ranker),
            "mape_head_raw": pytest.approx(mape(batch.scores, 300.0)),
            "n_sampled": 18,
            "n_drawn": batch.draws,  # duplicates drawn again are counted
        }
    ]


@pytest.mark.slow
def test_a_recreated_lake_trains_again_instead_of_returning_a_vanished_model(shared_data, tmp_path, prefect_server):
    """Task results live in the lake: delete it, rebuild it at the same path, and the generator is registered anew."""
    import shutil

    from flows.train import TrainParams, train
    from storage import Lake
    from storage.registry import resolve_model

    source = tmp_path / "mp-subset.json.gz"
    with gzip.open(source, "wt") as fh:
        json.dump(metallic_records(shared_data, 60), fh)

    def trained_lake() -> tuple[Lake, str]:
        lake = Lake(tmp_path / "lake")
        ingest(lake, str(source))
        return lake, train(TrainParams(lake_url=lake.url, what=["generator"]))["generator"]

    trained_lake()
    shutil.rmtree(tmp_path / "lake")
    lake, model_id = trained_lake()
    assert resolve_model(lake, GENERATOR_KIND, model_id).model_id == model_id  # registered in the lake now there


def test_model_source_hash_covers_subpackages_and_what_they_import(tmp_path):
    """An edit anywhere under a model's package, a subfolder included, or in a core module it imports (even
    lazily, two imports away) is a new model; an edit of a module it does not import is not."""
    from core.provenance import source_hash

    pkg = tmp_path / "core" / "gen"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from core.gen.sub.b import y\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from core import helper\n    return helper.z\n")
    (tmp_path / "core" / "helper.py").write_text("from core.deep import w\nz = 1\n")
    (tmp_path / "core" / "deep.py").write_text("w = 1\n")
    (tmp_path / "core" / "unrelated.py").write_text("u = 1\n")

    def digest() -> str:
        return source_hash("core.gen", root=tmp_path)

    before = digest()
    (tmp_path / "core" / "unrelated.py").write_text("u = 2\n")
    assert digest() == before
    for path in (pkg / "sub" / "b.py", tmp_path / "core" / "deep.py"):
        path.write_text(path.read_text() + "# edited\n")
        assert digest() != before
        before = digest()


@pytest.mark.slow
def test_the_shear_predictor_trains_on_the_g_labels_and_is_not_a_k_predictor(seeded_lake, prefect_server):
    from core.cgcnn import PRESETS, CheckpointError, Ensemble
    from storage.registry import SHEAR_PREDICTOR_KIND, checkpoint_path

    trained = train(TrainParams(lake_url=seeded_lake.url, what=["shear_predictor"], predictor_config="small"))
    record = latest_model(seeded_lake, SHEAR_PREDICTOR_KIND)
    assert trained == {"shear_predictor": record.model_id} and record.config["target"] == "g_vrh"
    with_g = [r for r in training_data(seeded_lake.url).by_split["train"] if (r["g_vrh"] or 0) > 0]
    assert record.metrics["n_train"] == len(with_g)
    ensemble = Ensemble.load(checkpoint_path(seeded_lake, record))
    assert ensemble.config.target == "g_vrh" and len(ensemble.predict_rows(with_g[:3]).gpa) == 3
    with pytest.raises(CheckpointError, match="target: checkpoint g_vrh vs expected k_vrh"):
        Ensemble.load(checkpoint_path(seeded_lake, record), expected=PRESETS.resolve("small"))


@pytest.mark.slow
def test_a_fam_g_is_no_training_label_and_without_one_no_shear_predictor_is_trained(lake, prefect_server):
    """The seed set's G is SevenNet-0's (too soft): it is not a G label, so the shear predictor is skipped."""
    ingest(lake, "seed")
    rows = training_data(lake.url).rows
    assert rows and all(r["g_vrh"] is None for r in rows)
    assert lake.query("SELECT count(*) AS n FROM properties WHERE name = 'g_vrh'").to_pylist()[0]["n"] > 100
    assert train(TrainParams(lake_url=lake.url, what=["shear_predictor"], predictor_config="small")) == {}
    with pytest.raises(
        ValueError, match="conditioned on g_vrh, but only 0 train structures have a DFT or dataset G label"
    ):
        train(TrainParams(lake_url=lake.url, what=["generator"], generator_config="small-kg"))
