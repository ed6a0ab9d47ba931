"""Stage II (FAM screen) as Prefect work: batched relax + elastic, cached, every outcome recorded.

- :func:`fam_batch` is the compute task: it relaxes and labels a batch of structures with one
  foundation model (batched on the worker's device, :func:`core.fam.fam_outcomes`) and returns
  one :class:`core.fam.FamOutcome` per structure. It is cached on
  its inputs (structure rows, model, settings) and its source, with results persisted in the
  lake, so a rerun recomputes nothing. A structure that breaks the calculator comes back as an
  outcome with an error; it never fails the batch.
- :func:`screen_fam` runs stage II for one iteration: it takes the ``gnn_pass`` candidates,
  computes each distinct structure once (deterministic batches, so reruns hit the cache),
  decides each (structure, target) and writes ``properties`` (method ``fam:<model>``),
  ``jobs`` (one per structure and attempt), ``structures`` (the relaxed cell, source
  ``fam-relaxed``) and the candidates' new rows (``fam_pass`` | ``rejected``).
"""

from __future__ import annotations

import functools
import json
import socket
import time
from collections import Counter
from typing import Any

from prefect.runtime import flow_run

from core.device import device_label, resolve_device
from core.fam import (
    FamOutcome,
    FamSettings,
    FamUnavailableError,
    calculator_device,
    fam_calculator,
    fam_outcomes,
    mace_mp_checkpoint,
    set_torch_threads,
    verdict,
)
from core.provenance import settings_hash
from core.structures import from_row, split_of, to_atoms
from storage.candidates import advance, current
from storage.lake import Lake
from tasks.common import compute_task, in_lake, run_logger
from tasks.gnn_screen import structure_rows

STAGE = "fam"
IN_STATUS = "gnn_pass"
ELASTIC_PROPERTIES = ("k_vrh", "g_vrh", "k_voigt", "k_reuss", "g_voigt", "g_reuss", "eos_k")


@functools.cache
def _loaded(model: str, dtype: str, device: str) -> tuple[Any, str]:
    """One calculator per (model, dtype, device) per worker process: loading a FAM takes seconds."""
    set_torch_threads()
    return fam_calculator(model, device=device, dtype=dtype)


def resolve_model(model: str) -> str:
    """The concrete model ``auto`` stands for here (MACE-MP-0 if its weights can be had, else SevenNet-0).

    Resolved before caching so a cache entry always names the model that produced it.
    """
    if model != "auto":
        return model
    try:
        mace_mp_checkpoint()
        return "mace-mp-0"
    except FamUnavailableError:
        return "sevennet-0"


@compute_task(name="fam-relax-elastic", retries=0)
def fam_batch(rows: list[dict[str, Any]], model: str, settings: FamSettings) -> list[dict[str, Any]]:
    """Relax and compute the elastic tensor of each structure row; one outcome dict per row, in order.

    Each dict holds ``structure_id``, ``outcome`` (FamOutcome as JSON-able dict), ``wall_time_s``
    and ``host``. Failures of single structures are outcomes with ``error_class`` set.
    """
    logger = run_logger()
    calc, model_name = _loaded(model, settings.dtype, str(resolve_device()))
    device = device_label(calculator_device(calc))
    logger.info("stage II: %d structures with %s on %s", len(rows), model_name, device)
    t0 = time.perf_counter()
    outcomes = fam_outcomes([to_atoms(from_row(r)) for r in rows], calc, model_name, settings, progress=logger.info)
    wall = (time.perf_counter() - t0) / max(1, len(rows))  # batched work, shared evenly
    out = []
    for i, (row, outcome) in enumerate(zip(rows, outcomes, strict=True), 1):
        k = outcome.elastic.k_vrh if outcome.elastic else None
        logger.info(
            "fam %d/%d %s %s: %s",
            i,
            len(rows),
            row["structure_id"],
            row.get("reduced_formula"),
            outcome.error or (f"K_vrh {k:.1f} GPa" if k is not None else "no K"),
        )
        out.append(
            {
                "structure_id": row["structure_id"],
                "outcome": outcome.model_dump(mode="json"),
                "wall_time_s": wall,
                "host": socket.gethostname(),
                "device": device,
            }
        )
    return out


def _property_rows(sid: str, outcome: FamOutcome, shash: str, iteration: int) -> list[dict[str, Any]]:
    el = outcome.elastic
    common = {
        "structure_id": sid,
        "method": f"fam:{outcome.model_name}",
        "model_id": outcome.model_name,
        "settings_hash": shash,
        "iteration": iteration,
    }
    rows = []
    if outcome.energy_per_atom is not None:
        rows.append({**common, "name": "energy_per_atom", "value": outcome.energy_per_atom, "unit": "eV/atom"})
    if el is None:
        return rows
    flags = [*el.flags, *(["g_indicative_only"] if outcome.model_name == "sevennet-0" else [])]
    for name in ELASTIC_PROPERTIES:
        value = getattr(el, name)
        if value is not None:
            rows.append({**common, "name": name, "value": value, "unit": "GPa", "flags": flags})
    if el.c_voigt is not None:
        extras = {
            "c_voigt": el.c_voigt,
            "born_stable": el.born_stable,
            "min_eigenvalue": el.min_eigenvalue,
            "residual_stress": el.residual_stress,
            "fit_rmse": el.fit_rmse,
            "missing": el.missing,
        }
        rows.append(
            {
                **common,
                "name": "elastic_tensor",
                "value_json": json.dumps(extras),
                "unit": "GPa",
                "value": el.min_eigenvalue,
                "flags": flags,
            }
        )
    return rows


def _job_row(sid: str, result: dict[str, Any], settings: FamSettings, shash: str) -> dict[str, Any]:
    outcome = FamOutcome.model_validate(result["outcome"])
    failed = outcome.error is not None
    return {
        "job_id": f"fam-{outcome.model_name}-{sid}-{shash}",
        "structure_id": sid,
        "stage": STAGE,
        "calculation": "relax+elastic",
        "inputs_hash": sid,
        "settings_json": settings.model_dump_json(),
        "settings_hash": shash,
        "attempt": 1,
        "state": "failed" if failed else "completed",
        "error_class": outcome.error_class,
        "error_message": outcome.error,
        "wall_time_s": result["wall_time_s"],
        "host": result["host"],
        "device": result.get("device"),
    }


def screen_fam(
    lake_url: str,
    iteration: int,
    tolerance: float = 0.20,
    model: str = "auto",
    settings: FamSettings | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Stage II for one iteration: ``gnn_pass`` -> ``fam_pass`` | ``rejected``. Returns counts.

    Only candidates still at ``gnn_pass`` are touched, so a rerun resumes. Returns
    ``{"iteration", "model", "screened", "passed", "rejected", "errors", "reasons"}``.
    """
    if tolerance <= 0 or batch_size < 1:
        raise ValueError("tolerance must be positive and batch_size at least 1")
    settings = settings or FamSettings()
    logger = run_logger()
    lake = Lake(lake_url)
    todo = current(lake, iteration, status=IN_STATUS)
    model = resolve_model(model)
    counts: dict[str, Any] = {
        "iteration": iteration,
        "model": model,
        "screened": len(todo),
        "passed": 0,
        "rejected": 0,
        "errors": 0,
        "reasons": {},
    }
    if not todo:
        logger.info("iteration %d: no %s candidates for stage II", iteration, IN_STATUS)
        return counts
    ids = sorted({c["structure_id"] for c in todo})
    rows = {r["structure_id"]: r for r in structure_rows(lake, ids)}  # raises LookupError naming missing ids
    shash = settings_hash({"model": model, "settings": settings})
    run = flow_run.get_id()
    run_id = str(run) if run else None
    task = in_lake(fam_batch, lake_url)
    reasons: Counter[str] = Counter()
    logger.info(
        "iteration %d stage II: %d structures (%d candidates) with %s in batches of %d",
        iteration,
        len(ids),
        len(todo),
        model,
        batch_size,
    )
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        results = {r["structure_id"]: r for r in task([_structure_cols(rows[s]) for s in chunk], model, settings)}
        outcomes = {sid: FamOutcome.model_validate(r["outcome"]) for sid, r in results.items()}
        # append_new: a rerun after a kill gets the batch from the cache and would write its rows twice
        lake.append_new("jobs", [_job_row(sid, results[sid], settings, shash) for sid in chunk], run_id=run_id)
        lake.append_new(
            "properties",
            [p for sid in chunk for p in _property_rows(sid, outcomes[sid], shash, iteration)],
            run_id=run_id,
        )
        lake.append_new(
            "structures",
            [
                {
                    **o.relaxed,
                    "source": "fam-relaxed",
                    "source_id": f"fam:{o.model_name}",
                    "parent_ids": [sid],
                    "split": split_of(o.relaxed["structure_id"]),
                }
                for sid, o in outcomes.items()
                if o.relaxed is not None
            ],
            run_id=run_id,
        )
        updates = []
        for cand in (c for c in todo if c["structure_id"] in results):
            o = outcomes[cand["structure_id"]]
            decision, reason = verdict(o, cand["target"], tolerance)
            counts[{"pass": "passed", "reject": "rejected", "error": "errors"}[decision]] += 1
            reasons[decision if decision == "pass" else reason.split(" (")[0].split(":")[0]] += 1
            updates.append(
                {
                    "iteration": iteration,
                    "structure_id": cand["structure_id"],
                    "target": cand["target"],
                    "fam_model": o.model_name,
                    "fam_k": o.elastic.k_vrh if o.elastic else None,
                    "fam_verdict": decision,
                    "fam_reason": reason,
                    "status": "fam_pass" if decision == "pass" else "rejected",
                }
            )
        advance(lake, updates, stage=STAGE, run_id=run_id)
        logger.info(
            "stage II: %d/%d structures done (%d passed so far)",
            min(start + batch_size, len(ids)),
            len(ids),
            counts["passed"],
        )
    counts["reasons"] = dict(reasons)
    logger.info("iteration %d stage II: %s", iteration, counts)
    return counts


_STRUCTURE_COLS = ("structure_id", "reduced_formula", "lattice", "species", "frac_coords")


def _structure_cols(row: dict[str, Any]) -> dict[str, Any]:
    """Only what defines the structure, so the task's cache key ignores provenance columns."""
    return {k: row[k] for k in _STRUCTURE_COLS}
