"""The t-SNE snapshot of an iteration: drawn for generators with latents, skipped cleanly otherwise."""

from __future__ import annotations

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

import tasks.generate
from core.structures import to_row
from tasks.iteration import latent_snapshot


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


def test_nothing_labeled_loads_no_model(lake, monkeypatch):
    def must_not_load(url):
        raise AssertionError("the generator was loaded for an iteration with nothing labeled")

    monkeypatch.setattr(tasks.generate, "load_registered_generator", must_not_load)
    assert latent_snapshot(lake, 0) is None
