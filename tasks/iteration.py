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


_GENERATION_COLUMNS = ("mape_head_raw", "mape_head_kept", "mape_grader_raw", "mape_grader_kept")


def iteration_metrics(
    lake: Lake, iteration: int, wall_times: dict[str, float], samples_per_kept: int, label_source: str = "dft"
) -> list[dict]:
    """One ``iterations`` row per target of the iteration: the funnel, its MAPEs, and the generation statistics."""
    reference = [from_row(r) for r in labeled_k_vrh(lake, split="train").to_pylist()]
    kept = lake.query(
        "SELECT c.target, s.* FROM candidates c JOIN structures s USING (structure_id) WHERE c.iteration = ?",
        [iteration],
    ).to_pylist()
    predictor, generator = _latest_id(lake, "cgcnn"), _latest_id(lake, "generator")
    generated = {
        r["target"]: r for r in lake.query("SELECT * FROM generations WHERE iteration = ?", [iteration]).to_pylist()
    }
    rows = []
    for counts in funnel(lake, iteration):
        stats = generated.get(counts["target"], {})
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
                "label_source": label_source,
                **{k: stats.get(k) for k in _GENERATION_COLUMNS},
                "wall_times_json": json.dumps(wall_times),
                "predictor_model_id": predictor,
                "generator_model_id": generator,
            }
        )
    return rows


def latent_snapshot(
    lake: Lake, iteration: int, max_reference: int = 600
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(latents, is_new, K) of training structures and this iteration's candidates, for the t-SNE map.

    The candidates are drawn with their best-known K (DFT, else FAM, else the stage-I CGCNN), so the
    map is there from the first iteration, labeled or not. None when the generator has no latent
    space or the iteration has no candidates yet.
    """
    from tasks.generate import load_registered_generator

    found = lake.query(
        "SELECT s.*, coalesce(c.dft_k, c.fam_k, c.gnn_k) AS k_vrh FROM candidates c JOIN structures s "
        "USING (structure_id) WHERE c.iteration = ? AND coalesce(c.dft_k, c.fam_k, c.gnn_k) IS NOT NULL "
        "ORDER BY c.dft_k IS NULL, c.fam_k IS NULL, structure_id",
        [iteration],
    ).to_pylist()
    new = list({r["structure_id"]: r for r in reversed(found)}.values())  # one point per structure, best K kept
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
