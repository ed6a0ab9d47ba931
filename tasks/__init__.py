"""Prefect tasks over core/: how each unit of work is cached, retried and logged."""

from core.settings import apply_process_defaults

apply_process_defaults()
