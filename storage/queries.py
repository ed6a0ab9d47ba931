"""Named queries the flows share, so the meaning of 'labeled data' lives in one place."""

from __future__ import annotations

import pyarrow as pa

from storage.lake import Lake

LABEL_METHODS_SQL = (
    "(p.method LIKE 'dataset:%' OR p.method LIKE 'dft:%' OR (p.method LIKE 'fam:%' AND s.source = 'seed'))"
)
"""K_vrh labels fit for training: reference datasets, our DFT, and the FAM-labeled seed set."""


def labeled_k_vrh(lake: Lake, split: str | None = None) -> pa.Table:
    """Structures with a training-grade K_vrh label: structure columns plus ``k_vrh`` and ``method``.

    Where a structure has several labels, DFT wins over datasets, datasets over the seed set,
    and the newest row wins within one kind.
    """
    split_sql = "AND s.split = ?" if split else ""
    return lake.query(
        f"""
        SELECT s.*, p.value AS k_vrh, p.method
        FROM structures s JOIN properties p USING (structure_id)
        WHERE p.name = 'k_vrh' AND p.value IS NOT NULL AND {LABEL_METHODS_SQL} {split_sql}
        QUALIFY row_number() OVER (
            PARTITION BY s.structure_id
            ORDER BY CASE WHEN p.method LIKE 'dft:%' THEN 0 WHEN p.method LIKE 'dataset:%' THEN 1 ELSE 2 END,
                     p.created_at DESC) = 1
        ORDER BY s.structure_id
        """,
        [split] if split else None,
    )


def funnel(lake: Lake, iteration: int) -> list[dict]:
    """Per target: how many candidates reached each stage, the CGCNN MAPE, and DFT K statistics."""
    return lake.query(
        """
        SELECT target,
               count(*) AS n_kept,
               count(*) FILTER (WHERE gnn_verdict = 'pass') AS n_gnn_pass,
               count(*) FILTER (WHERE fam_verdict = 'pass') AS n_fam_pass,
               count(*) FILTER (WHERE status = 'labeled') AS n_labeled,
               count(*) FILTER (WHERE status = 'failed') AS n_failed,
               avg(abs(gnn_k - target) / target) AS mape_gnn,
               avg(dft_k) FILTER (WHERE status = 'labeled') AS dft_k_mean,
               stddev_samp(dft_k) FILTER (WHERE status = 'labeled') AS dft_k_std
        FROM candidates WHERE iteration = ? GROUP BY target ORDER BY target
        """,
        [iteration],
    ).to_pylist()
