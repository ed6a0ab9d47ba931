"""The loop lock as flows take it: a loop run holds it from start to end, its stage flows join it.

A stage flow run on its own (``matloop train``, a deployment started from the UI) takes the lock
itself, so it is refused while a loop runs on the same lake and a loop is refused while it runs.
A stage flow started by a loop carries the loop's run id (``loop_run_id``) and shares its lock,
whether it runs in the loop's process (embedded) or on a worker (deployed).
"""

from __future__ import annotations

from contextlib import AbstractContextManager

from prefect.runtime import flow_run

from storage import Lake, LockHolder


def _this_run(flow_name: str) -> tuple[str, str]:
    """(description, id) of the current flow run, for the lock file and the refusal message."""
    run_id = str(flow_run.get_id() or "")
    name = flow_run.get_name() or ""
    who = f"{flow_name} run {name!r} ({run_id})" if name else f"{flow_name} run {run_id or '(no run id)'}"
    return who, run_id


def loop_lock(lake: Lake) -> AbstractContextManager[LockHolder]:
    """The lock of an active-learning run; its token is the run id, which the stage flows join."""
    who, run_id = _this_run("active-learning")
    return lake.loop_lock(who, token=run_id)


def stage_lock(lake: Lake, flow_name: str, loop_run_id: str) -> AbstractContextManager[LockHolder]:
    """A stage flow's hold on the loop lock: its loop's lock when ``loop_run_id`` names it, else its own."""
    who, _ = _this_run(flow_name)
    return lake.loop_lock(who, join=loop_run_id)
