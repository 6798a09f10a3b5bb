"""Real servers for the tests, and making sure none outlives the test run.

Every server a helper starts (PostgreSQL, Redis, Orthanc, listener and worker processes,
``msknode web``, Chromium) registers a stop function with `track` when it starts and removes it
with `untrack` when it stops. A fixture stops its server in its finalizer; whatever is still
registered when the interpreter exits is stopped by the ``atexit`` handler (a failed start, an
interrupted run). At session end ``tests/conftest.py`` calls `leaked_processes`, which finds
every process this run left behind, and fails the run if there is one.

A process belongs to the run if it descends from the pytest process, or carries the run's
marker variable `RUN_MARKER_ENV` in its environment (children inherit it, so a daemon such as the
PostgreSQL postmaster, which ``pg_ctl`` detaches, is found too), or is the postmaster of one of
the run's ``msknode-pg-<pid>-*`` clusters.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

RUN_MARKER_ENV = "MSKTEST_RUN"  # not MSKNODE_*: child_env drops those from a child's environment
PG_PREFIX = "msknode-pg-"

_lock = threading.Lock()
_live: dict[int, tuple[str, Callable[[], None]]] = {}
_next = 0


def track(name: str, stop: Callable[[], None]) -> int:
    """Registers a started server; `stop` must be safe to call twice. Returns the token for `untrack`."""
    global _next
    with _lock:
        _next += 1
        _live[_next] = (name, stop)
        return _next


def untrack(token: int | None) -> None:
    if token is not None:
        with _lock:
            _live.pop(token, None)


def tracked() -> list[str]:
    with _lock:
        return [name for name, _ in _live.values()]


def stop_all() -> list[str]:
    """Stops every registered server (newest first); returns their names."""
    with _lock:
        items = sorted(_live.items(), reverse=True)
        _live.clear()
    for _, (_, stop) in items:
        try:
            stop()
        except Exception:  # stopping the others matters more than this one's error
            pass
    return [name for _, (name, _) in items]


atexit.register(stop_all)


def mark_run() -> str:
    """Sets the run's marker in this process's environment (inherited by every child); returns it.

    A pytest started by a test gets a marker of its own (the marker starts with the pid of its pytest)."""
    value = os.environ.get(RUN_MARKER_ENV, "")
    if not value.startswith(f"{os.getpid()}-"):
        value = os.environ[RUN_MARKER_ENV] = f"{os.getpid()}-{time.time_ns()}"
    return value


# ---- finding what the run left behind ---------------------------------------------------------


@dataclass(frozen=True)
class Leak:
    pid: int
    cmdline: str
    why: str

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.why}): {self.cmdline}"


# helpers of the interpreter itself that live as long as the pytest process and exit with it
_BENIGN = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def _proc_stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state) from /proc/<pid>/stat, or None if the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rfind(")") + 2 :].split()
    return int(rest[1]), rest[0]


def wait_gone(pid: int, timeout: float) -> bool:
    """True once ``pid`` has exited (or is a zombie) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        st = _proc_stat(pid)
        if st is None or st[1] == "Z":
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _environ_has(pid: int, needle: bytes) -> bool:
    try:
        return needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _ancestors(pid: int) -> set[int]:
    """``pid`` and the processes it descends from (never reported, never killed)."""
    out = set()
    while pid > 0 and pid not in out:
        out.add(pid)
        st = _proc_stat(pid)
        pid = st[0] if st else 0
    return out


def descendants(root: int | None = None) -> list[int]:
    """Live (not zombie) descendants of ``root`` (default: this process)."""
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = {}
    states: dict[int, str] = {}
    for pid in _pids():
        st = _proc_stat(pid)
        if st is not None:
            children.setdefault(st[0], []).append(pid)
            states[pid] = st[1]
    out, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if states.get(pid) != "Z":
            out.append(pid)
        todo.extend(children.get(pid, []))
    return sorted(out)


def pg_clusters(owner: int | None = None, tmp: Path | None = None) -> list[tuple[Path, int | None]]:
    """The ``msknode-pg-<owner>-*`` cluster directories and the pid of their live postmaster (or None)."""
    owner = os.getpid() if owner is None else owner
    tmp = Path(tmp or tempfile.gettempdir())
    out = []
    for d in sorted(tmp.glob(f"{PG_PREFIX}{owner}-*")):
        pid = None
        try:
            pid = int((d / "data" / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            pass
        st = _proc_stat(pid) if pid else None
        out.append((d, pid if st is not None and st[1] != "Z" else None))
    return out


def leaked_processes(root: int | None = None, *, marker: str | None = None, tmp: Path | None = None) -> list[Leak]:
    """Processes the run started that are still alive: descendants of ``root`` (default: this
    process), processes whose environment carries ``marker`` (default: this run's) and the
    postmasters of this run's PostgreSQL clusters. Interpreter helpers (`_BENIGN`) do not count."""
    root = os.getpid() if root is None else root
    marker = os.environ.get(RUN_MARKER_ENV) if marker is None else marker
    found: dict[int, str] = dict.fromkeys(descendants(root), f"child of pytest pid {root}")
    if marker:
        needle = f"{RUN_MARKER_ENV}={marker}".encode()
        for pid in _pids():
            if pid != root and pid not in found and _environ_has(pid, needle):
                st = _proc_stat(pid)
                if st is not None and st[1] != "Z":
                    found[pid] = "started by this test run"
    for d, pid in pg_clusters(root, tmp):
        if pid is not None:
            found[pid] = f"postmaster of {d}"
    leaks = []
    spared = _ancestors(os.getpid())
    for pid, why in sorted(found.items()):
        cmd = _cmdline(pid)
        if pid in spared or any(b in cmd for b in _BENIGN):
            continue
        leaks.append(Leak(pid, cmd or "?", why))
    return leaks


def kill_leaks(leaks: list[Leak]) -> None:
    for leak in leaks:
        try:
            os.kill(leak.pid, signal.SIGKILL)
        except OSError:
            pass


# ---- Redis, PostgreSQL -------------------------------------------------------------------------


class RedisServer:
    """A real redis-server on 127.0.0.1 without persistence, stoppable and restartable on the same port."""

    def __init__(self, workdir: Path, port: int):
        self.workdir = Path(workdir)
        self.port = port
        self.proc = None
        self._token = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.workdir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(
                [
                    "redis-server",
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.workdir),
                    "--protected-mode",
                    "yes",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._token = track(f"redis-server :{self.port}", self.stop)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start: {(self.workdir / 'redis.log').read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # SIGKILL: nothing is saved (no persistence anyway)
            self.proc.wait(10)
        self.proc = None
        untrack(self._token)
        self._token = None


class PostgresServer:
    """A real PostgreSQL 15 cluster in a temporary directory (initdb as the ``postgres`` user), loopback only.

    The directory is ``msknode-pg-<pytest pid>-*``, so the session-end check finds a postmaster this
    run left running. `stop` stops the postmaster (``pg_ctl stop -m immediate``, then SIGKILL if it is
    still alive) before it removes the directory; a failed `start` stops what it started.
    """

    BIN = Path("/usr/lib/postgresql/15/bin")

    def __init__(self, port: int):
        self.port = port
        self.dir = Path(tempfile.mkdtemp(prefix=f"{PG_PREFIX}{os.getpid()}-"))
        self.data = self.dir / "data"
        self._token = None

    def _as_postgres(self, *cmd: str, check: bool = True, timeout: float = 120):
        return subprocess.run(
            ["runuser", "-u", "postgres", "--", *cmd], check=check, capture_output=True, text=True, timeout=timeout
        )

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None

    def start(self) -> PostgresServer:
        shutil.chown(self.dir, user="postgres", group="postgres")
        self._token = track(f"PostgreSQL cluster {self.dir} :{self.port}", self.stop)
        try:
            self._as_postgres(
                str(self.BIN / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            )
            opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.dir} -c fsync=off"
            # one cluster serves the whole session: engines of many tests (and their worker subprocesses) hold
            # connections until garbage-collected, more than the default 100
            opts += " -c max_connections=500"
            self._as_postgres(
                str(self.BIN / "pg_ctl"),
                "-D",
                str(self.data),
                "-o",
                opts,
                "-l",
                str(self.dir / "pg.log"),
                "-w",
                "-t",
                "60",
                "start",
            )
        except BaseException:
            self.stop()
            raise
        return self

    def create_database(self, name: str) -> str:
        """A new empty database; returns its SQLAlchemy URL (psycopg 3)."""
        run = self._as_postgres(
            str(self.BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name, check=False
        )
        if run.returncode != 0:
            raise RuntimeError(f"createdb {name} on port {self.port} failed: {(run.stderr or run.stdout).strip()}")
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        pid = self.postmaster_pid()
        if self.data.exists():
            try:
                self._as_postgres(
                    str(self.BIN / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-m",
                    "immediate",
                    "-w",
                    "-t",
                    "30",
                    "stop",
                    check=False,
                    timeout=60,
                )
            except subprocess.TimeoutExpired:
                pass
        if pid is not None and not wait_gone(pid, 5.0):
            try:
                os.kill(pid, signal.SIGKILL)  # its backends exit when they see the postmaster gone
            except OSError:
                pass
            wait_gone(pid, 5.0)
        shutil.rmtree(self.dir, ignore_errors=True)
        untrack(self._token)
        self._token = None
