"""The instructor's grading pipeline: releases, autograding, feedback and grade export.

A thin, defensive layer over nbgrader 0.9 that an instructor can run on a class of strangers:

- ``release``   regenerates every student release in ``exercises/`` from ``solutions/``;
- ``autograde`` grades each ``submitted/<student>/<assignment>/`` that is new or changed, each in
  its own private copy of the course that holds no solutions and no other student's files, with
  the kernel confined by :mod:`handson.sandbox`, a per-cell and a per-notebook time limit, bounded
  output, and a repair step that restores deleted or damaged test cells; then exports
  ``grades.csv``. A submission that cannot be graded is reported and the batch goes on;
- ``feedback``  writes per-student HTML without hidden-test code, not even in tracebacks;
- ``export``    writes ``grades.csv`` from the gradebook.

Run from the course root (where ``nbgrader_config.py`` lives): ``python -m handson.grading CMD``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat

from handson import integrity

# nbgrader runs `alembic` from PATH when it creates a gradebook: make this environment's tools visible.
_BIN = os.path.dirname(sys.executable)
if _BIN not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = _BIN + os.pathsep + os.environ.get("PATH", "")

HIDDEN_BEGIN = "### BEGIN HIDDEN TESTS"
HIDDEN_END = "### END HIDDEN TESTS"
STUDENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}$")
KERNEL_NAME = "handson-sandbox"
MANIFEST = Path(".handson") / "autograde-manifest.json"
#: Bytes of output one cell may keep; the rest is replaced by a note.
MAX_CELL_OUTPUT = 200_000
#: Largest notebook file accepted for grading.
MAX_NOTEBOOK_BYTES = 20 << 20


# --------------------------------------------------------------------------------------------
# Course layout and configuration
# --------------------------------------------------------------------------------------------


@dataclass
class Course:
    """Paths of a course directory laid out as this repository is."""

    root: Path

    @property
    def solutions(self) -> Path:
        return self.root / "solutions"

    @property
    def exercises(self) -> Path:
        return self.root / "exercises"

    @property
    def submitted(self) -> Path:
        return self.root / "submitted"

    @property
    def autograded(self) -> Path:
        return self.root / "autograded"

    @property
    def feedback(self) -> Path:
        return self.root / "feedback"

    @property
    def gradebook(self) -> Path:
        return self.root / "gradebook.db"

    @property
    def db_url(self) -> str:
        return "sqlite:///" + str(self.gradebook)

    def assignments(self) -> list[str]:
        """Assignment ids: the folders of ``solutions/`` that hold a notebook."""
        if not self.solutions.is_dir():
            return []
        return sorted(p.name for p in self.solutions.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and any(p.glob("*.ipynb")))

    def release_notebooks(self, assignment: str) -> list[Path]:
        return sorted((self.exercises / assignment).glob("*.ipynb"))


def nbgrader_config(course: Course, root: Path | None = None):
    """The course's nbgrader configuration, with ``root`` (default: the course) as course dir."""
    from traitlets.config import Config
    from traitlets.config.loader import PyFileConfigLoader

    cfg = Config()
    cfg_file = course.root / "nbgrader_config.py"
    if cfg_file.exists():
        with _cwd(course.root):
            cfg = PyFileConfigLoader(cfg_file.name, path=str(course.root)).load_config()
    cfg.CourseDirectory.root = str(root or course.root)
    cfg.CourseDirectory.db_url = course.db_url
    cfg.CourseDirectory.source_directory = "solutions"
    cfg.CourseDirectory.release_directory = "exercises"
    return cfg


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@contextlib.contextmanager
def _quiet_nbgrader(verbose: bool) -> Iterator[list[str]]:
    """Collect nbgrader's log lines instead of printing them (SQLAlchemy warnings are noise)."""
    import warnings

    lines: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(f"{record.levelname}: {record.getMessage()}")

    handler = _Collect(level=logging.INFO)
    targets = [logging.getLogger(n) for n in ("traitlets", "nbgrader", "NbGraderAPI")]
    saved = [(t, t.level, t.propagate) for t in targets]
    for t in targets:
        t.addHandler(handler)
        t.setLevel(logging.INFO)
        t.propagate = verbose
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield lines
        finally:
            for t, level, prop in saved:
                t.removeHandler(handler)
                t.setLevel(level)
                t.propagate = prop


# --------------------------------------------------------------------------------------------
# Releases
# --------------------------------------------------------------------------------------------


def generate_releases(course: Course, assignments: Sequence[str] | None = None,
                      release_dir: Path | None = None, verbose: bool = False) -> dict[str, bool]:
    """Run nbgrader's generate_assignment (forced) for each assignment; return success per id.

    Also records the assignment (notebooks, cells, points, hidden tests) in the gradebook.
    ``release_dir`` writes the releases elsewhere (e.g. to compare with the committed ones).
    """
    from nbgrader.coursedir import CourseDirectory
    from nbgrader.converters import GenerateAssignment

    results: dict[str, bool] = {}
    for a in assignments or course.assignments():
        cfg = nbgrader_config(course)
        if release_dir is not None:
            cfg.CourseDirectory.release_directory = str(release_dir)
        with _cwd(course.root), _quiet_nbgrader(verbose) as lines:
            coursedir = CourseDirectory(config=cfg)
            coursedir.assignment_id = a
            app = GenerateAssignment(coursedir=coursedir, config=cfg)
            app.force = True
            app.create_assignment = True
            try:
                app.start()
                results[a] = True
            except Exception as exc:  # noqa: BLE001 -- report and go on
                results[a] = False
                print(f"release {a}: FAILED: {exc}", file=sys.stderr)
                print("\n".join(lines[-20:]), file=sys.stderr)
    return results


def ensure_gradebook(course: Course, assignments: Sequence[str], verbose: bool = False) -> None:
    """Make sure every assignment exists in the gradebook (generate_assignment creates it).

    Releases are regenerated into a scratch folder so ``exercises/`` is left untouched.
    """
    from nbgrader.api import Gradebook, MissingEntry

    missing = []
    with Gradebook(course.db_url) as gb:
        for a in assignments:
            try:
                gb.find_assignment(a)
            except MissingEntry:
                missing.append(a)
    if missing:
        with tempfile.TemporaryDirectory(prefix="handson-release-") as tmp:
            generate_releases(course, missing, release_dir=Path(tmp), verbose=verbose)


# --------------------------------------------------------------------------------------------
# Submissions: discovery, validation and repair
# --------------------------------------------------------------------------------------------


@dataclass
class Result:
    """What happened to one submission."""

    student: str
    assignment: str
    status: str = "graded"          # graded | skipped | ungradable | error
    score: float | None = None
    max_score: float | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        score = "" if self.score is None else f" {self.score:g}/{self.max_score:g}"
        notes = "" if not self.notes else " -- " + "; ".join(self.notes)
        return f"{self.student}/{self.assignment}: {self.status}{score} ({self.seconds:.1f} s){notes}"


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            h.update(str(p.relative_to(folder)).encode() + b"\0")
            h.update(p.read_bytes())
    return h.hexdigest()


def _grade_ids(nb: nbformat.NotebookNode) -> list[str]:
    return [c.metadata.get("nbgrader", {}).get("grade_id") for c in nb.cells
            if c.metadata.get("nbgrader", {}).get("grade_id")]


def _norm(src: str) -> str:
    return "\n".join(line.rstrip() for line in src.strip().splitlines())


def repair_notebook(submitted: nbformat.NotebookNode, release: nbformat.NotebookNode
                    ) -> tuple[nbformat.NotebookNode, list[str]]:
    """Rebuild a damaged submission on the release's skeleton; return it with notes.

    - cells whose nbgrader metadata was stripped get it back (matched by their unchanged source,
      or, for an answer cell, by its position between recognised cells);
    - grade and locked cells that were deleted are put back where the release has them (the
      autograder then restores their source from the gradebook and grades them);
    - cells the learner added are kept; the kernelspec is the release's.
    """
    notes: list[str] = []
    rel_cells = release.cells
    rel_ids = [c.metadata.get("nbgrader", {}).get("grade_id") for c in rel_cells]
    rel_by_id = {g: c for g, c in zip(rel_ids, rel_cells) if g}
    rel_by_source = {}
    for c in rel_cells:
        g = c.metadata.get("nbgrader", {}).get("grade_id")
        if g:
            rel_by_source.setdefault((c.cell_type, _norm(c.source)), g)

    cells = [nbformat.from_dict(dict(c)) for c in submitted.cells]
    ids: list[str | None] = []
    seen: set[str] = set()
    for c in cells:
        g = c.metadata.get("nbgrader", {}).get("grade_id")
        if g in rel_by_id and g not in seen:
            ids.append(g)
            seen.add(g)
            continue
        if g and g not in rel_by_id:
            c.metadata.pop("nbgrader", None)  # an id the assignment does not know: plain cell
        if g in seen:
            c.metadata.pop("nbgrader", None)  # a duplicated graded cell: keep as a plain cell
            notes.append(f"cell {g!r} appeared twice; the copy is not graded")
            ids.append(None)
            continue
        match = rel_by_source.get((c.cell_type, _norm(c.source)))
        if match and match not in seen:
            c.metadata["nbgrader"] = json.loads(json.dumps(rel_by_id[match].metadata["nbgrader"]))
            ids.append(match)
            seen.add(match)
            notes.append(f"cell {match!r} had lost its grading metadata; restored")
        else:
            ids.append(None)

    # Answer cells with stripped metadata: the first unclaimed code cell between the anchors.
    order = [g for g in rel_ids if g]
    for g in order:
        if g in seen or not rel_by_id[g].metadata["nbgrader"].get("solution"):
            continue
        lo, hi = _anchor_window(ids, order, g)
        for i in range(lo, hi):
            if ids[i] is None and cells[i].cell_type == rel_by_id[g].cell_type and cells[i].source.strip():
                cells[i].metadata["nbgrader"] = json.loads(json.dumps(rel_by_id[g].metadata["nbgrader"]))
                ids[i] = g
                seen.add(g)
                notes.append(f"answer cell {g!r} had lost its grading metadata; restored by position")
                break

    # Put back graded/locked cells that are missing.
    for g in order:
        if g in seen:
            continue
        meta = rel_by_id[g].metadata["nbgrader"]
        lo, _ = _anchor_window(ids, order, g)
        cell = nbformat.from_dict(json.loads(json.dumps(dict(rel_by_id[g]))))
        cells.insert(lo, cell)
        ids.insert(lo, g)
        seen.add(g)
        kind = "test cell" if meta.get("grade") and not meta.get("solution") else "cell"
        notes.append(f"{kind} {g!r} was missing and was restored")

    nb = nbformat.v4.new_notebook()
    nb.metadata = json.loads(json.dumps(dict(release.metadata)))
    nb.cells = cells
    used: set[str] = set()
    for i, c in enumerate(nb.cells):
        if c.cell_type == "code":
            c.setdefault("outputs", [])
            c.setdefault("execution_count", None)
        cid = str(c.get("id") or "")
        if not re.fullmatch(r"[a-zA-Z0-9-_]{1,64}", cid) or cid in used:
            cid = f"cell-{i}-{hashlib.sha1(c.source.encode()).hexdigest()[:8]}"
        c["id"] = cid
        used.add(cid)
    nb.nbformat, nb.nbformat_minor = 4, 5
    return nbformat.from_dict(json.loads(json.dumps(nb))), notes


def _anchor_window(ids: list[str | None], order: list[str], g: str) -> tuple[int, int]:
    """Index range in ``ids`` between the nearest recognised cells before and after ``g``."""
    k = order.index(g)
    before = [x for x in order[:k] if x in ids]
    after = [x for x in order[k + 1:] if x in ids]
    lo = ids.index(before[-1]) + 1 if before else 0
    hi = ids.index(after[0]) if after else len(ids)
    return lo, max(lo, hi)


def load_submission(folder: Path, expected: str, release: nbformat.NotebookNode
                    ) -> tuple[nbformat.NotebookNode | None, list[str]]:
    """Find, read and repair the submitted notebook; None (with the reason) if it can't be graded."""
    notes: list[str] = []
    path = folder / expected
    if not path.exists():
        others = sorted(p for p in folder.glob("*.ipynb") if not p.name.startswith("."))
        if len(others) == 1:
            notes.append(f"notebook submitted as {others[0].name!r}, graded as {expected!r}")
            path = others[0]
        elif not others:
            return None, notes + [f"no notebook {expected!r} in the submission"]
        else:
            return None, notes + [f"{expected!r} is missing and {len(others)} other notebooks were "
                                  "submitted; cannot tell which one to grade"]
    if path.is_symlink() or not path.is_file():
        return None, notes + [f"{path.name!r} is not a regular file"]
    if path.stat().st_size == 0:
        return None, notes + [f"{path.name!r} is empty"]
    if path.stat().st_size > MAX_NOTEBOOK_BYTES:
        return None, notes + [f"{path.name!r} is larger than {MAX_NOTEBOOK_BYTES >> 20} MiB"]
    try:
        nb = nbformat.read(str(path), as_version=4)
    except Exception as exc:  # noqa: BLE001 -- any parse failure makes it ungradable
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        return None, notes + [f"{path.name!r} is not a valid notebook ({reason})"]
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        return None, notes + [f"{path.name!r} is not a valid notebook (no cells)"]
    rel_ids = set(_grade_ids(release))
    sub_ids = set(_grade_ids(nb))
    rel_sources = {_norm(c.source) for c in release.cells if c.cell_type == "code" and
                   c.metadata.get("nbgrader", {}).get("grade")}
    sub_sources = {_norm(c.get("source", "")) for c in nb.cells if c.get("cell_type") == "code"}
    if not (rel_ids & sub_ids) and not (rel_sources & sub_sources):
        return None, notes + ["the notebook does not belong to this assignment (none of its cells "
                              "match the release)"]
    repaired, more = repair_notebook(nb, release)
    return repaired, notes + more


# --------------------------------------------------------------------------------------------
# Execution: a sandboxed kernel, time limits, bounded output, survival of dead kernels
# --------------------------------------------------------------------------------------------


def _execute_class():
    """nbgrader's Execute, hardened (built lazily so importing this module stays cheap)."""
    from nbclient.exceptions import DeadKernelError
    from nbformat.notebooknode import NotebookNode
    from nbgrader.preprocessors import Execute
    from traitlets import Float, Integer

    class SandboxedExecute(Execute):
        """Execute with a notebook deadline, bounded output and a tamper probe after each test."""

        notebook_timeout = Float(600.0, help="Seconds for the whole notebook.").tag(config=True)
        max_cell_output = Integer(MAX_CELL_OUTPUT, help="Bytes of output kept per cell.").tag(config=True)

        def preprocess(self, nb, resources=None, km=None):
            self._dead_reason = None
            self._deadline = time.monotonic() + float(self.notebook_timeout)
            self._out_bytes: dict[int, int] = {}
            self._tamper: list[str] = []
            nb, resources = super().preprocess(nb, resources, km)
            resources.setdefault("handson", {})["tamper"] = self._tamper
            resources["handson"]["dead"] = self._dead_reason
            return nb, resources

        def _fail(self, cell, ename: str, evalue: str, first: bool = False) -> None:
            err = NotebookNode(output_type="error", ename=ename, evalue=evalue,
                               traceback=[f"{ename}: {evalue}"])
            cell.outputs.insert(0 if first else len(cell.outputs), err)

        def preprocess_cell(self, cell, resources, index):
            if cell.cell_type != "code":
                return cell, resources
            if self._dead_reason:
                self._fail(cell, "NotRun", f"not run: {self._dead_reason}")
                return cell, resources
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                self._dead_reason = "the notebook ran out of time"
                self._fail(cell, "NotRun", f"not run: {self._dead_reason}")
                return cell, resources
            old_timeout = self.timeout
            self.timeout = max(1, int(min(self.timeout or remaining, remaining)))
            try:
                cell, resources = super().preprocess_cell(cell, resources, index)
            except DeadKernelError:
                self._dead_reason = ("the kernel died in an earlier cell (os._exit, a crash, or "
                                     "too much memory)")
                self._fail(cell, "DeadKernelError", "the kernel died while running this cell "
                           "(os._exit, a crash, or too much memory)")
                return cell, resources
            finally:
                self.timeout = old_timeout
            meta = cell.metadata.get("nbgrader", {})
            if meta.get("grade") and not meta.get("solution"):
                # nbgrader reads a number shown by a test cell as partial credit, before it looks
                # for errors: a test cell's value is shown, never scored.
                # Likewise it fails any test cell that wrote to stderr: a harmless warning from
                # the learner's code must not cost the points (failures are errors here).
                for out in cell.outputs:
                    if out.get("output_type") == "execute_result":
                        out["output_type"] = "display_data"
                        out.pop("execution_count", None)
                    elif out.get("output_type") == "stream" and out.get("name") == "stderr":
                        out["name"] = "stdout"
                if not self._dead_reason:
                    self._probe(cell)
            return cell, resources

        def _probe(self, cell) -> None:
            """Ask the kernel whether the test machinery is still the original one."""
            try:
                found = integrity.run_probe(self.kc, lambda mid, t: self.wait_for_reply(mid), timeout=30)
            except Exception as exc:  # noqa: BLE001
                found = [f"the integrity probe failed ({type(exc).__name__})"]
            if found:
                gid = cell.metadata["nbgrader"].get("grade_id", "?")
                self._tamper.append(f"{gid}: " + "; ".join(found))
                self._fail(cell, "TamperingDetected", first=True, evalue=(
                           "the test machinery was altered (" + "; ".join(found) + "); this test "
                           "scores 0"))

        def output(self, outs, msg, display_id, cell_index):
            size = len(json.dumps(msg.get("content", {}), default=str))
            used = self._out_bytes.get(cell_index, 0) + size
            self._out_bytes[cell_index] = used
            if msg["msg_type"] == "error":
                return super().output(outs, msg, display_id, cell_index)
            if used > self.max_cell_output:
                if used - size <= self.max_cell_output:
                    outs.append(NotebookNode(output_type="stream", name="stdout",
                                             text=f"\n[output truncated: over {self.max_cell_output} "
                                                  "bytes]\n"))
                return None
            return super().output(outs, msg, display_id, cell_index)

    return SandboxedExecute


def _install_kernelspec(folder: Path) -> None:
    spec_dir = folder / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-m", "handson.sandbox", "--", sys.executable, "-m",
                 "ipykernel_launcher", "--IPKernelApp.log_level=ERROR", "-f", "{connection_file}"],
        "display_name": "Python 3 (handson sandbox)",
        "language": "python",
        "metadata": {"debugger": False},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))


def probe_isolation(course: Course) -> str:
    """The isolation level kernels get on this machine (see :mod:`handson.sandbox`)."""
    env = dict(os.environ, HANDSON_SANDBOX=json.dumps({"hide": [str(course.root)]}))
    try:
        out = subprocess.run([sys.executable, "-m", "handson.sandbox", "--probe"], env=env,
                             capture_output=True, text=True, timeout=60, check=False)
        return (out.stdout.strip().splitlines() or ["none"])[-1]
    except (OSError, subprocess.TimeoutExpired):
        return "none"


# --------------------------------------------------------------------------------------------
# Autograding
# --------------------------------------------------------------------------------------------


def _gradebook_scores(course: Course, assignment: str, student: str) -> tuple[float, float]:
    from nbgrader.api import Gradebook

    with Gradebook(course.db_url) as gb:
        sub = gb.find_submission(assignment, student)
        return float(sub.score), float(sub.max_score)


def grade_submission(course: Course, student: str, assignment: str, timeout: float = 60,
                     notebook_timeout: float = 600, verbose: bool = False) -> Result:
    """Grade one submission in a private copy of the course (see the module docstring)."""
    from nbgrader.converters import Autograde
    from nbgrader.coursedir import CourseDirectory
    from nbgrader.preprocessors import Execute

    t0 = time.monotonic()
    res = Result(student, assignment)
    folder = course.submitted / student / assignment
    releases = course.release_notebooks(assignment)
    if not releases:
        res.status, res.notes = "error", [f"no release notebook in exercises/{assignment}"]
        return res
    with tempfile.TemporaryDirectory(prefix="handson-grade-") as tmp_name:
        tmp = Path(tmp_name)
        os.chmod(tmp, 0o700)
        sub_dir = tmp / "submitted" / student / assignment
        sub_dir.mkdir(parents=True)
        graded_blank = False
        for rel_path in releases:
            release = nbformat.read(str(rel_path), as_version=4)
            nb, notes = load_submission(folder, rel_path.name, release)
            res.notes += notes
            if nb is None:
                # Ungradable: grade the blank release in its place so the gradebook gets a row
                # (scoring 0) and the reason is reported.
                nb = release
                graded_blank = True
            nbformat.write(nb, str(sub_dir / rel_path.name))
        # Data files that came with the submission (never notebooks, never links).
        for p in folder.rglob("*") if folder.is_dir() else []:
            rel = p.relative_to(folder)
            if (p.is_file() and not p.is_symlink() and p.suffix != ".ipynb"
                    and not any(part.startswith(".") for part in rel.parts)):
                dst = sub_dir / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, dst)
        stamp = folder / "timestamp.txt"
        if stamp.is_file() and stamp.stat().st_size < 200:
            shutil.copyfile(stamp, sub_dir / "timestamp.txt")
        _install_kernelspec(tmp / "jupyter")

        cfg = nbgrader_config(course, root=tmp)
        cfg.CourseDirectory.source_directory = "no-source"  # nothing to copy into the run
        cfg.Execute.kernel_name = KERNEL_NAME
        cfg.Execute.timeout = int(timeout)
        cfg.SandboxedExecute.notebook_timeout = float(notebook_timeout)
        sandboxed = _execute_class()
        pre = [sandboxed if p is Execute else p
               for p in Autograde.class_traits()["autograde_preprocessors"].default()]
        cfg.Autograde.autograde_preprocessors = pre
        env_backup = {k: os.environ.get(k) for k in ("JUPYTER_PATH", "HANDSON_SANDBOX")}
        os.environ["JUPYTER_PATH"] = str(tmp / "jupyter") + os.pathsep + (env_backup["JUPYTER_PATH"] or "")
        os.environ["HANDSON_SANDBOX"] = json.dumps({"hide": [str(course.root), str(tmp)]})
        tamper: dict[str, str] = {}
        try:
            with _cwd(tmp), _quiet_nbgrader(verbose) as lines:
                coursedir = CourseDirectory(config=cfg)
                coursedir.assignment_id = assignment
                coursedir.student_id = student
                app = Autograde(coursedir=coursedir, config=cfg)
                app.force = True
                app.create_student = True
                captured: dict[str, Any] = {}
                try:
                    _run_autograde(app, captured)
                except Exception as exc:  # noqa: BLE001
                    res.status = "error"
                    res.notes.append(f"autograder failed: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}")
                    tail = [ln.splitlines()[0] for ln in lines if ln.startswith(("ERROR", "CRITICAL"))
                            and "Traceback" not in ln and "see the" not in ln]
                    res.notes += tail[-3:]
                for gid_msg in captured.get("tamper", []):
                    gid, _, why = gid_msg.partition(": ")
                    tamper.setdefault(gid, why)
                if captured.get("dead"):
                    res.notes.append(captured["dead"])
        finally:
            for k, v in env_backup.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        static = integrity.scan_notebook_dir(sub_dir)
        if res.status != "error":
            if static:
                res.notes.append("suspicious code: " + "; ".join(static))
            if tamper:  # each such cell carries a TamperingDetected error, so it scored 0
                res.notes.append("tampering detected in " + ", ".join(sorted(tamper)) + ": scored 0")
            out_dir = course.autograded / student / assignment
            src_dir = tmp / "autograded" / student / assignment
            if src_dir.is_dir():
                if out_dir.exists():
                    shutil.rmtree(out_dir)
                out_dir.parent.mkdir(parents=True, exist_ok=True)
                shutil.copytree(src_dir, out_dir, symlinks=False)
            res.score, res.max_score = _gradebook_scores(course, assignment, student)
            if graded_blank:
                res.status = "ungradable"
    res.seconds = time.monotonic() - t0
    return res


def _run_autograde(app, captured: dict[str, Any]) -> None:
    """Run nbgrader's autograde, keeping what the sandboxed executor learnt about the run."""
    import nbconvert.exporters.exporter as exporter_mod

    orig = exporter_mod.Exporter._preprocess

    def _preprocess(self, nb, resources):
        nb, resources = orig(self, nb, resources)
        info = resources.get("handson") if isinstance(resources, dict) else None
        if info:
            captured.setdefault("tamper", []).extend(info.get("tamper") or [])
            if info.get("dead"):
                captured["dead"] = info["dead"]
        return nb, resources

    exporter_mod.Exporter._preprocess = _preprocess
    try:
        app.start()
    finally:
        exporter_mod.Exporter._preprocess = orig


def default_jobs() -> int:
    """Submissions graded at once: one per core, at most 4 (each kernel takes ~0.5 GB)."""
    return max(1, min(4, os.cpu_count() or 1))


def _worker_init(reference: dict[str, str]) -> None:
    integrity.set_reference(reference)


def _load_manifest(course: Course) -> dict[str, str]:
    path = course.root / MANIFEST
    try:
        data = json.loads(path.read_text())
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_manifest(course: Course, manifest: dict[str, str]) -> None:
    path = course.root / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _in_gradebook(course: Course, assignment: str, student: str) -> bool:
    from nbgrader.api import Gradebook, MissingEntry

    with Gradebook(course.db_url) as gb:
        try:
            gb.find_submission(assignment, student)
            return True
        except MissingEntry:
            return False


def discover(course: Course, students: Sequence[str] | None = None,
             assignments: Sequence[str] | None = None) -> tuple[list[tuple[str, str]], list[Result]]:
    """Submissions to grade, and reports on folders that can't be (bad names, unknown ids)."""
    todo: list[tuple[str, str]] = []
    problems: list[Result] = []
    known = set(course.assignments())
    if not course.submitted.is_dir():
        return todo, problems
    for sdir in sorted(course.submitted.iterdir()):
        if students and sdir.name not in students:
            continue
        if not sdir.is_dir() or sdir.is_symlink():
            continue
        if not STUDENT_ID.match(sdir.name):
            problems.append(Result(sdir.name, "*", "ungradable",
                                   notes=["student folder name is not a valid id"]))
            continue
        for adir in sorted(sdir.iterdir()):
            if assignments and adir.name not in assignments:
                continue
            if not adir.is_dir() or adir.is_symlink():
                continue
            if adir.name not in known:
                problems.append(Result(sdir.name, adir.name, "ungradable",
                                       notes=["no such assignment"]))
                continue
            todo.append((sdir.name, adir.name))
    return todo, problems


def autograde(course: Course, students: Sequence[str] | None = None,
              assignments: Sequence[str] | None = None, force: bool = False, timeout: float = 60,
              notebook_timeout: float = 600, verbose: bool = False,
              export: bool = True, jobs: int | None = None) -> list[Result]:
    """Grade every new or changed submission; keep every other gradebook row; export grades."""
    todo, results = discover(course, students, assignments)
    for r in results:
        print(r.line(), flush=True)
    if not todo:
        print("nothing to grade in submitted/", flush=True)
    else:
        level = probe_isolation(course)
        if level == "none":
            print("WARNING: kernels run WITHOUT isolation on this machine (no mount namespace, "
                  "no unprivileged user): a submission could read or change course files.",
                  flush=True)
        else:
            print(f"isolation: {level}", flush=True)
        ensure_gradebook(course, sorted({a for _, a in todo}), verbose=verbose)
        if course.gradebook.exists():
            shutil.copyfile(course.gradebook, course.root / "gradebook.db.bak")
    manifest = _load_manifest(course)
    pending: list[tuple[str, str, str]] = []
    for student, assignment in todo:
        key = f"{student}/{assignment}"
        digest = _digest(course.submitted / student / assignment)
        if (not force and manifest.get(key) == digest and _in_gradebook(course, assignment, student)
                and (course.autograded / student / assignment).is_dir()):
            r = Result(student, assignment, "skipped", notes=["unchanged since last graded"])
            with contextlib.suppress(Exception):
                r.score, r.max_score = _gradebook_scores(course, assignment, student)
            print(r.line(), flush=True)
            results.append(r)
        else:
            pending.append((student, assignment, digest))

    def _done(student: str, assignment: str, digest: str, r: Result) -> None:
        if r.status in ("graded", "ungradable"):
            manifest[f"{student}/{assignment}"] = digest
            _save_manifest(course, manifest)
        print(r.line(), flush=True)
        results.append(r)

    kwargs = dict(timeout=timeout, notebook_timeout=notebook_timeout, verbose=verbose)
    jobs = max(1, min(jobs or default_jobs(), len(pending)))
    if jobs == 1:
        for student, assignment, digest in pending:
            try:
                r = grade_submission(course, student, assignment, **kwargs)
            except Exception as exc:  # noqa: BLE001 -- one submission never stops the batch
                r = Result(student, assignment, "error", notes=[f"{type(exc).__name__}: {exc}"])
            _done(student, assignment, digest, r)
    elif pending:
        import concurrent.futures as cf
        import multiprocessing as mp

        reference = integrity.reference_fingerprints()
        with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"),
                                    initializer=_worker_init, initargs=(reference,)) as pool:
            futures = {pool.submit(grade_submission, course, s, a, **kwargs): (s, a, d)
                       for s, a, d in pending}
            retry: list[tuple[str, str, str]] = []
            for fut in cf.as_completed(futures):
                s, a, d = futures[fut]
                try:
                    r = fut.result()
                except Exception as exc:  # noqa: BLE001 -- a crashed worker loses one submission
                    r = Result(s, a, "error", notes=[f"{type(exc).__name__}: {exc}"])
                if r.status == "error":
                    retry.append((s, a, d))  # e.g. the gradebook was locked by another worker
                    continue
                _done(s, a, d, r)
        for s, a, d in retry:  # once more, alone
            try:
                r = grade_submission(course, s, a, **kwargs)
            except Exception as exc:  # noqa: BLE001
                r = Result(s, a, "error", notes=[f"{type(exc).__name__}: {exc}"])
            _done(s, a, d, r)
    if export and course.gradebook.exists():
        export_grades(course)
    return results


def export_grades(course: Course, path: Path | None = None) -> Path:
    """Write the gradebook as CSV (nbgrader's columns), atomically."""
    from nbgrader.api import Gradebook
    from nbgrader.plugins.export import CsvExportPlugin

    path = path or course.root / "grades.csv"
    tmp = path.with_suffix(".csv.tmp")
    with Gradebook(course.db_url) as gb, _quiet_nbgrader(False):
        plugin = CsvExportPlugin()
        plugin.to = str(tmp)
        plugin.export(gb)
    os.replace(tmp, path)
    print(f"grades written to {path}", flush=True)
    return path


# --------------------------------------------------------------------------------------------
# Feedback
# --------------------------------------------------------------------------------------------


def _feedback_preprocessor():
    from nbgrader.preprocessors import NbGraderPreprocessor

    class HideHiddenTestTracebacks(NbGraderPreprocessor):
        """Drop the frames of hidden-test cells from tracebacks; keep the message.

        Runs before ClearHiddenTests, while the hidden tests can still be recognised.
        """

        def preprocess_cell(self, cell, resources, index):
            if cell.cell_type == "code" and HIDDEN_BEGIN in cell.source:
                own = f"Cell In[{cell.get('execution_count')}]"
                for out in cell.get("outputs", []):
                    if out.get("output_type") == "error":
                        kept = [f for f in out.get("traceback", [])
                                if own not in f and "### BEGIN HIDDEN" not in f]
                        tail = f"{out.get('ename', 'Error')}: {out.get('evalue', '')}"
                        kept = [f for f in kept if _strip_ansi(f).strip() != _strip_ansi(tail).strip()]
                        out["traceback"] = kept[:1] + [f for f in kept[1:] if "File " in _strip_ansi(f)
                                                       and "handson" not in f] + [tail]
                    if out.get("output_type") == "stream" and "### " in out.get("text", ""):
                        out["text"] = ""
            return cell, resources

    return HideHiddenTestTracebacks


def _strip_ansi(s: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", s)


def feedback(course: Course, students: Sequence[str] | None = None,
             assignments: Sequence[str] | None = None, verbose: bool = False) -> list[Path]:
    """Generate feedback HTML for every autograded submission; hidden tests are never shown."""
    from nbgrader.converters import GenerateFeedback
    from nbgrader.coursedir import CourseDirectory
    from nbgrader.preprocessors import ClearHiddenTests, GetGrades
    from nbconvert.preprocessors import CSSHTMLHeaderPreprocessor

    written: list[Path] = []
    if not course.autograded.is_dir():
        print("nothing in autograded/: run make autograde first")
        return written
    pairs = [(s.name, a.name) for s in sorted(course.autograded.iterdir()) if s.is_dir()
             for a in sorted(s.iterdir()) if a.is_dir()]
    for student, assignment in pairs:
        if (students and student not in students) or (assignments and assignment not in assignments):
            continue
        cfg = nbgrader_config(course)
        cfg.GenerateFeedback.preprocessors = [GetGrades, _feedback_preprocessor(), ClearHiddenTests,
                                              CSSHTMLHeaderPreprocessor]
        with _cwd(course.root), _quiet_nbgrader(verbose) as lines:
            coursedir = CourseDirectory(config=cfg)
            coursedir.assignment_id = assignment
            coursedir.student_id = student
            app = GenerateFeedback(coursedir=coursedir, config=cfg)
            app.force = True
            try:
                app.start()
            except Exception as exc:  # noqa: BLE001
                print(f"{student}/{assignment}: feedback FAILED: {exc}", file=sys.stderr)
                print("\n".join(lines[-10:]), file=sys.stderr)
                continue
        out = sorted((course.feedback / student / assignment).glob("*.html"))
        written += out
        for p in out:
            print(f"{student}/{assignment}: {p.relative_to(course.root)}")
    return written


# --------------------------------------------------------------------------------------------
# Importing a zip of submissions downloaded from a learning-management system
# --------------------------------------------------------------------------------------------


def collect_zip(course: Course, assignment: str, archive: Path, verbose: bool = False) -> list[str]:
    """Import ``archive`` (a zip of notebooks named ``<student>_..._<notebook>.ipynb``, as Moodle or
    Canvas name them) into ``submitted/<student>/<assignment>/`` with nbgrader's zip_collect.

    Returns the student ids imported.
    """
    releases = course.release_notebooks(assignment)
    if not releases:
        raise SystemExit(f"unknown assignment {assignment!r}: no release in exercises/{assignment}")
    names = "|".join(re.escape(p.name) for p in releases)
    regexp = rf".*/(?P<student_id>[A-Za-z0-9][A-Za-z0-9.@+-]*)_(?:[^/]*_)?(?P<file_id>{names})$"
    dest = course.root / "downloaded" / assignment / "archive"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(archive, dest / Path(archive).name)
    before = {p.name for p in course.submitted.iterdir()} if course.submitted.is_dir() else set()
    cmd = [sys.executable, "-m", "nbgrader", "zip_collect", assignment, "--force",
           f"--FileNameCollectorPlugin.named_regexp={regexp}"]
    out = subprocess.run(cmd, cwd=course.root, capture_output=True, text=True, check=False)
    if verbose or out.returncode != 0:
        print(out.stdout + out.stderr, file=sys.stderr)
    if out.returncode != 0:
        raise SystemExit(f"zip_collect failed for {archive}")
    after = {p.name for p in course.submitted.iterdir()} if course.submitted.is_dir() else set()
    imported = sorted(p.name for p in course.submitted.iterdir()
                      if (p / assignment).is_dir()) if course.submitted.is_dir() else []
    for s in imported:
        print(f"{s}/{assignment}: imported{'' if s in after - before else ' (replaced)'}")
    return imported


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m handson.grading", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".", help="course root (default: current directory)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show nbgrader's log")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("release", help="regenerate exercises/ from solutions/")
    p.add_argument("assignments", nargs="*")
    p = sub.add_parser("autograde", help="grade new or changed submissions, export grades.csv")
    p.add_argument("assignments", nargs="*")
    p.add_argument("--student", action="append", help="only this student (repeatable)")
    p.add_argument("--force", action="store_true", help="regrade unchanged submissions too")
    p.add_argument("--timeout", type=float, default=60, help="seconds per cell (default 60)")
    p.add_argument("--notebook-timeout", type=float, default=600,
                   help="seconds per notebook (default 600)")
    p.add_argument("--jobs", type=int, default=None,
                   help="submissions graded at once (default: one per core, at most 4)")
    p = sub.add_parser("feedback", help="write feedback HTML to feedback/")
    p.add_argument("assignments", nargs="*")
    p.add_argument("--student", action="append")
    sub.add_parser("export", help="write grades.csv from the gradebook")
    sub.add_parser("report", help="write the class report to reports/")
    p = sub.add_parser("collect", help="import a zip of submissions from a learning-management system")
    p.add_argument("assignment")
    p.add_argument("archive", type=Path)
    args = parser.parse_args(argv)
    course = Course(Path(args.root).resolve())
    if not (course.root / "nbgrader_config.py").exists():
        parser.error(f"{course.root} has no nbgrader_config.py: run from the course root")
    if args.cmd == "release":
        ok = generate_releases(course, args.assignments or None, verbose=args.verbose)
        for a, good in ok.items():
            print(f"release {a}: {'ok' if good else 'FAILED'}")
        return 0 if all(ok.values()) else 1
    if args.cmd == "autograde":
        results = autograde(course, args.student, args.assignments or None, force=args.force,
                            timeout=args.timeout, notebook_timeout=args.notebook_timeout,
                            verbose=args.verbose, jobs=args.jobs)
        bad = [r for r in results if r.status in ("error", "ungradable")]
        graded = [r for r in results if r.status == "graded"]
        print(f"{len(graded)} graded, {len([r for r in results if r.status == 'skipped'])} unchanged, "
              f"{len(bad)} with problems (see above)")
        return 0
    if args.cmd == "feedback":
        feedback(course, args.student, args.assignments or None, verbose=args.verbose)
        return 0
    if args.cmd == "export":
        export_grades(course)
        return 0
    if args.cmd == "report":
        from handson import report

        for path in report.write(course):
            print(path.relative_to(course.root))
        return 0
    if args.cmd == "collect":
        collect_zip(course, args.assignment, args.archive.resolve(), verbose=args.verbose)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
