"""Recording an iteration: funnel counts, MAPE, DFT K statistics, generation quality, latents."""

from __future__ import annotations

import json

import numpy as np

from core.metrics import generation_metrics
from core.structures import from_row
from storage import Lake
from storage.queries import funnel, labeled_k_vrh
from storage.registry import ModelNotFoundError, latest_model


def _latest_id(lake: Lake, kind: str) -> str | None:
    try:
        return latest_model(lake, kind).model_id
    except ModelNotFoundError:
        return None


def iteration_metrics(lake: Lake, iteration: int, wall_times: dict[str, float], samples_per_kept: int) -> list[dict]:
    """One ``iterations`` row per target of the iteration."""
    reference = [from_row(r) for r in labeled_k_vrh(lake, split="train").to_pylist()]
    kept = lake.query(
        "SELECT c.target, s.* FROM candidates c JOIN structures s USING (structure_id) WHERE c.iteration = ?",
        [iteration],
    ).to_pylist()
    predictor, generator = _latest_id(lake, "cgcnn"), _latest_id(lake, "generator")
    rows = []
    for counts in funnel(lake, iteration):
        structures = [from_row(r) for r in kept if r["target"] == counts["target"]]
        quality = generation_metrics(structures, reference)
        rows.append(
            {
                "iteration": iteration,
                **counts,
                "n_generated": counts["n_kept"] * samples_per_kept,
                "validity": quality.validity,
                "uniqueness": quality.uniqueness,
                "novelty": quality.novelty,
                "wall_times_json": json.dumps(wall_times),
                "predictor_model_id": predictor,
                "generator_model_id": generator,
            }
        )
    return rows


def latent_snapshot(
    lake: Lake, iteration: int, max_reference: int = 600
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(latents, is_new, K) of training structures and this iteration's labeled ones, for the t-SNE map.

    None when the generator has no latent space or nothing was labeled yet.
    """
    from tasks.generate import load_registered_generator

    new = lake.query(
        "SELECT s.*, c.dft_k AS k_vrh FROM candidates c JOIN structures s USING (structure_id) "
        "WHERE c.iteration = ? AND c.status = 'labeled'",
        [iteration],
    ).to_pylist()
    if not new:  # checked first: nothing to highlight, so no model load and no training-set read
        return None
    try:
        _, generator = load_registered_generator(lake.url)
    except ModelNotFoundError:
        return None
    rows = labeled_k_vrh(lake, split="train").to_pylist()[:max_reference] + new
    try:
        z = generator.latents([from_row(r) for r in rows])
    except NotImplementedError:  # a generator without an encoder has no map to draw
        return None
    is_new = np.array([False] * (len(rows) - len(new)) + [True] * len(new))
    return z, is_new, np.array([r["k_vrh"] for r in rows], dtype=float)
