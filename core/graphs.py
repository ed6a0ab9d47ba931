"""Periodic crystal graphs for CGCNN: neighbour lists, element features, a per-structure cache.

A crystal graph has one node per site (its atomic number) and a directed edge from every
neighbour j to its centre i, carrying the distance |r_j + T - r_i| over periodic images T.
Neighbours come from vesin's cell-list neighbour list (C++, any cell size, about 0.3 ms for a
10-atom cell); PyG's ``radius_graph`` needs pyg-lib, which the package index does not serve.
Each centre keeps its ``max_neighbors`` nearest neighbours within ``cutoff``, and every
neighbour tied with the last one kept (within 1e-3 Å), so a graph does not depend on the cell
setting or the site order the structure happens to be written in.

Graphs store only integers and distances; the Gaussian expansion of distances and the element
feature lookup happen inside the model, so a cached graph is small and config-independent
apart from the neighbour settings (``GraphConfig``).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from pymatgen.core import Element
from tqdm import tqdm
from vesin import NeighborList

from core.provenance import settings_hash

MAX_Z = 94
"""Elements 1..94 get features; row 0 of the feature table is unused (padding)."""
_TIE_TOLERANCE = 1e-3
"""Å: neighbours this close to the last one kept are kept too (shell completeness)."""


class GraphConfig(BaseModel):
    """How a structure becomes a graph. Part of a model's architecture: change it and retrain."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    cutoff: float = Field(8.0, gt=0, description="neighbour search radius, Å")
    max_neighbors: int = Field(12, ge=1, description="nearest neighbours kept per site (ties kept too)")
    gaussian_step: float = Field(0.2, gt=0, description="spacing and width of the Gaussian distance basis, Å")

    @property
    def n_gaussians(self) -> int:
        """Number of Gaussian centres from 0 to ``cutoff``."""
        return math.floor(self.cutoff / self.gaussian_step + 1e-9) + 1


class CrystalGraph(NamedTuple):
    """One structure as arrays: node atomic numbers, edges (source j, target i) and their lengths."""

    numbers: np.ndarray  # (n,) int64
    edge_index: np.ndarray  # (2, E) int64, row 0 = neighbour j, row 1 = centre i
    distances: np.ndarray  # (E,) float32, Å


class GraphBatch(NamedTuple):
    """Graphs concatenated for one forward pass (node indices offset per graph)."""

    numbers: torch.Tensor  # (N,)
    edge_index: torch.Tensor  # (2, E)
    distances: torch.Tensor  # (E,)
    batch: torch.Tensor  # (N,) graph index of each node
    n_graphs: int

    def to(self, device: torch.device | str) -> GraphBatch:
        return GraphBatch(
            self.numbers.to(device),
            self.edge_index.to(device),
            self.distances.to(device),
            self.batch.to(device),
            self.n_graphs,
        )


# ---------- element features ----------
_CATEGORICAL: dict[str, list[Any]] = {
    "group": list(range(1, 19)),
    "row": list(range(1, 8)),
    "block": ["s", "p", "d", "f"],
}
_CONTINUOUS: dict[str, bool] = {
    # property -> binned on a log scale
    "X": False,
    "atomic_radius": False,
    "molar_volume": True,
    "melting_point": True,
    "ionization_energy": False,
    "electron_affinity": False,
    "mendeleev_no": False,
    "bulk_modulus": True,
}
_N_BINS = 10


def _element_value(el: Element, prop: str) -> float | None:
    """A scalar element property from pymatgen's bundled data, or None when the table lacks it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            value = getattr(el, prop)
        except (AttributeError, KeyError, ValueError, TypeError):
            return None
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@functools.cache
def atom_feature_table() -> np.ndarray:
    """(MAX_Z + 1, F) float32 table of element features, row z for atomic number z.

    Per element: one-hot group, period and block; for each continuous property (electronegativity,
    atomic radius, molar volume, melting point, first ionization energy, electron affinity,
    Mendeleev number, elemental bulk modulus) a one-hot over ten quantile bins across the elements
    plus the standardized value, all zero where pymatgen has no value. Quantile bins give every bin
    about as many elements, as CGCNN's hand-made table does. The table is stored in each
    checkpoint, so a model keeps the features it was trained with.
    """
    elements = [Element.from_Z(z) for z in range(1, MAX_Z + 1)]
    columns: list[np.ndarray] = []
    for prop, categories in _CATEGORICAL.items():
        onehot = np.zeros((MAX_Z, len(categories)), dtype=np.float32)
        for k, el in enumerate(elements):
            value = getattr(el, prop)
            if value in categories:
                onehot[k, categories.index(value)] = 1.0
        columns.append(onehot)
    for prop, log_scale in _CONTINUOUS.items():
        raw = [_element_value(el, prop) for el in elements]
        vals = np.array([np.nan if v is None or (log_scale and v <= 0) else v for v in raw], dtype=float)
        if log_scale:
            vals = np.log(vals)
        known = np.isfinite(vals)
        edges = np.quantile(vals[known], np.linspace(0, 1, _N_BINS + 1)[1:-1])
        onehot = np.zeros((MAX_Z, _N_BINS), dtype=np.float32)
        onehot[np.flatnonzero(known), np.searchsorted(edges, vals[known], side="right")] = 1.0
        scaled = np.zeros((MAX_Z, 1), dtype=np.float32)
        scaled[known, 0] = (vals[known] - vals[known].mean()) / vals[known].std()
        columns += [onehot, scaled]
    table = np.concatenate(columns, axis=1)
    return np.concatenate([np.zeros((1, table.shape[1]), dtype=np.float32), table], axis=0)


@functools.cache
def _symbol_to_z() -> dict[str, int]:
    return {Element.from_Z(z).symbol: z for z in range(1, MAX_Z + 1)}


def atomic_numbers(species: Sequence[str]) -> np.ndarray:
    """Atomic numbers of element symbols; a clear error for anything outside H..Pu."""
    table = _symbol_to_z()
    try:
        return np.array([table[s] for s in species], dtype=np.int64)
    except KeyError as err:
        raise ValueError(f"element {err.args[0]!r} has no CGCNN features (only Z = 1..{MAX_Z})") from None


# ---------- graphs ----------
def build_graph(
    lattice: np.ndarray | Sequence[Sequence[float]],
    frac_coords: np.ndarray | Sequence[Sequence[float]],
    species: Sequence[str],
    config: GraphConfig,
) -> CrystalGraph:
    """The crystal graph of one periodic structure (lattice rows are the cell vectors, Å)."""
    cell = np.asarray(lattice, dtype=np.float64)
    frac = np.mod(np.asarray(frac_coords, dtype=np.float64), 1.0)
    numbers = atomic_numbers(species)
    positions = frac @ cell
    nl = NeighborList(cutoff=config.cutoff, full_list=True)
    centre, neigh, dist = nl.compute(positions, cell, True, "ijd")
    centre, neigh, dist = centre.astype(np.int64), neigh.astype(np.int64), dist.astype(np.float64)
    if centre.size:
        order = np.lexsort((dist, centre))
        centre, neigh, dist = centre[order], neigh[order], dist[order]
        starts = np.searchsorted(centre, np.arange(len(numbers)))
        rank = np.arange(len(centre)) - starts[centre]
        counts = np.bincount(centre, minlength=len(numbers))
        kth = np.where(
            counts >= config.max_neighbors,
            dist[np.minimum(starts + config.max_neighbors - 1, len(dist) - 1)],
            np.inf,
        )
        keep = (rank < config.max_neighbors) | (dist <= kth[centre] + _TIE_TOLERANCE)
        centre, neigh, dist = centre[keep], neigh[keep], dist[keep]
    return CrystalGraph(numbers, np.stack([neigh, centre]), dist.astype(np.float32))


def graph_of_row(row: Mapping[str, Any], config: GraphConfig) -> CrystalGraph:
    """The graph of a ``structures`` row (lattice, frac_coords, species columns)."""
    return build_graph(row["lattice"], row["frac_coords"], row["species"], config)


def collate(graphs: Sequence[CrystalGraph]) -> GraphBatch:
    """Concatenate graphs into one batch, offsetting node indices."""
    sizes = np.array([len(g.numbers) for g in graphs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    edge_index = np.concatenate([g.edge_index + off for g, off in zip(graphs, offsets, strict=True)], axis=1)
    return GraphBatch(
        numbers=torch.from_numpy(np.concatenate([g.numbers for g in graphs])),
        edge_index=torch.from_numpy(edge_index),
        distances=torch.from_numpy(np.concatenate([g.distances for g in graphs])),
        batch=torch.from_numpy(np.repeat(np.arange(len(graphs), dtype=np.int64), sizes)),
        n_graphs=len(graphs),
    )


class GraphCache:
    """Graphs keyed by structure_id for one ``GraphConfig``, optionally persisted to one ``.npz`` file.

    A structure_id names a crystal independently of its cell (core.structures), and the graph
    keeps tied neighbour shells, so one graph per id serves every cell of that crystal. With a
    ``directory``, graphs load from ``graphs-<config hash>.npz`` there and ``save()`` writes the
    file back atomically; the file holds only arrays (no pickle).
    """

    def __init__(self, config: GraphConfig, directory: str | Path | None = None) -> None:
        self.config = config
        self.path = Path(directory).expanduser() / f"graphs-{settings_hash(config)}.npz" if directory else None
        self._graphs: dict[str, CrystalGraph] = {}
        self._dirty = False
        if self.path is not None and self.path.exists():
            self._load(self.path)

    def __len__(self) -> int:
        return len(self._graphs)

    def __contains__(self, structure_id: object) -> bool:
        return structure_id in self._graphs

    def graphs(self, rows: Sequence[Mapping[str, Any]], *, progress: bool = False) -> list[CrystalGraph]:
        """Graphs of ``structures`` rows in order, built for ids not cached yet."""
        missing = [r for r in rows if r["structure_id"] not in self._graphs]
        for row in tqdm(missing, desc="graphs", disable=not progress or not missing, leave=False):
            self._graphs[row["structure_id"]] = graph_of_row(row, self.config)
        self._dirty |= bool(missing)
        return [self._graphs[r["structure_id"]] for r in rows]

    def save(self) -> Path | None:
        """Write the cache file if anything was added (no-op without a directory)."""
        if self.path is None or not self._dirty:
            return self.path
        ids = list(self._graphs)
        graphs = [self._graphs[i] for i in ids]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez(
            tmp,
            ids=np.array(ids, dtype=str),
            n_nodes=np.array([len(g.numbers) for g in graphs], dtype=np.int64),
            n_edges=np.array([g.distances.size for g in graphs], dtype=np.int64),
            numbers=_concat([g.numbers for g in graphs], np.int64),
            edge_index=np.concatenate([g.edge_index for g in graphs], axis=1) if graphs else np.zeros((2, 0), np.int64),
            distances=_concat([g.distances for g in graphs], np.float32),
        )
        tmp.replace(self.path)
        self._dirty = False
        return self.path

    def _load(self, path: Path) -> None:
        with np.load(path, allow_pickle=False) as data:
            node_ends = np.cumsum(data["n_nodes"])
            edge_ends = np.cumsum(data["n_edges"])
            numbers = np.split(data["numbers"], node_ends[:-1])
            edges = np.split(data["edge_index"], edge_ends[:-1], axis=1)
            dists = np.split(data["distances"], edge_ends[:-1])
            for sid, z, e, d in zip(data["ids"].tolist(), numbers, edges, dists, strict=True):
                self._graphs[sid] = CrystalGraph(z, e, d)


def _concat(arrays: Iterable[np.ndarray], dtype: type) -> np.ndarray:
    arrays = list(arrays)
    return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype=dtype)
