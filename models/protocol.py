"""The model protocol: how every model's weights are saved, verified and loaded.

A model's weights are one file (``model.pt``): ``torch.save`` of a dict of
plain tensors and values with a ``"format"`` key (``msknode.classifier/1``,
``msknode.superres/1``, ``msknode.anatomy/2``), read back with ``weights_only=True``. Beside it:

- ``<file>.sha256``: ``"<hex digest>  <file name>"``, the hash the file must have;
- optionally ``card.json`` (`models.cards`): when it names the file (``weights_file``, or no
  ``weights_file`` at all) its ``weights_sha256`` must agree too.

``load_checkpoint(path, sha256=None)`` reads the file once, hashes those bytes, compares the
hash with ``sha256`` (or the ``.sha256`` file) and the card, and only then deserialises the same
bytes; a mismatch raises `WeightsIntegrityError`, a missing file or hash `WeightsMissingError`.
``save_checkpoint(obj, path)`` is the only writer: serialise, write a temporary file in the same
folder, fsync, ``os.replace``, then the ``.sha256`` file the same way; an interrupted save leaves
the previous file (and its hash) as they were. ``load(path)`` is the one entry for any model:
it verifies, then builds the model the checkpoint's format names.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.errors import RegistryError, WeightsIntegrityError, WeightsMissingError

SHA256_SUFFIX = ".sha256"
CARD_FILE = "card.json"


@dataclass(frozen=True)
class Checkpoint:
    """A verified, deserialised weights file."""

    path: Path
    sha256: str  # of the bytes that were deserialised
    data: dict[str, Any]

    @property
    def format(self) -> str | None:
        return self.data.get("format")


# --- hashes -----------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_path(path: Path) -> Path:
    """The ``.sha256`` file of a weights file."""
    path = Path(path)
    return path.with_name(path.name + SHA256_SUFFIX)


def read_sha256_file(path: Path) -> str:
    """The hex digest recorded in a ``.sha256`` file (first field)."""
    text = Path(path).read_text().strip()
    if not text:
        raise WeightsIntegrityError(f"{path} is empty")
    digest = text.split()[0].lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise WeightsIntegrityError(f"{path} does not hold a sha256 hex digest")
    return digest


def recorded_sha256(path: Path) -> str:
    """The hash recorded beside a weights file; `WeightsMissingError` when there is none."""
    side = sha256_path(path)
    if not side.is_file():
        raise WeightsMissingError(f"{side} is missing; refusing unverified weights")
    return read_sha256_file(side)


def card_sha256(path: Path) -> str | None:
    """``weights_sha256`` of the ``card.json`` beside a weights file when the card describes that file."""
    card_path = Path(path).with_name(CARD_FILE)
    if not card_path.is_file():
        return None
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(card, dict) or card.get("weights_file", Path(path).name) != Path(path).name:
        return None
    sha = card.get("weights_sha256")
    return str(sha).lower() if sha else None


def check_sha256(path: Path, actual: str, expected: str | None = None, *, what: str = "weights") -> None:
    """Compare the hash of ``path`` with ``expected`` (default: its ``.sha256`` file) and its card."""
    source = "the caller" if expected is not None else str(sha256_path(path))
    expected = (expected if expected is not None else recorded_sha256(path)).strip().lower()
    if actual != expected:
        raise WeightsIntegrityError(
            f"{what} at {path} fail the integrity check (sha256 mismatch): the file has {actual}, {source} records "
            f"{expected}; refusing to load (corrupted or replaced file)"
        )
    card = card_sha256(path)
    if card and card != actual:
        raise WeightsIntegrityError(
            f"{what} at {path}: sha256 {actual} differs from the model card's {card}; refusing to load"
        )


def verify_weights(path: Path, sha256: str | None = None, *, what: str = "weights") -> str:
    """The sha256 of ``path`` once it matches ``sha256`` (default: its ``.sha256`` file) and its card."""
    path = Path(path)
    if not path.is_file():
        raise WeightsMissingError(f"{what} file {path} not found")
    actual = sha256_of(path)
    check_sha256(path, actual, sha256, what=what)
    return actual


# --- load and save ---------------------------------------------------------------------------------


def load_checkpoint(path: Path, sha256: str | None = None) -> Checkpoint:
    """Read, verify (``sha256`` or the ``.sha256`` file, and the card) and deserialise a weights file.

    The bytes that are hashed are the bytes that are deserialised (``torch.load(weights_only=True)``),
    so a file replaced between the check and the load cannot slip through."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsMissingError(f"weights file {path} not found")
    raw = path.read_bytes()
    actual = hashlib.sha256(raw).hexdigest()
    check_sha256(path, actual, sha256)
    try:
        data = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RegistryError(f"{path} cannot be read as a checkpoint: {exc}") from None
    if not isinstance(data, dict):
        raise RegistryError(f"{path} is not a checkpoint (found {type(data).__name__})")
    return Checkpoint(path=path, sha256=actual, data=data)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` all or nothing: temporary file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def write_sha256_file(path: Path, digest: str) -> Path:
    """``<file>.sha256`` beside ``path`` (atomic), in the ``sha256sum`` format."""
    side = sha256_path(path)
    atomic_write_bytes(side, f"{digest}  {Path(path).name}\n".encode())
    return side


def save_checkpoint(obj: dict[str, Any], path: Path) -> str:
    """Serialise ``obj`` (plain tensors and values) to ``path`` atomically and record its sha256 beside it.

    The previous file stays in place until the new one is complete on disk; returns the sha256."""
    import torch

    path = Path(path)
    buf = io.BytesIO()
    torch.save(obj, buf)
    raw = buf.getvalue()
    digest = hashlib.sha256(raw).hexdigest()
    atomic_write_bytes(path, raw)
    write_sha256_file(path, digest)
    return digest


# --- the one entry -------------------------------------------------------------------------------


def _classifier(ckpt: Checkpoint, options: dict[str, Any]):
    from models.classifier import ClassifierModel
    from models.tasks import TASKS

    task = options.get("task")
    if task is None:
        name = ckpt.data.get("task")
        if name not in TASKS:
            raise RegistryError(f"{ckpt.path} holds weights of {name!r}, which no task of this code describes")
        task = TASKS[name]
    return ClassifierModel.from_checkpoint(ckpt, task, gate=options.get("gate"))


def _superres(ckpt: Checkpoint, options: dict[str, Any]):
    from models.superres import SuperResModel

    return SuperResModel.from_checkpoint(ckpt, version=options.get("version"))


def _anatomy(ckpt: Checkpoint, options: dict[str, Any]):
    from models.qc import AnatomyClassifier

    return AnatomyClassifier.from_checkpoint(ckpt)


def _discs(ckpt: Checkpoint, options: dict[str, Any]):
    from models.discs.model import DiscModel

    return DiscModel.from_checkpoint(ckpt, task=options.get("task"), gate=options.get("gate"))


def _levels(ckpt: Checkpoint, options: dict[str, Any]):
    from models.levels.model import LevelsModel

    return LevelsModel.from_checkpoint(ckpt, gate=options.get("gate"), version=options.get("version"))


#: checkpoint format (up to the version) -> builder of the loaded model
FORMATS: dict[str, Callable[[Checkpoint, dict[str, Any]], Any]] = {
    "msknode.classifier": _classifier,
    "msknode.superres": _superres,
    "msknode.anatomy": _anatomy,
    "msknode.discs": _discs,
    "msknode.levels": _levels,
}


def load(path: Path, *, sha256: str | None = None, **options: Any):
    """Any model from its weights file: verified (``sha256``, else the ``.sha256`` file; and the card),
    then built by the format the checkpoint names. ``options``: ``task`` and ``gate`` (classifiers),
    ``version`` (super-resolution), ``gate`` and ``version`` (levels)."""
    ckpt = load_checkpoint(path, sha256)
    fmt = str(ckpt.format or "")
    builder = FORMATS.get(fmt.split("/")[0])
    if builder is None:
        raise RegistryError(f"{path}: unknown checkpoint format {fmt or None!r}; known: {', '.join(sorted(FORMATS))}")
    return builder(ckpt, options)
