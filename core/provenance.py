"""Provenance stamped on every row the platform writes: code version, settings hash, run id."""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core import __version__


@functools.cache
def code_version() -> str:
    """`matloop <version>+g<sha>` when run from a git checkout, else the package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=10", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"matloop {__version__}+g{sha}" if sha else f"matloop {__version__}"


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    return obj


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal settings give equal strings."""
    return json.dumps(_jsonable(obj), sort_keys=True, separators=(",", ":"), default=str)


def settings_hash(obj: Any, length: int = 12) -> str:
    """Short sha256 of a settings object (pydantic model, dict, ...) in canonical JSON."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def new_run_id() -> str:
    """A run id for work started outside Prefect (CLI, scripts)."""
    return f"local-{uuid.uuid4().hex[:12]}"


def utcnow() -> datetime:
    return datetime.now(UTC)
