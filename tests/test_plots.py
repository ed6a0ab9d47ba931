"""Iteration figures: each draws a PNG, including the degenerate cases (one value, nothing yet)."""

from __future__ import annotations

import numpy as np
from matplotlib.image import imread

from core import plots


def _drawn(path) -> bool:
    """A PNG whose pixels are not all one colour."""
    pixels = imread(path)
    return pixels.shape[0] > 100 and float(pixels.std()) > 0.01


def test_histogram_of_a_single_label_has_a_visible_bar(tmp_path):
    path = plots.dft_k_histogram({0: [403.9]}, tmp_path / "h.png", target=350.0)
    pixels = imread(path)[..., :3]
    bar_blue = (pixels[..., 2] > 0.6) & (pixels[..., 0] < 0.6)
    assert bar_blue.sum() > 200  # the bar is drawn, not a zero-width bin


def test_histogram_with_nothing_labeled(tmp_path):
    assert _drawn(plots.dft_k_histogram({}, tmp_path / "h0.png"))


def test_mape_and_latent_map(tmp_path):
    rows = [{"iteration": i, "target": t, "mape_gnn": 0.4 / (i + 1)} for i in range(3) for t in (250.0, 350.0)]
    assert _drawn(plots.mape_per_target(rows, tmp_path / "m.png"))
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(40, 8))
    is_new = np.zeros(40, dtype=bool)
    is_new[:3] = True
    assert _drawn(plots.latent_map(latents, is_new, rng.uniform(50, 400, 40), tmp_path / "t.png"))


def test_parity_plot(tmp_path):
    true = np.array([50.0, 150.0, 300.0])
    assert _drawn(plots.parity_plot(true, true * 1.05, true * 0.02, tmp_path / "p.png", "test"))


def test_k_distributions_draw_one_panel_per_target_and_one_histogram_per_iteration(tmp_path):
    rng = np.random.default_rng(1)
    samples = {(i, t): list(rng.normal(t * (0.8 + 0.1 * i), 20, 200)) for i in range(3) for t in (200.0, 350.0)}
    path = plots.k_distributions(samples, tmp_path / "k.png")
    pixels = imread(path)
    assert _drawn(path) and pixels.shape[1] > 1.5 * pixels.shape[0]  # two panels side by side
    assert _drawn(plots.k_distributions({}, tmp_path / "k0.png"))


def test_mape_of_raw_samples_skips_iterations_without_a_grader(tmp_path):
    rows = [{"iteration": i, "target": 350.0, "mape_grader_raw": None if i == 0 else 0.3 / i} for i in range(3)]
    assert _drawn(plots.mape_per_target(rows, tmp_path / "g.png", "mape_grader_raw", "grader MAPE"))
