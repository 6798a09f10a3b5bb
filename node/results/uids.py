"""UIDs of the objects we create: deterministic, under ``settings.uid_root``.

The same job (same input SOP Instance UIDs → same ``job_fingerprint``) run by the same
model versions gives the same UIDs, so a redelivered job duplicates nothing in the
PACS; a re-opened study (new inputs) or a new model version gives new UIDs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pydicom.uid import generate_uid


@dataclass(frozen=True)
class UidFactory:
    root: str
    job_fingerprint: str
    model_versions: str  # canonical "name=version:sha256;..." of every model that ran

    def uid(self, kind: str, *parts: object) -> str:
        """A UID for (kind, parts...), e.g. ``uid("seg", 0, "series")``."""
        sources = [self.job_fingerprint, self.model_versions, kind, *(str(p) for p in parts)]
        # joined with a separator: pydicom concatenates entropy sources as they are
        return generate_uid(prefix=self.root, entropy_srcs=["\x1f".join(sources)])

    def series(self, kind: str, index: int = 0) -> str:
        return self.uid(kind, index, "series")

    def instance(self, kind: str, index: int = 0, sub: int | None = None) -> str:
        return self.uid(kind, index, "instance") if sub is None else self.uid(kind, index, sub, "instance")


def model_versions_key(models: Iterable[tuple[str, str, str]]) -> str:
    """Canonical string of (name, version, weights_sha256) triples, order-independent."""
    return ";".join(sorted({f"{n}={v}:{h}" for n, v, h in models}))
