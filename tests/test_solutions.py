"""Every solution notebook (the nbgrader source) runs top to bottom with all its tests passing."""

from __future__ import annotations

import nbformat
import pytest
from nbclient import NotebookClient

from support import ROOT, assignments


@pytest.mark.parametrize("assignment", assignments())
def test_solution_notebook_runs_clean(assignment, tmp_path):
    path = next((ROOT / "solutions" / assignment).glob("*.ipynb"))
    nb = nbformat.read(str(path), 4)
    client = NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = []
    for c in nb.cells:
        for out in c.get("outputs", []):
            if out.get("output_type") == "error":
                gid = c.metadata.get("nbgrader", {}).get("grade_id", "?")
                errors.append(f"{gid}: {out.get('ename')}: {out.get('evalue')}")
    assert not errors, "the solution fails its own tests: " + "; ".join(errors)
