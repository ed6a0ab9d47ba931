"""Feedback that moves the models: warm starts, loop labels in training whatever their split, the weighting."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from pymatgen.core import Structure
from test_generate_flow import registered, seeded_lake, train_split  # noqa: F401  (fixtures)
from test_generator import TINY, metallic_records

from core.cgcnn import CGCNN, train_member
from core.cgcnn import PRESETS as CGCNN_PRESETS
from core.generator import CDVAEGenerator, load_generator
from core.graphs import graph_of_row
from core.structures import from_row, split_of, structure_id, to_row
from flows.active_learning import LoopParams, _stage_params
from flows.label import LabelParams, label
from flows.train import TrainParams, train
from storage.candidates import advance
from storage.queries import LOOP_LABEL_FLAG
from storage.registry import GENERATOR_KIND, checkpoint_path, resolve_model
from tasks.train import training_data


def _params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


# ---------- the weighting ----------
def test_weighted_epochs_draw_heavy_structures_more_often():
    torch.manual_seed(0)
    weights = torch.tensor([1.0] * 99 + [50.0])
    drawn = torch.cat(CDVAEGenerator._epoch_batches(weights, 16))
    assert len(drawn) == 100
    assert (drawn == 99).sum() > 20  # 50 / 149 of the draws on average; one in 100 without weights
    uniform = torch.cat(CDVAEGenerator._epoch_batches(torch.ones(100), 16))
    assert sorted(uniform.tolist()) == list(range(100))  # equal weights: a plain permutation


# ---------- warm starts ----------
def test_generator_finetune_starts_from_the_trained_model(registered):  # noqa: F811
    lake, model_id = registered
    parent = load_generator(checkpoint_path(lake, resolve_model(lake, GENERATOR_KIND, model_id)), device="cpu")
    before = _params(parent.vae).clone()
    structures, k_vrh, rows = train_split(lake.url)
    slow = parent.config.model_copy(
        update={"finetune_epochs": 1, "finetune_prior_epochs": 1, "finetune_lr_scale": 1e-6}
    )
    parent.config = slow
    metrics = parent.finetune(structures, k_vrh)
    after = _params(parent.vae)
    assert metrics["finetuned"] and metrics["n_train"] == len(rows)
    assert torch.allclose(before, after, atol=1e-3)  # a tiny step from the parent, not a fresh network
    fresh = CDVAEGenerator(TINY.model_copy(update={"vae_epochs": 1, "prior_epochs": 1}), device="cpu")
    fresh.train(structures, k_vrh)
    assert not torch.allclose(before, _params(fresh.vae), atol=1e-3)


def test_cgcnn_warm_start_starts_from_the_parent_member(shared_data):
    config = CGCNN_PRESETS.resolve("small", {"device": "cpu", "finetune_epochs": 1, "finetune_lr_scale": 1e-6})
    records = metallic_records(shared_data, 40)
    graphs = [graph_of_row(to_row(Structure.from_dict(r["structure"])), config.graph) for r in records]
    y = np.log10([r["bulk_modulus_vrh"] for r in records])
    torch.manual_seed(3)
    parent = CGCNN(config)
    parent.target_mean.fill_(float(y.mean()))
    parent.target_std.fill_(float(y.std()))
    before = _params(parent).clone()
    result = train_member(graphs[:30], y[:30], graphs[30:], y[30:], config, seed=0, init=copy.deepcopy(parent))
    assert result.epochs_run == 1
    assert torch.allclose(before, _params(result.model), atol=1e-3)
    assert float(result.model.target_mean) == pytest.approx(float(y.mean()))  # the parent's statistics kept
    fresh = train_member(graphs[:30], y[:30], graphs[30:], y[30:], config.model_copy(update={"max_epochs": 1}), 0)
    assert not torch.allclose(before, _params(fresh.model), atol=1e-3)


# ---------- loop labels reach training ----------
def _loop_labeled(lake, n: int = 3) -> list[str]:
    """``n`` lake structures re-entered, 8 % expanded, as loop-made (fam-relaxed) ones with FAM loop labels.

    At least one of them falls outside the train split, which must not keep it out of training.
    """
    ids, rows, props = [], [], []
    for r in lake.query("SELECT * FROM structures ORDER BY structure_id").to_pylist():
        moved = from_row(r)
        moved.scale_lattice(moved.volume * 1.08)
        sid = structure_id(moved)
        if len(ids) == n - 1 and all(split_of(i) == "train" for i in [*ids, sid]):
            continue  # the last slot is for a structure outside the train split
        ids.append(sid)
        rows.append(
            {**to_row(moved), "source": "fam-relaxed", "parent_ids": [r["structure_id"]], "split": split_of(sid)}
        )
        props.append(
            {
                "structure_id": sid,
                "name": "k_vrh",
                "value": 400.0,
                "unit": "GPa",
                "method": "fam:sevennet-0",
                "flags": [LOOP_LABEL_FLAG],
                "iteration": 0,
            }
        )
        if len(ids) == n:
            break
    lake.append("structures", rows)
    lake.append("properties", props)
    return ids


def test_loop_labels_all_go_to_training_with_their_weight(seeded_lake):  # noqa: F811
    ids = _loop_labeled(seeded_lake)
    assert any(split_of(i) != "train" for i in ids)
    data = training_data(seeded_lake.url, new_label_weight=7.0)
    assert sorted(r["structure_id"] for r in data.rows if r["from_loop"]) == sorted(ids)
    by_split = data.by_split
    assert {r["structure_id"] for r in by_split["train"]} >= set(ids)
    assert not {r["structure_id"] for r in by_split["val"] + by_split["test"]} & set(ids)
    weights = data.train_weights
    assert sorted(w for w, r in zip(weights, by_split["train"], strict=True) if r["from_loop"]) == [7.0] * len(ids)
    assert set(weights) == {1.0, 7.0}
    assert not any(r["from_loop"] for r in training_data(seeded_lake.url, feedback=False).rows)


def test_an_iteration_trains_on_labels_of_earlier_iterations_only(seeded_lake):  # noqa: F811
    """A resumed iteration must not see the labels its own killed first attempt wrote (same models, same ids)."""
    ids = _loop_labeled(seeded_lake)  # labels of iteration 0
    seed_only = set(training_data(seeded_lake.url, labels_before=0).structure_ids)
    assert not seed_only & set(ids)
    assert set(training_data(seeded_lake.url, labels_before=1).structure_ids) == seed_only | set(ids)
    assert training_data(seeded_lake.url, labels_before=0).data_hash != training_data(seeded_lake.url).data_hash
    assert training_data(seeded_lake.url, labels_before=1).data_hash == training_data(seeded_lake.url).data_hash
    params = LoopParams(lake_url=seeded_lake.url, size="demo")
    assert _stage_params(params, seeded_lake, 3)["train"].labels_before == 3


def test_a_fam_loop_label_on_a_seed_structure_is_refused_unless_flagged(seeded_lake):  # noqa: F811
    """A FAM K the stage-II screen wrote (no loop_label flag) is not a training label."""
    _loop_labeled(seeded_lake, 1)
    n_before = len(training_data(seeded_lake.url).rows)
    row = seeded_lake.query("SELECT * FROM structures WHERE source = 'fam-relaxed'").to_pylist()[0]
    other = {**row, "structure_id": "x" * 16}
    seeded_lake.append("structures", [other])
    seeded_lake.append(
        "properties",
        [{"structure_id": other["structure_id"], "name": "k_vrh", "value": 10.0, "method": "fam:sevennet-0"}],
    )
    assert len(training_data(seeded_lake.url).rows) == n_before


def test_fine_tuning_gets_the_parent_weights_and_records_the_parent(registered, prefect_server, monkeypatch):  # noqa: F811
    lake, parent_id = registered
    ids = _loop_labeled(lake)
    seen: dict = {}
    original = CDVAEGenerator.finetune

    def spy(self, structures, k_vrh, *, weights=None, progress=False, other_labels=None):
        seen["weights"], seen["vocab"] = list(weights), list(self.vocab)
        self.config = self.config.model_copy(update={"finetune_epochs": 1, "finetune_prior_epochs": 1})
        return original(self, structures, k_vrh, weights=weights, progress=progress, other_labels=other_labels)

    monkeypatch.setattr(CDVAEGenerator, "finetune", spy)
    params = TrainParams(lake_url=lake.url, what=["generator"], parent_generator=parent_id, new_label_weight=5.0)
    child = train(params)["generator"]
    assert child != parent_id
    assert sorted(seen["weights"]).count(5.0) == len(ids)  # the weighting reached the model
    parent = resolve_model(lake, GENERATOR_KIND, parent_id)
    assert seen["vocab"] == load_generator(checkpoint_path(lake, parent)).vocab
    record = resolve_model(lake, GENERATOR_KIND, child)
    assert record.config["parent_model_id"] == parent_id and record.config["new_label_weight"] == 5.0
    assert set(ids) <= set(record.data_snapshot)
    # a rerun with the same data, code, parent and weighting returns the registered model
    assert train(params)["generator"] == child


def test_label_source_fam_promotes_stage_two_k_to_a_marked_training_label(seeded_lake, prefect_server):  # noqa: F811
    row = seeded_lake.query("SELECT * FROM structures LIMIT 1").to_pylist()[0]
    advance(
        seeded_lake,
        [
            {
                "iteration": 0,
                "structure_id": row["structure_id"],
                "target": 300.0,
                "fam_model": "sevennet-0",
                "fam_k": 310.0,
                "fam_verdict": "pass",
                "status": "fam_pass",
            }
        ],
        stage="fam",
    )
    outcomes = label(LabelParams(lake_url=seeded_lake.url, iteration=0, source="fam"))
    assert [(o.verdict, o.k_vrh, o.method) for o in outcomes] == [("labeled", 310.0, "fam:sevennet-0")]
    cand = seeded_lake.query("SELECT * FROM candidates WHERE iteration = 0").to_pylist()[0]
    assert cand["status"] == "labeled" and cand["dft_method"] == "fam:sevennet-0" and cand["dft_k"] == 310.0
    prop = seeded_lake.query("SELECT * FROM properties WHERE list_contains(flags, ?)", [LOOP_LABEL_FLAG]).to_pylist()
    assert [(p["structure_id"], p["value"], p["method"]) for p in prop] == [
        (row["structure_id"], 310.0, "fam:sevennet-0")
    ]
    assert seeded_lake.query("SELECT count(*) n FROM jobs").column("n")[0].as_py() == 0  # no DFT ran
