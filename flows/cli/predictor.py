"""CLI commands for the property predictor: ``matloop train predictor`` and ``matloop predict``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from flows.cli import app, console, first_line, heavy_imports, new_table, refuse, train_app

if TYPE_CHECKING:
    from storage import Lake

_REQUIRED = ("lattice", "species", "frac_coords")


def _parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs (values parsed as JSON where they parse, else kept as strings)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected key=value, got {pair!r}", param_hint="--set")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


@train_app.command("predictor")
def train_predictor_cmd(
    config: Annotated[
        str, typer.Option("--config", help="Named CGCNN config (core.cgcnn.PRESETS: default, small).")
    ] = "default",
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Config override key=value (value parsed as JSON), e.g. --set n_models=2."),
    ] = None,
    shear: Annotated[
        bool, typer.Option("--shear", help="Train the shear predictor (G_vrh: stage I's G for a design) instead of K.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Train the CGCNN ensemble on the lake's labeled data (cached: unchanged data and code return the same model)."""
    with heavy_imports():
        from core.cgcnn import PRESETS
        from flows.train import TrainParams, metrics_table, train
        from storage import Lake
        from storage.registry import get_model
    if config not in PRESETS:
        raise typer.BadParameter(f"unknown config {config!r}; choose from {', '.join(PRESETS)}", param_hint="--config")
    lake = Lake()
    what = "shear_predictor" if shear else "predictor"
    params = TrainParams(
        lake_url=lake.url, what=[what], predictor_config=config, predictor_overrides=_parse_overrides(set_ or [])
    )
    model_id = train(params)[what]
    metrics = get_model(lake, model_id).metrics
    if as_json:
        typer.echo(json.dumps({"model_id": model_id, "metrics": metrics}, indent=2))
        return
    table = new_table(title=f"CGCNN {model_id}")
    modulus = "G" if shear else "K"
    for col in ("split", "model", "n", f"MAE log10 {modulus}", f"MAE {modulus} (GPa)"):
        table.add_column(col)
    for r in metrics_table(model_id, metrics):
        table.add_row(r["split"], r["model"], str(r["n"]), f"{r['mae_log10']:.4f}", f"{r['mae_gpa']:.1f}")
    console.print(table)


def _rows_from_files(files: list[Path]) -> list[dict[str, Any]]:
    """Structure rows of the files; the first unreadable or non-physical one exits 2 naming the file."""
    from pymatgen.core import Element, Structure

    from core.ingest import check_cif_values
    from core.structures import to_row

    rows = []
    for f in files:
        with warnings.catch_warnings(record=True) as caught:  # a refused file gets one line, not the reader's noise
            warnings.simplefilter("always")
            try:
                if f.suffix.lower() == ".cif":
                    check_cif_values(f)  # the readers wrap wild coordinates into the cell and accept any six numbers
                structure = Structure.from_file(f)
                unknown = sorted(
                    {getattr(sp, "symbol", str(sp)) for sp in structure.composition if not isinstance(sp, Element)}
                )
                if unknown:  # pymatgen reads an unknown symbol as a dummy species, with only a warning
                    raise ValueError(f"unknown element {unknown[0]!r}")
                row = to_row(structure)
            except Exception as exc:  # pymatgen raises many types for unreadable files
                refuse(f"cannot read a structure from {f}: {first_line(exc)}")
        for w in caught:  # a file that reads: its reader's warnings still show
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        rows.append({**row, "name": str(f)})
    return rows


def _rows_from_sql(lake: Lake, sql: str) -> list[dict[str, Any]]:
    """Structure rows a read-only query selects; a write, a bad query or missing columns exit 2."""
    from storage.lake import ReadOnlyQueryError

    try:
        table = lake.query(sql)
    except ReadOnlyQueryError as exc:
        refuse(str(exc))
    except Exception as exc:  # DuckDB parser/binder errors
        refuse(f"query failed: {first_line(exc)}")
    missing = [c for c in ("structure_id", *_REQUIRED) if c not in table.column_names]
    if missing:
        raise typer.BadParameter(
            f"the query must return structure columns; missing {missing} (try SELECT * FROM structures ...)",
            param_hint="--sql",
        )
    return [{**r, "name": r["structure_id"]} for r in table.to_pylist()]


@app.command()
def predict(
    files: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Structure files (CIF, POSCAR, ...).", show_default=False, exists=True, dir_okay=False, readable=True
        ),
    ] = None,
    sql: Annotated[
        str | None, typer.Option("--sql", help='Structures to predict: "SELECT * FROM structures WHERE ..."')
    ] = None,
    model_id: Annotated[str | None, typer.Option("--model", help="Model id (default: the latest CGCNN).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print predictions as JSON.")] = False,
) -> None:
    """Predict K_vrh (GPa) with its ensemble uncertainty for structure files or a SQL selection of the lake."""
    if bool(files) == bool(sql):
        raise typer.BadParameter("give structure FILEs or --sql, not both or neither")
    with heavy_imports():
        from storage import Lake
        from storage.registry import ModelNotFoundError
        from tasks.train import load_predictor
    lake = Lake()
    rows = _rows_from_files(files) if files else _rows_from_sql(lake, sql or "")  # bad input: refused before loading
    try:
        used_id, ensemble = load_predictor(lake, model_id)
    except ModelNotFoundError as exc:
        refuse(str(exc))
    if not rows:
        console.print("no structures selected")
        return
    pred = ensemble.predict_rows(rows)
    results = [
        {
            "name": r["name"],
            "structure_id": r["structure_id"],
            "formula": _formula(r),
            "k_vrh": round(float(pred.k_vrh[i]), 2),
            "k_vrh_std": round(float(pred.k_vrh_std[i]), 2),
            "log10_k": round(float(pred.log10_k[i]), 4),
            "log10_k_std": round(float(pred.log10_k_std[i]), 4),
            "model_id": used_id,
        }
        for i, r in enumerate(rows)
    ]
    if as_json:
        typer.echo(json.dumps(results, indent=2))
        return
    table = new_table(title=f"K_vrh from CGCNN {used_id}")
    for col in ("structure", "formula", "K_vrh (GPa)", "± (GPa)"):
        table.add_column(col)
    for r in results:
        table.add_row(r["name"], r["formula"], f"{r['k_vrh']:.1f}", f"{r['k_vrh_std']:.1f}")
    console.print(table)


def _formula(row: dict[str, Any]) -> str:
    """The row's reduced formula (computed from species where the query did not select the column)."""
    from core.structures import reduced_formula

    return row.get("reduced_formula") or reduced_formula(list(row["species"]))
