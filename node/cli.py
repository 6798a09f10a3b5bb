"""The ``msknode`` command line.

Each feature registers its own subcommands (a ``register(subparsers)`` function in
the modules listed in `COMMAND_MODULES`); a handler is called as
``handler(args, settings)`` and returns the process exit code. Heavy imports (torch,
the web app) happen inside handlers, so ``msknode series`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from node.errors import NodeError, SettingsError

COMMAND_MODULES = (
    "node.commands.core",  # serve, listen, worker, web, db, series
    "node.commands.pipeline",  # jobs, purge
    "node.commands.results",  # outbox
    "node.commands.web",  # users
    "node.commands.bench",  # bench ingest|models|e2e
    "node.commands.demo",  # demo
    "node.commands.orthanc",  # orthanc autoroute-script
    "node.commands.monitor",  # monitor
    "node.commands.deployments",  # deployments [register|activate|shadow]
    "node.commands.export",  # export feedback
    "models.cli",  # models, train, evaluate, predict
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msknode",
        description="Clinical AI node for knee, shoulder and lumbar-spine MRI beside a PACS.",
    )
    parser.add_argument(
        "--config", metavar="FILE", help="TOML settings file (env MSKNODE_CONFIG); MSKNODE_* variables win"
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        help="log lines as text or one JSON object per line (env MSKNODE_LOG_FORMAT; default text)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def setup_logging(level: str, fmt: str | None = None, library_level: str | None = None) -> None:
    """This process's logging (`node.ops.logs.setup_logging`): stderr, text or JSON, the libraries at WARNING."""
    from node.ops.logs import setup_logging as configure

    configure(level, fmt, library_level)


#: every file and folder the node makes is its own alone (database and its WAL, images, quarantine, logs, keys)
PRIVATE_UMASK = 0o077


def main(argv: list[str] | None = None) -> int:
    os.umask(PRIVATE_UMASK)  # before anything is written; the parts msknode serve starts inherit it
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        os.environ["MSKNODE_CONFIG"] = os.path.abspath(args.config)
    if getattr(args, "log_format", None):
        os.environ["MSKNODE_LOG_FORMAT"] = args.log_format  # the parts msknode serve starts log alike
    from node.settings import load_settings

    try:
        settings = load_settings()
    except SettingsError as e:
        print(f"msknode: {e}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format, settings.log_library_level)
    if args.command in ("serve", "listen"):
        # the listener's processes configure their logging from the environment (a settings file too)
        os.environ["MSKNODE_LOG_FORMAT"] = settings.log_format
        os.environ["MSKNODE_LOG_LIBRARY_LEVEL"] = settings.log_library_level
    try:
        rc = args.func(args, settings)
    except KeyboardInterrupt:
        return 130
    except NodeError as e:
        print(f"msknode: {e}", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
