"""`Spool`: the data set of one C-STORE, kept as it arrives, with a ceiling.

pynetdicom gathers a C-STORE's data set fragments in memory (a BytesIO) until the last one has
come, and the handler then copies them; a 300 MB object costs the listener several times its
size. Here each association's DIMSE provider (`SpoolingDIMSE`, installed by the listener when the
association is requested) gives every C-STORE request a `Spool` as soon as its command set is
decoded, and pynetdicom writes the data set fragments into it (its own hook for chunked data
sets: ``DIMSEMessage._data_set_file``). A spool

- keeps the bytes in memory while they are few (`memory_limit`, MSKNODE_SPOOL_MEMORY_MB):
  the usual 0.5 MB MR instance takes the same path as before;
- past that, moves them to a file in the store's staging directory, headed by the File
  Meta Information the stored file will carry, and writes each later fragment straight to
  it (the sha256 of the data set computed on the way): that file is then published as it is
  (or quarantined), never read back into memory;
- past `max_bytes` (MSKNODE_MAX_OBJECT_MB) keeps nothing more, deletes its file and only
  counts: the handler answers 0xA700 once the last fragment has come.

Listener memory per C-STORE is then bounded by the PDU size plus `memory_limit`, whatever the
object's size.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.pdu_primitives import P_DATA

log = logging.getLogger("node.receive.listener")

#: a data set stays in memory up to this size; a larger one goes to a file as it arrives
SPOOL_MEMORY_BYTES = 8 * 1024 * 1024
#: while a data set is written to its file, free disk space is checked every this many bytes
SPACE_CHECK_BYTES = 64 * 1024 * 1024


class Spool:
    """One C-STORE's data set: in memory up to `memory_limit` bytes, then in a staged file; nothing kept past `max_bytes`.

    `file_meta` heads the file (the stored file's File Meta Information). pynetdicom calls
    `write` for each fragment, then ``file.flush()``; its stock storage service calls `close`
    and unlinks `name` after the handler (a file already published or quarantined has moved on).
    """

    def __init__(
        self,
        directory: Path,
        *,
        file_meta: bytes,
        memory_limit: int,
        max_bytes: int,
        has_space: Callable[[], bool] | None = None,
    ):
        self.directory = Path(directory)
        self.file_meta = file_meta
        self.memory_limit = int(memory_limit)
        self.max_bytes = int(max_bytes)
        self.size = 0  # data set bytes received (also once past max_bytes)
        self.too_large = False
        self.error: OSError | None = None  # writing the file failed (the data set is lost: 0xA700)
        self.path: Path | None = None  # the file, once spilled
        self._buf = bytearray()
        self._fd: int | None = None
        self._sha = hashlib.sha256()
        self._taken = False
        self._closed = False
        # asked every SPACE_CHECK_BYTES written to the file: False stops keeping (0xA700)
        self._has_space = has_space
        self._next_check = SPACE_CHECK_BYTES

    # -- the file-like side pynetdicom writes to --
    def __bool__(self) -> bool:  # pynetdicom tests ``if self._data_set_file``
        return True

    @property
    def file(self) -> Spool:
        return self

    @property
    def name(self) -> str:
        return str(self.path or "")

    def flush(self) -> None:
        pass

    def write(self, data: bytes) -> int:
        n = len(data)
        self.size += n
        if self.too_large or self.error is not None or self._closed:
            return n
        if self.size > self.max_bytes:
            self.too_large = True
            self.discard()
            return n
        if self._fd is None:
            self._buf += data
            if len(self._buf) > self.memory_limit:
                self._spill()
        else:
            self._sha.update(data)
            self._write_all(data)
            if self.size >= self._next_check:
                self._next_check += SPACE_CHECK_BYTES
                if self._has_space is not None and not self._has_space():
                    self.error = OSError(errno.ENOSPC, "free disk below MSKNODE_MIN_FREE_GB")
                    self.discard()
        return n

    def _write_all(self, data: bytes | bytearray | memoryview) -> None:
        assert self._fd is not None
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as e:
            self.error = e
            self.discard()

    def _spill(self) -> None:
        path = self.directory / f"{uuid.uuid4().hex}.part"
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except OSError as e:
            self.error = e
            self._buf = bytearray()
            return
        self.path = path
        self._sha.update(self._buf)
        buf, self._buf = self._buf, bytearray()
        self._write_all(self.file_meta)
        if self.error is None:
            self._write_all(buf)

    # -- the handler's side --
    @property
    def in_memory(self) -> bool:
        return self.path is None

    def data(self) -> bytearray:
        """The data set bytes (only while `in_memory`): the spool's own buffer, not a copy (a
        300 kB copy per instance was a tenth of the listener's memory traffic). Nothing writes to it
        once the data set is complete: later fragments are dropped and `discard` lets it go."""
        return self._buf

    @property
    def sha256(self) -> str:
        """sha256 of the data set bytes (spilled spools: computed as they came)."""
        return hashlib.sha256(self._buf).hexdigest() if self.in_memory else self._sha.hexdigest()

    def open_dataset(self) -> BinaryIO:
        """The spilled file opened for reading at the start of the data set."""
        assert self.path is not None
        self._close_fd()
        f = open(self.path, "rb")  # noqa: SIM115 -- the caller closes it
        f.seek(len(self.file_meta))
        return f

    def take(self) -> Path:
        """The spilled file now belongs to the caller (published or quarantined): `close` keeps it."""
        assert self.path is not None
        self._close_fd()
        self._taken = True
        return self.path

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)

    def discard(self) -> None:
        """Frees the bytes and deletes the file (unless taken)."""
        self._buf = bytearray()
        self._close_fd()
        if self.path is not None and not self._taken:
            self.path.unlink(missing_ok=True)

    def close(self) -> None:
        """Frees the bytes and deletes the file (unless taken); later fragments are dropped."""
        self._closed = True
        self.discard()


#: makes the spool of a C-STORE request: (association, request message) -> Spool, or None (pynetdicom's BytesIO)
SpoolFactory = Callable[[object, C_STORE_RQ], "Spool | None"]


class SpoolingDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, which gives each C-STORE request a `Spool` for its data set.

    P-DATA primitives are decoded one presentation data value at a time, so the spool is in
    place once the command set is complete and before the first data set fragment."""

    spool_factory: SpoolFactory | None = None

    def receive_primitive(self, primitive: P_DATA) -> None:
        pdvs = primitive.presentation_data_value_list
        if len(pdvs) <= 1:
            self._receive_one(primitive)
            return
        for pdv in pdvs:
            single = P_DATA()
            single.presentation_data_value_list.append(pdv)  # (the setter refuses the tuples pynetdicom decodes)
            self._receive_one(single)

    def _receive_one(self, primitive: P_DATA) -> None:
        super().receive_primitive(primitive)
        msg = self.message
        if (
            msg is not None
            and isinstance(msg, C_STORE_RQ)
            and msg._data_set_file is None
            and self.spool_factory is not None
        ):
            try:
                msg._data_set_file = self.spool_factory(self.assoc, msg)  # type: ignore[assignment]
            except Exception as e:  # the data set then collects in pynetdicom's BytesIO (as without spooling)
                log.error("cannot make a spool for a C-STORE: %s", type(e).__name__)


def install(assoc, factory: SpoolFactory) -> bool:
    """Switches an association's DIMSE provider to `SpoolingDIMSE` (before any P-DATA arrives)."""
    dimse = getattr(assoc, "dimse", None)
    if dimse is None or type(dimse) not in (DIMSEServiceProvider, SpoolingDIMSE):
        return False
    dimse.__class__ = SpoolingDIMSE
    dimse.spool_factory = factory
    return True


def close_pending(assoc) -> int:
    """Closes the spools of C-STOREs an association will never answer (it has ended): the one
    still arriving and those queued; returns how many. (One being handled is neither.)"""
    dimse = getattr(assoc, "dimse", None)
    if dimse is None:
        return 0
    spools = [getattr(dimse.message, "_data_set_file", None)]
    with contextlib.suppress(Exception):
        spools += [getattr(msg, "_dataset_file", None) for _, msg in list(dimse.msg_queue.queue)]
    closed = 0
    for spool in spools:
        if isinstance(spool, Spool):
            spool.close()
            closed += 1
    return closed


def spool_of(request) -> Spool | None:
    """The spool a received C-STORE request's data set went to (None: it is in ``request.DataSet``)."""
    spool = getattr(request, "_dataset_file", None)
    return spool if isinstance(spool, Spool) else None
