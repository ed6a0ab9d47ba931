"""Prefect flows, one module per flow, and the `matloop` command (flows/cli)."""

from core.settings import apply_process_defaults

apply_process_defaults()
