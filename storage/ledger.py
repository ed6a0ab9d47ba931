"""The cost ledger: views over the ``jobs`` rows that say what each stage, each iteration and each discovery cost.

Every unit of work writes a ``jobs`` row with its wall, CPU and GPU seconds (``core.costs``): a model trained
(stage ``train``), one target's sampling (``generate``), a structure's stage-I prediction (``gnn``), a FAM relax +
elastic tensor (``fam``), each DFT attempt (``dft``, failed and retried attempts included: they were paid for).
A job names its iteration, or is attributed to the first iteration that made its structure a candidate; jobs of
neither kind (the seed set, ``matloop elastic``) have no iteration and stay out of the per-iteration views.

A *discovery* is a candidate structure whose label (DFT, or the FAM when the loop's label source is ``fam``) met
every condition of its candidate (``storage.conditions``): a single-K target within
``core.targets.POINT_LABEL_TOLERANCE`` of it, the same count as ``iterations.n_within_20``; a design's conditions
strictly.

    matloop sql "SELECT * FROM cost_per_discovery"
"""

from __future__ import annotations

from core.targets import POINT_LABEL_TOLERANCE

_COSTS = (
    "count(*) AS n_jobs, count(*) FILTER (WHERE state = 'failed') AS n_failed, "
    "sum(wall_time_s) AS wall_s, sum(cpu_s) AS cpu_s, sum(gpu_s) AS gpu_s"
)

LEDGER_VIEWS: dict[str, str] = {
    "job_costs": """
        SELECT j.*, coalesce(j.iteration, first_use.iteration) AS cost_iteration
        FROM jobs j LEFT JOIN (
            SELECT structure_id, min(iteration) AS iteration FROM candidates GROUP BY structure_id
        ) first_use USING (structure_id)
    """,
    "cost_per_stage": f"""
        SELECT cost_iteration AS iteration, stage, {_COSTS}
        FROM job_costs WHERE cost_iteration IS NOT NULL
        GROUP BY cost_iteration, stage ORDER BY iteration, stage
    """,
    "cost_per_iteration": f"""
        SELECT cost_iteration AS iteration, {_COSTS}
        FROM job_costs WHERE cost_iteration IS NOT NULL
        GROUP BY cost_iteration ORDER BY iteration
    """,
    "cost_per_discovery": f"""
        WITH spent AS (
            SELECT cost_iteration AS iteration, {_COSTS} FROM job_costs WHERE cost_iteration IS NOT NULL
            GROUP BY GROUPING SETS ((cost_iteration), ())
        ),
        label_checks AS (  -- did the label meet every condition of the candidate (its single K, or its design)?
            SELECT iteration, structure_id, target, bool_and(verdict = 'pass') AS met FROM candidate_conditions
            WHERE stage = 'label' GROUP BY iteration, structure_id, target
        ),
        found AS (
            SELECT c.iteration, count(DISTINCT c.structure_id) AS n_discovered FROM candidates c
            LEFT JOIN label_checks l USING (iteration, structure_id, target)
            WHERE c.status = 'labeled'  -- a label written before conditions were recorded: K within tolerance
              AND coalesce(l.met, abs(c.dft_k - c.target) <= {POINT_LABEL_TOLERANCE} * c.target)
            GROUP BY GROUPING SETS ((c.iteration), ())
        )
        SELECT s.iteration, coalesce(f.n_discovered, 0) AS n_discovered, s.n_jobs, s.n_failed,
               s.wall_s, s.cpu_s, s.gpu_s,
               s.cpu_s / nullif(f.n_discovered, 0) / 3600 AS cpu_hours_per_discovery,
               s.gpu_s / nullif(f.n_discovered, 0) / 3600 AS gpu_hours_per_discovery
        FROM spent s LEFT JOIN found f ON s.iteration IS NOT DISTINCT FROM f.iteration
        ORDER BY s.iteration NULLS LAST
    """,
}
"""Derived views every lake connection defines (``storage.lake.Lake.connect``, the catalog file); the row of
``cost_per_discovery`` whose iteration is NULL is the whole loop."""
