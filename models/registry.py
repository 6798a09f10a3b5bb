"""Model registry: reviewed Python code + pinned, hashed weights (no eval'd configs).

Every model is an entry in `ENTRIES`, built from code: the task heads in
``models.tasks`` (``knee.acl`` …), the super-resolution model (``models.superres``) and
the QC anatomy classifier (``qc.anatomy``, used by the QC gate). Weights live in
``<weights root>/<model name>/<file>`` with ``<file>.sha256`` beside them, plus
``card.json`` (machine-readable model card: training data, recipe, metrics with CIs)
and ``MODEL_CARD.md``. The roots are searched in order: the site-supplied folder
(``Registry(weights_dir)``, settings.weights_dir) first, then the repository's
``models/weights``. The sha256 of the file is computed and compared before the file is
deserialised; a mismatch raises `WeightsIntegrityError` and nothing is loaded. Nothing
is ever downloaded. Verification and loading are `models.protocol`'s (``load``), the same
for every model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models import protocol
from models.cards import LEGACY_WEIGHTS_FILES, WEIGHTS_FILE, find_weights, read_card, weights_roots
from models.cards import REPO_WEIGHTS as REPO_WEIGHTS  # (a name of this module too)
from models.errors import UnknownModelError, WeightsIntegrityError, WeightsMissingError
from models.protocol import read_sha256_file, sha256_path
from models.types import NOT_FOR_DIAGNOSTIC_USE, ModelInfo

if TYPE_CHECKING:
    from models.qc import QCGate


@dataclass(frozen=True)
class ModelEntry:
    name: str
    task: str  # "binary" | "multiclass" | "grading" | "superres" | "qc"
    anatomy: str
    description: str
    input_roles: tuple[str, ...]
    weights_file: str
    version: str
    loader: Callable[[Registry, Path, str], Any]  # (registry, verified weights path, sha256) -> loaded model
    input_spec: dict[str, Any]
    legacy_files: tuple[str, ...] = ()  # earlier names of the weights file, still found in a site folder


def _classifier_loader(task_name: str) -> Callable[[Registry, Path, str], Any]:
    def load(registry: Registry, path: Path, sha: str) -> Any:
        from models.tasks import TASKS

        model = protocol.load(path, sha256=sha, task=TASKS[task_name], gate=registry.gate())
        # a version registered at a site is named by its card (the checkpoint keeps the task version it was
        # trained as): every finding and SR of it carries the card's version
        version = registry.card(task_name).get("version")
        if version and str(version) != model.info.version:
            model.info = dataclasses.replace(model.info, version=str(version))
        return model

    return load


def _superres_loader(registry: Registry, path: Path, sha: str) -> Any:
    card = registry.card(MODEL_SUPERRES)
    return protocol.load(path, sha256=sha, version=card.get("version"))


def _anatomy_loader(registry: Registry, path: Path, sha: str) -> Any:
    return protocol.load(path, sha256=sha)


def _levels_loader(registry: Registry, path: Path, sha: str) -> Any:
    card = registry.card(MODEL_LEVELS)
    return protocol.load(path, sha256=sha, gate=registry.gate(), version=card.get("version"))


MODEL_SUPERRES = "superres"
MODEL_ANATOMY = "qc.anatomy"
MODEL_LEVELS = "lumbar_spine.levels"


def _build_entries() -> dict[str, ModelEntry]:
    from models.tasks import TASKS

    entries: dict[str, ModelEntry] = {}
    for name, task in TASKS.items():
        entries[name] = ModelEntry(
            name=name,
            task=task.kind,
            anatomy=task.anatomy,
            description=task.description,
            input_roles=task.input.roles,
            weights_file=WEIGHTS_FILE,
            version=task.version,
            loader=_classifier_loader(name),
            input_spec=task.card_facts()["input"],
        )
    entries[MODEL_SUPERRES] = ModelEntry(
        name=MODEL_SUPERRES,
        task="superres",
        anatomy="any",
        description="Residual super-resolution, through-plane x2 (in-plane x2 on request), data-consistent",
        input_roles=("sag_fluid", "sag_pd", "cor_fluid", "sag_t2"),
        weights_file=WEIGHTS_FILE,
        version="1",
        legacy_files=LEGACY_WEIGHTS_FILES[MODEL_SUPERRES],
        loader=_superres_loader,
        input_spec={"roles": "first input role of the pipeline's main model", "plane": "any 2-D multislice series"},
    )
    from models.levels.model import TASK as LEVELS_TASK

    entries[MODEL_LEVELS] = ModelEntry(
        name=MODEL_LEVELS,
        task="segmentation",
        anatomy="lumbar_spine",
        description=LEVELS_TASK.description,
        input_roles=LEVELS_TASK.input.roles,
        weights_file=WEIGHTS_FILE,
        version=LEVELS_TASK.version,
        loader=_levels_loader,
        input_spec=LEVELS_TASK.card_facts()["input"],
    )
    entries[MODEL_ANATOMY] = ModelEntry(
        name=MODEL_ANATOMY,
        task="qc",
        anatomy="any",
        description="QC gate pixel anatomy classifier (knee, shoulder, lumbar spine in three planes, other; plane "
        "from the header), out-of-distribution distance, motion detector",
        input_roles=(),
        weights_file=WEIGHTS_FILE,
        version="2",
        loader=_anatomy_loader,
        input_spec={"roles": "every model input", "plane": "any"},
    )
    return entries


ENTRIES: dict[str, ModelEntry] = _build_entries()


class Registry:
    """Model cards and verified weights. ``weights_dir``: a site folder searched before the repository's."""

    def __init__(
        self,
        weights_dir: Path | str | None = None,
        *,
        include_repo: bool = True,
        overrides: Mapping[str, Path | str] | None = None,
    ):
        # model name -> the folder of the version to use instead of the roots (a site's registered version)
        self.overrides: dict[str, Path] = {k: Path(v) for k, v in (overrides or {}).items()}
        self.roots: list[Path] = weights_roots(weights_dir, include_repo=include_repo)
        self._loaded: dict[str, Any] = {}
        self._gate: QCGate | None = None

    # --- lookup -------------------------------------------------------------------------
    def entry(self, name: str) -> ModelEntry:
        if name not in ENTRIES:
            raise UnknownModelError(f"unknown model {name!r}; known: {', '.join(sorted(ENTRIES))}")
        return ENTRIES[name]

    def names(self) -> list[str]:
        return sorted(ENTRIES)

    def weights_path(self, name: str) -> Path | None:
        """The weights file of ``name`` in the first root that has it (None if none does)."""
        e = self.entry(name)
        if name in self.overrides:
            p = self.overrides[name] / e.weights_file
            return p if p.is_file() else None
        return find_weights(self.roots, name, (e.weights_file, *e.legacy_files))

    def has_weights(self, name: str) -> bool:
        return self.weights_path(name) is not None

    def card(self, name: str) -> dict[str, Any]:
        """card.json next to the weights in use (or {} if absent)."""
        p = self.weights_path(name)
        return {} if p is None else read_card(p.parent)

    def verify(self, name: str) -> tuple[Path, str]:
        """(path, sha256) of verified weights; raises WeightsMissingError / WeightsIntegrityError."""
        path = self.weights_path(name)
        if path is None:
            where = (
                str(self.overrides[name]) if name in self.overrides else ", ".join(str(r / name) for r in self.roots)
            )
            raise WeightsMissingError(f"no weights for {name!r} (looked in {where})")
        side = sha256_path(path)
        if not side.is_file():
            raise WeightsMissingError(f"{side} is missing; refusing unverified weights for {name!r}")
        actual = protocol.verify_weights(path, what=f"weights of {name!r}")
        return path, actual

    def get(self, name: str) -> Any:
        """The loaded model (verified once per Registry instance)."""
        if name not in self._loaded:
            e = self.entry(name)
            path, sha = self.verify(name)
            self._loaded[name] = e.loader(self, path, sha)
        return self._loaded[name]

    def info(self, name: str) -> ModelInfo:
        """Identity of a model without loading it (sha256 from the recorded hash; "" if no weights)."""
        e = self.entry(name)
        path = self.weights_path(name)
        sha = ""
        if path is not None:
            side = sha256_path(path)
            if side.is_file():
                try:
                    sha = read_sha256_file(side)
                except WeightsIntegrityError:
                    sha = ""
        card = self.card(name)
        return ModelInfo(
            name=name,
            version=str(card.get("version", e.version)),
            weights_sha256=sha,
            task=e.task,
            anatomy=e.anatomy,
            demo_weights=bool(card.get("demo_weights", True)),
            notice=NOT_FOR_DIAGNOSTIC_USE,
        )

    def gate(self) -> QCGate:
        """The QC gate (with the anatomy classifier when its weights are present)."""
        if self._gate is None:
            from models.qc import QCGate

            anatomy = self.get(MODEL_ANATOMY) if self.has_weights(MODEL_ANATOMY) else None
            self._gate = QCGate(anatomy)
        return self._gate

    # --- cards ------------------------------------------------------------------------------
    def list(self) -> list[dict[str, Any]]:
        """One model card dict per registered model."""
        out = []
        for name in self.names():
            e = ENTRIES[name]
            path = self.weights_path(name)
            card = self.card(name)
            status, sha, error = "no weights", None, None
            if path is not None:
                try:
                    _, sha = self.verify(name)
                    status = "verified"
                except (WeightsMissingError, WeightsIntegrityError) as exc:
                    status, error = "refused", str(exc)
            out.append(
                {
                    "name": name,
                    "task": e.task,
                    "anatomy": e.anatomy,
                    "description": e.description,
                    "input": card.get("input", e.input_spec),
                    "input_roles": list(e.input_roles),
                    "version": str(card.get("version", e.version)),
                    "weights_sha256": sha,
                    "weights_path": str(path) if path else None,
                    "weights_source": None if path is None else ("repo" if REPO_WEIGHTS in path.parents else "site"),
                    "status": status,
                    "error": error,
                    "training_data": card.get("training_data"),
                    "metrics": card.get("metrics"),
                    "recipe": card.get("recipe"),
                    "demo_weights": bool(card.get("demo_weights", True)),
                    "notice": card.get("notice", NOT_FOR_DIAGNOSTIC_USE),
                }
            )
        return out
