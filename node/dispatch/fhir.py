"""The ``fhir`` destination: one FHIR R4 transaction Bundle per finished job, POSTed to the server's base URL.

The bundle (validated with the ``fhir.resources`` R4B models, which for DiagnosticReport, Observation
and Bundle are the R4 resources) holds:

- one Observation per finding: ``code`` the finding's code, ``valueCodeableConcept`` Present / Absent /
  Not Evaluated (the SR's codes, `node.results.codes`), ``interpretation`` A/N, components for the
  probability, its standard deviation and the grade, ``bodySite``, ``device`` naming the model, version
  and weights hash, and the "not for diagnostic use" note;
- one DiagnosticReport: ``code`` 363679005 Imaging procedure (the SR's procedure reported), ``result``
  the Observations, ``imagingStudy`` a reference by identifier to the DICOM study
  (``urn:dicom:uid`` / ``urn:oid:<Study Instance UID>``), ``identifier`` the SR's SOP Instance UID,
  ``subject`` by patient identifier, ``conclusion`` the notice.

Every entry is a conditional create (``ifNoneExist`` on its identifier) and its ``fullUrl`` is derived
from the SR's UID, so a bundle sent again after a lost answer creates nothing twice on a conforming
server. Answers: 2xx with a ``transaction-response`` whose entries are all 2xx → sent; 5xx, 408, 429,
no connection or no answer within the destination's timeout → retried; any other 4xx → dead at once
(the server refused the content). The answer is read up to 1 MiB (`MAX_RESPONSE_BYTES`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import uuid
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

from node.dispatch.reports import NOT_FOR_DIAGNOSTIC_USE, ReportFinding, StudyReport, report_message
from node.dispatch.senders import Claimed, Outcome
from node.results import codes
from node.settings import FhirDestination, Settings

log = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 1024 * 1024
SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "UCUM": "http://unitsofmeasure.org",
    codes.PRIVATE_SCHEME: "urn:msknode:codesystem:99MSKNODE",
}
DICOM_UID_SYSTEM = "urn:dicom:uid"
OBSERVATION_ID_SYSTEM = "urn:msknode:observation"
INTERPRETATION_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
CATEGORY_SYSTEM = "http://terminology.hl7.org/CodeSystem/observation-category"
DIAGNOSTIC_SERVICE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0074"
_NS = uuid.UUID("6f1c2b8e-3d4a-5e6f-8a9b-0c1d2e3f4a5b")
_GENDER = {"M": "male", "F": "female", "O": "other"}


def _cc(concept: codes.CodedConcept) -> dict[str, Any]:
    system = SYSTEMS.get(concept.scheme_designator, f"urn:msknode:codesystem:{concept.scheme_designator}")
    return {"coding": [{"system": system, "code": str(concept.value), "display": concept.meaning}]}


def _instant(t: dt.datetime) -> str:
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.astimezone(dt.UTC).isoformat(timespec="seconds")


def _study_datetime(report: StudyReport, tz: str) -> str | None:
    """The study's date and time (DICOM, local to the site) as a FHIR dateTime with the site's offset."""
    from zoneinfo import ZoneInfo

    d = report.study_date
    if not d or len(d) != 8 or not d.isdigit():
        return None
    t = (report.study_datetime or "")[8:]
    if len(t) != 6:
        return f"{d[:4]}-{d[4:6]}-{d[6:8]}"
    try:
        local = dt.datetime.strptime(d + t, "%Y%m%d%H%M%S").replace(tzinfo=ZoneInfo(tz))
    except ValueError:
        return f"{d[:4]}-{d[4:6]}-{d[6:8]}"
    return local.isoformat(timespec="seconds")


def _full_url(report: StudyReport, what: str) -> str:
    return f"urn:uuid:{uuid.uuid5(_NS, f'{report.sr_sop_instance_uid}/{what}')}"


def _subject(report: StudyReport, dest: FhirDestination) -> dict[str, Any]:
    ident: dict[str, Any] = {"value": report.patient_id or "UNKNOWN"}
    if dest.patient_identifier_system:
        ident["system"] = dest.patient_identifier_system
    return {"type": "Patient", "identifier": ident}


def _ratio_component(concept: codes.CodedConcept, value: float) -> dict[str, Any]:
    """An Observation component: ``concept`` with a ratio (UCUM unit "1") to six decimals."""
    return {
        "code": _cc(concept),
        "valueQuantity": {"value": round(float(value), 6), "unit": "1", "system": SYSTEMS["UCUM"], "code": "1"},
    }


def _observation(report: StudyReport, f: ReportFinding, n: int, dest: FhirDestination, tz: str) -> dict[str, Any]:
    status = "corrected" if report.corrects_earlier else "final"
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "identifier": [{"system": OBSERVATION_ID_SYSTEM, "value": f"{report.sr_sop_instance_uid}-{n}"}],
        "status": status,
        "category": [{"coding": [{"system": CATEGORY_SYSTEM, "code": "imaging", "display": "Imaging"}]}],
        "code": _cc(f.concept),
        "subject": _subject(report, dest),
        "issued": _instant(report.finished_at),
        "valueCodeableConcept": _cc(f.value),
        "device": {"display": f"{f.model_name} {f.model_version} (weights SHA-256 {f.weights_sha256})"},
        "note": [{"text": f.sentence()}, {"text": NOT_FOR_DIAGNOSTIC_USE}],
    }
    effective = _study_datetime(report, tz)
    if effective:
        obs["effectiveDateTime"] = effective
    if f.evaluated:
        code, display = ("A", "Abnormal") if f.positive else ("N", "Normal")
        obs["interpretation"] = [{"coding": [{"system": INTERPRETATION_SYSTEM, "code": code, "display": display}]}]
        site, _modifier = codes.site_codes(f.code, f.site)
        obs["bodySite"] = _cc(site)
    components: list[dict[str, Any]] = []
    if f.probability is not None:
        components.append(_ratio_component(codes.PROBABILITY, f.probability))
    if f.uncertainty is not None:
        components.append(_ratio_component(codes.STANDARD_DEVIATION, f.uncertainty))
    if f.grade:
        name, value = codes.grade_concept(f.grade, f.code)
        components.append({"code": _cc(name), "valueCodeableConcept": _cc(value)})
    if components:
        obs["component"] = components
    return obs


def build_bundle(report: StudyReport, dest: FhirDestination, *, tz: str = "UTC") -> dict[str, Any]:
    """The transaction Bundle of ``report`` as JSON-ready dict, validated with the FHIR models (``tz``: the
    site's time zone, in which DICOM study dates and times are given)."""
    from fhir.resources.R4B.bundle import Bundle

    entries: list[dict[str, Any]] = []
    refs = []
    for n, f in enumerate(report.findings, start=1):
        obs = _observation(report, f, n, dest, tz)
        url = _full_url(report, f"observation/{n}")
        refs.append({"reference": url})
        entries.append(
            {
                "fullUrl": url,
                "resource": obs,
                "request": {
                    "method": "POST",
                    "url": "Observation",
                    "ifNoneExist": f"identifier={OBSERVATION_ID_SYSTEM}|{obs['identifier'][0]['value']}",
                },
            }
        )
    sr_ident = f"urn:oid:{report.sr_sop_instance_uid}"
    dr: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": [{"system": DICOM_UID_SYSTEM, "value": sr_ident}],
        "status": "corrected" if report.corrects_earlier else "final",
        "category": [{"coding": [{"system": DIAGNOSTIC_SERVICE_SYSTEM, "code": "RAD", "display": "Radiology"}]}],
        "code": _cc(codes.IMAGING_PROCEDURE),
        "subject": _subject(report, dest),
        "issued": _instant(report.finished_at),
        "result": refs,
        "imagingStudy": [
            {
                "type": "ImagingStudy",
                "identifier": {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{report.study_uid}"},
                "display": report.study_description or "Imaging study",
            }
        ],
        "conclusion": NOT_FOR_DIAGNOSTIC_USE,
    }
    if report.accession_number:
        dr["basedOn"] = [
            {
                "type": "ServiceRequest",
                "identifier": {
                    "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
                    "value": report.accession_number,
                },
            }
        ]
    effective = _study_datetime(report, tz)
    if effective:
        dr["effectiveDateTime"] = effective
    entries.append(
        {
            "fullUrl": _full_url(report, "report"),
            "resource": dr,
            "request": {
                "method": "POST",
                "url": "DiagnosticReport",
                "ifNoneExist": f"identifier={DICOM_UID_SYSTEM}|{sr_ident}",
            },
        }
    )
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    Bundle.model_validate(bundle)  # raises pydantic.ValidationError with the path of what is wrong
    return bundle


def response_outcome(status: int, body: bytes) -> Outcome:
    """The server's answer to the transaction as an outbox outcome."""
    text = body[:300].decode("utf-8", "replace")
    if status >= 500 or status in (408, 429):
        return Outcome.transient(f"HTTP {status}: {text}")
    if status >= 300:
        return Outcome.permanent_failure(f"HTTP {status}: {text}")
    try:
        answer = json.loads(body)
    except ValueError:
        return Outcome.transient(f"HTTP {status} without a JSON transaction-response")
    if not isinstance(answer, dict) or answer.get("type") != "transaction-response":
        return Outcome.transient(f"HTTP {status}: the answer is not a transaction-response Bundle")
    entries = answer.get("entry") or []
    bad = [
        str((e.get("response") or {}).get("status", "?"))
        for e in entries
        if not str((e.get("response") or {}).get("status", "")).strip().startswith("2")
    ]
    if bad:
        return Outcome.transient(f"HTTP {status}: entries not stored: {', '.join(bad)[:200]}")
    return Outcome.sent(None)


def post_bundle(dest: FhirDestination, bundle: dict[str, Any]) -> tuple[int, bytes]:
    """POSTs the bundle; returns (HTTP status, at most `MAX_RESPONSE_BYTES` of the answer)."""
    import httpx

    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    if dest.token:
        headers["Authorization"] = f"Bearer {dest.token}"
    auth = (dest.username, dest.password or "") if dest.username is not None else None
    with (
        httpx.Client(timeout=dest.timeout, verify=dest.verify_tls, auth=auth) as client,
        client.stream("POST", dest.url, content=json.dumps(bundle).encode("utf-8"), headers=headers) as rsp,
    ):
        body = b""
        for chunk in rsp.iter_bytes():
            body += chunk
            if len(body) > MAX_RESPONSE_BYTES:
                body = body[:MAX_RESPONSE_BYTES]
                break
        return rsp.status_code, body


def send_fhir(dest: FhirDestination, items: Sequence[Claimed], settings: Settings) -> Iterator[tuple[int, Outcome]]:
    """One transaction Bundle per item (each the SR of a finished job), one request each."""
    import httpx

    for it in items:
        got = report_message(
            settings, it, partial(build_bundle, dest=dest, tz=settings.site_timezone), "FHIR bundle invalid"
        )
        if isinstance(got, Outcome):
            yield it.id, got
            continue
        report, bundle = got
        try:
            status, body = post_bundle(dest, bundle)
        except httpx.TimeoutException:
            yield it.id, Outcome.transient(f"{dest.key}: no answer within {dest.timeout:g} s")
            continue
        except httpx.HTTPError as e:
            yield it.id, Outcome.transient(f"{dest.key}: {type(e).__name__}: {e}"[:500])
            continue
        outcome = response_outcome(status, body)
        if not outcome.ok:
            why = report.redact(f"{dest.key}: {outcome.error}")[:500]
            outcome = Outcome(False, outcome.permanent, outcome.status, why)
        log.debug("study %s: FHIR bundle to %s: %s", report.study_uid, dest.key, outcome)
        yield it.id, outcome
