"""Stage III's decisions: what labeling one structure produced (which survivors are labeled: ``core.acquisition``).

Pure (no Prefect, no lake): the label flow gathers the jobs' results and records what these functions
decide. A tensor is fitted only from a complete strain set, so a structure with a missing point is
``failed`` with the missing labels and their errors in its reason, never labeled from a partial set.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, Field

from core.elastic import ElasticResult
from core.failures import as_failure


class StructureOutcome(BaseModel):
    """What labeling one structure produced (the label flow's return value, one per structure)."""

    structure_id: str
    verdict: Literal["labeled", "failed"]
    reason: str | None = None
    k_vrh: float | None = None
    g_vrh: float | None = None
    born_stable: bool | None = None
    method: str | None = None
    relaxed_id: str | None = None
    missing: list[str] = Field(default_factory=list)


def failure_text(exc: BaseException, max_attempts: int) -> str:
    """``<class> after N attempts: <message>`` (or ``at once`` for a class that is never retried)."""
    failure = as_failure(exc)
    when = f"after {max_attempts} attempts" if failure.transient and max_attempts > 1 else "at once"
    return f"{failure.failure.value} {when}: {failure.message}"


def failed_outcome(structure_id: str, reason: str) -> StructureOutcome:
    """A structure that could not be labeled at all (its relaxation failed, its input is missing)."""
    return StructureOutcome(structure_id=structure_id, verdict="failed", reason=reason)


def dft_outcome(
    structure_id: str, relaxed_id: str, method: str, result: ElasticResult, errors: Mapping[str, str]
) -> StructureOutcome:
    """Labeled when the complete strain set gave a K_vrh; failed (with why) when a point is missing or C is singular."""
    common = {"structure_id": structure_id, "method": method, "relaxed_id": relaxed_id}
    if result.missing:
        reason = "missing points (no fit from a partial set): " + "; ".join(
            f"{label}: {errors.get(label, 'no usable result')}" for label in result.missing
        )
        return StructureOutcome(**common, verdict="failed", reason=reason, missing=result.missing)
    if result.k_vrh is None:
        return StructureOutcome(
            **common, verdict="failed", reason="elastic matrix is singular: no Reuss bound, no K_vrh"
        )
    return StructureOutcome(
        **common,
        verdict="labeled",
        k_vrh=result.k_vrh,
        g_vrh=result.g_vrh,
        born_stable=result.born_stable,
        reason=", ".join(result.flags) or None,
    )


def fam_label_outcome(structure_id: str, labeled_id: str, fam_model: str, fam_k: float) -> StructureOutcome:
    """Label source ``fam``: the stage-II K of the FAM-relaxed structure is the label."""
    return StructureOutcome(
        structure_id=structure_id,
        verdict="labeled",
        k_vrh=fam_k,
        method=f"fam:{fam_model}",
        relaxed_id=labeled_id,
        reason="labeled by the FAM (label source fam)",
    )
