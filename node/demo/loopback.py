"""Loopback helpers for the DICOM peers msknode starts itself (benchmarks, demo, tests)."""

from __future__ import annotations

import os
import socket
import subprocess


def child_env(*, drop: tuple[str, ...] = ("MSKNODE_",), **extra: object) -> dict[str, str]:
    """The environment of a process started here: this one's without the variables starting with ``drop``
    (the caller's msknode settings), ``TCP_NODELAY=1``, then ``extra`` (as strings)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["TCP_NODELAY"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def free_port() -> int:
    """A TCP port nobody listens on at 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def echoscu(
    port: int, called_ae: str, *, calling_ae: str | None = None, host: str = "127.0.0.1", timeout: float = 10.0
) -> bool:
    """True if a dcmtk ``echoscu`` C-ECHO to ``called_ae`` at ``host:port`` succeeds (``TCP_NODELAY=1``)."""
    cmd = ["echoscu", "-to", str(max(1, round(timeout))), "-aec", called_ae]
    if calling_ae:
        cmd += ["-aet", calling_ae]
    try:
        proc = subprocess.run(
            [*cmd, host, str(port)], capture_output=True, timeout=timeout + 5, env=dict(os.environ, TCP_NODELAY="1")
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0
