"""Two loops on one lake: the second is refused at once, naming the first; a loop's own stage flows share
its lock; a SIGKILLed loop leaves no stale lock."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from storage import Lake, LakeLockedError

REPO = Path(__file__).resolve().parent.parent

HOLD_LOCK = """
import sys, time
from storage import Lake
with Lake(sys.argv[1]).loop_lock("active-learning run 'first' (run-1)", token="run-1"):
    print("held", flush=True)
    time.sleep(600)
"""

# A real loop (the active-learning flow) whose train stage blocks: it holds the lake's loop lock until killed.
BLOCKED_LOOP = r"""
import sys, time
import flows.active_learning as al

def train(params):
    sys.__stdout__.write(f"in train {params.loop_run_id}\n")  # print() is the flow's logger here (log_prints)
    sys.__stdout__.flush()
    time.sleep(600)

al._EMBEDDED["train"] = train
al.active_learning(al.LoopParams(lake_url=sys.argv[1], targets=[350.0], iterations=1))
"""


def _start(code: str, lake: Lake, expect: str) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", code, lake.url], stdout=subprocess.PIPE, text=True, env=env)
    assert child.stdout is not None
    line = child.stdout.readline().strip()
    assert line.startswith(expect), f"child said {line!r}, exit {child.poll()}"
    return child, line


def _kill(child: subprocess.Popen[str]) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)


def test_a_held_loop_lock_refuses_at_once_naming_its_holder_and_is_free_after_sigkill(lake):
    holder, _ = _start(HOLD_LOCK, lake, "held")
    try:
        t0 = time.monotonic()
        with pytest.raises(LakeLockedError) as refused, lake.loop_lock("second loop"):
            pass
        assert time.monotonic() - t0 < 2  # at once, no waiting
        text = str(refused.value)
        for part in ("loop lock", "active-learning run 'first' (run-1)", f"pid {holder.pid}", socket.gethostname()):
            assert part in text
        assert "since 20" in text
        with lake.loop_lock("its stage flow", join="run-1") as shared:  # the run's own stages share it
            assert shared.token == "run-1" and shared.pid == holder.pid
        with pytest.raises(LakeLockedError), lake.loop_lock("a stage of another loop", join="run-2"):
            pass
    finally:
        _kill(holder)
    t0 = time.monotonic()
    with lake.loop_lock("after the kill") as mine:  # flock: the kernel freed it with the process
        assert mine.pid == os.getpid()
    assert time.monotonic() - t0 < 2


def test_a_remote_lake_locks_on_this_host(tmp_path, monkeypatch):
    """An fsspec lake has no lock of its own: the lock file lives on this host and still excludes."""
    monkeypatch.setenv("MATLOOP_CACHE_DIR", str(tmp_path / "cache"))
    local = Lake(f"file://{tmp_path}/lake")  # a file:// URL is local: its locks live in the lake
    assert local._lock_path("loop").parent == tmp_path / "lake" / ".locks"
    remote = Lake("memory://matloop-lock-test")
    assert remote._lock_path("loop").parent == tmp_path / "cache" / "locks"
    with remote.loop_lock("first"), pytest.raises(LakeLockedError, match="first"), remote.loop_lock("second"):
        pass


class Stop(Exception):
    """Ends a test loop after the stages under test."""


def _loop_params(lake: Lake):
    from flows.active_learning import LoopParams

    return LoopParams(lake_url=lake.url, targets=[350.0], iterations=1, label_source="fam")


def test_a_second_loop_is_refused_while_the_first_runs_and_the_first_loops_stages_are_not(
    lake, prefect_server, monkeypatch
):
    import flows.active_learning as al
    from flows.label import LabelParams, label

    in_train, release = threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def train(params):  # the first loop's train stage: wait until the second loop was refused
        seen["loop_run_id"] = params.loop_run_id
        in_train.set()
        assert release.wait(120)

    def real_label(params):  # a real stage flow of the first loop: it must share the loop's lock
        seen["label"] = label(params)

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setitem(al._EMBEDDED, "train", train)
    monkeypatch.setitem(al._EMBEDDED, "generate", lambda p: None)
    monkeypatch.setitem(al._EMBEDDED, "screen", lambda p: None)
    monkeypatch.setitem(al._EMBEDDED, "label", real_label)
    monkeypatch.setattr(al, "iteration_metrics", stop)

    outcome: dict[str, BaseException] = {}

    def first_loop() -> None:
        try:
            al.active_learning(_loop_params(lake))
        except BaseException as exc:
            outcome["first"] = exc

    thread = threading.Thread(target=first_loop)
    thread.start()
    try:
        assert in_train.wait(120), "the first loop never reached its train stage"
        t0 = time.monotonic()
        with pytest.raises(LakeLockedError) as refused:
            al.active_learning(_loop_params(lake))
        assert time.monotonic() - t0 < 15  # refused at its start, not after waiting (Prefect start-up only)
        text = str(refused.value)
        assert "active-learning run" in text and str(seen["loop_run_id"]) in text and f"pid {os.getpid()}" in text
        with pytest.raises(LakeLockedError, match="active-learning run"):  # a stage flow of no loop: refused too
            label(LabelParams(lake_url=lake.url, source="fam"))
    finally:
        release.set()
        thread.join(120)
    assert isinstance(outcome.get("first"), Stop), outcome  # its own label flow ran under its lock
    assert seen["label"] == []
    assert lake.counts()["iterations"] == 0


def test_a_sigkilled_loop_frees_the_lake_for_the_next(lake, prefect_server, monkeypatch):
    """A real loop in another process holds the lock; a second is refused naming it; after SIGKILL the next runs."""
    import prefect.settings

    import flows.active_learning as al

    monkeypatch.setenv("PREFECT_API_URL", str(prefect.settings.PREFECT_API_URL.value()))
    child, line = _start(BLOCKED_LOOP, lake, "in train")
    first_run_id = line.split()[-1]
    try:
        with pytest.raises(LakeLockedError) as refused:
            al.active_learning(_loop_params(lake))
        assert first_run_id in str(refused.value) and f"pid {child.pid}" in str(refused.value)
    finally:
        _kill(child)

    def stop(params):
        raise Stop

    monkeypatch.setitem(al._EMBEDDED, "train", stop)
    with pytest.raises(Stop):  # past the lock at once: the dead loop left no stale lock
        al.active_learning(_loop_params(lake))


def test_partial_files_of_killed_writers_are_swept_and_committed_ones_kept(lake):
    from pymatgen.core import Lattice, Structure

    from core.structures import to_row

    cells = [Structure(Lattice.cubic(3.0 + 0.1 * i), ["Cu", "Zn"], [[0, 0, 0], [0.5, 0.5, 0.5]]) for i in range(2)]
    lake.append("structures", [{**to_row(s), "source": "test", "split": "train"} for s in cells])
    folder = Path(lake.files("structures")[0]).parent
    (folder / "part-x.parquet.tmp").write_bytes(b"PAR1 half a file")
    (Path(lake.path("models")) / "cgcnn").mkdir(parents=True)
    (Path(lake.path("models")) / "cgcnn" / "m.pt.tmp").write_bytes(b"half")
    assert sorted(lake.sweep_partial()) == ["models/cgcnn/m.pt.tmp", f"structures/{folder.name}/part-x.parquet.tmp"]
    assert list(Path(lake.root).rglob("*.tmp")) == []
    assert lake.counts()["structures"] == 2


def test_append_new_drops_twins_of_current_rows_and_keeps_changes(lake):
    """What a rerun after a kill appends from a cached result: the rows already there are not written again."""
    row = {"structure_id": "s1", "name": "k_vrh", "value": 200.0, "unit": "GPa", "method": "fam:x", "flags": ["a"]}
    assert lake.append_new("properties", [row]) == 1
    assert lake.append_new("properties", [row, {**row, "structure_id": "s2"}]) == 1  # s1 is a twin
    assert lake.append_new("properties", [{**row, "value": 210.0}]) == 1  # a changed value supersedes
    history = lake.query("SELECT structure_id, value FROM properties_history ORDER BY created_at").to_pylist()
    assert [(r["structure_id"], r["value"]) for r in history] == [("s1", 200.0), ("s2", 200.0), ("s1", 210.0)]
