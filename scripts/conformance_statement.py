"""The DICOM conformance statement (docs/conformance.md), generated from the code and the running listener.

    .venv/bin/python scripts/conformance_statement.py            # print the generated Markdown
    .venv/bin/python scripts/conformance_statement.py --write    # replace docs/conformance.md

What the node accepts as SCP is not written down by hand: `negotiate` starts a real listener
(`node.receive.listener.Listener`, default settings, a temporary data dir) on a loopback port and
proposes every SOP class pynetdicom knows, plus an unknown one, each with every transfer syntax
pydicom knows, one presentation context per pair, and records what the A-ASSOCIATE-AC accepts and
the maximum PDU length it advertises. The association policies come from the same listener's AE
and `node.settings.Settings`; what the node sends as SCU from `node.results.objects.RESULT_SOP_CLASSES`
and `node.dispatch.senders.SEND_TRANSFER_SYNTAXES`. tests/test_conformance.py negotiates with
``msknode listen`` again and fails when the document says anything else.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OUT = ROOT / "docs" / "conformance.md"
#: a SOP class UID no table knows (under the default UID root): how the listener treats private classes
UNKNOWN_SOP_CLASS = "1.2.826.0.1.3680043.10.1447.999.1"
MAX_CONTEXTS = 128  # presentation contexts per A-ASSOCIATE-RQ (odd context IDs 1..255)


def known_sop_classes() -> dict[str, str]:
    """UID -> name of every SOP class pynetdicom has a table for (every service), and the unknown one."""
    import pynetdicom.sop_class as sc
    from pydicom.uid import UID

    out: dict[str, str] = {}
    for attr in sorted(dir(sc)):
        table = getattr(sc, attr)
        if (
            attr.startswith("_")
            and attr.endswith("_CLASSES")
            and attr != "_SERVICE_CLASSES"
            and isinstance(table, dict)
        ):
            for uid in table.values():
                out[str(uid)] = UID(uid).name
    out[UNKNOWN_SOP_CLASS] = "(a private or unknown SOP class)"
    return out


def all_transfer_syntaxes() -> list[str]:
    from pydicom.uid import AllTransferSyntaxes

    return [str(ts) for ts in AllTransferSyntaxes]


def uid_name(uid: str) -> str:
    from pydicom.uid import UID

    return UID(uid).name


@dataclass
class Negotiated:
    """What one listener accepted: SOP class -> accepted transfer syntaxes, and its A-ASSOCIATE-AC values."""

    accepted: dict[str, set[str]] = field(default_factory=dict)
    max_pdu_length: int | None = None
    rejected_calling_ae: bool | None = None


def negotiate(host: str, port: int, called_ae: str, *, calling_ae: str = "CONFORMANCE") -> Negotiated:
    """Proposes every (SOP class, transfer syntax) pair to the listener at host:port, one context each."""
    from pynetdicom import AE, build_context

    pairs = [(sop, ts) for sop in known_sop_classes() for ts in all_transfer_syntaxes()]
    result = Negotiated()
    # every association also proposes Verification (Implicit VR LE), so it is established even when the
    # listener refuses all the other contexts of a batch (pynetdicom aborts one with no context accepted)
    anchor = ("1.2.840.10008.1.1", "1.2.840.10008.1.2")
    step = MAX_CONTEXTS - 1
    for start in range(0, len(pairs), step):
        ae = AE(ae_title=calling_ae)
        ae.acse_timeout = ae.network_timeout = 30
        batch = [anchor, *[p for p in pairs[start : start + step] if p != anchor]]
        ae.requested_contexts = [build_context(sop, ts) for sop, ts in batch]
        assoc = ae.associate(host, port, ae_title=called_ae)
        if not assoc.is_established:
            raise RuntimeError(f"the listener at {host}:{port} did not accept the association")
        try:
            result.max_pdu_length = assoc.acceptor.maximum_length
            for cx in assoc.accepted_contexts:
                result.accepted.setdefault(str(cx.abstract_syntax), set()).add(str(cx.transfer_syntax[0]))
        finally:
            assoc.release()
    return result


@dataclass
class ListenerFacts:
    negotiated: Negotiated
    ae: dict[str, Any]
    tls: dict[str, str] = field(default_factory=dict)


def tls_facts(settings: Any, tmp: Path) -> dict[str, str]:
    """The listener's TLS context (`node.receive.listener.listener_ssl_context`) for a throw-away
    self-signed certificate used as certificate and CA: its minimum version and client verification."""
    import ssl
    import subprocess

    from node.receive.listener import listener_ssl_context

    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=conformance"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    plain = listener_ssl_context(
        settings.model_copy(update={"listener_tls_cert_file": cert, "listener_tls_key_file": key})
    )
    mutual = listener_ssl_context(
        settings.model_copy(
            update={"listener_tls_cert_file": cert, "listener_tls_key_file": key, "listener_tls_ca_file": cert}
        )
    )
    names = {ssl.TLSVersion.TLSv1_2: "TLS 1.2", ssl.TLSVersion.TLSv1_3: "TLS 1.3"}
    verify = {ssl.CERT_NONE: "not asked for", ssl.CERT_OPTIONAL: "verified if sent", ssl.CERT_REQUIRED: "required"}
    return {
        "minimum": names.get(plain.minimum_version, str(plain.minimum_version.name)),
        "client_without_ca": verify[plain.verify_mode],
        "client_with_ca": verify[mutual.verify_mode],
    }


def probe_listener() -> ListenerFacts:
    """Starts a listener with the default settings in a temporary data dir, negotiates, stops it."""
    import os

    from node.settings import load_settings

    saved = {k: os.environ.pop(k) for k in [k for k in os.environ if k.startswith("MSKNODE_")]}
    try:  # the defaults, not this shell's configuration
        return _probe(load_settings)
    finally:
        os.environ.update(saved)


def _probe(load_settings: Any) -> ListenerFacts:
    import socket

    from node.db.database import Database
    from node.receive.listener import Listener

    with tempfile.TemporaryDirectory() as tmp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        settings = load_settings(data_dir=Path(tmp) / "data", host="127.0.0.1", port=port)
        settings.ensure_dirs()
        db = Database(settings.database_url)
        listener = Listener(settings, db=db)
        server = listener.start()
        try:
            ae = server.ae
            facts = {
                "ae_title": settings.ae_title,
                "maximum_pdu_size": ae.maximum_pdu_size,
                "maximum_associations": ae.maximum_associations,
                "acse_timeout": ae.acse_timeout,
                "dimse_timeout": ae.dimse_timeout,
                "network_timeout": ae.network_timeout,
                "require_called_aet": ae.require_called_aet,
                "require_calling_aet": list(ae.require_calling_aet),
                "request_timeout": getattr(server, "request_timeout", None),
            }
            negotiated = negotiate("127.0.0.1", port, settings.ae_title)
        finally:
            listener.stop(grace=2)
            db.dispose()
        tls = tls_facts(settings, Path(tmp))
    return ListenerFacts(negotiated, facts, tls)


# ---- rendering ----------------------------------------------------------------------------------------


def _ts_list(tss: set[str] | list[str] | tuple[str, ...]) -> str:
    return ", ".join(f"{uid_name(t)} (`{t}`)" for t in sorted(tss, key=lambda t: [int(x) for x in t.split(".")]))


def scp_groups(neg: Negotiated) -> list[tuple[set[str], list[str]]]:
    """SOP classes grouped by the set of transfer syntaxes accepted for them (largest group first)."""
    groups: dict[frozenset[str], list[str]] = {}
    for sop, tss in neg.accepted.items():
        groups.setdefault(frozenset(tss), []).append(sop)
    return sorted(((set(k), sorted(v)) for k, v in groups.items()), key=lambda g: -len(g[1]))


def render(facts: ListenerFacts) -> str:
    from pynetdicom import AE
    from pynetdicom.sop_class import _STORAGE_CLASSES  # type: ignore[attr-defined]

    from node.dispatch.senders import SEND_TRANSFER_SYNTAXES
    from node.results.objects import RESULT_SOP_CLASSES
    from node.settings import Settings

    defaults = Settings.model_fields
    neg, ae = facts.negotiated, facts.ae
    names = known_sop_classes()
    storage = {str(u) for u in _STORAGE_CLASSES.values()} | {UNKNOWN_SOP_CLASS}
    all_ts = all_transfer_syntaxes()
    refused = sorted(set(names) - set(neg.accepted))
    lines: list[str] = []
    w = lines.append

    w("# DICOM conformance statement")
    w("")
    w("<!-- generated by scripts/conformance_statement.py from the code and a running listener: do not edit;")
    w("     tests/test_conformance.py checks it against what `msknode listen` negotiates -->")
    w("")
    w("msknode, a clinical AI node beside a hospital PACS: it receives MR studies, runs the MSK models and")
    w("sends their results back (SR, SEG, secondary capture overlays, super-resolved MR series) by C-STORE")
    w("or STOW-RS, and as HL7 v2 ORU^R01 or FHIR R4 reports. This statement follows the outline of")
    w("DICOM PS3.2 (Conformance); section 6 adds the IHE actors and section 7 the HL7 and FHIR interfaces.")
    w("Values are the defaults; the setting that changes each one is named (docs/configuration.md).")
    w("")
    w("## 1. Overview")
    w("")
    w("| Service | Role | Where |")
    w("| --- | --- | --- |")
    w("| Verification | SCP | the DICOM listener (`msknode listen`) |")
    w("| Storage (every storage SOP class, private and unknown ones too) | SCP | the DICOM listener |")
    ups = [s for s in neg.accepted if names.get(s, "").startswith("Unified Procedure Step")]
    if ups:
        w("| Unified Procedure Step (Push, Pull, Watch, Event, Query) | SCP | the DICOM listener |")
        w("| Unified Procedure Step - Event (N-EVENT-REPORT to subscribers) | SCU | the worker's UPS loop |")
    w(f"| Storage ({len(RESULT_SOP_CLASSES)} SOP classes of our results) | SCU | the outbox (`dimse` destinations) |")
    w("| STOW-RS of our results | user agent | the outbox (`stow` destinations) |")
    w("")
    w("## 2. Networking: application entity")
    w("")
    w(
        f"One application entity, AE title `{ae['ae_title']}` (`MSKNODE_AE_TITLE`), on TCP port "
        f"{defaults['port'].default} (`MSKNODE_PORT`). It is SCP for everything in 2.1 and the SCU of 2.2."
    )
    w("")
    w("### 2.1 SOP classes accepted (SCP)")
    w("")
    w("Each row is what the listener answered when offered that SOP class with each transfer syntax pydicom")
    w(f"knows ({len(all_ts)}), one presentation context per pair. Storage SOP classes accept the first transfer")
    w("syntax proposed in a context, whatever it is, and the object is stored byte for byte as received (a PACS")
    w("retries a refused object forever); SOP classes pynetdicom does not know are taken as storage.")
    w("")
    for n, (tss, sops) in enumerate(scp_groups(neg), start=1):
        kind = "storage" if set(sops) & storage else "other services"
        w(f"#### 2.1.{n} {len(sops)} SOP classes ({kind})")
        w("")
        if tss == set(all_ts):
            w(f"Transfer syntaxes accepted: all {len(all_ts)} proposed (see 2.3).")
        else:
            w(f"Transfer syntaxes accepted: {_ts_list(tss)}.")
        w("")
        odd = sorted(set(sops) - storage)
        if odd and kind == "storage":
            w(
                "Of these, "
                + ", ".join(f"{names.get(u, u)} (`{u}`)" for u in odd)
                + " are not storage SOP classes: pynetdicom's unrestricted storage negotiation accepts them as if "
                "they were (it finds no service class of its own for them), and the node offers no service for "
                "them (a request gets a failure status)."
            )
            w("")
        w("| SOP class | UID | Role |")
        w("| --- | --- | --- |")
        for sop in sorted(sops, key=lambda u: names.get(u, u)):
            w(f"| {names.get(sop, sop)} | `{sop}` | SCP |")
        w("")
    w(f"#### 2.1.{len(scp_groups(neg)) + 1} Refused")
    w("")
    w(f"Every other SOP class pynetdicom knows ({len(refused)}, e.g. query/retrieve, worklist, print, storage")
    w("commitment) is refused in the A-ASSOCIATE-AC (abstract syntax not supported): the node is not a PACS.")
    w("")
    w("<details><summary>The refused SOP classes</summary>")
    w("")
    w("| SOP class | UID |")
    w("| --- | --- |")
    for sop in sorted(refused, key=lambda u: names.get(u, u)):
        w(f"| {names.get(sop, sop)} | `{sop}` |")
    w("")
    w("</details>")
    w("")
    w("### 2.2 SOP classes sent (SCU)")
    w("")
    w("The outbox sends each result object to each `dimse` destination by C-STORE, one association per")
    w("destination and batch, proposing for each SOP class the transfer syntaxes below, each in a presentation")
    w("context of its own. An object goes out as its file's encoded data set, unchanged, when the peer accepted")
    w("the file's transfer syntax (Explicit VR Little Endian) for its SOP class; otherwise it is encoded in the")
    w("accepted one.")
    w("")
    w("| Result | SOP class | UID | Role |")
    w("| --- | --- | --- | --- |")
    for kind, sop in RESULT_SOP_CLASSES.items():
        w(f"| {kind} | {uid_name(sop)} | `{sop}` | SCU |")
    w("")
    w(f"Transfer syntaxes proposed: {', '.join(f'{uid_name(t)} (`{t}`)' for t in SEND_TRANSFER_SYNTAXES)}.")
    w("")
    if ups:
        from pynetdicom.presentation import DEFAULT_TRANSFER_SYNTAXES

        from node.ups.workitems import UPS_EVENT

        w(
            f"UPS events: N-EVENT-REPORT of the {uid_name(UPS_EVENT)} (`{UPS_EVENT}`) as SCU to each subscriber, "
            "at the address `MSKNODE_UPS_EVENT_RECEIVERS` gives for its AE title (never one a peer names), "
            f"proposing {_ts_list(DEFAULT_TRANSFER_SYNTAXES)}; see [ups.md](ups.md)."
        )
        w("")
    w("C-STORE response statuses: success and the warnings 0xB000, 0xB006, 0xB007 are acknowledged;")
    w("0xA7xx (out of resources) and 0x0110 are retried with backoff; 0x0122, 0x0124, 0x0117, 0xA9xx and")
    w("0xCxxx are permanent (dead letter, `msknode outbox retry ID` after a fix); see node/dispatch/senders.py.")
    w("")
    w("### 2.3 Transfer syntaxes")
    w("")
    w("| Transfer syntax | UID | Accepted for storage (SCP) | Proposed (SCU) |")
    w("| --- | --- | --- | --- |")
    accepted_storage: set[str] = set()
    for sop in neg.accepted:
        if sop in storage:
            accepted_storage |= neg.accepted[sop]
    for ts in all_ts:
        w(
            f"| {uid_name(ts)} | `{ts}` | {'yes' if ts in accepted_storage else 'no'} | "
            f"{'yes' if ts in SEND_TRANSFER_SYNTAXES else 'no'} |"
        )
    w("")
    w("### 2.4 Association policies")
    w("")
    procs = defaults["listener_processes"].default
    w("| Policy | Value | Setting |")
    w("| --- | --- | --- |")
    w(
        f"| Maximum PDU length received (advertised in A-ASSOCIATE-AC) | {neg.max_pdu_length} bytes | `MSKNODE_MAX_PDU_LENGTH` |"
    )
    w(f"| Maximum PDU length sent (SCU) | as the peer advertises; received: {AE().maximum_pdu_size} bytes | |")
    w(
        f"| Concurrent associations | {ae['maximum_associations']} per listener process, {procs} processes "
        "| `MSKNODE_MAX_ASSOCIATIONS`, `MSKNODE_LISTENER_PROCESSES` |"
    )
    w(
        f"| Time for a connection's complete A-ASSOCIATE-RQ | {ae['request_timeout']:g} s "
        "| `MSKNODE_ASSOCIATION_REQUEST_TIMEOUT` |"
    )
    w(
        f"| Connections of one address before their A-ASSOCIATE-RQ | {defaults['negotiating_per_address'].default} | `MSKNODE_NEGOTIATING_PER_ADDRESS` |"
    )
    w(f"| ACSE timeout | {ae['acse_timeout']:g} s | |")
    w(f"| DIMSE timeout | {ae['dimse_timeout']:g} s | `MSKNODE_DIMSE_TIMEOUT` |")
    w(f"| Network (ARTIM) timeout | {ae['network_timeout']:g} s | `MSKNODE_NETWORK_TIMEOUT` |")
    called = "checked: another called AE title is rejected (rejected-permanent, called AE title not recognised)"
    w(
        f"| Called AE title | {called if ae['require_called_aet'] else 'not checked'} "
        "| `MSKNODE_REQUIRE_CALLED_AE_TITLE` |"
    )
    calling = ", ".join(ae["require_calling_aet"]) or "any (empty allow-list)"
    w(
        f"| Calling AE titles | {calling}; a title outside a non-empty list is rejected (rejected-permanent, "
        "calling AE title not recognised) | `MSKNODE_ALLOWED_AE_TITLES` |"
    )
    w("| Low disk | new associations rejected-transient; C-STORE answers 0xA700 | `MSKNODE_MIN_FREE_GB` |")
    w(
        f"| Largest data set per C-STORE | {defaults['max_object_mb'].default} MB (0xA700 beyond) | `MSKNODE_MAX_OBJECT_MB` |"
    )
    w("| Asynchronous operations | not supported (one outstanding operation each way) | |")
    w("| SCP/SCU role selection | accepted as proposed for storage classes | |")
    w("")
    w("### 2.5 Implementation identification")
    w("")
    w("| | |")
    w("| --- | --- |")
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

    w(f"| Implementation Class UID | `{PYNETDICOM_IMPLEMENTATION_UID}` (pynetdicom) |")
    w(f"| Implementation Version Name | `{PYNETDICOM_IMPLEMENTATION_VERSION}` |")
    w(f"| UID root of the objects the node creates | `{defaults['uid_root'].default}` (`MSKNODE_UID_ROOT`) |")
    w("")
    w("### 2.6 Web services")
    w("")
    w("The node serves no DICOMweb (QIDO-RS, WADO-RS, STOW-RS) of its own: its results are read from the PACS")
    w("they were sent to, see [dicomweb.md](dicomweb.md). As a user agent it sends STOW-RS (`stow` destinations).")
    if ups:
        w("UPS-RS (search and retrieve of workitems, behind the web login) is described in [ups.md](ups.md).")
    w("")
    w("## 3. Media interchange")
    w("")
    w("None: the node reads and writes no DICOM media.")
    w("")
    w("## 4. Character sets")
    w("")
    w("Received objects are stored as received, with any Specific Character Set. The node's result objects")
    w("carry the source study's Specific Character Set when pydicom knows every term of it, else their text")
    w("is re-encoded and declared as `ISO_IR 192` (UTF-8) (node/results/sanitize.py). HL7 messages are UTF-8")
    w("(MSH-18 `UNICODE UTF-8`); FHIR is JSON in UTF-8.")
    w("")
    w("## 5. Security")
    w("")
    w("| | |")
    w("| --- | --- |")
    tls = facts.tls
    w(
        "| DICOM TLS (PS3.15 B.1) | off by default; with `MSKNODE_LISTENER_TLS_CERT_FILE` and "
        f"`MSKNODE_LISTENER_TLS_KEY_FILE` the listener speaks TLS only, {tls['minimum']} or later; a client "
        f"certificate is {tls['client_without_ca']}, and {tls['client_with_ca']} (signed by it) with "
        '`MSKNODE_LISTENER_TLS_CA_FILE`. `dimse` destinations: `"tls": true` with `tls_ca_file` (and '
        "`tls_cert_file`/`tls_key_file` for a client certificate) |"
    )
    w("| Access control | calling and called AE title checks (2.4); the web UI and API need a login |")
    w(
        "| Audit | every association and refusal is recorded with AE titles, addresses and UIDs; logs never carry patient names or IDs |"
    )
    w("| De-identification | none: results go back to the hospital's own systems |")
    w("")
    w("## 6. IHE integration profiles")
    w("")
    w("| Profile | Actor | What the node does |")
    w("| --- | --- | --- |")
    w(
        "| AI Results (AIR) | Evidence Creator | stores its results as DICOM objects in the study: "
        "Comprehensive 3D SR (TID 1500 measurement report: findings, qualitative evaluations, probabilities, "
        "the algorithm's name, version and weights hash), Segmentation, secondary capture overlays; by "
        "C-STORE (2.2) or STOW-RS to the Image Manager/Archive |"
    )
    if ups:
        w(
            "| AI Workflow for Imaging (AIW-I) | Task Manager and Task Performer of its own AI jobs; serves "
            "Watchers | one UPS per AI job: SCHEDULED when routed, IN PROGRESS when it runs, COMPLETED with "
            "references to the SR/SEG, CANCELED on failure; UPS SOP classes over DIMSE (2.1), UPS-RS search and "
            "retrieve; what is and is not supported, transaction by transaction: [ups.md](ups.md) |"
        )
    else:
        w("| AI Workflow for Imaging (AIW-I) | none yet | the listener accepts no UPS SOP class |")
    w("")
    w("## 7. HL7 v2 and FHIR interfaces")
    w("")
    w("| Interface | Message | Transport | Acknowledgement |")
    w("| --- | --- | --- | --- |")
    w(
        "| `hl7` destination | ORU^R01 HL7 2.5.1, one per finished job: PID, ORC/OBR (filler order number = "
        'SR SOP Instance UID, accession in OBR-18, status F or C), a "not for diagnostic use" NTE, one OBX (CWE) '
        "per finding with the SR's codes, the model in OBX-18 and an NTE with weights hash and probability, "
        "an OBX with the Study Instance UID | MLLP over TCP | original mode: AA sent; AE retried; AR dead letter |"
    )
    w(
        "| `fhir` destination | FHIR R4 transaction Bundle: DiagnosticReport (identifier = SR SOP Instance UID, "
        "imagingStudy by `urn:dicom:uid` identifier) + one Observation per finding, conditional creates | "
        "HTTP(S) POST to the base URL | 2xx transaction-response sent; 5xx/408/429 retried; other 4xx dead letter |"
    )
    w("")
    w("Both go through the outbox like every result object: durable, retried with backoff, dead-lettered,")
    w("listed by `msknode outbox` and in the web admin (node/dispatch/hl7v2.py, node/dispatch/fhir.py).")
    w("")
    import node.dispatch.fhir as fhir
    import node.dispatch.hl7v2 as hl7v2

    for title, module in (("7.1 HL7 v2 ORU^R01", hl7v2), ("7.2 FHIR R4", fhir)):
        w(f"### {title}")
        w("")
        doc = (module.__doc__ or "").strip().split("\n", 1)[1].strip()  # the docstring after its first line
        w(doc.replace("``", "`"))
        w("")
    w("Code systems in the FHIR resources (the SR's coding scheme designators; the private codes are listed")
    w("in node/results/CODES.md):")
    w("")
    w("| Coding scheme designator | FHIR system |")
    w("| --- | --- |")
    for designator, system in fhir.SYSTEMS.items():
        w(f"| {designator} | `{system}` |")
    w("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="replace docs/conformance.md")
    args = ap.parse_args()
    text = render(probe_listener())
    if args.write:
        OUT.write_text(text, encoding="utf-8")
        print(f"wrote {OUT.relative_to(ROOT)}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
