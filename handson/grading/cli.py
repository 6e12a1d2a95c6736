"""The instructor's grading pipeline: releases, autograding, feedback, reports and grade export.

A thin, defensive layer over nbgrader 0.9 that an instructor can run on a class of strangers:

- ``release``   regenerates every student release in ``exercises/`` from ``solutions/``;
- ``autograde`` grades each ``submitted/<student>/<assignment>/`` that is new or changed, each in
  its own private copy of the course that holds no solutions and no other student's files, with
  the kernel confined by :mod:`handson.grading.sandbox`, a per-cell and a per-notebook time limit,
  bounded output, and a repair step that restores deleted or damaged test cells; then exports
  ``grades.csv``. A submission that cannot be graded is reported and the batch goes on;
- ``feedback``  writes per-student HTML without hidden-test code, not even in tracebacks;
- ``report``    writes the class report (what the class got wrong) to ``reports/``;
- ``collect``   imports a zip of submissions downloaded from a learning-management system;
- ``export``    writes ``grades.csv`` from the gradebook.

Run from the course root (where ``nbgrader_config.py`` lives): ``python -m handson.grading CMD``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from handson.grading import report
from handson.grading.autograde import autograde
from handson.grading.collect import collect_zip
from handson.grading.course import Course
from handson.grading.export import export_grades
from handson.grading.feedback import feedback
from handson.grading.release import generate_releases


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
    p.add_argument("--submission-timeout", type=float, default=None,
                   help="seconds one submission may take in all before its grading is killed "
                        "(default: the notebook timeout per notebook, plus 180)")
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
                            verbose=args.verbose, jobs=args.jobs,
                            hard_timeout=args.submission_timeout)
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
        for path in report.write(course):
            print(path.relative_to(course.root))
        return 0
    if args.cmd == "collect":
        collect_zip(course, args.assignment, args.archive.resolve(), verbose=args.verbose)
        return 0
    return 2
