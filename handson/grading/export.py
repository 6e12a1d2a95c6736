"""Grade export: the gradebook written as ``grades.csv`` (nbgrader's columns).

Run after every autograde and on its own by ``python -m handson.grading export``.
"""

from __future__ import annotations

import os
from pathlib import Path

from handson.grading.course import Course, _quiet_nbgrader


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
