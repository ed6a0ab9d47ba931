"""Platform-wide settings, read from the environment (MATLOOP_*) via pydantic-settings: one object,
:func:`get_settings`, for the lake, caches, device, threads and the SLURM options of DFT jobs."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

REPO = Path(__file__).resolve().parent.parent
_POOL_FIELDS = ("partition", "account", "cores", "memory", "walltime", "job_script_prologue")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
"""The BLAS/OpenMP thread variables every worker process sets from ``MatloopSettings.threads``."""


def thread_environment(threads: int) -> dict[str, str]:
    """The environment that limits BLAS and OpenMP to ``threads`` per process."""
    return dict.fromkeys(THREAD_VARIABLES, str(threads))


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
            "export " + " ".join(f"{k}={v}" for k, v in thread_environment(1).items()),
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


class MatloopSettings(BaseSettings):
    """Where the lake lives and where models and caches go. Override with MATLOOP_<NAME>."""

    model_config = SettingsConfigDict(env_prefix="MATLOOP_", use_attribute_docstrings=True)

    lake: str = "lake"
    """Lake root: a local path or any fsspec URL (s3://bucket/lake)."""
    cache_dir: str = "~/.cache/matloop"
    """Downloads (matbench data, MACE-MP-0 weights) are cached here."""
    state_dir: str = "~/.local/share/matloop"
    """State of the local Prefect stack that ``matloop serve`` starts (its database and logs)."""
    shared_data: str = "../shared/data"
    """Reference data folder (Materials Project elasticity sets)."""
    device: str = "auto"
    """Where models run: auto (CUDA when present, else CPU), cpu, cuda or cuda:<n> (see core.device)."""
    threads: int = Field(1, ge=1)
    """Threads per worker process for torch and BLAS: more oversubscribe small machines (a 2-core laptop ran
    CGCNN training 19x slower at 4 threads than at 1)."""
    slurm: SlurmOptions = Field(default_factory=SlurmOptions)
    """SLURM job settings of DFT labeling (MATLOOP_SLURM_*)."""


def get_settings() -> MatloopSettings:
    return MatloopSettings()


PROCESS_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}
"""Environment defaults for processes that run flows (each can be overridden by the environment):
no Prefect telemetry, a patient ephemeral server on 2 cores."""


def apply_process_defaults() -> None:
    """Set PROCESS_DEFAULTS and the thread variables (``threads``) where the environment does not say otherwise;
    call before importing prefect, numpy or torch."""
    for key, value in (PROCESS_DEFAULTS | thread_environment(get_settings().threads)).items():
        os.environ.setdefault(key, value)


def set_torch_threads() -> None:
    """torch's intra-op threads of this process: ``threads`` (MATLOOP_THREADS)."""
    import torch

    torch.set_num_threads(get_settings().threads)
