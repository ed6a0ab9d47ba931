"""Figures for each iteration's report: MAPE per target, DFT K histogram, latent-space map.

Each function draws on a fresh matplotlib figure (Agg backend, no display needed) and writes a
PNG; the caller stores it in the lake and links it from a Prefect artifact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator


def mape_per_target(rows: Sequence[Mapping], path: Path, column: str = "mape_gnn", label: str | None = None) -> Path:
    """MAPE against each target across iterations, one line per target (the reference work's Fig. 3d).

    ``column`` picks the figure: ``mape_gnn`` (stage-I CGCNN on kept candidates) or ``mape_grader_raw``
    (the frozen grader on all raw samples, the reference metric).
    """
    fig, ax = plt.subplots(figsize=(6, 4))
    for target in sorted({r["target"] for r in rows}):
        pts = sorted((r["iteration"], r[column]) for r in rows if r["target"] == target and r.get(column) is not None)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=f"{target:g} GPa")
    iterations = sorted({int(r["iteration"]) for r in rows})
    if iterations:  # whole iterations only, with room around a single one
        ax.set_xticks(iterations if len(iterations) <= 12 else iterations[:: len(iterations) // 12 + 1])
        ax.set_xlim(iterations[0] - 0.5, iterations[-1] + 0.5)
    ax.set_xlabel("iteration")
    ax.set_ylabel(label or f"MAPE vs target ({column})")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def dft_k_histogram(
    values_by_iteration: Mapping[int, Sequence[float]], path: Path, target: float | None = None
) -> Path:
    """Histogram of the DFT K of newly labeled structures, one colour per iteration."""
    fig, ax = plt.subplots(figsize=(6, 4))
    span = [v for vs in values_by_iteration.values() for v in vs] + ([target] if target is not None else [])
    lo, hi = min(span, default=0.0), max(span, default=500.0)
    bins = np.linspace(lo - 0.05 * (hi - lo) - 10, hi + 0.05 * (hi - lo) + 10, 21)  # never zero-width
    for iteration, vs in sorted(values_by_iteration.items()):
        if len(vs):
            ax.hist(vs, bins=bins, alpha=0.6, label=f"iteration {iteration}")
    if target is not None:
        ax.axvline(target, color="k", ls="--", label=f"target {target:g} GPa")
    if not any(len(vs) for vs in values_by_iteration.values()):
        ax.text(0.5, 0.5, "no structures labeled yet", transform=ax.transAxes, ha="center")
    ax.set_xlabel("DFT K_vrh (GPa)")
    ax.set_ylabel("new structures")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: no fractional ticks
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _save(fig, path)


def k_distributions(
    samples: Mapping[tuple[int, float], Sequence[float]], path: Path, xlabel: str = "K_vrh of raw samples (GPa)"
) -> Path:
    """K of generated samples per target (one panel each), one histogram per iteration (the reference Fig. 3a-c)."""
    targets = sorted({t for _, t in samples})
    fig, axes = plt.subplots(1, max(len(targets), 1), figsize=(3.2 * max(len(targets), 1), 3.2), squeeze=False)
    values = [v for vs in samples.values() for v in vs]
    hi = max(values, default=500.0) * 1.05 + 1.0
    bins = np.linspace(0.0, hi, 31)
    for ax, target in zip(axes[0], targets, strict=False):
        for (iteration, t), vs in sorted(samples.items()):
            if t == target and len(vs):
                ax.hist(vs, bins=bins, alpha=0.5, density=True, label=f"iteration {iteration}")
        ax.axvline(target, color="k", ls="--")
        ax.set_title(f"target {target:g} GPa", fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.legend(fontsize=7)
    if not targets:
        axes[0][0].text(0.5, 0.5, "no samples recorded", transform=axes[0][0].transAxes, ha="center")
    return _save(fig, path)


def latent_map(latents: np.ndarray, is_new: np.ndarray, values: np.ndarray, path: Path, seed: int = 0) -> Path:
    """2-D t-SNE of generator latents coloured by K, with this iteration's structures highlighted."""
    from sklearn.manifold import TSNE

    perplexity = float(min(30, max(2, len(latents) // 4)))
    xy = TSNE(n_components=2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(latents)
    fig, ax = plt.subplots(figsize=(6, 5))
    sc = ax.scatter(xy[~is_new, 0], xy[~is_new, 1], c=values[~is_new], s=8, cmap="viridis", alpha=0.7)
    ax.scatter(xy[is_new, 0], xy[is_new, 1], facecolors="none", edgecolors="red", s=60, label="new this iteration")
    fig.colorbar(sc, ax=ax, label="K_vrh (GPa)")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=8)
    return _save(fig, path)


def parity_plot(
    true_gpa: np.ndarray, pred_gpa: np.ndarray, std_gpa: np.ndarray, path: Path, title: str, quantity: str = "K_vrh"
) -> Path:
    """Log-log parity plot of a predicted vs reference modulus with the ensemble spread as error bars."""
    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    lo = float(min(true_gpa.min(), pred_gpa.min())) * 0.8
    hi = float(max(true_gpa.max(), pred_gpa.max())) * 1.25
    ax.plot([lo, hi], [lo, hi], color="0.5", lw=1, ls="--")
    ax.errorbar(true_gpa, pred_gpa, yerr=std_gpa, fmt="o", ms=3, alpha=0.6, elinewidth=0.6)
    ax.set_title(title, fontsize=10)
    ax.set(
        xscale="log",
        yscale="log",
        xlim=(lo, hi),
        ylim=(lo, hi),
        xlabel=f"reference {quantity} (GPa)",
        ylabel=f"CGCNN {quantity} (GPa)",
    )
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
