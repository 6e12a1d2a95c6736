"""Detecting tampering with the test machinery of an autograded notebook.

Two complementary checks, both run by the autograder (:mod:`handson.grading.execute` and
:mod:`handson.grading.autograde`):

- **A probe in the kernel**, after every test cell: it fingerprints the functions the tests rely
  on (``torch.allclose``, ``torch.testing.assert_close``, every ``handson.checks`` function, the
  builtins used by tests, ...) and the grader compares the fingerprints with those taken in a
  clean interpreter. A submission that replaced one of them has that test scored 0.
- **A static scan** of the learner's cells for code that reaches into the test machinery or the
  file system (assigning to attributes of ``torch`` or ``handson``, ``builtins``, ``sys.modules``,
  ``ctypes``, paths such as ``gradebook.db``). Findings are reported to the instructor.

No in-process check can be complete against code that runs in the same interpreter; these catch
the plausible ways and say which one was used. The kernel's file-system isolation
(:mod:`handson.grading.sandbox`) is what keeps solutions and the gradebook out of reach.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

#: Objects the tests rely on, as ``module:attribute.path``.
WATCHED = [
    "torch:allclose", "torch:equal", "torch:isfinite", "torch:isnan", "torch:randn", "torch:rand",
    "torch:ones", "torch:zeros", "torch:empty", "torch:broadcast_to", "torch:softmax", "torch:cat",
    "torch:manual_seed", "torch:nan_to_num", "torch:tensor", "torch:Tensor",
    "torch:Tensor.backward", "torch:Tensor.__eq__", "torch:Tensor.__ne__", "torch:Tensor.abs",
    "torch:Tensor.max", "torch:Tensor.any", "torch:Tensor.all", "torch:Tensor.sum",
    "torch:Tensor.detach", "torch:Tensor.clone", "torch:Tensor.__bool__", "torch:Tensor.__float__",
    "torch:Tensor.__getitem__", "torch:Tensor.requires_grad_", "torch:Tensor.__torch_function__",
    "torch.autograd:backward", "torch.testing:assert_close",
    "torch.nn.functional:scaled_dot_product_attention", "torch.nn.functional:softmax",
    "torch.nn:Linear", "torch.nn:Linear.forward", "torch.nn:MultiheadAttention",
    "torch.nn:MultiheadAttention.forward", "torch.nn:Module.__call__", "torch.nn:Module._call_impl",
    "torch.nn.functional:multi_head_attention_forward",
    "builtins:isinstance", "builtins:len", "builtins:float", "builtins:int", "builtins:abs",
    "builtins:any", "builtins:all", "builtins:getattr", "builtins:tuple", "builtins:range",
    "builtins:type", "builtins:print", "builtins:AssertionError", "builtins:Exception",
    "builtins:zip", "builtins:dict", "builtins:list", "builtins:str", "builtins:max", "builtins:min",
    "builtins:__import__", "builtins:repr",
]
def _exercise_check_modules() -> list[str]:
    """``handson.exercise_checks.<assignment>`` for every module of that package (none imported)."""
    import pkgutil
    from pathlib import Path
    pkg = Path(__file__).resolve().parents[1] / "exercise_checks"
    return sorted(f"handson.exercise_checks.{m.name}" for m in pkgutil.iter_modules([str(pkg)]))


#: Modules whose every function (public or private) is watched.
WATCHED_MODULES = ["handson.checks", *_exercise_check_modules()]

PROBE_SOURCE = r'''
def __handson_probe(watched, modules):
    import sys as _s, os as _o
    roots = {}
    for name in ("torch", "handson", "os"):
        m = _s.modules.get(name)
        if m is not None and getattr(m, "__file__", None):
            roots[name] = _o.path.dirname(_o.path.realpath(m.__file__))
    def origin(filename):
        real = _o.path.realpath(filename)
        for name, root in roots.items():
            if real.startswith(root + _o.sep):
                return "stdlib" if name == "os" else name
        return "foreign:" + filename
    def fp(o, exact):
        code = getattr(o, "__code__", None) or getattr(getattr(o, "__func__", None), "__code__", None)
        if code is not None:
            if exact:
                return "code:%s:%s" % (origin(code.co_filename), code.co_code.hex())
            return "code:%s" % origin(code.co_filename)
        if isinstance(o, type):
            return "type:%s.%s" % (o.__module__, o.__qualname__)
        return "obj:%s:%s:%s" % (type(o).__module__, type(o).__qualname__,
                                 getattr(o, "__qualname__", getattr(o, "__name__", "?")))
    out = {}
    for item in watched:
        mod, _, path = item.partition(":")
        m = _s.modules.get(mod)
        if m is None:
            continue
        o = m
        try:
            for part in path.split("."):
                o = o.__dict__[part] if isinstance(o, type) and part in o.__dict__ else getattr(o, part)
            out[item] = fp(o, False)
        except Exception as e:
            out[item] = "missing:%s" % type(e).__name__
    for mod in modules:
        m = _s.modules.get(mod)
        if m is None:
            continue
        names = set(getattr(m, "__all__", [])) | {n for n, o in list(vars(m).items())
                                                   if not n.startswith("__") and callable(o)}
        for name in sorted(names):
            try:
                out[mod + ":" + name] = fp(getattr(m, name), True)
            except Exception as e:
                out[mod + ":" + name] = "missing:%s" % type(e).__name__
    return out
'''


def probe_code() -> str:
    """Code that defines and runs the probe, leaving JSON in ``__handson_probe_result``."""
    return (PROBE_SOURCE + "\nimport json as __handson_json\n"
            f"__handson_probe_result = __handson_json.dumps(__handson_probe({WATCHED!r}, "
            f"{WATCHED_MODULES!r}))\n")


_REFERENCE: dict[str, str] = {}


def set_reference(reference: dict[str, str]) -> None:
    """Use fingerprints taken elsewhere (a grading worker gets them from its parent)."""
    _REFERENCE.clear()
    _REFERENCE.update(reference)


def reference_fingerprints() -> dict[str, str]:
    """Fingerprints taken in a fresh, clean interpreter with torch and handson imported."""
    if not _REFERENCE:
        _REFERENCE.update(_take_reference())
    return dict(_REFERENCE)


def _take_reference() -> dict[str, str]:
    code = ("import torch, torch.nn, torch.nn.functional, torch.testing, torch.autograd, builtins\n"
            + "".join(f"import {m}\n" for m in WATCHED_MODULES) +
            "torch.manual_seed(0)  # wraps itself on first use\n" + probe_code() + "\nprint(__handson_probe_result)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(found: dict[str, str], reference: dict[str, str] | None = None) -> list[str]:
    """Names whose fingerprint differs from the clean interpreter's."""
    reference = reference_fingerprints() if reference is None else reference
    bad = []
    for name, fp in sorted(found.items()):
        if name in reference and reference[name] != fp:
            bad.append(name.replace(":", "."))
    return bad


def run_probe(client: Any, run_sync_reply: Any, timeout: float = 30) -> list[str]:
    """Run the probe through a kernel client; return the altered names (empty: intact).

    ``run_sync_reply(msg_id, timeout)`` waits for the execute reply (the executor's own helper).
    """
    msg_id = client.execute(probe_code(), silent=True, store_history=False,
                            user_expressions={"r": "__handson_probe_result"})
    reply = run_sync_reply(msg_id, timeout)
    content = (reply or {}).get("content", {})
    if content.get("status") != "ok":
        return [f"the probe could not run ({content.get('ename', 'no reply')})"]
    expr = content.get("user_expressions", {}).get("r", {})
    if expr.get("status") != "ok":
        return ["the probe's result was unavailable"]
    try:
        text = expr["data"]["text/plain"]
        found = json.loads(ast.literal_eval(text))
    except (KeyError, ValueError, SyntaxError):
        return ["the probe's result was unreadable"]
    if not isinstance(found, dict):
        return ["the probe's result was unreadable"]
    return compare({str(k): str(v) for k, v in found.items()})


# --------------------------------------------------------------------------------------------
# Static scan
# --------------------------------------------------------------------------------------------

_GUARDED_ROOTS = {"torch", "F", "nn", "handson", "checks", "builtins", "__builtins__", "np", "numpy",
                  "math", "sys", "os", "importlib", "nbgrader"}
_SUSPICIOUS_CALLS = {"setattr", "delattr", "exec", "eval", "compile", "__import__", "globals",
                     "breakpoint"}
_SUSPICIOUS_MODULES = {"builtins", "ctypes", "gc", "inspect", "importlib", "subprocess", "socket",
                       "shutil", "signal", "multiprocessing", "pty"}
_SUSPICIOUS_STRINGS = ("gradebook", "solutions", "submitted", "autograded", "../", "/etc/", "/proc/")


def _root_name(node: ast.AST) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def scan_source(source: str) -> list[str]:
    """Findings for one cell's code (IPython magics are ignored)."""
    lines = [ln for ln in source.splitlines() if not ln.lstrip().startswith(("%", "!"))]
    try:
        tree = ast.parse("\n".join(lines))
    except SyntaxError:
        return []
    found: list[str] = []
    for node in ast.walk(tree):
        targets: list[ast.AST] = []
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        elif isinstance(node, ast.Delete):
            targets = node.targets
        for t in targets:
            if isinstance(t, (ast.Attribute, ast.Subscript)) and _root_name(t) in _GUARDED_ROOTS:
                found.append(f"line {t.lineno}: assigns to {ast.unparse(t)}")
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else (
                node.func.attr if isinstance(node.func, ast.Attribute) else None)
            # re.compile, regex.compile and torch.compile compile patterns and graphs, not code: only
            # the builtin (bare, or reached through builtins) is suspicious under that name.
            method_compile = (name == "compile" and isinstance(node.func, ast.Attribute)
                              and _root_name(node.func) not in ("builtins", "__builtins__"))
            if name in _SUSPICIOUS_CALLS and not method_compile:
                found.append(f"line {node.lineno}: calls {name}()")
            if name in ("open", "read_text", "read_bytes", "remove", "unlink", "rmtree", "system"):
                found.append(f"line {node.lineno}: file or system access via {name}()")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for m in mods:
                if m.split(".")[0] in _SUSPICIOUS_MODULES:
                    found.append(f"line {node.lineno}: imports {m}")
        if isinstance(node, ast.Attribute) and node.attr in ("modules", "_getframe", "__code__",
                                                             "__globals__", "_exit", "__builtins__"):
            found.append(f"line {node.lineno}: uses .{node.attr}")
        if isinstance(node, ast.Name) and node.id == "__builtins__":
            found.append(f"line {node.lineno}: uses __builtins__")
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if any(s in node.value for s in _SUSPICIOUS_STRINGS):
                found.append(f"line {node.lineno}: mentions the path {node.value[:60]!r}")
    return sorted(set(found), key=lambda s: (int(s.split()[1].rstrip(":")), s))


def scan_notebook(nb: Any) -> list[str]:
    """Findings in the learner's cells (test and locked cells are the instructor's)."""
    out: list[str] = []
    for i, cell in enumerate(nb.cells):
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if cell.get("cell_type") != "code" or meta.get("grade") or meta.get("locked"):
            continue
        for f in scan_source(cell.get("source", "")):
            out.append(f"cell {meta.get('grade_id', i)} {f}")
    return out


def scan_notebook_dir(folder: Path) -> list[str]:
    import nbformat

    out: list[str] = []
    for p in sorted(Path(folder).glob("*.ipynb")):
        try:
            out += scan_notebook(nbformat.read(str(p), as_version=4))
        except Exception:  # noqa: BLE001 -- an unreadable notebook has been reported elsewhere
            continue
    return out
