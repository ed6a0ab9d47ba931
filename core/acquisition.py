"""Which stage-II survivors are labeled: an acquisition policy, its score per structure, and a budget.

Pure (no Prefect, no lake). A structure's candidates (one per target it was screened for) carry the stage-I
CGCNN ensemble's K and spread (``gnn_k``, ``gnn_k_std``) and the FAM's K (``fam_k``). Higher scores are labeled
first; a policy ranks, the budget or the limit cuts:

- ``closest``: the FAM K closest to its target (the reference work's choice; ties by id).
- ``uncertain``: the largest relative spread of the CGCNN ensemble among the survivors (all of them passed the
  FAM window): the labels the predictor learns most from.
- ``expected_improvement``: the probability that the label lands in the window around the target (a normal
  around the FAM K whose width combines the ensemble spread and the FAM's own error against DFT), per
  expected CPU-hour when a budget is set: the expected count of confirmed in-window structures per hour spent.

With ``budget_cpu_hours`` the chosen structures' expected DFT cost (``cost_of``, from the jobs table's history)
must fit the budget; structures are taken in score order, skipping those that no longer fit. A lake with no DFT
jobs yet cannot price a structure: then the limit alone applies, and expected_improvement ranks by probability.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

AcquisitionPolicy = Literal["closest", "uncertain", "expected_improvement"]


class AcquisitionSettings(BaseModel):
    """How the label stage picks what to label among the stage-II survivors (in the label form and the loop's)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    policy: AcquisitionPolicy = "closest"
    """closest: FAM K nearest the target first; uncertain: largest CGCNN ensemble spread first;
    expected_improvement: most likely to land in the window, per expected CPU-hour under a budget."""
    window: float = Field(0.2, gt=0, lt=1)
    """A label within this fraction of its target confirms the structure (the funnel's n_within_20)."""
    fam_relative_error: float = Field(0.08, gt=0, lt=1)
    """The FAM's K error against DFT, relative (SevenNet-0: 10.8 GPa MAE on 24 metallic binaries of
    100-250 GPa, benchmarks/peer_elastic.py): the width expected_improvement gives the FAM K."""
    budget_cpu_hours: float = Field(0.0, ge=0)
    """DFT budget of one label run in CPU-hours (0: no budget; the limit alone caps the count). A structure's
    cost is estimated from the DFT jobs already in the lake, per atom."""


@dataclass(frozen=True)
class Choice:
    """One survivor's acquisition: its score under the policy, whether it is labeled now, and why not."""

    structure_id: str
    score: float
    chosen: bool
    note: str = ""


def _miss(candidate: Mapping[str, Any]) -> float:
    return abs(candidate["fam_k"] - candidate["target"]) / candidate["target"]


def _nearest(candidates: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The candidate row (target) whose FAM K is nearest its target."""
    known = [c for c in candidates if c.get("fam_k") is not None]
    return min(known, key=_miss) if known else None


def in_window_probability(candidate: Mapping[str, Any], settings: AcquisitionSettings) -> float:
    """P(label within ``window`` of the target), the label ~ N(FAM K, ensemble spread (+) FAM error)."""
    k, target = candidate["fam_k"], candidate["target"]
    sigma = math.hypot(candidate.get("gnn_k_std") or 0.0, settings.fam_relative_error * k)
    if sigma <= 0:
        return float(abs(k - target) <= settings.window * target)
    lo, hi = (1 - settings.window) * target, (1 + settings.window) * target
    label = NormalDist(k, sigma)
    return label.cdf(hi) - label.cdf(lo)


def score(
    candidates: Sequence[Mapping[str, Any]], settings: AcquisitionSettings, cost_hours: float | None = None
) -> float:
    """The policy's score of one structure (its candidate rows); higher is labeled first, -inf without a FAM K."""
    best = _nearest(candidates)
    if best is None:
        return -math.inf
    if settings.policy == "closest":
        return -_miss(best)
    if settings.policy == "uncertain":
        spreads = [c["gnn_k_std"] / c["gnn_k"] for c in candidates if c.get("gnn_k_std") and c.get("gnn_k")]
        return max(spreads, default=0.0)
    probability = max(in_window_probability(c, settings) for c in candidates if c.get("fam_k") is not None)
    return probability / cost_hours if cost_hours else probability


def choose(
    by_structure: Mapping[str, Sequence[Mapping[str, Any]]],
    settings: AcquisitionSettings,
    limit: int = 0,
    cost_of: Callable[[str], float | None] | None = None,
) -> list[Choice]:
    """Every survivor's ``Choice``, best score first (ties by id): at most ``limit`` chosen (0: no cap), and
    with a budget, only while their expected CPU-hours (``cost_of``) fit it."""
    cost_of = cost_of or (lambda _sid: None)
    budget = settings.budget_cpu_hours
    costs = {sid: cost_of(sid) for sid in by_structure} if budget else {}
    scores = {sid: score(rows, settings, costs.get(sid)) for sid, rows in by_structure.items()}
    order = sorted(by_structure, key=lambda sid: (-scores[sid], sid))
    choices, spent, n_chosen = [], 0.0, 0
    for sid in order:
        note = ""
        if limit and n_chosen >= limit:
            note = f"over the limit of {limit}"
        elif budget and costs[sid] is not None and spent + costs[sid] > budget:
            note = f"over the budget: {spent:.2f} of {budget:g} CPU-hours spent, this one ~{costs[sid]:.2f}"
        chosen = not note
        if chosen:
            n_chosen += 1
            spent += costs.get(sid) or 0.0
        choices.append(Choice(sid, scores[sid], chosen, note))
    return choices
