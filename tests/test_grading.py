"""Fast unit tests of the grading pipeline's pieces (no kernel is started)."""

from __future__ import annotations

import nbformat
import pytest

from handson import grading
from handson.grading import integrity, report
from support import ROOT, assignments, release, solution_cells, submission


def test_static_scan_flags_reaching_into_the_test_machinery():
    found = integrity.scan_source(
        "import torch\ntorch.allclose = lambda *a, **k: True\nimport builtins\n"
        "setattr(torch, 'equal', None)\nopen('../../gradebook.db')\n")
    text = " ".join(found)
    for needle in ("assigns to torch.allclose", "imports builtins", "calls setattr()",
                   "file or system access via open()", "gradebook"):
        assert needle in text, found


def test_static_scan_tells_code_compilation_from_pattern_compilation():
    assert integrity.scan_source("import regex\npat = regex.compile(r'\\p{L}+')\n") == []
    assert integrity.scan_source("f = torch.compile(f, backend='eager')\n") == []
    assert integrity.scan_source("code = compile('1', '<s>', 'eval')\n") == ["line 1: calls compile()"]
    assert integrity.scan_source("import builtins\nbuiltins.compile('1', '<s>', 'eval')\n") == [
        "line 1: imports builtins", "line 2: calls compile()"]


@pytest.mark.parametrize("assignment", assignments())
def test_static_scan_is_quiet_on_the_solutions(assignment):
    found = integrity.scan_notebook(submission(assignment, solution_cells(assignment)))
    assert found == [], f"the solution of {assignment} looks suspicious: {found}"


def test_probe_fingerprints_are_stable_in_a_clean_interpreter():
    ref = integrity.reference_fingerprints()
    assert "torch:allclose" in ref and "handson.checks:check_close" in ref
    assert integrity.compare(ref, ref) == []
    altered = dict(ref, **{"torch:allclose": "code:foreign:<cell>"})
    assert integrity.compare(altered, ref) == ["torch.allclose"]


def test_repair_restores_deleted_and_stripped_cells():
    a = assignments()[0]
    rel = release(a)
    nb = submission(a, solution_cells(a))
    test_ids = [c.metadata["nbgrader"]["grade_id"] for c in nb.cells
                if c.metadata.get("nbgrader", {}).get("grade")]
    nb.cells = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") != test_ids[0]]
    for c in nb.cells:
        if c.metadata.get("nbgrader", {}).get("solution"):
            c.metadata.pop("nbgrader")
    fixed, notes = grading.repair_notebook(nb, rel)
    ids = [c.metadata.get("nbgrader", {}).get("grade_id") for c in fixed.cells]
    assert [i for i in ids if i] == [c.metadata["nbgrader"]["grade_id"] for c in rel.cells
                                     if "nbgrader" in c.metadata]
    assert any("was missing and was restored" in n for n in notes)
    assert any("restored by position" in n for n in notes)
    nbformat.validate(fixed)


def test_load_submission_refuses_what_it_cannot_grade(tmp_path):
    a = assignments()[0]
    rel = release(a)
    name = f"{a}.ipynb"
    assert grading.load_submission(tmp_path, name, rel)[0] is None  # nothing submitted
    (tmp_path / name).write_text("")
    assert "is empty" in grading.load_submission(tmp_path, name, rel)[1][-1]
    (tmp_path / name).write_text("{]")
    assert "not a valid notebook" in grading.load_submission(tmp_path, name, rel)[1][-1]
    nbformat.write(submission(a), str(tmp_path / name))
    nb, notes = grading.load_submission(tmp_path, name, rel)
    assert nb is not None and notes == []


def test_student_ids_are_validated():
    assert grading.STUDENT_ID.match("alice.smith@uni")
    for bad in ("../etc", ".hidden", "a b", "x" * 80, ""):
        assert not grading.STUDENT_ID.match(bad)


def test_report_folds_numbers_so_mistakes_group():
    a = report.fold("AssertionError: out differs from the reference by up to 0.387: hint")
    b = report.fold("AssertionError: out differs from the reference by up to 1.2e-3: hint")
    assert a == b and "up to N" in a
    assert report.fold("row (1, 3) sums to 0.25 (use dim=-1)") == "row (…) sums to N (use dim=-1)"
    assert report.fold("") == "(no message)"


def test_sandbox_probe_reports_a_level():
    import os
    import sys

    level = grading.probe_isolation(grading.Course(ROOT))
    assert level in ("namespace+user", "userns", "user", "none")
    if sys.platform.startswith("linux") and os.geteuid() == 0:
        # root on Linux (CI's case) must get the full isolation, not a silent fallback
        assert level == "namespace+user", level


def test_sandbox_copies_only_regular_data_files(tmp_path):
    """Notebooks, hidden files, links, FIFOs and sockets stay behind; opening a FIFO would block."""
    import os
    import socket
    import threading

    from handson.grading import sandbox

    (tmp_path / "data.txt").write_text("tokens")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "table.csv").write_text("a,b")
    (tmp_path / "answer.ipynb").write_text("{}")
    (tmp_path / ".hidden").write_text("x")
    (tmp_path / "link.txt").symlink_to(tmp_path / "data.txt")
    os.mkfifo(tmp_path / "pipe")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    found: list[dict] = []
    reader = threading.Thread(target=lambda: found.append(sandbox._collect_files(str(tmp_path))),
                              daemon=True)
    reader.start()
    reader.join(20)
    sock.close()
    assert not reader.is_alive(), "copying the data files blocked (it opened the FIFO)"
    assert found == [{"data.txt": b"tokens", os.path.join("sub", "table.csv"): b"a,b"}]
