"""`make bench`: how long each chapter and each solution notebook takes, against its budget.

Runs every book/<id>.ipynb and solutions/<id>/<id>.ipynb top to bottom in a fresh kernel (nothing is
written back) and prints the wall-clock seconds next to the budget (chapter 60 s, solution 30 s on
2 CPU cores). It measures; it asserts nothing, so a loaded machine cannot make a test fail.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = {"chapter": 60.0, "solution": 30.0}


def seconds(path: Path, cwd: Path) -> float:
    nb = nbformat.read(str(path), 4)
    t0 = time.monotonic()
    NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(cwd)}}).execute()
    return time.monotonic() - t0


def main() -> int:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, paths in [("chapter", sorted((ROOT / "book").glob("*.ipynb"))),
                            ("solution", sorted((ROOT / "solutions").glob("*/*.ipynb")))]:
            for p in paths:
                s = seconds(p, p.parent if kind == "chapter" else Path(tmp))
                rows.append((kind, p.relative_to(ROOT), s))
                print(f"{kind:8}  {str(p.relative_to(ROOT)):58} {s:6.1f} s  (budget {BUDGETS[kind]:.0f} s)"
                      + ("  OVER BUDGET" if s > BUDGETS[kind] else ""), flush=True)
    over = [r for r in rows if r[2] > BUDGETS[r[0]]]
    print(f"{len(rows)} notebooks, {len(over)} over budget")
    return 0


if __name__ == "__main__":
    sys.exit(main())
