"""Generation's unit of work: sample and keep candidates for one target, cached; and the model loaders it uses.

Sampling is cached on (lake, model id, target, counts, seed, task source): a rerun of a finished
generate step samples nothing. Writing the kept candidates is ``storage.candidates.record_generated``.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from pymatgen.core import Structure

from core.cgcnn import Ensemble
from core.costs import measured
from core.device import device_label
from core.generator import Generator, generate, load_generator
from core.metrics import mape, validity
from core.structures import from_row, to_row
from storage.lake import Lake
from storage.queries import labeled_k_vrh
from storage.registry import GENERATOR_KIND, ModelNotFoundError, checkpoint_path, resolve_model
from tasks.common import compute_task, run_logger

STAGE = "generate"


@functools.lru_cache(maxsize=4)
def _load(path: Path, mtime: float) -> Generator:
    return load_generator(path)


def load_registered_generator(lake_url: str, model_id: str | None = None) -> tuple[str, Generator]:
    """The registered generator ``model_id`` (latest when None) and its loaded model (kept in memory)."""
    lake = Lake(lake_url)
    record = resolve_model(lake, GENERATOR_KIND, model_id)
    path = checkpoint_path(lake, record)
    return record.model_id, _load(path, path.stat().st_mtime)


def derive_seed(seed: int, target: float) -> int:
    """A per-target seed, so each target's samples are reproducible on their own."""
    return int(hashlib.sha256(f"{seed}:{target:.6g}".encode()).hexdigest()[:8], 16)


@functools.lru_cache(maxsize=2)
def _grader(path: Path, mtime: float) -> tuple[str, Ensemble]:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return f"cgcnn-file:{digest}", Ensemble.load(path)


def load_grader(path: str) -> tuple[str, Ensemble]:
    """The CGCNN ensemble at ``path`` (a frozen grader, or a ranker) and its id (hash of the checkpoint file)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"grader checkpoint {file} does not exist")
    return _grader(file, file.stat().st_mtime)


def cgcnn_k(path: str) -> Callable[[list[Structure]], np.ndarray]:
    """K_vrh (GPa) of structures by the CGCNN checkpoint at ``path`` (a ranker or a grader)."""
    _, ensemble = load_grader(path)
    return lambda structures: np.asarray(ensemble.predict_rows([to_row(s) for s in structures]).k_vrh, dtype=float)


@compute_task(name="sample-candidates", retries=0)
def sample_candidates(
    lake_url: str,
    model_id: str,
    target: float,
    n_kept: int,
    samples_per_kept: int,
    seed: int,
    grader: str | None = None,
    ranker: str = "head",
    conditions: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Sample ``n_kept * samples_per_kept`` crystals at ``target`` GPa and keep the best ``n_kept`` by ``ranker``.

    ``conditions`` asks a generator conditioned on several moduli for more than K (``{"k_vrh": target,
    "g_vrh": ...}``, from a design's G or G/K window); None asks for K alone.

    ``ranker`` is "head" (the generator's property head on each re-encoded sample: it tracks independent
    graders, Spearman 0.8-0.9 in benchmarks/generator.py) or the path of a CGCNN checkpoint (another
    model; not the stage-I predictor, which would make stage I a no-op).

    Returns ``kept`` (structure rows with the head's ``score``) and the batch's ``generations`` row: counts,
    validity and single-element share of all samples, the property head's MAPE on all samples and on
    the kept ones, and, with a ``grader`` checkpoint (a frozen CGCNN, never the ranker), its MAPE on both
    and every raw sample's K for the distribution plots; and what the sampling cost (``core.costs``) on which device.
    """
    logger = run_logger()
    _, generator = load_registered_generator(lake_url, model_id)
    device = device_label(generator.device)
    with measured(device) as cost:
        stats, rows = _sample(generator, target, n_kept, samples_per_kept, seed, grader, ranker, conditions)
    stats["generator_model_id"] = model_id
    logger.info("target %.0f GPa: %s", target, {k: v for k, v in stats.items() if not k.endswith("_json")})
    return {"kept": rows, "stats": stats, "cost": asdict(cost), "device": device}


def _sample(
    generator: Generator,
    target: float,
    n_kept: int,
    samples_per_kept: int,
    seed: int,
    grader: str | None,
    ranker: str,
    conditions: dict[str, float] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The sampling and grading of ``sample_candidates``: the generations row's statistics and the kept rows."""
    rank = None if ranker == "head" else cgcnn_k(ranker)
    asked: float | dict[str, float] = {**conditions, "k_vrh": target} if conditions else target
    step = generate(generator, [asked], n_kept, samples_per_kept, derive_seed(seed, target), rank)
    batch, kept, kept_index, head_scores = step.samples, step.kept, step.kept_index, step.samples.scores
    stats: dict[str, Any] = {
        "target": target,
        "n_sampled": len(batch),
        "n_drawn": batch.draws if batch.draws is not None else len(batch),
        "n_kept": len(kept),
        "validity": validity(batch.structures),
        "single_element": float(np.mean([len(s.composition.elements) == 1 for s in batch.structures])),
        "ranker": ranker,
        "mape_head_raw": mape(head_scores, target),
        "mape_head_kept": mape(head_scores[kept_index], target),
        "k_head_raw_json": json.dumps([round(float(k), 2) for k in head_scores]),
    }
    if isinstance(asked, dict) and "g_vrh" in asked and batch.property_scores and "g_vrh" in batch.property_scores:
        g_head = batch.property_scores["g_vrh"]
        stats |= {
            "conditions_json": json.dumps(asked, sort_keys=True),
            "mape_head_g_raw": mape(g_head, asked["g_vrh"]),
            "mape_head_g_kept": mape(g_head[kept_index], asked["g_vrh"]),
        }
    if grader:
        grader_id, _ = load_grader(grader)
        graded = cgcnn_k(grader)(batch.structures)
        stats |= {
            "grader_id": grader_id,
            "mape_grader_raw": mape(graded, target),
            "mape_grader_kept": mape(np.asarray(graded)[kept_index], target),
            "k_grader_raw_json": json.dumps([round(float(k), 2) for k in graded]),
        }
    rows = [{**to_row(s), "score": float(sc)} for s, sc in zip(kept.structures, kept.scores, strict=True)]
    return stats, rows


def latent_snapshot(
    lake: Lake, iteration: int, max_reference: int = 600
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(latents, is_new, K) of training structures and this iteration's candidates, for the t-SNE map.

    The candidates are drawn with their best-known K (DFT, else FAM, else the stage-I CGCNN), so the
    map is there from the first iteration, labeled or not. None when the generator has no latent
    space or the iteration has no candidates yet.
    """
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
    rows = labeled_k_vrh(lake, split="train", labels_before=iteration).to_pylist()[:max_reference] + new
    try:
        z = generator.latents([from_row(r) for r in rows])
    except NotImplementedError:  # a generator without an encoder has no map to draw
        return None
    is_new = np.array([False] * (len(rows) - len(new)) + [True] * len(new))
    return z, is_new, np.array([r["k_vrh"] for r in rows], dtype=float)
