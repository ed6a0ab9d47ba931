"""Generation tasks: sample and keep candidates for one target (cached), and write them to the lake.

Sampling is cached on (lake, model id, target, counts, seed, task source): a rerun of a finished
generate step samples nothing. Writing is a separate task, and the flow calls it only for
targets that have no candidates yet in the iteration, so a rerun never moves a candidate that a
later stage advanced back to "generated".
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task

from core.cgcnn import Ensemble
from core.generator import Generator, keep_best, load_generator
from core.metrics import mape, validity
from core.structures import split_of, to_row
from storage.candidates import advance
from storage.lake import Lake
from storage.registry import checkpoint_path, resolve_model
from tasks.common import compute_task, run_logger
from tasks.train_generator import GENERATOR_KIND

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
) -> dict[str, Any]:
    """Sample ``n_kept * samples_per_kept`` crystals at ``target`` GPa and keep the best ``n_kept`` by ``ranker``.

    ``ranker`` is "head" (the generator's property head on each re-encoded sample: it tracks independent
    graders, Spearman 0.8-0.9 in benchmarks/generator.py) or the path of a CGCNN checkpoint (another
    model; not the stage-I predictor, which would make stage I a no-op).

    Returns ``kept`` (structure rows with the head's ``score``) and the batch's ``generations`` row: counts,
    validity and single-element share of all samples, the property head's MAPE on all samples and on
    the kept ones, and, with a ``grader`` checkpoint (a frozen CGCNN, never the ranker), its MAPE on both
    and every raw sample's K for the distribution plots.
    """
    logger = run_logger()
    _, generator = load_registered_generator(lake_url, model_id)
    batch = generator.sample([target], n_kept * samples_per_kept, derive_seed(seed, target))
    head_scores = batch.scores
    if ranker != "head":
        _, ranking = load_grader(ranker)
        k = ranking.predict_rows([to_row(s) for s in batch.structures]).k_vrh
        batch = dataclasses.replace(batch, scores=np.asarray(k, dtype=float))  # validity and decoders stay
    kept, kept_index = keep_best(batch, n_kept, with_index=True)
    stats: dict[str, Any] = {
        "target": target,
        "generator_model_id": model_id,
        "n_sampled": len(batch),
        "n_kept": len(kept),
        "validity": validity(batch.structures),
        "single_element": float(np.mean([len(s.composition.elements) == 1 for s in batch.structures])),
        "ranker": ranker,
        "mape_head_raw": mape(head_scores, target),
        "mape_head_kept": mape(head_scores[kept_index], target),
        "k_head_raw_json": json.dumps([round(float(k), 2) for k in head_scores]),
    }
    if grader:
        grader_id, ensemble = load_grader(grader)
        graded = ensemble.predict_rows([to_row(s) for s in batch.structures]).k_vrh
        stats |= {
            "grader_id": grader_id,
            "mape_grader_raw": mape(graded, target),
            "mape_grader_kept": mape(ensemble.predict_rows([to_row(s) for s in kept.structures]).k_vrh, target),
            "k_grader_raw_json": json.dumps([round(float(k), 2) for k in graded]),
        }
    logger.info("target %.0f GPa: %s", target, {k: v for k, v in stats.items() if not k.endswith("_json")})
    rows = [{**to_row(s), "score": float(sc)} for s, sc in zip(kept.structures, head_scores[kept_index], strict=True)]
    return {"kept": rows, "stats": stats}


@task(name="write-candidates", retries=2, retry_delay_seconds=5)
def write_candidates(
    lake_url: str,
    iteration: int,
    model_id: str,
    target: float,
    kept: list[dict[str, Any]],
    run_id: str | None = None,
    stats: dict[str, Any] | None = None,
) -> int:
    """Append the batch's ``generations`` row, then the kept structures (new ids only) and their candidate rows.

    The statistics go first: the flow treats a target with candidates as done, and a rerun after a crash
    between the writes finds the same statistics row already current and writes no twin, so nothing is
    lost and nothing doubles.
    """
    lake = Lake(lake_url)
    if stats:
        lake.append_new("generations", [{**stats, "iteration": iteration}], run_id=run_id)  # a rerun writes no twin
    if not kept:
        return 0
    ids = [r["structure_id"] for r in kept]
    # a kept crystal that is already in the lake (e.g. a training structure) keeps its original row
    known = lake.query("SELECT structure_id FROM structures WHERE list_contains(?, structure_id)", [ids])
    known_ids = set(known.column("structure_id").to_pylist())
    new_rows = [
        {
            **{k: v for k, v in r.items() if k != "score"},
            "source": "generated",
            "parent_ids": [],
            "source_id": f"{model_id}/it{iteration}/k{target:g}/{i}",
            "split": split_of(r["structure_id"]),
        }
        for i, r in enumerate(kept)
        if r["structure_id"] not in known_ids
    ]
    lake.append("structures", new_rows, run_id=run_id)
    updates = [
        {
            "iteration": iteration,
            "structure_id": r["structure_id"],
            "target": float(target),
            "generator_model_id": model_id,
            "generator_score": float(r["score"]),
            "status": "generated",
        }
        for r in kept
    ]
    return advance(lake, updates, stage=STAGE, run_id=run_id)
