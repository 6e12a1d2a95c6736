"""Stage 0, the course model: where things live and how nbgrader is configured.

A :class:`Course` names the folders of a course laid out as this repository is (``solutions/``,
``exercises/``, ``submitted/``, ``autograded/``, ``feedback/``, ``gradebook.db``);
:func:`nbgrader_config` loads the course's ``nbgrader_config.py`` for any other course root (the
autograder points it at a private copy). ``_cwd`` and ``_quiet_nbgrader`` are the two context
managers every stage wraps nbgrader in. Every other stage of :mod:`handson.grading` starts here;
this module imports none of them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# nbgrader runs `alembic` from PATH when it creates a gradebook: make this environment's tools visible.
_BIN = os.path.dirname(sys.executable)
if _BIN not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = _BIN + os.pathsep + os.environ.get("PATH", "")


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
