"""The lake: Parquet tables under one root, appended atomically, queried through DuckDB."""

from storage.lake import Lake, LakeLockedError, LockHolder

__all__ = ["Lake", "LakeLockedError", "LockHolder"]
