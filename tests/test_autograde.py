"""The autograder end to end, in one temporary course, on a sample of every catalog.

nbgrader grades, for each assignment, the solution; for every other assignment, a few bugs (the
first bug of the catalog that each test cell is meant to catch, up to E2E_BUGS); and the blank
release of every fourth assignment, all in one course and one autograde run. The solution must get full marks, the blank release zero, each bug must lose points
where the catalog says -- and every score, cell for cell, must equal the in-process grading that
proves the whole catalog (tests/test_catalog.py), so that the fast path is a faithful stand-in.
"""

from __future__ import annotations

import pytest

from handson import grading
from support import (assignments, blank_cells, cell_scores, grade_in_process_many, load_catalog,
                     make_course, solution_cells, submission, submit)

pytestmark = pytest.mark.autograde

E2E_BUGS = 1
#: Assignments whose sampled bugs go through nbgrader too (every other one; every bug of every
#: catalog is graded in-process, tests/test_catalog.py).
BUG_SAMPLE = assignments()[1::2]
#: The blank release goes through nbgrader for every fourth assignment (each part has one); every
#: blank release scores zero in-process (tests/test_catalog.py).
BLANK_SAMPLE = assignments()[::4]


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


def _student(b) -> str:
    return f"bug-{b.name.replace('_', '-')}"


@pytest.fixture(scope="session")
def graded(request, tmp_path_factory):
    """Grade every selected assignment's sample through nbgrader (one run) and in-process."""
    wanted = sorted({item.callspec.params["assignment"] for item in request.session.items
                     if hasattr(item, "callspec") and "assignment" in item.callspec.params
                     and item.module.__name__.endswith("test_autograde")})
    tmp = tmp_path_factory.mktemp("e2e")
    course = make_course(tmp / "course", wanted)
    work, bugs = {}, {}
    for a in wanted:
        bugs[a] = sample(load_catalog(a)) if a in BUG_SAMPLE else []
        answers = {"solution": solution_cells(a)}
        if a in BLANK_SAMPLE:
            answers["blank"] = blank_cells(a)
        answers.update({_student(b): b.answers(a) for b in bugs[a]})
        for student, cells in answers.items():
            submit(course, student, a, submission(a) if student == "blank" else submission(a, cells))
        work[a] = answers
    results = grading.autograde(grading.Course(course), timeout=30, notebook_timeout=240)
    by_key = {(r.student, r.assignment): r for r in results}
    return course, bugs, by_key, grade_in_process_many(work, tmp)


@pytest.mark.parametrize("assignment", assignments())
def test_solution_gets_full_marks(graded, assignment):
    course, _, res, _ = graded
    r = res[("solution", assignment)]
    assert r.status == "graded", r.line()
    lost = {g: s for g, s in cell_scores(course, assignment, "solution").items() if s[0] < s[1]}
    assert r.score == r.max_score and r.max_score > 0, f"{r.line()}; cells losing points: {lost}"


@pytest.mark.parametrize("assignment", BLANK_SAMPLE)
def test_blank_release_gets_zero(graded, assignment):
    _, _, res, _ = graded
    r = res[("blank", assignment)]
    assert r.status == "graded" and r.score == 0, r.line()


@pytest.mark.parametrize("assignment", BUG_SAMPLE)
def test_sampled_bugs_lose_points_where_expected(graded, assignment):
    course, bugs, res, _ = graded
    assert bugs[assignment], f"{assignment}: no bug sampled"
    for b in bugs[assignment]:
        r = res[(_student(b), assignment)]
        assert r.status == "graded", r.line()
        assert r.score < r.max_score, f"{assignment}: {b.name} kept full marks under nbgrader"
        scores = cell_scores(course, assignment, r.student)
        missed = [c for c in b.expect if scores[c][0] >= scores[c][1]]
        assert not missed, f"{assignment}: {b.name} not caught by {missed} under nbgrader"


@pytest.mark.parametrize("assignment", assignments())
def test_nbgrader_and_in_process_grading_agree(graded, assignment):
    course, _, _, in_process = graded
    for student, cells in in_process[assignment].items():
        nbg = cell_scores(course, assignment, student)
        fast = {g: (c["score"], c["max"]) for g, c in cells.items()}
        assert nbg == fast, f"{assignment}/{student}: nbgrader {nbg} != in-process {fast}"
