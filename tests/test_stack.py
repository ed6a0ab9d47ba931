"""The local stack that `matloop serve` runs: state outside the checkout, workers stopped before the server."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from deployments.stack import REPO, Stack

_RECORDER = """
import signal, sys, time
def stop(*_):
    with open(sys.argv[1], "a") as fh:
        fh.write(f"{sys.argv[2]} {time.monotonic()}\\n")
    if sys.argv[2] == "server":
        time.sleep(0.5)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
while True:
    time.sleep(0.1)
"""


def test_stop_waits_for_the_workers_before_stopping_the_server(tmp_path: Path) -> None:
    stack = Stack("lake", home=tmp_path / "home")
    record = tmp_path / "stopped.txt"
    for name in ("server", "worker-gpu", "worker-hpc"):
        stack.procs[name] = subprocess.Popen(
            [sys.executable, "-c", _RECORDER, str(record), name], start_new_session=True
        )
    time.sleep(1.0)  # let each process install its handler
    stack.stop()
    order = [line.split()[0] for line in record.read_text().splitlines()]
    assert sorted(order[:2]) == ["worker-gpu", "worker-hpc"] and order[2] == "server"
    assert stack.procs == {}


def test_state_lives_outside_the_checkout(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MATLOOP_STATE_DIR", str(tmp_path / "state"))
    stack = Stack("lake")
    assert stack.home == tmp_path / "state" / "prefect" and REPO not in stack.home.parents
    assert stack.env["PREFECT_HOME"] == str(stack.home)
    default = Stack("lake")
    monkeypatch.delenv("MATLOOP_STATE_DIR")
    assert REPO not in Stack("lake").home.parents and default.log_dir.parent == default.home
