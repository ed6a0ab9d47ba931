"""Generation tasks: sample and keep candidates for one target (cached), and write them to the lake.

Sampling is cached on (lake, model id, target, counts, seed, task source): a rerun of a finished
generate step samples nothing. Writing is a separate task, and the flow calls it only for
targets that have no candidates yet in the iteration, so a rerun never moves a candidate that a
later stage advanced back to "generated".
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

from prefect import task

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


@compute_task(name="sample-candidates", retries=0)
def sample_candidates(
    lake_url: str, model_id: str, target: float, n_kept: int, samples_per_kept: int, seed: int
) -> dict[str, Any]:
    """Sample ``n_kept * samples_per_kept`` crystals at ``target`` GPa and keep the best ``n_kept``.

    Returns ``kept`` (structure rows with ``score``) and batch statistics (samples, validity of all
    samples, property-head MAPE of the kept ones) for the flow's summary.
    """
    logger = run_logger()
    _, generator = load_registered_generator(lake_url, model_id)
    batch = generator.sample([target], n_kept * samples_per_kept, derive_seed(seed, target))
    kept = keep_best(batch, n_kept)
    stats = {
        "target": target,
        "n_sampled": len(batch),
        "validity": validity(batch.structures),
        "n_kept": len(kept),
        "head_mape_kept": mape(kept.scores, target),
        "head_mape_all": mape(batch.scores, target),
    }
    logger.info("target %.0f GPa: %s", target, stats)
    rows = [{**to_row(s), "score": float(sc)} for s, sc in zip(kept.structures, kept.scores, strict=True)]
    return {"kept": rows, "stats": stats}


@task(name="write-candidates", retries=2, retry_delay_seconds=5)
def write_candidates(
    lake_url: str, iteration: int, model_id: str, target: float, kept: list[dict[str, Any]], run_id: str | None = None
) -> int:
    """Append the kept structures to ``structures`` (new ids only) and their candidate rows; returns candidates."""
    if not kept:
        return 0
    lake = Lake(lake_url)
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
