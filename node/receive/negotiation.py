"""Association negotiation in the listener process: what is accepted, and at what cost.

`configure_pynetdicom` sets the process-wide pynetdicom/pydicom options of a listener process.
Negotiation itself stays pynetdicom's; what changes is its cost per association. A peer
proposes the same presentation contexts every time (storescu: 128 SOP classes × 3 transfer
syntaxes), and pynetdicom checks every UID of them as a new value again, four times per
association (decoding the A-ASSOCIATE-RQ items, building their contexts, negotiating, encoding
the A-ASSOCIATE-AC): about 1,700 UID constructions and regular-expression checks, 7-8 ms of
CPU per association. The checks are pure functions of the value, so a listener process keeps
the outcome of each (`UidMemo`, bounded): the same contexts then cost about 3 ms.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, ClassVar

from pydicom.uid import UID

#: UIDs (and their check outcomes) kept per process; an attacker cycling through new UIDs only
#: empties the memo (it is cleared when full), it cannot grow it
UID_MEMO_LIMIT = 8192


def configure_pynetdicom() -> None:
    """Process-wide pynetdicom/pydicom options for the listener process.

    No per-PDU debug handlers (they cost CPU on every PDU); an unrestricted storage
    service: private and unknown SOP classes are accepted as storage (a PACS retries a
    refused object forever), but SOP classes known not to be storage only when the node serves
    them (`negotiate_storage`); no pydicom value validation (the listener stores bytes as
    received and checks what it indexes itself; validation warnings cost CPU per element);
    the UID checks of negotiation memoized (`UidMemo.install`).
    """
    import pynetdicom.acse
    from pydicom import config as pydicom_config
    from pynetdicom import _config

    from node.receive.transport import quiet_pynetdicom

    _config.LOG_HANDLER_LEVEL = "none"
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    pynetdicom.acse.negotiate_unrestricted = negotiate_storage
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    quiet_pynetdicom()
    UidMemo.install()


@functools.lru_cache(maxsize=4096)
def is_known_non_storage(uid: str) -> bool:
    """True for a SOP class pydicom knows that is not a storage SOP class (e.g. Modality Worklist
    FIND, Color Palette query/retrieve): pynetdicom's unrestricted storage negotiation takes every
    SOP class it has no service class of its own for as storage, these included."""
    from pydicom._uid_dict import UID_dictionary
    from pynetdicom.sop_class import _STORAGE_CLASSES

    entry = UID_dictionary.get(uid)
    if entry is None or entry[1] != "SOP Class" or uid in _STORAGE_CLASSES.values():
        return False
    return "Storage" not in entry[0]


def negotiate_storage(rq_contexts, ac_contexts, roles=None):
    """pynetdicom's unrestricted storage negotiation (every storage SOP class, private and unknown
    ones too, with the first transfer syntax proposed) except that a SOP class known not to be
    storage is negotiated against the supported contexts (Verification, the UPS classes) like any
    other service, and so refused unless the node serves it."""
    from pynetdicom.presentation import negotiate_as_acceptor, negotiate_unrestricted

    storage, other = [], []
    for cx in rq_contexts:
        (other if is_known_non_storage(str(cx.abstract_syntax)) else storage).append(cx)
    result, ac_roles = negotiate_unrestricted(storage, ac_contexts, roles)
    if other:
        other_result, other_roles = negotiate_as_acceptor(other, ac_contexts, roles)
        result = sorted(result + other_result, key=lambda cx: cx.context_id)
        ac_roles = ac_roles + other_roles
    return result, ac_roles


class UidMemo:
    """pynetdicom's UID checks, each done once per value and process.

    - `set_uid` (every UID of a PDU item, primitive or presentation context goes through it): the
      UID it returns for a str or bytes value and the same arguments is kept; a value it refuses
      (ValueError) is not, and is refused again each time.
    - `PresentationContext.add_transfer_syntax` (UID construction, two conformance checks, a
      transfer-syntax check per call): the UID it appended for a str value is kept, and a value
      seen before is appended (unless already there) without the checks.

    Only values are memoized, never a context, PDU or association: what each association
    negotiates is computed afresh from what its peer proposed.
    """

    _installed = False
    _lock = threading.Lock()
    _set_uid: ClassVar[dict[tuple, Any]] = {}
    _syntaxes: ClassVar[dict[str, UID]] = {}

    @classmethod
    def install(cls) -> None:
        """Wraps `set_uid` where pynetdicom's modules call it, and `add_transfer_syntax` (once per process)."""
        with cls._lock:
            if cls._installed:
                return
            import pynetdicom.dimse_primitives
            import pynetdicom.pdu_items
            import pynetdicom.pdu_primitives
            import pynetdicom.presentation
            import pynetdicom.utils

            original = pynetdicom.utils.set_uid
            memo = cls._memo_set_uid(original)
            for module in (
                pynetdicom.utils,
                pynetdicom.pdu_items,
                pynetdicom.pdu_primitives,
                pynetdicom.presentation,
                pynetdicom.dimse_primitives,
            ):
                if getattr(module, "set_uid", None) is original:
                    module.set_uid = memo  # type: ignore[attr-defined]
            context = pynetdicom.presentation.PresentationContext
            context.add_transfer_syntax = cls._memo_add_transfer_syntax(context.add_transfer_syntax)  # type: ignore[method-assign]
            cls._installed = True

    @classmethod
    def _memo_set_uid(cls, original: Callable[..., Any]) -> Callable[..., Any]:
        memo = cls._set_uid

        @functools.wraps(original)
        def set_uid(value, name, allow_empty=True, validate=True, allow_none=True):
            kind = type(value)
            if kind is not str and kind is not bytes and kind is not UID:
                return original(value, name, allow_empty, validate, allow_none)
            key = (kind is bytes, value, name, allow_empty, validate, allow_none)
            found = memo.get(key)
            if found is None:
                found = original(value, name, allow_empty, validate, allow_none)
                if found is not None:
                    if len(memo) >= UID_MEMO_LIMIT:
                        memo.clear()
                    memo[key] = found
            return found

        return set_uid

    @classmethod
    def _memo_add_transfer_syntax(cls, original: Callable[..., None]) -> Callable[..., None]:
        memo = cls._syntaxes

        @functools.wraps(original)
        def add_transfer_syntax(self, syntax) -> None:
            if isinstance(syntax, str):
                known = memo.get(syntax)
                if known is not None:
                    if known not in self._transfer_syntax:
                        self._transfer_syntax.append(known)
                    return
            before = len(self._transfer_syntax)
            original(self, syntax)
            if isinstance(syntax, str) and len(self._transfer_syntax) > before:
                if len(memo) >= UID_MEMO_LIMIT:
                    memo.clear()
                memo[str(syntax)] = self._transfer_syntax[-1]

        return add_transfer_syntax
