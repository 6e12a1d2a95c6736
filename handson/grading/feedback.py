"""Stage 5, feedback: per-student HTML in ``feedback/``, without hidden-test code.

:func:`feedback` runs nbgrader's ``generate_feedback`` on every autograded submission with one
preprocessor added before ``ClearHiddenTests``: it drops the frames of hidden-test cells from
tracebacks (keeping the message), so that no hidden test is shown, not even in an error.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path

from handson.grading.course import Course, _cwd, _quiet_nbgrader, nbgrader_config

HIDDEN_BEGIN = "### BEGIN HIDDEN TESTS"
HIDDEN_END = "### END HIDDEN TESTS"


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
