"""Heatmaps of attention weights and masks, used by every chapter.

All functions accept tensors (any device, any float dtype, with or without grad) or arrays,
label rows as queries and columns as keys, and return the matplotlib objects they drew on so a
chapter can add to them. Boolean masks follow the book's convention: True = may attend.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

__all__ = ["to_numpy", "heatmap", "mask_heatmap", "heatmap_grid", "mask_effect"]

#: Two colours for boolean masks: blocked (False) is light grey, allowed (True) is dark blue.
MASK_CMAP = ListedColormap(["#e8e8e8", "#1f4e79"])


def to_numpy(x: Any) -> np.ndarray:
    """Return a 2-D float array from a tensor or array (detached, on the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if x.dtype.is_floating_point or x.dtype.is_complex:
            x = x.double()
        x = x.numpy()
    arr = np.asarray(x)
    if arr.dtype == bool:
        arr = arr.astype(float)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D matrix (queries x keys), got shape {arr.shape}")
    return arr


def _labels(ax: Axes, rows: Sequence[str] | None, cols: Sequence[str] | None,
            xlabel: str, ylabel: str, n_rows: int, n_cols: int) -> None:
    if cols is not None:
        if len(cols) != n_cols:
            raise ValueError(f"{len(cols)} column labels for {n_cols} columns")
        ax.set_xticks(range(n_cols), labels=list(cols), rotation=45, ha="right",
                      rotation_mode="anchor")
    else:
        ax.set_xticks(range(n_cols))
    if rows is not None:
        if len(rows) != n_rows:
            raise ValueError(f"{len(rows)} row labels for {n_rows} rows")
        ax.set_yticks(range(n_rows), labels=list(rows))
    else:
        ax.set_yticks(range(n_rows))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def heatmap(
    weights: Any,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    ax: Axes | None = None,
    title: str | None = None,
    annotate: bool | None = None,
    vmin: float | None = 0.0,
    vmax: float | None = 1.0,
    cmap: str = "viridis",
    colorbar: bool = True,
    xlabel: str = "key",
    ylabel: str = "query",
) -> Axes:
    """Draw a (queries x keys) matrix of attention weights.

    ``annotate`` writes each value in its cell (default: only for matrices up to 12 x 12).
    Set ``vmin``/``vmax`` to None to scale colours to the data (e.g. raw scores).
    """
    data = to_numpy(weights)
    if ax is None:
        _, ax = plt.subplots(figsize=(0.55 * data.shape[1] + 2.2, 0.5 * data.shape[0] + 1.6))
    im = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, aspect="equal")
    _labels(ax, row_labels, col_labels, xlabel, ylabel, *data.shape)
    if annotate is None:
        annotate = max(data.shape) <= 12
    if annotate:
        lo = np.nanmin(data) if vmin is None else vmin
        hi = np.nanmax(data) if vmax is None else vmax
        mid = (lo + hi) / 2
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                val = data[i, j]
                ax.text(j, i, f"{val:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if val > mid else "white")
    if title:
        ax.set_title(title)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return ax


def mask_heatmap(
    mask: Any,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    ax: Axes | None = None,
    title: str | None = "mask (True = may attend)",
    xlabel: str = "key",
    ylabel: str = "query",
) -> Axes:
    """Draw a boolean mask: dark cells may attend (True), light cells are blocked (False)."""
    data = to_numpy(mask)
    if ax is None:
        _, ax = plt.subplots(figsize=(0.55 * data.shape[1] + 1.6, 0.5 * data.shape[0] + 1.6))
    ax.imshow(data, cmap=MASK_CMAP, vmin=0, vmax=1, aspect="equal")
    _labels(ax, row_labels, col_labels, xlabel, ylabel, *data.shape)
    if max(data.shape) <= 16:
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                ax.text(j, i, "T" if data[i, j] else "F", ha="center", va="center", fontsize=7,
                        color="white" if data[i, j] else "#888888")
    if title:
        ax.set_title(title)
    return ax


def heatmap_grid(
    matrices: Any,
    titles: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    ncols: int = 4,
    annotate: bool = False,
    vmin: float | None = 0.0,
    vmax: float | None = 1.0,
    suptitle: str | None = None,
    cmap: str = "viridis",
) -> Figure:
    """Draw a grid of heatmaps, one per leading index (e.g. per head), sharing one colour scale.

    ``matrices`` is a tensor/array of shape (n, L, S) or a sequence of 2-D matrices.
    """
    mats = [to_numpy(m) for m in matrices]
    if not mats:
        raise ValueError("heatmap_grid needs at least one matrix")
    if titles is not None and len(titles) != len(mats):
        raise ValueError(f"{len(titles)} titles for {len(mats)} matrices")
    n = len(mats)
    ncols = max(1, min(ncols, n))
    nrows = (n + ncols - 1) // ncols
    h, w = mats[0].shape
    fig, axes = plt.subplots(nrows, ncols, squeeze=False,
                             figsize=(ncols * (0.42 * w + 1.4), nrows * (0.42 * h + 1.3)),
                             layout="constrained")
    im = None
    for idx, ax in enumerate(axes.flat):
        if idx >= n:
            ax.axis("off")
            continue
        im = ax.imshow(mats[idx], cmap=cmap, vmin=vmin, vmax=vmax, aspect="equal")
        first_col, last_row = idx % ncols == 0, idx // ncols == nrows - 1 or idx + ncols >= n
        _labels(ax, row_labels if first_col else None, col_labels if last_row else None,
                "key" if last_row else "", "query" if first_col else "", *mats[idx].shape)
        if not first_col:
            ax.set_yticklabels([])
        if not last_row:
            ax.set_xticklabels([])
        if annotate:
            for i in range(mats[idx].shape[0]):
                for j in range(mats[idx].shape[1]):
                    ax.text(j, i, f"{mats[idx][i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if mats[idx][i, j] < 0.5 else "black")
        if titles is not None:
            ax.set_title(titles[idx], fontsize=10)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8)
    if suptitle:
        fig.suptitle(suptitle)
    return fig


def mask_effect(
    mask: Any,
    before: Any,
    after: Any,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    titles: Sequence[str] = ("mask (True = may attend)", "weights without mask",
                             "weights with mask"),
) -> Figure:
    """Three panels side by side: a boolean mask, the weights before and after applying it."""
    m = to_numpy(mask)
    h, w = m.shape
    fig, axes = plt.subplots(1, 3, figsize=(3 * (0.5 * w + 1.6), 0.5 * h + 1.8),
                             layout="constrained")
    mask_heatmap(mask, row_labels, col_labels, ax=axes[0], title=titles[0])
    heatmap(before, row_labels, col_labels, ax=axes[1], title=titles[1], colorbar=False)
    heatmap(after, row_labels, col_labels, ax=axes[2], title=titles[2], colorbar=True)
    for ax in axes[1:]:
        ax.set_ylabel("")
    return fig
