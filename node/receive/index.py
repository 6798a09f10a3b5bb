"""The index of received instances: the database rows of contract C1 (docs/architecture.md).

- `publish_new` puts a new instance's file in place and fsyncs it (file and directories
  together) before any index transaction;
- `index_instances`, `open_association`, `close_association` and `record_quarantine` are
  plain functions on a session or connection: the rows of contract C1 (studies, series,
  instances, associations, association_series, quarantine). `index_instances` publishes
  whatever is not yet durable (resends, replacements) inside the transaction, before the
  commit, so a row never exists for a file that is not durable;
- `recover_unclean_stop` checks the last rows after a crash.

The header they index comes from `node.receive.header`; `node.receive.writer` commits them
for a listener process. Logs carry UIDs and statuses only, never patient data.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Table, and_, bindparam, case, func, select, update
from sqlalchemy.orm import Session

from node.db.database import Base, utcnow
from node.db.driver import DriverStatement
from node.db.schema import Association, AssociationSeries, Instance, Quarantine, Series, Study
from node.errors import StorageError
from node.receive.header import SUCCESS, InstanceHeader
from node.receive.storage import InstanceStore, StagedFile

log = logging.getLogger(__name__)


@dataclass
class Received:
    """One validated instance, staged on disk, waiting to be indexed."""

    header: InstanceHeader
    staged: StagedFile
    transfer_syntax_uid: str
    calling_ae: str | None = None
    association_id: int | None = None
    published: Path | None = None  # set once the staged file was renamed to its final path
    file_meta: bytes = b""  # with `data`: to write the file again under the index lock (see index_instances)
    data: bytes | bytearray | None = None
    # published but not fsynced yet: made durable before the commit, or right after it (IndexWriter.overlap)
    pending_files: list[Path] = field(default_factory=list)
    pending_dirs: set[Path] = field(default_factory=set)


def publish_new(store: InstanceStore, item: Received, *, sync: bool = True) -> bool:
    """Before the index transaction: puts a new instance's file in place (and fsyncs it, with `sync`).

    Only when nothing is stored at its final path yet (the common case). The fsyncs then run
    in the handler's thread, outside the index lock, in parallel with other associations'.
    Without `sync` the file is left in `item.pending_files` for the writer to fsync.
    Returns False (and does nothing) when a file is already there: `index_instances` decides.
    """
    h = item.header
    if store.path_for(h.study_uid, h.series_uid, h.sop_instance_uid).exists():
        return False
    item.published, dirs = store.publish(item.staged, h.study_uid, h.series_uid, h.sop_instance_uid, sync_first=False)
    if sync:
        store.sync(files=[item.published], dirs=dirs)
    else:
        item.pending_files.append(item.published)
        item.pending_dirs |= dirs
    return True


@dataclass(frozen=True)
class Outcome:
    status: int
    instance_id: int | None
    duplicate: bool = False  # the same bytes were already stored: nothing changed
    replaced: bool = False  # same SOP Instance UID, different bytes: file and index updated
    demographics_changed: tuple[str, ...] = ()


def _fit(column, value):
    """Truncates text to the column's length (PostgreSQL enforces VARCHAR lengths)."""
    if value is None or not isinstance(value, str):
        return value
    length = getattr(column.type, "length", None)
    return value[:length] if length else value


def _norm(value: str | None) -> str | None:
    return value if value else None


def _table(model: type[Base]) -> Table:
    """The table of a mapped class (SQLAlchemy types ``__table__`` as any FromClause)."""
    table = model.__table__
    assert isinstance(table, Table)
    return table


def _insert_ignoring_conflicts(dialect: str, table: Table):
    """INSERT ... ON CONFLICT DO NOTHING for SQLite and PostgreSQL."""
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table).on_conflict_do_nothing()
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as postgresql_insert

        return postgresql_insert(table).on_conflict_do_nothing()
    raise StorageError(f"unsupported database dialect {dialect!r} (SQLite or PostgreSQL)")


#: the columns `index_instances` inserts (the order `_DriverStatement` compiles them in)
_INSTANCE_KEYS = (
    "sop_instance_uid",
    "received_at",
    "series_id",
    "sop_class_uid",
    "transfer_syntax_uid",
    "path",
    "size",
    "sha256",
    "instance_number",
    "image_position",
    "image_orientation",
    "number_of_frames",
    "calling_ae",
    "association_id",
)


class _DriverStatement(DriverStatement):
    """`node.db.driver.DriverStatement` run inside the caller's transaction (BEGIN IMMEDIATE on the same DB-API
    connection): for the statements of every instance (its INSERT, the series and study arrival UPDATEs),
    whose `Connection.execute` cost more CPU than SQLite's own work (measured: the index transaction was a
    quarter of the listener's Python time per instance at four associations)."""

    def execute(self, conn: Connection, params: dict) -> list[tuple]:
        driver = conn.connection.driver_connection
        if driver is None:
            raise StorageError("the database connection is no longer attached")
        return self.fetchall(driver, params)


class _Statements:
    """The index statements, built once per dialect (compiled once, executed with parameters)."""

    driver: dict[str, _DriverStatement]

    def __init__(self, dialect: str):
        inst, st, se = _table(Instance), _table(Study), _table(Series)
        asr = _table(AssociationSeries)
        self.insert_instance = _insert_ignoring_conflicts(dialect, inst).returning(inst.c.id)
        self.insert_study = _insert_ignoring_conflicts(dialect, st)
        self.insert_series = _insert_ignoring_conflicts(dialect, se)
        self.insert_assoc_series = _insert_ignoring_conflicts(dialect, asr).returning(asr.c.series_id)
        self.select_instance = select(inst.c.id, inst.c.series_id, inst.c.sha256, inst.c.path).where(
            inst.c.sop_instance_uid == bindparam("b_uid")
        )
        self.select_study = select(st).where(st.c.study_uid == bindparam("b_uid"))
        self.select_series = select(se.c.id, se.c.expected_instances).where(se.c.series_uid == bindparam("b_uid"))
        self.series_expected = (
            update(se).where(se.c.id == bindparam("b_id")).values(expected_instances=bindparam("b_n"))
        )
        self.series_open = (
            update(se).where(se.c.id == bindparam("b_id")).values(open_associations=se.c.open_associations + 1)
        )
        self.series_arrival = (
            update(se)
            .where(se.c.id == bindparam("b_id"))
            .values(
                instances=se.c.instances + bindparam("b_n"),
                last_received_at=bindparam("b_now"),
                quiet_deadline=bindparam("b_deadline"),
            )
        )
        self.study_arrival = update(st).where(st.c.id == bindparam("b_id")).values(last_received_at=bindparam("b_now"))
        self.driver = {}
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect

            d = sqlite_dialect()
            self.driver = {
                "insert_instance": _DriverStatement(self.insert_instance, d, _INSTANCE_KEYS),
                "series_arrival": _DriverStatement(self.series_arrival, d),
                "study_arrival": _DriverStatement(self.study_arrival, d),
            }

    def insert_instance_id(self, conn: Connection, params: dict) -> int | None:
        """INSERT ... ON CONFLICT DO NOTHING RETURNING id: the new row's id, None if the UID is indexed."""
        fast = self.driver.get("insert_instance")
        if fast is None:
            return conn.execute(self.insert_instance, params).scalar()
        rows = fast.execute(conn, params)
        return rows[0][0] if rows else None

    def run(self, conn: Connection, name: str, params: dict) -> None:
        """Executes one of the UPDATEs by name (`series_arrival`, `study_arrival`)."""
        fast = self.driver.get(name)
        if fast is None:
            conn.execute(getattr(self, name), params)
        else:
            fast.execute(conn, params)


@dataclass
class IndexCache:
    """Rows one writer has seen, so the common case (next instance of a known series) is one INSERT.

    Entries are only hints: a failed transaction clears the cache and is retried without it.
    """

    # study UID -> (id, its demographics as stored, the last header demographics found to change nothing)
    studies: dict[str, tuple[int, dict, dict | None]] = field(default_factory=dict)
    series: dict[str, tuple[int, bool]] = field(default_factory=dict)  # series UID -> (id, has expected count)
    assoc_series: set[tuple[int, int]] = field(default_factory=set)
    closed: set[int] = field(default_factory=set)  # associations this writer has ended
    limit: int = 20000

    def clear(self) -> None:
        self.studies.clear()
        self.series.clear()
        self.assoc_series.clear()

    def trim(self) -> None:
        if len(self.studies) + len(self.series) + len(self.assoc_series) > self.limit:
            self.clear()
        if len(self.closed) > self.limit:
            self.closed.clear()


@functools.cache
def _statements_for(dialect: str) -> _Statements:
    return _Statements(dialect)


def _connection(session_or_connection) -> Connection:
    """The Core connection of a Session (its transaction) or the Connection itself."""
    if isinstance(session_or_connection, Session):
        return session_or_connection.connection()
    return session_or_connection


def _statements(conn: Connection) -> _Statements:
    return _statements_for(conn.dialect.name)


def _study_values(header: InstanceHeader) -> dict:
    t = _table(Study).c
    return {k: _fit(t[k], _norm(v)) for k, v in header.demographics.items()}


def _upsert_study(conn, sql: _Statements, cache: IndexCache, header: InstanceHeader, now, audit, session):
    """The study row (created, or demographics corrected); returns (id, changed field names)."""
    cached = cache.studies.get(header.study_uid)
    if cached is not None and cached[2] == header.demographics:  # (the common case: as the last instance)
        return cached[0], ()
    values = _study_values(header)
    if cached is not None and all(
        header.demographics.get(k) is None or v == cached[1].get(k) for k, v in values.items()
    ):
        cache.studies[header.study_uid] = (cached[0], cached[1], dict(header.demographics))
        return cached[0], ()
    row = conn.execute(sql.select_study, {"b_uid": header.study_uid}).mappings().first()
    if row is None:
        conn.execute(
            sql.insert_study, dict(study_uid=header.study_uid, first_received_at=now, last_received_at=now, **values)
        )
        row = conn.execute(sql.select_study, {"b_uid": header.study_uid}).mappings().one()
        cache.studies[header.study_uid] = (row["id"], {k: row[k] for k in values}, dict(header.demographics))
        return row["id"], ()
    changed = {k: v for k, v in values.items() if header.demographics.get(k) is not None and v != row[k]}
    current = {k: row[k] for k in values}
    if changed:
        st = _table(Study)
        conn.execute(update(st).where(st.c.id == row["id"]).values(**changed))
        current.update(changed)
        audit(session, "study", header.study_uid, tuple(sorted(changed)), header)
    cache.studies[header.study_uid] = (row["id"], current, dict(header.demographics))
    return row["id"], tuple(sorted(changed))


def _upsert_series(
    conn, sql: _Statements, cache: IndexCache, header: InstanceHeader, study_id: int, calling_ae, uid_root: str, now
) -> int:
    cached = cache.series.get(header.series_uid)
    if cached is not None and (cached[1] or not header.expected_instances):
        return cached[0]
    row = conn.execute(sql.select_series, {"b_uid": header.series_uid}).first()
    if row is None:
        c = _table(Series).c
        conn.execute(
            sql.insert_series,
            dict(
                study_id=study_id,
                series_uid=header.series_uid,
                modality=_fit(c.modality, _norm(header.modality)),
                body_part=_fit(c.body_part, _norm(header.body_part)),
                series_description=_fit(c.series_description, _norm(header.series_description)),
                protocol_name=_fit(c.protocol_name, _norm(header.protocol_name)),
                laterality=_fit(c.laterality, _norm(header.laterality)),
                series_number=header.series_number,
                manufacturer=_fit(c.manufacturer, _norm(header.manufacturer)),
                calling_ae=_fit(c.calling_ae, calling_ae),
                acquisition=header.acquisition,
                instances=0,
                expected_instances=header.expected_instances,
                own_object=header.is_own_object(uid_root),
                state="receiving",
                first_received_at=now,
                last_received_at=now,
                quiet_deadline=None,
                open_associations=0,
            ),
        )
        row = conn.execute(sql.select_series, {"b_uid": header.series_uid}).one()
    expected = row.expected_instances
    if expected is None and header.expected_instances:
        conn.execute(sql.series_expected, {"b_id": row.id, "b_n": header.expected_instances})
        expected = header.expected_instances
    cache.series[header.series_uid] = (row.id, expected is not None)
    return row.id


def _instance_values(item: Received, series_id: int, path: Path) -> dict:
    h, c = item.header, _table(Instance).c
    return dict(
        series_id=series_id,
        sop_class_uid=h.sop_class_uid,
        transfer_syntax_uid=_fit(c.transfer_syntax_uid, item.transfer_syntax_uid),
        path=str(path),
        size=item.staged.size,
        sha256=item.staged.sha256,
        instance_number=h.instance_number,
        image_position=_fit(c.image_position, _norm(h.image_position)),
        image_orientation=_fit(c.image_orientation, _norm(h.image_orientation)),
        number_of_frames=h.number_of_frames,
        calling_ae=_fit(c.calling_ae, item.calling_ae),
        association_id=item.association_id,
    )


def index_instances(
    session,
    store: InstanceStore,
    items: list[Received],
    *,
    uid_root: str,
    quiet_seconds: float,
    now: dt.datetime | None = None,
    audit: Callable | None = None,
    cache: IndexCache | None = None,
    sync_now: bool = True,
) -> list[Outcome]:
    """Publishes the staged files and writes their index rows (C1) in the caller's transaction.

    With `sync_now` every published file is fsynced here, before the caller commits, so a
    committed row always points at a durable file. Without it the files (and the stored
    file of a duplicate) are left in each item's `pending_files` / `pending_dirs`, and the
    caller must fsync them after the commit, before answering (see `IndexWriter.overlap`).
    A duplicate SOP Instance UID with the same bytes changes nothing (after checking that the
    stored file still holds those bytes); with different bytes the file and rows are replaced
    and changed demographics are audited (field names and UIDs only).
    """
    now = now or utcnow()
    audit = audit or audit_demographics
    cache = cache if cache is not None else IndexCache()
    conn = _connection(session)
    sql = _statements(conn)
    outcomes: list[Outcome] = []
    arrivals: dict[int, int] = {}  # series id -> instances added (may be 0 or negative on a move)
    studies: set[int] = set()
    delivered: set[tuple[int, int]] = set()  # (association id, series id)

    for item in items:
        h = item.header
        study_id, changed = _upsert_study(conn, sql, cache, h, now, audit, session)
        series_id = _upsert_series(conn, sql, cache, h, study_id, item.calling_ae, uid_root, now)
        target = store.path_for(h.study_uid, h.series_uid, h.sop_instance_uid)
        item_values = _instance_values(item, series_id, target)
        instance_id = sql.insert_instance_id(
            conn, dict(sop_instance_uid=h.sop_instance_uid, received_at=now, **item_values)
        )
        replaced = False
        if instance_id is None:  # the SOP Instance UID is already indexed
            existing = conn.execute(sql.select_instance, {"b_uid": h.sop_instance_uid}).one()
            if existing.sha256 == item.staged.sha256 and store.dataset_digest(Path(existing.path)) == existing.sha256:
                if item.published is None:
                    store.discard(item.staged)
                if item.published is None or Path(existing.path) != item.published:
                    # the stored copy may still be on its way to disk (another association's batch)
                    item.pending_files.append(Path(existing.path))
                    item.pending_dirs.add(Path(existing.path).parent)
                outcomes.append(Outcome(SUCCESS, existing.id, duplicate=True, demographics_changed=changed))
                continue
            instance_id, replaced = existing.id, True
            if item.published is not None and item.data is not None:
                # published outside the lock while another version is indexed (a concurrent resend):
                # write our bytes again now, under the lock, so that file and row agree
                item.staged, item.published = store.stage(item.file_meta, item.data), None
            inst = _table(Instance)
            conn.execute(update(inst).where(inst.c.id == existing.id).values(updated_at=now, **item_values))
            if existing.series_id != series_id:  # the resend moved it to another series
                arrivals[existing.series_id] = arrivals.get(existing.series_id, 0) - 1
                arrivals[series_id] = arrivals.get(series_id, 0) + 1
            else:
                arrivals.setdefault(series_id, 0)
            log.info("instance %s resent with different content: file and index replaced", h.sop_instance_uid)
        else:
            arrivals[series_id] = arrivals.get(series_id, 0) + 1
        if item.published is None:
            item.published, dirs = store.publish(
                item.staged, h.study_uid, h.series_uid, h.sop_instance_uid, sync_first=replaced
            )
            item.pending_dirs |= dirs
            if not replaced:
                item.pending_files.append(item.published)
        studies.add(study_id)
        if item.association_id is not None and item.association_id not in cache.closed:
            delivered.add((item.association_id, series_id))
        outcomes.append(Outcome(SUCCESS, instance_id, replaced=replaced, demographics_changed=changed))

    open_series: set[int] = set()
    for pair in sorted(delivered):
        if pair not in cache.assoc_series:
            inserted = conn.execute(sql.insert_assoc_series, {"association_id": pair[0], "series_id": pair[1]}).first()
            if inserted is not None:  # (RETURNING, not rowcount: psycopg reports -1 here)
                conn.execute(sql.series_open, {"b_id": pair[1]})
            cache.assoc_series.add(pair)
        open_series.add(pair[1])
    for series_id, n in sorted(arrivals.items()):
        deadline = None if series_id in open_series else now + dt.timedelta(seconds=quiet_seconds)
        sql.run(conn, "series_arrival", {"b_id": series_id, "b_n": n, "b_now": now, "b_deadline": deadline})
    for study_id in sorted(studies):
        sql.run(conn, "study_arrival", {"b_id": study_id, "b_now": now})
    if sync_now:  # in parallel: about one flush for the batch
        store.sync(
            files=[f for it in items for f in it.pending_files], dirs={d for it in items for d in it.pending_dirs}
        )
        for it in items:
            it.pending_files, it.pending_dirs = [], set()
    cache.trim()
    return outcomes


def audit_demographics(
    session, entity_type: str, study_uid: str, fields: tuple[str, ...], header: InstanceHeader
) -> None:
    """Audits a demographics correction with UIDs and field names only (no patient data).

    `session` is a Session or a Connection (then a Session joins its transaction for the audit row).
    """
    from worklists.audit import record

    if not isinstance(session, Session):
        orm = Session(bind=session, join_transaction_mode="create_savepoint")
        try:
            audit_demographics(orm, entity_type, study_uid, fields, header)
            orm.commit()  # releases the savepoint; the caller's transaction commits the row
        finally:
            orm.close()
        return
    record(
        session,
        actor="system",
        action="demographics_updated",
        entity_type=entity_type,
        entity_id=study_uid,
        details={
            "study_uid": study_uid,
            "series_uid": header.series_uid,
            "sop_instance_uid": header.sop_instance_uid,
            "fields": list(fields),
        },
    )


def open_association(
    session, *, calling_ae: str | None, called_ae: str | None, peer_address: str | None, listener: str, now=None
) -> int:
    t = _table(Association)
    result = session.execute(
        t.insert().values(
            calling_ae=_fit(t.c.calling_ae, calling_ae),
            called_ae=_fit(t.c.called_ae, called_ae),
            peer_address=_fit(t.c.peer_address, peer_address),
            listener=_fit(t.c.listener, listener),
            started_at=now or utcnow(),
            instances=0,
        )
    )
    return int(result.inserted_primary_key[0])


@functools.cache
def _close_statements() -> tuple[Any, Any, Any]:
    """The statements of `close_association`, built once (built per call and per series, they
    cost the listener more CPU than the association's instances' own index rows at four
    associations of 100 instances over 10 series)."""
    asc, asr, se, inst = _table(Association), _table(AssociationSeries), _table(Series), _table(Instance)
    stored = select(func.count()).select_from(inst).where(inst.c.association_id == bindparam("b_id")).scalar_subquery()
    end = (
        update(asc)
        .where(and_(asc.c.id == bindparam("b_id"), asc.c.ended_at.is_(None)))
        .values(ended_at=bindparam("b_now"), end_reason=bindparam("b_reason"), instances=stored)
    )
    delivered = select(asr.c.series_id).where(asr.c.association_id == bindparam("b_id"))
    # each series the association delivered to: how many other associations still deliver to it,
    # and its quiet timer started when none does
    others = (
        select(func.count())
        .select_from(asr.join(asc, asc.c.id == asr.c.association_id))
        .where(asr.c.series_id == se.c.id, asc.c.ended_at.is_(None))
        .scalar_subquery()
    )
    series = (
        update(se)
        .where(se.c.id.in_(delivered))
        .values(
            open_associations=others,
            quiet_deadline=case((others == 0, bindparam("b_deadline")), else_=se.c.quiet_deadline),
        )
    )
    return end, delivered.order_by(asr.c.series_id), series


def close_association(
    session, association_id: int, *, reason: str, quiet_seconds: float, now=None, cache: IndexCache | None = None
) -> list[int]:
    """Ends an association; starts the quiet timer of each series no other open association delivers to."""
    now = now or utcnow()
    end, delivered, series = _close_statements()
    done = session.execute(end, {"b_id": association_id, "b_now": now, "b_reason": reason}).rowcount
    if cache is not None:
        cache.closed.add(association_id)
        cache.assoc_series = {p for p in cache.assoc_series if p[0] != association_id}
    if not done:
        return []
    series_ids = list(session.scalars(delivered, {"b_id": association_id}))
    if series_ids:
        deadline = now + dt.timedelta(seconds=quiet_seconds)
        session.execute(series, {"b_id": association_id, "b_deadline": deadline})
    return series_ids


def recover_unclean_stop(
    session, store: InstanceStore, *, since: dt.datetime, logger: logging.Logger | None = None
) -> int:
    """After an unclean stop: removes index rows written since `since` whose file is missing or
    does not hold the indexed bytes (a power loss between commit and fsync, see `IndexWriter`).

    Their senders got no Success and send them again. Returns the number of rows removed.
    """
    logger = logger or log
    inst, se = _table(Instance), _table(Series)
    rows = session.execute(
        select(inst.c.id, inst.c.series_id, inst.c.sop_instance_uid, inst.c.path, inst.c.sha256).where(
            (inst.c.received_at >= since) | (inst.c.updated_at >= since)
        )
    ).all()
    removed = 0
    for row in rows:
        if row.sha256 is None or store.dataset_digest(Path(row.path)) == row.sha256:
            continue
        session.execute(inst.delete().where(inst.c.id == row.id))
        session.execute(update(se).where(se.c.id == row.series_id).values(instances=se.c.instances - 1))
        Path(row.path).unlink(missing_ok=True)
        removed += 1
        logger.warning(
            "instance %s was not durable when the node stopped: removed from the index (its sender got no Success)",
            row.sop_instance_uid,
        )
    logger.info("checked %d instance(s) received since %s after an unclean stop; %d removed", len(rows), since, removed)
    return removed


def record_quarantine(
    session,
    *,
    calling_ae: str | None,
    sop_instance_uid: str | None,
    status: int,
    reason: str,
    path: str | None,
    now=None,
) -> int:
    t = _table(Quarantine)
    result = session.execute(
        t.insert().values(
            received_at=now or utcnow(),
            calling_ae=_fit(t.c.calling_ae, calling_ae),
            sop_instance_uid=_fit(t.c.sop_instance_uid, sop_instance_uid),
            status=status,
            reason=reason,
            path=path,
        )
    )
    return int(result.inserted_primary_key[0])
