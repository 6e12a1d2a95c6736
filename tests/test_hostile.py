"""Hostile and broken submissions, each autograded next to a correct one (issue: trustworthy grading).

One temporary course, one grading run: structural damage, runaway code and cheating attempts must
each be stopped or repaired, scored for what they earned, reported, and must change nothing outside
their own output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import pytest

from handson import grading
from support import ROOT, cell_scores, make_course, solution_cells, submission, submit

pytestmark = pytest.mark.autograde
A = "self_attention"
SECRET = "BEGIN SOLUTION"


def _answers(before=None, **after):
    """The solution's answers, with code put before (a dict) or after (keywords) answer cells."""
    cells = solution_cells(A)
    for gid, code in (before or {}).items():
        cells[gid] = code + "\n" + cells[gid]
    for gid, code in after.items():
        cells[gid] = cells[gid] + "\n" + code
    return cells


def _buggy():
    cells = solution_cells(A)
    cells["sdpa"] = cells["sdpa"].replace("dim=-1)", "dim=-2)", 1)
    return cells


def _tree_digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for base in paths:
        for p in sorted(base.rglob("*")) if base.is_dir() else [base]:
            if p.is_file():
                h.update(str(p).encode() + p.read_bytes())
    return h.hexdigest()


def _hostile_notebooks(course: Path) -> dict[str, object]:
    """student id -> notebook (or raw bytes, or (name, notebook))."""
    sol = submission(A, solution_cells(A))
    subs: dict[str, object] = {"correct": sol}

    nb = submission(A, solution_cells(A))
    nb.cells = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") != "test_sdpa_reference"]
    subs["deleted-test-cell"] = nb

    nb = submission(A, _buggy())
    for c in nb.cells:
        if c.metadata.get("nbgrader", {}).get("grade"):
            c.source = "print('all good')"
    subs["edited-tests"] = nb

    nb = submission(A, solution_cells(A))
    for c in nb.cells:
        c.metadata.pop("nbgrader", None)
    subs["stripped-metadata"] = nb

    subs["renamed-notebook"] = ("my attempt.ipynb", submission(A, solution_cells(A)))
    subs["empty-file"] = b""
    subs["invalid-json"] = b'{"cells": [ this is not json'
    other = nbformat.v4.new_notebook()
    other.cells = [nbformat.v4.new_code_cell("print('an exercise from another course')")]
    other.cells[0].metadata["nbgrader"] = {"grade": True, "grade_id": "q1", "points": 5, "locked": True,
                                           "solution": False, "schema_version": 3}
    subs["other-assignment"] = other

    # runaway code placed before the module's class: the function part is right and earns its points
    subs["infinite-loop"] = submission(A, _answers({"self_attention": "while True:\n    pass"}))
    subs["sys-exit"] = submission(A, _answers({"self_attention": "import sys\nsys.exit(3)"}))
    subs["os-exit"] = submission(A, _answers({"self_attention": "import os\nos._exit(0)"}))
    subs["kernel-crash"] = submission(A, _answers({"self_attention": "import ctypes\nctypes.string_at(0)"}))
    subs["output-flood"] = submission(A, _answers(sdpa="for _ in range(300):\n    print('x' * 100_000)"))
    warns = solution_cells(A)  # a correct answer whose function warns each time it is called
    warns["sdpa"] = warns["sdpa"].replace('    """\n', '    """\n    import warnings\n'
                                          '    warnings.warn("a harmless warning", UserWarning)\n', 1)
    subs["harmless-warning"] = submission(A, warns)
    subs["memory-hog"] = submission(A, _answers(sdpa="hog = bytearray(64 * 2**30)"))

    buggy = _buggy()
    buggy["sdpa"] += "\nimport torch\ntorch.allclose = lambda *a, **k: True\n"
    subs["patch-allclose"] = submission(A, buggy)
    buggy = _buggy()
    buggy["sdpa"] += ("\nimport handson.checks as _c\nfor _n in _c.__all__:\n"
                      "    setattr(_c, _n, lambda *a, **k: (lambda *b, **c: None))\n")
    subs["patch-checks"] = submission(A, buggy)
    buggy = _buggy()
    buggy["sdpa"] += ("\nimport handson.checks as _c\nfor _n in _c.__all__:\n"
                      "    setattr(_c, _n, lambda *a, **k: 100.0)  # a number reads as partial credit\n")
    subs["patch-checks-partial-credit"] = submission(A, buggy)
    buggy = _buggy()
    buggy["sdpa"] += "\nimport torch.testing\ntorch.testing.assert_close = lambda *a, **k: None\n"
    subs["patch-assert-close"] = submission(A, buggy)
    buggy = _buggy()
    buggy["sdpa"] += ("\nimport builtins\n_real = builtins.isinstance\n"
                      "builtins.isinstance = lambda o, t: True if t is AssertionError else _real(o, t)\n")
    subs["patch-builtins"] = submission(A, buggy)
    buggy = _buggy()
    buggy["sdpa"] += ("\nimport handson.checks as _c\n"
                      "_c._call_learner = lambda fn, *a, **k: fn(*a, **k)  # a private helper\n")
    subs["patch-private-helper"] = submission(A, buggy)

    targets = {
        "solution": course / "solutions" / A / f"{A}.ipynb",
        "peer": course / "submitted" / "correct" / A / f"{A}.ipynb",
        "gradebook": course / "gradebook.db",
        "grades": course / "grades.csv",
    }
    spy = (
        "import os, glob\n"
        f"_targets = {json.dumps({k: str(v) for k, v in targets.items()})}\n"
        "_found = {}\n"
        "for _k, _p in list(_targets.items()) + [('relative', '../../../gradebook.db'), "
        "('home', os.path.expanduser('~/.bash_history'))]:\n"
        "    try:\n"
        "        with open(_p, 'rb') as _f:\n"
        "            _found[_k] = _f.read(100000)\n"
        "    except Exception as _e:\n"
        "        _found[_k] = type(_e).__name__\n"
        "print({k: (v if isinstance(v, str) else len(v)) for k, v in _found.items()})\n"
        "print(_found.get('solution', b''))\n"
    )
    subs["read-solution-and-peers"] = submission(A, _answers(sdpa=spy))
    vandal = (
        "import os, shutil\n"
        f"for _p in {json.dumps([str(v) for v in targets.values()])}:\n"
        "    for _op in (lambda p: open(p, 'w').write('gone'), os.remove):\n"
        "        try:\n"
        "            _op(_p)\n"
        "        except Exception as _e:\n"
        "            print(type(_e).__name__)\n"
        f"shutil.rmtree({str(course / 'submitted')!r}, ignore_errors=True)\n"
        f"shutil.rmtree({str(course / 'autograded')!r}, ignore_errors=True)\n"
    )
    subs["vandal"] = submission(A, _answers(sdpa=vandal))
    return subs


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    course = make_course(tmp_path_factory.mktemp("hostile"), [A])
    subs = _hostile_notebooks(course)
    for student, nb in subs.items():
        if isinstance(nb, tuple):
            submit(course, student, A, nb[1], name=nb[0])
        else:
            submit(course, student, A, nb)
    grading.ensure_gradebook(grading.Course(course), [A])
    guarded = _tree_digest(course / "solutions", course / "exercises")
    peer = _tree_digest(course / "submitted" / "correct")
    t0 = time.monotonic()
    results = grading.autograde(grading.Course(course), timeout=8, notebook_timeout=120)
    seconds = time.monotonic() - t0
    return course, {r.student: r for r in results}, guarded, peer, seconds


def _full(r):
    return r.status == "graded" and r.score == r.max_score and r.max_score > 0


def test_correct_submission_keeps_full_marks(hostile):
    _, res, *_ = hostile
    assert _full(res["correct"]), res["correct"].line()


def test_every_submission_has_a_gradebook_row(hostile):
    course, res, *_ = hostile
    con = sqlite3.connect(course / "gradebook.db")
    rows = {s for (s,) in con.execute(
        "select student.id from submitted_assignment join student on student.id = submitted_assignment.student_id")}
    assert con.execute("pragma integrity_check").fetchone()[0] == "ok"
    con.close()
    assert set(res) <= rows, f"no gradebook row for {sorted(set(res) - rows)}"
    csv = (course / "grades.csv").read_text()
    for student in res:
        assert f",{student}," in csv, f"{student} missing from grades.csv"


@pytest.mark.parametrize("student, note", [
    ("deleted-test-cell", "was missing and was restored"),
    ("stripped-metadata", "lost its grading metadata"),
    ("renamed-notebook", "graded as"),
])
def test_repairable_damage_is_repaired_and_graded(hostile, student, note):
    course, res, *_ = hostile
    r = res[student]
    assert _full(r), r.line()
    assert any(note in n for n in r.notes), r.line()
    if student == "deleted-test-cell":
        assert cell_scores(course, A, student)["test_sdpa_reference"] == (3.0, 3.0)


def test_edited_tests_are_restored(hostile):
    course, res, *_ = hostile
    r = res["edited-tests"]
    assert r.status == "graded" and r.score < r.max_score, r.line()
    nb = nbformat.read(str(course / "autograded" / "edited-tests" / A / f"{A}.ipynb"), 4)
    assert "print('all good')" not in "".join(c.source for c in nb.cells)


@pytest.mark.parametrize("student, reason", [
    ("empty-file", "is empty"),
    ("invalid-json", "not a valid notebook"),
    ("other-assignment", "does not belong to this assignment"),
])
def test_ungradable_files_score_zero_with_a_reason(hostile, student, reason):
    _, res, *_ = hostile
    r = res[student]
    assert r.status == "ungradable" and r.score == 0, r.line()
    assert any(reason in n for n in r.notes), r.line()


@pytest.mark.parametrize("student, note", [
    ("infinite-loop", None),
    ("sys-exit", None),
    ("os-exit", "kernel died"),
    ("kernel-crash", "kernel died"),
])
def test_runaway_code_keeps_what_it_earned(hostile, student, note):
    course, res, *_ = hostile
    r = res[student]
    scores = cell_scores(course, A, student)
    # the function part (before the runaway module cell) is right and keeps its points
    for gid in ("test_sdpa_shapes", "test_sdpa_reference", "test_sdpa_masking", "test_sdpa_hygiene"):
        assert scores[gid][0] == scores[gid][1], f"{student}: {gid} lost points: {r.line()}"
    assert 0 < r.score < r.max_score, r.line()
    if note:
        assert any(note in n for n in r.notes), r.line()


def test_output_flood_is_bounded(hostile):
    course, res, *_ = hostile
    assert _full(res["output-flood"]), res["output-flood"].line()
    size = (course / "autograded" / "output-flood" / A / f"{A}.ipynb").stat().st_size
    assert size < 2_000_000, f"the autograded notebook keeps {size} bytes of output"


def test_a_harmless_warning_costs_nothing(hostile):
    course, res, *_ = hostile
    assert _full(res["harmless-warning"]), res["harmless-warning"].line()


def test_memory_hog_is_stopped(hostile):
    course, res, *_ = hostile
    r = res["memory-hog"]
    assert _full(r), r.line()
    nb = nbformat.read(str(course / "autograded" / "memory-hog" / A / f"{A}.ipynb"), 4)
    assert "MemoryError" in json.dumps([c.get("outputs") for c in nb.cells])


@pytest.mark.parametrize("student", ["patch-allclose", "patch-checks", "patch-checks-partial-credit",
                                     "patch-assert-close",
                                     "patch-builtins", "patch-private-helper"])
def test_tampering_earns_nothing_and_is_reported(hostile, student):
    course, res, *_ = hostile
    r = res[student]
    assert r.score < r.max_score, r.line()
    honest = cell_scores(course, A, "edited-tests")  # the same bug, no tampering, restored tests
    mine = cell_scores(course, A, student)
    for gid, (score, _) in mine.items():
        assert score <= honest[gid][0], f"{student} earned {score} in {gid}, more than the honest bug"
    assert any("tampering detected" in n for n in r.notes), r.line()


def test_files_outside_the_submission_are_out_of_reach(hostile):
    course, res, guarded, peer, _ = hostile
    assert _tree_digest(course / "solutions", course / "exercises") == guarded
    assert _tree_digest(course / "submitted" / "correct") == peer
    nb = nbformat.read(str(course / "autograded" / "read-solution-and-peers" / A / f"{A}.ipynb"), 4)
    text = json.dumps([c.get("outputs") for c in nb.cells])
    assert SECRET not in text and "scaled_dot_product_attention(q, k, v" not in text
    assert "'solution': 'FileNotFoundError'" in text or "'solution': 'PermissionError'" in text, text[:2000]
    assert _full(res["correct"]) and (course / "grades.csv").exists()
    assert (course / "autograded" / "correct" / A / f"{A}.ipynb").exists()


def test_regrading_keeps_rows_and_grades_only_what_changed(hostile):
    course, res, *_ = hostile
    submit(course, "late-student", A, submission(A, solution_cells(A)))
    again = {r.student: r for r in grading.autograde(grading.Course(course), timeout=8, notebook_timeout=120)}
    assert again["late-student"].status == "graded" and _full(again["late-student"])
    regraded = [s for s, r in again.items() if r.status == "graded" and s != "late-student"]
    # only submissions that were not graded cleanly may be retried
    assert "correct" not in regraded and again["correct"].status == "skipped"
    assert again["correct"].score == res["correct"].score


def _processes_with(marker: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if marker.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the watchdog's kill reads /proc")
def test_a_grading_that_outlives_every_limit_is_killed(tmp_path):
    """A submission whose kernel ignores interrupts and never returns, while the cell timeout is
    generous: the hard limit kills its worker, its kernel and what the kernel started."""
    course = make_course(tmp_path / "course", [A])
    marker = f"handson-hang-{os.getpid()}-{time.monotonic_ns()}"
    hang = ("import signal, subprocess, sys, time\n"
            f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', {marker!r}])\n"
            "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
            "time.sleep(600)")
    submit(course, "hangs", A, submission(A, _answers({"self_attention": hang})))
    grading.ensure_gradebook(grading.Course(course), [A])
    t0 = time.monotonic()
    hung = grading.autograde(grading.Course(course), timeout=300, notebook_timeout=600,
                             hard_timeout=20)
    assert time.monotonic() - t0 < 120, "the hard limit did not stop the grading"
    assert [(r.status, r.notes) for r in hung] == [("error", [grading.TIMED_OUT])], \
        [r.line() for r in hung]
    time.sleep(1.0)
    assert not _processes_with(marker), "a process the submission started outlived its grading"
    con = sqlite3.connect(course / "gradebook.db")
    assert con.execute("pragma integrity_check").fetchone()[0] == "ok"
    con.close()


def test_interrupted_run_leaves_a_sound_gradebook(tmp_path):
    course = make_course(tmp_path / "course", [A])
    for i in range(3):
        submit(course, f"s{i}", A, submission(A, solution_cells(A)))
    proc = subprocess.Popen([sys.executable, "-m", "handson.grading", "--root", str(course), "autograde",
                             "--jobs", "1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True).start()
    deadline = time.monotonic() + 120
    with contextlib.suppress(queue.Empty):
        while not lines.get(timeout=max(0.1, deadline - time.monotonic())).startswith("s0/"):
            pass
    time.sleep(1.0)  # let the next submission get under way
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    con = sqlite3.connect(course / "gradebook.db")
    assert con.execute("pragma integrity_check").fetchone()[0] == "ok"
    con.close()
    results = {r.student: r for r in grading.autograde(grading.Course(course), timeout=20)}
    lines = [r.line() for r in results.values()]
    assert all(results[f"s{i}"].score == results[f"s{i}"].max_score > 0 for i in range(3)), lines
    assert results["s0"].status == "skipped", lines  # graded before the interruption, kept


def test_feedback_shows_diagnoses_but_no_hidden_tests(hostile):
    course, res, *_ = hostile
    written = grading.feedback(grading.Course(course), students=["edited-tests", "patch-allclose"])
    assert written
    html = {p.parent.parent.name: p.read_text() for p in written}
    src = nbformat.read(str(ROOT / "solutions" / A / f"{A}.ipynb"), 4)
    hidden_lines = []
    for c in src.cells:
        if "### BEGIN HIDDEN TESTS" in c.source:
            part = c.source.split("### BEGIN HIDDEN TESTS")[1].split("### END HIDDEN TESTS")[0]
            hidden_lines += [ln.strip() for ln in part.splitlines() if len(ln.strip()) > 25]
    for student, page in html.items():
        assert "BEGIN HIDDEN TESTS" not in page
        leaked = [ln for ln in hidden_lines if ln in page]
        assert not leaked, f"{student}: hidden test code in the feedback: {leaked[:2]}"
    assert "rows of weights must sum to 1" in html["edited-tests"]
    assert "test machinery was altered" in html["patch-allclose"]


def test_class_report_names_what_the_class_got_wrong(hostile):
    from handson.grading import report

    course, res, *_ = hostile
    paths = report.write(grading.Course(course))
    md = (course / "reports" / "report.md").read_text()
    assert (course / "reports" / f"{A}.png").stat().st_size > 5000
    assert "| test_sdpa_shapes |" in md
    assert "rows of weights must sum to 1 but row (…) sums to N" in md  # softmax over queries, folded
    assert any(p.suffix == ".html" for p in paths)
