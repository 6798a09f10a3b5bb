"""The standing attack suite: each test reproduces something a hostile peer on the hospital
network can send (idle or drip-fed sockets, oversized or malformed PDUs, deflate bombs, objects whose
pixel data contradicts the header, forged or stale sessions, placeholder secrets) and checks the node
refuses it clearly and loses nothing already accepted. `make test` runs it with the rest;
``pytest -m attack`` runs it alone."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if Path(str(item.fspath)).resolve().parent == HERE and not item.get_closest_marker("attack"):
            item.add_marker("attack")
