"""The autograder end to end, per assignment, in a temporary course, on a sample of the catalog.

nbgrader grades the solution, the blank release and a few bugs of each assignment (the first bug
of the catalog that each test cell is meant to catch, up to E2E_BUGS). The solution must get full
marks, the blank release zero, each bug must lose points where the catalog says -- and every score,
cell for cell, must equal the in-process grading that proves the whole catalog (tests/test_catalog.py),
so that the fast path is a faithful stand-in for the real one.
"""

from __future__ import annotations

import pytest

from handson import grading
from support import (assignments, blank_cells, cell_scores, grade_in_process, load_catalog,
                     make_course, solution_cells, submission, submit)

pytestmark = pytest.mark.autograde

E2E_BUGS = 3


def sample(catalog):
    """A few bugs that between them exercise different test cells."""
    chosen, cells = [], set()
    for b in catalog:
        if len(chosen) == E2E_BUGS:
            break
        if not set(b.expect) <= cells:
            chosen.append(b)
            cells |= set(b.expect)
    return chosen


@pytest.fixture(scope="module", params=assignments())
def graded(request, tmp_path_factory):
    """Grade solution, blank and the sampled bugs of one assignment, through nbgrader and in-process."""
    a = request.param
    tmp = tmp_path_factory.mktemp(a)
    course = make_course(tmp / "course", [a])
    bugs = sample(load_catalog(a))
    answers = {"solution": solution_cells(a), "blank": blank_cells(a)}
    answers.update({f"bug-{b.name.replace('_', '-')}": b.answers(a) for b in bugs})
    for student, cells in answers.items():
        submit(course, student, a, submission(a, cells) if student != "blank" else submission(a))
    results = grading.autograde(grading.Course(course), timeout=30, notebook_timeout=240)
    in_process = grade_in_process(a, answers, tmp)
    return a, course, bugs, {r.student: r for r in results}, in_process


def test_solution_gets_full_marks(graded):
    a, course, _, res, _ = graded
    r = res["solution"]
    assert r.status == "graded", r.line()
    lost = {g: s for g, s in cell_scores(course, a, "solution").items() if s[0] < s[1]}
    assert r.score == r.max_score and r.max_score > 0, f"{r.line()}; cells losing points: {lost}"


def test_blank_release_gets_zero(graded):
    a, _, _, res, _ = graded
    r = res["blank"]
    assert r.status == "graded" and r.score == 0, r.line()


def test_sampled_bugs_lose_points_where_expected(graded):
    a, course, bugs, res, _ = graded
    assert bugs, f"{a}: no bug sampled"
    for b in bugs:
        r = res[f"bug-{b.name.replace('_', '-')}"]
        assert r.status == "graded", r.line()
        assert r.score < r.max_score, f"{a}: {b.name} kept full marks under nbgrader"
        scores = cell_scores(course, a, r.student)
        missed = [c for c in b.expect if scores[c][0] >= scores[c][1]]
        assert not missed, f"{a}: {b.name} not caught by {missed} under nbgrader"


def test_nbgrader_and_in_process_grading_agree(graded):
    a, course, _, res, in_process = graded
    for student, cells in in_process.items():
        nbg = cell_scores(course, a, student)
        fast = {g: (c["score"], c["max"]) for g, c in cells.items()}
        assert nbg == fast, f"{a}/{student}: nbgrader {nbg} != in-process {fast}"
