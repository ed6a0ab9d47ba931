"""Platform-wide settings, read from the environment (MATLOOP_*) via pydantic-settings."""

from __future__ import annotations

import os

from pydantic_settings import BaseSettings, SettingsConfigDict


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


def get_settings() -> MatloopSettings:
    return MatloopSettings()


PROCESS_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
}
"""Environment defaults for processes that run flows (each can be overridden by the environment):
no Prefect telemetry, a patient ephemeral server on 2 cores, single-threaded BLAS (GPAW and numpy
oversubscribe small machines otherwise; torch threads are set per task)."""


def apply_process_defaults() -> None:
    """Set PROCESS_DEFAULTS where the environment does not say otherwise; call before importing prefect."""
    for key, value in PROCESS_DEFAULTS.items():
        os.environ.setdefault(key, value)
