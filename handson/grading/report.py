"""The class report: what the class got wrong, at a glance.

``python -m handson.grading report`` (``make report``) reads the gradebook and the autograded
notebooks and writes ``reports/report.md``, ``reports/report.html`` and one PNG per assignment:
per test cell, how many students lost points, and the most common failure messages (numbers in the
messages are folded so that the same mistake groups together).
"""

from __future__ import annotations

import html
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from handson.grading.course import Course

_FLOAT = re.compile(r"(?<![\w.])[-+]?(?:\d+\.\d+(?:e[-+]?\d+)?|\d+e[-+]?\d+)")
_TUPLE = re.compile(r"\((?:\s*-?\d+\s*,)+\s*-?\d+\s*\)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class CellStats:
    grade_id: str
    max_score: float
    students: int = 0
    lost: int = 0
    messages: Counter = field(default_factory=Counter)


@dataclass
class AssignmentStats:
    name: str
    max_score: float = 0.0
    scores: dict[str, float] = field(default_factory=dict)
    cells: dict[str, CellStats] = field(default_factory=dict)


def fold(message: str) -> str:
    """A failure message on one line, with measured values (floats, index tuples) folded."""
    text = _ANSI.sub("", message).strip().splitlines()[0] if message.strip() else "(no message)"
    return _FLOAT.sub("N", _TUPLE.sub("(…)", text))[:240]


def _messages(nb_path: Path) -> dict[str, str]:
    """grade_id -> the failure message of each failing test cell in an autograded notebook."""
    import nbformat

    out: dict[str, str] = {}
    try:
        nb = nbformat.read(str(nb_path), 4)
    except Exception:  # noqa: BLE001 -- a missing or damaged file only loses its messages
        return out
    for c in nb.cells:
        gid = c.metadata.get("nbgrader", {}).get("grade_id")
        if not gid:
            continue
        for o in c.get("outputs", []):
            if o.get("output_type") == "error":
                out[gid] = f"{o.get('ename', 'Error')}: {o.get('evalue', '')}"
    return out


def collect(course: Course) -> list[AssignmentStats]:
    from nbgrader.api import Gradebook

    stats: list[AssignmentStats] = []
    with Gradebook(course.db_url) as gb:
        for assignment in gb.assignments:
            a = AssignmentStats(assignment.name, float(assignment.max_score))
            for nb in assignment.notebooks:
                for gc in nb.grade_cells:
                    a.cells[gc.name] = CellStats(gc.name, float(gc.max_score))
            for sub in assignment.submissions:
                student = sub.student.id
                a.scores[student] = float(sub.score)
                for nb in sub.notebooks:
                    msgs = _messages(course.autograded / student / assignment.name / f"{nb.name}.ipynb")
                    for g in nb.grades:
                        cs = a.cells.get(g.name)
                        if cs is None:
                            continue
                        cs.students += 1
                        if float(g.score) < float(g.max_score):
                            cs.lost += 1
                            cs.messages[fold(msgs.get(g.name, "(no output)"))] += 1
            stats.append(a)
    return stats


def _plot(a: AssignmentStats, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(a.cells.values())
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * max(len(cells), 4) + 1.4),
                             gridspec_kw={"width_ratios": [3, 2]}, layout="constrained")
    names = [c.grade_id for c in cells]
    frac = [c.lost / c.students if c.students else 0 for c in cells]
    ax = axes[0]
    bars = ax.barh(names, frac, color="#c0504d")
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel("fraction of students who lost points")
    ax.set_title(f"{a.name}: test cells")
    for bar, c in zip(bars, cells):
        ax.text(min(bar.get_width() + 0.01, 0.9), bar.get_y() + bar.get_height() / 2,
                f"{c.lost}/{c.students}", va="center", fontsize=8)
    ax = axes[1]
    scores = list(a.scores.values())
    ax.hist(scores, bins=min(10, max(1, len(set(scores)))), range=(0, a.max_score or 1), color="#4f81bd")
    ax.set_xlabel(f"score (out of {a.max_score:g})")
    ax.set_ylabel("students")
    ax.set_title("score distribution")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(course: Course, out_dir: Path | None = None, top: int = 3) -> list[Path]:
    """Write the Markdown and HTML report and one PNG per assignment; return the paths."""
    out_dir = out_dir or course.root / "reports"
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = collect(course)
    md = ["# Class report", ""]
    body = ["<h1>Class report</h1>"]
    written: list[Path] = []
    if not any(a.scores for a in stats):
        md.append("No graded submissions yet: run `make autograde` first.")
        body.append("<p>No graded submissions yet: run <code>make autograde</code> first.</p>")
    for a in stats:
        if not a.scores:
            continue
        png = out_dir / f"{a.name}.png"
        _plot(a, png)
        written.append(png)
        mean = sum(a.scores.values()) / len(a.scores)
        full = sum(1 for s in a.scores.values() if s >= a.max_score)
        md += [f"## {a.name}", "",
               f"{len(a.scores)} submissions, mean {mean:.1f} / {a.max_score:g}, {full} with full marks.",
               "", f"![{a.name}]({png.name})", "",
               "| test cell | points | lost points | most common failures |", "|---|---|---|---|"]
        body += [f"<h2>{html.escape(a.name)}</h2>",
                 f"<p>{len(a.scores)} submissions, mean {mean:.1f} / {a.max_score:g}, {full} with full "
                 "marks.</p>", f'<img src="{html.escape(png.name)}" alt="{html.escape(a.name)}">',
                 "<table><tr><th>test cell</th><th>points</th><th>lost points</th>"
                 "<th>most common failures</th></tr>"]
        for c in sorted(a.cells.values(), key=lambda c: -c.lost):
            common = c.messages.most_common(top)
            md_msgs = "<br>".join(f"{n}× {m.replace('|', '/')}" for m, n in common) or "—"
            md.append(f"| {c.grade_id} | {c.max_score:g} | {c.lost}/{c.students} | {md_msgs} |")
            html_msgs = "<br>".join(f"{n}× {html.escape(m)}" for m, n in common) or "&mdash;"
            body.append(f"<tr><td>{html.escape(c.grade_id)}</td><td>{c.max_score:g}</td>"
                        f"<td>{c.lost}/{c.students}</td><td>{html_msgs}</td></tr>")
        md.append("")
        body.append("</table>")
    md_path = out_dir / "report.md"
    md_path.write_text("\n".join(md) + "\n")
    html_path = out_dir / "report.html"
    html_path.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>Class report</title><style>"
        "body{font-family:sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3rem .5rem;"
        "vertical-align:top;text-align:left}img{max-width:100%}</style></head><body>"
        + "\n".join(body) + "</body></html>\n")
    return [md_path, html_path] + written
