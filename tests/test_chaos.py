"""The chaos benchmark's short variant: the loop SIGKILLed at 3 seeded points (a Parquet write, a cached
result's write, a stage) and rerun finishes with nothing lost, doubled or recomputed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def test_three_kills_leave_a_lake_equal_to_an_uninterrupted_run(tmp_path):
    summary_path = tmp_path / "summary.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "benchmarks" / "chaos.py"), "--kills", "3", "--out", str(tmp_path / "out")]
    done = subprocess.run([*cmd, "--json", str(summary_path)], env=env, capture_output=True, text=True, timeout=3000)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["kills_landed"] == 3, summary["kills"]
    assert {"Parquet write", "result write"} <= {w for w, n in summary["windows"].items() if n}
    assert summary["stale_lock_refusals"] == 0
    assert summary["final_exit"] == 0
    assert summary["iterations_completed"] == summary["iterations_expected"] == 1
    assert summary["duplicates"] == 0, summary["tables"]
    files = summary["files"]
    assert files["unreadable_parquet"] == [] and files["unloadable_results"] == []
    assert summary["candidates_open"] == 0
    assert summary["recomputed"] == 0
    assert summary["final_rows_equal"], summary["differences"]
