"""CLI commands for the generator: ``matloop train generator`` and ``matloop generate``."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Annotated

import typer

from flows.cli import app, at_least, console, heavy_imports, new_table, train_app


@train_app.command("generator")
def train_generator_cmd(
    config: Annotated[
        str, typer.Option("--config", help="Named generator config (core.generator.PRESETS: small, paper, ...).")
    ] = "small",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Train the conditional generator (VAE + property head, then the prior); cached on data, config and code."""
    with heavy_imports():
        from core.generator import PRESETS
        from flows.train import TrainParams, train
        from storage import Lake
        from storage.registry import get_model
    if config not in PRESETS:
        raise typer.BadParameter(f"unknown config {config!r}; choose from {', '.join(PRESETS)}", param_hint="--config")
    lake = Lake()
    model_id = train(TrainParams(lake_url=lake.url, what=["generator"], generator_config=config))["generator"]
    metrics = get_model(lake, model_id).metrics
    if as_json:
        typer.echo(json.dumps({"model_id": model_id, "metrics": metrics}, indent=2))
        return
    console.print(
        f"generator [bold]{model_id}[/bold]: trained on {metrics.get('n_train')} structures, "
        f"property-head MAPE on train {metrics.get('train_property_mape', float('nan')):.3f}"
    )


def _targets(values: list[float]) -> list[float]:
    """--target: finite, positive K_vrh values in GPa, refused before anything loads."""
    bad = [v for v in values if not (math.isfinite(v) and v > 0)]
    if bad:
        raise typer.BadParameter(f"targets must be finite, positive K_vrh values in GPa, got {bad[0]:g}")
    return values


def _out_folder(path: Path) -> Path:
    """--out: a folder to create or reuse; an existing file there is refused (nothing is written)."""
    if path.exists() and not path.is_dir():
        raise typer.BadParameter(f"{path} exists and is not a folder")
    if not path.exists() and any(p.exists() and not p.is_dir() for p in path.parents):
        raise typer.BadParameter(f"{path} cannot be a folder: a file stands in its path")
    return path


@app.command("generate")
def generate_cmd(
    target: Annotated[
        list[float], typer.Option("--target", help="Target K_vrh in GPa (repeatable).", callback=_targets)
    ],
    n: Annotated[int, typer.Option("--n", callback=at_least(1), help="Structures to keep per target.")] = 100,
    samples_per_kept: Annotated[
        int,
        typer.Option(
            "--samples-per-kept", callback=at_least(1), help="Samples drawn per kept structure (keep the best 1/N)."
        ),
    ] = 500,
    out: Annotated[
        Path, typer.Option("--out", help="Folder for CIF, extxyz and scores.csv.", callback=_out_folder)
    ] = Path("generated"),
    model_id: Annotated[str | None, typer.Option("--model-id", help="Generator model id (default: latest).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Generate crystals at target K_vrh and write them as files (the lake is not changed; the flow records)."""
    with heavy_imports():
        from ase.io import write as ase_write
        from pymatgen.io.cif import CifWriter

        from core.generator import generate
        from core.metrics import mape
        from core.structures import structure_id, to_atoms
        from storage import Lake
        from storage.registry import ModelNotFoundError
        from tasks.generate import derive_seed, load_registered_generator
    lake = Lake()
    try:
        mid, generator = load_registered_generator(lake.url, model_id)
    except ModelNotFoundError as exc:
        raise typer.BadParameter(str(exc), param_hint="--model-id") from None
    out.mkdir(parents=True, exist_ok=True)
    rows, frames, summary = [], [], []
    for t in target:
        kept = generate(generator, [t], n, samples_per_kept, derive_seed(seed, t)).kept
        for i, (s, score) in enumerate(zip(kept.structures, kept.scores, strict=True)):
            name = f"k{t:g}_{i:04d}_{s.composition.reduced_formula}"
            CifWriter(s).write_file(out / f"{name}.cif")
            atoms = to_atoms(s)
            atoms.info.update(target_k_vrh=t, generator_score=float(score), generator_model_id=mid)
            frames.append(atoms)
            rows.append(
                {
                    "file": f"{name}.cif",
                    "structure_id": structure_id(s),
                    "formula": s.composition.reduced_formula,
                    "nsites": len(s),
                    "target_k_vrh": t,
                    "generator_score": round(float(score), 3),
                    "generator_model_id": mid,
                }
            )
        summary.append(
            {"target": t, "n_sampled": n * samples_per_kept, "n_kept": len(kept), "head_mape": mape(kept.scores, t)}
        )
    if frames:
        ase_write(out / "structures.extxyz", frames, format="extxyz")
    with open(out / "scores.csv", "w", newline="") as fh:
        writer = csv.DictWriter(
            fh,
            fieldnames=[
                "file",
                "structure_id",
                "formula",
                "nsites",
                "target_k_vrh",
                "generator_score",
                "generator_model_id",
            ],
        )
        writer.writeheader()
        writer.writerows(rows)
    if as_json:
        typer.echo(json.dumps({"model_id": mid, "out": str(out), "targets": summary}, indent=2))
        return
    table = new_table(title=f"generator {mid} → {out}")
    for col in ("target (GPa)", "sampled", "kept", "head MAPE"):
        table.add_column(col)
    for r in summary:
        table.add_row(f"{r['target']:g}", str(r["n_sampled"]), str(r["n_kept"]), f"{r['head_mape']:.3f}")
    console.print(table)
