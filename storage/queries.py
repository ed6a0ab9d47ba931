"""Named queries the flows share, so the meaning of 'labeled data' lives in one place."""

from __future__ import annotations

import pyarrow as pa

from storage.lake import Lake

LOOP_LABEL_FLAG = "loop_label"
"""Flag on a FAM property row that the label stage promoted to a training label (label source ``fam``)."""
LOOP_SOURCES = ("generated", "fam-relaxed", "dft-relaxed")
"""``structures.source`` of what the loop made: its labels all go to training, whatever the split says."""

DEFAULT_NEW_LABEL_WEIGHT = 10.0
"""How many times as often a loop-labeled structure is drawn in training as a seed row: 20 new labels then
weigh like 200 of the ~2,000 seed rows, enough to move a fine-tuned model, not enough to erase the seed data."""

LABEL_METHODS_SQL = (
    "(p.method LIKE 'dataset:%' OR p.method LIKE 'dft:%' "
    f"OR (p.method LIKE 'fam:%' AND (s.source = 'seed' OR list_contains(p.flags, '{LOOP_LABEL_FLAG}'))))"
)
"""K_vrh labels fit for training: reference datasets, our DFT, the FAM-labeled seed set, and FAM loop labels."""


def labeled_k_vrh(lake: Lake, split: str | None = None) -> pa.Table:
    """Structures with a training-grade K_vrh label: structure columns plus ``k_vrh``, ``method`` and ``from_loop``.

    ``from_loop`` marks structures the active-learning loop made and labeled (``LOOP_SOURCES``).
    Where a structure has several labels, DFT wins over datasets, datasets over the seed set,
    and the newest row wins within one kind.
    """
    split_sql = "AND s.split = ?" if split else ""
    loop_sources = ", ".join(f"'{source}'" for source in LOOP_SOURCES)
    return lake.query(
        f"""
        SELECT s.*, p.value AS k_vrh, p.method, s.source IN ({loop_sources}) AS from_loop
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


def training_rows(lake: Lake) -> list[dict]:
    """What models learn from: labeled train-split rows with K > 0, plus every loop-labeled structure.

    The fixed split keeps seed-data evaluation honest; a structure the loop paid to label is never
    spent on validation or test.
    """
    rows = labeled_k_vrh(lake).to_pylist()
    return [r for r in rows if r["k_vrh"] > 0 and (r["split"] == "train" or r["from_loop"])]


def funnel(lake: Lake, iteration: int) -> list[dict]:
    """Per target: candidates reaching each stage, CGCNN and FAM MAPE, labeled-K statistics, stage-II survival.

    ``mape_fam_kept`` is over the candidates the FAM screened (the stage-I survivors), a candidate it could
    not relax, or whose structure changed, counting as 100 % error.
    """
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
               stddev_samp(dft_k) FILTER (WHERE status = 'labeled') AS dft_k_std,
               count(*) FILTER (WHERE status = 'labeled' AND abs(dft_k - target) <= 0.2 * target) AS n_within_20,
               avg(CASE WHEN fam_k IS NULL THEN 1.0 ELSE abs(fam_k - target) / target END)
                   FILTER (WHERE fam_verdict IS NOT NULL) AS mape_fam_kept,
               count(*) FILTER (WHERE fam_verdict = 'pass')
                   / nullif(count(*) FILTER (WHERE gnn_verdict = 'pass'), 0) AS fam_survival
        FROM candidates WHERE iteration = ? GROUP BY target ORDER BY target
        """,
        [iteration],
    ).to_pylist()
