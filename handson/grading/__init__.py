"""The instructor's grading pipeline around nbgrader, one module per stage.

Nothing here is imported by what a learner's notebook runs (:mod:`handson.plot`,
:mod:`handson.checks`, :mod:`handson.data`, the book's library); the stages import one another
only downwards, in this order, with no cycle:

- :mod:`~handson.grading.course`    -- the course model (:class:`Course`) and nbgrader's config;
- :mod:`~handson.grading.release`   -- releases in ``exercises/`` generated from ``solutions/``;
- :mod:`~handson.grading.repair`    -- loading a submission, refusing or repairing it;
- :mod:`~handson.grading.integrity` -- the tamper probe run in the kernel and the static scan;
- :mod:`~handson.grading.sandbox`   -- the kernel launcher that confines a learner's code;
- :mod:`~handson.grading.execute`   -- the hardened executor and the sandboxed kernelspec;
- :mod:`~handson.grading.export`    -- ``grades.csv`` from the gradebook;
- :mod:`~handson.grading.autograde` -- grading every new or changed submission;
- :mod:`~handson.grading.feedback`  -- per-student HTML without hidden tests;
- :mod:`~handson.grading.report`    -- the class report: what the class got wrong;
- :mod:`~handson.grading.collect`   -- importing a zip of submissions from an LMS;
- :mod:`~handson.grading.cli`       -- ``python -m handson.grading CMD`` (see there for commands).

The names below are re-exported so that ``from handson import grading; grading.autograde(...)``
works. The functions :func:`autograde` and :func:`feedback` share their name with their module and
win as attributes of this package: reach the modules through ``sys.modules`` or
``importlib.import_module("handson.grading.autograde")``.

Importing this package must stay cheap (each kernel launch through the sandbox imports it):
nbformat and nbgrader are imported inside the functions that use them.
"""

from handson.grading import integrity, report
from handson.grading.autograde import (GRACE_SECONDS, MANIFEST, STUDENT_ID, TIMED_OUT, Result,
                                       autograde, default_jobs, discover, grade_submission,
                                       hard_limit)
from handson.grading.cli import main
from handson.grading.collect import collect_zip
from handson.grading.course import Course, nbgrader_config
from handson.grading.execute import KERNEL_NAME, MAX_CELL_OUTPUT, SANDBOX_MODULE, probe_isolation
from handson.grading.export import export_grades
from handson.grading.feedback import HIDDEN_BEGIN, HIDDEN_END, feedback
from handson.grading.release import ensure_gradebook, generate_releases
from handson.grading.repair import MAX_NOTEBOOK_BYTES, load_submission, repair_notebook

__all__ = [
    "GRACE_SECONDS", "HIDDEN_BEGIN", "HIDDEN_END", "KERNEL_NAME", "MANIFEST", "MAX_CELL_OUTPUT", "MAX_NOTEBOOK_BYTES",
    "SANDBOX_MODULE", "STUDENT_ID", "TIMED_OUT", "Course", "Result", "autograde", "collect_zip", "default_jobs",
    "discover", "ensure_gradebook", "export_grades", "feedback", "generate_releases",
    "grade_submission", "hard_limit", "integrity", "load_submission", "main", "nbgrader_config",
    "probe_isolation", "repair_notebook", "report",
]
