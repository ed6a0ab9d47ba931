"""Advancing candidates through the funnel without rewriting a row.

Each stage appends a new full row per candidate, carrying the earlier stages' fields forward;
the ``candidates`` view shows the newest row per (iteration, structure_id, target). :class:`Status` is the one
definition of the funnel's states: ``generated`` -> ``gnn_pass`` (stage I) -> ``fam_pass`` (stage II) ->
``labeled`` (stage III); stage I or II may end a candidate ``rejected``, stage III ``failed``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any, Protocol

from core.acquisition import Choice
from core.targets import label_tolerance, stage_checks, stage_values
from storage.lake import Lake
from storage.rows import structure_row
from storage.schemas import CANDIDATES

_KEY = ("iteration", "structure_id", "target")


class Status(StrEnum):
    """Where a candidate is in the funnel (``candidates.status``)."""

    GENERATED = "generated"
    GNN_PASS = "gnn_pass"
    FAM_PASS = "fam_pass"
    LABELED = "labeled"
    REJECTED = "rejected"
    FAILED = "failed"


TERMINAL = frozenset({Status.REJECTED, Status.FAILED, Status.LABELED})
"""States no stage moves a candidate out of."""


class LabelResult(Protocol):
    """What stage III decided for one structure (``core.labeling.StructureOutcome``)."""

    verdict: str
    reason: str | None
    k_vrh: float | None
    g_vrh: float | None
    born_stable: bool | None
    method: str | None


def current(lake: Lake, iteration: int, status: str | None = None) -> list[dict[str, Any]]:
    """The current candidate rows of an iteration, optionally only those with ``status``."""
    where = "iteration = ?" + (" AND status = ?" if status else "")
    params = [iteration, str(status)] if status else [iteration]
    return lake.query(f"SELECT * FROM candidates WHERE {where} ORDER BY target, structure_id", params).to_pylist()


def n_open(lake: Lake, iteration: int | None = None) -> int:
    """How many current candidates (of one iteration, or of all) no stage has finished with (status not in
    ``TERMINAL``): after a completed loop, zero."""
    where = "status NOT IN (SELECT unnest(?))" + (" AND iteration = ?" if iteration is not None else "")
    params = [sorted(TERMINAL)] + ([iteration] if iteration is not None else [])
    return int(lake.query(f"SELECT count(*) FROM candidates WHERE {where}", params).column(0)[0].as_py())


def advance(lake: Lake, updates: Sequence[Mapping[str, Any]], *, stage: str, run_id: str | None = None) -> int:
    """Append a new row per update, merged over the candidate's current row. Returns rows written."""
    if not updates:
        return 0
    iterations = sorted({int(u["iteration"]) for u in updates})
    existing: dict[tuple, dict[str, Any]] = {}
    for it in iterations:
        for row in current(lake, it):
            existing[tuple(row[k] for k in _KEY)] = row
    rows = []
    for update in updates:
        key = tuple(update[k] for k in _KEY)
        merged = {name: None for name in CANDIDATES.names}
        merged.update({k: v for k, v in existing.get(key, {}).items() if k in merged})
        merged.update(update)
        merged.update(stage=stage, run_id=None, code_version=None, created_at=None)
        rows.append(merged)
    return lake.append("candidates", rows, run_id=run_id)


def record_label(
    lake: Lake, iteration: int, candidates: Sequence[Mapping[str, Any]], outcome: LabelResult, run_id: str | None
) -> int:
    """Advance every candidate row of one structure (one per target) to its stage-III outcome, with the label's
    verdict on each of the candidate's conditions (``core.targets.label_tolerance``)."""
    values = stage_values(outcome.k_vrh, outcome.g_vrh, outcome.born_stable)
    return advance(
        lake,
        [
            {
                "iteration": iteration,
                "structure_id": c["structure_id"],
                "target": c["target"],
                "dft_method": outcome.method,
                "dft_k": outcome.k_vrh,
                "dft_verdict": outcome.verdict,
                "dft_reason": outcome.reason,
                "status": Status(outcome.verdict),
                **(
                    {"conditions_json": stage_checks(c, "label", values, label_tolerance(c))[0]}
                    if outcome.k_vrh is not None
                    else {}
                ),
            }
            for c in candidates
        ],
        stage="label",
        run_id=run_id,
    )


def record_acquisition(
    lake: Lake,
    iteration: int,
    by_structure: Mapping[str, Sequence[Mapping[str, Any]]],
    choices: Sequence[Choice],
    policy: str,
    run_id: str | None,
) -> int:
    """Write each survivor's acquisition score and note (status unchanged; ``stage`` ``acquire``, the label stage's
    first step); rows already saying so are skipped, so a rerun writes nothing new."""
    updates = [
        {
            "iteration": iteration,
            "structure_id": c["structure_id"],
            "target": c["target"],
            "acquisition_policy": policy,
            "acquisition_score": choice.score,
            "acquisition_note": choice.note or None,
        }
        for choice in choices
        for c in by_structure[choice.structure_id]
        if (c.get("acquisition_policy"), c.get("acquisition_score"), c.get("acquisition_note"))
        != (policy, choice.score, choice.note or None)
    ]
    return advance(lake, updates, stage="acquire", run_id=run_id)


def record_generated(
    lake: Lake,
    iteration: int,
    model_id: str,
    target: float,
    kept: list[dict[str, Any]],
    run_id: str | None = None,
    stats: dict[str, Any] | None = None,
    design: str | None = None,
) -> int:
    """Append one target's ``generations`` row, then the kept structures (new ids only) and their candidate rows.

    The flow calls this only for targets without candidates in the iteration, so a rerun never moves a
    candidate that a later stage advanced back to ``generated``.

    The statistics go first: the flow treats a target with candidates as done, and a rerun after a crash
    between the writes finds the same statistics row already current and writes no twin, so nothing is
    lost and nothing doubles.
    """
    if stats:
        lake.append_new("generations", [{**stats, "iteration": iteration}], run_id=run_id)  # a rerun writes no twin
    if not kept:
        return 0
    ids = [r["structure_id"] for r in kept]
    # a kept crystal that is already in the lake (e.g. a training structure) keeps its original row
    known = lake.query("SELECT structure_id FROM structures WHERE list_contains(?, structure_id)", [ids])
    known_ids = set(known.column("structure_id").to_pylist())
    new_rows = [
        structure_row(
            {k: v for k, v in r.items() if k != "score"}, "generated", f"{model_id}/it{iteration}/k{target:g}/{i}"
        )
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
            "design": design,
            "status": Status.GENERATED,
        }
        for r in kept
    ]
    return advance(lake, updates, stage="generate", run_id=run_id)
