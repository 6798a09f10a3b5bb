"""The embedded broker (`node.jobs.fs_broker`): a message file is whole or not there, and an unreadable one
(a producer killed mid-write) is dropped with a warning instead of stopping the consumer."""

from __future__ import annotations

import logging
import os
import uuid

import pytest
from kombu import Connection

from node.jobs import fs_broker
from node.jobs.celery_app import FilesystemBroker, transport_options

pytestmark = pytest.mark.unit


@pytest.fixture
def conn(settings):
    """A connection and a queue of this test's own name: kombu keeps declared exchanges in a state shared by
    every connection of the transport in a process, so the node's queue names stay untouched here."""
    opts = transport_options(settings)
    with Connection(fs_broker.URL, transport_options=opts) as c:
        yield c, FilesystemBroker.of(settings), f"t{uuid.uuid4().hex[:12]}"


def test_a_message_is_whole_and_an_empty_file_is_dropped_for_the_next_one(conn, caplog):
    c, fs, name = conn
    q = c.SimpleQueue(name)
    q.put({"job_id": 7})
    names = [p.name for p in fs.queue_dir.iterdir()]
    assert len(names) == 1 and names[0].endswith(f".{name}.msg") and not any(n.startswith(".") for n in names)
    assert q.get(timeout=2).payload == {"job_id": 7}
    # what a producer killed between creating and writing its file leaves (kombu's own transport did that)
    # (named to be taken before the next message: consumers take files in name order)
    (fs.queue_dir / f"{0:016d}_00000000-dead.{name}.msg").write_bytes(b"")
    q.put({"job_id": 8})
    with caplog.at_level(logging.WARNING, logger="node.jobs.fs_broker"):
        assert q.get(timeout=5).payload == {"job_id": 8}
    assert "unreadable message file was dropped" in caplog.text
    assert not [p for p in fs.queue_dir.iterdir() if p.name.endswith(".msg")]
    q.close()


def test_a_file_still_being_written_is_not_a_message(conn):
    c, fs, name = conn
    q = c.SimpleQueue(name)
    (fs.queue_dir / f".5_abc.{name}.msg.part").write_bytes(b'{"half')
    with pytest.raises(q.Empty):
        q.get(timeout=0.5)
    assert os.path.exists(fs.queue_dir / f".5_abc.{name}.msg.part")
    q.close()


def test_messages_are_taken_in_the_order_sent_across_a_digit_boundary_of_the_stamp(conn, monkeypatch):
    """Consumers take files in name order; the stamp is fixed-width, so 9,999 ms comes before 10,000 ms."""
    c, _fs, name = conn
    q = c.SimpleQueue(name)
    stamps = iter([9_999_000_000, 10_000_000_000])
    monkeypatch.setattr(fs_broker, "time_ns", lambda: next(stamps))
    q.put({"job_id": "first"})
    q.put({"job_id": "second"})
    assert [q.get(timeout=2).payload["job_id"] for _ in range(2)] == ["first", "second"]
    q.close()


@pytest.mark.parametrize("flag", ["should_stop", "should_terminate"])
def test_a_wait_for_a_message_ends_once_the_worker_is_asked_to_stop(conn, monkeypatch, flag):
    """Celery's consumer loop waits in the transport 2 s at a time and looks for a shutdown request only between
    two waits: the embedded transport ends a wait itself once a warm (SIGTERM: should_stop, exit code 0) or cold
    shutdown is requested, instead of waiting out its timeout."""
    import time

    from celery.worker import state

    c, _fs, name = conn
    q = c.SimpleQueue(name)
    monkeypatch.setattr(state, flag, 0)  # what the signal handler sets (the exit code: 0 is falsy)
    t0 = time.monotonic()
    with pytest.raises(q.Empty):
        q.get(timeout=120)
    assert time.monotonic() - t0 < 60  # ended by the request, not by its timeout
    # a message already there is still taken
    q.put({"job_id": 9})
    assert q.get(timeout=120).payload == {"job_id": 9}
    q.close()
