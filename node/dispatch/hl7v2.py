"""The ``hl7`` destination: one HL7 v2.5.1 ORU^R01 per finished job, sent over MLLP, acknowledged by ACK.

The message (built and validated against the 2.5.1 ORU_R01 structure with hl7apy):

- MSH: sending/receiving application and facility from the destination, UTF-8 (MSH-18 ``UNICODE UTF-8``),
  message control ID ``MSK<outbox item id>`` (the same on every retry, so a receiver can drop a repeat);
- PID: patient ID (PID-3), name (PID-5, DICOM PN reordered as XPN; ``""``, the null value, when the
  study has none), birth date, sex;
- ORC ``RE`` and OBR: procedure ``363679005^Imaging procedure^SCT`` (the SR's procedure reported), filler
  order number = the SR's SOP Instance UID, accession number in OBR-18, result status F (C when the job
  supersedes an earlier one, i.e. this report corrects the earlier report);
- NTE after OBR: the "not for diagnostic use" notice;
- one OBX per finding (value type CWE): OBX-3 the finding's code, OBX-5 Present / Absent / Not Evaluated,
  all with the same codes as the SR (``node.results.codes``), OBX-8 ``A``/``N``, OBX-18 the model
  (``name version^MSKNODE``); an NTE after it with the model's weights hash, probability, grade, site
  or the reason it was not evaluated;
- a last OBX (ST) with the Study Instance UID (``110180^Study Instance UID^DCM``).

The ACK (read with the ``hl7`` package's MLLP streams, at most 64 KiB (`MAX_ACK_BYTES`), within the destination's
timeout): MSA-1 ``AA``/``CA`` → sent; ``AE``/``CE`` (application error) → retried with the outbox's
backoff, dead after its last attempt; ``AR``/``CR`` (rejected: wrong version, message type or
processing ID, which a retry of the same message cannot fix) → dead at once. No connection, no answer
in time, an answer that is not an ACK of this message → retried.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Iterator, Sequence
from functools import partial

from node.dispatch.reports import NOT_FOR_DIAGNOSTIC_USE, StudyReport, report_message
from node.dispatch.senders import Claimed, Outcome
from node.results import codes
from node.settings import Hl7Destination, Settings

log = logging.getLogger(__name__)

VERSION = "2.5.1"
MAX_ACK_BYTES = 64 * 1024
STUDY_UID_CODE = codes.dcm("110180", "Study Instance UID")
_SEX = {"M": "M", "F": "F", "O": "O"}


def escape(text: str) -> str:
    """Text as an HL7 v2 value with the default delimiters (``|^~\\&``) escaped (HL7 v2.5.1 2.7)."""
    out = text.replace("\\", "\\E\\")
    for ch, esc in (("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\")):
        out = out.replace(ch, esc)
    return " ".join(out.splitlines())


def _cwe(concept: codes.CodedConcept) -> str:
    return "^".join(escape(str(x)) for x in (concept.value, concept.meaning, concept.scheme_designator))


def _dtm(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y%m%d%H%M%S+0000")


def _xpn(pn: str | None) -> str:
    """A DICOM person name (family^given^middle^prefix^suffix) as HL7 XPN (family^given^middle^suffix^prefix)."""
    if not pn:
        return ""
    alphabetic = pn.split("=")[0]
    parts = (alphabetic.split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (escape(p.strip()) for p in parts)
    return "^".join([family, given, middle, suffix, prefix]).rstrip("^")


def build_oru(report: StudyReport, dest: Hl7Destination, control_id: str, *, now: dt.datetime | None = None) -> str:
    """The ORU^R01 of ``report`` as ER7 text (segments separated by CR), validated against HL7 2.5.1."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.core import Message

    now = now or dt.datetime.now(dt.UTC)
    status = "C" if report.corrects_earlier else "F"
    m = Message("ORU_R01", version=VERSION, validation_level=VALIDATION_LEVEL.STRICT)
    m.msh.msh_3 = escape(dest.sending_application)
    m.msh.msh_4 = escape(dest.sending_facility)
    m.msh.msh_5 = escape(dest.receiving_application)
    m.msh.msh_6 = escape(dest.receiving_facility)
    m.msh.msh_7 = _dtm(now)
    m.msh.msh_9 = "ORU^R01^ORU_R01"
    m.msh.msh_10 = escape(control_id)
    m.msh.msh_11 = "P"
    m.msh.msh_18 = "UNICODE UTF-8"
    pr = m.add_group("ORU_R01_PATIENT_RESULT")
    pid = pr.add_group("ORU_R01_PATIENT").pid
    pid.pid_1 = "1"
    pid.pid_3 = f"{escape(report.patient_id or 'UNKNOWN')}^^^^MR"
    pid.pid_5 = _xpn(report.patient_name) or '""'  # required; "" is HL7's explicit null (an anonymous study)
    if report.patient_birth_date:
        pid.pid_7 = escape(report.patient_birth_date)
    pid.pid_8 = _SEX.get((report.patient_sex or "").upper()[:1], "U")
    oo = pr.add_group("ORU_R01_ORDER_OBSERVATION")
    oo.orc.orc_1 = "RE"
    oo.orc.orc_3 = f"{escape(report.sr_sop_instance_uid)}^{escape(dest.sending_application)}"
    oo.orc.orc_5 = "CM"
    obr = oo.obr
    obr.obr_1 = "1"
    obr.obr_3 = f"{escape(report.sr_sop_instance_uid)}^{escape(dest.sending_application)}"
    obr.obr_4 = _cwe(codes.IMAGING_PROCEDURE)
    if report.study_datetime:
        obr.obr_7 = escape(report.study_datetime)
    if report.accession_number:
        obr.obr_18 = escape(report.accession_number)
    obr.obr_22 = _dtm(report.finished_at)
    obr.obr_24 = "RAD"
    obr.obr_25 = status
    note = oo.add_segment("NTE")
    note.nte_1 = "1"
    note.nte_3 = escape(NOT_FOR_DIAGNOSTIC_USE)
    n = 0
    for f in report.findings:
        n += 1
        obs = oo.add_group("ORU_R01_OBSERVATION")
        obx = obs.obx
        obx.obx_1 = str(n)
        obx.obx_2 = "CWE"
        obx.obx_3 = _cwe(f.concept)
        obx.obx_5 = _cwe(f.value)
        if f.evaluated:
            obx.obx_8 = "A" if f.positive else "N"
        obx.obx_11 = status
        obx.obx_14 = _dtm(report.finished_at)
        obx.obx_18 = f"{escape(f'{f.model_name} {f.model_version}')}^MSKNODE"
        nte = obs.add_segment("NTE")
        nte.nte_1 = "1"
        nte.nte_3 = escape(f.sentence())
    obs = oo.add_group("ORU_R01_OBSERVATION")
    obs.obx.obx_1 = str(n + 1)
    obs.obx.obx_2 = "ST"
    obs.obx.obx_3 = _cwe(STUDY_UID_CODE)
    obs.obx.obx_5 = escape(report.study_uid)
    obs.obx.obx_11 = status
    if not m.validate():  # raises with the reason when the structure is not ORU_R01 2.5.1
        raise ValueError("ORU^R01 does not validate against HL7 2.5.1")
    return str(m.to_er7())


def ack_outcome(ack: object, control_id: str) -> Outcome:
    """The receiver's answer (an ``hl7.Message``) as an outbox outcome."""
    try:
        msh9 = str(ack.segment("MSH")[9]).split("^")[0]  # type: ignore[attr-defined]  # ACK or ACK^R01^ACK
        msa = ack.segment("MSA")  # type: ignore[attr-defined]
        code = str(msa[1]).strip().upper()
        acked = str(msa[2]).strip()
    except (KeyError, IndexError, AttributeError) as e:
        return Outcome.transient(f"the answer is not an HL7 ACK: {e}")
    text = ""
    try:
        text = str(msa[3]).strip()
        err = ack.segment("ERR")  # type: ignore[attr-defined]
        text = text or str(err[8] or err[3]).strip()
    except (KeyError, IndexError):
        pass
    why = f": {text[:200]}" if text else ""
    if msh9 != "ACK":
        return Outcome.transient(f"the answer is {msh9[:10]}, not an ACK")
    if acked != control_id:
        return Outcome.transient(f"the ACK acknowledges message {acked[:20]!r}, not {control_id!r}")
    if code in ("AA", "CA"):
        return Outcome.sent(None)
    if code in ("AE", "CE"):
        return Outcome.transient(f"ACK {code} (application error){why}")
    if code in ("AR", "CR"):
        return Outcome.permanent_failure(f"ACK {code} (message rejected){why}")
    return Outcome.transient(f"ACK with unknown code {code[:4]!r}{why}")


async def _exchange(dest: Hl7Destination, message: str) -> object:
    from hl7.mllp import open_hl7_connection

    reader, writer = await open_hl7_connection(dest.host, dest.port, limit=MAX_ACK_BYTES, encoding="utf-8")
    try:
        writer.writemessage(message)
        await writer.drain()
        return await reader.readmessage()
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


def exchange(dest: Hl7Destination, message: str) -> object:
    """Sends ``message`` over MLLP and returns the parsed answer, all within ``dest.timeout`` seconds
    (in an event loop of its own: in a thread of its own when the caller's thread already runs one)."""

    def run() -> object:
        return asyncio.run(asyncio.wait_for(_exchange(dest, message), dest.timeout))

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return run()
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(run).result()


def control_id(item: Claimed) -> str:
    return f"MSK{item.id}"


def send_hl7(dest: Hl7Destination, items: Sequence[Claimed], settings: Settings) -> Iterator[tuple[int, Outcome]]:
    """One ORU^R01 per item (each the SR of a finished job), one MLLP connection per message."""
    for it in items:
        cid = control_id(it)
        got = report_message(settings, it, partial(build_oru, dest=dest, control_id=cid), "ORU^R01 could not be built")
        if isinstance(got, Outcome):
            yield it.id, got
            continue
        report, message = got
        try:
            ack = exchange(dest, message)
        except TimeoutError:
            yield it.id, Outcome.transient(f"{dest.key}: no ACK within {dest.timeout:g} s")
            continue
        except ConnectionRefusedError:
            yield it.id, Outcome.transient(f"{dest.key}: connection refused")
            continue
        except (OSError, EOFError, asyncio.IncompleteReadError) as e:
            yield it.id, Outcome.transient(f"{dest.key}: {type(e).__name__}: {e}"[:500])
            continue
        except Exception as e:  # too long (ValueError), not MLLP (InvalidBlockError), not HL7 (the parser's errors)
            why = report.redact(f"{dest.key}: unreadable answer: {type(e).__name__}: {e}")[:500]
            yield it.id, Outcome.transient(why)
            continue
        if ack is None:
            yield it.id, Outcome.transient(f"{dest.key}: connection closed without an ACK")
            continue
        outcome = ack_outcome(ack, cid)
        if not outcome.ok:
            why = report.redact(f"{dest.key}: {outcome.error}")
            outcome = Outcome(False, outcome.permanent, outcome.status, why)
        log.debug("study %s: ORU^R01 %s to %s: %s", report.study_uid, cid, dest.key, outcome)
        yield it.id, outcome
