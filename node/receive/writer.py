"""`IndexWriter`: the index of one listener process written with group commit.

Concurrent handlers' rows (`node.receive.index`) go into one transaction, so concurrent
associations share one fsync. Logs carry UIDs and statuses only, never patient data.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection

from node.db.database import Database, utcnow
from node.errors import StorageError
from node.receive.index import (
    IndexCache,
    Outcome,
    Received,
    close_association,
    index_instances,
    open_association,
    record_quarantine,
)
from node.receive.storage import InstanceStore

log = logging.getLogger(__name__)


@dataclass
class _Op:
    kind: str  # "store", "open", "close", "quarantine"
    payload: Any
    future: Future = field(default_factory=Future)
    taken: bool = False  # in a batch (committed by whoever took it)


def _driver(conn: Connection) -> Any:
    """The DB-API connection under `conn` (None only once SQLAlchemy has detached it)."""
    driver = conn.connection.driver_connection
    if driver is None:
        raise StorageError("the database connection is no longer attached")
    return driver


class IndexWriter:
    """Writes the index for one listener process, committing concurrent work in shared transactions.

    Group commit without a thread hop: a handler queues its operation and takes the commit
    lock; whoever holds the lock commits everything queued so far (up to `max_batch`) in one
    transaction; handlers whose operation was taken by another wait for its result. One
    association pays no hand-over to another thread (measured: on a busy 2-core machine the
    wake-up of a writer thread cost about 1.5 ms per instance); concurrent associations share
    one commit per batch.

    `overlap` (SQLite, where files and database share a disk): the transaction commits
    without its own fsync, then the batch's files, their directories and the SQLite WAL are
    fsynced together (the flushes merge: one per batch instead of two) and only then do the
    handlers answer. A power loss in that window can leave a committed row whose file is
    incomplete: its sender got no Success and sends it again (a resend checks the stored
    bytes, `index_instances`), and `recover_unclean_stop` checks the rows of the last minute
    at the next start. Elsewhere (PostgreSQL) files are fsynced before the commit. A batch
    that only opens associations is committed without a sync of its own (its rows reach the
    disk with the next batch's): the first C-STORE of an association waits for that row.
    """

    def __init__(
        self, db: Database, store: InstanceStore, settings, *, max_batch: int = 64, logger: logging.Logger | None = None
    ):
        self.db = db
        self.store = store
        self.uid_root = settings.uid_root
        self.quiet_seconds = settings.quiet_seconds
        self.max_batch = max_batch
        self.log = logger or log
        self.cache = IndexCache()
        self.overlap = settings.is_sqlite
        self._wal = Path(str(db.url).split("///", 1)[-1] + "-wal") if settings.is_sqlite else None
        self._pending: collections.deque[_Op] = collections.deque()
        self._commit_lock = threading.Lock()
        self._conn: Connection | None = None
        self._lock_path = Path(settings.data_dir) / "index-writer.lock" if settings.is_sqlite else None
        self._lock_fd: int | None = None
        self.batches = 0
        self.committed = 0

    # -- API used by the handlers (each blocks until its work is durable) --
    def store_instance(self, item: Received, timeout: float | None = None) -> Outcome:
        return self._run("store", item, timeout)

    def open_association(self, timeout: float | None = None, **kw) -> int:
        return self._run("open", kw, timeout)

    def close_association(self, association_id: int, reason: str, timeout: float | None = None) -> list[int]:
        return self._run("close", (association_id, reason), timeout)

    def quarantine(self, timeout: float | None = None, **kw) -> int:
        return self._run("quarantine", kw, timeout)

    def flush(self) -> None:
        """Commits whatever is still queued (at shutdown)."""
        while self._pending:
            with self._commit_lock:
                batch = self._take()
                done = self._commit(batch)
            self._finish(done)

    def _run(self, kind: str, payload: Any, timeout: float | None) -> Any:
        op = _Op(kind, payload)
        self._pending.append(op)
        deadline = None if timeout is None else time.monotonic() + timeout

        def remaining() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        while not op.taken:
            wait = remaining()
            if not self._commit_lock.acquire(timeout=-1 if wait is None else wait):
                raise StorageError(f"index write timed out after {timeout:.0f} s")
            try:
                if op.taken:
                    break
                done = self._commit(self._take())
            finally:
                self._commit_lock.release()
            self._finish(done)  # fsyncs (overlap) outside the lock: the next batch may commit meanwhile
        try:
            return op.future.result(remaining())
        except TimeoutError:
            raise StorageError(f"index write timed out after {timeout:.0f} s") from None

    def _take(self) -> list[_Op]:
        batch: list[_Op] = []
        while self._pending and len(batch) < self.max_batch:
            op = self._pending.popleft()
            op.taken = True
            batch.append(op)
        return batch

    def _commit(self, batch: list[_Op]) -> list[tuple[_Op, Any, BaseException | None]]:
        """Commits a batch (isolating a failing operation); returns (op, result, error) for each."""
        if not batch:
            return []
        try:
            results = self._transaction(batch)
        except Exception as e:
            self.cache.clear()  # it may hold ids of rows that were purged meanwhile
            if len(batch) > 1:  # isolate the failing operation; the others still commit
                return [entry for op in batch for entry in self._commit([op])]
            self.log.error("index write failed (%s): %s", batch[0].kind, type(e).__name__, exc_info=True)
            return [(batch[0], None, e)]
        self.batches += 1
        self.committed += len(batch)
        return [(op, result, None) for op, result in zip(batch, results)]

    def _finish(self, done: list[tuple[_Op, Any, BaseException | None]]) -> None:
        """Makes a committed batch durable (overlap: files, directories and WAL in one go), then answers."""
        if not done:
            return
        error: BaseException | None = None
        if self.overlap:
            items = [op.payload for op, _, err in done if op.kind == "store" and err is None]
            files = [f for it in items for f in it.pending_files]
            dirs = {d for it in items for d in it.pending_dirs}
            small = []
            # a batch that only opened associations is not synced on its own: nothing was acknowledged
            # with it, and the next batch's WAL fsync covers its rows (a crash before loses only rows
            # of associations that stored nothing)
            opens_only = all(op.kind == "open" for op, _, _ in done)
            if self._wal is not None and not opens_only and self._wal.exists():
                small.append(self._wal)  # (a WAL deleted meanwhile was checkpointed and synced by SQLite)
            try:
                self.store.sync(files=files, dirs=dirs, small=small)
            except (OSError, StorageError) as e:
                error = e  # nothing is acknowledged; the senders retry
            for it in items:
                it.pending_files, it.pending_dirs = [], set()
        for op, result, err in done:
            err = err or error
            if err is not None:
                op.future.set_exception(err)
            else:
                op.future.set_result(result)

    def _connection(self) -> Connection:
        if self._conn is None or self._conn.invalidated or self._conn.closed:
            self._conn = self.db.engine.connect()
            if self.overlap:  # the commit is made durable by `_finish` (WAL fsync with the files)
                _driver(self._conn).execute("PRAGMA synchronous=NORMAL")
        return self._conn

    def close(self) -> None:
        with self._commit_lock:
            self._release_connection()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    @contextlib.contextmanager
    def _interprocess_lock(self):
        """On SQLite, the listener processes take turns with a lock that wakes the next one at
        once (SQLite's own busy wait sleeps 1, 2, 5, 10 ms ... between retries)."""
        if self._lock_path is None:
            yield
            return
        if self._lock_fd is None:
            self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o640)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _transaction(self, batch: list[_Op]) -> list[Any]:
        """One transaction on the writer's own connection (kept open: no pool round trip per commit)."""
        results: list[Any] = [None] * len(batch)
        now = utcnow()
        conn = self._connection()
        try:
            with self._interprocess_lock(), conn.begin():
                self._apply(conn, batch, results, now)
        except Exception:
            self._release_connection()  # a fresh connection for the next transaction
            raise
        return results

    def _release_connection(self) -> None:
        """Returns the writer's connection to the pool with SQLite's default durability restored."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self.overlap and not conn.invalidated:
            try:
                if conn.in_transaction():
                    conn.rollback()
                _driver(conn).execute("PRAGMA synchronous=FULL")
            except Exception:
                conn.invalidate()
        conn.close()

    def _apply(self, s: Connection, batch: list[_Op], results: list[Any], now) -> None:
        stores = [(i, op.payload) for i, op in enumerate(batch) if op.kind == "store"]
        for i, op in enumerate(batch):
            if op.kind == "open":
                results[i] = open_association(s, now=now, **op.payload)
        if stores:
            outcomes = index_instances(
                s,
                self.store,
                [item for _, item in stores],
                uid_root=self.uid_root,
                quiet_seconds=self.quiet_seconds,
                now=now,
                cache=self.cache,
                sync_now=not self.overlap,
            )
            for (i, _), outcome in zip(stores, outcomes):
                results[i] = outcome
        for i, op in enumerate(batch):
            if op.kind == "close":
                results[i] = close_association(
                    s, op.payload[0], reason=op.payload[1], quiet_seconds=self.quiet_seconds, now=now, cache=self.cache
                )
            elif op.kind == "quarantine":
                results[i] = record_quarantine(s, now=now, **op.payload)
