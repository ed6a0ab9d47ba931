"""The `matloop` command as a user runs it: ingest, status, sql in every format, catalog."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


@pytest.fixture
def filled(tmp_path, shared_data):
    root = str(tmp_path / "lake")
    result = runner.invoke(app, ["--lake", root, "ingest", str(shared_data / "elastic_tensor_2015.json.gz")])
    assert result.exit_code == 0, result.output
    assert "landed 852" in result.output and "filtered (metals_only): 180" in result.output
    return root


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("sql", "status", "ingest", "catalog", "train"):
        assert command in result.output


def test_status_counts_rows(filled):
    result = runner.invoke(app, ["--lake", filled, "status"])
    assert result.exit_code == 0
    assert "structures" in result.output and "852" in result.output
    assert "latest iteration: none yet" in result.output


def test_sql_formats(filled, tmp_path):
    query = "SELECT reduced_formula, nsites FROM structures WHERE reduced_formula = 'Ir'"
    table = runner.invoke(app, ["--lake", filled, "sql", query])
    assert table.exit_code == 0 and "Ir" in table.output
    as_json = runner.invoke(app, ["--lake", filled, "sql", query, "--format", "json"])
    assert json.loads(as_json.output) == [{"reduced_formula": "Ir", "nsites": 4}]  # conventional fcc cell
    as_csv = runner.invoke(app, ["--lake", filled, "sql", query, "-f", "csv"])
    assert as_csv.output.splitlines() == ['"reduced_formula","nsites"', '"Ir",4']
    out = tmp_path / "ir.parquet"
    as_parquet = runner.invoke(app, ["--lake", filled, "sql", query, "-f", "parquet", "-o", str(out)])
    assert as_parquet.exit_code == 0 and pq.read_table(out).num_rows == 1
    no_output = runner.invoke(app, ["--lake", filled, "sql", query, "-f", "parquet"])
    assert no_output.exit_code != 0


def test_sql_refuses_writes_and_changes_nothing(filled):
    result = runner.invoke(app, ["--lake", filled, "sql", "DELETE FROM structures"])
    assert result.exit_code == 2 and "read-only" in result.output
    count = runner.invoke(app, ["--lake", filled, "sql", "SELECT count(*) AS n FROM structures", "-f", "json"])
    assert json.loads(count.output) == [{"n": 852}]
    bad = runner.invoke(app, ["--lake", filled, "sql", "SELEC nonsense"])
    assert bad.exit_code == 2 and "query failed" in bad.output


def test_catalog_file_opens_in_duckdb(filled):
    result = runner.invoke(app, ["--lake", filled, "catalog"])
    assert result.exit_code == 0
    con = duckdb.connect(f"{filled}/catalog.duckdb", read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM structures").fetchall() == [(852,)]
    finally:
        con.close()


def test_catalog_opens_in_the_duckdb_cli_the_setup_installs(filled):
    """The duckdb command-line client (duckdb-cli 1.5.6, a dev dependency) reads the catalog DuckDB 2.0 wrote."""
    assert runner.invoke(app, ["--lake", filled, "catalog"]).exit_code == 0
    cli = Path(sys.executable).with_name("duckdb")
    out = subprocess.run(
        [str(cli), "-readonly", "-csv", f"{filled}/catalog.duckdb", "-c", "SELECT count(*) AS n FROM structures"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and out.stdout.split() == ["n", "852"], out.stderr


def test_ingest_bad_source_exits_nonzero(tmp_path):
    result = runner.invoke(app, ["--lake", str(tmp_path / "l"), "ingest", "/nonexistent.json.gz"])
    assert result.exit_code == 1 and "unknown source" in result.output


HEAVY = ("torch", "prefect", "pymatgen", "ase", "duckdb", "pyarrow")


def _loaded_after(code: str) -> list[str]:
    """Which heavy libraries a fresh interpreter has imported after running ``code``."""
    probe = f"import sys\n{code}\nprint('loaded:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith("loaded:"), out.stdout
    return [m for m in line.removeprefix("loaded:").split(",") if m]


def test_the_cli_loads_no_model_library_before_a_command_runs():
    """`matloop --help` and argument errors answer at once: no torch, prefect, pymatgen, duckdb at import."""
    assert _loaded_after("import flows.cli") == []
    code = (
        "from typer.testing import CliRunner\nfrom flows.cli import app\n"
        "r = CliRunner().invoke(app, ['generate', '--target', '-5'])\nassert r.exit_code == 2, r.output\n"
        "r = CliRunner().invoke(app, ['run', '--size', 'huge'])\n"
        "assert r.exit_code == 2 and 'laptop' in r.output, r.output"
    )
    assert _loaded_after(code) == []
