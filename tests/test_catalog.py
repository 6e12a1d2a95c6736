"""Every grader proven on its whole catalog, in one process per assignment (tests/inprocess.py).

For each assignment: the solution gets full marks and the blank release zero; every cataloged bug
loses points, in the test cells meant to catch it, and -- where the catalog pins a diagnosis -- the
first failing test names the real cause; every control (a correct answer in another style) keeps
full marks; and the chapter's own code pasted as the answer (and the previous exercise's solution,
minimally adapted) scores at most a third: an exercise is a step beyond its chapter. tests/test_autograde.py runs a sample of the same submissions through nbgrader end to
end and checks that both paths give the same scores, cell for cell.
"""

from __future__ import annotations

import pytest

from support import (assignments, blank_cells, grade_in_process_many, load_catalog, load_controls,
                     solution_cells, transcriptions)

MIN_CONTROLS = 3


def _name(kind: str, name: str) -> str:
    return f"{kind}-{name.replace('_', '-')}"


def _submissions(a: str) -> dict[str, dict[str, str]]:
    subs = {"solution": solution_cells(a), "blank": blank_cells(a)}
    bugs = load_catalog(a)
    subs.update({_name("bug", b.name): b.answers(a) for b in bugs})
    # a bug is graded until its first failure and the cells meant to catch it have run
    subs["__stop_after__"] = {_name("bug", b.name): list(b.expect) for b in bugs}
    subs.update({_name("control", c.name): c.answers(a) for c in load_controls(a)})
    for kind, answers in transcriptions(a).items():
        if answers:
            subs[f"transcription-{kind}"] = {**blank_cells(a), **answers}
    return subs


@pytest.fixture(scope="session")
def graded_catalogs(request, tmp_path_factory):
    """Every selected assignment's catalog, graded in parallel: one process per assignment."""
    wanted = {item.callspec.params["proven"] for item in request.session.items
              if hasattr(item, "callspec") and "proven" in item.callspec.params}
    work = {a: _submissions(a) for a in sorted(wanted)}
    return grade_in_process_many(work, tmp_path_factory.mktemp("catalogs"))


@pytest.fixture(scope="module", params=assignments())
def proven(request, graded_catalogs):
    a = request.param
    return a, load_catalog(a), load_controls(a), graded_catalogs[a]


def _total(cells: dict) -> tuple[float, float]:
    return sum(c["score"] for c in cells.values()), sum(c["max"] for c in cells.values())


def _first_failure(cells: dict) -> str:
    return next((f"{g}: {c['error']}" for g, c in cells.items() if c["error"]), "")


def test_catalog_is_large_enough(proven):
    a, bugs, controls, _ = proven
    assert len(bugs) >= 10, f"{a}: the catalog has {len(bugs)} bugs; at least 10 are required"
    assert len(controls) >= MIN_CONTROLS, \
        f"{a}: the catalog has {len(controls)} controls; at least {MIN_CONTROLS} are required"
    names = [b.name for b in bugs + controls]
    assert len(set(names)) == len(names), f"{a}: duplicate names in the catalog"
    unpinned = [b.name for b in bugs if not b.diagnosis]
    assert not unpinned, f"{a}: bugs without the diagnosis their first failure must give: {unpinned}"


def test_exercise_is_a_step_beyond_the_chapter(proven):
    a, _, _, res = proven
    assert "transcription-chapter" in res, f"{a}: the catalog has no CHAPTER_AS_ANSWER"
    for name in ("transcription-chapter", "transcription-previous"):
        if name in res:
            got, full = _total(res[name])
            assert got <= full / 3, (f"{a}: {name.split('-')[1]} code pasted as the answer scores "
                                     f"{got}/{full}, more than a third")


def test_solution_full_blank_zero(proven):
    a, _, _, res = proven
    got, full = _total(res["solution"])
    assert got == full > 0, f"{a}: the solution scores {got}/{full}: {_first_failure(res['solution'])}"
    assert _total(res["blank"])[0] == 0, f"{a}: the blank release scores points"


def test_every_bug_loses_points_where_expected(proven):
    a, bugs, _, res = proven
    problems = []
    for b in bugs:
        cells = res[_name("bug", b.name)]
        got, full = _total(cells)
        if got >= full:
            problems.append(f"{b.name} kept full marks ({b.why})")
            continue
        problems += [f"{b.name}: {g} did not catch it" for g in b.expect
                     if cells[g]["score"] >= cells[g]["max"]]
    assert not problems, f"{a}: " + "; ".join(problems)


def test_diagnoses_name_the_real_cause(proven):
    a, bugs, _, res = proven
    wrong = []
    for b in bugs:
        if not b.diagnosis:
            continue
        first = _first_failure(res[_name("bug", b.name)])
        if b.diagnosis.lower() not in first.lower():
            wrong.append(f"{b.name}: expected {b.diagnosis!r} in the first failure, got {first!r}")
    assert not wrong, f"{a}: " + "; ".join(wrong)


def test_controls_keep_full_marks(proven):
    a, _, controls, res = proven
    rejected = []
    for c in controls:
        cells = res[_name("control", c.name)]
        got, full = _total(cells)
        if got < full:
            rejected.append(f"{c.name} ({c.why}) scored {got}/{full}: {_first_failure(cells)}")
    assert not rejected, f"{a}: correct answers rejected: " + "; ".join(rejected)


def test_a_bug_is_graded_until_its_first_failure_and_its_expected_cells():
    """The in-process grader's early stop for bugs (tests/inprocess.py): never before the first
    failure, never before every cell the catalog names, and not after both."""
    from inprocess import grade

    def test(gid, ok):
        return {"grade_id": gid, "source": "pass" if ok else "raise ValueError('wrong')",
                "answer": False, "points": 1.0}

    cells = [test("t1", True), test("t2", False), test("t3", True), test("t4", False), test("t5", True)]
    assert list(grade(cells, {}, stop_after=["t1"])) == ["t1", "t2"]          # stops at the first failure
    assert list(grade(cells, {}, stop_after=["t4"])) == ["t1", "t2", "t3", "t4"]  # runs the named cell
    assert list(grade(cells, {}, stop_after=[])) == ["t1", "t2"]
    assert list(grade(cells, {})) == ["t1", "t2", "t3", "t4", "t5"]          # solutions, controls: all
    clean = [test("t1", True), test("t2", True)]
    assert list(grade(clean, {}, stop_after=["t1"])) == ["t1", "t2"]          # no failure: every cell
    assert grade(cells, {}, stop_after=["t1"])["t2"]["error"] == "ValueError: wrong"
