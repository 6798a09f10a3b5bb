"""Series and study completeness: from stored instances to exactly one job per study and anatomy.

`tick` is called by the periodic loop (``node.jobs.worker``). It is pure database work:
idempotent, and safe with several processes ticking at once (every state change is a
conditional UPDATE; the job is created only by whoever moved its series from
``complete`` to ``queued``). The timers are columns, so they survive restarts and
work with several listener processes (contract C1):

1. *Lost associations*: an association still open in the database with no instance
   for ``network_timeout`` seconds (its listener died) is closed as ``lost``.
2. *Re-open*: a series that got instances after it was found complete goes back to
   ``receiving`` (its study will be processed again).
3. *Series complete*: either quiet — no association delivering to it is open and its
   ``quiet_deadline`` (set by the listener at release) has passed — or at once, when
   the stored count reaches the count the series announces (Images in Acquisition,
   frames) and the slice positions along the normal show no gap (a multi-planar localizer:
   the same number of slices in each plane, each plane without a gap). A slice without a
   position means waiting for the quiet period. A complete series is routed at once
   (`node.intake.routing`): ``complete`` with pipeline + role, or ``unrouted``.
4. *Study settled*: for each study + pipeline with a routed, non-localizer series in
   ``complete``, either
   - *protocol complete*: the pipeline has a protocol (``settings.study_protocols``,
     e.g. knee = sag_fluid, cor_fluid) and every role in it has a complete (or already
     processed) series, at least one of them new — at once: without the quiet period,
     without waiting for the sender to close its association or for whatever other
     series of the study are still arriving; or
   - *quiet*: no other series of the study still receiving, and nothing received and no
     series completed for ``study_quiet_seconds`` (a pipeline without a protocol, a
     protocol role missing, or only series outside the protocol new)
   → one ``jobs`` row (``queued``, ``enqueue_pending``) with ``job_inputs`` (every
   routed non-localizer series of that pipeline, with its role). A series arriving later
   re-opens the study: a new job that ``supersedes`` the previous one (a still-queued
   predecessor becomes ``superseded``); identical inputs never make a second job.

The protocol is the site's declaration of what its scanners send, beside the quiet
periods in the settings: only the site knows that its knee exam is, say, five series.
The roles the models read are a lower bound of it; settling on them alone would start a
job while the rest of a longer protocol is still on its way, and each later series would
then supersede it (the work done again, the results sent to the PACS again). So without a
protocol a pipeline waits for the quiet period, as before. With one, the study's pipeline
has everything it will get once the protocol's roles are complete, so nothing else is
waited for: not the sender's association (a PACS such as Orthanc keeps it open for
``DicomAssociationCloseDelay`` after its last instance) and not a series still arriving
beside them. Such a series, once complete, is a localizer (never an input: no job, no
change to the job made), a series of another pipeline or unrouted (not this job's), or a
series outside the protocol for this pipeline (it settles by the quiet period and its job
supersedes the protocol's job, as any later series does). An announced count is trusted
only with every slice position present and no gap (step 3), so a series complete on it is
whole; if more instances of it arrive after all, it re-opens (step 2) and supersedes.

The tick runs in the worker's periodic loop; `count_reached` is the cheap look (no write
lock) that the worker's completeness watch makes many times a second, so that the round
runs as soon as a listener process, on any host, has stored the instance that brought a
series to its announced size (``node.jobs.worker``).

Outside the tick, `reroute_unrouted` routes one ``unrouted`` series again after an admin
added a rule for it (``complete`` when it is routed now; the tick does the rest).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import itertools
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import Engine, exists, func, or_, select, update
from sqlalchemy.orm import Session

from node.db.database import execute_dml
from node.db.schema import Association, AssociationSeries, Instance, Job, JobInput, Series, Study
from node.intake.recognition import PLANES, Acquisition, decide_plane
from node.intake.routing import (
    LOCALIZER_ROLE,
    UNROUTED_NO_ANATOMY,
    Explanation,
    PixelAnatomy,
    Route,
    RoutingRules,
    RulesFile,
    SeriesFacts,
    explain,
    load_rules,
)
from node.settings import Settings

log = logging.getLogger(__name__)


#: series states that count as processed (or being processed) by a job of their pipeline
INPUT_STATES = ("complete", "queued", "processing", "done", "failed")
#: job states whose results (present or coming) a new job supersedes
RESULT_JOB_STATES = ("processing", "done")
#: job states that have not started: a newer job replaces them
WAITING_JOB_STATES = ("pending", "queued")
#: slice spacing above this multiple of the median spacing is a gap
GAP_FACTOR = 1.5
POSITION_DECIMALS = 2  # 0.01 mm


def rules_provider(settings: Settings, logger: logging.Logger | None = None) -> Callable[[], RoutingRules]:
    """The rules in force, reloaded when ``settings.routing_rules`` changes (for the periodic loop)."""
    return RulesFile(settings.routing_rules, logger or logging.getLogger("node.intake.routing")).current


def tick(
    session: Session, settings: Settings, now: dt.datetime, rules: RoutingRules | RulesFile | None = None
) -> list[int]:
    """One completeness round; returns the ids of the jobs it created (contract C2)."""
    if rules is None:
        rules = load_rules(settings.routing_rules)
    elif isinstance(rules, RulesFile):
        rules = rules.current()
    close_lost_associations(session, settings, now)
    reopen_series(session, settings, now)
    complete_series(session, settings, now, rules)
    return create_jobs(session, settings, now, rules)


#: receiving series whose stored count reached the count they announce (the completeness watch's question)
COUNT_REACHED_SQL = (
    "SELECT id, instances FROM series"
    " WHERE state = 'receiving' AND expected_instances > 0 AND instances >= expected_instances"
)


def count_reached(engine: Engine) -> frozenset[tuple[int, int]]:
    """(series id, stored count) of the receiving series whose count reached the count they announce.

    The question the worker's completeness watch asks many times a second: a series in it
    is (most likely) complete now, so the tick should run. Asked on a plain DBAPI
    connection outside a transaction, so that on SQLite it takes no write lock (the node's
    sessions begin IMMEDIATE) and never holds up a listener's index writes; on PostgreSQL
    it is one index scan (``series.state``).
    """
    conn = engine.raw_connection()
    try:
        cur = conn.cursor()
        try:
            cur.execute(COUNT_REACHED_SQL)
            rows = cur.fetchall()
        finally:
            cur.close()
        if engine.dialect.name != "sqlite":
            conn.rollback()  # the driver began a transaction for the SELECT: end it before the pool takes it back
    finally:
        conn.close()
    return frozenset((int(i), int(n)) for i, n in rows)


# ---- 1. lost associations --------------------------------------------------------
def close_lost_associations(session: Session, settings: Settings, now: dt.datetime) -> list[int]:
    """Closes open associations idle for ``network_timeout`` (their listener is gone)."""
    cutoff = now - dt.timedelta(seconds=settings.network_timeout)
    last_instance = (
        select(func.max(Instance.received_at)).where(Instance.association_id == Association.id).scalar_subquery()
    )
    rows = session.execute(
        select(Association.id, Association.started_at, last_instance).where(Association.ended_at.is_(None))
    ).all()
    closed = []
    for assoc_id, started_at, last_at in rows:
        activity = max(t for t in (started_at, last_at) if t is not None)
        if activity > cutoff:
            continue
        res = execute_dml(
            session,
            update(Association)
            .where(Association.id == assoc_id, Association.ended_at.is_(None))
            .values(ended_at=now, end_reason="lost"),
        )
        if res.rowcount != 1:
            continue
        closed.append(assoc_id)
        series_ids = session.scalars(
            select(AssociationSeries.series_id).where(AssociationSeries.association_id == assoc_id)
        ).all()
        if series_ids:
            session.execute(
                update(Series)
                .where(Series.id.in_(series_ids), Series.state == "receiving", Series.quiet_deadline.is_(None))
                .values(quiet_deadline=now + dt.timedelta(seconds=settings.quiet_seconds))
            )
        log.warning(
            "association %d: no instance for %.0f s and still open: closed as lost (%d series)",
            assoc_id,
            settings.network_timeout,
            len(series_ids),
        )
    return closed


# ---- 2. re-open ------------------------------------------------------------------
def reopen_series(session: Session, settings: Settings, now: dt.datetime) -> list[int]:
    """Series that received instances after they were found complete go back to ``receiving``."""
    rows = session.execute(
        select(Series.id, Series.series_uid, Series.state, Series.instances, Series.completed_instances).where(
            Series.state != "receiving",
            Series.completed_instances.is_not(None),
            Series.instances > Series.completed_instances,
        )
    ).all()
    reopened = []
    for series_id, uid, state, count, before in rows:
        assert before is not None  # selected: completed_instances IS NOT NULL
        res = execute_dml(
            session,
            update(Series)
            .where(Series.id == series_id, Series.state == state, Series.completed_instances == before)
            .values(
                state="receiving",
                completed_at=None,
                completed_reason=None,
                completed_instances=None,
                pipeline=None,
                role=None,
                routing_rule=None,
                quiet_deadline=func.coalesce(Series.quiet_deadline, now + dt.timedelta(seconds=settings.quiet_seconds)),
            ),
        )
        if res.rowcount == 1:
            reopened.append(series_id)
            log.info("series %s: %d instance(s) arrived after it was %s: receiving again", uid, count - before, state)
    return reopened


# ---- 3. series complete ----------------------------------------------------------
@dataclass(frozen=True)
class SliceCheck:
    complete: bool
    reason: str


def check_positions(rows: Sequence[tuple[str | None, str | None, int | None]], expected: int) -> SliceCheck:
    """Whether stored instances cover an announced count without a slice gap.

    ``rows`` are (image_position "x\\y\\z", image_orientation, number_of_frames) per
    instance. One multi-frame object carrying every frame is whole by itself.
    """
    if not rows:
        return SliceCheck(False, "no instances")
    if len(rows) == 1 and (rows[0][2] or 1) >= expected:
        return SliceCheck(True, "multi-frame object with every frame")
    if len(rows) < expected:
        return SliceCheck(False, f"{len(rows)} of {expected} instances")
    if any((frames or 1) > 1 for _, _, frames in rows):
        return SliceCheck(False, "multi-frame objects: positions per frame not indexed")
    groups: dict[tuple[float, ...], list[tuple[float, ...]]] = {}
    for pos, ori, _ in rows:
        p = _floats(pos, 3)
        o = _floats(ori, 6)
        if p is None or o is None:
            return SliceCheck(False, "an instance has no slice position")
        key = next((k for k in groups if max(abs(a - b) for a, b in zip(o, k)) <= 1e-3), o)
        groups.setdefault(key, []).append(p)
    if len(groups) > 1 and len({len(v) for v in groups.values()}) != 1:
        # a multi-planar localizer has the same number of slices in each plane; anything else may be incomplete
        return SliceCheck(False, "mixed orientations")
    for orientation, positions in groups.items():
        reason = _stack_gap(orientation, positions)
        if reason is not None:
            return SliceCheck(False, reason)
    if len(groups) > 1:
        return SliceCheck(True, f"{len(groups)} planes of {len(rows) // len(groups)} slices, each without a gap")
    (positions,) = groups.values()
    return SliceCheck(True, f"{len(set(positions))} slice positions without a gap")


def _stack_gap(orientation: tuple[float, ...], positions: list[tuple[float, ...]]) -> str | None:
    """Why the slices of one orientation are not a whole stack (None when they are)."""
    row, col = orientation[:3], orientation[3:]
    normal = (
        row[1] * col[2] - row[2] * col[1],
        row[2] * col[0] - row[0] * col[2],
        row[0] * col[1] - row[1] * col[0],
    )
    if math.sqrt(sum(c * c for c in normal)) < 0.5:
        return "degenerate orientation"
    along = Counter(round(sum(p[i] * normal[i] for i in range(3)), POSITION_DECIMALS) for p in positions)
    if len(set(along.values())) != 1:
        return "slice positions are not evenly covered"
    distinct = sorted(along)
    if len(distinct) >= 3:
        steps = [b - a for a, b in itertools.pairwise(distinct)]
        median = sorted(steps)[(len(steps) - 1) // 2]  # the lower median: with 3 slices, the smaller step
        if max(steps) > GAP_FACTOR * median + 10**-POSITION_DECIMALS:
            return "a gap in the slice positions"
    return None


def _floats(value: str | None, n: int) -> tuple[float, ...] | None:
    if not value:
        return None
    try:  # tolerant of quoting/brackets some writers leave around decimal strings
        parts = tuple(float(v.strip(" '\"[]")) for v in value.replace(",", "\\").split("\\"))
    except ValueError:
        return None
    return parts if len(parts) == n and all(math.isfinite(v) for v in parts) else None


def series_facts(
    se: Series, study_description: str | None, orientations: Sequence[tuple[str | None, int]] = ()
) -> SeriesFacts:
    """What routing sees of a series: its index columns, acquisition parameters and instance orientations."""
    return SeriesFacts(
        series_uid=se.series_uid,
        modality=se.modality,
        body_part=se.body_part,
        series_description=se.series_description,
        protocol_name=se.protocol_name,
        laterality=se.laterality,
        calling_ae=se.calling_ae,
        manufacturer=se.manufacturer,
        own_object=bool(se.own_object),
        study_description=study_description,
        orientations=tuple(orientations),
        acquisition=Acquisition.from_json(se.acquisition),
    )


def series_orientations(session: Session, series_id: int) -> list[tuple[str | None, int]]:
    """(ImageOrientationPatient, instance count) per distinct orientation of the series' instances."""
    rows = session.execute(
        select(Instance.image_orientation, func.count())
        .where(Instance.series_id == series_id)
        .group_by(Instance.image_orientation)
        .order_by(func.count().desc())
        .limit(64)  # a series with more distinct orientations than this is no stack anyway
    ).all()
    return [(o, int(n)) for o, n in rows]


def _study_context(session: Session, study_id: int) -> tuple[str | None, list[SeriesFacts]]:
    description = session.scalar(select(Study.study_description).where(Study.id == study_id))
    siblings = [
        series_facts(s, description) for s in session.scalars(select(Series).where(Series.study_id == study_id))
    ]
    return description, siblings


def explain_series(session: Session, settings: Settings, rules: RoutingRules, se: Series) -> Explanation:
    """How routing decides one series now, with its study as context (nothing is written)."""
    description, siblings = _study_context(session, se.study_id)
    facts = series_facts(se, description, series_orientations(session, se.id))
    hook = pixel_anatomy_hook(session, settings, se)
    return explain(facts, rules, uid_root=settings.uid_root, siblings=siblings, pixel_anatomy=hook)


def route_series(session: Session, settings: Settings, rules: RoutingRules, se: Series) -> Route:
    """Routes one series with its study as context; records what was recognised and why on its row."""
    ex = explain_series(session, settings, rules, se)
    session.execute(
        update(Series)
        .where(Series.id == se.id)
        .values(
            plane=(ex.plane.value or None) and ex.plane.value[:16],
            contrast=(ex.contrast.value or None) and ex.contrast.value[:16],
            anatomy=(ex.anatomy.value or None) and ex.anatomy.value[:32],
            routing_explanation=ex.to_json(),
        )
        .execution_options(synchronize_session=False)
    )
    log.debug("series %s routing: %s", se.series_uid, ex.summary())
    return ex.route


def pixel_anatomy_hook(session: Session, settings: Settings, se: Series) -> PixelAnatomy | None:
    """The pixel anatomy classifier (``qc.anatomy``) for one series, if ``settings.routing_pixel_anatomy``.

    Routing calls it only when every header, text and study signal is silent. It loads the
    series' stored files and the classifier lazily; any failure is logged and answers "no
    anatomy" (the tick never fails for it).
    """
    if not getattr(settings, "routing_pixel_anatomy", False):
        return None

    def classify(facts: SeriesFacts) -> tuple[str | None, float]:
        try:
            paths = session.scalars(
                select(Instance.path)
                .where(Instance.series_id == se.id)
                .order_by(Instance.instance_number, Instance.id)
                .limit(PIXEL_ANATOMY_MAX_INSTANCES)
            ).all()
            if not paths:
                return None, 0.0
            from models.io import load_series

            volume = load_series(paths)
            classifier = _anatomy_classifier(str(settings.weights_dir or ""))
            plane = decide_plane(facts.orientations)[0].value
            out = classifier.predict(volume, plane if plane in PLANES else None)
            label = str(out.get("label") or "")
            anatomy = label.split("/", 1)[0] or None
            log.info("series %s: pixel anatomy %s (p=%.2f)", se.series_uid, label, float(out.get("probability") or 0.0))
            return anatomy, float(out.get("probability") or 0.0)
        except Exception as e:  # never fail the tick: the pixels are then silent
            log.warning(
                "series %s: pixel anatomy classifier not available (%s: %s); treated as silent",
                se.series_uid,
                type(e).__name__,
                str(e)[:200],
            )
            return None, 0.0

    return classify


#: the pixel anatomy check reads at most this many instances of a series
PIXEL_ANATOMY_MAX_INSTANCES = 512


@functools.lru_cache(maxsize=2)
def _anatomy_classifier(weights_dir: str):
    """The ``qc.anatomy`` classifier, loaded (and its weights verified) once per weights folder."""
    from models.registry import MODEL_ANATOMY, Registry

    return Registry(weights_dir or None).get(MODEL_ANATOMY)


def complete_series(session: Session, settings: Settings, now: dt.datetime, rules: RoutingRules) -> list[int]:
    """Finds receiving series that are complete, routes them, and starts their study's quiet timer."""
    candidates = session.scalars(select(Series).where(Series.state == "receiving").order_by(Series.id)).all()
    if not candidates:
        return []
    ids = [s.id for s in candidates]
    open_ids = set(
        session.scalars(
            select(AssociationSeries.series_id)
            .join(Association, Association.id == AssociationSeries.association_id)
            .where(AssociationSeries.series_id.in_(ids), Association.ended_at.is_(None))
        ).all()
    )
    quiet = dt.timedelta(seconds=settings.quiet_seconds)
    done = []
    for se in candidates:
        reason = None
        if se.expected_instances and se.instances >= se.expected_instances:
            rows = session.execute(
                select(Instance.image_position, Instance.image_orientation, Instance.number_of_frames).where(
                    Instance.series_id == se.id
                )
            ).all()
            check = check_positions([(pos, ori, frames) for pos, ori, frames in rows], se.expected_instances)
            if check.complete:
                reason = "count"
            else:
                log.debug(
                    "series %s: announced count reached but %s: waiting for the quiet period",
                    se.series_uid,
                    check.reason,
                )
        became = now
        if reason is None and se.id not in open_ids:
            deadline = se.quiet_deadline or (se.last_received_at + quiet)
            if deadline <= now:
                reason = "quiet"
                became = deadline
        if reason is None:
            continue
        route = route_series(session, settings, rules, se)
        state = "complete" if route.routed else "unrouted"
        conditions = [Series.id == se.id, Series.state == "receiving", Series.instances == se.instances]
        if reason == "quiet":
            conditions.append(
                ~exists().where(
                    AssociationSeries.series_id == Series.id,
                    AssociationSeries.association_id == Association.id,
                    Association.ended_at.is_(None),
                )
            )
        res = execute_dml(
            session,
            update(Series)
            .where(*conditions)
            .values(
                state=state,
                pipeline=route.pipeline,
                role=route.role,
                routing_rule=route.rule[:128],
                completed_at=now,
                completed_reason=reason,
                completed_instances=Series.instances,
            )
            .execution_options(synchronize_session=False),
        )
        if res.rowcount != 1:
            continue
        done.append(se.id)
        # the study's quiet period runs from when the series became complete (not when a tick saw it)
        new_deadline = became + dt.timedelta(seconds=settings.study_quiet_seconds)
        session.execute(
            update(Study)
            .where(
                Study.id == se.study_id,
                or_(Study.study_quiet_deadline.is_(None), Study.study_quiet_deadline < new_deadline),
            )
            .values(study_quiet_deadline=new_deadline)
        )
        outcome = f"{route.pipeline}/{route.role} (rule {route.rule!r})" if route.routed else route.rule
        log.debug("series %s complete (%s, %d instances): %s", se.series_uid, reason, se.instances, outcome)
    session.expire_all()
    return done


# ---- 4. study settled → job ------------------------------------------------------
def create_jobs(session: Session, settings: Settings, now: dt.datetime, rules: RoutingRules) -> list[int]:
    """Creates one job per settled study + pipeline that has new complete input series."""
    pending = session.execute(
        select(Series.study_id, Series.pipeline)
        .where(Series.state == "complete", Series.pipeline.is_not(None), Series.role != LOCALIZER_ROLE)
        .distinct()
        .order_by(Series.study_id, Series.pipeline)
    ).all()
    created: list[int] = []
    rerouted: set[int] = set()
    study_quiet = dt.timedelta(seconds=settings.study_quiet_seconds)
    for study_id, pipeline in pending:
        assert pipeline is not None  # selected: pipeline IS NOT NULL
        study = session.get(Study, study_id)
        if study is None:
            continue
        protocol = frozenset(settings.study_protocols.get(pipeline, ()))
        settled = _study_settled(session, study, now, study_quiet, pipeline=pipeline, protocol=protocol)
        if settled is None:
            continue
        if settled == "protocol":
            log.info(
                "study %s %s: every protocol role arrived complete (%s): settled without the quiet period",
                study.study_uid,
                pipeline,
                ", ".join(sorted(protocol)),
            )
        if study_id not in rerouted:
            rerouted.add(study_id)
            _reroute_missing_anatomy(session, settings, rules, study_id)
        job_id = _create_job(session, settings, now, study, pipeline)
        if job_id is not None:
            created.append(job_id)
    return created


def _study_settled(
    session: Session,
    study: Study,
    now: dt.datetime,
    study_quiet: dt.timedelta,
    *,
    pipeline: str | None = None,
    protocol: frozenset[str] = frozenset(),
) -> str | None:
    """Why the study is settled for ``pipeline`` (``"protocol"`` or ``"quiet"``), or None while it is not.

    ``"protocol"``: every role of ``protocol`` has a complete (or processed) series, one
    of them new since the last job — whatever else of the study is still arriving, and
    whether or not its sender is still connected. ``"quiet"``: no series of the study
    still receiving, and nothing arrived and no series completed for ``study_quiet``.
    """
    if protocol and pipeline is not None and _protocol_arrived(session, study.id, pipeline, protocol):
        return "protocol"
    receiving = session.scalar(
        select(func.count())
        .select_from(Series)
        .where(Series.study_id == study.id, Series.state == "receiving", Series.own_object.is_(False))
    )
    if receiving:
        return None
    if study.study_quiet_deadline is not None and now < study.study_quiet_deadline:
        return None
    if study.last_received_at is not None and now < study.last_received_at + study_quiet:
        return None
    return "quiet"


def _protocol_arrived(session: Session, study_id: int, pipeline: str, protocol: frozenset[str]) -> bool:
    """Every protocol role of ``pipeline`` is in the study, at least one of them newly complete.

    A series outside the protocol (an extra axial, a repeat after motion with another role)
    arriving after the job waits for the quiet period as before.
    """
    rows = session.execute(
        select(Series.role, Series.state).where(
            Series.study_id == study_id,
            Series.pipeline == pipeline,
            Series.role.in_(protocol),
            Series.state.in_(INPUT_STATES),
        )
    ).all()
    return protocol <= {role for role, _ in rows} and any(state == "complete" for _, state in rows)


def _reroute_missing_anatomy(session: Session, settings: Settings, rules: RoutingRules, study_id: int) -> None:
    """Series unrouted only for want of an anatomy get another chance with the whole study known."""
    for se in session.scalars(
        select(Series).where(
            Series.study_id == study_id, Series.state == "unrouted", Series.routing_rule == UNROUTED_NO_ANATOMY
        )
    ).all():
        route = route_series(session, settings, rules, se)
        if not route.routed:
            continue
        res = execute_dml(
            session,
            update(Series)
            .where(Series.id == se.id, Series.state == "unrouted", Series.routing_rule == UNROUTED_NO_ANATOMY)
            .values(state="complete", pipeline=route.pipeline, role=route.role, routing_rule=route.rule[:128])
            .execution_options(synchronize_session=False),
        )
        if res.rowcount == 1:
            log.info(
                "series %s: anatomy from the %s: %s/%s (rule %r)",
                se.series_uid,
                route.anatomy_source,
                route.pipeline,
                route.role,
                route.rule,
            )
    session.expire_all()


def input_fingerprint(pipeline: str, sop_instance_uids: Iterable[str]) -> str:
    """sha256 of the pipeline and the sorted input SOP Instance UIDs (same inputs → same result UIDs)."""
    h = hashlib.sha256(pipeline.encode())
    for uid in sorted(sop_instance_uids):
        h.update(b"\n" + uid.encode())
    return h.hexdigest()


class _Conflict(Exception):
    """Another process claimed the series first."""


def _create_job(session: Session, settings: Settings, now: dt.datetime, study: Study, pipeline: str) -> int | None:
    inputs = session.scalars(
        select(Series)
        .where(
            Series.study_id == study.id,
            Series.pipeline == pipeline,
            Series.role != LOCALIZER_ROLE,
            Series.state.in_(INPUT_STATES),
        )
        .order_by(Series.series_number, Series.id)
    ).all()
    new = [s.id for s in inputs if s.state == "complete"]
    if not new:
        return None
    uids = session.scalars(
        select(Instance.sop_instance_uid).where(Instance.series_id.in_([s.id for s in inputs]))
    ).all()
    fingerprint = input_fingerprint(pipeline, uids)
    jobs = session.scalars(
        select(Job).where(Job.study_id == study.id, Job.pipeline == pipeline).order_by(Job.id.desc())
    ).all()
    latest = next((j for j in jobs if j.state != "superseded"), None)
    if (
        latest is not None
        and latest.input_fingerprint == fingerprint
        and latest.state in WAITING_JOB_STATES + RESULT_JOB_STATES
    ):
        # the same instances again (e.g. a resend): the existing job already covers them
        state = "queued" if latest.state in WAITING_JOB_STATES else latest.state
        session.execute(update(Series).where(Series.id.in_(new), Series.state == "complete").values(state=state))
        log.info("study %s %s: inputs unchanged since job %d: no new job", study.study_uid, pipeline, latest.id)
        return None
    roles = ", ".join(f"{s.series_uid}={s.role}" for s in inputs)
    predecessor = next((j for j in jobs if j.state in RESULT_JOB_STATES), None)
    waiting = [j.id for j in jobs if j.state in WAITING_JOB_STATES]
    try:
        with session.begin_nested():
            claimed = execute_dml(
                session,
                update(Series)
                .where(Series.id.in_(new), Series.state == "complete")
                .values(state="queued")
                .execution_options(synchronize_session=False),
            )
            if claimed.rowcount != len(new):
                raise _Conflict
            others = [s.id for s in inputs if s.id not in new]
            if others:
                session.execute(
                    update(Series)
                    .where(Series.id.in_(others), Series.state.in_(INPUT_STATES))
                    .values(state="queued")
                    .execution_options(synchronize_session=False)
                )
            superseded = []
            if waiting:
                res = session.execute(
                    update(Job)
                    .where(Job.id.in_(waiting), Job.state.in_(WAITING_JOB_STATES))
                    .values(state="superseded", finished_at=now, enqueue_pending=False)
                    .returning(Job.id)
                )
                superseded = list(res.scalars())
            job = Job(
                study_id=study.id,
                pipeline=pipeline,
                state="queued",
                enqueue_pending=True,
                input_fingerprint=fingerprint,
                supersedes_job_id=predecessor.id
                if predecessor is not None
                else (superseded[0] if superseded else None),
                max_attempts=settings.job_max_attempts,
                queue=settings.inference_queue,
                created_at=now,
            )
            session.add(job)
            session.flush()
            for se in inputs:
                session.add(JobInput(job_id=job.id, series_id=se.id, role=se.role))
            session.flush()
    except _Conflict:
        log.info("study %s %s: series claimed by another process", study.study_uid, pipeline)
        session.expire_all()
        return None
    session.expire_all()
    if job.supersedes_job_id is not None:
        log.info(
            "job %d created for study %s %s, superseding job %d%s: %s",
            job.id,
            study.study_uid,
            pipeline,
            job.supersedes_job_id,
            f" (queued job(s) {superseded} superseded)" if superseded else "",
            roles,
        )
    else:
        log.info("job %d created for study %s %s: %s", job.id, study.study_uid, pipeline, roles)
    return job.id


# ---- 5. re-route after a rule change ----------------------------------------------------------
def reroute_unrouted(
    session: Session, settings: Settings, rules: RoutingRules, series_id: int, now: dt.datetime
) -> Route | None:
    """Routes one ``unrouted`` series again with ``rules`` (an admin just added a rule for it).

    Routed now: the series becomes ``complete`` with its pipeline and role, and its study's
    quiet period starts again, so the next tick settles the study as for any newly complete
    series (one job, or one that supersedes the previous job of that pipeline). Returns the
    new route (unrouted still: the series stays as it is), or None when the series is not
    ``unrouted`` (any more).
    """
    se = session.get(Series, series_id)
    if se is None or se.state != "unrouted":
        return None
    route = route_series(session, settings, rules, se)
    if not route.routed:
        return route
    res = execute_dml(
        session,
        update(Series)
        .where(Series.id == se.id, Series.state == "unrouted")
        .values(state="complete", pipeline=route.pipeline, role=route.role, routing_rule=route.rule[:128])
        .execution_options(synchronize_session=False),
    )
    if res.rowcount != 1:
        return None
    deadline = now + dt.timedelta(seconds=settings.study_quiet_seconds)
    session.execute(
        update(Study)
        .where(
            Study.id == se.study_id, or_(Study.study_quiet_deadline.is_(None), Study.study_quiet_deadline < deadline)
        )
        .values(study_quiet_deadline=deadline)
    )
    log.info("series %s re-routed: %s/%s (rule %r)", se.series_uid, route.pipeline, route.role, route.rule)
    session.expire_all()
    return route
