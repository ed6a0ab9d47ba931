"""Stage I of the screen: CGCNN predicts K_vrh for generated candidates and the cheap filters run.

``screen_gnn`` moves the candidates of an iteration with status ``generated`` to ``gnn_pass`` or
``rejected``, in this order of checks:

1. single-element structures are rejected (the search is for alloys);
2. candidates whose predicted K is more than ``tolerance`` (relative) off their target are rejected;
3. of the rest, duplicates (core.dedup) of any structure already in the lake, or of a candidate
   earlier in the batch, are rejected; the batch is ordered by relative error, so of two equal
   structures the one closer to its target survives.

Every prediction lands in ``properties`` (name ``k_vrh``, method ``cgcnn@<model id>``, the ensemble
spread as ``uncertainty``) and every verdict, with its reason, in ``candidates``. Prediction is a
cached task (keyed on the model id and the structure ids, which name the structures' content), so
a rerun after a crash predicts nothing twice; the candidates already advanced are not touched.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from prefect.runtime import flow_run

from core.dedup import find_duplicates
from core.structures import from_row
from storage.candidates import advance, current
from storage.lake import Lake
from storage.registry import resolve_model
from tasks.common import compute_task, in_lake, run_logger
from tasks.train import PREDICTOR_KIND, load_predictor

STAGE = "gnn"
OUTCOMES = ("passed", "single_element", "off_target", "duplicate_known", "duplicate_batch")
_STRUCTURE_COLUMNS = "structure_id, lattice, species, frac_coords, elements, nelements, reduced_formula"


def structure_rows(lake: Lake, structure_ids: Sequence[str]) -> list[dict[str, Any]]:
    """``structures`` rows for these ids, in the given order; a clear error names any missing id."""
    rows = lake.query(
        f"SELECT {_STRUCTURE_COLUMNS} FROM structures WHERE structure_id IN (SELECT unnest(?::VARCHAR[]))",
        [list(structure_ids)],
    ).to_pylist()
    by_id = {r["structure_id"]: r for r in rows}
    missing = [s for s in structure_ids if s not in by_id]
    if missing:
        raise LookupError(f"{len(missing)} structure(s) not in the lake's structures table, e.g. {missing[:3]}")
    return [by_id[s] for s in structure_ids]


@compute_task(name="cgcnn-predict", retries=0)
def predict_k(lake_url: str, model_id: str, structure_ids: list[str]) -> list[dict[str, Any]]:
    """Ensemble K_vrh (GPa) with its spread, and member values, for structures in the lake."""
    _, ensemble = load_predictor(Lake(lake_url), model_id)
    rows = structure_rows(Lake(lake_url), structure_ids)
    pred = ensemble.predict_rows(rows)
    return [
        {
            "structure_id": sid,
            "k_vrh": float(pred.k_vrh[i]),
            "k_vrh_std": float(pred.k_vrh_std[i]),
            "log10_k": float(pred.log10_k[i]),
            "log10_k_std": float(pred.log10_k_std[i]),
            "members_gpa": [float(10.0**v) for v in pred.members_log10[:, i]],
        }
        for i, sid in enumerate(structure_ids)
    ]


def _known_rows(lake: Lake, batch_ids: Sequence[str], formulas: Sequence[str], iteration: int) -> list[dict[str, Any]]:
    """Lake structures a candidate may duplicate: same reduced formula, and not merely this batch itself.

    A batch id counts as known when it also came from somewhere else: a non-generated source, a
    candidate of another iteration, or a candidate of this iteration that already passed this stage.
    """
    return lake.query(
        f"""
        WITH batch AS (SELECT unnest(?::VARCHAR[]) AS structure_id),
        seen AS (
            SELECT structure_id FROM structures_history WHERE source <> 'generated'
            UNION SELECT structure_id FROM candidates WHERE iteration <> ?
            UNION SELECT structure_id FROM candidates WHERE iteration = ? AND status NOT IN ('generated', 'rejected')
        )
        SELECT {_STRUCTURE_COLUMNS} FROM structures
        WHERE reduced_formula IN (SELECT unnest(?::VARCHAR[]))
          AND (structure_id NOT IN (SELECT structure_id FROM batch) OR structure_id IN (SELECT structure_id FROM seen))
        ORDER BY structure_id
        """,
        [list(batch_ids), iteration, iteration, list(formulas)],
    ).to_pylist()


def _run_id() -> str | None:
    run = flow_run.get_id()
    return str(run) if run else None


def verdicts(
    todo: Sequence[Mapping[str, Any]],
    rows: Mapping[str, Mapping[str, Any]],
    predictions: Mapping[str, Mapping[str, Any]],
    known: Sequence[Mapping[str, Any]],
    tolerance: float,
    model_id: str,
) -> list[tuple[dict[str, Any], str]]:
    """Per candidate, its stage I update and its outcome (one of ``OUTCOMES``), in the order of ``todo``.

    See the module docstring for the order of the checks.
    """
    updates: dict[int, dict[str, Any]] = {}
    outcomes: dict[int, str] = {}
    survivors: list[tuple[float, int]] = []
    for n, cand in enumerate(todo):
        sid, target = cand["structure_id"], float(cand["target"])
        p = predictions[sid]
        rel = abs(p["k_vrh"] - target) / target
        base = {
            "iteration": cand["iteration"],
            "structure_id": sid,
            "target": target,
            "gnn_k": p["k_vrh"],
            "gnn_k_std": p["k_vrh_std"],
            "gnn_model_id": model_id,
        }
        k_text = f"K {p['k_vrh']:.0f}±{p['k_vrh_std']:.0f} GPa"
        if rows[sid]["nelements"] < 2:
            updates[n] = {**base, "gnn_reason": f"single-element structure ({rows[sid]['elements'][0]})"}
            outcomes[n] = "single_element"
        elif rel > tolerance:
            updates[n] = {
                **base,
                "gnn_reason": f"{k_text} is {rel:.0%} off target {target:.0f} GPa (tolerance {tolerance:.0%})",
            }
            outcomes[n] = "off_target"
        else:
            updates[n] = {**base, "gnn_reason": f"{k_text} within {rel:.0%} of target {target:.0f} GPa"}
            outcomes[n] = "passed"
            survivors.append((rel, n))
    survivors.sort()
    batch = [(todo[n]["structure_id"], from_row(rows[todo[n]["structure_id"]])) for _, n in survivors]
    duplicates = find_duplicates(batch, [(r["structure_id"], from_row(r)) for r in known])
    for k, dup in duplicates.items():
        n = survivors[k][1]
        updates[n]["gnn_reason"] = dup.reason
        outcomes[n] = "duplicate_known" if dup.known else "duplicate_batch"
    for n, update in updates.items():
        passed = outcomes[n] == "passed"
        update.update(gnn_verdict="pass" if passed else "reject", status="gnn_pass" if passed else "rejected")
    return [(updates[n], outcomes[n]) for n in range(len(todo))]


def screen_gnn(lake_url: str, iteration: int, tolerance: float = 0.30, model_id: str | None = None) -> dict:
    """Stage I for one iteration: predict, filter, deduplicate, record. Returns counts per outcome.

    ``model_id`` None uses the latest registered CGCNN. Returns ``{"iteration", "model_id",
    "screened", "passed", "rejected", "single_element", "off_target", "duplicate_known",
    "duplicate_batch"}``.
    """
    if tolerance <= 0:
        raise ValueError(f"tolerance must be positive, got {tolerance}")
    logger = run_logger()
    lake = Lake(lake_url)
    record = resolve_model(lake, PREDICTOR_KIND, model_id)
    todo = current(lake, iteration, status="generated")
    counts: dict[str, Any] = {"iteration": iteration, "model_id": record.model_id, "screened": len(todo)}
    counts.update(dict.fromkeys(("rejected", *OUTCOMES), 0))
    if not todo:
        logger.info("iteration %d: no generated candidates to screen", iteration)
        return counts

    ids = sorted({c["structure_id"] for c in todo})
    rows = {r["structure_id"]: r for r in structure_rows(lake, ids)}
    logger.info("iteration %d: predicting K for %d structures (%d candidates)", iteration, len(ids), len(todo))
    predictions = {p["structure_id"]: p for p in in_lake(predict_k, lake_url)(lake_url, record.model_id, ids)}
    run_id = _run_id()
    lake.append_new(  # a rerun after a kill gets the predictions from the cache: write each row once
        "properties",
        [
            {
                "structure_id": sid,
                "name": "k_vrh",
                "value": p["k_vrh"],
                "unit": "GPa",
                "uncertainty": p["k_vrh_std"],
                "value_json": json.dumps({k: p[k] for k in ("log10_k", "log10_k_std", "members_gpa")}),
                "method": f"cgcnn@{record.model_id}",
                "model_id": record.model_id,
                "settings_hash": record.settings_hash,
                "iteration": iteration,
            }
            for sid, p in predictions.items()
        ],
        run_id=run_id,
    )

    known = _known_rows(lake, ids, sorted({r["reduced_formula"] for r in rows.values()}), iteration)
    decided = verdicts(todo, rows, predictions, known, tolerance, record.model_id)
    advance(lake, [update for update, _ in decided], stage=STAGE, run_id=run_id)
    tally = Counter(outcome for _, outcome in decided)
    counts.update(tally)
    counts["rejected"] = len(decided) - tally["passed"]
    logger.info("iteration %d stage I: %s", iteration, counts)
    return counts
