"""Conditional crystal generators: the interface, the CDVAE implementation, and checkpoint dispatch."""

from __future__ import annotations

from pathlib import Path

import torch

from core.generator.base import Generator, SampleBatch, generate, keep_best
from core.generator.cdvae import CDVAEGenerator
from core.generator.configs import PRESETS, CDVAEConfig

GENERATORS: dict[str, type[Generator]] = {CDVAEGenerator.name: CDVAEGenerator}
"""Generator classes by the ``generator`` name their checkpoints carry; add a new generator here."""


def load_generator(path: str | Path, device: str | None = None) -> Generator:
    """Load any registered generator from its checkpoint (safe load; dispatch on the stored name)."""
    name = torch.load(Path(path), map_location="cpu", weights_only=True).get("generator")
    try:
        cls = GENERATORS[name]
    except KeyError:
        raise ValueError(f"{path}: unknown generator {name!r}; known: {', '.join(GENERATORS)}") from None
    return cls.load(path, device=device)


__all__ = [
    "GENERATORS",
    "PRESETS",
    "CDVAEConfig",
    "CDVAEGenerator",
    "Generator",
    "SampleBatch",
    "generate",
    "keep_best",
    "load_generator",
]
