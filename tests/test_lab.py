"""`make lab`: the learner's JupyterLab starts (as root, without a display) and hides nbgrader's instructor tools.

The end-to-end test runs the very command `make -n lab` prints, on a free loopback port with a token,
and talks to it over 127.0.0.1 only.
"""

from __future__ import annotations

import html.parser
import importlib.util
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "handson" / "_lab" / "launch.py"
CONFIG = REPO / "handson" / "_lab" / "config"
START_TIMEOUT_S = 60
INSTRUCTOR_SERVER_EXTENSIONS = ("nbgrader.server_extensions.formgrader", "nbgrader.server_extensions.course_list",
                                "nbgrader.server_extensions.assignment_list")
INSTRUCTOR_LAB_PLUGINS = ("@jupyter/nbgrader:formgrader", "@jupyter/nbgrader:create-assignment",
                          "@jupyter/nbgrader:course-list", "@jupyter/nbgrader:assignment-list",
                          "@jupyter/nbgrader:menu")
#: JupyterLab's news pop-up would reach for the network, which a learner's machine may not have.
NETWORK_LAB_PLUGINS = ("@jupyterlab/apputils-extension:announcements",)


def load_launch():
    spec = importlib.util.spec_from_file_location("handson_lab_launch", LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


launch = load_launch()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_lab_command(lab_args: list[str]) -> list[str]:
    """The command `make lab LAB_ARGS=...` runs (its last recipe line), as an argument list."""
    dry = subprocess.run(["make", "-n", "-s", "lab", f"LAB_ARGS={shlex.join(lab_args)}"], cwd=REPO,
                         capture_output=True, text=True, timeout=30, check=True)
    lines = [line for line in dry.stdout.splitlines() if "handson/_lab/launch.py" in line]
    assert len(lines) == 1, f"`make -n lab` should run handson/_lab/launch.py once:\n{dry.stdout}"
    return shlex.split(lines[0])


class _ConfigData(html.parser.HTMLParser):
    """The JSON of <script id="jupyter-config-data"> in JupyterLab's page."""

    def __init__(self) -> None:
        super().__init__()
        self._inside = False
        self.text = ""

    def handle_starttag(self, tag, attrs):
        self._inside = tag == "script" and dict(attrs).get("id") == "jupyter-config-data"

    def handle_endtag(self, tag):
        self._inside = False

    def handle_data(self, data):
        if self._inside:
            self.text += data


def page_config(page: str) -> dict:
    parser = _ConfigData()
    parser.feed(page)
    return json.loads(parser.text)


def http(url: str, token: str, method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(url, method=method, headers={"Authorization": f"token {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as err:
        return err.code, ""


@pytest.mark.skipif(sys.platform.startswith("win"), reason="uses POSIX process groups")
def test_make_lab_serves_the_learner_lab_without_instructor_tools(tmp_path):
    port, token = free_port(), os.urandom(16).hex()
    command = make_lab_command([f"--ServerApp.port={port}", "--ServerApp.ip=127.0.0.1", "--ServerApp.port_retries=0",
                                f"--IdentityProvider.token={token}"])
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "JUPYTER_CONFIG_PATH")}
    env["JUPYTER_RUNTIME_DIR"] = str(tmp_path / "runtime")  # the server's pid/connection files stay out of ~
    log_path = tmp_path / "lab.log"
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, status, page = time.monotonic() + START_TIMEOUT_S, None, ""
        while time.monotonic() < deadline and server.poll() is None:
            try:
                status, page = http(f"{base}/lab", token)
            except OSError:  # not listening yet
                status = None
            if status == 200:
                break
            time.sleep(0.25)
        log_text = lambda: log_path.read_text(errors="replace")[-4000:]  # noqa: E731
        assert server.poll() is None, f"make lab exited with {server.returncode}:\n{log_text()}"
        assert status == 200, f"GET /lab answered {status} within {START_TIMEOUT_S} s:\n{log_text()}"

        # The instructor's server extensions are not loaded: the formgrader's pages do not exist ...
        assert http(f"{base}/formgrader", token)[0] == 404
        assert http(f"{base}/formgrader/manage_assignments", token)[0] == 404
        # ... nor the assignment list (it needs an nbgrader exchange) ...
        assert http(f"{base}/assignments", token)[0] == 404
        # ... while the Validate button's handler is there (it only accepts POST).
        assert http(f"{base}/assignments/validate", token)[0] == 405
        # The page tells JupyterLab to leave out nbgrader's instructor plugins, not the Validate button.
        disabled = set(page_config(page)["disabledExtensions"])
        assert set(INSTRUCTOR_LAB_PLUGINS) <= disabled
        assert "@jupyter/nbgrader:validate-assignment" not in disabled
        # It serves exercises/.
        status, listing = http(f"{base}/api/contents", token)
        assert status == 200 and "self_attention" in {item["name"] for item in json.loads(listing)["content"]}
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
            pytest.fail("the lab server did not stop within 20 s of SIGTERM")
    assert server.returncode is not None


def test_no_display_means_no_browser_and_root_means_allow_root():
    headless = launch.lab_command([], env={}, root=True)
    assert headless[:3] == [sys.executable, "-m", "jupyterlab"]
    assert "--allow-root" in headless and "--no-browser" in headless
    assert f"--ServerApp.root_dir={REPO / 'exercises'}" in headless
    desktop = launch.lab_command(["--port=9999"], env={"DISPLAY": ":0"}, root=False)
    assert "--allow-root" not in desktop and "--no-browser" not in desktop and desktop[-1] == "--port=9999"
    assert "--no-browser" not in launch.lab_command([], env={"WAYLAND_DISPLAY": "wayland-0"}, root=False)
    # Options the learner passes are not doubled.
    assert launch.lab_command(["--no-browser", "--allow-root"], env={}, root=True).count("--no-browser") == 1
    assert launch.has_display({}, platform="darwin") and not launch.has_display({}, platform="linux")


def test_learner_config_comes_first_and_keeps_the_rest():
    env = launch.lab_env({"JUPYTER_CONFIG_PATH": os.pathsep.join(["/opt/site", str(CONFIG)]), "HOME": "/h"})
    assert env["JUPYTER_CONFIG_PATH"].split(os.pathsep) == [str(CONFIG), "/opt/site"]
    assert env["HOME"] == "/h" and "JUPYTER_CONFIG_DIR" not in env  # the user's own config dir is untouched
    assert launch.lab_env({})["JUPYTER_CONFIG_PATH"] == str(CONFIG)


def test_learner_config_names_extensions_that_exist():
    """A renamed nbgrader extension would silently come back: every name the config disables must exist."""
    server = json.loads((CONFIG / "jupyter_server_config.json").read_text())["ServerApp"]["jpserver_extensions"]
    assert set(server) == set(INSTRUCTOR_SERVER_EXTENSIONS) and not any(server.values())
    for module in server:
        assert importlib.util.find_spec(module) is not None, module
    lab = json.loads((CONFIG / "labconfig" / "page_config.json").read_text())["disabledExtensions"]
    assert set(lab) == set(INSTRUCTOR_LAB_PLUGINS) | set(NETWORK_LAB_PLUGINS) and all(lab.values())
    from jupyter_core.paths import jupyter_path

    bundles = [p for d in jupyter_path("labextensions") for p in (Path(d) / "@jupyter" / "nbgrader").glob("static/*.js")]
    if not bundles:
        pytest.skip("nbgrader's JupyterLab extension is not installed")
    code = "".join(p.read_text(errors="replace") for p in bundles)
    for plugin in (*INSTRUCTOR_LAB_PLUGINS, "@jupyter/nbgrader:validate-assignment"):
        assert f'"{plugin}"' in code, f"nbgrader has no JupyterLab plugin {plugin}"
    core = "".join(p.read_text(errors="replace") for d in jupyter_path("lab")
                   for p in (Path(d) / "static").glob("*.js"))
    for plugin in NETWORK_LAB_PLUGINS:
        assert plugin in core, f"JupyterLab has no plugin {plugin}"
