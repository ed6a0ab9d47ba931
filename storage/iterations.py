"""The ``iterations`` rows of one iteration, per target: funnel counts, MAPEs, DFT K statistics, generation quality."""

from __future__ import annotations

import json

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
