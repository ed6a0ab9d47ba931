"""Concurrent writers on one lake: W ``matloop ingest`` processes at once, R runs, against one sequential ingest.

Each run starts from a fresh lake. The shared MP file is cut into W parts that overlap (each part also holds
the first ``--overlap`` records of the next one), so the writers race to add the same crystals; the W
``matloop --lake LAKE ingest PART --name mp-binary`` processes start together, as users at two terminals
would. Checks per run, printed: every writer's exit code and what it said about the lake's ingest lock; the
current rows equal to a sequential ingest of the whole file (row counts and structure ids per table); and
the rows of every ``_history`` table that duplicate another (same key and same payload, provenance aside:
``chaos.table_figures``). The goal of issue 16: 0 duplicate rows over 4 writers x 3 runs.

    .venv/bin/python benchmarks/writers.py [--writers 4] [--runs 3] [--overlap 200]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from chaos import table_figures

from storage import Lake
from storage.ingest import ingest

SOURCE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "mp-binary-elasticity-2025.1-train.json.gz"
NAME = "mp-binary"
TABLES = {"structures": "structure_id", "properties": "structure_id", "quarantine": "record_id"}
"""The tables an ingest writes, and the id each row is on."""


def write_parts(folder: Path, writers: int, overlap: int) -> list[Path]:
    """The source cut into ``writers`` parts, each also holding the first ``overlap`` records of the next."""
    with gzip.open(SOURCE, "rt") as fh:
        records = json.load(fh)
    size = -(-len(records) // writers)
    paths = []
    for k in range(writers):
        part = records[k * size : (k + 1) * size] + records[(k + 1) * size : (k + 1) * size + overlap]
        paths.append(folder / f"part{k}.json.gz")
        with gzip.open(paths[-1], "wt") as fh:
            json.dump(part, fh)
    return paths


def current(lake: Lake) -> dict[str, tuple[int, frozenset[str]]]:
    """Per table: current rows and the ids they are on."""
    counts = lake.counts()
    return {
        t: (counts[t], frozenset(lake.query(f"SELECT DISTINCT {col} FROM {t}").column(0).to_pylist()))
        for t, col in TABLES.items()
    }


def concurrent_run(lake_root: Path, parts: list[Path], log_dir: Path) -> tuple[float, list[int], int]:
    """The writers started together; wall time, exit codes, and how many said they waited for the lock."""
    env = {**os.environ, "COLUMNS": "200"}
    matloop = str(Path(sys.executable).with_name("matloop"))
    logs = [log_dir / f"writer{k}.log" for k in range(len(parts))]
    t0 = time.perf_counter()
    procs = []
    for part, log in zip(parts, logs, strict=True):
        with open(log, "w") as out:
            argv = [matloop, "--lake", str(lake_root), "ingest", str(part), "--name", NAME]
            procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env))
    codes = [p.wait() for p in procs]
    waited = sum("lock" in log.read_text().lower() for log in logs)
    return time.perf_counter() - t0, codes, waited


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--overlap", type=int, default=200, help="records each part shares with the next")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="matloop-writers-") as tmp:
        root = Path(tmp)
        parts = write_parts(root, args.writers, args.overlap)
        t0 = time.perf_counter()
        reference = Lake(root / "sequential")
        ingest(reference, str(SOURCE), name=NAME)
        print(f"sequential ingest of {SOURCE.name}: {time.perf_counter() - t0:.1f} s")
        expected = current(reference)
        total_dupes = 0
        for run in range(args.runs):
            lake_root = root / f"concurrent-{run}"
            shutil.rmtree(lake_root, ignore_errors=True)
            wall, codes, waited = concurrent_run(lake_root, parts, root)
            lake = Lake(lake_root)
            got = current(lake)
            figures = table_figures(lake)
            dupes = {t: f["duplicates"] for t, f in figures.items() if f["rows"]}
            total_dupes += sum(dupes.values())
            same = all(got[t] == expected[t] for t in TABLES)
            print(
                f"run {run}: {args.writers} writers in {wall:.1f} s, exit codes {codes}, {waited} waited for the "
                f"ingest lock; current rows equal to the sequential ingest: {same} "
                f"({', '.join(f'{t} {got[t][0]}' for t in TABLES)}); duplicate rows in _history: {dupes}"
            )
        print(f"duplicate rows over {args.writers} writers x {args.runs} runs: {total_dupes} (goal 0)")


if __name__ == "__main__":
    main()
