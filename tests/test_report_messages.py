"""The HL7 ORU^R01 and FHIR bundle of one study report, built in memory and read back with the libraries a
receiver uses (hl7apy, the ``hl7`` package, fhir.resources): delimiters and non-ASCII names survive, the
codes are the SR's, and every kind of answer maps to the outbox outcome the destinations promise."""

from __future__ import annotations

import datetime as dt
import json

import hl7
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from node.dispatch.fhir import build_bundle, response_outcome
from node.dispatch.hl7v2 import ack_outcome, build_oru, escape
from node.dispatch.reports import ReportFinding, StudyReport
from node.results import codes
from node.settings import FhirDestination, Hl7Destination

pytestmark = [pytest.mark.unit]

HL7 = Hl7Destination(type="hl7", host="ris", port=2575)
FHIR = FhirDestination(type="fhir", url="http://ehr/fhir", patient_identifier_system="urn:oid:1.2.3.4")


def report(**kw) -> StudyReport:
    base = dict(
        job_id=7,
        pipeline="knee",
        corrects_earlier=False,
        finished_at=dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC),
        study_uid="1.2.826.0.1.3680043.10.1447.99.1",
        accession_number="A|1^2",
        patient_id="P&42",
        patient_name="Müller^Jürgen^^Dr",
        patient_birth_date="19800101",
        patient_sex="M",
        study_date="20240131",
        study_time="101112.123",
        study_description="MR KNEE",
        sr_sop_instance_uid="1.2.826.0.1.3680043.10.1447.99.2",
        sr_series_uid="1.2.826.0.1.3680043.10.1447.99.3",
        findings=(
            ReportFinding(
                "acl_tear", "Complete ACL tear", "knee.acl", "1.0", "ab" * 32, True, probability=0.9, positive=True
            ),
            ReportFinding("knee.meniscus", "x", "knee.meniscus", "1.0", "cd" * 32, False, qc_reason="motion"),
        ),
    )
    base.update(kw)
    return StudyReport(**base)  # type: ignore[arg-type]


def test_the_oru_keeps_delimiters_and_non_ascii_text_and_validates():
    er7 = build_oru(report(), HL7, "MSK1")
    msg = parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT)
    assert msg.validate()
    parsed = hl7.parse(er7)
    pid = parsed.segment("PID")
    assert parsed.unescape(str(pid[3][0][0])) == "P&42"
    assert str(pid[5][0][0]) == "Müller" and str(pid[5][0][1]) == "Jürgen" and str(pid[5][0][4]) == "Dr"
    assert parsed.unescape(str(parsed.segment("OBR")[18])) == "A|1^2"
    obx = [s for s in parsed.segments("OBX") if str(s[2]) == "CWE"]
    assert [(str(s[3][0][0]), str(s[5][0][0])) for s in obx] == [
        (codes.finding_code("acl_tear").value, codes.PRESENT.value),
        (codes.finding_for_model("knee.meniscus").value, codes.NOT_EVALUATED.value),
    ]
    assert escape("a\\b|c") == "a\\E\\b\\F\\c"


def test_a_report_that_corrects_an_earlier_one_is_status_c():
    parsed = hl7.parse(build_oru(report(corrects_earlier=True), HL7, "MSK2"))
    assert str(parsed.segment("OBR")[25]) == "C"
    assert {str(s[11]) for s in parsed.segments("OBX")} == {"C"}
    bundle = build_bundle(report(corrects_earlier=True), FHIR)
    assert {e["resource"]["status"] for e in bundle["entry"]} == {"corrected"}


def _ack(code: str, control: str = "MSK1", kind: str = "ACK") -> hl7.Message:
    return hl7.parse(f"MSH|^~\\&|RIS|H|MSKNODE|M|20300101||{kind}|X1|P|2.5.1\rMSA|{code}|{control}|why not")


@pytest.mark.parametrize(
    ("code", "ok", "permanent"),
    [("AA", True, False), ("CA", True, False), ("AE", False, False), ("AR", False, True), ("ZZ", False, False)],
)
def test_ack_codes(code, ok, permanent):
    out = ack_outcome(_ack(code), "MSK1")
    assert (out.ok, out.permanent) == (ok, permanent)
    if not ok:
        assert code in (out.error or "")


def test_an_ack_of_another_message_or_not_an_ack_is_retried():
    assert not ack_outcome(_ack("AA", control="MSK9"), "MSK1").ok
    out = ack_outcome(_ack("AA", kind="ORU^R01"), "MSK1")
    assert not out.ok and not out.permanent


def test_the_bundle_validates_and_names_patient_study_and_sr():
    from fhir.resources.R4B.bundle import Bundle

    bundle = build_bundle(report(), FHIR, tz="Europe/Berlin")
    Bundle.model_validate_json(json.dumps(bundle))
    dr = bundle["entry"][-1]["resource"]
    assert dr["subject"]["identifier"] == {"system": "urn:oid:1.2.3.4", "value": "P&42"}
    assert dr["effectiveDateTime"] == "2024-01-31T10:11:12+01:00"  # the study's local time, with the site's offset
    assert dr["basedOn"][0]["identifier"]["value"] == "A|1^2"
    assert [e["request"]["ifNoneExist"] for e in bundle["entry"]][-1].endswith(
        "urn:oid:1.2.826.0.1.3680043.10.1447.99.2"
    )


@pytest.mark.parametrize(
    ("status", "body", "ok", "permanent"),
    [
        (
            200,
            {"resourceType": "Bundle", "type": "transaction-response", "entry": [{"response": {"status": "201"}}]},
            True,
            False,
        ),
        (
            200,
            {"resourceType": "Bundle", "type": "transaction-response", "entry": [{"response": {"status": "409"}}]},
            False,
            False,
        ),
        (200, {"resourceType": "Bundle", "type": "searchset"}, False, False),
        (503, {}, False, False),
        (429, {}, False, False),
        (422, {"resourceType": "OperationOutcome"}, False, True),
    ],
)
def test_fhir_answers(status, body, ok, permanent):
    out = response_outcome(status, json.dumps(body).encode())
    assert (out.ok, out.permanent) == (ok, permanent)


def test_a_receivers_error_text_loses_the_patient_id_and_name():
    text = "AE: patient P&42 (MÜLLER, Jürgen) unknown; study 1.2.826.0.1.3680043.10.1447.99.1"
    assert report().redact(text) == "AE: patient *** (***, ***) unknown; study 1.2.826.0.1.3680043.10.1447.99.1"
    assert report().redact("address Drive") == "address Drive"  # whole words only ("Dr" is a name part)


def test_a_study_without_patient_name_or_id_still_makes_a_valid_oru():
    er7 = build_oru(report(patient_name=None, patient_id=None, patient_sex=None, patient_birth_date=None), HL7, "M")
    assert parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT).validate()
    pid = hl7.parse(er7).segment("PID")
    assert str(pid[5]) == '""' and str(pid[3][0][0]) == "UNKNOWN" and str(pid[8]) == "U"
