"""DICOMweb of our results, the way docs/dicomweb.md tells a site to serve them: the outbox stores them in
the PACS (here a real Orthanc with its DICOMweb plugin and HTTP basic auth), and a viewer such as OHIF
finds and loads them there with QIDO-RS and WADO-RS, next to the images, behind the PACS's own login."""

from __future__ import annotations

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from test_dispatch import T0, enqueue, with_dest

from node.dispatch.outbox import process_outbox
from node.results import TriageSummary, build_results, save
from node.settings import DimseDestination
from support.results_data import knee_output, phantom_knee_study, send_to_pacs

pytestmark = [pytest.mark.integration]

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def _viewer(orthanc, *, auth: bool = True) -> DICOMwebClient:
    session = requests.Session()
    if auth:
        session.auth = orthanc.auth
    client = DICOMwebClient(url=orthanc.dicomweb_url, session=session)
    client.set_http_retry_params(retry=False)
    return client


def test_a_viewer_finds_and_loads_our_sr_and_seg_through_the_pacs_dicomweb(settings, db, orthanc, tmp_path):
    paths, vol = phantom_knee_study(tmp_path / "src", 21, patient_name="Phantom^Web", patient_id="PHWEB")
    send_to_pacs(orthanc, paths)
    results = build_results(
        output=knee_output(vol),
        source_files={vol.series_uid: paths},
        triage=TriageSummary("URGENT", 0.9, ["complete ACL tear"]),
        predecessors=[],
        settings=settings,
        job_fingerprint="dicomweb-results",
    )
    saved = [(r, save(r, settings)) for r in results]
    dest = DimseDestination(ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port)
    s = with_dest(settings, dest)
    enqueue(db, saved, [dest.key], study_uid=vol.study_uid)
    rep = process_outbox(db, s, now=T0)
    assert rep.sent == len(results), rep.errors

    # without the PACS's credentials a viewer gets nothing
    with pytest.raises(requests.exceptions.HTTPError) as e:
        _viewer(orthanc, auth=False).search_for_series(study_instance_uid=vol.study_uid)
    assert e.value.response.status_code == 401

    viewer = _viewer(orthanc)
    # QIDO-RS: the study lists the source series and ours (SR, SEG) side by side
    series = viewer.search_for_series(study_instance_uid=vol.study_uid)
    by_uid = {pydicom.Dataset.from_json(x).SeriesInstanceUID: pydicom.Dataset.from_json(x) for x in series}
    sr = next(r for r, _p in saved if r.kind == "sr")
    seg = next(r for r, _p in saved if r.kind == "seg")
    assert {vol.series_uid, sr.series_uid, seg.series_uid} <= set(by_uid)
    assert by_uid[sr.series_uid].Modality == "SR" and by_uid[seg.series_uid].Modality == "SEG"
    found = viewer.search_for_instances(study_instance_uid=vol.study_uid, series_instance_uid=sr.series_uid)
    assert [pydicom.Dataset.from_json(x).SOPClassUID for x in found] == [SR_CLASS]

    # WADO-RS: the SR as we wrote it, and the SEG's metadata (what OHIF reads before the frames)
    got = viewer.retrieve_instance(vol.study_uid, sr.series_uid, sr.sop_instance_uid)
    ours = pydicom.dcmread(next(p for r, p in saved if r.kind == "sr"))
    assert got.SOPInstanceUID == ours.SOPInstanceUID and got.ContentSequence == ours.ContentSequence
    meta = viewer.retrieve_series_metadata(vol.study_uid, seg.series_uid)
    (seg_meta,) = [pydicom.Dataset.from_json(m, bulk_data_uri_handler=lambda *a: b"") for m in meta]
    assert seg_meta.SOPClassUID == SEG_CLASS and seg_meta.SOPInstanceUID == seg.sop_instance_uid
    # the SEG references the source images the viewer shows it on
    refs = {
        str(i.ReferencedSOPInstanceUID)
        for item in seg_meta.ReferencedSeriesSequence
        for i in item.ReferencedInstanceSequence
    }
    assert refs and refs <= {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
