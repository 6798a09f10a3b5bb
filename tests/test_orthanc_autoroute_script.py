"""``msknode orthanc autoroute-script``: the rule for a site's Orthanc carries the node's AE title, host and port."""

from __future__ import annotations

import re

import pytest

from node.cli import main
from node.demo.orthanc import OrthancProcess, autoroute_script, orthanc_binary
from node.errors import NodeError
from node.settings import load_settings
from support.env import free_port, isolate_env

pytestmark = pytest.mark.unit


@pytest.fixture
def site(tmp_path, monkeypatch):
    isolate_env(
        monkeypatch,
        MSKNODE_DATA_DIR=tmp_path / "data",
        MSKNODE_AE_TITLE="SITE_AI",
        MSKNODE_PORT=4100,
        MSKNODE_HOST="0.0.0.0",
        MSKNODE_UID_ROOT="1.2.3.4.5",
    )
    return load_settings()


def test_the_script_carries_the_configured_ae_title_host_port_and_uid_root(site, tmp_path, capsys):
    out = tmp_path / "msknode-autoroute.lua"
    assert (
        main(["orthanc", "autoroute-script", "--host", "10.0.0.5", "--route-modalities", "MR,CT", "-o", str(out)]) == 0
    )
    text = out.read_text()
    assert "MSKNODE_AE_TITLE = 'SITE_AI'\n" in text
    assert "MSKNODE_HOST = '10.0.0.5'\n" in text
    assert "MSKNODE_PORT = 4100\n" in text
    assert "MSKNODE_UID_ROOT = '1.2.3.4.5.'\n" in text
    assert "MSKNODE_ROUTE_MODALITIES = 'MR,CT'\n" in text
    assert re.search(r"function Initialize\(\)\n  RestApiPut\('/modalities/' \.\. MSKNODE_MODALITY", text)
    assert "function OnStoredInstance(" in text  # the shipped rule follows the settings


def test_a_wildcard_listen_address_needs_the_host_orthanc_reaches(site):
    with pytest.raises(NodeError, match="--host"):
        autoroute_script(site)


@pytest.mark.integration
@pytest.mark.skipif(orthanc_binary() is None, reason="Orthanc is not installed")
def test_orthanc_loads_the_script_and_knows_msknode(site, tmp_path):
    script = tmp_path / "msknode-autoroute.lua"
    script.write_text(autoroute_script(site, host="10.0.0.5"))

    class Pacs(OrthancProcess):
        def config(self):
            return {**super().config(), "LuaScripts": [str(script)]}

    pacs = Pacs(tmp_path / "orthanc", dicom_port=free_port(), http_port=free_port()).start()
    try:
        modality = pacs.get("/modalities?expand")["msknode"]
    finally:
        pacs.stop()
    assert (modality["AET"], modality["Host"], modality["Port"]) == ("SITE_AI", "10.0.0.5", 4100)
