"""The t-SNE snapshot of an iteration: drawn for generators with latents, skipped cleanly otherwise."""

from __future__ import annotations

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

import tasks.generate
from core.structures import to_row
from tasks.generate import latent_snapshot


class _NoEncoder:
    def latents(self, structures):
        raise NotImplementedError("no latent space")


class _Encoder:
    def latents(self, structures):
        return np.arange(len(structures) * 2, dtype=float).reshape(-1, 2)


@pytest.fixture
def labeled_lake(lake):
    s = Structure(Lattice.cubic(3.0), ["Ir", "Os"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    row = to_row(s)
    lake.append("structures", [{**row, "source": "generated", "split": "test"}])
    lake.append(
        "candidates",
        [{"iteration": 0, "structure_id": row["structure_id"], "target": 350.0, "status": "labeled", "dft_k": 404.0}],
    )
    return lake


def test_snapshot_marks_the_new_structures(labeled_lake, monkeypatch):
    monkeypatch.setattr(tasks.generate, "load_registered_generator", lambda url: ("g", _Encoder()))
    z, is_new, k = latent_snapshot(labeled_lake, 0)
    assert z.shape == (1, 2) and is_new.tolist() == [True] and k.tolist() == [404.0]


def test_generator_without_latents_gives_no_map(labeled_lake, monkeypatch):
    monkeypatch.setattr(tasks.generate, "load_registered_generator", lambda url: ("g", _NoEncoder()))
    assert latent_snapshot(labeled_lake, 0) is None


def test_unlabeled_candidates_are_mapped_with_their_best_known_k(lake, monkeypatch):
    """The map is drawn from the first iteration on: candidates carry their DFT, else FAM, else CGCNN K."""
    monkeypatch.setattr(tasks.generate, "load_registered_generator", lambda url: ("g", _Encoder()))
    rows = [to_row(Structure(Lattice.cubic(a), ["Ir", "Os"], [[0, 0, 0], [0.5, 0.5, 0.5]])) for a in (3.0, 3.2)]
    lake.append("structures", [{**r, "source": "generated", "split": "test"} for r in rows])
    first, second = rows[0]["structure_id"], rows[1]["structure_id"]
    lake.append(
        "candidates",
        [
            {"iteration": 0, "structure_id": first, "target": 350.0, "status": "rejected", "gnn_k": 310.0},
            {
                "iteration": 0,
                "structure_id": first,
                "target": 300.0,
                "status": "rejected",
                "gnn_k": 310.0,
                "fam_k": 280.0,
            },
            {"iteration": 0, "structure_id": second, "target": 350.0, "status": "gnn_pass", "gnn_k": 340.0},
        ],
    )
    _, is_new, k = latent_snapshot(lake, 0)
    assert is_new.tolist() == [True, True] and sorted(k.tolist()) == [280.0, 340.0]


def test_no_candidates_loads_no_model(lake, monkeypatch):
    def must_not_load(url):
        raise AssertionError("the generator was loaded for an iteration without candidates")

    monkeypatch.setattr(tasks.generate, "load_registered_generator", must_not_load)
    assert latent_snapshot(lake, 0) is None


def test_iteration_rows_carry_the_funnel_mapes_and_the_generation_statistics(lake):
    """Labels within 20 %, FAM MAPE with failures as 100 %, stage-II survival and the generations row's MAPEs."""
    from storage.iterations import iteration_metrics

    def cand(sid, **fields):
        return {"iteration": 0, "structure_id": sid, "target": 300.0, "gnn_verdict": "pass", **fields}

    lake.append(
        "candidates",
        [
            cand("a", fam_verdict="pass", fam_k=330.0, status="labeled", dft_k=330.0),  # within 20 %
            cand("b", fam_verdict="pass", fam_k=240.0, status="labeled", dft_k=200.0),  # labeled, 33 % off
            cand("c", fam_verdict="reject", fam_k=None, status="rejected"),  # changed structure: 100 %
            cand("d", gnn_verdict="reject", status="rejected"),  # never reached the FAM
        ],
    )
    lake.append(
        "generations",
        [{"iteration": 0, "target": 300.0, "mape_head_raw": 0.3, "mape_head_kept": 0.1, "mape_grader_raw": 0.25}],
    )
    (row,) = iteration_metrics(lake, 0, {"train": 1.0}, samples_per_kept=5, label_source="fam")
    assert (row["n_kept"], row["n_gnn_pass"], row["n_fam_pass"], row["n_labeled"], row["n_within_20"]) == (
        4,
        3,
        2,
        2,
        1,
    )
    assert row["mape_fam_kept"] == pytest.approx((0.1 + 0.2 + 1.0) / 3)
    assert row["fam_survival"] == pytest.approx(2 / 3)
    assert row["dft_k_mean"] == pytest.approx(265.0)
    assert (row["mape_head_raw"], row["mape_grader_raw"], row["mape_grader_kept"]) == (0.3, 0.25, None)
    assert row["label_source"] == "fam"
    lake.append("iterations", [row])  # the row fits the table's schema
