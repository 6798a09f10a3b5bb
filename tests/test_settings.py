import json
import subprocess
import sys

import pytest

from node.errors import SettingsError
from node.settings import DimseDestination, StowDestination, load_settings

pytestmark = pytest.mark.unit


def test_env_names_are_read(monkeypatch, tmp_path):
    monkeypatch.setenv("MSKNODE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("MSKNODE_AE_TITLE", "AINODE")
    monkeypatch.setenv("MSKNODE_PORT", "11999")
    monkeypatch.setenv("MSKNODE_WEB_PORT", "8999")
    monkeypatch.setenv("MSKNODE_ALLOWED_AE_TITLES", "PACS1, MODALITY2")
    monkeypatch.setenv("MSKNODE_QUIET_SECONDS", "1.5")
    monkeypatch.setenv("MSKNODE_UID_ROOT", "1.2.3.4")
    monkeypatch.setenv("MSKNODE_MIN_FREE_GB", "0.5")
    monkeypatch.setenv("MSKNODE_RETENTION_DAYS", "7")
    monkeypatch.setenv(
        "MSKNODE_DESTINATIONS",
        json.dumps(
            [{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}, {"type": "stow", "url": "http://x/dicom-web/"}]
        ),
    )
    s = load_settings()
    assert s.ae_title == "AINODE" and s.port == 11999 and s.web_port == 8999
    assert s.host == "127.0.0.1"
    assert s.allowed_ae_titles == ["PACS1", "MODALITY2"]
    assert s.quiet_seconds == 1.5
    assert s.uid_root == "1.2.3.4."
    assert s.min_free_gb == 0.5 and s.retention_days == 7
    assert isinstance(s.destinations[0], DimseDestination) and s.destinations[0].tls is False
    assert isinstance(s.destinations[1], StowDestination) and s.destinations[1].url == "http://x/dicom-web"
    assert s.database_url == f"sqlite:///{tmp_path.resolve() / 'msknode.db'}"


@pytest.mark.parametrize(
    "name,value",
    [
        ("MSKNODE_PORT", "70000"),
        ("MSKNODE_AE_TITLE", "THIS_AE_TITLE_IS_TOO_LONG"),
        ("MSKNODE_UID_ROOT", "1.02.3"),
        ("MSKNODE_DESTINATIONS", '[{"type": "dimse", "host": "x", "port": 1}]'),
        ("MSKNODE_SITE_TIMEZONE", "Mars/Olympus"),
    ],
)
def test_invalid_setting_names_the_setting(monkeypatch, tmp_path, name, value):
    monkeypatch.setenv("MSKNODE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as e:
        load_settings()
    assert name in str(e.value)


def test_toml_file_and_env_precedence(monkeypatch, tmp_path):
    cfg = tmp_path / "msknode.toml"
    cfg.write_text('ae_title = "FROMFILE"\nport = 11200\n')
    monkeypatch.setenv("MSKNODE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("MSKNODE_PORT", "11300")
    s = load_settings(cfg)
    assert s.ae_title == "FROMFILE" and s.port == 11300
    monkeypatch.delenv("MSKNODE_CONFIG")


@pytest.mark.integration  # a msknode subprocess
def test_cli_refuses_invalid_setting_with_one_message(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "MSKNODE_DATA_DIR": str(tmp_path), "MSKNODE_PORT": "notaport"}
    r = subprocess.run([sys.executable, "-m", "node.cli", "series", "--json"], env=env, capture_output=True, text=True)
    assert r.returncode == 2
    assert "MSKNODE_PORT" in r.stderr
    assert "Traceback" not in r.stderr


def test_superres_bf16_setting_reaches_the_model(monkeypatch, tmp_path):
    """From a settings file too: the pipeline runner hands the setting to the super-resolution model it loads."""
    from models.registry import Registry
    from node.jobs.runner import ModelPipelineRunner

    monkeypatch.setenv("MSKNODE_SUPERRES_BF16", "auto")  # restored (unset) after the test: the runner sets it
    monkeypatch.delenv("MSKNODE_SUPERRES_BF16")
    monkeypatch.setenv("MSKNODE_DATA_DIR", str(tmp_path))
    assert load_settings(superres_bf16="1").superres_bf16 == "on"
    assert load_settings(superres_bf16="Off").superres_bf16 == "off"
    with pytest.raises(SettingsError, match="expected on, off or auto"):
        load_settings(superres_bf16="fast")
    cfg = tmp_path / "node.toml"
    for value, expected in (("on", True), ("off", False)):
        cfg.write_text(f'superres_bf16 = "{value}"\n')
        monkeypatch.delenv("MSKNODE_SUPERRES_BF16", raising=False)  # (an environment variable wins over the file)
        ModelPipelineRunner(load_settings(cfg))
        assert Registry().get("superres").bf16 is expected
    monkeypatch.delenv("MSKNODE_CONFIG")
