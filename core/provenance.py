"""Provenance stamped on every row the platform writes: code version, settings hash, run id, and the hash of
the source a trained model depends on."""

from __future__ import annotations

import ast
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


PROJECT_ROOT = Path(__file__).resolve().parent.parent
PROJECT_PACKAGE = "core"
"""Models live in ``core``; their source hash follows imports inside it (Prefect, torch and friends are pinned)."""


def _module_files(module: str, root: Path) -> list[Path]:
    """The file(s) of a ``core`` module or package: a package is every .py file under it, subfolders included."""
    path = root.joinpath(*module.split("."))
    if path.is_dir():
        return sorted(path.rglob("*.py"))
    file = path.with_suffix(".py")
    return [file] if file.is_file() else []


def _imported_modules(file: Path, package: str) -> set[str]:
    """``package`` modules that ``file`` imports (at any depth of its code: lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text(), filename=str(file))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            names += [node.module] if node.module != package else []  # "from core import x" is core.x alone
        else:
            continue
        found |= {name for name in names if name.startswith(package + ".")}
    return found


def source_hash(*modules: str, root: Path = PROJECT_ROOT, package: str = PROJECT_PACKAGE) -> str:
    """Short sha256 of the source of ``modules`` and of every ``package`` module they import, transitively.

    Part of a trained model's cache key and registry row: an edit of any file the model's code depends on
    (a subpackage, a helper two imports away) means a new model, never a stale cached one.
    """
    seen: set[Path] = set()
    todo = [f for m in modules for f in _module_files(m, root)]
    while todo:
        file = todo.pop()
        if file in seen:
            continue
        seen.add(file)
        for module in _imported_modules(file, package):
            todo += [f for f in _module_files(module, root) if f not in seen]
    digest = hashlib.sha256()
    for file in sorted(seen):
        digest.update(str(file.relative_to(root)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:12]


def new_run_id() -> str:
    """A run id for work started outside Prefect (CLI, scripts)."""
    return f"local-{uuid.uuid4().hex[:12]}"


def utcnow() -> datetime:
    return datetime.now(UTC)
