"""Importing a zip downloaded from a learning-management system (nbgrader zip_collect)."""

from __future__ import annotations

import zipfile

import nbformat

from handson import grading
from support import make_course, submission


def test_zip_from_an_lms_is_imported(tmp_path):
    course = make_course(tmp_path / "course", ["self_attention"])
    nb = nbformat.writes(submission("self_attention"))
    archive = tmp_path / "download.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("alice_12345_67890_self_attention.ipynb", nb)          # Canvas style
        z.writestr("bob.smith_assignsubmission_file_self_attention.ipynb", nb)  # Moodle style
        z.writestr("notes.txt", "not a notebook")
    imported = grading.collect_zip(grading.Course(course), "self_attention", archive)
    assert imported == ["alice", "bob.smith"]
    for s in imported:
        assert (course / "submitted" / s / "self_attention" / "self_attention.ipynb").exists()
