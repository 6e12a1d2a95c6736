"""The grading pipeline is a package of stages with no import cycle, kept apart from the learner's side.

Each check runs in a fresh interpreter, so that nothing imported by another test hides a cycle or a
dependency.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from support import ROOT

PACKAGE = ROOT / "handson" / "grading"
STAGES = sorted(p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("__"))
LEARNER_FACING = ["handson.plot", "handson.checks", "handson.data", "handson.nn"]
#: Names callers (tests, the Makefile's commands, the report) use as ``grading.NAME``.
PUBLIC = ["Course", "Result", "STUDENT_ID", "autograde", "collect_zip", "ensure_gradebook",
          "export_grades", "feedback", "generate_releases", "grade_submission", "load_submission",
          "main", "nbgrader_config", "probe_isolation", "repair_notebook"]


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MPLBACKEND="Agg")
    return subprocess.run([sys.executable, *args, "-c", code] if code else [sys.executable, *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)


def _internal_imports(path: Path) -> set[str]:
    """Stages of the package that ``path`` imports anywhere (module level, functions, TYPE_CHECKING)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the package
                base = "handson.grading" + ("." + base if base else "")
            # ``from handson.grading import integrity`` names a stage; ``... import Course`` needs
            # the package's __init__ to have run, i.e. a cycle
            names = [f"{base}.{a.name}" if base == "handson.grading" and a.name in STAGES else base
                     for a in node.names]
        else:
            continue
        for name in names:
            if name == "handson.grading":
                found.add("__init__")
            elif name.startswith("handson.grading."):
                found.add(name.split(".")[2])
    return found


def test_the_old_module_is_gone():
    assert not (ROOT / "handson" / "grading.py").exists()
    for old in ("sandbox", "integrity", "report"):
        assert not (ROOT / "handson" / f"{old}.py").exists(), f"handson/{old}.py moved into the package"


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_imports_on_its_own(stage):
    out = _python(f"import handson.grading.{stage}")
    assert out.returncode == 0, out.stderr


def test_stages_import_each_other_only_downwards():
    """The package docstring lists the stages in order; each imports only stages listed before it."""
    import handson.grading

    order = re.findall(r":mod:`~handson\.grading\.(\w+)`", handson.grading.__doc__)
    assert sorted(order) == STAGES, "the package docstring must list every stage once"
    for i, stage in enumerate(order):
        deps = _internal_imports(PACKAGE / f"{stage}.py")
        assert "__init__" not in deps, f"{stage} imports the package itself (a cycle through __init__)"
        later = deps - set(order[:i])
        assert not later, f"{stage} imports {sorted(later)}, listed after it: a possible cycle"


def test_the_package_reexports_what_callers_use():
    out = _python("import json, inspect, handson.grading as g\n"
                  f"print(json.dumps({{n: inspect.isfunction(getattr(g, n)) for n in {PUBLIC!r}}}))")
    assert out.returncode == 0, out.stderr
    functions = json.loads(out.stdout)
    assert functions["autograde"] and functions["feedback"], \
        "grading.autograde and grading.feedback must be the functions, not their modules"
    assert not functions["Course"]


@pytest.mark.parametrize("module", LEARNER_FACING)
def test_learner_facing_modules_import_nothing_of_the_grading(module):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} does not exist (yet)")
    out = _python(f"import sys, {module}\n"
                  "print([m for m in sys.modules if m == 'handson.grading' or "
                  "m.startswith(('handson.grading.', 'nbgrader'))])")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"{module} pulls in {out.stdout.strip()}"


def test_the_kernel_launcher_is_cheap_and_run_by_its_module_path(tmp_path):
    """Every kernel starts through the sandbox: its import must not load the pipeline's heavy parts."""
    from handson.grading import execute

    assert importlib.util.find_spec(execute.SANDBOX_MODULE) is not None
    execute._install_kernelspec(tmp_path)
    argv = json.loads((tmp_path / "kernels" / execute.KERNEL_NAME / "kernel.json").read_text())["argv"]
    assert argv[1:4] == ["-m", execute.SANDBOX_MODULE, "--"]

    out = _python("import sys, handson.grading.sandbox\n"
                  "print([m for m in sys.modules if m.split('.')[0] in "
                  "('nbformat', 'nbgrader', 'nbclient', 'torch', 'matplotlib')])")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
    # run as the kernelspec does; the package must not have imported the launcher already
    out = _python("", "-W", "error::RuntimeWarning", "-m", execute.SANDBOX_MODULE)
    assert "usage: python -m handson.grading.sandbox" in out.stderr
    assert "RuntimeWarning" not in out.stderr, out.stderr


def test_the_command_line_runs_as_a_module():
    out = _python("", "-m", "handson.grading", "--help")
    assert out.returncode == 0, out.stderr
    for cmd in ("release", "autograde", "feedback", "report", "collect", "export"):
        assert cmd in out.stdout
