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

__all__ = ["setup", "to_numpy", "heatmap", "mask_heatmap", "heatmap_grid", "mask_effect",
           "BLOCKED", "ALLOWED"]

#: One meaning per colour in every figure of the book. Weights use ``viridis`` (0 dark, 1 yellow);
#: a pair that a mask blocks is drawn in BLOCKED grey with a hatch, in mask panels and weight
#: panels alike, so an exactly-zero masked weight never looks like a small weight. Allowed pairs of
#: a mask panel are ALLOWED (white): "any weight may go here".
BLOCKED = "#c8c8c8"
ALLOWED = "#ffffff"
_HATCH = "////"
_HATCH_COLOR = "#8c8c8c"
MASK_CMAP = ListedColormap([BLOCKED, ALLOWED])

#: Sizes chosen to stay legible when the book shows a figure at its column width.
STYLE = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "figure.titlesize": 12,
}


def setup(formats: Sequence[str] = ("retina",)) -> None:
    """Style of the book's figures: legible fonts and sharp (2x) PNGs in notebooks.

    Call once at the top of a notebook. Outside IPython only the matplotlib style is set.
    """
    plt.rcParams.update(STYLE)
    try:
        from IPython import get_ipython
        from matplotlib_inline.backend_inline import set_matplotlib_formats
    except ImportError:  # pragma: no cover - plain Python
        return
    if get_ipython() is not None:
        set_matplotlib_formats(*formats)


def _broadcast_mask(mask: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    if mask is None:
        return None
    m = mask.detach().cpu().numpy() if hasattr(mask, "detach") else np.asarray(mask)
    if m.dtype != bool:
        raise ValueError(f"mask must be boolean (True = may attend), got {m.dtype}")
    return np.broadcast_to(m, shape)


def _hatch_blocked(ax: Axes, allowed: np.ndarray) -> None:
    """Grey, hatched cells where ``allowed`` is False (the book's "blocked" style)."""
    from matplotlib.patches import Rectangle

    for i, j in zip(*np.nonzero(~allowed)):
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=BLOCKED, edgecolor=_HATCH_COLOR,
                               hatch=_HATCH, linewidth=0))


def _text_color(val: float, lo: float, hi: float) -> str:
    """Black on the light half of viridis, white on the dark half."""
    return "black" if val > (lo + hi) / 2 else "white"


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
    mask: Any = None,
) -> Axes:
    """Draw a (queries x keys) matrix of attention weights.

    ``annotate`` writes each value in its cell (default: only for matrices up to 12 x 12).
    Set ``vmin``/``vmax`` to None to scale colours to the data (e.g. raw scores).
    ``mask`` (bool, True = may attend, broadcastable to the matrix) draws the blocked cells in the
    book's hatched grey, without a number, so that they cannot be mistaken for small weights.
    """
    data = to_numpy(weights)
    allowed = _broadcast_mask(mask, data.shape)
    if ax is None:
        _, ax = plt.subplots(figsize=(0.6 * data.shape[1] + 2.4, 0.55 * data.shape[0] + 1.7),
                             layout="constrained")
    im = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, aspect="equal")
    _labels(ax, row_labels, col_labels, xlabel, ylabel, *data.shape)
    if allowed is not None:
        _hatch_blocked(ax, allowed)
    if annotate is None:
        annotate = max(data.shape) <= 12
    if annotate:
        lo = np.nanmin(data) if vmin is None else vmin
        hi = np.nanmax(data) if vmax is None else vmax
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                if allowed is not None and not allowed[i, j]:
                    continue
                val = data[i, j]
                ax.text(j, i, f"{val:.2f}", ha="center", va="center", fontsize=8,
                        color=_text_color(val, lo, hi))
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
    """Draw a boolean mask: white cells may attend (True), hatched grey cells are blocked (False)."""
    data = to_numpy(mask)
    allowed = data.astype(bool)
    if ax is None:
        _, ax = plt.subplots(figsize=(0.6 * data.shape[1] + 1.7, 0.55 * data.shape[0] + 1.7),
                             layout="constrained")
    ax.imshow(data, cmap=MASK_CMAP, vmin=0, vmax=1, aspect="equal")
    _hatch_blocked(ax, allowed)
    ax.set_xticks(np.arange(-0.5, data.shape[1], 1), minor=True)
    ax.set_yticks(np.arange(-0.5, data.shape[0], 1), minor=True)
    ax.grid(which="minor", color="#b0b0b0", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
    _labels(ax, row_labels, col_labels, xlabel, ylabel, *data.shape)
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
    mask: Any = None,
    cell: float = 0.45,
) -> Figure:
    """Draw a grid of heatmaps, one per leading index (e.g. per head), sharing one colour scale.

    ``matrices`` is a tensor/array of shape (n, L, S) or a sequence of 2-D matrices. ``mask``
    (bool, True = may attend, broadcastable to (L, S)) hatches the blocked cells of every panel.
    ``cell`` is the size of one matrix cell in inches.
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
                             figsize=(ncols * (cell * w + 0.3) + 1.7, nrows * (cell * h + 0.6) + 0.7),
                             layout="constrained")
    im = None
    for idx, ax in enumerate(axes.flat):
        if idx >= n:
            ax.axis("off")
            continue
        im = ax.imshow(mats[idx], cmap=cmap, vmin=vmin, vmax=vmax, aspect="equal")
        allowed = _broadcast_mask(mask, mats[idx].shape)
        if allowed is not None:
            _hatch_blocked(ax, allowed)
        first_col, last_row = idx % ncols == 0, idx // ncols == nrows - 1 or idx + ncols >= n
        _labels(ax, row_labels if first_col else None, col_labels if last_row else None,
                "key" if last_row else "", "query" if first_col else "", *mats[idx].shape)
        if not first_col:
            ax.set_yticklabels([])
        if not last_row:
            ax.set_xticklabels([])
        if annotate:
            lo = np.nanmin(mats[idx]) if vmin is None else vmin
            hi = np.nanmax(mats[idx]) if vmax is None else vmax
            for i in range(mats[idx].shape[0]):
                for j in range(mats[idx].shape[1]):
                    if allowed is not None and not allowed[i, j]:
                        continue
                    ax.text(j, i, f"{mats[idx][i, j]:.2f}", ha="center", va="center", fontsize=8,
                            color=_text_color(mats[idx][i, j], lo, hi))
        if titles is not None:
            ax.set_title(titles[idx])
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
    """Three panels side by side: a boolean mask, the weights before and after applying it.

    The blocked cells are hatched grey in the mask and in the "after" panel: one meaning per colour.
    """
    m = to_numpy(mask)
    h, w = m.shape
    cell = 0.34  # inches per matrix cell: three panels fit the book's column
    fig, axes = plt.subplots(1, 3, figsize=(3 * (cell * w + 0.3) + 1.9, cell * h + 1.6),
                             layout="constrained")
    mask_heatmap(mask, row_labels, col_labels, ax=axes[0], title=titles[0])
    heatmap(before, row_labels, col_labels, ax=axes[1], title=titles[1], colorbar=False)
    heatmap(after, row_labels, col_labels, ax=axes[2], title=titles[2], colorbar=True, mask=mask)
    for ax in axes[1:]:
        ax.set_ylabel("")
        ax.set_yticklabels([])
    return fig
