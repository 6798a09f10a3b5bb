"""The embedded broker: kombu's filesystem transport, made safe between processes.

kombu's ``filesystem`` transport creates a message file under its final name and then writes it, and a
consumer moves and reads any file of that name at once: a consumer in another process can read a
message while it is still empty, and a producer killed mid-write leaves an empty file that every
consumer trips over ("Unrecoverable error: JSONDecodeError" — the worker stops). Here a message is
written under a name consumers skip, fsynced, then renamed into place (whole or not there), and a
consumer drops a file it cannot decode with one warning instead of stopping: the broker only wakes
workers up; jobs live in the database and the sweeper re-sends a lost wake-up (`node.jobs.lease`).
A consumer's wait ends as soon as its celery worker is asked to stop.

Registered as the kombu transport ``msknodefs`` (`node.jobs.celery_app` uses it for the embedded
default, ``MSKNODE_BROKER_URL`` unset or ``filesystem://``).
"""

from __future__ import annotations

import logging
import os
import uuid
from time import monotonic, time_ns

from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

log = logging.getLogger(__name__)

ALIAS = "msknodefs"
URL = f"{ALIAS}://localhost//"
#: undecodable message files dropped in one ``_get`` before it reports the queue empty
MAX_DROPPED = 100


class Channel(filesystem.Channel):
    def _put(self, queue, payload, **kwargs):
        # consumers take files in name order: a fixed-width stamp keeps that the order of sending (an unpadded
        # one put "9999_" after "10000_"), and wall-clock time keeps it across a restart of the machine
        name = f"{time_ns() // 1_000_000:016d}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        tmp = os.path.join(self.data_folder_out, f".{name}.part")  # consumers match "<stamp>.<queue>.msg" only
        try:
            with open(tmp, "wb", buffering=0) as f:
                f.write(str_to_bytes(dumps(payload)))
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise filesystem.ChannelError(f"Cannot add file {final!r} to directory") from exc

    def _get(self, queue):
        for _ in range(MAX_DROPPED):
            try:
                return super()._get(queue)
            except ValueError as e:  # an empty or cut message file (a producer killed mid-write)
                log.warning("broker: queue %s: an unreadable message file was dropped (%s)", queue, e)
        raise filesystem.Empty()


def _worker_stopping() -> bool:
    """A warm or cold shutdown of the celery worker of this process was requested (SIGTERM, SIGINT, SIGQUIT)."""
    from celery.worker import state

    # celery's own test (state.maybe_shutdown): a warm shutdown sets should_stop to its exit code, 0
    return any(flag is not None and flag is not False for flag in (state.should_stop, state.should_terminate))


class Transport(filesystem.Transport):
    Channel = Channel
    driver_type = "filesystem"
    driver_name = "filesystem"

    def drain_events(self, connection, timeout=None):
        """kombu's, in steps of the polling interval: a wait also ends (no message) once the worker is asked to
        stop. Celery's blocking consumer loop waits here 2 s at a time and looks for a shutdown request only
        between two waits, so an idle worker stopped only once the current 2 s were over (an idle `msknode serve`
        stopped in 5.2-6.4 s, now in 2.5-2.8 s)."""
        step = self.polling_interval
        if not timeout or not step or timeout <= step:
            return super().drain_events(connection, timeout=timeout)
        deadline = monotonic() + timeout
        while True:
            try:
                return super().drain_events(connection, timeout=min(step, max(deadline - monotonic(), 0.001)))
            except TimeoutError:  # (socket.timeout, what kombu raises)
                if monotonic() >= deadline or _worker_stopping():
                    raise


TRANSPORT_ALIASES.setdefault(ALIAS, f"{__name__}:Transport")
