"""Stage I's unit of work: a CGCNN ensemble's K_vrh (or G_vrh) for a batch of lake structures, cached.

Cached on the model id and the structure ids (which name the structures' content), so a rerun after a crash
predicts nothing twice. The stage's orchestration is in ``flows/screen.py``, its decisions in
``core/screening.py``.
"""

from __future__ import annotations

from dataclasses import asdict

from core.costs import measured
from core.device import device_label
from storage.lake import Lake
from storage.queries import structure_rows
from storage.registry import PREDICTOR_KIND, ModelKind
from tasks.common import compute_task
from tasks.train import load_predictor


@compute_task(name="cgcnn-predict", retries=0)
def predict(lake_url: str, model_id: str, structure_ids: list[str], kind: ModelKind = PREDICTOR_KIND) -> list[dict]:
    """The ensemble's modulus (GPa) with its spread, and member values, for structures in the lake: K_vrh (keys
    ``k_vrh``, ``k_vrh_std``) or, from the shear predictor, G_vrh (``g_vrh``, ``g_vrh_std``); ``property`` names it.
    Each with its share of the batch's cost (``core.costs``) and the device."""
    _, ensemble = load_predictor(Lake(lake_url), model_id, kind)
    rows = structure_rows(Lake(lake_url), structure_ids)
    device = device_label(ensemble.device)
    with measured(device) as cost:
        pred = ensemble.predict_rows(rows)
    share = asdict(cost.share(len(rows)))
    name = ensemble.config.target
    return [
        {
            "structure_id": sid,
            "property": name,
            name: float(pred.gpa[i]),
            f"{name}_std": float(pred.gpa_std[i]),
            "log10": float(pred.log10_k[i]),
            "log10_std": float(pred.log10_k_std[i]),
            "members_gpa": [float(10.0**v) for v in pred.members_log10[:, i]],
            "cost": share,
            "device": device,
        }
        for i, sid in enumerate(structure_ids)
    ]
