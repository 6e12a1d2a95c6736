"""The autograder end to end, per assignment, in a temporary course.

The solution must get full marks, the blank release zero, and every plausible bug in the
assignment's catalog (tests/catalog/<assignment>.py) must lose points -- in the test cells the
catalog says are meant to catch it.
"""

from __future__ import annotations

import pytest

from handson import grading
from support import assignments, cell_scores, load_catalog, make_course, solution_cells, submission, submit

pytestmark = pytest.mark.autograde


@pytest.fixture(scope="module", params=assignments())
def graded(request, tmp_path_factory):
    """Grade solution, blank and every cataloged bug of one assignment in one run."""
    a = request.param
    course = make_course(tmp_path_factory.mktemp(a), [a])
    catalog = load_catalog(a)
    submit(course, "solution", a, submission(a, solution_cells(a)))
    submit(course, "blank", a, submission(a))
    for b in catalog:
        submit(course, f"bug-{b.name.replace('_', '-')}", a, submission(a, b.answers(a)))
    results = grading.autograde(grading.Course(course), timeout=30, notebook_timeout=240)
    by_student = {r.student: r for r in results}
    return a, course, catalog, by_student


def test_catalog_is_large_enough(graded):
    a, _, catalog, _ = graded
    assert len(catalog) >= 10, f"{a}: the catalog has {len(catalog)} bugs; at least 10 are required"
    assert len({b.name for b in catalog}) == len(catalog), f"{a}: duplicate bug names"


def test_solution_gets_full_marks(graded):
    a, course, _, res = graded
    r = res["solution"]
    assert r.status == "graded", r.line()
    lost = {g: s for g, s in cell_scores(course, a, "solution").items() if s[0] < s[1]}
    assert r.score == r.max_score and r.max_score > 0, f"{r.line()}; cells losing points: {lost}"


def test_blank_release_gets_zero(graded):
    a, _, _, res = graded
    r = res["blank"]
    assert r.status == "graded" and r.score == 0, r.line()


def test_every_cataloged_bug_loses_points(graded):
    a, course, catalog, res = graded
    missed, wrong_cells = [], []
    for b in catalog:
        r = res[f"bug-{b.name.replace('_', '-')}"]
        assert r.status == "graded", r.line()
        if r.score >= r.max_score:
            missed.append(f"{b.name} ({b.why})")
            continue
        scores = cell_scores(course, a, r.student)
        for cell in b.expect:
            got, full = scores[cell]
            if got >= full:
                wrong_cells.append(f"{b.name}: {cell} did not catch it")
    assert not missed, f"{a}: bugs that kept full marks: {missed}"
    assert not wrong_cells, f"{a}: " + "; ".join(wrong_cells)
