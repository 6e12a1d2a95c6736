"""JupyterLab for learners: ``make lab`` runs ``python handson/_lab/launch.py [jupyter lab options]``.

It opens ``exercises/`` with what a learner needs and nothing of the instructor's nbgrader tools:

- nbgrader's Validate button stays; the formgrader, "Create Assignment", the course and assignment
  lists (which need an nbgrader exchange this course does not use) and the Nbgrader menu are off.
  They are switched off by the config folder beside this file (``config/``), which is put first on
  ``JUPYTER_CONFIG_PATH`` for this server only: no global or user Jupyter config is changed.
- as root (a container) it adds ``--allow-root``; with no display it adds ``--no-browser`` and the
  server prints the URL to open (Jupyter always prints it).

Extra arguments go to ``jupyter lab`` unchanged (``make lab LAB_ARGS="--port=8899"``).
``--print-command`` prints the command and the environment it would add instead of running it.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CONFIG_DIR = HERE / "config"
EXERCISES = REPO / "exercises"


def has_display(env: dict[str, str] | None = None, platform: str = sys.platform) -> bool:
    """Whether a browser can be opened: always on macOS and Windows, on other systems only with X or Wayland."""
    env = os.environ if env is None else env
    if platform == "darwin" or platform.startswith("win"):
        return True
    return bool(env.get("DISPLAY") or env.get("WAYLAND_DISPLAY"))


def is_root() -> bool:
    geteuid = getattr(os, "geteuid", None)
    return geteuid is not None and geteuid() == 0


def lab_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the learner's server: ``config/`` first on JUPYTER_CONFIG_PATH.

    JUPYTER_CONFIG_PATH folders rank below the user's own config folder (``~/.jupyter``) and above
    the virtual environment's, which is where nbgrader enables its instructor extensions.
    """
    env = dict(os.environ if env is None else env)
    rest = [p for p in env.get("JUPYTER_CONFIG_PATH", "").split(os.pathsep) if p and Path(p) != CONFIG_DIR]
    env["JUPYTER_CONFIG_PATH"] = os.pathsep.join([str(CONFIG_DIR), *rest])
    return env


def lab_command(extra: list[str] | None = None, env: dict[str, str] | None = None,
                root: bool | None = None) -> list[str]:
    """The ``jupyter lab`` command line for learners, with ``extra`` options appended."""
    extra = list(extra or [])
    command = [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={EXERCISES}"]
    if (is_root() if root is None else root) and "--allow-root" not in extra:
        command.append("--allow-root")
    if not has_display(env) and "--no-browser" not in extra:
        command.append("--no-browser")
    return command + extra


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    dry_run = "--print-command" in args
    args = [a for a in args if a != "--print-command"]
    command, env = lab_command(args), lab_env()
    if dry_run:
        print(f"JUPYTER_CONFIG_PATH={shlex.quote(env['JUPYTER_CONFIG_PATH'])} {shlex.join(command)}")
        return
    print(f"JupyterLab on {EXERCISES} (learner view: nbgrader's instructor tools are off).", flush=True)
    if not has_display():
        print("No display, so no browser is started: open the http://... URL the server prints below.", flush=True)
    # The server runs from the repository root, where nbgrader's Validate button finds nbgrader_config.py.
    os.chdir(REPO)
    os.execve(command[0], command, env)


if __name__ == "__main__":
    main()
