"""Platform-wide settings, read from the environment (MATLOOP_*) via pydantic-settings."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict


class MatloopSettings(BaseSettings):
    """Where the lake lives and where models and caches go. Override with MATLOOP_<NAME>."""

    model_config = SettingsConfigDict(env_prefix="MATLOOP_")

    lake: str = "lake"
    """Lake root: a local path or any fsspec URL (s3://bucket/lake)."""
    cache_dir: str = "~/.cache/matloop"
    """Downloads (matbench data, MACE-MP-0 weights) are cached here."""
    shared_data: str = "../shared/data"
    """Reference data folder (Materials Project elasticity sets)."""


def get_settings() -> MatloopSettings:
    return MatloopSettings()
