"""The lake: append-only, Hive-partitioned Parquet tables under one root (local path or fsspec URL).

Writes are atomic: each append writes a new file under a temporary name that no reader globs
(``*.parquet.tmp``), then renames it to ``part-<time>-<uuid>.parquet``. Two processes appending
at once write different files, so both land; a crash leaves at most a stray ``.tmp`` file that
no view reads. Rows are never rewritten: a newer row supersedes an older one for the same key.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from core.provenance import code_version, new_run_id, utcnow
from core.settings import get_settings
from storage.conditions import CONDITION_VIEWS
from storage.ledger import LEDGER_VIEWS
from storage.schemas import KEYS, PARTITION, SCHEMAS

_VIEW_DATABASES: dict[tuple[int, str, frozenset[str]], duckdb.DuckDBPyConnection] = {}
"""``Lake.connect``'s databases with the views built, least recently used first."""
_VIEW_DATABASES_LOCK = threading.Lock()
_VIEW_DATABASES_KEPT = 16
atexit.register(_VIEW_DATABASES.clear)  # freed before the interpreter tears DuckDB's module down
_SAFE_PARTITION = re.compile(r"^[A-Za-z0-9._+@-]+$")
_READ_ONLY_TYPES = {"SELECT", "EXPLAIN"}


class ReadOnlyQueryError(ValueError):
    """Raised when a query given to the SQL entry point would change something."""


class LakeLockedError(TimeoutError):
    """A lake lock is held by another run; the message names it (what, pid, host, since when)."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds a lake lock: written into the lock file so that a refused writer can name it."""

    who: str
    token: str
    pid: int
    host: str
    since: datetime

    def describe(self) -> str:
        if not self.pid:  # a record this code did not write
            return self.who
        return f"{self.who} (pid {self.pid} on {self.host}, since {self.since:%Y-%m-%d %H:%M:%S} UTC)"

    def as_json(self) -> dict[str, Any]:
        return {
            "who": self.who,
            "token": self.token,
            "pid": self.pid,
            "host": self.host,
            "since": self.since.isoformat(),
        }


_WARNED_REMOTE: set[str] = set()


def _read_holder(fh: Any) -> LockHolder | None:
    """The holder record of a lock file (None while the holder has not written it yet, or for an old format)."""
    for _ in range(10):  # the holder writes its record just after taking the lock
        fh.seek(0)
        text = fh.read().strip()
        if text:
            try:
                d = json.loads(text)
                return LockHolder(d["who"], d["token"], int(d["pid"]), d["host"], datetime.fromisoformat(d["since"]))
            except (ValueError, KeyError, TypeError):
                return LockHolder(text, "", 0, "", utcnow())
        time.sleep(0.05)
    return None


def _duck_type(t: pa.DataType) -> str:
    """DuckDB type of an Arrow type, for typed empty views and hive partition columns."""
    if pa.types.is_string(t):
        return "VARCHAR"
    if pa.types.is_int32(t):
        return "INTEGER"
    if pa.types.is_int64(t):
        return "BIGINT"
    if pa.types.is_float64(t):
        return "DOUBLE"
    if pa.types.is_timestamp(t):
        return "TIMESTAMPTZ"
    if pa.types.is_list(t):
        return _duck_type(t.value_type) + "[]"
    raise TypeError(f"no DuckDB type for {t}")


class Lake:
    """A lake root and its tables. ``Lake()`` uses MATLOOP_LAKE or ``./lake``."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        url = str(root or get_settings().lake)  # None or "" (a form left empty): the configured lake
        self.fs, path = fsspec.core.url_to_fs(url)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self.root = str(Path(path).resolve()) if self.local else path
        self.url = self.root if self.local else f"{self._protocol}://{self.root}"

    def __repr__(self) -> str:
        return f"Lake({self.url!r})"

    @property
    def _protocol(self) -> str:
        p = self.fs.protocol
        return p[0] if isinstance(p, tuple) else p

    # ---------- locks ----------
    @contextmanager
    def exclusive(
        self, name: str, timeout: float = 3600.0, *, who: str = "", token: str = "", join: str = ""
    ) -> Iterator[LockHolder]:
        """Hold the lake's ``name`` lock; yields the holder record (``who``, ``token``, pid, host, start).

        Writers that check what is there and then append take it (``ingest``); a loop run holds
        ``loop`` from start to end. The lock is an advisory ``flock`` on ``<lake>/.locks/<name>.lock``:
        the kernel drops it when its holder exits, SIGKILL included, so a lock is never stale, and
        the file names the holder. While another holds it, this waits up to ``timeout`` s (0: not at
        all) and then raises :class:`LakeLockedError` naming the holder. ``join`` shares a lock
        already held under that token (a loop's own stage flows, in this process or another) instead
        of waiting: the joiner holds nothing itself. ``token`` defaults to a new random one.

        A non-local (fsspec) lake has no lock a process death frees: its lock file lives on this
        host (``<cache_dir>/locks``), so it excludes writers on this machine only (logged once).
        """
        import fcntl
        import sys

        path = self._lock_path(name)
        token = token or uuid.uuid4().hex
        with open(path, "a+") as fh:
            deadline = time.monotonic() + max(timeout, 0.0)
            said = False
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    holder = _read_holder(fh)
                    if join and holder is not None and holder.token == join:
                        yield holder  # the lock of the run this one belongs to: share it
                        return
                    text = holder.describe() if holder else "another process"
                    if time.monotonic() >= deadline:
                        waited = f" after {timeout:.0f} s" if timeout > 0 else ""
                        raise LakeLockedError(f"the {name} lock of {self.url} is held{waited} by {text}") from None
                    if not said:
                        print(f"waiting for the {name} lock of {self.url}, held by {text}", file=sys.stderr)
                        said = True
                    time.sleep(0.2)
            holder = LockHolder(who or f"pid {os.getpid()}", token, os.getpid(), socket.gethostname(), utcnow())
            fh.seek(0)
            fh.truncate()
            fh.write(json.dumps(holder.as_json()) + "\n")
            fh.flush()
            try:
                yield holder
            finally:
                fh.seek(0)
                fh.truncate()
                fcntl.flock(fh, fcntl.LOCK_UN)

    def sweep_partial(self) -> list[str]:
        """Delete the temporary files that killed writers left (``*.tmp`` in tables, models, figures, plots).

        No view reads them, but they are partial files all the same. Call it only while no other
        writer can be mid-write: the loop does, holding the loop lock and the ingest lock.
        Returns the lake-relative paths removed.
        """
        removed = []
        for folder in (*SCHEMAS, "models", "figures", "plots"):
            for path in self.fs.glob(self.path(folder, "**", "*.tmp")):
                self.fs.rm(path)
                removed.append(path[len(self.root) :].lstrip("/"))
        return removed

    def loop_lock(self, who: str, join: str = "", token: str = "") -> AbstractContextManager[LockHolder]:
        """The lock a loop run holds from start to end (its stage flows ``join`` it): refused at once if held."""
        return self.exclusive("loop", timeout=0, who=who, token=token, join=join)

    def _lock_path(self, name: str) -> Path:
        if not _SAFE_PARTITION.match(name):
            raise ValueError(f"lock name {name!r} may hold only letters, digits and ._+@-")
        if self.local:
            folder = Path(self.path(".locks"))
        else:
            folder = Path(get_settings().cache_dir).expanduser() / "locks"
            if self.url not in _WARNED_REMOTE:
                _WARNED_REMOTE.add(self.url)
                logging.getLogger(__name__).warning(
                    "%s is not a local lake: its %s lock excludes writers on this host only (%s)",
                    self.url,
                    name,
                    socket.gethostname(),
                )
            scope = f"{self.url}#{os.getpid()}" if self._protocol == "memory" else self.url  # memory: per process
            name = f"{hashlib.sha256(scope.encode()).hexdigest()[:16]}-{name}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{name}.lock"

    # ---------- paths ----------
    def path(self, *parts: str) -> str:
        """A path (not URL) under the root, for files the platform keeps (models, plots)."""
        return "/".join([self.root.rstrip("/"), *parts])

    def uri(self, *parts: str) -> str:
        """A URL-or-path under the root that fsspec and DuckDB both open."""
        p = self.path(*parts)
        return p if self.local else f"{self._protocol}://{p}"

    def files(self, table: str) -> list[str]:
        """The table's committed Parquet files."""
        _check_table(table)
        return sorted(self.fs.glob(self.path(table, "*", "*.parquet")))

    # ---------- writes ----------
    def append(self, table: str, rows: Sequence[Mapping[str, Any]] | pa.Table, *, run_id: str | None = None) -> int:
        """Append rows to a table atomically; fills provenance columns left empty. Returns rows written."""
        schema = _check_table(table)
        data = rows if isinstance(rows, pa.Table) else _table_from_rows(rows, schema)
        if data.num_rows == 0:
            return 0
        data = _with_provenance(data, schema, run_id)
        part_col = PARTITION[table]
        values = data.column(part_col)
        if values.null_count:
            raise ValueError(f"{table}.{part_col} is the partition column and may not be null")
        for value in pa.compute.unique(values).to_pylist():
            chunk = data.filter(pa.compute.equal(values, pa.scalar(value, values.type)))
            self._write_atomic(table, part_col, value, chunk.drop_columns([part_col]))
        return data.num_rows

    def append_new(self, table: str, rows: Sequence[Mapping[str, Any]], *, run_id: str | None = None) -> int:
        """Append the rows that are not already the current row of their key, payload for payload.

        For writers whose rerun after a kill recomputes nothing (a cached result) and would append
        the very rows the killed run had already written: a row equal to the current one of its
        key (provenance aside) is a twin and is dropped; a changed row still supersedes. Returns
        rows written.
        """
        schema = _check_table(table)
        rows = list(rows)
        if not rows:
            return 0
        keys = KEYS[table]
        typed = _table_from_rows(rows, schema).to_pylist()  # values as the table holds them (None for missing)
        first = sorted({r[keys[0]] for r in typed if r[keys[0]] is not None})
        current = self.query(f"SELECT * FROM {table} WHERE list_contains(?, {keys[0]})", [first]).to_pylist()
        have = {tuple(c[k] for k in keys): _payload(c) for c in current}
        fresh = [r for r, t in zip(rows, typed, strict=True) if have.get(tuple(t[k] for k in keys)) != _payload(t)]
        return self.append(table, fresh, run_id=run_id) if fresh else 0

    def _write_atomic(self, table: str, col: str, value: Any, data: pa.Table) -> None:
        text = str(value)
        if not _SAFE_PARTITION.match(text):
            raise ValueError(f"partition value {text!r} for {table}.{col} may hold only letters, digits and ._+@-")
        folder = self.path(table, f"{col}={text}")
        self.fs.makedirs(folder, exist_ok=True)
        name = f"part-{utcnow():%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = f"{folder}/{name}.tmp"
        with self.fs.open(tmp, "wb") as fh:
            pq.write_table(data, fh, compression="zstd")
        self.fs.mv(tmp, f"{folder}/{name}")

    def put_file(self, local_path: str | os.PathLike[str], *parts: str) -> str:
        """Copy a local file (checkpoint, plot) into the lake atomically; returns its lake-relative path."""
        dest = self.path(*parts)
        self.fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
        self.fs.put_file(str(local_path), dest + ".tmp")
        self.fs.mv(dest + ".tmp", dest)
        return "/".join(parts)

    # ---------- reads ----------
    def connect(self) -> duckdb.DuckDBPyConnection:
        """A DuckDB connection with every table as a view (latest rows) and ``<t>_history``: a cursor of one
        in-memory database per process, lake and set of tables that hold files, whose views re-read the files at
        every query, so they change only when a table gains its first file (building them costs tens of ms)."""
        filled = self._filled()
        key = (os.getpid(), self.url, filled)
        with _VIEW_DATABASES_LOCK:
            base = _VIEW_DATABASES.pop(key, None)
            if base is None:
                base = duckdb.connect()
                if not self.local:
                    base.register_filesystem(self.fs)
                self._create_views(base, filled)
            _VIEW_DATABASES[key] = base  # most recently used last
            while len(_VIEW_DATABASES) > _VIEW_DATABASES_KEPT:  # dropped, not closed: that would close its cursors
                del _VIEW_DATABASES[next(iter(_VIEW_DATABASES))]
            return base.cursor()

    def _filled(self) -> frozenset[str]:
        """The tables that hold at least one committed file."""
        return frozenset(t for t in SCHEMAS if self.files(t))

    def _create_views(self, con: duckdb.DuckDBPyConnection, filled: frozenset[str]) -> None:
        """Every table as ``<t>_history`` (all rows) and ``<t>`` (current rows), then the derived views
        (``storage.ledger``: the cost ledger; ``storage.conditions``: verdicts per design condition).

        The files of the ``filled`` tables are read by name against a typed, empty relation of the whole schema
        (``UNION ALL BY NAME``), so a fresh lake has typed, empty views and a column added to a schema after a
        lake was written reads as NULL from the older files, with nothing read until a query runs."""
        for table, schema in SCHEMAS.items():
            part = PARTITION[table]
            cols = [f for f in schema if f.name != part] + [schema.field(part)]
            typed = (
                "SELECT " + ", ".join(f"CAST(NULL AS {_duck_type(f.type)}) AS {f.name}" for f in cols) + " WHERE false"
            )
            if table in filled:
                glob = self.uri(table, "*", "*.parquet")
                files = (
                    f"SELECT * FROM read_parquet('{glob}', hive_partitioning=true, union_by_name=true, "
                    f"hive_types={{'{part}': {_duck_type(schema.field(part).type)}}})"
                )
                typed = f"{typed} UNION ALL BY NAME {files}"
            con.execute(f"CREATE OR REPLACE VIEW {table}_history AS {typed}")
            keys = ", ".join(KEYS[table])
            con.execute(
                f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM {table}_history "
                f"QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY created_at DESC) = 1"
            )
        for name, sql in (CONDITION_VIEWS | LEDGER_VIEWS).items():  # the ledger reads the condition views
            con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")

    def query(self, sql: str, params: Sequence[Any] | None = None) -> pa.Table:
        """Run read-only SQL over the views; anything that would write raises ReadOnlyQueryError."""
        con = self.connect()
        try:
            statements = con.extract_statements(sql)
            if not statements:
                raise ReadOnlyQueryError("empty query")
            for st in statements:
                kind = st.type.name
                if kind not in _READ_ONLY_TYPES:
                    raise ReadOnlyQueryError(
                        f"the SQL entry point is read-only: a {kind} statement is not allowed "
                        "(use SELECT; the lake changes only through matloop's flows)"
                    )
            rel = con.sql(sql, params=params) if params else con.sql(sql)
            return rel.to_arrow_table() if rel is not None else pa.table({})
        finally:
            con.close()

    def read(self, table: str, where: str | None = None, *, history: bool = False) -> pa.Table:
        """The current rows of a table (or every row with ``history=True``), optionally filtered."""
        _check_table(table)
        name = f"{table}_history" if history else table
        return self.query(f"SELECT * FROM {name}" + (f" WHERE {where}" if where else ""))

    def counts(self) -> dict[str, int]:
        """Current row count per table."""
        sql = " UNION ALL ".join(f"SELECT '{t}' AS t, count(*) AS n FROM {t}" for t in SCHEMAS)
        return {r["t"]: r["n"] for r in self.query(sql).to_pylist()}

    @property
    def catalog_path(self) -> Path:
        """The DuckDB catalog file: in the lake for a local root, in the cache for a remote one."""
        if self.local:
            return Path(self.root) / "catalog.duckdb"
        cache = Path(get_settings().cache_dir).expanduser()
        return cache / f"catalog-{abs(hash(self.url)) % 10**10}.duckdb"

    def write_catalog(self) -> Path:
        """(Re)write the catalog file of views, atomically, for the duckdb CLI and other clients."""
        target = self.catalog_path
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
        con = duckdb.connect()
        try:
            con.execute(f"ATTACH '{tmp}' AS catalog (STORAGE_VERSION '{CATALOG_STORAGE_VERSION}')")
            con.execute("USE catalog")
            self._create_views(con, self._filled())
        finally:
            con.close()
        os.replace(tmp, target)
        return target


CATALOG_STORAGE_VERSION = "v1.2.0"
"""The catalog file's DuckDB storage format: what DuckDB 1.2 and newer clients read (the duckdb CLI
on the package index, ``duckdb-cli==1.5.6``, cannot open a file in DuckDB 2.0's own format)."""


_PROVENANCE_COLUMNS = ("run_id", "code_version", "created_at")


def _payload(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row without its provenance columns: what makes two rows of one key the same row."""
    return {k: v for k, v in row.items() if k not in _PROVENANCE_COLUMNS}


def _check_table(table: str) -> pa.Schema:
    try:
        return SCHEMAS[table]
    except KeyError:
        raise ValueError(f"unknown table {table!r}; tables: {', '.join(SCHEMAS)}") from None


def _table_from_rows(rows: Iterable[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    rows = list(rows)
    unknown = {k for r in rows for k in r} - set(schema.names)
    if unknown:
        raise ValueError(f"columns not in the schema: {sorted(unknown)}")
    return pa.Table.from_pylist(rows, schema=schema)


def _with_provenance(data: pa.Table, schema: pa.Schema, run_id: str | None) -> pa.Table:
    """Conform to the schema and fill run_id, code_version, created_at where null."""
    missing = [f for f in schema if f.name not in data.column_names]
    for f in missing:
        data = data.append_column(f, pa.nulls(data.num_rows, f.type))
    data = data.select(schema.names).cast(schema)
    fills = {"run_id": run_id or new_run_id(), "code_version": code_version(), "created_at": utcnow()}
    for name, value in fills.items():
        i = data.schema.get_field_index(name)
        col = data.column(i)
        if col.null_count:
            filled = pa.compute.fill_null(col, pa.scalar(value, col.type))
            data = data.set_column(i, schema.field(name), filled)
    return data
