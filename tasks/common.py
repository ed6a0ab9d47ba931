"""How every computing task is cached: on its inputs and its source, results persisted in the lake.

A task that computes (predict, relax, DFT, train) is declared with ``compute_task`` and takes the
lake as a URL string (hashable inputs). Its results land in ``<lake>/results`` so a rerun of a
finished iteration, in this process or another, recomputes nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.exceptions import MissingContextError
from prefect.filesystems import LocalFileSystem, RemoteFileSystem, WritableFileSystem

from storage import Lake

CACHE_POLICY = INPUTS + TASK_SOURCE


def result_storage(lake_url: str) -> WritableFileSystem:
    """Result storage under ``<lake>/results`` (a local folder or an fsspec URL).

    The block is saved on the Prefect server (named after the lake), as the server must know
    where a cached result lives for another process to find it.
    """
    lake = Lake(lake_url)
    if lake.local:
        os.makedirs(lake.path("results"), exist_ok=True)
        block: WritableFileSystem = LocalFileSystem(basepath=lake.path("results"))
    else:
        block = RemoteFileSystem(basepath=lake.uri("results"))
    digest = hashlib.sha256(lake.url.encode()).hexdigest()[:16]
    block.save(f"matloop-results-{digest}", overwrite=True)
    return block


def compute_task(**options: Any) -> Callable[[Callable[..., Any]], Any]:
    """``@task`` with the platform's cache policy and persisted results; options pass through."""
    options.setdefault("cache_policy", CACHE_POLICY)
    options.setdefault("persist_result", True)
    return task(**options)


def in_lake(task_obj: Any, lake_url: str) -> Any:
    """The task with its results stored in this lake (call it where the lake is known)."""
    return task_obj.with_options(result_storage=result_storage(lake_url))


def run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The Prefect run logger inside a run; this module's logger when called as a plain function."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)
