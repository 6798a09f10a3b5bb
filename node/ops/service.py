"""``msknode serve``: the listener, the worker and the web app as supervised child processes.

Each part runs as its own ``msknode`` command (``listen``, ``worker``, ``web``), exactly as
in a scale-out deployment, so a crash of one part never takes the others down. A child
that exits is restarted with exponential backoff (1 s, 2 s, ... 30 s; the count resets
after a minute of running). SIGTERM or Ctrl-C stops every child (SIGTERM, then SIGKILL
after a grace period) and returns 0.

The parts' output comes back through a pipe: the supervisor prints each line on its stderr (the
console, journald or the container log) and writes it to the log file (`node.ops.logs.LogFile`,
``<data_dir>/logs/msknode.log``), which it alone writes and rotates.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from node.db.database import upgrade
from node.ops.logs import LogFile
from node.ops.restart import RestartBackoff

log = logging.getLogger("node.ops.service")

#: the parts, each an ``msknode`` command of its own
PARTS = ("listen", "worker", "web")
STOP_GRACE_SECONDS = 20.0


@dataclass
class Child:
    """One supervised part."""

    name: str
    command: list[str]
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    backoff: RestartBackoff = field(default_factory=RestartBackoff)  # 1 s, 2 s ... 30 s; reset after a minute up
    history: list[int] = field(default_factory=list)  # exit codes, for the log and tests


def child_command(name: str) -> list[str]:
    return [sys.executable, "-m", "node.cli", name]


class Supervisor:
    """Starts children, restarts the ones that exit, stops them all on request."""

    def __init__(self, children: list[Child], *, logger: logging.Logger | None = None, log_file: LogFile | None = None):
        self.children = children
        self.log = logger or log
        self.log_file = log_file
        self.stopping = threading.Event()
        self._echo_lock = threading.Lock()
        self._relays: list[threading.Thread] = []

    def start(self, child: Child) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.log_file is None:
            child.proc = subprocess.Popen(child.command, env=env)
        else:
            env["MSKNODE_LOG_FORMAT"] = self.log_file.fmt
            child.proc = subprocess.Popen(
                child.command,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                encoding="utf-8",
                errors="replace",
                bufsize=1,
            )
            relay = threading.Thread(
                target=self._relay, args=(child.name, child.proc), name=f"log-{child.name}", daemon=True
            )
            relay.start()
            self._relays = [t for t in self._relays if t.is_alive()] + [relay]
        child.started_at = time.monotonic()
        child.backoff.started()
        self.log.info("started %s (pid %d)", child.name, child.proc.pid)

    def _relay(self, name: str, proc: subprocess.Popen) -> None:
        """Every line the part prints: to the log file, and on as it was to our stderr."""
        assert proc.stdout is not None and self.log_file is not None
        for line in proc.stdout:
            try:
                written = self.log_file.line(line, source=f"msknode.{name}")
            except Exception:  # a full disk must not stop the part: it still reaches stderr
                written = line.rstrip("\r\n")
            with self._echo_lock:
                sys.stderr.write(written + "\n")
                sys.stderr.flush()

    def poll(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                continue
            if not child.backoff.waiting:
                code = child.proc.returncode if child.proc is not None else None
                if code is not None:
                    child.history.append(code)
                delay = child.backoff.exited(now, child.started_at)
                self.log.error("%s exited with code %s; restarting in %.0f s", child.name, code, delay)
            elif child.backoff.due(now):
                self.start(child)

    def run(self) -> int:
        for child in self.children:
            self.start(child)
        while not self.stopping.wait(0.5):
            self.poll()
        self.stop_all()
        return 0

    def stop_all(self) -> None:
        running = [(c, c.proc) for c in self.children if c.proc is not None and c.proc.poll() is None]
        for _child, proc in running:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for child, proc in running:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.log.warning("%s did not stop within %.0f s: killing it", child.name, STOP_GRACE_SECONDS)
                proc.kill()
                proc.wait()
        for relay in self._relays:  # the parts' last lines
            relay.join(5.0)
        self.log.info("all parts stopped")


def serve(settings, *, parts: tuple[str, ...] = ("listen", "worker", "web")) -> int:
    """Runs the chosen parts until SIGTERM/SIGINT."""
    os.umask(0o077)  # (as node.cli does) the database, images, quarantine and logs are the node's alone
    settings.ensure_dirs()
    upgrade(settings.database_url)  # once, before the children start
    children = [Child(name, child_command(name)) for name in PARTS if name in parts]
    if not children:
        print("msknode serve: nothing to run", file=sys.stderr)
        return 1
    log_file = LogFile.of(settings, fmt=os.environ.get("MSKNODE_LOG_FORMAT") or settings.log_format)
    log_file.attach()
    supervisor = Supervisor(children, log_file=log_file)

    def _stop(signum, frame):
        supervisor.stopping.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    names = ", ".join(c.name for c in children)
    print(
        f"msknode serve: {names} | DICOM {settings.ae_title}@{settings.host}:{settings.port}"
        f" | web http://{settings.web_host}:{settings.web_port} | data {settings.data_dir}"
        f" | log {log_file.path}",
        file=sys.stderr,
        flush=True,
    )
    try:
        return supervisor.run()
    finally:
        log_file.close()
