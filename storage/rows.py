"""Every result row's shape, in one place: ``properties`` rows (scalars, the elastic-tensor payload, predictions),
``jobs`` rows, and the provenance columns of a ``structures`` row.

Every writer (ingest, the seed set, stage I, stage II, DFT labeling, FAM labels) builds its rows here, so a
property has one shape whatever produced it:

- a modulus (``MODULI``) or an energy is a scalar row, ``value`` in its unit;
- ``born_stable`` is a scalar row, ``value`` 1.0 or 0.0;
- ``elastic_tensor`` holds an :class:`ElasticPayload` as JSON in ``value_json``; ``value`` is the smallest
  eigenvalue of the symmetric Voigt matrix (GPa; positive means Born-stable) and ``uncertainty`` the fit's
  RMSE where there was a fit;
- a CGCNN prediction is a ``k_vrh`` row with the ensemble spread as ``uncertainty`` and a
  :class:`PredictionPayload` in ``value_json``.

Lakes written before this module keep working: :meth:`ElasticPayload.from_json` reads the three older shapes
of the tensor (a bare 6x6 list; a dict with ``born_stable``; a dict with ``settings`` and ``eos_v0``), tested
on ``tests/fixtures/lake-b4aec63``. ``jobs.error_class`` is always a :class:`core.failures.FailureClass`.
"""

from __future__ import annotations

import json
import math
import socket
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from core.costs import Cost
from core.elastic import ElasticResult
from core.failures import FailureClass
from core.provenance import canonical_json, settings_hash
from core.structures import split_of

MODULI: tuple[str, ...] = ("k_vrh", "k_voigt", "k_reuss", "g_vrh", "g_voigt", "g_reuss", "eos_k")
"""The elastic moduli written as scalar rows (GPa), in the order they are written."""
UNITS: dict[str, str | None] = {
    **dict.fromkeys(MODULI, "GPa"),
    "energy_per_atom": "eV/atom",
    "formation_energy_per_atom": "eV/atom",
    "born_stable": None,
    "elastic_tensor": "GPa",
}
"""The unit of every named property."""


def structure_row(row: dict[str, Any], source: str, source_id: str, parent_ids: Sequence[str] = ()) -> dict[str, Any]:
    """A ``structures`` row from a structure's columns (``core.structures.to_row``) and where it came from.

    ``source``: ``generated`` | ``fam-relaxed`` | ``dft-relaxed`` | a dataset name; ``parent_ids``: the
    structures it was made from (a relaxed cell's unrelaxed one). The split follows from the id.
    """
    return {
        **row,
        "source": source,
        "source_id": source_id,
        "parent_ids": list(parent_ids),
        "split": split_of(row["structure_id"]),
    }


class Origin(BaseModel):
    """What produced a row: the method tag, the model and settings behind it, the iteration and flags."""

    model_config = ConfigDict(frozen=True)

    method: str
    """``dataset:<name>`` | ``cgcnn@<model id>`` | ``fam:<model>`` | ``dft:<code>/<physics hash>``."""
    model_id: str | None = None
    settings_hash: str | None = None
    iteration: int = 0
    flags: tuple[str, ...] = ()


def scalar_row(
    structure_id: str,
    origin: Origin,
    name: str,
    value: float | None,
    unit: str | None,
    *,
    uncertainty: float | None = None,
    value_json: str | None = None,
    flags: Sequence[str] = (),
) -> dict[str, Any]:
    """One ``properties`` row; ``flags`` add to the origin's."""
    return {
        "structure_id": structure_id,
        "name": name,
        "value": None if value is None else float(value),
        "value_json": value_json,
        "unit": unit,
        "uncertainty": uncertainty,
        "method": origin.method,
        "model_id": origin.model_id,
        "settings_hash": origin.settings_hash,
        "flags": [*origin.flags, *flags],
        "iteration": origin.iteration,
    }


class ElasticPayload(BaseModel):
    """``value_json`` of an ``elastic_tensor`` row: the 6x6 Voigt matrix (GPa) and what the fit said about it."""

    c_voigt: list[list[float]] | None = None
    """None when no tensor was fitted (``missing`` names the points that were not there)."""
    born_stable: bool | None = None
    min_eigenvalue: float | None = None
    """Smallest eigenvalue of the symmetric matrix, GPa (also the row's ``value``)."""
    residual_stress: list[float] | None = None
    fit_rmse: float | None = None
    missing: list[str] = Field(default_factory=list)
    eos_v0: float | None = None
    """Equilibrium volume of the EOS check, Å^3 per cell."""
    settings: dict[str, Any] | None = None
    """The calculation settings (DFT), so a tensor can be reproduced from its row alone."""

    @classmethod
    def of_matrix(cls, c_voigt: Sequence[Sequence[float]]) -> ElasticPayload:
        """A bare matrix (a dataset's tensor), with its Born criterion computed."""
        c = np.asarray(c_voigt, dtype=float)
        usable = c.shape == (6, 6) and bool(np.isfinite(c).all())
        lowest = float(np.linalg.eigvalsh(0.5 * (c + c.T)).min()) if usable else None
        return cls(
            c_voigt=c.tolist(),
            min_eigenvalue=lowest,
            born_stable=None if lowest is None else lowest > 0,
        )

    @classmethod
    def from_json(cls, text: str) -> ElasticPayload:
        """Today's payload, or any of the older shapes (a bare list, or a dict of a subset of the fields)."""
        data = json.loads(text)
        if isinstance(data, list):
            return cls.of_matrix(data)
        payload = cls.model_validate({k: v for k, v in data.items() if k in cls.model_fields})
        if payload.c_voigt is not None and (payload.min_eigenvalue is None or payload.born_stable is None):
            derived = cls.of_matrix(payload.c_voigt)  # older DFT rows kept Born stability in a row of its own
            payload = payload.model_copy(
                update={"min_eigenvalue": derived.min_eigenvalue, "born_stable": derived.born_stable}
            )
        return payload


def elastic_rows(
    structure_id: str, origin: Origin, result: ElasticResult, *, settings: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The moduli that exist, Born stability, and the tensor of one elastic calculation.

    The tensor row is written when a tensor was fitted or when strain points are missing (its payload then
    names them, with ``c_voigt`` null), so a failed calculation leaves a record of what it lacked.
    """
    flags = list(result.flags)
    rows = [
        scalar_row(structure_id, origin, name, getattr(result, name), "GPa", flags=flags)
        for name in MODULI
        if getattr(result, name) is not None
    ]
    if result.born_stable is not None:
        rows.append(scalar_row(structure_id, origin, "born_stable", float(result.born_stable), None, flags=flags))
    if result.c_voigt is not None or result.missing:
        payload = ElasticPayload(
            c_voigt=result.c_voigt,
            born_stable=result.born_stable,
            min_eigenvalue=result.min_eigenvalue,
            residual_stress=result.residual_stress,
            fit_rmse=result.fit_rmse,
            missing=result.missing,
            eos_v0=result.eos_v0,
            settings=settings,
        )
        rows.append(tensor_row(structure_id, origin, payload, uncertainty=result.fit_rmse, flags=flags))
    return rows


def tensor_row(
    structure_id: str,
    origin: Origin,
    payload: ElasticPayload,
    *,
    uncertainty: float | None = None,
    flags: Sequence[str] = (),
) -> dict[str, Any]:
    """The ``elastic_tensor`` row of a payload."""
    return scalar_row(
        structure_id,
        origin,
        "elastic_tensor",
        payload.min_eigenvalue,
        "GPa",
        uncertainty=uncertainty,
        value_json=payload.model_dump_json(),
        flags=flags,
    )


def label_rows(
    structure_id: str,
    origin: Origin,
    values: Mapping[str, float | None],
    c_voigt: Sequence[Sequence[float]] | None = None,
) -> list[dict[str, Any]]:
    """Rows of labels read from a table (a dataset, the seed file): each finite named value, and the tensor."""
    rows = [
        scalar_row(structure_id, origin, name, value, UNITS[name])
        for name, value in values.items()
        if value is not None and math.isfinite(value)
    ]
    if c_voigt is not None:
        rows.append(tensor_row(structure_id, origin, ElasticPayload.of_matrix(c_voigt)))
    return rows


def fam_rows(
    structure_id: str,
    model_name: str,
    energy_per_atom: float | None,
    elastic: ElasticResult | None,
    settings_hash: str,
    iteration: int,
) -> list[dict[str, Any]]:
    """Stage II's rows of one structure: the FAM energy, and the elastic rows (G flagged indicative for
    SevenNet-0, whose shear constants are too soft to decide on)."""
    origin = Origin(method=f"fam:{model_name}", model_id=model_name, settings_hash=settings_hash, iteration=iteration)
    rows = []
    if energy_per_atom is not None:
        rows.append(scalar_row(structure_id, origin, "energy_per_atom", energy_per_atom, UNITS["energy_per_atom"]))
    if elastic is not None:
        if model_name == "sevennet-0":
            origin = origin.model_copy(update={"flags": ("g_indicative_only",)})
        rows += elastic_rows(structure_id, origin, elastic)
    return rows


class PredictionPayload(BaseModel):
    """``value_json`` of a CGCNN prediction (``k_vrh``, or ``g_vrh`` from the shear predictor): the ensemble in
    log10 space and each member's value in GPa."""

    log10: float = Field(validation_alias=AliasChoices("log10", "log10_k"))
    log10_std: float = Field(validation_alias=AliasChoices("log10_std", "log10_k_std"))
    members_gpa: list[float]


def prediction_row(
    structure_id: str, origin: Origin, name: str, value: float, std: float, payload: PredictionPayload
) -> dict[str, Any]:
    """A predicted modulus ``name`` (GPa) with the ensemble spread as its uncertainty."""
    return scalar_row(structure_id, origin, name, value, "GPa", uncertainty=std, value_json=payload.model_dump_json())


JobState = Literal["running", "completed", "retrying", "failed"]
"""``running``: a DFT attempt in progress, written when it starts; an attempt whose process died keeps it until the
next attempt of its job (or the next label run) records it as lost."""
JobStage = Literal["train", "generate", "gnn", "fam", "dft"]


class JobRow(BaseModel):
    """One attempt of one unit of work (a model trained, a generation batch, a stage-I prediction batch, a FAM
    relax + elastic batch member, a DFT relaxation or strain point), with what it cost (``core.costs``)."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    structure_id: str | None = None
    """The structure the job computed (FAM, DFT); None for work on many (train, generate, gnn)."""
    stage: JobStage
    calculation: str
    """``relax+elastic`` (FAM), ``relax`` or a strain/EOS label (DFT), the model kind (train), ``sample`` (generate),
    ``predict`` (gnn)."""
    inputs_hash: str
    settings_json: str
    settings_hash: str
    attempt: int = Field(1, ge=1)
    state: JobState
    error_class: FailureClass | None = None
    error_message: str | None = None
    wall_time_s: float | None = None
    cpu_s: float | None = None
    gpu_s: float | None = None
    iteration: int | None = None
    """The loop iteration of a job without a structure; the ledger attributes a structure's jobs through its
    candidates."""
    host: str | None = None
    device: str | None = None

    def row(self) -> dict[str, Any]:
        """The row as the ``jobs`` table stores it (the error class as its string value)."""
        return self.model_dump(mode="json")


def job_row(
    stage: JobStage,
    job_id: str,
    calculation: str,
    settings: Mapping[str, Any] | BaseModel,
    cost: Cost,
    *,
    structure_id: str | None = None,
    iteration: int | None = None,
    error_class: FailureClass | None = None,
    error: str | None = None,
    host: str | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """The ``jobs`` row of one single-attempt unit of work: a model trained, a target sampled, a structure predicted
    (stage I) or relaxed with its elastic tensor (stage II, deterministic: one attempt). Failed iff ``error``."""
    return JobRow(
        job_id=job_id,
        structure_id=structure_id,
        stage=stage,
        calculation=calculation,
        inputs_hash=structure_id or job_id,
        settings_json=canonical_json(settings),
        settings_hash=settings_hash(settings),
        state="failed" if error is not None else "completed",
        error_class=error_class,
        error_message=error,
        iteration=iteration,
        host=host or socket.gethostname(),
        device=device,
        **cost.columns(),
    ).row()
