"""UPS over DIMSE on the listener's AE: N-CREATE, N-SET, N-GET, N-ACTION, C-FIND (PS3.4 CC).

`add_ups_service(ae, handlers, db, settings)` adds the UPS Push, Pull, Watch, Event and Query SOP
classes to an AE and the handlers to its list; the listener calls it, so UPS peers pass the same
AE-title allow-list as everything else. The handlers are thin: read the request, call
`node.ups.workitems` in one transaction, answer a PS3.4 CC status. Logs carry UIDs and AE titles,
never patient data.

Who may do what:

- the node's own workitems (one per AI job) are performed by the node: a peer reads them (N-GET,
  C-FIND), subscribes to them, and may ask to cancel (refused: 0xC313, the performer does not
  cancel an AI job from outside); claiming or modifying them is refused (0x0124 while SCHEDULED,
  0xC301 — the Transaction UID is the node's — while IN PROGRESS, 0xC300 once final);
- a workitem a peer created by N-CREATE is a plain UPS the node manages for others (Task Manager):
  claimed with a Transaction UID, changed by N-SET, completed or canceled per PS3.4 Table CC.1.1-2.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from itertools import islice
from typing import Any

from pydicom import Dataset
from pynetdicom import evt
from sqlalchemy import select

from node.db.database import Database, utcnow
from node.db.schema import UpsSubscription, UpsWorkitem
from node.settings import Settings
from node.ups import query, workitems
from node.ups.errors import UpsRefused
from node.ups.workitems import (
    CANCELED,
    COMPLETED,
    FINAL_STATES,
    GLOBAL_SUBSCRIPTION,
    GLOBAL_SUBSCRIPTION_LOCKED,
    IN_PROGRESS,
    SCHEDULED,
    UPS_SOP_CLASSES,
)

log = logging.getLogger("node.ups.dimse")

SUCCESS = 0x0000
PENDING = 0xFF00
CANCEL = 0xFE00
PROCESSING_FAILURE = 0x0110
NOT_AUTHORIZED = 0x0124
INVALID_ATTRIBUTE_VALUE = 0x0106
MISSING_ATTRIBUTE = 0x0120
DUPLICATE_INSTANCE = 0x0111
NO_SUCH_ACTION = 0x0123
OUT_OF_RESOURCES = 0xA700
IDENTIFIER_MISMATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000

MAX_DATASET_BYTES = 1 << 20  # an N-CREATE / N-SET attribute list larger than this is refused
MAX_FIND_RESULTS = 1000
MAX_INITIAL_REPORTS = 1000
#: attributes a peer's N-SET may not change (PS3.4 Table CC.2.5-3: "Not allowed" for N-SET)
NOT_SETTABLE = (
    "00080016",  # SOP Class UID
    "00080018",  # SOP Instance UID
    "00741000",  # Procedure Step State (N-ACTION changes it)
    "00081195",  # Transaction UID
)


def add_ups_service(ae: Any, handlers: list[Any], db: Database, settings: Settings) -> UpsService:
    """Adds the UPS SOP classes (SCP) and their handlers to the AE and its handler list."""
    for uid in UPS_SOP_CLASSES:
        ae.add_supported_context(uid)
    service = UpsService(db, settings)
    handlers.extend(
        [
            (evt.EVT_N_CREATE, service.on_n_create),
            (evt.EVT_N_SET, service.on_n_set),
            (evt.EVT_N_GET, service.on_n_get),
            (evt.EVT_N_ACTION, service.on_n_action),
            (evt.EVT_C_FIND, service.on_c_find),
        ]
    )
    return service


def _calling(event: Any) -> str:
    return (event.assoc.requestor.ae_title or "").strip()


def _is_ups(event: Any) -> bool:
    return str(event.context.abstract_syntax) in UPS_SOP_CLASSES


def _size(ds: Dataset) -> int:
    return len(json.dumps(workitems.to_json(ds)))


class UpsService:
    def __init__(self, db: Database, settings: Settings):
        self.db = db
        self.settings = settings

    # ---- N-CREATE: a peer schedules a workitem (UPS Push) -----------------------------------------
    def on_n_create(self, event: Any) -> tuple[int, Dataset | None]:
        if not _is_ups(event):
            return UNABLE_TO_PROCESS, None
        try:
            ds = event.attribute_list
            if _size(ds) > MAX_DATASET_BYTES:
                return OUT_OF_RESOURCES, None
            uid = str(event.request.AffectedSOPInstanceUID or "") or None
            with self.db.session() as s:
                w = create_from_peer(s, ds, uid, calling=_calling(event))
                return SUCCESS, workitems.dataset_of(w)
        except UpsRefused as e:
            log.warning("N-CREATE from %s refused (0x%04X): %s", _calling(event), e.status, e)
            return e.status, None
        except Exception as e:
            log.error("N-CREATE from %s failed: %s", _calling(event), type(e).__name__)
            return PROCESSING_FAILURE, None

    # ---- N-GET: a workitem's attributes -------------------------------------------------------------
    def on_n_get(self, event: Any) -> tuple[int, Dataset | None]:
        if not _is_ups(event):
            return UNABLE_TO_PROCESS, None
        uid = str(event.request.RequestedSOPInstanceUID or "")
        try:
            with self.db.session() as s:
                ds = workitems.dataset_of(workitems.get(s, uid))
        except UpsRefused as e:
            return e.status, None
        wanted = list(event.request.AttributeIdentifierList or [])
        if wanted:
            out = Dataset()
            for tag in wanted:
                if int(tag) in ds and int(tag) != 0x00081195:
                    out[tag] = ds[tag]
            if "SpecificCharacterSet" in ds:
                out.SpecificCharacterSet = ds.SpecificCharacterSet
            ds = out
        return SUCCESS, ds

    # ---- N-SET: a peer changes its own workitem ------------------------------------------------------------
    def on_n_set(self, event: Any) -> tuple[int, Dataset | None]:
        if not _is_ups(event):
            return UNABLE_TO_PROCESS, None
        uid = str(event.request.RequestedSOPInstanceUID or "")
        try:
            mods = event.modification_list
            if _size(mods) > MAX_DATASET_BYTES:
                return OUT_OF_RESOURCES, None
            with self.db.session() as s:
                w = workitems.get(s, uid)
                set_from_peer(s, w, mods)
                return SUCCESS, None
        except UpsRefused as e:
            log.warning("N-SET of UPS %s from %s refused (0x%04X): %s", uid, _calling(event), e.status, e)
            return e.status, None
        except Exception as e:
            log.error("N-SET of UPS %s from %s failed: %s", uid, _calling(event), type(e).__name__)
            return PROCESSING_FAILURE, None

    # ---- N-ACTION: change state, request cancel, subscribe, unsubscribe, suspend global ---------------------
    def on_n_action(self, event: Any) -> tuple[int, Dataset | None]:
        if not _is_ups(event):
            return UNABLE_TO_PROCESS, None
        uid = str(event.request.RequestedSOPInstanceUID or "")
        action = int(event.action_type or 0)
        calling = _calling(event)
        try:
            try:
                info = event.action_information
            except Exception:  # no Action Information (a request cancel may carry none)
                info = None
            with self.db.session() as s:
                status = action_from_peer(s, self.settings, uid, action, info, calling=calling)
            return status, None
        except UpsRefused as e:
            log.warning("N-ACTION %d on UPS %s from %s refused (0x%04X): %s", action, uid, calling, e.status, e)
            return e.status, None
        except Exception as e:
            log.error("N-ACTION %d on UPS %s from %s failed: %s", action, uid, calling, type(e).__name__)
            return PROCESSING_FAILURE, None

    # ---- C-FIND: search (UPS Pull, Watch, Query) ------------------------------------------------------------
    def on_c_find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        if not _is_ups(event):
            yield UNABLE_TO_PROCESS, None
            return
        try:
            identifier = event.identifier
            q = workitems.to_json(identifier)
        except Exception:
            yield IDENTIFIER_MISMATCH, None
            return
        if len(q) > query.MAX_KEYS:
            yield IDENTIFIER_MISMATCH, None
            return
        with self.db.session() as s:  # read first: no transaction stays open while answering
            found = [query.response(q, w.dataset) for w in islice(query.matches(s, q), MAX_FIND_RESULTS)]
        for answer in found:
            if event.is_cancelled:
                yield CANCEL, None
                return
            yield PENDING, workitems.from_json(answer)
        log.info("UPS C-FIND from %s: %d match(es)", _calling(event), len(found))
        yield SUCCESS, None


# ---- the operations (also used by UPS-RS) ----------------------------------------------------------------------


def create_from_peer(s: Any, ds: Dataset, uid: str | None, *, calling: str) -> UpsWorkitem:
    """N-CREATE (PS3.4 CC.2.5): a SCHEDULED workitem the node manages for a peer."""
    from pydicom.uid import generate_uid

    state = str(ds.get("ProcedureStepState", "") or "")
    if state != SCHEDULED:
        raise UpsRefused(0xC309, f"a new workitem must be SCHEDULED, not {state or 'empty'!r}", http_status=400)
    priority = str(ds.get("ScheduledProcedureStepPriority", "") or "MEDIUM")
    if priority not in workitems.PRIORITIES:
        raise UpsRefused(INVALID_ATTRIBUTE_VALUE, f"Scheduled Procedure Step Priority {priority!r}", http_status=400)
    if "TransactionUID" in ds:
        del ds.TransactionUID
    uid = uid or str(ds.get("SOPInstanceUID", "") or "") or str(generate_uid())
    if s.scalar(select(UpsWorkitem.id).where(UpsWorkitem.sop_instance_uid == uid)) is not None:
        raise UpsRefused(DUPLICATE_INSTANCE, f"workitem {uid} exists", http_status=409)
    ds.SOPClassUID = workitems.UPS_PUSH
    ds.SOPInstanceUID = uid
    ds.ScheduledProcedureStepPriority = priority
    now = utcnow()
    study_uid = str(ds.get("StudyInstanceUID", "") or "") or None
    w = UpsWorkitem(
        sop_instance_uid=uid,
        job_id=None,
        study_uid=study_uid,
        state=SCHEDULED,
        priority=priority,
        dataset=workitems.to_json(ds),
        created_at=now,
        updated_at=now,
    )
    s.add(w)
    s.flush()
    workitems.queue_event(s, uid, workitems.state_report(ds), now)
    log.info("UPS %s: SCHEDULED by %s", uid, calling)
    return w


def set_from_peer(s: Any, w: UpsWorkitem, mods: Dataset) -> None:
    """N-SET (PS3.4 CC.2.6): only a peer's own workitem, with its Transaction UID once claimed."""
    if w.state in FINAL_STATES:
        raise UpsRefused(0xC300, f"workitem {w.sop_instance_uid} is {w.state}")
    if w.job_id is not None:
        if w.state == SCHEDULED:
            raise UpsRefused(
                NOT_AUTHORIZED, "the node's own AI workitems are changed only by the node", http_status=403
            )
        raise UpsRefused(0xC301, "the Transaction UID of the node's own workitem is the node's")
    if w.state == IN_PROGRESS and str(mods.get("TransactionUID", "") or "") != (w.transaction_uid or ""):
        raise UpsRefused(0xC301, "the correct Transaction UID was not provided")
    ds = workitems.dataset_of(w)
    for elem in mods:
        tag = f"{int(elem.tag):08X}"
        if tag in NOT_SETTABLE:
            continue
        ds[elem.tag] = elem
    priority = str(ds.get("ScheduledProcedureStepPriority", "") or "MEDIUM")
    if priority not in workitems.PRIORITIES:
        raise UpsRefused(INVALID_ATTRIBUTE_VALUE, f"Scheduled Procedure Step Priority {priority!r}", http_status=400)
    now = utcnow()
    changed_priority = priority != w.priority
    w.dataset = workitems.to_json(ds)
    w.priority = priority
    w.updated_at = now
    if changed_priority:
        workitems.queue_event(s, w.sop_instance_uid, workitems.state_report(ds), now)


def _final_ready(ds: Dataset, state: str) -> bool:
    """The final state requirements of PS3.4 Table CC.2.5-3 this node checks."""
    if state == COMPLETED:
        seq = ds.get("UnifiedProcedureStepPerformedProcedureSequence") or []
        return bool(seq) and "PerformedProcedureStepEndDateTime" in seq[0]
    return True


def action_from_peer(s: Any, settings: Settings, uid: str, action: int, info: Dataset | None, *, calling: str) -> int:
    """N-ACTION (PS3.4 CC.2.1-CC.2.3); returns the status (raises `UpsRefused` for failures)."""
    info = info or Dataset()
    if action in (3, 4, 5):
        return subscription(s, settings, uid, action, info, calling=calling)
    if uid in (GLOBAL_SUBSCRIPTION, GLOBAL_SUBSCRIPTION_LOCKED):
        raise UpsRefused(0xC314, "the global subscription instance takes only subscription actions")
    w = workitems.get(s, uid)
    now = utcnow()
    if action == 1:  # change state
        target = str(info.get("ProcedureStepState", "") or "")
        tx = str(info.get("TransactionUID", "") or "")
        if target == SCHEDULED:
            raise UpsRefused(0xC303, "a workitem becomes SCHEDULED only by N-CREATE", http_status=400)
        if target not in (IN_PROGRESS, COMPLETED, CANCELED):
            raise UpsRefused(INVALID_ATTRIBUTE_VALUE, f"Procedure Step State {target!r}", http_status=400)
        if w.state == target and w.state in FINAL_STATES:
            return 0xB306 if target == COMPLETED else 0xB304
        if w.state in FINAL_STATES:
            raise UpsRefused(0xC300, f"workitem {uid} is {w.state}")
        if w.job_id is not None:
            if w.state == SCHEDULED:
                raise UpsRefused(NOT_AUTHORIZED, "the node performs its own AI workitems", http_status=403)
            raise UpsRefused(0xC301, "the Transaction UID of the node's own workitem is the node's")
        if target == IN_PROGRESS:
            if w.state == IN_PROGRESS:
                raise UpsRefused(0xC302, f"workitem {uid} is already IN PROGRESS")
            if not tx:
                raise UpsRefused(MISSING_ATTRIBUTE, "claiming a workitem needs a Transaction UID", http_status=400)
            if not workitems.change_state(s, w, IN_PROGRESS, now, transaction_uid=tx):
                raise UpsRefused(0xC302, f"workitem {uid} was claimed by someone else")
            return SUCCESS
        if w.state != IN_PROGRESS:
            raise UpsRefused(0xC310, f"workitem {uid} is not IN PROGRESS")
        if tx != (w.transaction_uid or ""):
            raise UpsRefused(0xC301, "the correct Transaction UID was not provided")
        if not _final_ready(workitems.dataset_of(w), target):
            raise UpsRefused(0xC304, "the final state requirements are not met (Performed Procedure Sequence)")
        if target == COMPLETED:
            ds = workitems.dataset_of(w)
            seq = ds.get("UnifiedProcedureStepPerformedProcedureSequence") or []
            outputs = list(seq[0].get("OutputInformationSequence", [])) if seq else []
            workitems.change_state(s, w, COMPLETED, now, outputs=outputs)
        else:
            workitems.change_state(s, w, CANCELED, now, reason=f"canceled by its performer {calling}")
        return SUCCESS
    if action == 2:  # request cancellation
        if w.state == CANCELED:
            return 0xB304
        if w.state == COMPLETED:
            raise UpsRefused(0xC311, f"workitem {uid} is COMPLETED")
        if w.job_id is not None:
            raise UpsRefused(0xC313, "the node does not cancel its AI jobs on request; an admin can")
        if w.state == SCHEDULED:
            reason = str(info.get("ReasonForCancellation", "") or f"canceled at the request of {calling}")
            workitems.change_state(s, w, CANCELED, now, reason=reason)
            return SUCCESS
        # IN PROGRESS: the performer decides; it hears of the request as an event
        notice = Dataset()
        notice.RequestingAE = calling
        if "ReasonForCancellation" in info:
            notice.ReasonForCancellation = info.ReasonForCancellation
        workitems.queue_event(s, uid, notice, now, event_type=workitems.CANCEL_REQUESTED)
        return SUCCESS
    raise UpsRefused(NO_SUCH_ACTION, f"no N-ACTION type {action} for a UPS", http_status=400)


def subscription(s: Any, settings: Settings, uid: str, action: int, info: Dataset, *, calling: str) -> int:
    """Subscribe (3), unsubscribe (4), suspend the global subscription (5) (PS3.4 CC.2.3)."""
    receiving = str(info.get("ReceivingAE", "") or calling).strip()
    glob = uid in (GLOBAL_SUBSCRIPTION, GLOBAL_SUBSCRIPTION_LOCKED)
    key = None if glob else uid
    now = utcnow()
    if action == 3:
        if receiving not in settings.ups_event_receivers:
            raise UpsRefused(0xC308, f"receiving AE {receiving!r} is not a known event receiver", http_status=403)
        lock = str(info.get("DeletionLock", "FALSE") or "FALSE").upper() == "TRUE" or uid == GLOBAL_SUBSCRIPTION_LOCKED
        targets: list[UpsWorkitem]
        if glob:
            targets = list(
                s.scalars(
                    select(UpsWorkitem)
                    .where(UpsWorkitem.state.notin_(FINAL_STATES))
                    .order_by(UpsWorkitem.id)
                    .limit(MAX_INITIAL_REPORTS)
                )
            )
        else:
            targets = [workitems.get(s, uid)]
        existing = s.scalar(
            select(UpsSubscription).where(
                UpsSubscription.ae_title == receiving,
                UpsSubscription.workitem_uid.is_(None) if key is None else UpsSubscription.workitem_uid == key,
            )
        )
        if existing is None:
            s.add(UpsSubscription(ae_title=receiving, workitem_uid=key, deletion_lock=lock, created_at=now))
        else:
            existing.deletion_lock = lock
        # the current state of each workitem subscribed to, at once (PS3.4 CC.2.3.2)
        for w in targets:
            workitems.queue_event(
                s, w.sop_instance_uid, workitems.state_report(workitems.dataset_of(w)), now, only=[receiving]
            )
        log.info("UPS events for %s: %s subscribed", receiving, "all workitems" if glob else uid)
        return SUCCESS
    if action in (4, 5):
        q = select(UpsSubscription).where(UpsSubscription.ae_title == receiving)
        if action == 5 or glob:
            q = q.where(UpsSubscription.workitem_uid.is_(None))
            if action == 4:  # unsubscribe globally: every subscription of the AE ends
                q = select(UpsSubscription).where(UpsSubscription.ae_title == receiving)
        else:
            q = q.where(UpsSubscription.workitem_uid == key)
        for sub in s.scalars(q).all():
            s.delete(sub)
        log.info("UPS events for %s: %s", receiving, "suspended" if action == 5 else "unsubscribed")
        return SUCCESS
    raise UpsRefused(NO_SUCH_ACTION, f"no N-ACTION type {action}", http_status=400)
