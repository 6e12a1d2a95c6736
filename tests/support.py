"""Shared helpers of the test suite: course copies, submissions built from the solutions, bugs."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
_MARKER = re.compile(r"^[ \t]*### (BEGIN|END) SOLUTION[ \t]*\n?", re.MULTILINE)


def assignments() -> list[str]:
    return sorted(p.name for p in (ROOT / "solutions").iterdir()
                  if p.is_dir() and any(p.glob("*.ipynb")))


def notebook_name(assignment: str) -> str:
    return sorted((ROOT / "solutions" / assignment).glob("*.ipynb"))[0].name


def solution_cells(assignment: str) -> dict[str, str]:
    """grade_id -> the solution's code for every answer cell, markers removed."""
    nb = nbformat.read(str(ROOT / "solutions" / assignment / notebook_name(assignment)), 4)
    out = {}
    for c in nb.cells:
        meta = c.metadata.get("nbgrader", {})
        if meta.get("solution"):
            out[meta["grade_id"]] = _MARKER.sub("", c.source)
    return out


def release(assignment: str) -> nbformat.NotebookNode:
    return nbformat.read(str(ROOT / "exercises" / assignment / notebook_name(assignment)), 4)


def submission(assignment: str, answers: dict[str, str] | None = None) -> nbformat.NotebookNode:
    """The release with the given answer cells filled in (the rest left blank)."""
    nb = release(assignment)
    answers = answers or {}
    for c in nb.cells:
        gid = c.metadata.get("nbgrader", {}).get("grade_id")
        if gid in answers:
            c.source = answers[gid]
    return nb


@dataclass(frozen=True)
class Bug:
    """A plausible mistake: text edits applied to one answer cell of the solution.

    ``expect``: test cells (grade ids) that must lose points -- the checks meant to catch it.
    ``diagnosis``: a phrase that the first failing test's message must contain (case-insensitive),
    so that the learner is sent to the real cause.
    """

    name: str
    cell: str
    edits: tuple[tuple[str, str], ...]
    why: str
    expect: tuple[str, ...] = field(default=())
    diagnosis: str = ""

    def answers(self, assignment: str) -> dict[str, str]:
        cells = solution_cells(assignment)
        src = cells[self.cell]
        for old, new in self.edits:
            if old not in src:
                raise AssertionError(f"bug {self.name!r}: {old!r} is not in the solution of "
                                     f"{self.cell!r}; the catalog is out of date")
            src = src.replace(old, new, 1)
        if src == cells[self.cell]:
            raise AssertionError(f"bug {self.name!r} changes nothing")
        cells[self.cell] = src
        return cells


def bug(name: str, cell: str, edits: list[tuple[str, str]] | tuple[str, str], why: str,
        expect: tuple[str, ...] | list[str] = (), diagnosis: str = "") -> Bug:
    if isinstance(edits, tuple):
        edits = [edits]
    return Bug(name, cell, tuple(tuple(e) for e in edits), why, tuple(expect), diagnosis)


def control(name: str, cell: str, edits: list[tuple[str, str]] | tuple[str, str], why: str) -> Bug:
    """A correct answer in another style: it must keep full marks (a grader that rejects it is wrong)."""
    return bug(name, cell, edits, why)


def load_catalog(assignment: str) -> list[Bug]:
    import importlib

    mod = importlib.import_module(f"catalog.{assignment}")
    return list(mod.BUGS)


def load_controls(assignment: str) -> list[Bug]:
    import importlib

    mod = importlib.import_module(f"catalog.{assignment}")
    return list(getattr(mod, "CONTROLS", []))


def chapter_code(chapter: str, *names: str, edits: list[tuple[str, str]] | tuple = ()) -> str:
    """The source of ``names`` in the library module of ``chapter`` (the chapter's export cells).

    A transcription built from this follows the chapter when the chapter changes. ``edits`` adapt it
    to the exercise's names and signatures; each must apply, or the catalog is out of date.
    """
    import importlib
    import inspect

    mod = importlib.import_module(f"handson.nn.{chapter}")
    src = "\n\n".join(inspect.getsource(getattr(mod, n)) for n in names)
    for old, new in edits:
        if old not in src:
            raise AssertionError(f"chapter_code({chapter!r}): {old!r} is not in the chapter's code; "
                                 "the catalog's transcription is out of date")
        src = src.replace(old, new, 1)
    return src


def transcriptions(assignment: str) -> dict[str, dict[str, str]]:
    """Answers that merely transcribe earlier material, each {grade_id: source}.

    ``CHAPTER_AS_ANSWER`` (required): the chapter's own code pasted into the answer cells, adapted
    only to the names and signatures the exercise gives. ``PREVIOUS_AS_ANSWER`` (where it applies):
    the previous exercise's solution, minimally adapted. Each must score at most a third.
    """
    import importlib

    mod = importlib.import_module(f"catalog.{assignment}")
    out = {"chapter": dict(getattr(mod, "CHAPTER_AS_ANSWER", {}) or {})}
    if getattr(mod, "PREVIOUS_AS_ANSWER", None):
        out["previous"] = dict(mod.PREVIOUS_AS_ANSWER)
    return out


def blank_cells(assignment: str) -> dict[str, str]:
    """grade_id -> the release's answer cell (the stub a learner starts from)."""
    out = {}
    for c in release(assignment).cells:
        meta = c.metadata.get("nbgrader", {})
        if meta.get("solution"):
            out[meta["grade_id"]] = c.source
    return out


def make_course(tmp: Path, assignment_ids: list[str]) -> Path:
    """A course directory with this repo's config, solutions and releases for the given ids."""
    tmp.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "nbgrader_config.py", tmp / "nbgrader_config.py")
    for a in assignment_ids:
        shutil.copytree(ROOT / "solutions" / a, tmp / "solutions" / a)
        shutil.copytree(ROOT / "exercises" / a, tmp / "exercises" / a)
    return tmp


def submit(course: Path, student: str, assignment: str, nb: nbformat.NotebookNode | bytes | str,
           name: str | None = None) -> Path:
    folder = course / "submitted" / student / assignment
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name or notebook_name(assignment))
    if isinstance(nb, (bytes, str)):
        path.write_bytes(nb.encode() if isinstance(nb, str) else nb)
    else:
        nbformat.write(nb, str(path))
    return path


def cell_scores(course: Path, assignment: str, student: str) -> dict[str, tuple[float, float]]:
    """grade_id -> (score, max_score) of every test cell of one graded submission."""
    from nbgrader.api import Gradebook

    out = {}
    with Gradebook("sqlite:///" + str(course / "gradebook.db")) as gb:
        sub = gb.find_submission(assignment, student)
        for nb in sub.notebooks:
            for g in nb.grades:
                out[g.name] = (float(g.score), float(g.max_score))
    return out


def grade_in_process(assignment: str, submissions: dict[str, dict[str, str]], tmp: Path) -> dict:
    """Grade {name: answers} with tests/inprocess.py in one fresh Python process."""
    return grade_in_process_many({assignment: submissions}, tmp, jobs=1)[assignment]


#: Seconds one assignment's whole catalog may take in tests/inprocess.py before the proof fails.
IN_PROCESS_LIMIT = 1200


def grade_in_process_many(work: dict[str, dict[str, dict[str, str]]], tmp: Path,
                          jobs: int | None = None) -> dict[str, dict]:
    """Grade {assignment: {name: answers}}: one fresh process per assignment, ``jobs`` at a time.

    Each process runs torch on one thread, so that ``jobs`` processes share the cores instead of
    competing for them.
    """
    import json
    import os
    import subprocess
    import sys
    import time

    jobs = jobs or max(1, min(len(work), os.cpu_count() or 1))
    script = str(Path(__file__).with_name("inprocess.py"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pending = list(work)
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    results: dict[str, dict] = {}
    try:
        while pending or running:
            while pending and len(running) < jobs:
                a = pending.pop(0)
                subs, out, err = (tmp / f"{a}-{name}" for name in
                                  ("submissions.json", "results.json", "stderr.txt"))
                subs.write_text(json.dumps(work[a]))
                # files, not pipes: a pipe nobody reads fills up and stops the writer for good
                with open(out, "w") as fh, open(err, "w") as fe:
                    proc = subprocess.Popen([sys.executable, script, a, str(subs)], stdout=fh,
                                            stderr=fe, text=True, cwd=ROOT, env=env)
                running[a] = (proc, time.monotonic())
            for a, (proc, start) in list(running.items()):
                if proc.poll() is None:
                    if time.monotonic() - start > IN_PROCESS_LIMIT:
                        raise AssertionError(f"in-process grading of {a} ran past {IN_PROCESS_LIMIT} s")
                    continue
                del running[a]
                if proc.returncode:
                    err = (tmp / f"{a}-stderr.txt").read_text()
                    raise AssertionError(f"in-process grading of {a} failed:\n{err[-3000:]}")
                results[a] = json.loads((tmp / f"{a}-results.json").read_text())
            time.sleep(0.05)
    finally:
        for proc, _ in running.values():
            proc.kill()
            proc.wait()
    return results
