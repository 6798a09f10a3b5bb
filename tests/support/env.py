"""Paths and the environment of the tests: the checkout, the venv, free ports, isolated settings."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from node.demo.loopback import free_port

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
VENV_BIN = Path(sys.executable).parent

__all__ = ["ROOT", "TESTS", "VENV_BIN", "free_port", "isolate_env"]


#: where the tests find the real MRI corpus: not a node setting, so isolated settings keep it
KEEP = ("MSKNODE_REALDATA",)


def isolate_env(monkeypatch, **values: object) -> None:
    """Removes the caller's MSKNODE_* variables (but the corpus location) from this process's environment,
    then sets ``values``."""
    for k in list(os.environ):
        if k.startswith("MSKNODE_") and k not in KEEP:
            monkeypatch.delenv(k)
    for k, v in values.items():
        monkeypatch.setenv(k, str(v))
