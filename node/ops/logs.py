"""Logging of every ``msknode`` process: the format, the libraries' level, the log file of ``msknode serve``.

`setup_logging` configures the root logger of one process (stderr, ``text`` or ``json``):

- the libraries (`LIBRARY_LOGGERS`: highdicom, pynetdicom, celery, kombu, httpx, alembic,
  monai, uvicorn ...) log at ``MSKNODE_LOG_LIBRARY_LEVEL`` (WARNING): highdicom alone writes
  a line per copied attribute;
- the stages log their per-series and per-object lines at DEBUG, so that INFO says once per
  study and stage what happened: received (the association), settled and routed (the job
  created, with its series and roles), job started, job done or failed, results sent (one line
  per job and destination once every object is stored there);
- ``json``: one object per line with ``time`` (UTC, ISO 8601), ``level``, ``logger``,
  ``message``, ``process`` and, when the line names them, ``study_uid``, ``series_uid``,
  ``sop_instance_uid`` and ``job_id``. Nothing else is added: log lines carry UIDs, never a
  patient's name or ID.

`LogFile` is the rotated, size-capped file ``msknode serve`` writes (``MSKNODE_LOG_FILE``,
default ``<data_dir>/logs/msknode.log``; directory 0700, files 0600): the supervisor's own
lines and every line its parts print, so one process writes and rotates it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import logging.handlers
import os
import re
import sys
from pathlib import Path
from typing import IO, Any

from node.settings import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"
FORMATS = ("text", "json")

#: third-party loggers held at MSKNODE_LOG_LIBRARY_LEVEL (default WARNING)
LIBRARY_LOGGERS = (
    "highdicom",
    "pynetdicom",
    "pydicom",
    "celery",
    "kombu",
    "amqp",
    "urllib3",
    "httpx",
    "httpcore",
    "alembic",
    "monai",
    "uvicorn",
    "uvicorn.access",
    "uvicorn.error",
    "multipart",
    "python_multipart",
    "PIL",
    "matplotlib",
    "asyncio",
    "filelock",
    "torch",
)

#: (logger, message template) of the per-series / per-object INFO lines of the stages, logged at DEBUG.
#: The line of the same stage that names the study stays at INFO (tests/test_ops_logs.py checks
#: that every template is still in its module).
_UID = r"([0-9]+(?:\.[0-9]+){2,})"
_NAMED = (
    ("study_uid", re.compile(r"\bstudy " + _UID)),
    ("series_uid", re.compile(r"\bseries " + _UID)),
    ("sop_instance_uid", re.compile(r"\b(?:C-STORE|instance|sent) " + _UID)),
    ("job_id", re.compile(r"\bjob ([0-9]+)\b")),
)
_EXTRA_KEYS = ("study_uid", "series_uid", "sop_instance_uid", "job_id")


def identifiers(record: logging.LogRecord, message: str) -> dict[str, Any]:
    """The UIDs and job id a line names: ``extra=`` attributes first, else found in the message."""
    out: dict[str, Any] = {}
    for key, pattern in _NAMED:
        value = getattr(record, key, None)
        if value is None:
            m = pattern.search(message)
            value = m.group(1) if m else None
        if value is not None:
            out[key] = int(value) if key == "job_id" and str(value).isdigit() else str(value)
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, process, and the UIDs the line names."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
            "process": record.process,
        }
        out.update(identifiers(record, message))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        return json.dumps(out, ensure_ascii=False, default=str)


def formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)


def _level(name: str | None, default: int) -> int:
    value = logging.getLevelName(str(name).upper()) if name else default
    return value if isinstance(value, int) else default


def _tagged(handler: logging.Handler) -> bool:
    return getattr(handler, "_msknode", False)


def setup_logging(
    level: str, fmt: str | None = None, library_level: str | None = None, *, stream: IO[str] | None = None
) -> None:
    """Configures this process's logging (again, replacing what an earlier call installed).

    ``fmt`` and ``library_level`` default to ``MSKNODE_LOG_FORMAT`` / ``MSKNODE_LOG_LIBRARY_LEVEL``
    from the environment, so a child process that passes only its level logs like its parent.
    """
    fmt = fmt or os.environ.get("MSKNODE_LOG_FORMAT") or "text"
    if fmt not in FORMATS:
        fmt = "text"
    root_level = _level(level, logging.INFO)
    lib_level = _level(library_level or os.environ.get("MSKNODE_LOG_LIBRARY_LEVEL"), logging.WARNING)
    root = logging.getLogger()
    for h in [h for h in root.handlers if _tagged(h)]:
        root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(fmt))
    handler._msknode = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(root_level)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(lib_level)


# ---- the log file of msknode serve ------------------------------------------------------------
def log_file_path(settings: Settings) -> Path:
    return (
        Path(settings.log_file).expanduser().resolve()
        if settings.log_file
        else settings.data_dir / "logs" / "msknode.log"
    )


class _PrivateRotatingFile(logging.handlers.RotatingFileHandler):
    """A RotatingFileHandler whose files are created with mode 0600."""

    def _open(self):
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(fd, 0o600)
        return os.fdopen(fd, self.mode.replace("w", "a"), encoding=self.encoding, errors=self.errors)


class _PassRaw(logging.Formatter):
    """Formats this process's records; passes the lines of the parts (already formatted) as they are."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return str(record.msg) if getattr(record, "raw_line", False) else self.inner.format(record)


class LogFile:
    """The rotated, size-capped log file: this process's records and the lines its parts print."""

    def __init__(self, path: Path, *, max_mb: float, backups: int, fmt: str = "text"):
        self.path = Path(path)
        self.fmt = fmt
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o700)
        self.handler = _PrivateRotatingFile(
            self.path, maxBytes=max(1, int(max_mb * 1024 * 1024)), backupCount=backups, encoding="utf-8"
        )
        self.handler.setFormatter(_PassRaw(formatter(fmt)))
        self.handler._msknode = True  # type: ignore[attr-defined]

    @classmethod
    def of(cls, settings: Settings, fmt: str | None = None) -> LogFile:
        return cls(
            log_file_path(settings),
            max_mb=settings.log_file_max_mb,
            backups=settings.log_file_backups,
            fmt=fmt or settings.log_format,
        )

    def attach(self) -> None:
        """The records of this process go to the file too."""
        logging.getLogger().addHandler(self.handler)

    def close(self) -> None:
        logging.getLogger().removeHandler(self.handler)
        self.handler.close()

    def line(self, text: str, *, source: str) -> str:
        """Writes one line a part printed (in ``json``, a line that is not a JSON object is wrapped
        in one, logger ``source``); returns the line as written."""
        text = text.rstrip("\r\n")
        if self.fmt == "json" and not (text.startswith("{") and text.endswith("}")):
            level = "ERROR" if text.startswith("Traceback") else "INFO"
            text = json.dumps(
                {
                    "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
                    "level": level,
                    "logger": source,
                    "message": text,
                },
                ensure_ascii=False,
            )
        record = logging.LogRecord(source, logging.INFO, __file__, 0, text, None, None)
        record.raw_line = True
        self.handler.handle(record)  # the handler's lock: one line at a time, rotation included
        return text
