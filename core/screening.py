"""The screen's decisions, stage by stage: pure functions from predictions and FAM outcomes to candidate updates.

Stage I (:func:`gnn_verdicts`) checks, in order:

1. single-element structures are rejected (the search is for alloys);
2. candidates whose predicted K is more than ``tolerance`` (relative) off their target are rejected (a design
   target's candidate: off its K window widened by ``tolerance``; ``core.targets``);
3. of the rest, duplicates (core.dedup) of any structure already in the lake, or of a candidate
   earlier in the batch, are rejected; the batch is ordered by relative error, so of two equal
   structures the one closer to its target survives.

Stage II (:func:`fam_verdicts`) passes a candidate only if the FAM relaxed it, its structure held, its
strain set is complete, it is Born-stable and its FAM K is within ``tolerance`` of the target
(:func:`core.fam.verdict`); a design target's candidate must meet every condition instead of the K check. Both
stages record each condition's verdict in ``conditions_json``. Each function returns, per candidate, the update
its ``candidates`` row gets and a short outcome name that the flows count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from core.dedup import find_duplicates
from core.fam import FamOutcome, verdict
from core.structures import from_row
from core.targets import stage_checks, stage_values

GNN_OUTCOMES = ("passed", "single_element", "off_target", "duplicate_known", "duplicate_batch")
"""Stage I's outcome names, in the order of its checks."""


def gnn_verdicts(
    todo: Sequence[Mapping[str, Any]],
    rows: Mapping[str, Mapping[str, Any]],
    predictions: Mapping[str, Mapping[str, Any]],
    known: Sequence[Mapping[str, Any]],
    tolerance: float,
    model_id: str,
    shear: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[tuple[dict[str, Any], str]]:
    """Per candidate, its stage I update and its outcome (one of ``OUTCOMES``), in the order of ``todo``.

    See the module docstring for the order of the checks. ``known`` are the lake structures a survivor may
    duplicate (``storage.queries.dedup_references``). ``shear`` holds the shear predictor's G per structure where
    a design has a G or G/K condition (``tasks.predict.predict``); without it those conditions stay unknown.
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
        g = shear[sid]["g_vrh"] if shear and sid in shear else None
        values = stage_values(k_vrh=p["k_vrh"], g_vrh=g)
        base["conditions_json"], failed = stage_checks(cand, "gnn", values, tolerance)
        k_text = f"K {p['k_vrh']:.0f}±{p['k_vrh_std']:.0f} GPa"
        if rows[sid]["nelements"] < 2:
            updates[n] = {**base, "gnn_reason": f"single-element structure ({rows[sid]['elements'][0]})"}
            outcomes[n] = "single_element"
        elif failed:
            why = "; ".join(failed) if cand.get("design") else f"is {rel:.0%} off target {target:.0f} GPa"
            updates[n] = {**base, "gnn_reason": f"{k_text} {why} (tolerance {tolerance:.0%})"}
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


def fam_verdicts(
    todo: Sequence[Mapping[str, Any]],
    outcomes: Mapping[str, FamOutcome],
    tolerance: float,
    e_above_hull: Mapping[str, float] | None = None,
    fam_shear: bool = False,
) -> list[tuple[dict[str, Any], str]]:
    """Per candidate with an outcome, its stage II update and outcome (``pass``, ``error`` or the reject reason's
    first word), in the order of ``todo``. ``e_above_hull`` (eV/atom by structure id) where a design asks.
    Without ``fam_shear`` the FAM's G decides no condition (G and G/K stay unknown here): an offline FAM's shear is
    too soft for that."""
    decided = []
    for cand in (c for c in todo if c["structure_id"] in outcomes):
        o = outcomes[cand["structure_id"]]
        el = o.elastic
        hull = (e_above_hull or {}).get(cand["structure_id"])
        g = el.g_vrh if el and fam_shear else None
        values = stage_values(el.k_vrh, g, el.born_stable, hull) if el else stage_values(e_above_hull=hull)
        conditions_json, failed = stage_checks(cand, "fam", values, tolerance)
        decision, reason = verdict(o, cand["target"], tolerance, failed if cand.get("design") else None)
        update = {
            "iteration": cand["iteration"],
            "structure_id": cand["structure_id"],
            "target": cand["target"],
            "fam_model": o.model_name,
            "fam_k": o.elastic.k_vrh if o.elastic else None,
            "fam_verdict": decision,
            "fam_reason": reason,
            "conditions_json": conditions_json,
            "status": "fam_pass" if decision == "pass" else "rejected",
        }
        decided.append((update, decision if decision == "pass" else reason.split(" (")[0].split(":")[0]))
    return decided
