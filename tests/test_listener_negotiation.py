"""Association negotiation in a listener process: pynetdicom's UID checks done once per value
(`node.receive.negotiation.UidMemo`), with the same outcome as without.

Each side runs in a fresh interpreter (the memo is process-wide): an A-ASSOCIATE-RQ as storescu
sends it (128 presentation contexts: storage SOP classes with three transfer syntaxes each, a
private SOP class, Modality Worklist FIND) is decoded, negotiated by the listener's
`negotiate_storage` and answered with an A-ASSOCIATE-AC, twice.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext

ROOT = Path(__file__).resolve().parents[1]

NEGOTIATE = r"""
import json, sys
from node.receive import negotiation
if sys.argv[2] == "plain":
    negotiation.UidMemo.install = classmethod(lambda cls: None)
negotiation.configure_pynetdicom()
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import Verification

data = open(sys.argv[1], "rb").read()
ae = AE()
ae.add_supported_context(Verification)

def negotiate():
    rq = A_ASSOCIATE_RQ()
    rq.decode(data)
    prim = rq.to_primitive()
    result, _ = negotiation.negotiate_storage(prim.presentation_context_definition_list, ae.supported_contexts, {})
    ac = A_ASSOCIATE()
    ac.application_context_name = prim.application_context_name
    ac.calling_ae_title, ac.called_ae_title = prim.calling_ae_title, prim.called_ae_title
    ac.result = 0
    ac.presentation_context_definition_results_list = result
    ac.user_information = prim.user_information
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(ac)
    return prim, result, pdu.encode()

first, second = negotiate(), negotiate()
print(json.dumps({
    "ac": [first[2].hex(), second[2].hex()],
    "accepted": sorted(cx.context_id for cx in first[1] if cx.result == 0),
    "same_abstract_syntaxes": all(
        a.abstract_syntax is b.abstract_syntax
        for a, b in zip(first[0].presentation_context_definition_list, second[0].presentation_context_definition_list)
    ),
    "same_transfer_syntaxes": all(
        a.transfer_syntax[0] is b.transfer_syntax[0] for a, b in zip(first[1], second[1]) if a.transfer_syntax
    ),
}))
"""


def storescu_like_request() -> bytes:
    syntaxes = [ExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian]
    sop_classes = [cx.abstract_syntax for cx in AllStoragePresentationContexts][:126]
    sop_classes += ["1.2.826.0.1.3680043.8.498.77.1", "1.2.840.10008.5.1.4.31"]  # private; worklist FIND
    contexts = []
    for i, uid in enumerate(sop_classes):
        cx = PresentationContext()
        cx.context_id = 2 * i + 1
        cx.abstract_syntax = uid
        for ts in syntaxes:
            cx.add_transfer_syntax(ts)
        contexts.append(cx)
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = "STORESCU", "MSKNODE"
    primitive.presentation_context_definition_list = contexts
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.276.0.7230010.3.0.3.6.7"
    primitive.user_information = [max_length, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def negotiated(request: Path, mode: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", NEGOTIATE, str(request), mode],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_negotiation_checks_each_uid_once_per_process_with_pynetdicoms_outcome(tmp_path):
    request = tmp_path / "a-associate-rq.bin"
    request.write_bytes(storescu_like_request())
    plain, memo = negotiated(request, "plain"), negotiated(request, "memo")
    # the same A-ASSOCIATE-AC, byte for byte, with and without the memo, for a first and a repeated request
    assert memo["ac"] == plain["ac"] and plain["ac"][0] == plain["ac"][1]
    assert memo["accepted"] == plain["accepted"]
    assert len(plain["accepted"]) == 127 and 255 not in plain["accepted"]  # worklist FIND refused, the rest stored
    # a repeated request reuses the UIDs checked for the first (pynetdicom alone builds them anew)
    assert memo["same_abstract_syntaxes"] and memo["same_transfer_syntaxes"]
    assert not plain["same_abstract_syntaxes"] and not plain["same_transfer_syntaxes"]


def test_the_memo_is_bounded_and_keeps_no_refused_value():
    """A peer cycling through new UIDs empties the memo instead of growing it; a UID pynetdicom
    refuses is refused again each time (nothing is kept for it)."""
    import pytest
    from pynetdicom import utils

    from node.receive.negotiation import UID_MEMO_LIMIT, UidMemo

    UidMemo.install()
    for i in range(UID_MEMO_LIMIT + 10):
        utils.set_uid(f"1.2.826.0.1.3680043.8.498.{i}", "Abstract Syntax Name")
        assert len(UidMemo._set_uid) <= UID_MEMO_LIMIT
    kept = len(UidMemo._set_uid)
    for _ in range(2):
        with pytest.raises(ValueError):
            utils.set_uid("1." * 40, "Abstract Syntax Name")  # 80 characters
    assert len(UidMemo._set_uid) == kept
