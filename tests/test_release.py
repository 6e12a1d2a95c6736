"""The committed releases equal a fresh generate_assignment of solutions/ and leak nothing."""

from __future__ import annotations

import json
import re

import nbformat
import pytest

from handson import grading
from support import ROOT, assignments, make_course

FORBIDDEN = re.compile(r"BEGIN SOLUTION|END SOLUTION|BEGIN HIDDEN TESTS|END HIDDEN TESTS")


def _cells(path):
    nb = nbformat.read(str(path), 4)
    return [(c.cell_type, c.source, json.dumps(c.metadata, sort_keys=True)) for c in nb.cells]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    ids = assignments()
    course = make_course(tmp_path_factory.mktemp("release"), ids)
    for a in ids:  # drop the committed releases from the copy: regenerate them from scratch
        for p in (course / "exercises" / a).glob("*.ipynb"):
            p.unlink()
    ok = grading.generate_releases(grading.Course(course), ids)
    assert all(ok.values()), f"generate_assignment failed: {ok}"
    return course


@pytest.mark.parametrize("assignment", assignments())
def test_release_is_in_sync(fresh, assignment):
    committed = sorted((ROOT / "exercises" / assignment).glob("*.ipynb"))
    generated = sorted((fresh / "exercises" / assignment).glob("*.ipynb"))
    assert [p.name for p in committed] == [p.name for p in generated], \
        f"exercises/{assignment} is missing notebooks: run `make exercises` and commit the result"
    for c, g in zip(committed, generated):
        assert _cells(c) == _cells(g), \
            f"{c.relative_to(ROOT)} differs from a fresh release: run `make exercises` and commit it"


@pytest.mark.parametrize("assignment", assignments())
def test_release_has_no_solution_or_hidden_test(assignment):
    for p in (ROOT / "exercises" / assignment).glob("*.ipynb"):
        nb = nbformat.read(str(p), 4)
        for i, c in enumerate(nb.cells):
            assert not FORBIDDEN.search(c.source), f"{p.name} cell {i} leaks a solution or hidden test"
            if c.cell_type == "code":
                assert not c.outputs, f"{p.name} cell {i} has stored outputs"


@pytest.mark.parametrize("assignment", assignments())
def test_source_notebook_is_well_formed(assignment):
    """Unique grade ids, every test cell locked with points, every answer cell has a solution."""
    path = next((ROOT / "solutions" / assignment).glob("*.ipynb"))
    nb = nbformat.read(str(path), 4)
    ids = [c.metadata["nbgrader"]["grade_id"] for c in nb.cells if "nbgrader" in c.metadata]
    assert len(ids) == len(set(ids)), f"duplicate grade ids in {path.name}"
    tests = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade")]
    assert tests, "no test cell"
    for c in tests:
        meta = c.metadata["nbgrader"]
        assert meta.get("locked") and meta.get("points", 0) > 0, f"{meta['grade_id']}: lock it, give points"
    for c in nb.cells:
        if c.metadata.get("nbgrader", {}).get("solution"):
            assert "### BEGIN SOLUTION" in c.source, f"{c.metadata['nbgrader']['grade_id']}: no solution region"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


def test_every_assignment_is_in_the_book():
    toc = (ROOT / "_toc.yml").read_text()
    for a in assignments():
        assert f"file: book/{a}\n" in toc, f"{a}: chapter missing from _toc.yml"
        assert f"file: exercises/{a}/{a}\n" in toc, f"{a}: exercise missing from _toc.yml"
        assert (ROOT / "book" / f"{a}.ipynb").exists(), f"book/{a}.ipynb is missing"
