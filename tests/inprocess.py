"""Grade many submissions of one assignment in one Python process: the catalog's fast path.

nbgrader starts one kernel per submission (a few seconds each, most of it importing torch). To prove
a catalog of dozens of submissions per assignment, this runs the assignment's cells the way the
autograder scores them -- answer cells from the submission, test cells from the source notebook
(hidden tests included, as nbgrader restores them from the gradebook) -- each submission in a fresh
namespace, all in one process. A test cell scores its points when it runs without an exception and
0 otherwise, which is nbgrader's rule for this course (see handson.grading: a displayed value or
stderr never decides a score). tests/test_autograde.py checks that both paths agree.

    python tests/inprocess.py <assignment> <submissions.json>   ->  JSON results on stdout

where submissions.json maps a submission name to {grade_id: answer source}. A name may also appear
in its "__stop_after__" entry, {name: [test grade ids]}: that submission (a cataloged bug) stops
once those test cells have run and one test cell has failed, since the proof asks of a bug only
where it fails first and whether the cells meant to catch it do; the results then hold the cells
that ran.
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import sys
import traceback
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
CELL_TIMEOUT = 60


def source_cells(assignment: str) -> list[dict]:
    """The source notebook's code cells in order: grade id, source, points (0 for non-test cells)."""
    path = sorted((ROOT / "solutions" / assignment).glob("*.ipynb"))[0]
    nb = nbformat.read(str(path), 4)
    cells = []
    for c in nb.cells:
        if c.cell_type != "code":
            continue
        meta = c.metadata.get("nbgrader", {})
        cells.append({"grade_id": meta.get("grade_id"), "source": c.source,
                      "answer": bool(meta.get("solution")),
                      "points": float(meta.get("points", 0)) if meta.get("grade") else None})
    return cells


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}".strip()


class _CellTimeout(Exception):
    pass


def _alarm(signum, frame):  # pragma: no cover - only when a cell hangs
    raise _CellTimeout(f"the cell ran longer than {CELL_TIMEOUT} s")


def _reset_torch() -> None:
    import torch

    torch.set_default_dtype(torch.float32)
    torch.set_grad_enabled(True)
    torch.autograd.set_detect_anomaly(False)
    torch.manual_seed(0)


def grade(cells: list[dict], answers: dict[str, str],
          stop_after: list[str] | None = None) -> dict[str, dict]:
    """Run one submission; return {test grade id: {"score", "max", "error"}} in notebook order.

    With ``stop_after`` (test grade ids), stop once all of them have run and a test has failed.
    """
    _reset_torch()
    ns: dict = {"__name__": "__main__"}
    results: dict[str, dict] = {}
    waiting = set(stop_after or ())
    signal.signal(signal.SIGALRM, _alarm)
    for c in cells:
        if stop_after is not None and not waiting and any(r["error"] for r in results.values()):
            break
        src = answers.get(c["grade_id"], c["source"]) if c["answer"] else c["source"]
        error = None
        signal.alarm(CELL_TIMEOUT)
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                exec(compile(src, f"<cell {c['grade_id']}>", "exec"), ns)  # noqa: S102 - our own catalog
        except BaseException as e:  # noqa: BLE001 - a test cell fails on any exception, as in nbgrader
            if isinstance(e, KeyboardInterrupt):
                raise
            error = _first_line(e)
            if c["points"] is None and not c["answer"]:
                # a locked non-test cell (the imports) failing is a broken course, not a bug
                raise RuntimeError(f"cell {c['grade_id']} failed: {error}\n{traceback.format_exc()}")
        finally:
            signal.alarm(0)
        if c["points"] is not None:
            results[c["grade_id"]] = {"score": 0.0 if error else c["points"], "max": c["points"],
                                      "error": error}
            waiting.discard(c["grade_id"])
    return results


def main(argv: list[str]) -> int:
    import torch

    torch.set_num_threads(1)  # several assignments are graded side by side, one core each
    assignment, subs_path = argv
    submissions = json.loads(Path(subs_path).read_text())
    stop_after = submissions.pop("__stop_after__", {})
    cells = source_cells(assignment)
    out = {name: grade(cells, answers, stop_after.get(name)) for name, answers in submissions.items()}
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
