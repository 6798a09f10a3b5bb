"""Subcommands of the ``msknode`` command line, one module per feature."""
