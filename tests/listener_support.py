"""Moved to ``tests/support/listener.py``; this name stays until every test imports ``support.listener``."""

from support.listener import IMPLICIT_LE, PYDICOM_DATA, ListenerProcess, RawSender, dataset_bytes, echo  # noqa: F401
