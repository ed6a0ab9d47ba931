"""Advancing candidates through the funnel without rewriting a row.

Each stage appends a new full row per candidate, carrying the earlier stages' fields forward;
the ``candidates`` view shows the newest row per (iteration, structure_id, target).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from storage.lake import Lake
from storage.schemas import CANDIDATES

_KEY = ("iteration", "structure_id", "target")
TERMINAL = frozenset({"rejected", "failed", "labeled"})


def current(lake: Lake, iteration: int, status: str | None = None) -> list[dict[str, Any]]:
    """The current candidate rows of an iteration, optionally only those with ``status``."""
    where = "iteration = ?" + (" AND status = ?" if status else "")
    params = [iteration, status] if status else [iteration]
    return lake.query(f"SELECT * FROM candidates WHERE {where} ORDER BY target, structure_id", params).to_pylist()


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
