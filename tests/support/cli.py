"""``msknode ARGS`` through its entry point (`node.cli.main`) in the test's own process.

A one-shot command run as a process of its own pays the import of torch, MONAI and the model registry
(4-5 s) before it does anything; in the test's process those are imported once per run. `main` is what
the ``msknode`` console script calls (``sys.exit(main())``), so the exit status, stdout and stderr are
those a process would give. The environment is a child's (`node.demo.loopback.child_env`: the caller's
MSKNODE_* settings dropped, ``values`` set) while the command runs; the environment and the umask that
`main` sets (and torch's thread count, where torch is imported) are put back afterwards, so the test's process is as it was.

Commands whose subject is the process itself (its umask, its environment, a server it starts) stay
processes of their own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from node.demo.loopback import child_env

__all__ = ["msknode"]


@contextmanager
def _child_environment(values: dict[str, object]) -> Iterator[None]:
    saved = dict(os.environ)
    umask = os.umask(0o022)
    os.umask(umask)
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    try:
        env = child_env(**values)
        os.environ.clear()
        os.environ.update(env)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        os.umask(umask)
        if threads is not None and torch is not None:
            torch.set_num_threads(threads)


def msknode(capsys: pytest.CaptureFixture[str], *args: str, **env: object) -> subprocess.CompletedProcess:
    """``msknode ARGS`` with the settings ``env`` (MSKNODE_DATA_DIR=..., as strings or paths): a CompletedProcess
    with the exit status, stdout and stderr. An exit through `SystemExit` (argparse) gives its status."""
    from node.cli import main

    capsys.readouterr()
    with _child_environment(env):
        try:
            rc = main(list(args))
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["msknode", *args], rc, out, err)
