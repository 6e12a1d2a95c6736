"""nbgrader configuration of the course. nbgrader reads ./nbgrader_config.py: run it from the repo root.

The course layout is the repository layout: sources (solutions and hidden tests) live in
solutions/<assignment>/, the generated student releases in exercises/<assignment>/.
Prefer the Makefile targets (make exercises, make autograde, make feedback): they wrap
nbgrader with isolation, timeouts and reports (see the handson/grading/ package).
"""

import os

c = get_config()  # noqa: F821 -- provided by nbgrader when it loads this file

root = os.path.abspath(os.getcwd())
c.CourseDirectory.root = root
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "exercises"
c.CourseDirectory.db_url = "sqlite:///" + os.path.join(root, "gradebook.db")
# Never copy hidden files, caches or checkpoints into a release.
c.CourseDirectory.ignore = [".*", "__pycache__", "*.pyc", ".ipynb_checkpoints", "*.egg-info"]

# Solution regions are replaced by this in the release.
c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"

# A cell that runs longer than this is interrupted and scores 0; grading continues.
c.Execute.timeout = 60
# Keep feedback small even when a submission prints a flood.
c.LimitOutput.max_lines = 200
c.LimitOutput.max_traceback = 40
