"""The Orthanc auto-routing rule (docker/orthanc-autoroute.lua) in a real Orthanc.

Orthanc forwards to a dcmtk storescp that plays msknode (AE MSKNODE). Each case is one MR
instance stored into Orthanc; the rule must forward plain MR and nothing msknode made: its UID
root on the SOP Instance or Series UID, Manufacturer "msknode", a Contributing Equipment item
"msknode", or anything msknode's AE title stored. Non-MR objects are not forwarded.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from node.demo.pacs import OrthancPacs
from support.env import free_port

pytestmark = pytest.mark.integration

UID_ROOT = "1.2.826.0.1.3680043.10.1447."


@pytest.fixture
def routed(tmp_path):
    """(pacs, received_dir): Orthanc with the rule, forwarding to storescp as MSKNODE."""
    received = tmp_path / "received"
    received.mkdir()
    scp_port = free_port()
    scp = subprocess.Popen(
        ["storescp", "-aet", "MSKNODE", "-od", str(received), "-uf", str(scp_port)],
        env=dict(os.environ, TCP_NODELAY="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pacs = OrthancPacs(
        tmp_path / "orthanc",
        dicom_port=free_port(),
        http_port=free_port(),
        node_ae_title="MSKNODE",
        node_port=scp_port,
        node_uid_root=UID_ROOT,
        username="test",
        password="test-password-1",
        modality_aets=("MODALITY", "MSKNODE"),
    )
    try:
        pacs.start()
        yield pacs, received
    finally:
        pacs.stop()
        scp.terminate()
        scp.wait(10)


def _mr(path: Path, tmp_source: Path, **changes) -> Path:
    ds = dcmread(tmp_source)
    ds.SOPInstanceUID = changes.pop("sop_uid", generate_uid())
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def _forwarded(received: Path) -> set[str]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in received.iterdir() if p.is_file()}


def test_rule_forwards_scanner_mr_and_never_msknode_objects(routed, tmp_path):
    from models.phantoms import generate, write_dicom_series

    pacs, received = routed
    src = write_dicom_series(generate("knee", 1, n_slices=2, matrix=64), tmp_path / "src")[0]
    plain = _mr(tmp_path / "plain.dcm", src)
    series_uid = generate_uid()
    plain2 = _mr(tmp_path / "plain2.dcm", src, SeriesInstanceUID=series_uid)
    own_sop = _mr(tmp_path / "own_sop.dcm", src, sop_uid=generate_uid(prefix=UID_ROOT))
    own_series = _mr(tmp_path / "own_series.dcm", src, SeriesInstanceUID=generate_uid(prefix=UID_ROOT))
    own_manufacturer = _mr(tmp_path / "own_manufacturer.dcm", src, Manufacturer="msknode")
    item = Dataset()
    item.Manufacturer = "msknode "
    own_equipment = _mr(tmp_path / "own_equipment.dcm", src, ContributingEquipmentSequence=[item])
    from_node = _mr(tmp_path / "from_node.dcm", src)
    ct = _mr(tmp_path / "ct.dcm", src, Modality="CT")

    pacs.store_files([plain, own_sop, own_series, own_manufacturer, own_equipment, ct])
    pacs.store_files([from_node], calling_aet="MSKNODE")
    pacs.store_files([plain2])
    stored = pacs.receptions()
    expected = {str(dcmread(p).SOPInstanceUID) for p in (plain, plain2)}
    deadline = time.monotonic() + 30
    while not expected <= _forwarded(received) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.5)  # anything wrongly forwarded would have arrived by now (it was stored before plain2)
    all_sent = {
        str(dcmread(p).SOPInstanceUID)
        for p in (plain, plain2, own_sop, own_series, own_manufacturer, own_equipment, from_node, ct)
    }
    assert all_sent <= set(stored), "Orthanc did not receive every object"
    assert _forwarded(received) == expected
    # the reception log records who sent what
    assert stored[str(dcmread(from_node).SOPInstanceUID)].calling_ae == "MSKNODE"
    assert stored[str(dcmread(plain).SOPInstanceUID)].calling_ae == "MODALITY"
    # the rule's stores form one Orthanc job that outlives the last store by its trailing timeout
    # (5 s); bench e2e waits for it to end before the next study
    assert pacs.routing_busy()
    waited = pacs.wait_routing_idle(timeout=30)
    assert waited > 0.5
    assert not pacs.routing_busy()
