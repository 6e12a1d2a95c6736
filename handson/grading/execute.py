"""Stage 3, execution: a sandboxed kernel, time limits, bounded output, survival of dead kernels.

:func:`_execute_class` builds nbgrader's ``Execute`` preprocessor, hardened: a deadline for the
whole notebook besides the per-cell timeout, output capped per cell, cells after a dead kernel
marked as not run, a test cell's shown value or stderr never read as its score, and the tamper
probe of :mod:`handson.grading.integrity` after every test cell. :func:`_install_kernelspec` writes
the kernelspec that starts each kernel through :mod:`handson.grading.sandbox`;
:func:`probe_isolation` asks that launcher which isolation this machine allows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from handson.grading import integrity
from handson.grading.course import Course

KERNEL_NAME = "handson-sandbox"
#: The kernel launcher, run as ``python -m SANDBOX_MODULE -- KERNEL-COMMAND``.
SANDBOX_MODULE = "handson.grading.sandbox"
#: Bytes of output one cell may keep; the rest is replaced by a note.
MAX_CELL_OUTPUT = 200_000


def _execute_class():
    """nbgrader's Execute, hardened (built lazily so importing this module stays cheap)."""
    from nbclient.exceptions import DeadKernelError
    from nbformat.notebooknode import NotebookNode
    from nbgrader.preprocessors import Execute
    from traitlets import Float, Integer

    class SandboxedExecute(Execute):
        """Execute with a notebook deadline, bounded output and a tamper probe after each test."""

        notebook_timeout = Float(600.0, help="Seconds for the whole notebook.").tag(config=True)
        max_cell_output = Integer(MAX_CELL_OUTPUT, help="Bytes of output kept per cell.").tag(config=True)

        def preprocess(self, nb, resources=None, km=None):
            self._dead_reason = None
            self._deadline = time.monotonic() + float(self.notebook_timeout)
            self._out_bytes: dict[int, int] = {}
            self._tamper: list[str] = []
            nb, resources = super().preprocess(nb, resources, km)
            resources.setdefault("handson", {})["tamper"] = self._tamper
            resources["handson"]["dead"] = self._dead_reason
            return nb, resources

        def _fail(self, cell, ename: str, evalue: str, first: bool = False) -> None:
            err = NotebookNode(output_type="error", ename=ename, evalue=evalue,
                               traceback=[f"{ename}: {evalue}"])
            cell.outputs.insert(0 if first else len(cell.outputs), err)

        def preprocess_cell(self, cell, resources, index):
            if cell.cell_type != "code":
                return cell, resources
            if self._dead_reason:
                self._fail(cell, "NotRun", f"not run: {self._dead_reason}")
                return cell, resources
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                self._dead_reason = "the notebook ran out of time"
                self._fail(cell, "NotRun", f"not run: {self._dead_reason}")
                return cell, resources
            old_timeout = self.timeout
            self.timeout = max(1, int(min(self.timeout or remaining, remaining)))
            try:
                cell, resources = super().preprocess_cell(cell, resources, index)
            except DeadKernelError:
                self._dead_reason = ("the kernel died in an earlier cell (os._exit, a crash, or "
                                     "too much memory)")
                self._fail(cell, "DeadKernelError", "the kernel died while running this cell "
                           "(os._exit, a crash, or too much memory)")
                return cell, resources
            finally:
                self.timeout = old_timeout
            meta = cell.metadata.get("nbgrader", {})
            if meta.get("grade") and not meta.get("solution"):
                # nbgrader reads a number shown by a test cell as partial credit, before it looks
                # for errors: a test cell's value is shown, never scored.
                # Likewise it fails any test cell that wrote to stderr: a harmless warning from
                # the learner's code must not cost the points (failures are errors here).
                for out in cell.outputs:
                    if out.get("output_type") == "execute_result":
                        out["output_type"] = "display_data"
                        out.pop("execution_count", None)
                    elif out.get("output_type") == "stream" and out.get("name") == "stderr":
                        out["name"] = "stdout"
                if not self._dead_reason:
                    self._probe(cell)
            return cell, resources

        def _probe(self, cell) -> None:
            """Ask the kernel whether the test machinery is still the original one."""
            try:
                found = integrity.run_probe(self.kc, lambda mid, t: self.wait_for_reply(mid), timeout=30)
            except Exception as exc:  # noqa: BLE001
                found = [f"the integrity probe failed ({type(exc).__name__})"]
            if found:
                gid = cell.metadata["nbgrader"].get("grade_id", "?")
                self._tamper.append(f"{gid}: " + "; ".join(found))
                self._fail(cell, "TamperingDetected", first=True, evalue=(
                           "the test machinery was altered (" + "; ".join(found) + "); this test "
                           "scores 0"))

        def output(self, outs, msg, display_id, cell_index):
            size = len(json.dumps(msg.get("content", {}), default=str))
            used = self._out_bytes.get(cell_index, 0) + size
            self._out_bytes[cell_index] = used
            if msg["msg_type"] == "error":
                return super().output(outs, msg, display_id, cell_index)
            if used > self.max_cell_output:
                if used - size <= self.max_cell_output:
                    outs.append(NotebookNode(output_type="stream", name="stdout",
                                             text=f"\n[output truncated: over {self.max_cell_output} "
                                                  "bytes]\n"))
                return None
            return super().output(outs, msg, display_id, cell_index)

    return SandboxedExecute


def _install_kernelspec(folder: Path) -> None:
    spec_dir = folder / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-m", SANDBOX_MODULE, "--", sys.executable, "-m",
                 "ipykernel_launcher", "--IPKernelApp.log_level=ERROR", "-f", "{connection_file}"],
        "display_name": "Python 3 (handson sandbox)",
        "language": "python",
        "metadata": {"debugger": False},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))


def probe_isolation(course: Course) -> str:
    """The isolation level kernels get on this machine (see :mod:`handson.grading.sandbox`)."""
    env = dict(os.environ, HANDSON_SANDBOX=json.dumps({"hide": [str(course.root)]}))
    try:
        with tempfile.TemporaryDirectory(prefix="handson-probe-") as empty:  # nothing to copy in
            out = subprocess.run([sys.executable, "-m", SANDBOX_MODULE, "--probe"], env=env,
                                 cwd=empty, capture_output=True, text=True, timeout=60, check=False)
        return (out.stdout.strip().splitlines() or ["none"])[-1]
    except (OSError, subprocess.TimeoutExpired):
        return "none"
