"""The lake: schemas, atomic appends, supersession, read-only SQL, other clients."""

from __future__ import annotations

import multiprocessing as mp

import duckdb
import polars as pl
import pyarrow.parquet as pq
import pytest
from pymatgen.core import Lattice, Structure

from core.structures import to_row
from storage import Lake
from storage.lake import ReadOnlyQueryError
from storage.schemas import KEYS, PARTITION, SCHEMAS


def structure_rows(n: int, source: str = "test") -> list[dict]:
    rows = []
    for i in range(n):
        s = Structure(Lattice.cubic(3.0 + 0.01 * i), ["Cu", "Zn"], [[0, 0, 0], [0.5, 0.5, 0.5]])
        rows.append({**to_row(s), "source": source, "split": "train"})
    return rows


def test_every_table_has_schema_partition_key_and_provenance():
    for table, schema in SCHEMAS.items():
        assert PARTITION[table] in schema.names
        assert set(KEYS[table]) <= set(schema.names)
        assert {"run_id", "code_version", "created_at"} <= set(schema.names)


def test_fresh_lake_has_typed_empty_views(lake):
    assert lake.counts() == dict.fromkeys(SCHEMAS, 0)
    cols = lake.query("SELECT * FROM candidates").column_names
    assert set(cols) == set(SCHEMAS["candidates"].names)


def test_append_is_hive_partitioned_and_fills_provenance(lake):
    assert lake.append("structures", structure_rows(3), run_id="run-1") == 3
    files = lake.files("structures")
    assert len(files) == 1 and "/structures/source=test/part-" in files[0]
    assert "source" not in pq.read_schema(files[0]).names  # the partition lives in the path
    rows = lake.read("structures").to_pylist()
    assert {r["run_id"] for r in rows} == {"run-1"}
    assert all(r["code_version"].startswith("matloop ") and r["created_at"] is not None for r in rows)
    assert {r["source"] for r in rows} == {"test"}


def test_unknown_column_and_null_partition_are_refused(lake):
    with pytest.raises(ValueError, match="not in the schema"):
        lake.append("structures", [{"structure_id": "x", "source": "a", "colour": "red"}])
    with pytest.raises(ValueError, match="partition column"):
        lake.append("structures", [{"structure_id": "x"}])
    with pytest.raises(ValueError, match="unknown table"):
        lake.append("nope", [{"a": 1}])
    assert lake.counts()["structures"] == 0


def test_newer_row_supersedes_and_history_keeps_both(lake):
    base = {"structure_id": "s1", "name": "k_vrh", "method": "dft:gpaw/abc", "unit": "GPa"}
    lake.append("properties", [{**base, "value": 100.0}])
    lake.append("properties", [{**base, "value": 120.0}])
    assert lake.query("SELECT value FROM properties").column("value").to_pylist() == [120.0]
    assert sorted(lake.query("SELECT value FROM properties_history").column("value").to_pylist()) == [100.0, 120.0]
    assert len(lake.files("properties")) == 2  # nothing rewritten


def test_crash_mid_write_leaves_nothing_visible(lake, monkeypatch):
    lake.append("structures", structure_rows(2))

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", boom)
    with pytest.raises(OSError, match="disk full"):
        lake.append("structures", structure_rows(5))
    monkeypatch.undo()
    assert lake.counts()["structures"] == 2
    assert len(lake.files("structures")) == 1


def _append_worker(root: str, source: str) -> None:
    Lake(root).append("structures", structure_rows(50, source=source))


def test_two_processes_appending_at_once_both_land(tmp_path):
    root = str(tmp_path / "lake")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append_worker, args=(root, src)) for src in ("a", "a")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    history = Lake(root).query("SELECT count(*) AS n FROM structures_history").column("n")[0].as_py()
    assert history == 100


@pytest.mark.parametrize(
    "statement",
    [
        "DELETE FROM structures",
        "DROP VIEW structures",
        "CREATE TABLE t AS SELECT 1",
        "INSERT INTO structures_history SELECT * FROM structures",
        "COPY structures TO 'x.csv'",
        "ATTACH 'other.duckdb'",
        "SELECT 1; DELETE FROM properties",
    ],
)
def test_sql_entry_point_is_read_only(lake, statement):
    lake.append("structures", structure_rows(2))
    with pytest.raises(ReadOnlyQueryError, match="read-only"):
        lake.query(statement)
    assert lake.counts()["structures"] == 2


def test_polars_and_duckdb_catalog_read_the_same_rows(lake):
    lake.append("structures", structure_rows(4))
    frame = pl.scan_parquet(lake.path("structures", "**", "*.parquet"), hive_partitioning=True).collect()
    assert frame.height == 4 and set(frame["source"].to_list()) == {"test"}
    path = lake.write_catalog()
    con = duckdb.connect(str(path), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM structures").fetchall() == [(4,)]
        with pytest.raises(duckdb.Error):
            con.execute("CREATE TABLE x AS SELECT 1")
    finally:
        con.close()


def test_fsspec_url_root(tmp_path):
    lake = Lake("memory://matloop-test-lake")
    lake.append("structures", structure_rows(3))
    assert lake.counts()["structures"] == 3
    file_lake = Lake(f"file://{tmp_path}/lake2")
    file_lake.append("structures", structure_rows(1))
    assert Lake(tmp_path / "lake2").counts()["structures"] == 1


def test_lake_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MATLOOP_LAKE", str(tmp_path / "envlake"))
    assert Lake().root == str((tmp_path / "envlake").resolve())


def test_the_writer_lock_survives_a_sigkilled_holder(tmp_path):
    """A lock held by a process that is SIGKILLed is free at once (flock), and a waiter names the holder."""
    import signal
    import subprocess
    import sys
    import time

    root = tmp_path / "lake"
    code = (
        "import sys, time\nfrom storage.lake import Lake\n"
        f"with Lake({str(root)!r}).exclusive('ingest'):\n    print('held', flush=True)\n    time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    lake = Lake(root)
    with pytest.raises(TimeoutError, match="ingest lock"), lake.exclusive("ingest", timeout=0.5):
        pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    t0 = time.monotonic()
    with lake.exclusive("ingest", timeout=5):
        assert time.monotonic() - t0 < 2
