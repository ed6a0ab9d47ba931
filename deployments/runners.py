"""Where the DFT jobs run: the task runner of the label flow and the SLURM settings of the ``hpc`` pool.

``local`` runs jobs on threads of the flow's process; ``dask`` on a local Dask cluster of processes;
``slurm`` submits one SLURM job per Dask worker through prefect-dask's ``DaskTaskRunner`` and a dask-jobqueue
``SLURMCluster``. :class:`SlurmOptions` reads its defaults from the ``MATLOOP_SLURM_*`` variables that
``deployments/pools.py`` writes into the ``hpc`` pool (:meth:`SlurmOptions.pool_environment`), so the pool
and the flow agree on one set of names.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

REPO = Path(__file__).resolve().parent.parent
Runner = Literal["local", "dask", "slurm"]
_POOL_FIELDS = ("partition", "account", "cores", "memory", "walltime", "job_script_prologue")


class SlurmOptions(BaseSettings):
    """SLURM job variables for the Dask workers that run the DFT jobs (one worker per SLURM job).

    Defaults come from the ``hpc`` work pool's environment (MATLOOP_SLURM_PARTITION, _ACCOUNT,
    _CORES, _MEMORY, _WALLTIME, _PROLOGUE with one shell line per line); parameters override them.
    """

    model_config = SettingsConfigDict(env_prefix="MATLOOP_SLURM_", use_attribute_docstrings=True)

    partition: str | None = None
    """SLURM partition (empty: the cluster's default)."""
    account: str | None = None
    """SLURM account to charge (empty: the user's default)."""
    cores: int = Field(1, ge=1)
    """CPU cores per SLURM job (one Dask worker process per job runs one DFT job at a time)."""
    memory: str = "2GB"
    """Memory per SLURM job, e.g. 2GB."""
    walltime: str = "01:00:00"
    """Wall-time limit per SLURM job, HH:MM:SS."""
    max_jobs: int = Field(4, ge=1)
    """Most SLURM jobs at once (Dask adapts between 0 and this)."""
    job_script_prologue: Annotated[list[str], NoDecode] = Field(
        [], validation_alias=AliasChoices("job_script_prologue", "MATLOOP_SLURM_PROLOGUE")
    )
    """Shell lines run before the worker starts (module load, venv activation, ...)."""
    job_extra_directives: list[str] = []
    """Extra ``#SBATCH`` lines, e.g. ``--qos=debug``."""
    log_directory: str | None = None
    """Where SLURM writes worker logs (default: the submit directory)."""

    @field_validator("partition", "account", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return value or None

    @field_validator("job_script_prologue", mode="before")
    @classmethod
    def _lines(cls, value: Any) -> Any:
        return [line for line in value.splitlines() if line.strip()] if isinstance(value, str) else value

    def cluster_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``dask_jobqueue.SLURMCluster``."""
        prologue = [
            f"cd {REPO}",
            "export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1",
            *self.job_script_prologue,
        ]
        kwargs: dict[str, Any] = {
            "queue": self.partition,
            "account": self.account,
            "cores": self.cores,
            "processes": 1,
            "memory": self.memory,
            "walltime": self.walltime,
            "job_script_prologue": prologue,
            "job_extra_directives": self.job_extra_directives,
            "python": sys.executable,
            "worker_extra_args": ["--nthreads", "1"],
        }
        if self.log_directory:
            kwargs["log_directory"] = self.log_directory
        return kwargs

    @classmethod
    def pool_environment(cls) -> dict[str, str]:
        """The ``hpc`` pool's MATLOOP_SLURM_* defaults: the defaults of these options, as environment strings."""
        defaults = cls.model_construct()
        env = {}
        for name in _POOL_FIELDS:
            value = getattr(defaults, name)
            key = "PROLOGUE" if name == "job_script_prologue" else name.upper()
            env[f"MATLOOP_SLURM_{key}"] = "\n".join(value) if isinstance(value, list) else str(value or "")
        return env


def task_runner(runner: Runner, workers: int, slurm: SlurmOptions) -> TaskRunner:
    """The task runner that executes the DFT jobs: threads here, a local Dask cluster, or SLURM jobs via Dask."""
    if runner == "local":
        return ThreadPoolTaskRunner(max_workers=workers)
    from prefect_dask import DaskTaskRunner

    if runner == "dask":
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True})
    return DaskTaskRunner(
        cluster_class="dask_jobqueue.SLURMCluster",
        cluster_kwargs=slurm.cluster_kwargs(),
        adapt_kwargs={"minimum_jobs": 0, "maximum_jobs": slurm.max_jobs},
    )
