"""pytest settings that apply to the chapters (nbval collects book/*.ipynb) as well as to tests/."""

from __future__ import annotations

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """After a chapter cell timed out, skip the notebook's other cells instead of running them.

    nbval still runs them, marked xfail, on a kernel that may be stuck: each would wait out the
    whole cell timeout in turn. The cell that timed out has already failed the run.
    """
    if getattr(getattr(item, "parent", None), "timed_out", False):
        pytest.skip("an earlier cell of this notebook timed out; its kernel is not trusted")
