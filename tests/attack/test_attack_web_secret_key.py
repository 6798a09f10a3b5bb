"""A secret key copied from an example or too short to resist guessing is refused at start.

Whoever knows the key that signs sessions can forge an admin's cookie or bearer token; the key of
docker/env.example (or any well-known placeholder, or fewer than 32 random bytes) must never run.
"""

from __future__ import annotations

import os
import secrets
import stat
import subprocess

import pytest

from support.env import ROOT, VENV_BIN, isolate_env

pytestmark = [pytest.mark.unit]

#: the key docker/env.example used to carry, and other well-known placeholders
PLACEHOLDERS = [
    "replace-with-48-random-characters-from-a-password-generator",
    "changeme-changeme-changeme-changeme-changeme",
    "CHANGETHIS_CHANGETHIS_CHANGETHIS_CHANGETHIS",
    "insecure-development-secret-key-do-not-use-in-prod",
]


def _start(tmp_path, key: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSKNODE_")}
    env.update(MSKNODE_DATA_DIR=str(tmp_path / "data"), MSKNODE_SECRET_KEY=key, MSKNODE_WEB_PORT="1")
    return subprocess.run(
        [str(VENV_BIN / "msknode"), "web"], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )


@pytest.mark.parametrize("key", PLACEHOLDERS + ["a" * 64, secrets.token_urlsafe(16), secrets.token_hex(16)])
def test_the_web_server_refuses_to_start_with_a_weak_or_placeholder_key(tmp_path, key):
    r = _start(tmp_path, key)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "MSKNODE_SECRET_KEY" in r.stderr, r.stderr
    assert key not in r.stderr  # the refusal does not echo the key
    assert not (tmp_path / "data" / "secret_key").exists()


def test_the_example_env_file_leaves_the_key_empty_and_a_strong_one_is_generated(tmp_path, monkeypatch):
    values = {}
    for line in (ROOT / "docker" / "env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.partition("=")
            values[k] = v
    assert values["MSKNODE_SECRET_KEY"] == ""
    isolate_env(monkeypatch, MSKNODE_DATA_DIR=tmp_path / "data", MSKNODE_SECRET_KEY=values["MSKNODE_SECRET_KEY"])
    from node.settings import load_settings, secret_key_problem

    settings = load_settings()
    assert settings.secret_key is None
    key = settings.effective_secret_key()
    assert secret_key_problem(key) is None and len(key) >= 43
    assert stat.S_IMODE((tmp_path / "data" / "secret_key").stat().st_mode) == 0o600
    assert load_settings().effective_secret_key() == key  # kept, not regenerated


def test_strong_keys_are_accepted(tmp_path, monkeypatch):
    from node.settings import load_settings

    for key in (secrets.token_urlsafe(32), secrets.token_hex(32)):
        isolate_env(monkeypatch, MSKNODE_DATA_DIR=tmp_path / "data", MSKNODE_SECRET_KEY=key)
        assert load_settings().effective_secret_key() == key
