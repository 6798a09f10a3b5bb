"""Where the lumbar spine corpora of the real MRI corpus are, for the tests that read them (skipped with the
reason when the corpus is absent)."""

from __future__ import annotations

from pathlib import Path

import pytest


def spider_root() -> Path:
    """``lumbar_spine/spider_midsagittal`` of the real corpus; skips the test when it is not there."""
    from models.realdata import realdata_root

    root = realdata_root()
    folder = root / "lumbar_spine" / "spider_midsagittal" if root is not None else None
    if folder is None or not folder.is_dir():
        pytest.skip(
            "the real MRI corpus (../shared/realdata or MSKNODE_REALDATA) has no lumbar_spine/spider_midsagittal"
        )
    return folder
