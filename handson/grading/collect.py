"""LMS import: a zip of submissions downloaded from a learning-management system.

:func:`collect_zip` copies the archive (notebooks named ``<student>_..._<notebook>.ipynb``, as
Moodle or Canvas name them) under ``downloaded/<assignment>/archive/`` and runs nbgrader's
``zip_collect`` to sort it into ``submitted/<student>/<assignment>/``, ready for autograding.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from handson.grading.course import Course


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
