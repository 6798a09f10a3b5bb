"""The ``msknode`` command line.

Each feature registers its own subcommands (a ``register(subparsers)`` function in
the modules listed in `COMMAND_MODULES`); a handler is called as
``handler(args, settings)`` and returns the process exit code. Heavy imports (torch,
the web app) happen inside handlers, so ``msknode series`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
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
    "models.cli",  # models, train, evaluate, predict
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msknode",
        description="Clinical AI node for knee, shoulder and lumbar-spine MRI beside a PACS.",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML settings file (env MSKNODE_CONFIG); MSKNODE_* variables win")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("alembic", "pynetdicom", "celery", "kombu", "amqp", "multipart", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        os.environ["MSKNODE_CONFIG"] = os.path.abspath(args.config)
    from node.settings import load_settings

    try:
        settings = load_settings()
    except SettingsError as e:
        print(f"msknode: {e}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
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
