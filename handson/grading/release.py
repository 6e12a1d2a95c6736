"""Stage 1, releases: the student notebooks of ``exercises/`` generated from ``solutions/``.

:func:`generate_releases` runs nbgrader's ``generate_assignment`` for each assignment (which also
records its notebooks, cells, points and hidden tests in the gradebook); :func:`ensure_gradebook`
does the same into a scratch folder for assignments the gradebook does not know yet, so that
grading never touches ``exercises/``.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from handson.grading.course import Course, _cwd, _quiet_nbgrader, nbgrader_config


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
