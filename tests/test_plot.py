"""handson.plot draws what it is given, labelled, and refuses inconsistent labels."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from handson import plot  # noqa: E402


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def test_heatmap_labels_and_values():
    w = torch.softmax(torch.randn(3, 4, dtype=torch.float64, requires_grad=True), -1)
    ax = plot.heatmap(w, ["a", "b", "c"], ["w", "x", "y", "z"], title="t")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["w", "x", "y", "z"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
    assert np.allclose(ax.images[0].get_array(), w.detach().numpy())
    assert ax.get_title() == "t" and ax.get_xlabel() == "key" and ax.get_ylabel() == "query"
    assert len(ax.texts) == 12  # annotated: small matrix


def test_heatmap_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        plot.heatmap(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="column labels"):
        plot.heatmap(torch.zeros(2, 3), col_labels=["a"])


def test_mask_heatmap_shows_convention():
    mask = torch.ones(3, 3, dtype=torch.bool).tril()
    ax = plot.mask_heatmap(mask)
    assert "True = may attend" in ax.get_title()
    assert np.array_equal(ax.images[0].get_array(), mask.numpy().astype(float))
    hatched = [p for p in ax.patches if p.get_hatch()]
    assert len(hatched) == 3  # one hatched patch per blocked cell


def test_heatmap_hatches_masked_cells_without_numbers():
    w = torch.softmax(torch.randn(3, 3, dtype=torch.float64), -1)
    mask = torch.ones(3, 3, dtype=torch.bool).tril()
    ax = plot.heatmap(w, mask=mask)
    assert len([p for p in ax.patches if p.get_hatch()]) == 3
    assert len(ax.texts) == 6  # numbers only in the allowed cells
    with pytest.raises(ValueError, match="boolean"):
        plot.heatmap(w, mask=mask.double())


def test_grid_and_mask_effect():
    w = torch.softmax(torch.randn(5, 3, 3), -1)
    fig = plot.heatmap_grid(w, titles=[f"head {i}" for i in range(5)], ncols=3)
    axes = [a for a in fig.axes if a.images]
    assert len(axes) == 5 and [a.get_title() for a in axes][:2] == ["head 0", "head 1"]
    with pytest.raises(ValueError, match="titles"):
        plot.heatmap_grid(w, titles=["x"])
    fig = plot.mask_effect(torch.ones(3, 3, dtype=torch.bool), w[0], w[1], list("abc"), list("abc"))
    assert len([a for a in fig.axes if a.images]) == 3
    fig = plot.heatmap_grid(w, mask=torch.ones(3, 3, dtype=torch.bool).tril(), annotate=True)
    assert sum(len([p for p in a.patches if p.get_hatch()]) for a in fig.axes) == 5 * 3


def test_to_numpy_converts_bool_and_grad_tensors():
    assert plot.to_numpy(torch.ones(2, 2, dtype=torch.bool)).dtype == float
    t = torch.ones(2, 2, requires_grad=True) * 2
    assert plot.to_numpy(t).tolist() == [[2.0, 2.0], [2.0, 2.0]]
