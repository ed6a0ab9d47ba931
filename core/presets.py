"""One way to name settings: DFT presets, CGCNN configs and generator presets are all :class:`Presets`.

Each module keeps its own named settings (``core.dft.PRESETS``, ``core.cgcnn.PRESETS``,
``core.generator.PRESETS``), and every caller looks one up the same way: ``PRESETS.resolve(name, overrides)``
returns the named pydantic model with field overrides merged (nested mappings merge key by key) and
validated, so a misspelled field or a bad value fails with pydantic's message naming it. An unknown name
raises :class:`UnknownPresetError`, which lists the names. ``Literal[tuple(PRESETS)]`` gives a form's choices.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)


class UnknownPresetError(KeyError, ValueError):
    """A name no registry holds (a KeyError for lookups, a ValueError for validators)."""

    def __str__(self) -> str:
        return str(self.args[0])


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class Presets(Mapping[str, M], Generic[M]):
    """Named settings of one kind, read-only."""

    def __init__(self, kind: str, entries: Mapping[str, M]) -> None:
        self.kind = kind
        self._entries = dict(entries)

    def __getitem__(self, name: str) -> M:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownPresetError(f"unknown {self.kind} {name!r}; presets: {', '.join(self._entries)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def resolve(self, name: str, overrides: Mapping[str, Any] | None = None) -> M:
        """The named settings with ``overrides`` merged and validated."""
        base = self[name]
        if not overrides:
            return base
        return type(base).model_validate(_merge(base.model_dump(), overrides))
