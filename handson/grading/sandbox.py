"""Kernel launcher that confines a learner's code while it is autograded.

The autograder starts every kernel through this module (a kernelspec whose argv is
``python -m handson.grading.sandbox -- python -m ipykernel_launcher -f {connection_file}``, written
by :mod:`handson.grading.execute`). Before the kernel starts, the launcher

1. moves into a fresh, empty working directory holding only the submission's data files (never a
   notebook: the notebook being graded contains the hidden tests);
2. where Linux allows it, enters a private mount namespace in which the course directory, the
   home directory and ``/tmp`` are replaced by empty file systems -- so no solution, gradebook,
   hidden test or other student's submission can be read, written or deleted -- with only the
   Python installation and the ``handson`` package mounted back, read-only;
3. drops to an unprivileged user (``nobody``) when started as root, with no new privileges;
4. sets resource limits: address space, file size, CPU time, number of processes.

Isolation levels, best first: ``namespace+user`` (root: mount namespace and the unprivileged
user), ``userns`` (not root: an unprivileged user namespace with the same mounts), ``none``
(neither is possible: a warning is printed and the kernel runs in the empty working directory
with the resource limits only). ``python -m handson.grading.sandbox --probe`` tries the same steps
in a throw-away process and prints the level that grading will get, so a grading run can report it.

Launching a kernel imports :mod:`handson.grading` (the parent package) and this module only: they
must stay cheap to import, and the package must not import this module itself.

Settings come from the ``HANDSON_SANDBOX`` environment variable (JSON): ``hide`` (paths to
hide), ``files_from`` (directory whose non-notebook files are copied into the working dir),
``mem_bytes``, ``cpu_seconds``, ``fsize_bytes``, ``nproc``, ``uid``, ``gid``.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import stat
import sys
import tempfile
from pathlib import Path

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1, 2, 4, 32, 4096, 16384, 1 << 18)
PR_SET_NO_NEW_PRIVS = 38
MAX_COPY_BYTES = 64 << 20

DEFAULTS = {
    "hide": [],
    "files_from": None,
    "mem_bytes": 6 << 30,
    "cpu_seconds": 900,
    "fsize_bytes": 64 << 20,
    "nproc": 512,
    "uid": 65534,
    "gid": 65534,
}


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _mount(src: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    libc = _libc()
    res = libc.mount(src.encode() if src else None, target.encode(),
                     fstype.encode() if fstype else None, ctypes.c_ulong(flags),
                     data.encode() if data else None)
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {src!r} on {target!r}: {os.strerror(err)}")


def _unshare(flags: int) -> None:
    if _libc().unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare: {os.strerror(err)}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)


def _keep_paths() -> list[str]:
    """Directories the kernel needs to see: the Python installation and the handson package.

    The whole top-level package (the tests import :mod:`handson.checks`), not this module's folder.
    """
    import handson  # noqa: PLC0415 -- our own package, already importable

    paths = {
        os.path.realpath(sys.prefix),
        os.path.realpath(sys.base_prefix),
        os.path.realpath(os.path.dirname(sys.executable)),
        os.path.realpath(os.path.dirname(handson.__file__)),
    }
    # Drop paths nested in another kept path.
    ordered = sorted(paths, key=len)
    return [p for i, p in enumerate(ordered)
            if not any(p == q or p.startswith(q.rstrip("/") + "/") for q in ordered[:i])]


def _under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _isolate_mounts(hide: list[str], keep: list[str]) -> None:
    """Replace each ``hide`` dir by an empty tmpfs, mounting the ``keep`` dirs back read-only."""
    _mount("none", "/", None, MS_REC | MS_PRIVATE)
    hide = sorted({os.path.realpath(h) for h in hide if os.path.isdir(h)}, key=len)
    hide = [h for i, h in enumerate(hide) if not any(_under(h, o) for o in hide[:i])]
    staging = tempfile.mkdtemp(prefix="handson-stage-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    _mount("tmpfs", staging, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0700,size=1m")
    staged: list[tuple[str, str]] = []
    for i, k in enumerate(keep):
        if any(_under(k, h) for h in hide):
            dst = os.path.join(staging, str(i))
            os.mkdir(dst)
            _mount(k, dst, None, MS_BIND | MS_REC)
            staged.append((k, dst))
    for h in hide:
        # /tmp stays a place anyone may write (private to this kernel); the rest are read-only
        mode = "1777" if h == "/tmp" else "0755"
        _mount("tmpfs", h, "tmpfs", MS_NOSUID | MS_NODEV, f"mode={mode},size=256m")
    for k, dst in staged:
        os.makedirs(k, mode=0o755, exist_ok=True)
        _mount(dst, k, None, MS_BIND | MS_REC)
        try:
            _mount("none", k, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
        except OSError:
            pass  # a read-only remount can be refused inside a user namespace; the bind stays
    for h in hide:  # leave the emptied directories read-only too, except /tmp
        if h != "/tmp":
            try:
                _mount("none", h, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
            except OSError:
                pass


def _collect_files(src: str | None) -> dict[str, bytes]:
    """Read the submission's data files (not notebooks) so they survive hiding /tmp."""
    files: dict[str, bytes] = {}
    if not src or not os.path.isdir(src):
        return files
    total = 0
    for root, dirs, names in os.walk(src):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            path = os.path.join(root, name)
            if name.endswith(".ipynb") or name.startswith("."):
                continue
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):  # no links; a FIFO or a socket would block the read
                continue
            size = st.st_size
            if total + size > MAX_COPY_BYTES:
                continue
            total += size
            with open(path, "rb") as fh:
                files[os.path.relpath(path, src)] = fh.read()
    return files


def _set_limits(cfg: dict) -> None:
    for res, value in ((resource.RLIMIT_AS, cfg["mem_bytes"]), (resource.RLIMIT_CPU, cfg["cpu_seconds"]),
                       (resource.RLIMIT_FSIZE, cfg["fsize_bytes"]), (resource.RLIMIT_CORE, 0)):
        if value is not None:
            resource.setrlimit(res, (int(value), int(value)))


def prepare(argv: list[str]) -> tuple[list[str], dict[str, str], str]:
    """Isolate this process; return the kernel argv, its environment and the isolation level."""
    cfg = dict(DEFAULTS)
    cfg.update(json.loads(os.environ.get("HANDSON_SANDBOX", "{}") or "{}"))
    if "-f" not in argv:
        raise SystemExit("handson.grading.sandbox: the kernel command needs '-f {connection_file}'")
    fi = argv.index("-f") + 1
    connection = Path(argv[fi]).read_bytes()
    files = _collect_files(cfg["files_from"] or os.getcwd())
    hide = list(cfg["hide"]) + ["/tmp", os.path.expanduser("~")]
    keep = _keep_paths()
    level = "none"
    is_root = os.geteuid() == 0
    if sys.platform.startswith("linux"):
        try:
            if is_root:
                _unshare(CLONE_NEWNS)
                level = "namespace+user"
            else:
                uid, gid = os.geteuid(), os.getegid()
                _unshare(CLONE_NEWUSER | CLONE_NEWNS)
                _write("/proc/self/setgroups", "deny")
                _write("/proc/self/uid_map", f"0 {uid} 1")
                _write("/proc/self/gid_map", f"0 {gid} 1")
                level = "userns"
            _isolate_mounts(hide, keep)
        except OSError as exc:
            if level != "none" and is_root:
                # The namespace exists but mounting failed: carry on with the user switch only.
                level = "user"
            else:
                level = "none"
            print(f"handson.grading.sandbox: WARNING: no mount isolation ({exc}); the kernel can read "
                  "the course directory", file=sys.stderr)
    elif is_root:
        level = "user"
    # A fresh working directory (inside the private /tmp when namespaces worked).
    work = tempfile.mkdtemp(prefix="handson-kernel-")
    for rel, data in files.items():
        dst = os.path.join(work, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with open(dst, "wb") as fh:
            fh.write(data)
    conn_path = os.path.join(work, ".kernel-connection.json")
    with open(conn_path, "wb") as fh:
        fh.write(connection)
    os.chmod(conn_path, 0o600)
    env = dict(os.environ)
    env.pop("HANDSON_SANDBOX", None)
    for var in ("HOME", "IPYTHONDIR", "MPLCONFIGDIR", "JUPYTER_RUNTIME_DIR", "XDG_CACHE_HOME"):
        env[var] = os.path.join(work, "." + var.lower())
        os.makedirs(env[var], exist_ok=True)
    env["HOME"] = work
    env["PWD"] = work
    env["TMPDIR"] = work
    # torch keeps compile caches under /tmp/torchinductor_<user>: keep them in the working dir
    env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(work, ".torchinductor")
    env["TRITON_CACHE_DIR"] = os.path.join(work, ".triton")
    if is_root and level in ("namespace+user", "user"):
        uid, gid = int(cfg["uid"]), int(cfg["gid"])
        for root, dirs, names in os.walk(work):
            for n in dirs + names:
                os.chown(os.path.join(root, n), uid, gid)
        os.chown(work, uid, gid)
        os.chmod(work, 0o700)
        resource.setrlimit(resource.RLIMIT_NPROC, (int(cfg["nproc"]), int(cfg["nproc"])))
        env["USER"] = env["LOGNAME"] = "nobody"
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        if os.getuid() == 0:
            raise SystemExit("handson.grading.sandbox: could not drop root privileges")
    try:
        _libc().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    except (AttributeError, OSError):
        pass
    _set_limits(cfg)
    os.chdir(work)
    argv = list(argv)
    argv[fi] = conn_path
    return argv, env, level


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if argv == ["--probe"]:
        _, _, level = prepare(["true", "-f", os.devnull])  # this throw-away process is now confined
        print(level)
        return
    if not argv:
        raise SystemExit("usage: python -m handson.grading.sandbox -- KERNEL-COMMAND ... -f CONNECTION_FILE")
    kernel_argv, env, level = prepare(argv)
    if level == "none":
        print("handson.grading.sandbox: WARNING: running the kernel without isolation", file=sys.stderr)
    sys.stderr.flush()
    os.execvpe(kernel_argv[0], kernel_argv, env)


if __name__ == "__main__":
    main()
