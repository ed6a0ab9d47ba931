"""A local Prefect stack: server on 127.0.0.1, the work pools, every deployment, a worker per pool.

``matloop serve`` runs one in the foreground; the end-to-end test runs one around a test. Every
process is started in its own process group and stopped (SIGTERM, then SIGKILL) on exit, so
stopping the stack stops everything it started.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from core.settings import get_settings
from deployments.pools import POOLS, create_pools

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stack:
    """Start with ``with Stack(lake, port) as stack:``; ``stack.ui_url`` is the UI address.

    Its state (Prefect's database, the processes' logs) lives in ``home``, by default
    ``$MATLOOP_STATE_DIR/prefect`` (``~/.local/share/matloop/prefect``): outside the checkout, the
    same wherever the command is started from. ``progress`` hears one line per start-up step.
    """

    def __init__(
        self,
        lake_url: str,
        port: int = 4200,
        home: Path | None = None,
        log_dir: Path | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.port = port
        self.home = home or Path(get_settings().state_dir).expanduser() / "prefect"
        self.say = progress or (lambda _msg: None)
        self.log_dir = log_dir or self.home / "logs"
        self.api_url = f"http://127.0.0.1:{port}/api"
        self.ui_url = f"http://127.0.0.1:{port}"
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(self.home),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "MATLOOP_HOME": str(REPO),
            "MATLOOP_LAKE": lake_url,
        }
        self.prefect = str(Path(sys.executable).with_name("prefect"))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def _spawn(self, name: str, args: list[str]) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        self.procs[name] = subprocess.Popen(
            args, env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs["server"].poll() is not None:
                raise RuntimeError(f"Prefect server exited; see {self.log_dir / 'server.log'}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"Prefect server not healthy after {timeout:.0f} s; see {self.log_dir / 'server.log'}")

    def _run(self, args: list[str]) -> None:
        subprocess.run(args, env=self.env, cwd=REPO, check=True, stdout=subprocess.DEVNULL)

    def start(self, timeout: float = 180) -> Stack:
        """Server, pools, deployments, workers, in that order."""
        t0 = time.monotonic()
        self.say(f"starting the Prefect server on {self.ui_url} (state in {self.home}) ...")
        self._spawn("server", [self.prefect, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)])
        self._wait_healthy(timeout)
        self.say(f"server up after {time.monotonic() - t0:.0f} s; creating the work pools {', '.join(POOLS)} ...")
        create_pools(self.prefect, env=self.env)
        self.say("deploying every flow from prefect.yaml ...")
        self._run([self.prefect, "--no-prompt", "deploy", "--all", "--prefect-file", str(REPO / "prefect.yaml")])
        self.say("starting one worker per pool ...")
        for pool in POOLS:
            self._spawn(f"worker-{pool}", [self.prefect, "worker", "start", "--pool", pool, "--type", "process"])
        self.say(f"ready after {time.monotonic() - t0:.0f} s")
        return self

    def stop(self) -> None:
        """Stop the workers and wait for them, then the server (so no worker loses its server mid-call).

        Whatever ignores SIGTERM for 20 s gets SIGKILL.
        """
        workers = [name for name in self.procs if name != "server"]
        for group in (workers, ["server"] if "server" in self.procs else []):
            for name in group:
                if self.procs[name].poll() is None:
                    os.killpg(self.procs[name].pid, signal.SIGTERM)
            deadline = time.monotonic() + 20
            for name in group:
                proc = self.procs[name]
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        self.procs.clear()

    def __enter__(self) -> Stack:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
