"""Every lake table's schema, in one place.

Tables are append-only. Each is Hive-partitioned on one column (``PARTITION``), which lives in
the folder name (``table/<col>=<value>/part-*.parquet``) and not inside the files. Every table
carries provenance: ``run_id`` (the Prefect flow run or a local run id), ``code_version`` and
``created_at``; rows produced by a model or a calculation also carry the model id and a
settings hash. A newer row supersedes an older one for the same key (``KEYS``); the catalog
exposes the latest row per key as the table's view and every row as ``<table>_history``.
"""

from __future__ import annotations

import pyarrow as pa

_PROVENANCE = [
    pa.field("run_id", pa.string()),
    pa.field("code_version", pa.string()),
    pa.field("created_at", pa.timestamp("us", tz="UTC")),
]
_MATRIX = pa.list_(pa.list_(pa.float64()))

STRUCTURES = pa.schema(
    [
        pa.field("structure_id", pa.string(), nullable=False),
        pa.field("formula", pa.string()),
        pa.field("reduced_formula", pa.string()),
        pa.field("elements", pa.list_(pa.string())),
        pa.field("nelements", pa.int32()),
        pa.field("nsites", pa.int32()),
        pa.field("lattice", _MATRIX),  # 3x3, Å, rows are lattice vectors
        pa.field("species", pa.list_(pa.string())),
        pa.field("frac_coords", _MATRIX),  # nsites x 3
        pa.field("volume", pa.float64()),  # Å^3
        pa.field("source", pa.string()),  # dataset name, "generated", "seed", "dft-relaxed", ...
        pa.field("source_id", pa.string()),  # id in the source (mp-id, file name, sample index)
        pa.field("parent_ids", pa.list_(pa.string())),
        pa.field("split", pa.string()),  # train | val | test, fixed by structure_id
        *_PROVENANCE,
    ]
)

PROPERTIES = pa.schema(
    [
        pa.field("structure_id", pa.string(), nullable=False),
        pa.field("name", pa.string(), nullable=False),  # k_vrh, g_vrh, elastic_tensor, ...
        pa.field("value", pa.float64()),  # scalar value (GPa for moduli, eV for energies)
        pa.field("value_json", pa.string()),  # non-scalar values (6x6 tensor) and extras
        pa.field("unit", pa.string()),
        pa.field("uncertainty", pa.float64()),  # ensemble spread or fit error, if any
        pa.field("method", pa.string()),  # dataset:<name> | cgcnn@<id> | fam:<model> | dft:<code>/<hash>
        pa.field("model_id", pa.string()),
        pa.field("settings_hash", pa.string()),
        pa.field("flags", pa.list_(pa.string())),  # e.g. eos_disagrees, missing_strains
        pa.field("iteration", pa.int32()),
        *_PROVENANCE,
    ]
)

CANDIDATES = pa.schema(
    [
        pa.field("iteration", pa.int32(), nullable=False),
        pa.field("structure_id", pa.string(), nullable=False),
        pa.field("target", pa.float64(), nullable=False),  # target K_vrh, GPa (the generator's condition)
        pa.field("design", pa.string()),  # the design target's conditions (core.targets); NULL: K = target
        pa.field("conditions_json", pa.string()),  # per stage, per condition: value, verdict, why
        pa.field("generator_model_id", pa.string()),
        pa.field("generator_score", pa.float64()),  # generator's property head, GPa
        pa.field("gnn_k", pa.float64()),
        pa.field("gnn_k_std", pa.float64()),
        pa.field("gnn_model_id", pa.string()),
        pa.field("gnn_verdict", pa.string()),  # pass | reject
        pa.field("gnn_reason", pa.string()),
        pa.field("fam_model", pa.string()),
        pa.field("fam_k", pa.float64()),
        pa.field("fam_verdict", pa.string()),  # pass | reject | error
        pa.field("fam_reason", pa.string()),
        pa.field("acquisition_policy", pa.string()),  # closest | uncertain | expected_improvement
        pa.field("acquisition_score", pa.float64()),  # the policy's score: higher was labeled first
        pa.field("acquisition_note", pa.string()),  # why a survivor was not labeled (limit, budget)
        pa.field("dft_method", pa.string()),
        pa.field("dft_k", pa.float64()),
        pa.field("dft_verdict", pa.string()),  # labeled | failed
        pa.field("dft_reason", pa.string()),
        pa.field("status", pa.string()),  # generated | gnn_pass | fam_pass | labeled | rejected | failed
        pa.field("stage", pa.string()),  # the stage that wrote this row: generate | gnn | fam | acquire | label
        *_PROVENANCE,
    ]
)

JOBS = pa.schema(
    [
        pa.field("job_id", pa.string(), nullable=False),
        pa.field("structure_id", pa.string()),
        pa.field("stage", pa.string(), nullable=False),  # train | generate | gnn | fam | dft
        pa.field("calculation", pa.string()),  # relax | relax+elastic | <strain/EOS label> | cgcnn | generator | ...
        pa.field("inputs_hash", pa.string()),
        pa.field("settings_json", pa.string()),
        pa.field("settings_hash", pa.string()),
        pa.field("attempt", pa.int32()),
        pa.field("state", pa.string()),  # running (a DFT attempt in progress, or lost) | completed | failed | retrying
        pa.field("error_class", pa.string()),  # scf_unconverged | relax_unconverged | walltime | node_lost | bad_input
        pa.field("error_message", pa.string()),
        pa.field("wall_time_s", pa.float64()),
        pa.field("cpu_s", pa.float64()),  # CPU time of the attempt (core.costs): the cost ledger
        pa.field("gpu_s", pa.float64()),  # wall time it held a GPU; 0 on the CPU
        pa.field("iteration", pa.int32()),  # the loop iteration, where the job is not tied to a candidate's structure
        pa.field("host", pa.string()),
        pa.field("device", pa.string()),  # cpu | cuda:0 (NVIDIA H200): where the model ran
        *_PROVENANCE,
    ]
)

MODELS = pa.schema(
    [
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),  # cgcnn | generator
        pa.field("path", pa.string()),  # checkpoint, relative to the lake root
        pa.field("data_snapshot", pa.list_(pa.string())),  # structure_ids trained on
        pa.field("data_hash", pa.string()),
        pa.field("config_json", pa.string()),  # hyperparameters
        pa.field("metrics_json", pa.string()),
        pa.field("settings_hash", pa.string()),
        *_PROVENANCE,
    ]
)

ITERATIONS = pa.schema(
    [
        pa.field("iteration", pa.int32(), nullable=False),
        pa.field("target", pa.float64(), nullable=False),
        pa.field("n_generated", pa.int64()),
        pa.field("n_kept", pa.int64()),
        pa.field("n_gnn_pass", pa.int64()),
        pa.field("n_fam_pass", pa.int64()),
        pa.field("n_labeled", pa.int64()),
        pa.field("n_failed", pa.int64()),
        pa.field("mape_gnn", pa.float64()),  # CGCNN-predicted K of kept candidates vs target
        pa.field("dft_k_mean", pa.float64()),  # K of the structures labeled this iteration (DFT or FAM labels)
        pa.field("dft_k_std", pa.float64()),
        pa.field("label_source", pa.string()),  # dft | fam
        pa.field("n_within_20", pa.int64()),  # labeled structures with K within 20 % of target
        pa.field("mape_head_raw", pa.float64()),  # generator's head on all raw samples vs target
        pa.field("mape_head_kept", pa.float64()),
        pa.field("mape_grader_raw", pa.float64()),  # frozen grader CGCNN on all raw samples vs target
        pa.field("mape_grader_kept", pa.float64()),
        pa.field("mape_fam_kept", pa.float64()),  # FAM K of kept candidates; failed or changed count as 1.0
        pa.field("fam_survival", pa.float64()),  # stage-II pass / stage-I pass
        pa.field("validity", pa.float64()),
        pa.field("uniqueness", pa.float64()),
        pa.field("novelty", pa.float64()),
        pa.field("wall_times_json", pa.string()),  # seconds per stage
        pa.field("predictor_model_id", pa.string()),
        pa.field("generator_model_id", pa.string()),
        *_PROVENANCE,
    ]
)

GENERATIONS = pa.schema(
    [
        pa.field("iteration", pa.int32(), nullable=False),
        pa.field("target", pa.float64(), nullable=False),
        pa.field("generator_model_id", pa.string()),
        pa.field("n_sampled", pa.int64()),
        pa.field("n_drawn", pa.int64()),  # crystals drawn to return n_sampled distinct ones (duplicates drawn again)
        pa.field("n_kept", pa.int64()),
        pa.field("validity", pa.float64()),
        pa.field("single_element", pa.float64()),  # fraction of raw samples with one element
        pa.field("ranker", pa.string()),  # what kept the best: "head" or a CGCNN checkpoint path
        pa.field("mape_head_raw", pa.float64()),
        pa.field("mape_head_kept", pa.float64()),
        pa.field("grader_id", pa.string()),  # frozen CGCNN that grades raw samples (checkpoint hash), if any
        pa.field("mape_grader_raw", pa.float64()),
        pa.field("mape_grader_kept", pa.float64()),
        pa.field("k_head_raw_json", pa.string()),  # head K of every raw sample (distribution plots)
        pa.field("k_grader_raw_json", pa.string()),  # grader K of every raw sample
        pa.field("conditions_json", pa.string()),  # what the generator was asked for beyond K: {"k_vrh", "g_vrh"}
        pa.field("mape_head_g_raw", pa.float64()),  # the head's G against the G asked for, where G was asked for
        pa.field("mape_head_g_kept", pa.float64()),
        *_PROVENANCE,
    ]
)

QUARANTINE = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("record_id", pa.string()),  # index or file name in the source
        # unreadable | overlapping_atoms | unknown_element | bad_property
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
        *_PROVENANCE,
    ]
)

SCHEMAS: dict[str, pa.Schema] = {
    "structures": STRUCTURES,
    "properties": PROPERTIES,
    "candidates": CANDIDATES,
    "jobs": JOBS,
    "models": MODELS,
    "iterations": ITERATIONS,
    "generations": GENERATIONS,
    "quarantine": QUARANTINE,
}

PARTITION: dict[str, str] = {
    "structures": "source",
    "properties": "name",
    "candidates": "iteration",
    "jobs": "stage",
    "models": "kind",
    "iterations": "iteration",
    "generations": "iteration",
    "quarantine": "source",
}

KEYS: dict[str, tuple[str, ...]] = {
    "structures": ("structure_id",),
    "properties": ("structure_id", "name", "method"),
    "candidates": ("iteration", "structure_id", "target"),
    "jobs": ("job_id", "attempt"),
    "models": ("model_id",),
    "iterations": ("iteration", "target"),
    "generations": ("iteration", "target"),
    "quarantine": ("source", "record_id", "reason"),
}
"""Rows sharing a key: the newest (created_at) is the current one."""
