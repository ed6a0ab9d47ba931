"""Work pools: their base job templates (JSON beside this file) and creating them on a server.

Three process-type pools: ``gpu`` (train, generate, screen), ``hpc`` (label: the worker runs on
the cluster's login node and fans DFT out as SLURM jobs through Dask) and ``default`` (the loop).
Each template is Prefect's process template with environment defaults for its machines (``gpu``:
``MATLOOP_DEVICE=auto``, so every model takes the GPU where the worker has one); the
``hpc`` one carries the SLURM settings (``MATLOOP_SLURM_*``, the defaults of
:class:`core.settings.SlurmOptions`) that the label flow reads.

    python -m deployments.pools write    # regenerate the JSON templates from Prefect's default
    python -m deployments.pools create   # create or update the pools on $PREFECT_API_URL
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

from core.settings import SlurmOptions, thread_environment

HERE = Path(__file__).resolve().parent
POOLS: dict[str, dict[str, str]] = {
    "gpu": {"PYTHONUNBUFFERED": "1", "MATLOOP_DEVICE": "auto"},
    "hpc": {
        **{k: v for k, v in thread_environment(1).items() if k != "MKL_NUM_THREADS"},
        "PYTHONUNBUFFERED": "1",
        **SlurmOptions.pool_environment(),
    },
    "default": {"PYTHONUNBUFFERED": "1"},
}
"""Pool name -> environment defaults a deployment's job variables may override."""


def template_path(pool: str) -> Path:
    return HERE / f"{pool}-pool.json"


def write_templates() -> None:
    """(Re)write the pools' JSON templates from Prefect's default process-worker template."""
    from prefect.workers.process import ProcessWorker

    base = ProcessWorker.get_default_base_job_template()
    for pool, env in POOLS.items():
        template = copy.deepcopy(base)
        template["variables"]["properties"]["env"]["default"] = env
        template_path(pool).write_text(json.dumps(template, indent=2) + "\n")


def create_pools(prefect: str = "prefect", env: dict[str, str] | None = None) -> None:
    """Create or update each pool on the server that PREFECT_API_URL (in ``env``) points at."""
    for pool in POOLS:
        subprocess.run(
            [
                prefect,
                "work-pool",
                "create",
                pool,
                "--type",
                "process",
                "--base-job-template",
                str(template_path(pool)),
                "--overwrite",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            env=env,
        )


if __name__ == "__main__":
    {"write": write_templates, "create": create_pools}[sys.argv[1] if len(sys.argv) > 1 else "create"]()
