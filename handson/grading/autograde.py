"""Stage 4, autograding: each new or changed submission graded in isolation; the batch goes on.

:func:`discover` lists ``submitted/<student>/<assignment>/`` (refusing bad student ids and unknown
assignments); :func:`autograde` skips what the manifest (``.handson/autograde-manifest.json``)
says is unchanged since it was graded, grades the rest in worker processes (several at once), each
submission under a hard wall-clock limit past which its worker and kernel are killed, and exports
``grades.csv``. :func:`grade_submission` grades one submission in its
own private copy of the course that holds no solutions and no other student's files: the
submission is loaded and repaired (:mod:`~handson.grading.repair`), run by the sandboxed executor
(:mod:`~handson.grading.execute`), scanned for tampering (:mod:`~handson.grading.integrity`), and
its autograded notebook and score are kept. A submission that cannot be graded is reported, scored
0 on the blank release, and the batch goes on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from handson.grading import integrity
from handson.grading.course import Course, _cwd, _quiet_nbgrader, nbgrader_config
from handson.grading.execute import (KERNEL_NAME, _execute_class, _install_kernelspec,
                                     probe_isolation)
from handson.grading.export import export_grades
from handson.grading.release import ensure_gradebook
from handson.grading.repair import load_submission

STUDENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}$")
MANIFEST = Path(".handson") / "autograde-manifest.json"


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


def _gradebook_scores(course: Course, assignment: str, student: str) -> tuple[float, float]:
    from nbgrader.api import Gradebook

    with Gradebook(course.db_url) as gb:
        sub = gb.find_submission(assignment, student)
        return float(sub.score), float(sub.max_score)


def grade_submission(course: Course, student: str, assignment: str, timeout: float = 60,
                     notebook_timeout: float = 600, verbose: bool = False) -> Result:
    """Grade one submission in a private copy of the course (see the module docstring)."""
    import nbformat
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


#: Seconds a submission's grading may take beyond its notebooks' deadlines (starting the kernel,
#: nbgrader's own work, the gradebook) before its worker process is killed.
GRACE_SECONDS = 180
#: The note of a submission whose grading ran past its hard limit (it is not tried again).
TIMED_OUT = "grading was stopped: it ran past the submission's time limit"


def hard_limit(course: Course, assignment: str, notebook_timeout: float) -> float:
    """The wall-clock limit of one submission: every notebook's deadline, plus the grace."""
    return max(1, len(course.release_notebooks(assignment))) * float(notebook_timeout) + GRACE_SECONDS


def _worker_main(conn, reference: dict[str, str]) -> None:
    """A grading worker: grade the submissions sent on ``conn``, one at a time, until ``None``."""
    integrity.set_reference(reference)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        course, student, assignment, kwargs = task
        try:
            r = grade_submission(course, student, assignment, **kwargs)
        except Exception as exc:  # noqa: BLE001 -- one submission never stops the batch
            r = Result(student, assignment, "error", notes=[f"{type(exc).__name__}: {exc}"])
        conn.send(r)


def _descendants(pid: int) -> list[int]:
    """Every process started, directly or not, by ``pid`` (Linux's /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            stat = entry.read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(proc) -> None:
    """Kill a worker and the kernels it started (they run in sessions of their own)."""
    for pid in [proc.pid, *_descendants(proc.pid)]:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    proc.join(10)


def _grade_in_workers(course: Course, tasks: list[tuple[str, str, str]], jobs: int, kwargs: dict,
                      limits: dict[str, float], done: Any, last_try: bool = False
                      ) -> list[tuple[str, str, str]]:
    """Grade ``tasks`` in ``jobs`` worker processes, each submission under its hard limit.

    ``done(student, assignment, digest, result)`` receives each result. Returns the tasks whose
    grading ended in an error worth one more try (a crashed worker, a locked gradebook), unless
    ``last_try``, when every result is final.
    """
    import multiprocessing as mp
    from multiprocessing.connection import wait

    if not tasks:
        return []
    ctx = mp.get_context("spawn")
    reference = integrity.reference_fingerprints()
    queue = list(tasks)
    idle: list[tuple[Any, Any]] = []                      # (process, connection)
    busy: dict[Any, tuple[Any, tuple[str, str, str], float]] = {}  # conn -> (proc, task, start)
    retry: list[tuple[str, str, str]] = []

    def start() -> tuple[Any, Any]:
        conn, child = ctx.Pipe()
        proc = ctx.Process(target=_worker_main, args=(child, reference), daemon=True,
                           name="handson-grader")
        proc.start()
        child.close()
        return proc, conn

    def finish(task: tuple[str, str, str], r: Result) -> None:
        if r.status == "error" and not last_try and not r.notes[-1:] == [TIMED_OUT]:
            retry.append(task)
        else:
            done(*task, r)

    try:
        while queue or busy:
            while queue and len(busy) < jobs:
                task = queue.pop(0)
                proc, conn = idle.pop() if idle else start()
                try:
                    conn.send((course, task[0], task[1], kwargs))
                except OSError:  # that idle worker is gone: a fresh one
                    _kill_tree(proc)
                    proc, conn = start()
                    conn.send((course, task[0], task[1], kwargs))
                busy[conn] = (proc, task, time.monotonic())
            ready = wait([*busy, *(p.sentinel for p, _, _ in busy.values())], timeout=1.0)
            for conn, (proc, task, start) in list(busy.items()):
                student, assignment, _ = task
                if conn in ready or conn.poll():
                    try:
                        r = conn.recv()
                    except (EOFError, OSError):
                        r = None
                    if isinstance(r, Result):
                        del busy[conn]
                        idle.append((proc, conn))
                        finish(task, r)
                        continue
                elapsed = time.monotonic() - start
                dead = not proc.is_alive()
                if dead or elapsed > limits[assignment]:
                    del busy[conn]
                    note = (f"the grading process died (exit code {proc.exitcode})" if dead
                            else TIMED_OUT)
                    _kill_tree(proc)
                    conn.close()
                    finish(task, Result(student, assignment, "error", notes=[note], seconds=elapsed))
    finally:
        for proc, conn in idle:
            with contextlib.suppress(OSError):
                conn.send(None)
            proc.join(5)
            if proc.is_alive():
                _kill_tree(proc)
        for proc, _, _ in busy.values():
            _kill_tree(proc)
    return retry


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
              export: bool = True, jobs: int | None = None,
              hard_timeout: float | None = None) -> list[Result]:
    """Grade every new or changed submission; keep every other gradebook row; export grades.

    Each submission is graded in a worker process (``jobs`` at a time). A worker that takes longer
    than ``hard_timeout`` seconds on one submission (by default :func:`hard_limit`) is killed with
    everything it started, and the submission is reported as an error: whatever hangs, the batch
    goes on.
    """
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
    limits = {a: hard_timeout or hard_limit(course, a, notebook_timeout) for _, a, _ in pending}
    if pending:
        retry = _grade_in_workers(course, pending, jobs, kwargs, limits, _done)
        # once more, one at a time: e.g. the gradebook was locked by another worker
        _grade_in_workers(course, retry, 1, kwargs, limits, _done, last_try=True)
    if export and course.gradebook.exists():
        export_grades(course)
    return results
