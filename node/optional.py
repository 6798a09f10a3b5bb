"""Parts of msknode that may not be installed (a model package, an optional feature module)."""

from __future__ import annotations

import importlib
from types import ModuleType


def optional_module(name: str) -> ModuleType | None:
    """The imported module, or None when it (or a package above it) is missing.

    An import error raised inside the module itself (a missing dependency of it) propagates.
    """
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and name.startswith(e.name):
            return None
        raise
