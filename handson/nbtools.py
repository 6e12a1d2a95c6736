"""Maintainer tools for the chapters: run them with clean outputs, and build the book's library.

``python -m handson.nbtools run book/<id>.ipynb [...]``
    runs each notebook top to bottom in its own folder, keeps the outputs (cells tagged
    ``raises-exception`` may fail), drops per-cell timing metadata and resets the notebook metadata
    to the plain Python 3 kernelspec, so that the stored notebook diffs cleanly and ``nbval`` can
    reproduce it. The library is rewritten from the chapters first, so a chapter always runs against
    the library of the chapters before it, and afterwards from the chapter just run.

``python -m handson.nbtools library [--check]``
    writes the book's library: the cells of ``book/<id>.ipynb`` tagged ``export`` become the module
    ``handson/nn/<id>.py`` (in the chapter's order, after a fixed import header). With ``--check`` it
    writes nothing and exits 1 when a module differs from its chapter (``make test`` runs this).
"""

from __future__ import annotations

import ast
import sys
import time
from pathlib import Path

import nbformat

KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
LIBRARY = Path(__file__).resolve().parent / "nn"
EXPORT_TAG = "export"

#: Every library module starts with these imports; export cells may add their own (e.g. from an
#: earlier chapter's module), but never IPython magics or shell escapes.
HEADER_IMPORTS = """\
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
"""


class ExportError(ValueError):
    """An export cell that cannot become library code."""


def clean(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}}
    for c in nb.cells:
        c.metadata.pop("execution", None)
        c.metadata.pop("lines_to_next_cell", None)
    return nb


def export_cells(nb: nbformat.NotebookNode) -> list[str]:
    """The sources of the cells tagged ``export``, in order."""
    return [c.source.strip("\n") for c in nb.cells
            if c.cell_type == "code" and EXPORT_TAG in c.metadata.get("tags", [])]


def _check_cell(src: str, where: str) -> list[str]:
    """Validate one export cell; return the public names it defines."""
    for line in src.splitlines():
        if line.lstrip().startswith(("%", "!")):
            raise ExportError(f"{where}: an export cell holds an IPython magic or shell line: {line!r}")
    try:
        tree = ast.parse(src)
    except SyntaxError as e:
        raise ExportError(f"{where}: an export cell is not valid Python: {e}") from None
    names = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        elif isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets):
            names += [t.id for t in node.targets]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.append(node.target.id)
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring-like string
        else:
            raise ExportError(f"{where}: an export cell may only define functions, classes and "
                              f"constants (line {node.lineno} runs code: {ast.unparse(node)[:60]!r}); "
                              "move the demonstration into the next cell")
    return [n for n in names if not n.startswith("_")]


def _title(nb: nbformat.NotebookNode) -> str:
    for c in nb.cells:
        if c.cell_type == "markdown":
            for line in c.source.splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return ""


def module_source(chapter: Path) -> str | None:
    """The library module generated from one chapter, or None when it exports nothing."""
    nb = nbformat.read(str(chapter), 4)
    cells = export_cells(nb)
    if not cells:
        return None
    rel = chapter.relative_to(ROOT) if chapter.is_relative_to(ROOT) else chapter
    names: list[str] = []
    for i, src in enumerate(cells):
        names += _check_cell(src, f"{rel} (export cell {i + 1})")
    title = _title(nb) or chapter.stem
    doc = (f'"""The book\'s library, chapter "{title}".\n\n'
           f"Generated from {rel.as_posix()} (the cells tagged `{EXPORT_TAG}`) by `make library`:\n"
           "edit the chapter, not this file; `make test` fails when the two disagree.\n"
           '"""\n')
    all_line = "__all__ = [" + ", ".join(repr(n) for n in names) + "]\n"
    body = "\n\n\n".join(cells)
    return f"{doc}\n{HEADER_IMPORTS}\n{all_line}\n\n{body}\n"


def chapters() -> list[Path]:
    return sorted(BOOK.glob("*.ipynb"))


def library(check: bool = False, only: list[Path] | None = None) -> list[str]:
    """Write (or with ``check``, compare) the library modules; return the stale or written paths."""
    changed = []
    for chapter in only or chapters():
        src = module_source(chapter)
        target = LIBRARY / f"{chapter.stem}.py"
        current = target.read_text() if target.exists() else None
        if src == current:
            continue
        if src is None and current is not None and not current.startswith('"""The book\'s library'):
            continue  # a hand-written module of the same name: not ours to delete
        changed.append(str(target.relative_to(ROOT)))
        if check:
            continue
        if src is None:
            target.unlink()
        else:
            target.write_text(src)
    return changed


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
    if argv[:1] == ["library"]:
        check = "--check" in argv[1:]
        try:
            changed = library(check=check)
        except ExportError as e:
            print(f"library: {e}")
            return 1
        if check and changed:
            print("the library differs from the chapters' export cells: run `make library` and "
                  "commit the result:\n  " + "\n  ".join(changed))
            return 1
        for p in changed:
            print(f"wrote {p}")
        return 0
    if len(argv) < 2 or argv[0] != "run":
        print(__doc__)
        return 2
    for p in argv[1:]:
        for chapter in chapters():  # the modules this chapter may import, each from its own chapter
            try:
                library(only=[chapter])
            except ExportError as e:
                print(f"library: {chapter.name} not exported ({e})")
        print(f"{p}: {run(Path(p)):.1f} s")
        for q in library(only=[Path(p).resolve()]):
            print(f"wrote {q}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
