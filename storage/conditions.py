"""Views of the design conditions: each candidate's verdict per stage and condition, and the funnel per condition.

``candidates.conditions_json`` holds, per stage (``gnn``: stage I, ``fam``: stage II, ``label``: stage III) and per
condition of the candidate's design (``core.targets``; the single-K target is the condition ``k_vrh = <target>``),
the value that stage had, its verdict (``pass``, ``fail``, ``unknown`` where the stage cannot evaluate it) and why.

    matloop sql "SELECT * FROM condition_funnel WHERE iteration = 0"
"""

from __future__ import annotations

CONDITION_VIEWS: dict[str, str] = {
    "candidate_conditions": """
        SELECT c.iteration, c.target, c.structure_id, c.design, c.status, s.key AS stage, k.key AS condition,
               k.value->>'verdict' AS verdict, TRY_CAST(k.value->>'value' AS DOUBLE) AS value, k.value->>'why' AS why
        FROM candidates c, json_each(c.conditions_json) s, json_each(s.value) k
        WHERE c.conditions_json IS NOT NULL
    """,
    "condition_funnel": """
        SELECT iteration, target, condition,
               count(DISTINCT structure_id) AS n_candidates,
               count(*) FILTER (WHERE stage = 'gnn' AND verdict = 'pass') AS n_gnn_pass,
               count(*) FILTER (WHERE stage = 'gnn' AND verdict <> 'unknown') AS n_gnn_checked,
               count(*) FILTER (WHERE stage = 'fam' AND verdict = 'pass') AS n_fam_pass,
               count(*) FILTER (WHERE stage = 'fam' AND verdict <> 'unknown') AS n_fam_checked,
               count(*) FILTER (WHERE stage = 'label' AND verdict = 'pass') AS n_label_met,
               count(*) FILTER (WHERE stage = 'label' AND verdict <> 'unknown') AS n_label_checked
        FROM candidate_conditions GROUP BY iteration, target, condition ORDER BY iteration, target, condition
    """,
}
"""Derived views every lake connection defines beside the tables (``storage.lake.Lake.connect``)."""
