"""CGCNN ensemble predicting log10 of a modulus (K_vrh, or G_vrh for a shear ensemble): model, training,
inference, safe checkpoints.

The model is Xie & Grossman's crystal graph network on torch-geometric's ``CGConv``: element
features -> linear embedding -> ``n_conv`` gated graph convolutions over Gaussian-expanded
distances -> mean over sites -> an MLP -> log10 K_vrh (GPa; ``target`` names another modulus, e.g. the stage-I
G predictor of a design with a G or G/K condition). Targets are standardized with the
training mean and spread, kept as buffers in the model so a checkpoint predicts on its own.

An ensemble is ``n_models`` members trained on the same split with seeds ``seed, seed+1, ...``
(different initialisation and batch order). The prediction is the mean of the members' log10 K;
the spread (standard deviation across members) is the uncertainty, reported both in log10 units
and in GPa. Training is early-stopped on the validation MAE and bitwise reproducible on the CPU
for a given seed; on CUDA, scatter sums use atomics, so reruns agree only to float tolerance.

Checkpoints hold the config, the member state dicts and the metrics, nothing executable: they load
with ``torch.load(weights_only=True)``, and a checkpoint whose architecture differs from the config
the caller expects is refused with the differing fields named.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch_geometric.nn import CGConv, global_mean_pool
from tqdm import tqdm

from core import graphs as graphs_module
from core.device import resolve_device
from core.graphs import CrystalGraph, GraphBatch, GraphConfig, atom_feature_table, collate
from core.presets import Presets
from core.provenance import settings_hash

CHECKPOINT_FORMAT = "matloop-cgcnn/1"


class CGCNNConfig(BaseModel):
    """Architecture and training settings of a CGCNN ensemble (``PRESETS`` holds the named ones)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    graph: GraphConfig = GraphConfig()
    atom_hidden: int = Field(64, ge=1, description="width of the site features in the convolutions")
    n_conv: int = Field(3, ge=1, description="number of CGConv layers")
    fc_hidden: int = Field(128, ge=1, description="width of the MLP after pooling")
    n_fc: int = Field(1, ge=1, description="hidden layers in the MLP after pooling")
    n_models: int = Field(4, ge=1, description="ensemble members")
    seed: int = Field(0, description="member k is trained with seed + k")
    max_epochs: int = Field(30, ge=1)
    finetune_epochs: int = Field(10, ge=1, description="epochs of a warm start from a parent model")
    finetune_lr_scale: float = Field(0.3, gt=0, description="learning rate of a warm start, relative to lr")
    patience: int = Field(10, ge=1, description="stop after this many epochs without a better validation MAE")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0, description="AdamW learning rate, cosine-annealed to lr/100 over max_epochs")
    weight_decay: float = Field(1e-5, ge=0)
    loss: Literal["l1", "mse"] = Field("l1", description="training loss on the standardized log10 K")
    target: Literal["k_vrh", "g_vrh"] = Field("k_vrh", description="the modulus the ensemble predicts (log10 GPa)")
    device: str = Field("auto", description="'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:1', ...")

    ARCHITECTURE: ClassVar[tuple[str, ...]] = (
        "graph",
        "atom_hidden",
        "n_conv",
        "fc_hidden",
        "n_fc",
        "n_models",
        "target",
    )

    def architecture(self) -> dict[str, Any]:
        """The fields a checkpoint must agree on to load (graph, layer sizes, member count, what it predicts)."""
        dumped = self.model_dump(mode="json")
        return {k: dumped[k] for k in self.ARCHITECTURE}


PRESETS: Presets[CGCNNConfig] = Presets(
    "CGCNN config",
    {
        "default": CGCNNConfig(),
        "small": CGCNNConfig(
            graph=GraphConfig(cutoff=6.0, max_neighbors=8, gaussian_step=0.5),
            atom_hidden=16,
            n_conv=2,
            fc_hidden=32,
            n_models=2,
            max_epochs=30,
            patience=10,
            batch_size=32,
        ),
    },
)
"""Named configs: ``default`` for production and the benchmark, ``small`` for tests and demos."""


ConfigName = Literal[tuple(PRESETS)]  # type: ignore[valid-type]
"""The named CGCNN configs, as a type: a form shows them as choices."""


# ---------- model ----------
class GaussianExpansion(nn.Module):
    """exp(-(d - mu_k)^2 / step^2) on centres mu_k = 0, step, ..., cutoff (CGCNN's edge features)."""

    def __init__(self, config: GraphConfig) -> None:
        super().__init__()
        self.register_buffer("centres", torch.arange(config.n_gaussians, dtype=torch.float32) * config.gaussian_step)
        self.width = config.gaussian_step

    def forward(self, distances: torch.Tensor) -> torch.Tensor:
        return torch.exp(-((distances[:, None] - self.centres[None, :]) ** 2) / self.width**2)


class CGCNN(nn.Module):
    """One crystal graph network mapping a ``GraphBatch`` to log10 K_vrh per graph."""

    def __init__(self, config: CGCNNConfig) -> None:
        super().__init__()
        table = torch.from_numpy(atom_feature_table())
        self.register_buffer("atom_features", table)
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_std", torch.ones(()))
        self.expand = GaussianExpansion(config.graph)
        self.embed = nn.Linear(table.shape[1], config.atom_hidden)
        self.convs = nn.ModuleList(
            CGConv(config.atom_hidden, dim=config.graph.n_gaussians, aggr="add", batch_norm=True)
            for _ in range(config.n_conv)
        )
        layers: list[nn.Module] = [nn.Linear(config.atom_hidden, config.fc_hidden), nn.Softplus()]
        for _ in range(config.n_fc - 1):
            layers += [nn.Linear(config.fc_hidden, config.fc_hidden), nn.Softplus()]
        layers.append(nn.Linear(config.fc_hidden, 1))
        self.head = nn.Sequential(*layers)
        self.act = nn.Softplus()

    def forward_standardized(self, batch: GraphBatch) -> torch.Tensor:
        """The prediction in standardized units (what the loss sees)."""
        x = self.embed(self.atom_features[batch.numbers])
        edge_attr = self.expand(batch.distances)
        for conv in self.convs:
            x = self.act(conv(x, batch.edge_index, edge_attr))
        pooled = global_mean_pool(x, batch.batch, size=batch.n_graphs)
        return self.head(pooled).squeeze(-1)

    def forward(self, batch: GraphBatch) -> torch.Tensor:
        """log10 K_vrh (GPa) per graph."""
        return self.forward_standardized(batch) * self.target_std + self.target_mean


# ---------- predictions ----------
@dataclass(frozen=True)
class Prediction:
    """Ensemble predictions for n structures: member values and their mean and spread.

    The ``k`` names are the default target's; an ensemble trained on another modulus (``CGCNNConfig.target``)
    fills them with that modulus (``gpa`` and ``gpa_std`` say so without the K)."""

    members_log10: np.ndarray  # (n_models, n)

    @property
    def log10_k(self) -> np.ndarray:
        """Ensemble mean of log10 K_vrh: the prediction."""
        return self.members_log10.mean(axis=0)

    @property
    def log10_k_std(self) -> np.ndarray:
        """Spread of the members' log10 K (sample std; 0 for a single model)."""
        n = self.members_log10.shape[0]
        return self.members_log10.std(axis=0, ddof=1) if n > 1 else np.zeros(self.members_log10.shape[1])

    @property
    def k_vrh(self) -> np.ndarray:
        """Predicted K_vrh in GPa: 10 ** (mean log10 K)."""
        return 10.0**self.log10_k

    @property
    def k_vrh_std(self) -> np.ndarray:
        """Uncertainty in GPa: the spread of the members' K_vrh in GPa."""
        members = 10.0**self.members_log10
        n = members.shape[0]
        return members.std(axis=0, ddof=1) if n > 1 else np.zeros(members.shape[1])

    gpa = k_vrh
    """The predicted modulus (``target``) in GPa."""
    gpa_std = k_vrh_std
    """Its uncertainty in GPa."""


def _batches(n: int, size: int, order: np.ndarray | None = None) -> list[np.ndarray]:
    idx = np.arange(n) if order is None else order
    return [idx[i : i + size] for i in range(0, n, size)]


@torch.no_grad()
def _predict_member(model: CGCNN, graphs: Sequence[CrystalGraph], device: torch.device, batch_size: int) -> np.ndarray:
    model.eval()
    out = [
        model(collate([graphs[i] for i in idx]).to(device)).cpu().numpy() for idx in _batches(len(graphs), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros(0)


def mae_metrics(log10_pred: np.ndarray, log10_true: np.ndarray) -> dict[str, float]:
    """MAE of log10 K and in GPa (the figures the issue asks for)."""
    return {
        "mae_log10": float(np.mean(np.abs(log10_pred - log10_true))),
        "mae_gpa": float(np.mean(np.abs(10.0**log10_pred - 10.0**log10_true))),
        "n": int(log10_true.size),
    }


# ---------- training ----------
@dataclass
class TrainResult:
    """A trained member and how training went."""

    model: CGCNN
    best_epoch: int
    best_val_mae_log10: float
    epochs_run: int
    seconds: float


def train_member(
    train_graphs: Sequence[CrystalGraph],
    train_y: np.ndarray,
    val_graphs: Sequence[CrystalGraph],
    val_y: np.ndarray,
    config: CGCNNConfig,
    seed: int,
    *,
    init: CGCNN | None = None,
    weights: np.ndarray | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train one network on log10 K, keep the weights with the best validation MAE (early stopping).

    ``init`` warm-starts from a trained network (its target statistics kept, ``finetune_epochs`` at
    ``lr * finetune_lr_scale``); ``weights`` set how often each training graph is drawn per epoch, so a
    few dozen new labels count against thousands of seed rows. Seeding is local (forked RNG and a
    private generator for the batch order), so training neither reads nor disturbs the global random
    state and is reproducible on the CPU.
    """
    if len(train_graphs) == 0 or len(val_graphs) == 0:
        raise ValueError(f"need training and validation structures (got {len(train_graphs)} and {len(val_graphs)})")
    device = resolve_device(config.device)
    if init is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CGCNN(config)
        model.target_mean.fill_(float(np.mean(train_y)))
        model.target_std.fill_(max(float(np.std(train_y)), 1e-6))
        epochs, lr = config.max_epochs, config.lr
    else:
        model = copy.deepcopy(init)
        epochs, lr = config.finetune_epochs, config.lr * config.finetune_lr_scale
    model.to(device)
    generator = torch.Generator().manual_seed(seed)
    y_std = torch.as_tensor((train_y - model.target_mean.item()) / model.target_std.item(), dtype=torch.float32)
    uniform = weights is None or bool(np.all(weights == weights[0]))
    draw = None if uniform else torch.as_tensor(weights, dtype=torch.float64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=lr / 100)
    loss_fn = nn.L1Loss() if config.loss == "l1" else nn.MSELoss()
    val_batches = [collate([val_graphs[i] for i in idx]).to(device) for idx in _batches(len(val_graphs), 256)]

    best_state, best_mae, best_epoch, epoch = copy.deepcopy(model.state_dict()), math.inf, -1, -1
    start = time.perf_counter()
    bar = tqdm(range(epochs), desc=f"cgcnn seed {seed}", disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        if draw is None:
            order = torch.randperm(len(train_graphs), generator=generator).numpy()
        else:
            order = torch.multinomial(draw, len(train_graphs), replacement=True, generator=generator).numpy()
        for idx in _batches(len(train_graphs), config.batch_size, order):
            if len(idx) < 2:  # batch norm needs more than one graph's statistics to be meaningful
                continue
            batch = collate([train_graphs[i] for i in idx]).to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model.forward_standardized(batch), y_std[idx].to(device))
            loss.backward()
            optimizer.step()
        scheduler.step()
        model.eval()
        with torch.no_grad():
            val_pred = torch.cat([model(b) for b in val_batches]).cpu().numpy()
        val_mae = float(np.mean(np.abs(val_pred - val_y)))
        if val_mae < best_mae:
            best_mae, best_epoch, best_state = val_mae, epoch, copy.deepcopy(model.state_dict())
        bar.set_postfix(val_mae=f"{val_mae:.4f}", best=f"{best_mae:.4f}")
        if log is not None and (epoch % 10 == 0 or epoch - best_epoch >= config.patience):
            log(f"seed {seed} epoch {epoch}: val MAE log10 {val_mae:.4f} (best {best_mae:.4f} at {best_epoch})")
        if epoch - best_epoch >= config.patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(model, best_epoch, best_mae, epoch + 1, time.perf_counter() - start)


class CheckpointError(ValueError):
    """A checkpoint that is not a CGCNN ensemble, or one whose architecture differs from the expected config."""


class Ensemble:
    """Independently seeded CGCNN members sharing one config; predicts mean and spread."""

    def __init__(self, config: CGCNNConfig, members: Sequence[CGCNN], metrics: Mapping[str, Any] | None = None) -> None:
        if len(members) != config.n_models:
            raise ValueError(f"config asks for {config.n_models} members, got {len(members)}")
        self.config = config
        self.members = list(members)
        self.metrics: dict[str, Any] = dict(metrics or {})
        self.device = resolve_device(config.device)
        for m in self.members:
            m.to(self.device).eval()

    @classmethod
    def untrained(cls, config: CGCNNConfig) -> Ensemble:
        """Freshly initialised members (seeded): for throughput measurements and tests of the plumbing."""
        members = []
        for k in range(config.n_models):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed + k)
                members.append(CGCNN(config))
        return cls(config, members)

    def predict_graphs(self, graphs: Sequence[CrystalGraph], batch_size: int = 256) -> Prediction:
        """Member predictions for already-built graphs."""
        values = [_predict_member(m, graphs, self.device, batch_size) for m in self.members]
        return Prediction(np.stack(values) if values else np.zeros((0, len(graphs))))

    def predict_rows(
        self,
        rows: Sequence[Mapping[str, Any]],
        cache: graphs_module.GraphCache | None = None,
        *,
        progress: bool = False,
    ) -> Prediction:
        """Predictions for ``structures`` rows (structure_id, lattice, frac_coords, species)."""
        cache = cache if cache is not None else graphs_module.GraphCache(self.config.graph)
        if cache.config != self.config.graph:
            raise ValueError("graph cache was built with different graph settings than this model")
        return self.predict_graphs(cache.graphs(rows, progress=progress))

    # ----- checkpoints -----
    def save(self, path: str | Path) -> Path:
        """Write config + member state dicts + metrics (tensors and plain data only), atomically."""
        path = Path(path)
        payload = {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.model_dump(mode="json"),
            "config_hash": settings_hash(self.config.architecture()),
            "members": [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in self.members],
            "metrics": self.metrics,
        }
        tmp = path.with_name(path.name + ".tmp")
        torch.save(payload, tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, expected: CGCNNConfig | None = None, *, device: str | None = None) -> Ensemble:
        """Load a checkpoint safely (weights only); refuse one whose architecture differs from ``expected``."""
        try:
            payload = torch.load(Path(path), map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for foreign or corrupt files
            raise CheckpointError(f"{path}: not a loadable CGCNN checkpoint ({type(err).__name__}: {err})") from err
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
            raise CheckpointError(f"{path}: checkpoint format {found!r}, expected {CHECKPOINT_FORMAT!r}")
        stored = CGCNNConfig.model_validate(payload["config"])
        if expected is not None and stored.architecture() != expected.architecture():
            a, b = stored.architecture(), expected.architecture()
            diffs = ", ".join(f"{k}: checkpoint {a[k]} vs expected {b[k]}" for k in a if a[k] != b[k])
            raise CheckpointError(f"{path}: checkpoint was trained with a different model config ({diffs})")
        if device is not None:
            stored = stored.model_copy(update={"device": device})
        members = []
        for k, state in enumerate(payload["members"]):
            model = CGCNN(stored)
            try:
                model.load_state_dict(state)
            except RuntimeError as err:
                raise CheckpointError(f"{path}: member {k} does not fit its stored config: {err}") from err
            members.append(model)
        if len(members) != stored.n_models:
            raise CheckpointError(f"{path}: {len(members)} members stored, config says {stored.n_models}")
        return cls(stored, members, payload.get("metrics"))


def train_ensemble(
    train: tuple[Sequence[CrystalGraph], np.ndarray],
    val: tuple[Sequence[CrystalGraph], np.ndarray],
    config: CGCNNConfig,
    *,
    parent: Ensemble | None = None,
    weights: np.ndarray | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> Ensemble:
    """Train ``config.n_models`` members (seeds seed..seed+n-1), each warm-started from ``parent``'s when given."""
    if parent is not None and parent.config.architecture() != config.architecture():
        raise ValueError("a warm start needs the parent's architecture (graph settings, layer sizes, members)")
    results = [
        train_member(
            *train,
            *val,
            config,
            config.seed + k,
            init=parent.members[k] if parent else None,
            weights=weights,
            progress=progress,
            log=log,
        )
        for k in range(config.n_models)
    ]
    metrics = {
        "members": [
            {
                "seed": config.seed + k,
                "best_epoch": r.best_epoch,
                "epochs_run": r.epochs_run,
                "val_mae_log10": r.best_val_mae_log10,
                "seconds": round(r.seconds, 2),
            }
            for k, r in enumerate(results)
        ],
        "train_seconds": round(sum(r.seconds for r in results), 2),
        "n_train": len(train[0]),
        "n_val": len(val[0]),
    }
    return Ensemble(config, [r.model for r in results], metrics)


def evaluate(ensemble: Ensemble, graphs: Sequence[CrystalGraph], log10_true: np.ndarray) -> dict[str, Any]:
    """Ensemble and per-member MAE (log10 and GPa) on a labeled set."""
    pred = ensemble.predict_graphs(graphs)
    return {
        "ensemble": mae_metrics(pred.log10_k, log10_true),
        "members": [mae_metrics(p, log10_true) for p in pred.members_log10],
        "mean_log10_std": float(pred.log10_k_std.mean()) if log10_true.size else math.nan,
    }
