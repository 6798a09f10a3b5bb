"""Matching workitems against a query (UPS C-FIND, PS3.4 CC.2.8 and C.1.2; UPS-RS search, PS3.18 11.9).

Both sides are DICOM JSON (PS3.18 F.2). A key with a value matches: single value (exact, for
dates/times also a range ``a-b``), wildcard ``*``/``?`` on text, a UID list; an empty key is
universal matching and only asks for the attribute back. A sequence key matches when one item of
the workitem's sequence matches every key of the query's item (one level, as C-FIND asks).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from node.db.schema import UpsWorkitem

JSON = dict[str, Any]

TRANSACTION_UID = "00081195"
SPECIFIC_CHARACTER_SET = "00080005"
PROCEDURE_STEP_STATE = "00741000"
PRIORITY = "00741200"
SOP_INSTANCE_UID = "00080018"
STUDY_INSTANCE_UID = "0020000D"
RANGE_VRS = ("DA", "DT", "TM")
WILDCARD_VRS = ("AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT")
MAX_KEYS = 200


def _values(element: JSON | None) -> list[Any]:
    if not element:
        return []
    vals = element.get("Value") or []
    out = []
    for v in vals:
        if isinstance(v, dict) and element.get("vr") == "PN":
            out.append(v.get("Alphabetic", ""))
        else:
            out.append(v)
    return out


def _wildcard(pattern: str) -> re.Pattern[str]:
    return re.compile(
        "^" + "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern) + "$", re.S
    )


def _match_element(query: JSON, stored: JSON | None) -> bool:
    vr = query.get("vr")
    qvals = _values(query)
    if not qvals:
        return True  # universal matching
    if vr == "SQ":
        items = (stored or {}).get("Value") or []
        qitem = qvals[0]
        if not isinstance(qitem, dict):
            return True
        return any(match(qitem, item) for item in items if isinstance(item, dict))
    svals = [str(v) for v in _values(stored)]
    if vr == "UI":
        wanted = {str(v) for q in qvals for v in str(q).split("\\")}
        return any(v in wanted for v in svals)
    q = str(qvals[0])
    if vr in RANGE_VRS and "-" in q:
        lo, hi = q.split("-", 1)
        return any((not lo or v[: len(lo)] >= lo) and (not hi or v[: len(hi)] <= hi) for v in svals)
    if vr in WILDCARD_VRS and ("*" in q or "?" in q):
        pat = _wildcard(q)
        return any(pat.match(v) for v in svals)
    return any(v == q for v in svals)


def match(query: JSON, stored: JSON) -> bool:
    """Does the stored workitem (DICOM JSON) match every key of the query?"""
    for tag, element in query.items():
        if tag in (SPECIFIC_CHARACTER_SET, TRANSACTION_UID) or not isinstance(element, dict):
            continue
        if not _match_element(element, stored.get(tag)):
            return False
    return True


def response(query: JSON, stored: JSON) -> JSON:
    """The matched workitem's values of the query's keys (an empty value where it has none)."""
    out: JSON = {}
    for tag, element in query.items():
        if tag == TRANSACTION_UID or not isinstance(element, dict):
            continue
        if tag == SPECIFIC_CHARACTER_SET:
            continue
        have = stored.get(tag)
        out[tag] = have if have is not None else {"vr": element.get("vr", "UN")}
    if SPECIFIC_CHARACTER_SET in stored:
        out[SPECIFIC_CHARACTER_SET] = stored[SPECIFIC_CHARACTER_SET]
    return out


def prefilter(query: JSON) -> Select[Any]:
    """The rows that can match: the indexed columns (state, priority, UID, study) narrowed in SQL."""
    q = select(UpsWorkitem)
    for tag, column in (
        (PROCEDURE_STEP_STATE, UpsWorkitem.state),
        (PRIORITY, UpsWorkitem.priority),
        (STUDY_INSTANCE_UID, UpsWorkitem.study_uid),
    ):
        vals = _values(query.get(tag))
        if vals and not any(c in str(vals[0]) for c in "*?"):
            q = q.where(column == str(vals[0]))
    uids = _values(query.get(SOP_INSTANCE_UID))
    if uids:
        q = q.where(UpsWorkitem.sop_instance_uid.in_([u for v in uids for u in str(v).split("\\")]))
    return q.order_by(UpsWorkitem.id)


PAGE = 500


def matches(session: Session, query: JSON) -> Iterator[UpsWorkitem]:
    """The matching workitems, oldest first, read a page at a time (never the whole table at once)."""
    last = 0
    while True:
        page = session.scalars(prefilter(query).where(UpsWorkitem.id > last).limit(PAGE)).all()
        for w in page:
            if match(query, w.dataset):
                yield w
        if len(page) < PAGE:
            return
        last = page[-1].id
