"""Maintainer tool: execute a chapter notebook in place and store clean, reproducible outputs.

``python -m handson.nbtools run book/<id>.ipynb [...]`` runs each notebook top to bottom in its own
folder, keeps the outputs (cells tagged ``raises-exception`` may fail), drops per-cell timing
metadata and resets the notebook metadata to the plain Python 3 kernelspec, so that the stored
notebook diffs cleanly and ``nbval`` can reproduce it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat

KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


def clean(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}}
    for c in nb.cells:
        c.metadata.pop("execution", None)
        c.metadata.pop("lines_to_next_cell", None)
    return nb


def run(path: Path, timeout: int = 300) -> float:
    """Execute ``path`` in place; return the seconds it took. Raises on an unexpected error."""
    from nbclient import NotebookClient

    nb = nbformat.read(str(path), 4)
    clean(nb)
    t0 = time.monotonic()
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent.resolve())}}).execute()
    seconds = time.monotonic() - t0
    nbformat.write(clean(nb), str(path))
    return seconds


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[0] != "run":
        print(__doc__)
        return 2
    for p in argv[1:]:
        print(f"{p}: {run(Path(p)):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
