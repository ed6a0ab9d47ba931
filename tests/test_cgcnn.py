"""CGCNN: graphs, element features, configs, checkpoints, training determinism, the train flow."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from core.cgcnn import PRESETS, CheckpointError, Ensemble, Prediction, train_member
from core.graphs import GraphCache, GraphConfig, atom_feature_table, build_graph, collate
from core.structures import to_row

torch.set_num_threads(1)
SMALL = PRESETS.resolve("small")


def _bcc_w() -> Structure:
    return Structure(Lattice.cubic(3.16), ["W", "W"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def _rows(structures: list[Structure]) -> list[dict]:
    return [to_row(s) for s in structures]


def _sorted_shells(structure: Structure, config: GraphConfig) -> list[list[float]]:
    g = build_graph(structure.lattice.matrix, structure.frac_coords, [s.specie.symbol for s in structure], config)
    return sorted(sorted(np.round(g.distances[g.edge_index[1] == i], 4).tolist()) for i in range(len(g.numbers)))


def test_bcc_graph_keeps_whole_shells() -> None:
    # 12 nearest in bcc: 8 at a*sqrt(3)/2, then 6 at a; the 12th is tied with 3 more, all kept.
    g = build_graph(*(_bcc_w().lattice.matrix, _bcc_w().frac_coords, ["W", "W"]), GraphConfig())
    d = np.sort(g.distances[g.edge_index[1] == 0])
    assert len(d) == 14
    assert np.allclose(d[:8], 3.16 * np.sqrt(3) / 2, atol=1e-4)
    assert np.allclose(d[8:], 3.16, atol=1e-4)
    assert set(g.edge_index[0].tolist()) == {0, 1}


def test_graph_is_independent_of_cell_choice() -> None:
    s = Structure(
        Lattice.from_parameters(4.1, 4.3, 5.0, 90, 100, 90),
        ["Ni", "Ti", "Ni"],
        [[0, 0, 0], [0.5, 0.4, 0.3], [0.2, 0.7, 0.6]],
    )
    config = GraphConfig(cutoff=6.0, max_neighbors=8)
    single = _sorted_shells(s, config)
    doubled = _sorted_shells(s * (2, 1, 1), config)
    assert doubled == sorted(single + single)


def test_atom_features_distinguish_elements() -> None:
    table = atom_feature_table()
    assert table.shape[0] == 95 and np.isfinite(table).all()
    assert not table[0].any()  # padding row
    ni, cu, w = table[28], table[29], table[74]
    assert not np.array_equal(ni, cu) and not np.array_equal(ni, w)


def test_graph_cache_roundtrip(tmp_path: Path) -> None:
    rows = _rows(
        [_bcc_w(), Structure(Lattice.cubic(3.6), ["Cu"] * 4, [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])]
    )
    cache = GraphCache(SMALL.graph, tmp_path)
    built = cache.graphs(rows)
    assert cache.save() is not None
    reloaded = GraphCache(SMALL.graph, tmp_path)
    assert len(reloaded) == 2
    for a, b in zip(built, reloaded.graphs(rows), strict=True):
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    batch = collate(built)
    assert batch.n_graphs == 2 and batch.batch.tolist() == [0, 0, 1, 1, 1, 1]
    assert batch.edge_index.max().item() == 5


def test_config_names_and_overrides() -> None:
    assert PRESETS.resolve("default").n_models == 4
    cfg = PRESETS.resolve("small", {"n_models": 3, "graph": {"cutoff": 5.0}})
    assert (cfg.n_models, cfg.graph.cutoff, cfg.graph.max_neighbors) == (3, 5.0, SMALL.graph.max_neighbors)
    with pytest.raises(ValueError, match="unknown CGCNN config"):
        PRESETS.resolve("huge")
    with pytest.raises(ValueError, match="n_modles"):
        PRESETS.resolve("small", {"n_modles": 3})


def test_prediction_mean_and_spread() -> None:
    members = np.log10(np.array([[100.0, 10.0], [100.0, 1000.0]]))
    p = Prediction(members)
    assert np.allclose(p.log10_k, [2.0, 2.0])
    assert np.allclose(p.k_vrh, [100.0, 100.0])
    assert p.k_vrh_std[0] == 0.0 and p.k_vrh_std[1] == pytest.approx(np.std([10, 1000], ddof=1))


def test_checkpoint_roundtrip_and_config_mismatch(tmp_path: Path) -> None:
    ensemble = Ensemble.untrained(SMALL.model_copy(update={"device": "cpu"}))
    rows = _rows([_bcc_w()])
    before = ensemble.predict_rows(rows).members_log10
    path = ensemble.save(tmp_path / "m.pt")
    loaded = Ensemble.load(path, expected=SMALL)
    assert np.allclose(loaded.predict_rows(rows).members_log10, before)
    assert before.shape == (SMALL.n_models, 1) and not np.allclose(before[0], before[1])  # members differ

    other = PRESETS.resolve("small", {"atom_hidden": 24})
    with pytest.raises(CheckpointError, match="atom_hidden: checkpoint 16 vs expected 24"):
        Ensemble.load(path, expected=other)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="format"):
        Ensemble.load(tmp_path / "foreign.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a loadable"):
        Ensemble.load(tmp_path / "junk.pt")


def _seed_graphs(shared_data: Path, n: int) -> tuple[list, np.ndarray]:
    records = json.loads(gzip.decompress((shared_data / "mp-binary-elasticity-2025.1-train.json.gz").read_bytes()))
    picked = [
        r for r in records if r["bulk_modulus_vrh"] and r["bulk_modulus_vrh"] > 5 and len(r["structure"]["sites"]) <= 8
    ][:n]
    rows = _rows([Structure.from_dict(r["structure"]) for r in picked])
    graphs = GraphCache(SMALL.graph).graphs(rows)
    return graphs, np.log10([r["bulk_modulus_vrh"] for r in picked])


def test_training_is_deterministic_and_learns(shared_data: Path) -> None:
    graphs, y = _seed_graphs(shared_data, 48)
    cfg = SMALL.model_copy(update={"max_epochs": 40, "patience": 40, "device": "cpu"})
    a = train_member(graphs[:40], y[:40], graphs[40:], y[40:], cfg, seed=3)
    b = train_member(graphs[:40], y[:40], graphs[40:], y[40:], cfg, seed=3)
    c = train_member(graphs[:40], y[:40], graphs[40:], y[40:], cfg, seed=4)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert a.best_val_mae_log10 == b.best_val_mae_log10
    # the standardization buffers travel with the weights
    assert a.model.target_mean.item() == pytest.approx(float(np.mean(y[:40])))
    # it learns: better on validation than always predicting the training mean
    assert a.best_val_mae_log10 < np.mean(np.abs(np.mean(y[:40]) - y[40:]))


@pytest.mark.slow
def test_train_flow_registers_caches_and_plots(
    lake, shared_data: Path, tmp_path: Path, prefect_server, monkeypatch
) -> None:
    from prefect.artifacts import Artifact

    from flows.train import TrainParams, train
    from storage.ingest import ingest
    from storage.registry import checkpoint_path, get_model

    monkeypatch.setenv("MATLOOP_CACHE_DIR", str(tmp_path / "cache"))
    records = json.loads(gzip.decompress((shared_data / "mp-binary-elasticity-2025.1-train.json.gz").read_bytes()))
    subset = tmp_path / "seed.json.gz"
    subset.write_bytes(gzip.compress(json.dumps(records[:400]).encode()))
    ingest(lake, str(subset))
    params = TrainParams(lake_url=lake.url, predictor_config="small", predictor_overrides={"max_epochs": 3})
    model_id = train(params)["predictor"]

    record = get_model(lake, model_id)
    assert record.kind == "cgcnn" and record.data_hash and len(record.data_snapshot) > 50
    assert 0 < record.metrics["test"]["ensemble"]["mae_log10"] < 1.0
    assert len(record.metrics["test"]["members"]) == 2 and record.metrics["device"] == "cpu"
    assert (Path(lake.path("figures")) / f"parity-{model_id}.png").stat().st_size > 1000
    assert Ensemble.load(checkpoint_path(lake, record), expected=PRESETS.resolve("small")).config.n_models == 2
    artifact = Artifact.get("predictor-metrics")
    assert artifact is not None and model_id in str(artifact.data) and "mae_log10" in str(artifact.data)

    assert train(params)["predictor"] == model_id  # cached: same data, config and code
    assert lake.query("SELECT count(*) AS n FROM models_history").to_pylist()[0]["n"] == 1

    from typer.testing import CliRunner

    from flows.cli import app

    args = ["--lake", lake.url, "train", "predictor", "--config", "small", "--set", "max_epochs=3", "--shear", "--json"]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    shear = get_model(lake, json.loads(out.output)["model_id"])
    assert shear.kind == "cgcnn-g" and shear.config["target"] == "g_vrh"
    assert 0 < shear.metrics["n_train"] <= record.metrics["n_train"]
