"""Stage II's unit of work: batched FAM relax + elastic tensor of a batch of structures, cached.

- :func:`fam_batch` is the compute task: it relaxes and labels a batch of structures with one
  foundation model (batched on the worker's device, :func:`core.fam.fam_outcomes`) and returns
  one :class:`core.fam.FamOutcome` per structure. It is cached on
  its inputs (structure rows, model, settings) and its source, with results persisted in the
  lake, so a rerun recomputes nothing. A structure that breaks the calculator comes back as an
  outcome with an error; it never fails the batch.
- :func:`structure_input` is what a batch row holds: only the structure's own columns, so the
  cache key ignores provenance.

The stage's orchestration is in ``flows/screen.py``, its decisions in ``core/screening.py``.
"""

from __future__ import annotations

import functools
import socket
from dataclasses import asdict
from typing import Any

from core.costs import measured
from core.device import device_label, resolve_device
from core.fam import (
    FamSettings,
    FamUnavailableError,
    calculator_device,
    fam_calculator,
    fam_outcomes,
    mace_mp_checkpoint,
)
from core.hull import element_prototypes
from core.relax import relax
from core.settings import set_torch_threads
from core.structures import from_row, to_atoms
from tasks.common import compute_task, run_logger

STAGE = "fam"
IN_STATUS = "gnn_pass"


@functools.cache
def _loaded(model: str, dtype: str, device: str) -> tuple[Any, str]:
    """One calculator per (model, dtype, device) per worker process: loading a FAM takes seconds."""
    set_torch_threads()
    return fam_calculator(model, device=device, dtype=dtype)


def resolve_model(model: str) -> str:
    """The concrete model ``auto`` stands for here (MACE-MP-0 if its weights can be had, else SevenNet-0).

    Resolved before caching so a cache entry always names the model that produced it.
    """
    if model != "auto":
        return model
    try:
        mace_mp_checkpoint()
        return "mace-mp-0"
    except FamUnavailableError:
        return "sevennet-0"


@compute_task(name="fam-relax-elastic", retries=0)
def fam_batch(rows: list[dict[str, Any]], model: str, settings: FamSettings) -> list[dict[str, Any]]:
    """Relax and compute the elastic tensor of each structure row; one outcome dict per row, in order.

    Each dict holds ``structure_id``, ``outcome`` (FamOutcome as JSON-able dict), ``cost`` (its share of the
    batch's ``core.costs.Cost``), ``host`` and ``device``. Failures of single structures are outcomes with
    ``error_class`` set.
    """
    logger = run_logger()
    calc, model_name = _loaded(model, settings.dtype, str(resolve_device()))
    device = device_label(calculator_device(calc))
    logger.info("stage II: %d structures with %s on %s", len(rows), model_name, device)
    with measured(device) as cost:
        outcomes = fam_outcomes([to_atoms(from_row(r)) for r in rows], calc, model_name, settings, progress=logger.info)
    share = asdict(cost.share(len(rows)))  # batched work, shared evenly
    out = []
    for i, (row, outcome) in enumerate(zip(rows, outcomes, strict=True), 1):
        k = outcome.elastic.k_vrh if outcome.elastic else None
        logger.info(
            "fam %d/%d %s %s: %s",
            i,
            len(rows),
            row["structure_id"],
            row.get("reduced_formula"),
            outcome.error or (f"K_vrh {k:.1f} GPa" if k is not None else "no K"),
        )
        out.append(
            {
                "structure_id": row["structure_id"],
                "outcome": outcome.model_dump(mode="json"),
                "cost": share,
                "host": socket.gethostname(),
                "device": device,
            }
        )
    return out


@compute_task(name="fam-hull-references", retries=0)
def fam_references(
    system: list[str], rows: list[dict[str, Any]], model: str, settings: FamSettings
) -> list[dict[str, Any]]:
    """The hull references of one chemical system: each element's prototypes (``core.hull``) and the known
    phases ``rows``, relaxed by the FAM as stage II relaxes a candidate; ``{"name", "formula",
    "energy_per_atom"}`` each, those that failed to relax left out (and logged)."""
    logger = run_logger()
    calc, model_name = _loaded(model, settings.dtype, str(resolve_device()))
    cells = {f"{lattice} {el}": atoms for el in system for lattice, atoms in element_prototypes(el).items()}
    cells |= {r["structure_id"]: to_atoms(from_row(r)) for r in rows}
    out = []
    for name, atoms in cells.items():
        try:
            result = relax(atoms, calc, settings.fmax, settings.steps, settings.optimizer)
        except (ValueError, RuntimeError) as exc:
            logger.warning("hull reference %s of %s left out: %s", name, "-".join(system), exc)
            continue
        formula = result.atoms.get_chemical_formula()
        out.append({"name": name, "formula": formula, "energy_per_atom": result.energy / len(result.atoms)})
    logger.info("hull of %s: %d references relaxed with %s", "-".join(system), len(out), model_name)
    return out


_STRUCTURE_COLS = ("structure_id", "reduced_formula", "lattice", "species", "frac_coords")


def structure_input(row: dict[str, Any]) -> dict[str, Any]:
    """Only what defines the structure, so the task's cache key ignores provenance columns."""
    return {k: row[k] for k in _STRUCTURE_COLS}
