"""Named queries the flows share, so the meaning of 'labeled data' lives in one place."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pyarrow as pa

from storage.lake import Lake
from storage.rows import ElasticPayload

_STRUCTURE_COLUMNS = "structure_id, lattice, species, frac_coords, elements, nelements, reduced_formula"
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


SHEAR_LABEL_METHODS_SQL = "(method LIKE 'dft:%' OR method LIKE 'dataset:%')"
"""G_vrh labels fit for training: DFT and reference datasets only. The offline FAMs' shear is too soft to learn
from (SevenNet-0: G MAE 21.8 GPa, mean signed error -21.6 GPa against DFT; README), so a FAM's G, the seed set's
included, never trains the shear predictor or a generator conditioned on G."""


def labeled_k_vrh(lake: Lake, split: str | None = None, labels_before: int | None = None) -> pa.Table:
    """Structures with a training-grade K_vrh label: structure columns plus ``k_vrh``, ``g_vrh``, ``method`` and
    ``from_loop``.

    ``g_vrh`` is the shear modulus of the same method as the K label, where that method is training-grade for G
    (``SHEAR_LABEL_METHODS_SQL``; null otherwise), for the shear predictor and a generator conditioned on K and G.

    ``from_loop`` marks structures the active-learning loop made and labeled (``LOOP_SOURCES``).
    Where a structure has several labels, DFT wins over datasets, datasets over the seed set,
    and the newest row wins within one kind. ``labels_before`` keeps only loop labels of iterations
    before it: iteration i trains on what iterations < i labeled, so a resumed iteration sees the data
    it started with, not the labels its own first attempt wrote.
    """
    loop_sources = ", ".join(f"'{source}'" for source in LOOP_SOURCES)
    where, params = [], []
    if split:
        where.append("AND s.split = ?")
        params.append(split)
    if labels_before is not None:
        where.append(f"AND NOT (s.source IN ({loop_sources}) AND coalesce(p.iteration, 0) >= ?)")
        params.append(labels_before)
    return lake.query(
        f"""
        WITH k AS (
            SELECT s.*, p.value AS k_vrh, p.method, s.source IN ({loop_sources}) AS from_loop
            FROM structures s JOIN properties p USING (structure_id)
            WHERE p.name = 'k_vrh' AND p.value IS NOT NULL AND {LABEL_METHODS_SQL} {" ".join(where)}
            QUALIFY row_number() OVER (
                PARTITION BY s.structure_id
                ORDER BY CASE WHEN p.method LIKE 'dft:%' THEN 0 WHEN p.method LIKE 'dataset:%' THEN 1 ELSE 2 END,
                         p.created_at DESC) = 1
        ), g AS (
            SELECT structure_id, method, value AS g_vrh FROM properties
            WHERE name = 'g_vrh' AND value IS NOT NULL AND {SHEAR_LABEL_METHODS_SQL}
            QUALIFY row_number() OVER (PARTITION BY structure_id, method ORDER BY created_at DESC) = 1
        )
        SELECT k.*, g.g_vrh FROM k LEFT JOIN g USING (structure_id, method)
        ORDER BY k.structure_id
        """,
        params or None,
    )


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


def label_inputs(lake: Lake, structure_ids: Sequence[str]) -> tuple[dict[str, dict], dict[str, dict]]:
    """Stage III's starting points: the ``structures`` rows of these ids, and the newest FAM-relaxed row of each
    (keyed by the unrelaxed id) where stage II relaxed it."""
    ids = list(structure_ids)
    rows = lake.query("SELECT * FROM structures WHERE list_contains(?, structure_id)", [ids]).to_pylist()
    relaxed = lake.query(
        "SELECT * FROM structures WHERE source = 'fam-relaxed' AND list_has_any(parent_ids, ?) ORDER BY created_at",
        [ids],
    ).to_pylist()
    return {r["structure_id"]: r for r in rows}, {r["parent_ids"][0]: r for r in relaxed}


def elastic_tensors(lake: Lake, structure_ids: Sequence[str] | None = None) -> list[tuple[str, str, ElasticPayload]]:
    """(structure_id, method, payload) of every current ``elastic_tensor`` row, old payload shapes included."""
    where = "AND list_contains(?, structure_id)" if structure_ids is not None else ""
    rows = lake.query(
        f"SELECT structure_id, method, value_json FROM properties WHERE name = 'elastic_tensor' {where} "
        "ORDER BY structure_id, method",
        [list(structure_ids)] if structure_ids is not None else None,
    ).to_pylist()
    return [(r["structure_id"], r["method"], ElasticPayload.from_json(r["value_json"])) for r in rows]


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


KNOWN_PHASE_LIMIT = 12
"""Known phases per chemical system a hull is built from (the smallest cells first): the binaries of the data
hold a handful per system, and each costs one FAM relaxation."""


def known_phases(lake: Lake, system: Sequence[str]) -> list[dict[str, Any]]:
    """Structures of the data made of ``system``'s elements only, with two or more of them (the elements alone
    are the hull's prototypes): what the lake knows of that system, smallest cells first. The loop's own
    structures (``LOOP_SOURCES``) are candidates, not knowledge."""
    return lake.query(
        f"""
        SELECT {_STRUCTURE_COLUMNS} FROM structures
        WHERE nelements >= 2 AND list_has_all(?::VARCHAR[], elements)
          AND source NOT IN (SELECT unnest(?::VARCHAR[]))
        ORDER BY nsites, structure_id LIMIT {KNOWN_PHASE_LIMIT}
        """,
        [list(system), list(LOOP_SOURCES)],
    ).to_pylist()


def dedup_references(
    lake: Lake, batch_ids: Sequence[str], formulas: Sequence[str], iteration: int
) -> list[dict[str, Any]]:
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


def dft_hours_estimate(lake: Lake, rows: Mapping[str, Mapping[str, Any]]) -> Callable[[str], float | None]:
    """Expected DFT CPU-hours of each structure in ``rows`` (structure rows by id): what labeling has cost so far
    per atom of the structures labeled, every attempt counted (the acquisition budget's price; None before the
    first DFT job)."""
    spent = lake.query(
        """
        WITH spent AS (
            SELECT structure_id, sum(cpu_s) AS cpu_s FROM jobs
            WHERE stage = 'dft' AND cpu_s IS NOT NULL GROUP BY structure_id
        )
        SELECT sum(spent.cpu_s) / nullif(sum(len(s.species)), 0) AS per_atom
        FROM spent JOIN structures s USING (structure_id)
        """
    ).to_pylist()
    per_atom = spent[0]["per_atom"] if spent else None
    return lambda sid: None if per_atom is None or sid not in rows else per_atom * len(rows[sid]["species"]) / 3600
