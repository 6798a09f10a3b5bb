"""The instance store: received objects as DICOM files, written durably.

Layout (paths derive from UIDs only, never from patient data)::

    <data_dir>/store/<study_uid>/<series_uid>/<sop_instance_uid>.dcm
    <data_dir>/store/.incoming/          staged files (same filesystem as the store)
    <data_dir>/quarantine/<yyyymmdd>/    refused objects, kept for inspection

A file holds the preamble, the File Meta Information written by us and then the
dataset bytes exactly as the peer sent them (pixel data is never decoded).

Writing (driven by `node.receive.index`): `stage` writes a new file in ``.incoming`` and starts
its writeback; `publish` renames it to its final path (atomic on one filesystem); `sync` fsyncs
files and the directories whose entries changed. A new instance is renamed before its
fsync: one journal commit then makes both the data and the name durable. Nothing is
acknowledged to the peer before the file, its name and its index row are durable (the
order of the fsyncs and the index commit is `node.receive.writer.IndexWriter`'s). A file that
replaces an indexed one is fsynced before the rename. If the machine dies before the
fsync, a final name may hold an incomplete file: its peer got no Success and sends the
object again, and `node.receive.index` checks stored bytes against the index before trusting them.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import re
import struct
import threading
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from node import __version__
from node.errors import OutOfSpaceError, StorageError

# Identifies this software in the File Meta Information (fixed, under the project's root).
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1447.0.1"
IMPLEMENTATION_VERSION_NAME = f"MSKNODE_{__version__}"[:16]

# A UID as it may appear in a path: digits and dots, no empty component, at most 64 characters.
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
STALE_STAGED_SECONDS = 600.0
#: how old a reading of the file system's free space may be (what this store staged since is subtracted)
FREE_SPACE_READ_SECONDS = 0.25


def is_valid_uid(value: object) -> bool:
    """True for a well-formed UID (digits and dots, 1-64 characters)."""
    return isinstance(value, str) and len(value) <= 64 and bool(_UID_RE.match(value))


@dataclass(frozen=True)
class StagedFile:
    """A file written and fsynced in the staging directory, not yet published."""

    path: Path
    size: int
    sha256: str  # of the dataset bytes (what the peer sent), not of the file meta


def encode_file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae: str | None
) -> bytes:
    """Preamble + ``DICM`` + File Meta Information (group 0002, explicit VR little endian)."""

    def uid(tag_elem: int, value: str) -> bytes:
        raw = value.encode("ascii")
        if len(raw) % 2:
            raw += b"\0"
        return struct.pack("<HH2sH", 0x0002, tag_elem, b"UI", len(raw)) + raw

    def text(tag_elem: int, vr: bytes, value: str) -> bytes:
        raw = value.encode("ascii", "replace")
        if len(raw) % 2:
            raw += b" "
        return struct.pack("<HH2sH", 0x0002, tag_elem, vr, len(raw)) + raw

    body = b"".join(
        [
            struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01",
            uid(0x0002, sop_class_uid),
            uid(0x0003, sop_instance_uid),
            uid(0x0010, transfer_syntax_uid),
            uid(0x0012, IMPLEMENTATION_CLASS_UID),
            text(0x0013, b"SH", IMPLEMENTATION_VERSION_NAME),
            text(0x0016, b"AE", source_ae.strip()) if source_ae and source_ae.strip() else b"",
        ]
    )
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"\0" * 128 + b"DICM" + group_length + body


def dataset_offset(path: Path) -> int:
    """Byte offset of the dataset in a file written by `InstanceStore` (after the file meta)."""
    with open(path, "rb") as f:
        head = f.read(144)
    if len(head) < 144 or head[128:132] != b"DICM":
        raise StorageError(f"{path.name}: not a DICOM file with File Meta Information")
    (group_length,) = struct.unpack("<I", head[140:144])
    return 144 + group_length


def dataset_digest(path: Path) -> str | None:
    """sha256 of a stored file's data set bytes (after the file meta), or None if it is missing or broken.

    Read in 1 MB blocks: a large object is never held in memory whole."""
    try:
        with open(path, "rb") as f:
            head = f.read(144)
            if len(head) < 144 or head[128:132] != b"DICM":
                return None
            (group_length,) = struct.unpack("<I", head[140:144])
            f.seek(144 + group_length)
            digest = hashlib.sha256()
            while block := f.read(1024 * 1024):
                digest.update(block)
            return digest.hexdigest()
    except OSError:
        return None


def _writeback_starter():
    """Linux's ``sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)`` (through ctypes, which lets go of
    the GIL while the kernel queues the writes), or None where there is none."""
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _writeback_starter()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> bool:
    """Starts writing a file's dirty pages to disk without waiting (a hint, never a durability step).

    The fsync that makes the file durable comes a little later (after its index row is written);
    by then most of its data is on its way, so the fsync waits for less (measured here: 0.50 ->
    0.25 ms for a 295 KB instance written 0.3 ms before). False where it is not available."""
    if _sync_file_range is None:
        return False
    return _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE) == 0


def _fsync_path(path: Path, is_dir: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if is_dir else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_all(jobs: list[tuple[Path, bool]]) -> None:
    """fsyncs each (path, is a directory) in turn; raises the first error after trying them all."""
    error: OSError | None = None
    for path, is_dir in jobs:
        try:
            _fsync_path(path, is_dir)
        except OSError as e:
            error = error or e
    if error is not None:
        raise error


def _fsync_dir(path: Path) -> None:
    _fsync_path(path, True)


class InstanceStore:
    """Durable files for received instances, plus the quarantine for refused objects."""

    def __init__(self, root: Path, quarantine_dir: Path, *, min_free_bytes: int):
        self.root = Path(root)
        self.incoming = self.root / ".incoming"
        self.quarantine_dir = Path(quarantine_dir)
        self.min_free_bytes = int(min_free_bytes)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        # an instance's path is asked for several times on its way in (its publication, the index row)
        self._path_cache = functools.lru_cache(maxsize=256)(self._path_for)
        # staged files are named by this store object and a counter (no random bytes asked of the kernel per file)
        self._stage_prefix = f"{os.getpid():x}-{uuid.uuid4().hex[:16]}-"
        self._stage_counter = itertools.count()
        # series directories this store has seen exist (a hint: a directory removed meanwhile is made again)
        self._known_dirs: set[str] = set()
        self._free_read: tuple[float, int] | None = None  # (when, free bytes) of the last statvfs
        self._staged_since_read = 0

    @classmethod
    def from_settings(cls, settings) -> InstanceStore:
        return cls(settings.store_dir, settings.quarantine_dir, min_free_bytes=int(settings.min_free_gb * 1024**3))

    def prepare(self) -> None:
        """Creates the directories and removes staged files left by a crash (older than 10 min)."""
        for d in (self.root, self.incoming, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)
        cutoff = time.time() - STALE_STAGED_SECONDS
        for p in self.incoming.iterdir():
            try:
                if p.stat().st_mtime < cutoff:
                    p.unlink()
            except FileNotFoundError:
                pass

    # ---- space ---------------------------------------------------------------
    def free_bytes(self) -> int:
        """Free bytes on the store's file system for an unprivileged writer.

        Read from the file system at most every FREE_SPACE_READ_SECONDS (not for every C-STORE);
        in between, what this store staged since the reading is subtracted from it."""
        now = time.monotonic()
        read = self._free_read
        if read is not None and now - read[0] < FREE_SPACE_READ_SECONDS:
            return read[1] - self._staged_since_read
        try:
            st = os.statvfs(self.root)
        except FileNotFoundError:
            st = os.statvfs(self.root.parent)
        free = st.f_bavail * st.f_frsize
        self._free_read, self._staged_since_read = (now, free), 0
        return free

    def has_space(self, incoming_bytes: int = 0) -> bool:
        """True if, after writing `incoming_bytes`, free space stays at or above the minimum."""
        return self.free_bytes() - incoming_bytes >= self.min_free_bytes

    # ---- paths ---------------------------------------------------------------
    def relative_path(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> str:
        for value in (study_uid, series_uid, sop_instance_uid):
            if not is_valid_uid(value):
                raise StorageError("refusing a path from a malformed UID")
        return f"{study_uid}/{series_uid}/{sop_instance_uid}.dcm"

    def path_for(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        return self._path_cache(study_uid, series_uid, sop_instance_uid)

    def _path_for(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        return self.root / self.relative_path(study_uid, series_uid, sop_instance_uid)

    # ---- writing -------------------------------------------------------------
    def stage(self, file_meta: bytes, dataset: bytes | bytearray, *, check_space: bool = True) -> StagedFile:
        """Writes file meta + dataset to a new staged file (not yet fsynced: see `publish`).

        Raises `OutOfSpaceError` when free space would drop under the minimum (nothing is left
        behind; without `check_space` the caller has just checked) or the disk is full.
        """
        size = len(file_meta) + len(dataset)
        if check_space and not self.has_space(size):
            raise OutOfSpaceError("free disk space below MSKNODE_MIN_FREE_GB")
        digest = hashlib.sha256(dataset).hexdigest()
        path = self.incoming / f"{self._stage_prefix}{next(self._stage_counter):x}.part"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except FileNotFoundError:
            self.incoming.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            written = os.writev(fd, [file_meta, dataset])
            if written < size:  # a short write: finish the rest
                rest = memoryview(file_meta + dataset)[written:]
                while rest:
                    rest = rest[os.write(fd, rest) :]
        except OSError as e:
            os.close(fd)
            path.unlink(missing_ok=True)
            if e.errno == 28:  # ENOSPC
                raise OutOfSpaceError("disk full while writing an instance") from None
            raise StorageError(f"cannot write a staged file: {e.strerror}") from None
        start_writeback(fd)  # (its fsync follows the index row: `sync`)
        os.close(fd)
        self._staged_since_read += size
        return StagedFile(path=path, size=size, sha256=digest)

    def publish(
        self, staged: StagedFile, study_uid: str, series_uid: str, sop_instance_uid: str, *, sync_first: bool = True
    ) -> tuple[Path, set[Path]]:
        """Renames a staged file to its final path (replacing an older version).

        With `sync_first` the data is fsynced before the rename; without it the caller must
        `sync` the returned path. Returns the final path and the directories whose
        entries changed (for `sync`).
        """
        final = self.path_for(study_uid, series_uid, sop_instance_uid)
        if sync_first:
            self.sync(files=[staged.path])
        dirty: set[Path] = {final.parent}
        series_dir = str(final.parent)
        if series_dir in self._known_dirs:
            try:
                os.replace(staged.path, final)
                return final, dirty
            except FileNotFoundError:  # the directory was removed meanwhile (a purge): made again below
                self._known_dirs.discard(series_dir)
        if not final.parent.is_dir():
            study_dir = final.parent.parent
            if not study_dir.is_dir():
                study_dir.mkdir(parents=True, exist_ok=True)
                dirty.add(self.root)
            final.parent.mkdir(exist_ok=True)
            dirty.add(study_dir)
        os.replace(staged.path, final)
        if len(self._known_dirs) >= 4096:
            self._known_dirs.clear()
        self._known_dirs.add(series_dir)
        return final, dirty

    @staticmethod
    def dataset_digest(path: Path) -> str | None:
        return dataset_digest(path)

    def discard(self, staged: StagedFile) -> None:
        staged.path.unlink(missing_ok=True)

    def sync(self, files: Iterable[Path] = (), dirs: Iterable[Path] = (), *, small: Iterable[Path] = ()) -> None:
        """fsyncs files and directories all at once: their device cache flushes are merged, so a
        batch costs about one flush, not one per item. Returns once every one is durable; raises
        the first error.

        One file (the common batch: one instance) is fsynced by the calling thread, then its
        directories and the `small` files (e.g. a database's log, whose pages were just written):
        its data is already on its way (`stage` started the writeback), so each of these is a
        short wait, and a hand-over to another thread costs more than it hides (wake-ups and, in
        a busy process, waits for the GIL; measured at four associations: 26 -> 17 thread switches
        per instance). With several files, the first is fsynced by the caller, every further one in
        a thread of its own, and the directories with the small files in one more."""
        big = [(p, False) for p in files]
        rest = [(d, True) for d in dirs] + [(p, False) for p in small]
        if not big and rest:
            big, rest = rest[:1], rest[1:]
        if not big:
            return
        if len(big) == 1:
            try:
                _fsync_all(big + rest)
            except OSError as e:
                raise StorageError(f"fsync failed: {e}") from e
            return
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="fsync")
            pool = self._pool
        futures = [pool.submit(_fsync_path, path, is_dir) for path, is_dir in big[1:]]
        if rest:
            futures.append(pool.submit(_fsync_all, rest))
        errors: list[BaseException] = []
        try:
            _fsync_path(*big[0])
        except OSError as e:
            errors.append(e)
        for f in futures:
            try:
                f.result()
            except OSError as e:
                errors.append(e)
        if errors:
            raise StorageError(f"fsync failed: {errors[0]}") from errors[0]

    def sync_files(self, paths: Iterable[Path]) -> None:
        self.sync(files=paths)

    def sync_dirs(self, dirs: Iterable[Path]) -> None:
        """Makes renames and new directory entries durable."""
        self.sync(dirs=dirs)

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    # ---- quarantine ----------------------------------------------------------
    def quarantine(self, data: bytes | bytearray, *, file_meta: bytes = b"") -> Path:
        """Keeps a refused object for inspection; returns its path (durable).

        Named by the content's hash: a sender that retries the same refused object keeps one copy.
        """
        day = time.strftime("%Y%m%d", time.gmtime())
        d = self.quarantine_dir / day
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{hashlib.sha256(file_meta + data).hexdigest()[:32]}.dcm"
        if path.exists():
            return path
        tmp = d / f"{uuid.uuid4().hex}.part"
        with open(tmp, "wb") as f:
            f.write(file_meta)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(d)
        return path

    def quarantine_file(self, staged: Path, *, digest: str) -> Path:
        """Moves a refused object already written as a file (meta + data set, `node.receive.spool`)
        into the quarantine (durable); named by `digest`, the data set's sha256."""
        day = time.strftime("%Y%m%d", time.gmtime())
        d = self.quarantine_dir / day
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{hashlib.sha256(digest.encode()).hexdigest()[:32]}.dcm"
        if path.exists():
            Path(staged).unlink(missing_ok=True)
            return path
        _fsync_path(Path(staged))
        os.replace(staged, path)
        _fsync_dir(d)
        return path
