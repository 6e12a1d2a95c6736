"""Stage 2, loading and repair of a submission: what is handed in, made gradable or refused.

:func:`load_submission` finds the submitted notebook (also under another name), refuses what cannot
be graded (missing, empty, a link, too large, not a notebook, not this assignment's) with the
reason, and hands the rest to :func:`repair_notebook`, which rebuilds it on the release's skeleton:
stripped grading metadata and deleted test or locked cells are put back, the learner's own cells
are kept. Pure notebook surgery: no kernel, no nbgrader.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import nbformat

#: Largest notebook file accepted for grading.
MAX_NOTEBOOK_BYTES = 20 << 20


def _grade_ids(nb: nbformat.NotebookNode) -> list[str]:
    return [c.metadata.get("nbgrader", {}).get("grade_id") for c in nb.cells
            if c.metadata.get("nbgrader", {}).get("grade_id")]


def _norm(src: str) -> str:
    return "\n".join(line.rstrip() for line in src.strip().splitlines())


def repair_notebook(submitted: nbformat.NotebookNode, release: nbformat.NotebookNode
                    ) -> tuple[nbformat.NotebookNode, list[str]]:
    """Rebuild a damaged submission on the release's skeleton; return it with notes.

    - cells whose nbgrader metadata was stripped get it back (matched by their unchanged source,
      or, for an answer cell, by its position between recognised cells);
    - grade and locked cells that were deleted are put back where the release has them (the
      autograder then restores their source from the gradebook and grades them);
    - cells the learner added are kept; the kernelspec is the release's.
    """
    import nbformat

    notes: list[str] = []
    rel_cells = release.cells
    rel_ids = [c.metadata.get("nbgrader", {}).get("grade_id") for c in rel_cells]
    rel_by_id = {g: c for g, c in zip(rel_ids, rel_cells) if g}
    rel_by_source = {}
    for c in rel_cells:
        g = c.metadata.get("nbgrader", {}).get("grade_id")
        if g:
            rel_by_source.setdefault((c.cell_type, _norm(c.source)), g)

    cells = [nbformat.from_dict(dict(c)) for c in submitted.cells]
    ids: list[str | None] = []
    seen: set[str] = set()
    for c in cells:
        g = c.metadata.get("nbgrader", {}).get("grade_id")
        if g in rel_by_id and g not in seen:
            ids.append(g)
            seen.add(g)
            continue
        if g and g not in rel_by_id:
            c.metadata.pop("nbgrader", None)  # an id the assignment does not know: plain cell
        if g in seen:
            c.metadata.pop("nbgrader", None)  # a duplicated graded cell: keep as a plain cell
            notes.append(f"cell {g!r} appeared twice; the copy is not graded")
            ids.append(None)
            continue
        match = rel_by_source.get((c.cell_type, _norm(c.source)))
        if match and match not in seen:
            c.metadata["nbgrader"] = json.loads(json.dumps(rel_by_id[match].metadata["nbgrader"]))
            ids.append(match)
            seen.add(match)
            notes.append(f"cell {match!r} had lost its grading metadata; restored")
        else:
            ids.append(None)

    # Answer cells with stripped metadata: the first unclaimed code cell between the anchors.
    order = [g for g in rel_ids if g]
    for g in order:
        if g in seen or not rel_by_id[g].metadata["nbgrader"].get("solution"):
            continue
        lo, hi = _anchor_window(ids, order, g)
        for i in range(lo, hi):
            if ids[i] is None and cells[i].cell_type == rel_by_id[g].cell_type and cells[i].source.strip():
                cells[i].metadata["nbgrader"] = json.loads(json.dumps(rel_by_id[g].metadata["nbgrader"]))
                ids[i] = g
                seen.add(g)
                notes.append(f"answer cell {g!r} had lost its grading metadata; restored by position")
                break

    # Put back graded/locked cells that are missing.
    for g in order:
        if g in seen:
            continue
        meta = rel_by_id[g].metadata["nbgrader"]
        lo, _ = _anchor_window(ids, order, g)
        cell = nbformat.from_dict(json.loads(json.dumps(dict(rel_by_id[g]))))
        cells.insert(lo, cell)
        ids.insert(lo, g)
        seen.add(g)
        kind = "test cell" if meta.get("grade") and not meta.get("solution") else "cell"
        notes.append(f"{kind} {g!r} was missing and was restored")

    nb = nbformat.v4.new_notebook()
    nb.metadata = json.loads(json.dumps(dict(release.metadata)))
    nb.cells = cells
    used: set[str] = set()
    for i, c in enumerate(nb.cells):
        if c.cell_type == "code":
            c.setdefault("outputs", [])
            c.setdefault("execution_count", None)
        cid = str(c.get("id") or "")
        if not re.fullmatch(r"[a-zA-Z0-9-_]{1,64}", cid) or cid in used:
            cid = f"cell-{i}-{hashlib.sha1(c.source.encode()).hexdigest()[:8]}"
        c["id"] = cid
        used.add(cid)
    nb.nbformat, nb.nbformat_minor = 4, 5
    return nbformat.from_dict(json.loads(json.dumps(nb))), notes


def _anchor_window(ids: list[str | None], order: list[str], g: str) -> tuple[int, int]:
    """Index range in ``ids`` between the nearest recognised cells before and after ``g``."""
    k = order.index(g)
    before = [x for x in order[:k] if x in ids]
    after = [x for x in order[k + 1:] if x in ids]
    lo = ids.index(before[-1]) + 1 if before else 0
    hi = ids.index(after[0]) if after else len(ids)
    return lo, max(lo, hi)


def load_submission(folder: Path, expected: str, release: nbformat.NotebookNode
                    ) -> tuple[nbformat.NotebookNode | None, list[str]]:
    """Find, read and repair the submitted notebook; None (with the reason) if it can't be graded."""
    import nbformat

    notes: list[str] = []
    path = folder / expected
    if not path.exists():
        others = sorted(p for p in folder.glob("*.ipynb") if not p.name.startswith("."))
        if len(others) == 1:
            notes.append(f"notebook submitted as {others[0].name!r}, graded as {expected!r}")
            path = others[0]
        elif not others:
            return None, notes + [f"no notebook {expected!r} in the submission"]
        else:
            return None, notes + [f"{expected!r} is missing and {len(others)} other notebooks were "
                                  "submitted; cannot tell which one to grade"]
    if path.is_symlink() or not path.is_file():
        return None, notes + [f"{path.name!r} is not a regular file"]
    if path.stat().st_size == 0:
        return None, notes + [f"{path.name!r} is empty"]
    if path.stat().st_size > MAX_NOTEBOOK_BYTES:
        return None, notes + [f"{path.name!r} is larger than {MAX_NOTEBOOK_BYTES >> 20} MiB"]
    try:
        nb = nbformat.read(str(path), as_version=4)
    except Exception as exc:  # noqa: BLE001 -- any parse failure makes it ungradable
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        return None, notes + [f"{path.name!r} is not a valid notebook ({reason})"]
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        return None, notes + [f"{path.name!r} is not a valid notebook (no cells)"]
    rel_ids = set(_grade_ids(release))
    sub_ids = set(_grade_ids(nb))
    rel_sources = {_norm(c.source) for c in release.cells if c.cell_type == "code" and
                   c.metadata.get("nbgrader", {}).get("grade")}
    sub_sources = {_norm(c.get("source", "")) for c in nb.cells if c.get("cell_type") == "code"}
    if not (rel_ids & sub_ids) and not (rel_sources & sub_sources):
        return None, notes + ["the notebook does not belong to this assignment (none of its cells "
                              "match the release)"]
    repaired, more = repair_notebook(nb, release)
    return repaired, notes + more
