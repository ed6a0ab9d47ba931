"""CLI commands over the lake: ingest data, query it with SQL, summarize it."""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from flows.cli import app, at_least, build_params, console, first_line, heavy_imports, new_table

if TYPE_CHECKING:
    import pyarrow as pa


class OutputFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"
    parquet = "parquet"


def print_table(data: pa.Table, title: str | None = None, max_rows: int = 50) -> None:
    """A pyarrow table as a terminal table (long cells and tables are cut, with a note)."""
    table = new_table(title=title, show_lines=False)
    for name in data.column_names:
        table.add_column(name, overflow="fold")
    for row in data.slice(0, max_rows).to_pylist():
        table.add_row(*(_cell(v) for v in row.values()))
    console.print(table)
    if data.num_rows > max_rows:
        console.print(f"... {data.num_rows - max_rows} more rows (use --format csv or parquet for all)")


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = "" if value is None else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _output_file(path: Path | None) -> Path | None:
    """--output: a file to write in an existing folder, refused before the query runs."""
    if path is not None and (path.is_dir() or not path.parent.is_dir()):
        raise typer.BadParameter(f"cannot write {path}: " + ("it is a folder" if path.is_dir() else "no such folder"))
    return path


@app.command()
def sql(
    query: Annotated[str, typer.Argument(help="Read-only SQL over the lake's views, e.g. SELECT * FROM candidates")],
    format: Annotated[OutputFormat, typer.Option("--format", "-f", help="Output format.")] = OutputFormat.table,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here (needed for parquet).", callback=_output_file)
    ] = None,
) -> None:
    """Query the lake with SQL (read-only). Views: structures, properties, candidates, jobs, models,
    iterations, quarantine (newest row per key) and <table>_history (every row)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from storage import Lake
    from storage.lake import ReadOnlyQueryError

    try:
        result = Lake().query(query)
    except ReadOnlyQueryError as exc:
        console.print(f"[red]refused:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(2) from None
    except Exception as exc:  # DuckDB parser/binder errors: show them plainly, on one line
        console.print(f"[red]query failed:[/red] {first_line(exc)}", soft_wrap=True)
        raise typer.Exit(2) from None
    if format is OutputFormat.table:
        print_table(result)
        return
    if format is OutputFormat.parquet:
        if output is None:
            raise typer.BadParameter("--format parquet needs --output FILE", param_hint="--output")
        tmp = output.with_name(output.name + ".tmp")
        pq.write_table(result, tmp)
        tmp.replace(output)
        return
    if format is OutputFormat.csv:
        sink = pa.BufferOutputStream()
        pacsv.write_csv(result, sink)
        text = sink.getvalue().to_pybytes().decode()
    else:
        import json

        text = json.dumps(result.to_pylist(), default=str, indent=1)
    if output:
        output.write_text(text)
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


@app.command()
def status() -> None:
    """Row counts per table and the latest iteration."""
    from storage import Lake

    lake = Lake()
    counts = lake.counts()
    table = new_table(title=f"lake {lake.url}")
    table.add_column("table")
    table.add_column("rows", justify="right")
    for name, n in counts.items():
        table.add_row(name, str(n))
    console.print(table)
    latest = lake.query("SELECT max(iteration) AS it FROM iterations").column("it")[0].as_py()
    console.print(f"latest iteration: {latest if latest is not None else 'none yet'}")
    if latest is not None:
        print_table(
            lake.query(
                "SELECT target, n_generated, n_kept, n_gnn_pass, n_fam_pass, n_labeled, mape_gnn, dft_k_mean "
                "FROM iterations WHERE iteration = ? ORDER BY target",
                [latest],
            ),
            title=f"iteration {latest}",
        )


@app.command()
def ingest(
    source: Annotated[
        str,
        typer.Argument(
            help="seed (the embedded FAM-labeled alloy set), matbench_log_kvrh (downloaded), "
            "a matbench/matminer/MP JSON(.gz) file, or a folder of structure files"
        ),
    ],
    properties: Annotated[
        Path | None,
        typer.Option(
            help="CSV of properties for a folder (columns: file, k_vrh, g_vrh, ...)",
            exists=True,
            dir_okay=False,
            readable=True,
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Source name stored on the rows (default: from the file)")] = None,
    max_sites: Annotated[int, typer.Option(callback=at_least(0), help="Drop cells with more atoms (0: keep all)")] = 20,
    k_min: Annotated[float, typer.Option(help="Drop K_vrh <= this, GPa")] = 0.0,
    k_max: Annotated[float, typer.Option(help="Drop K_vrh > this, GPa")] = 500.0,
    max_formation_energy: Annotated[float, typer.Option(help="Drop E_form above this, eV/atom (where known)")] = 0.150,
    all_elements: Annotated[
        bool, typer.Option("--all-elements", help="Keep non-metals, noble gases, actinides")
    ] = False,
) -> None:
    """Add a data source to the lake: structures and their K_vrh, G_vrh (and elastic tensors).

    Bad entries go to the quarantine table with a reason; entries outside the alloy domain are
    dropped by named filters; both are counted. Ingesting the same source twice adds nothing.
    """
    with heavy_imports():
        from tqdm import tqdm

        from core.ingest import IngestError, IngestFilters
        from storage import Lake
        from storage.ingest import ingest as run_ingest

    filters = build_params(
        IngestFilters,
        metals_only=not all_elements,
        max_sites=max_sites or None,
        k_vrh_min=k_min,
        k_vrh_max=k_max,
        max_formation_energy=max_formation_energy,
    )
    try:
        report = run_ingest(
            Lake(),
            source,
            filters=filters,
            name=name,
            properties_csv=properties,
            progress=lambda it: tqdm(it, desc=f"ingest {source}", unit=" records", file=sys.stderr, leave=False),
        )
    except IngestError as exc:
        console.print(f"[red]ingest failed:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(1) from None
    for line in report.lines():
        console.print(line)


@app.command()
def catalog() -> None:
    """Write the DuckDB catalog file (views over the lake) for the duckdb CLI, polars or BI tools."""
    from storage import Lake

    path = Lake().write_catalog()
    console.print(f"catalog written: {path}\n  duckdb -readonly {path} -c 'SELECT * FROM candidates LIMIT 5'")
