"""Header parsing, the index rows of contract C1 and group commit, without the network (SQLite and PostgreSQL)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import MRImageStorage, generate_uid
from sqlalchemy import select
from test_listener import mr_dataset

from node.db.database import Database, utcnow
from node.db.schema import Association, AssociationSeries, Instance, Series, Study
from node.errors import IngestError, StorageError
from node.receive.header import read_header, validate
from node.receive.index import Received, close_association, index_instances, open_association
from node.receive.storage import InstanceStore, dataset_offset, encode_file_meta
from node.receive.writer import IndexWriter
from node.settings import load_settings
from support.listener import PYDICOM_DATA, dataset_bytes
from worklists.tables import AuditEvent

TEST_FILES = Path(__import__("pydicom").__file__).parent / "data" / "test_files"


def encode(ds: Dataset, *, implicit=False) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, implicit
    write_dataset(buf, ds)
    return buf.getvalue()


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
        "image_dfl.dcm",
        "MR_small_jp2klossless.dcm",
        "emri_small_RLE.dcm",
    ],
)
def test_read_header_in_each_transfer_syntax(name):
    path = TEST_FILES / name if (TEST_FILES / name).exists() else PYDICOM_DATA / name
    _, sop, ts, data = dataset_bytes(path)
    header = read_header(data, ts)
    ds = dcmread(path, stop_before_pixels=True)
    assert (header.sop_instance_uid, header.study_uid, header.series_uid) == (
        sop,
        ds.StudyInstanceUID,
        ds.SeriesInstanceUID,
    )
    assert header.modality == ds.Modality
    assert header.demographics["patient_name"] == str(ds.get("PatientName", ""))


def test_header_refusals_carry_the_status():
    ds = mr_dataset(generate_uid(), generate_uid(), 0)
    data = encode(ds)
    with pytest.raises(IngestError) as e:
        read_header(data[:50], "1.2.840.10008.1.2.1")
    assert e.value.status == 0xC000
    del ds.SeriesInstanceUID
    with pytest.raises(IngestError) as e:
        read_header(encode(ds), "1.2.840.10008.1.2.1")
    assert e.value.status == 0xC001 and "SeriesInstanceUID" in e.value.reason
    ds.SeriesInstanceUID = "1.2.03.x"
    with pytest.raises(IngestError) as e:
        read_header(encode(ds), "1.2.840.10008.1.2.1")
    assert e.value.status == 0xC002
    ds.SeriesInstanceUID = generate_uid()
    header = read_header(encode(ds), "1.2.840.10008.1.2.1")
    with pytest.raises(IngestError) as e:
        validate(header, request_sop_class_uid="1.2.840.10008.5.1.4.1.1.2", request_sop_instance_uid=ds.SOPInstanceUID)
    assert e.value.status == 0xA900
    validate(header, request_sop_class_uid=MRImageStorage, request_sop_instance_uid=ds.SOPInstanceUID)


def test_own_objects_are_recognised(settings):
    root = settings.uid_root
    ds = mr_dataset(generate_uid(), generate_uid(), 0)
    assert not read_header(encode(ds), "1.2.840.10008.1.2.1").is_own_object(root)
    ds.SeriesInstanceUID = root + "7.1"
    assert read_header(encode(ds), "1.2.840.10008.1.2.1").is_own_object(root)
    ds.SeriesInstanceUID = generate_uid()
    item = Dataset()
    item.Manufacturer = "msknode"
    ds.ContributingEquipmentSequence = [item]
    assert read_header(encode(ds), "1.2.840.10008.1.2.1").is_own_object(root)


def test_file_meta_and_uid_paths(tmp_path):
    store = InstanceStore(tmp_path / "store", tmp_path / "q", min_free_bytes=0)
    store.prepare()
    meta = encode_file_meta(MRImageStorage, "1.2.3.4", "1.2.840.10008.1.2.1", "PACS")
    staged = store.stage(meta, b"\x08\x00\x16\x00UI\x1a\x00" + MRImageStorage.encode() + b"\0")
    final, dirs = store.publish(staged, "1.2", "1.2.3", "1.2.3.4")
    store.sync_files([final])
    store.sync_dirs(dirs)
    assert final == tmp_path / "store" / "1.2" / "1.2.3" / "1.2.3.4.dcm"
    assert dirs == {tmp_path / "store", tmp_path / "store" / "1.2", tmp_path / "store" / "1.2" / "1.2.3"}
    fm = dcmread(final).file_meta
    assert fm.MediaStorageSOPInstanceUID == "1.2.3.4" and fm.SourceApplicationEntityTitle == "PACS"
    assert final.read_bytes()[dataset_offset(final) :].startswith(b"\x08\x00\x16\x00")
    for bad in ("../etc", "1.2/3", "1.2.3a", "", "1." * 40):
        with pytest.raises(StorageError):
            store.path_for(bad, "1.2", "1.2.3")
    assert not list(store.incoming.iterdir())


def _received(store: InstanceStore, ds: Dataset, association_id=None) -> Received:
    data = encode(ds)
    header = read_header(data, "1.2.840.10008.1.2.1")
    meta = encode_file_meta(header.sop_class_uid, header.sop_instance_uid, "1.2.840.10008.1.2.1", "PACS")
    return Received(header, store.stage(meta, data), "1.2.840.10008.1.2.1", "PACS", association_id)


def _exercise_index(database: Database, settings) -> None:
    """Arrivals, duplicates, corrections and association timers on one database."""
    store = InstanceStore.from_settings(settings)
    store.prepare()
    study, series = generate_uid(), generate_uid()
    with database.session() as s:
        a1 = open_association(s, calling_ae="PACS", called_ae="MSKNODE", peer_address="127.0.0.1:1", listener="t:1")
        a2 = open_association(s, calling_ae="PACS", called_ae="MSKNODE", peer_address="127.0.0.1:2", listener="t:1")
    first = [mr_dataset(study, series, i, name="Müller^Jörg") for i in range(3)]
    with database.session() as s:
        out = index_instances(
            s, store, [_received(store, d, a1) for d in first[:2]], uid_root=settings.uid_root, quiet_seconds=5
        )
        out += index_instances(s, store, [_received(store, first[2], a2)], uid_root=settings.uid_root, quiet_seconds=5)
    assert [o.status for o in out] == [0, 0, 0] and not any(o.duplicate for o in out)
    with database.session() as s:
        se = s.scalars(select(Series).where(Series.series_uid == series)).one()
        assert (se.instances, se.open_associations, se.quiet_deadline, se.state) == (3, 2, None, "receiving")
        assert s.scalars(select(Study).where(Study.study_uid == study)).one().patient_name == "Müller^Jörg"
        assert len(s.scalars(select(AssociationSeries).where(AssociationSeries.series_id == se.id)).all()) == 2
    # one association ends: the other still delivers, no timer yet; then the second ends
    with database.session() as s:
        close_association(s, a1, reason="released", quiet_seconds=5)
    with database.session() as s:
        se = s.scalars(select(Series).where(Series.series_uid == series)).one()
        assert se.quiet_deadline is None and se.open_associations == 1
        assert s.get(Association, a1).instances == 2
    now = utcnow()
    with database.session() as s:
        close_association(s, a2, reason="aborted", quiet_seconds=5, now=now)
    with database.session() as s:
        se = s.scalars(select(Series).where(Series.series_uid == series)).one()
        assert se.open_associations == 0 and abs((se.quiet_deadline - now).total_seconds() - 5) < 0.01
        assert s.get(Association, a2).end_reason == "aborted"
    # identical resend: nothing changes; corrected resend: updated and audited
    with database.session() as s:
        dup = index_instances(s, store, [_received(store, first[0])], uid_root=settings.uid_root, quiet_seconds=5)
    assert dup[0].duplicate and not list(store.incoming.iterdir())
    first[0].PatientName = "Mueller^Joerg"
    with database.session() as s:
        fix = index_instances(s, store, [_received(store, first[0])], uid_root=settings.uid_root, quiet_seconds=5)
    assert fix[0].replaced and fix[0].demographics_changed == ("patient_name",)
    with database.session() as s:
        assert s.scalars(select(Study).where(Study.study_uid == study)).one().patient_name == "Mueller^Joerg"
        assert s.scalars(select(Series).where(Series.series_uid == series)).one().instances == 3
        audit = s.scalars(select(AuditEvent).where(AuditEvent.entity_id == study)).one()
        assert audit.action == "demographics_updated" and "Mueller" not in str(audit.details)
    # a resend that moves the instance to another series keeps both counts right
    first[1].SeriesInstanceUID = other = generate_uid()
    with database.session() as s:
        index_instances(s, store, [_received(store, first[1])], uid_root=settings.uid_root, quiet_seconds=5)
    with database.session() as s:
        counts = {u: s.scalar(select(Series.instances).where(Series.series_uid == u)) for u in (series, other)}
        inst = s.scalars(select(Instance).where(Instance.sop_instance_uid == first[1].SOPInstanceUID)).one()
    assert counts == {series: 2, other: 1} and other in inst.path and Path(inst.path).exists()


def test_index_rows_on_sqlite(db, settings):
    _exercise_index(db, settings)


def test_index_rows_on_postgresql(postgres_url, tmp_path):
    settings = load_settings(data_dir=tmp_path / "data", database_url=postgres_url)
    database = Database(postgres_url)
    try:
        _exercise_index(database, settings)
    finally:
        database.dispose()


def test_group_commit_puts_concurrent_instances_in_one_transaction(db, settings):
    store = InstanceStore.from_settings(settings)
    store.prepare()
    writer = IndexWriter(db, store, settings)
    study, series = generate_uid(), generate_uid()
    items = [_received(store, mr_dataset(study, series, i)) for i in range(8)]
    results = [None] * 8
    writer._commit_lock.acquire()  # a commit in progress: the eight handlers queue behind it
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, writer.store_instance(items[i], 30)))
        for i in range(8)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while len(writer._pending) < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    writer._commit_lock.release()
    for t in threads:
        t.join()
    assert all(r is not None and r.status == 0 for r in results)
    assert writer.batches == 1 and writer.committed == 8
    with db.session() as s:
        assert s.scalars(select(Series).where(Series.series_uid == series)).one().instances == 8


def test_new_files_are_published_before_the_transaction_and_races_end_consistent(db, settings):
    """publish_new makes a new file durable outside the index lock; if another version of the same
    SOP Instance UID got indexed meanwhile, the file is written again under the lock, so the
    stored bytes and the row's sha256 agree."""
    from node.receive.index import publish_new

    store = InstanceStore.from_settings(settings)
    store.prepare()
    ds = mr_dataset(generate_uid(), generate_uid(), 0, name="First^Version")
    first = _received(store, ds)
    assert publish_new(store, first) and first.published.exists()
    with db.session() as s:
        assert index_instances(s, store, [first], uid_root=settings.uid_root, quiet_seconds=1)[0].status == 0
    ds.PatientName = "Second^Version"
    second = _received(store, ds)
    data = encode(ds)
    second.file_meta, second.data = (
        encode_file_meta(MRImageStorage, ds.SOPInstanceUID, "1.2.840.10008.1.2.1", "PACS"),
        data,
    )
    assert not publish_new(store, second)  # a file is there: the transaction decides
    # the race: a concurrent handler renamed its bytes over the path before this transaction ran
    racer = _received(store, mr_dataset(ds.StudyInstanceUID, ds.SeriesInstanceUID, 0, name="Racer^Version"))
    second.published, _ = store.publish(second.staged, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    store.publish(racer.staged, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    with db.session() as s:
        out = index_instances(s, store, [second], uid_root=settings.uid_root, quiet_seconds=1)[0]
    assert out.replaced
    with db.session() as s:
        inst = s.scalars(select(Instance).where(Instance.sop_instance_uid == ds.SOPInstanceUID)).one()
    stored = Path(inst.path).read_bytes()[dataset_offset(Path(inst.path)) :]
    assert stored == data and inst.sha256 == second.staged.sha256
    assert not list(store.incoming.iterdir())


def test_a_resend_repairs_a_stored_file_that_does_not_hold_the_indexed_bytes(db, settings):
    """A power loss between commit and fsync can leave a row whose file is incomplete; the resend
    (its sender got no Success) is then stored again instead of being taken for a duplicate."""
    store = InstanceStore.from_settings(settings)
    store.prepare()
    ds = mr_dataset(generate_uid(), generate_uid(), 0)
    with db.session() as s:
        first = index_instances(s, store, [_received(store, ds)], uid_root=settings.uid_root, quiet_seconds=1)[0]
    with db.session() as s:
        path = Path(s.get(Instance, first.instance_id).path)
    path.write_bytes(path.read_bytes()[:400])  # what a power loss may leave
    with db.session() as s:
        again = index_instances(s, store, [_received(store, ds)], uid_root=settings.uid_root, quiet_seconds=1)[0]
    assert again.replaced and not again.duplicate
    assert path.read_bytes()[dataset_offset(path) :] == encode(ds)
    with db.session() as s:
        assert index_instances(s, store, [_received(store, ds)], uid_root=settings.uid_root, quiet_seconds=1)[
            0
        ].duplicate


def test_recovery_after_an_unclean_stop_removes_rows_without_their_bytes(db, settings):
    import datetime as dt

    from node.receive.index import recover_unclean_stop

    store = InstanceStore.from_settings(settings)
    store.prepare()
    study, series = generate_uid(), generate_uid()
    datasets = [mr_dataset(study, series, i) for i in range(3)]
    with db.session() as s:
        out = index_instances(
            s, store, [_received(store, d) for d in datasets], uid_root=settings.uid_root, quiet_seconds=1
        )
    with db.session() as s:
        broken = Path(s.get(Instance, out[1].instance_id).path)
    broken.write_bytes(broken.read_bytes()[:300])
    with db.session() as s:
        assert recover_unclean_stop(s, store, since=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)) == 1
    with db.session() as s:
        left = {i.sop_instance_uid for i in s.scalars(select(Instance).join(Series).where(Series.series_uid == series))}
        assert left == {datasets[0].SOPInstanceUID, datasets[2].SOPInstanceUID}
        assert s.scalars(select(Series).where(Series.series_uid == series)).one().instances == 2
    assert not broken.exists()
    with db.session() as s:  # rows older than the window are not read at all
        assert recover_unclean_stop(s, store, since=dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1)) == 0


def test_index_writer_on_postgresql_fsyncs_before_the_commit(postgres_url, tmp_path):
    from node.receive.index import publish_new

    settings = load_settings(data_dir=tmp_path / "data", database_url=postgres_url)
    settings.ensure_dirs()
    database = Database(postgres_url)
    store = InstanceStore.from_settings(settings)
    store.prepare()
    writer = IndexWriter(database, store, settings)
    try:
        assert writer.overlap is False
        study, series = generate_uid(), generate_uid()
        for i in range(3):
            item = _received(store, mr_dataset(study, series, i))
            assert publish_new(store, item, sync=True) and item.pending_files == []
            assert writer.store_instance(item, 30).status == 0
        with database.session() as s:
            assert s.scalars(select(Series).where(Series.series_uid == series)).one().instances == 3
    finally:
        writer.close()
        database.dispose()


def test_a_retried_refused_object_is_quarantined_once(tmp_path):
    store = InstanceStore(tmp_path / "store", tmp_path / "quarantine", min_free_bytes=0)
    store.prepare()
    first = store.quarantine(b"garbage" * 10, file_meta=b"meta")
    assert store.quarantine(b"garbage" * 10, file_meta=b"meta") == first
    assert store.quarantine(b"other", file_meta=b"meta") != first
    assert first.read_bytes() == b"meta" + b"garbage" * 10
    assert len(list((tmp_path / "quarantine").rglob("*.dcm"))) == 2 and not list(
        (tmp_path / "quarantine").rglob("*.part")
    )


def test_the_driver_level_statements_write_what_sqlalchemy_writes(tmp_path, monkeypatch):
    """On SQLite the per-instance INSERT and arrival UPDATEs run on the DB-API connection
    (`_DriverStatement`); the rows must be byte for byte those `Connection.execute` writes."""
    import sqlite3

    from node.receive import index as index_module

    study, series = generate_uid(), generate_uid()
    datasets = [mr_dataset(study, series, i, name="Müller^Jörg") for i in range(3)]
    now = utcnow()
    dumps = {}
    for mode in ("driver", "sqlalchemy"):
        settings = load_settings(data_dir=tmp_path / mode)
        settings.ensure_dirs()
        database = Database(settings.database_url)
        sql = index_module._Statements("sqlite")
        if mode == "driver":
            assert set(sql.driver) == {"insert_instance", "series_arrival", "study_arrival"}
        else:
            sql.driver = {}
        monkeypatch.setattr(index_module, "_statements", lambda conn, sql=sql: sql)
        try:
            store = InstanceStore.from_settings(settings)
            store.prepare()
            with database.session() as s:
                a = open_association(s, calling_ae="PACS", called_ae="MSKNODE", peer_address="x", listener="t", now=now)
            with database.session() as s:
                items = [_received(store, d, a) for d in datasets[:2]]
                out = index_instances(s, store, items, uid_root=settings.uid_root, quiet_seconds=5, now=now)
            with database.session() as s:  # a second batch: the UPDATEs add to what is there; a duplicate
                items = [_received(store, datasets[2], a), _received(store, datasets[0], a)]
                out += index_instances(s, store, items, uid_root=settings.uid_root, quiet_seconds=5, now=now)
            assert [o.status for o in out] == [0, 0, 0, 0] and out[3].duplicate
        finally:
            database.dispose()
        raw = sqlite3.connect(str(tmp_path / mode / "msknode.db"))
        try:
            dumps[mode] = {
                table: raw.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()
                for table in ("studies", "series", "instances")
            }
        finally:
            raw.close()
    driver, orm = dumps["driver"], dumps["sqlalchemy"]
    assert len(driver["instances"]) == 3 and driver["series"][0][0] == orm["series"][0][0]
    for table in ("studies", "series", "instances"):
        # the same values, apart from the data directory in each instance's path
        def same_dir(rows, mode):
            return [tuple(str(v).replace(str(tmp_path / mode), "DIR") for v in row) for row in rows]

        assert same_dir(driver[table], "driver") == same_dir(orm[table], "sqlalchemy"), table


def test_the_end_of_an_association_reads_its_instances_through_an_index(db, settings):
    """Closing an association counts its instances and asks, for each of its series, which other open
    associations deliver to it: with the instances table scanned for the count, each end cost ~0.1 ms
    per thousand stored instances (107 ms at a million) under the writer's lock. SQLite's plan of
    every statement `close_association` runs must search an index, never scan a table."""
    from sqlalchemy import event

    store = InstanceStore.from_settings(settings)
    store.prepare()
    study, series = generate_uid(), generate_uid()
    with db.session() as s:
        a = open_association(s, calling_ae="PACS", called_ae="MSKNODE", peer_address="127.0.0.1:1", listener="t:1")
        index_instances(
            s,
            store,
            [_received(store, mr_dataset(study, series, i), a) for i in range(3)],
            uid_root="9",
            quiet_seconds=5,
        )
    statements: list[tuple[str, object]] = []

    def seen(conn, cursor, statement, parameters, context, executemany):
        statements.append((statement, parameters))

    event.listen(db.engine, "before_cursor_execute", seen)
    try:
        with db.session() as s:
            close_association(s, a, reason="released", quiet_seconds=5)
    finally:
        event.remove(db.engine, "before_cursor_execute", seen)
    assert any("instances" in sql for sql, _ in statements)
    with db.engine.connect() as conn:
        driver = conn.connection.driver_connection
        plans = {
            sql: [row[-1] for row in driver.execute("EXPLAIN QUERY PLAN " + sql, params)] for sql, params in statements
        }
    scans = {sql: plan for sql, plan in plans.items() if any(step.startswith("SCAN") for step in plan)}
    assert not scans, scans
    with db.session() as s:
        assert s.get(Association, a).instances == 3


def test_a_staged_file_is_on_its_way_to_disk_before_its_fsync(tmp_path, monkeypatch):
    """`stage` starts the kernel's writeback of the new file (sync_file_range, WRITE) before it
    returns, so the fsync after the index row waits for less; the binding works on this kernel."""
    import os

    from node.receive import storage

    assert storage._sync_file_range is not None, "no sync_file_range binding on Linux"
    probe = tmp_path / "probe"
    probe.write_bytes(b"x" * 65536)
    fd = os.open(probe, os.O_RDONLY)
    try:
        assert storage.start_writeback(fd) is True
    finally:
        os.close(fd)
    assert storage.start_writeback(-1) is False  # (a bad descriptor: no writeback, no exception)

    calls = []
    real = storage._sync_file_range

    def recording(fd, offset, nbytes, flags):
        calls.append((os.fstat(fd).st_ino, os.fstat(fd).st_size, offset, nbytes, flags))
        return real(fd, offset, nbytes, flags)

    monkeypatch.setattr(storage, "_sync_file_range", recording)
    store = InstanceStore(tmp_path / "store", tmp_path / "q", min_free_bytes=0)
    store.prepare()
    staged = store.stage(b"M" * 132, b"D" * 300_000)
    st = staged.path.stat()
    assert calls == [(st.st_ino, 300_132, 0, 0, storage._SYNC_FILE_RANGE_WRITE)]


def test_a_batch_of_one_file_is_fsynced_by_its_caller_and_a_larger_one_in_parallel(tmp_path, monkeypatch):
    """One file (its writeback already started), its directory and the database log: all fsynced
    by the calling thread, no hand-over to a thread. Two files: the second in a thread of its own,
    the directory and log together in one more. Every one is fsynced; a failure is raised."""
    import threading

    from node.receive import storage

    synced: list[tuple[str, bool, str]] = []
    real = storage._fsync_path

    def recording(path, is_dir=False):
        synced.append((str(path), is_dir, threading.current_thread().name))
        real(path, is_dir)

    monkeypatch.setattr(storage, "_fsync_path", recording)
    store = InstanceStore(tmp_path / "store", tmp_path / "q", min_free_bytes=0)
    store.prepare()
    f, g, wal = tmp_path / "f.dcm", tmp_path / "g.dcm", tmp_path / "index.db-wal"
    for p in (f, g, wal):
        p.write_bytes(b"x")
    caller = threading.current_thread().name
    store.sync(files=[f], dirs=[tmp_path], small=[wal])
    assert synced == [(str(f), False, caller), (str(tmp_path), True, caller), (str(wal), False, caller)]
    assert store._pool is None  # (no thread was started)

    synced.clear()
    store.sync(files=[f, g], dirs=[tmp_path], small=[wal])
    assert [(p, d) for p, d, t in synced if t == caller] == [(str(f), False)]
    threads = {p: t for p, _, t in synced if t != caller}
    assert set(threads) == {str(g), str(tmp_path), str(wal)}
    assert threads[str(tmp_path)] == threads[str(wal)]  # the directory and the log: one job

    with pytest.raises(StorageError, match="fsync failed"):
        store.sync(files=[f], dirs=[tmp_path], small=[tmp_path / "gone-wal"])
    with pytest.raises(StorageError, match="fsync failed"):
        store.sync(files=[f, g], dirs=[tmp_path], small=[tmp_path / "gone-wal"])


def test_a_series_acquisition_is_read_once_and_known_demographics_are_not_compared_again(db, settings, monkeypatch):
    """The acquisition parameters (routing's input, kept on the series row) are read from the header of
    the series' first instance only, not from every instance; an instance whose demographics are those
    of the study's previous instance is not compared field by field again. A correction still is."""
    import node.receive.header as header_module
    import node.receive.index as index_module
    from node.receive.index import IndexCache

    read, compared = [], []
    acquisition_from_dataset = header_module.acquisition_from_dataset
    study_values = index_module._study_values
    monkeypatch.setattr(
        header_module, "acquisition_from_dataset", lambda ds: read.append(1) or acquisition_from_dataset(ds)
    )
    monkeypatch.setattr(index_module, "_study_values", lambda h: compared.append(1) or study_values(h))
    store = InstanceStore.from_settings(settings)
    store.prepare()
    study, series = generate_uid(), generate_uid()
    datasets = [mr_dataset(study, series, i, name="Same^Patient") for i in range(6)]
    for d in datasets:
        d.RepetitionTime, d.EchoTime, d.ScanningSequence, d.MagneticFieldStrength = 3000, 30, "SE", 1.5
    items = [_received(store, d) for d in datasets]
    assert not read  # parsing alone reads no acquisition parameters
    cache = IndexCache()
    with db.session() as s:
        for item in items[:3]:
            index_instances(s, store, [item], uid_root=settings.uid_root, quiet_seconds=5, cache=cache)
        index_instances(s, store, items[3:5], uid_root=settings.uid_root, quiet_seconds=5, cache=cache)
    assert (len(read), len(compared)) == (1, 1)
    expected = acquisition_from_dataset(datasets[0]).to_json() or None
    with db.session() as s:
        assert s.scalars(select(Series).where(Series.series_uid == series)).one().acquisition == expected
    assert expected, "the test's data sets carry acquisition parameters"
    datasets[5].PatientName = "Corrected^Patient"
    with db.session() as s:
        out = index_instances(
            s, store, [_received(store, datasets[5])], uid_root=settings.uid_root, quiet_seconds=5, cache=cache
        )
    assert out[0].demographics_changed == ("patient_name",) and len(compared) == 2
    with db.session() as s:
        assert s.scalars(select(Study).where(Study.study_uid == study)).one().patient_name == "Corrected^Patient"
    # a header read for another purpose (a folder scan) carries its parameters at once
    read.clear()
    from node.receive.header import header_from_dataset

    assert header_from_dataset(datasets[0]).acquisition == expected and len(read) == 1


def test_a_batch_that_only_opens_associations_is_not_synced_and_the_next_store_syncs_it(db, settings, monkeypatch):
    """On SQLite the writer syncs files, directories and WAL before it answers a C-STORE; a batch that
    only records new associations answers without a sync of its own (nothing is acknowledged with it),
    and the association row is on disk once the first instance is: that batch syncs the WAL after it."""
    store = InstanceStore.from_settings(settings)
    store.prepare()
    writer = IndexWriter(db, store, settings)
    synced: list[tuple[list, set, list]] = []
    sync = store.sync

    def recording(files=(), dirs=(), small=()):
        call = (list(files), set(dirs), list(small))
        if any(call):  # (called with nothing to sync: returns at once)
            synced.append(call)
        return sync(files=call[0], dirs=call[1], small=call[2])

    monkeypatch.setattr(store, "sync", recording)
    try:
        association_id = writer.open_association(
            calling_ae="OPENSCU", called_ae="MSKNODE", peer_address="127.0.0.1:1", listener="test", timeout=30
        )
        assert synced == []
        item = _received(store, mr_dataset(generate_uid(), generate_uid(), 0))
        item.association_id = association_id
        assert writer.store_instance(item, 30).status == 0
        wal = Path(str(db.url).split("///", 1)[-1] + "-wal")
        assert len(synced) == 1 and synced[0][2] == [wal] and len(synced[0][0]) == 1
        writer.close_association(association_id, "released", timeout=30)  # the end is synced: a C-STORE may follow
        assert len(synced) == 2 and synced[1][2] == [wal]
    finally:
        writer.close()
    with db.session() as s:
        row = s.get(Association, association_id)
        assert row.instances == 1 and row.end_reason == "released"


def test_free_space_is_read_at_most_every_quarter_second_and_staged_bytes_count_at_once(tmp_path, monkeypatch):
    """A C-STORE does not ask the file system for its free space each time: a reading serves for
    FREE_SPACE_READ_SECONDS, less what the store staged since; a new threshold applies at once."""
    import os

    from node.receive import storage

    store = InstanceStore(tmp_path / "store", tmp_path / "q", min_free_bytes=0)
    store.prepare()
    reads: list[str] = []
    statvfs = os.statvfs

    def counting(path):
        reads.append(str(path))
        return statvfs(path)

    monkeypatch.setattr(storage.os, "statvfs", counting)
    clock = [1000.0]
    monkeypatch.setattr(storage.time, "monotonic", lambda: clock[0])
    free = store.free_bytes()
    staged = store.stage(b"", b"\0" * 300_000)
    assert store.free_bytes() == free - 300_000 and reads == [str(store.root)]
    store.min_free_bytes = free  # (a threshold above what is left now: refused without a new reading)
    assert not store.has_space() and len(reads) == 1
    store.min_free_bytes = 0
    clock[0] += storage.FREE_SPACE_READ_SECONDS
    store.free_bytes()
    assert len(reads) == 2
    store.discard(staged)
