"""Model deployments at this site: which version of each model a pipeline runs, and whether it is live.

Every (pipeline, model) has one *selected* version (a ``model_deployments`` row) in one of two states:

- ``shadow`` — the silent trial: the model runs, its findings are stored (``findings.shadow``) and
  shown with a SHADOW label, radiologists can answer them, but they change no worklist priority
  and nothing of the model reaches a destination (its findings are left out of the SR, SEG and
  overlays; when every model of the pipeline is in shadow, the job writes no result object at all);
- ``active`` — the model's findings set the priority and go to the PACS.

A model seen for the first time at a site (no row yet) gets a row for the version the registry
holds: ``active`` when its card records a validation on labelled real data (``real_data_validation``
in ``card.json``), otherwise ``shadow``; or ``active`` when the site's configuration names it
(``MSKNODE_ACTIVATE_MODELS``: the demo and the benchmarks do so, and say so in the log). An admin's
later decision is never overridden by the configuration.

Site versions (weights trained at the site, ``msknode models register``) are copied into
``<data_dir>/model_versions/<model>/<version>/`` and registered for every pipeline that runs the
model, in shadow and not selected; an admin selects and activates one per pipeline (admin Models
page or ``msknode models activate``). Every change is an audit event (``model.deploy``).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from node.db.database import Database, utcnow
from node.db.schema import ModelDeployment
from node.errors import NodeError
from node.settings import Settings

log = logging.getLogger(__name__)

STATES = ("shadow", "active")
#: the actor of the changes the node makes itself (first sight of a model) and of configuration
SYSTEM = "system"
CONFIG = "config"
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,31}$")


class DeploymentError(NodeError):
    """A deployment change that cannot be made (unknown pipeline, model or version, bad weights)."""


@dataclass(frozen=True)
class Deployment:
    """What a job needs of a selected model version (plain values, no ORM object)."""

    pipeline: str
    model_name: str
    version: str
    weights_sha256: str
    weights_dir: str | None
    state: str

    @property
    def shadow(self) -> bool:
        return self.state != "active"


def card_validated(card: Mapping[str, Any]) -> bool:
    """True if a model card records a validation on labelled real data (``real_data_validation``).

    The ``real_data`` section of the shipped cards (outputs on real scans *without* labels) is not one.
    """
    v = card.get("real_data_validation")
    return isinstance(v, dict) and bool(v)


def configured(settings: Settings, model_name: str) -> bool:
    names = [n.strip() for n in (getattr(settings, "activate_models", None) or []) if n.strip()]
    return "all" in names or model_name in names


def pipeline_models() -> dict[str, tuple[str, ...]]:
    """Pipeline → the classifier models it runs (the ones deployments govern)."""
    from models.pipelines import PIPELINES

    return {name: spec.models for name, spec in PIPELINES.items()}


def _audit(session: Session, *, actor: str, row: ModelDeployment, old: str | None, reason: str | None) -> None:
    from worklists import audit

    audit.record(
        session,
        actor=actor,
        action="model.deploy",
        entity_type="model_deployment",
        entity_id=f"{row.pipeline}/{row.model_name}",
        old=old,
        new=f"{row.version} {row.state}" + ("" if row.selected else " (not selected)"),
        reason=reason,
        details={
            "pipeline": row.pipeline,
            "model": row.model_name,
            "version": row.version,
            "weights_sha256": row.weights_sha256,
            "state": row.state,
            "selected": row.selected,
        },
    )


def _selected(session: Session, pipeline: str, model_name: str) -> ModelDeployment | None:
    return session.scalar(
        select(ModelDeployment).where(
            ModelDeployment.pipeline == pipeline,
            ModelDeployment.model_name == model_name,
            ModelDeployment.selected.is_(True),
        )
    )


def ensure(session: Session, settings: Settings, registry: Any, pipeline: str, model_name: str) -> ModelDeployment:
    """The selected version of ``model_name`` in ``pipeline``, created at first sight (see the module doc)."""
    row = _selected(session, pipeline, model_name)
    now = utcnow()
    if row is None:
        info = registry.info(model_name)
        validated = card_validated(registry.card(model_name))
        row = session.scalar(
            select(ModelDeployment).where(
                ModelDeployment.pipeline == pipeline,
                ModelDeployment.model_name == model_name,
                ModelDeployment.version == info.version,
            )
        )
        if row is None:
            row = ModelDeployment(
                pipeline=pipeline,
                model_name=model_name,
                version=info.version,
                weights_sha256=info.weights_sha256,
                weights_dir=None,
                real_data_validated=validated,
                created_at=now,
            )
            session.add(row)
        row.selected = True
        if validated:
            row.state, actor, reason = "active", SYSTEM, "first use at this site; its card records real-data validation"
        elif configured(settings, model_name):
            row.state, actor, reason = "active", CONFIG, "first use at this site; activated by MSKNODE_ACTIVATE_MODELS"
        else:
            row.state, actor = "shadow", SYSTEM
            reason = "first use at this site; its card records no real-data validation: silent trial"
        row.changed_by, row.changed_at = actor, now
        session.flush()
        _audit(session, actor=actor, row=row, old=None, reason=reason)
        level = logging.WARNING if row.state == "shadow" else logging.INFO
        log.log(level, "model %s %s in pipeline %s: %s (%s)", model_name, row.version, pipeline, row.state, reason)
    elif row.weights_dir is None and _weights_replaced(registry, model_name, row):
        # other weights were dropped into the weights folder under the selected version: a model nobody has
        # watched at this site yet, so a silent trial again (unless its card or the configuration says otherwise)
        info = registry.info(model_name)
        old = f"{row.version} {row.state} (sha256 {row.weights_sha256[:12]})"
        row.weights_sha256 = info.weights_sha256
        row.real_data_validated = card_validated(registry.card(model_name))
        if row.real_data_validated or configured(settings, model_name):
            row.state, actor = "active", SYSTEM if row.real_data_validated else CONFIG
        else:
            row.state, actor = "shadow", SYSTEM
        row.changed_by, row.changed_at = actor, now
        session.flush()
        reason = f"the weights in use changed (sha256 {info.weights_sha256[:12]}): {row.state}"
        _audit(session, actor=actor, row=row, old=old, reason=reason)
        log.warning("model %s %s in pipeline %s: %s", model_name, row.version, pipeline, reason)
    elif row.state == "shadow" and row.changed_by == SYSTEM and configured(settings, model_name):
        row.state, row.changed_by, row.changed_at = "active", CONFIG, now
        session.flush()
        _audit(session, actor=CONFIG, row=row, old=f"{row.version} shadow", reason="MSKNODE_ACTIVATE_MODELS")
        log.info("model %s %s in pipeline %s: active (MSKNODE_ACTIVATE_MODELS)", model_name, row.version, pipeline)
    return row


def _weights_replaced(registry: Any, model_name: str, row: ModelDeployment) -> bool:
    sha = registry.info(model_name).weights_sha256
    return bool(sha) and sha != row.weights_sha256


def _view(row: ModelDeployment) -> Deployment:
    return Deployment(row.pipeline, row.model_name, row.version, row.weights_sha256, row.weights_dir, row.state)


def for_pipeline(db: Database, settings: Settings, registry: Any, pipeline: str) -> dict[str, Deployment]:
    """Model → its selected deployment for one job of ``pipeline`` (rows created at first sight)."""
    out: dict[str, Deployment] = {}
    models = pipeline_models().get(pipeline, ())
    if not models:
        return out
    for attempt in (1, 2):
        try:
            with db.session() as s:
                for m in models:
                    out[m] = _view(ensure(s, settings, registry, pipeline, m))
            return out
        except IntegrityError:
            # another worker recorded the same first sight at the same moment: read what it wrote
            if attempt == 2:
                raise
            log.info("pipeline %s: deployment rows created concurrently; reading them", pipeline)
    return out


def ensure_all(db: Database, settings: Settings, registry: Any) -> list[Deployment]:
    """Creates the rows of every pipeline's models now (the admin page, ``models deployments``, the demo)."""
    out: list[Deployment] = []
    for pipeline in pipeline_models():
        out += for_pipeline(db, settings, registry, pipeline).values()
    return out


def log_configured(settings: Settings, logger: logging.Logger | None = None) -> None:
    """One log line saying which models the configuration activates (the demo and the benchmarks)."""
    names = [n for n in (getattr(settings, "activate_models", None) or []) if n.strip()]
    if names:
        (logger or log).info(
            "models activated by this configuration (MSKNODE_ACTIVATE_MODELS): %s; others start in shadow "
            "unless their card records real-data validation",
            ", ".join(names),
        )


def listing(session: Session) -> list[dict[str, Any]]:
    """Every deployment row as JSON (pipeline, model, version order)."""
    rows = session.scalars(
        select(ModelDeployment).order_by(ModelDeployment.pipeline, ModelDeployment.model_name, ModelDeployment.id)
    ).all()
    return [
        {
            "pipeline": r.pipeline,
            "model": r.model_name,
            "version": r.version,
            "weights_sha256": r.weights_sha256,
            "weights_dir": r.weights_dir,
            "state": r.state,
            "selected": bool(r.selected),
            "real_data_validated": bool(r.real_data_validated),
            "changed_by": r.changed_by,
            "changed_at": r.changed_at.isoformat() if r.changed_at else None,
            "note": r.note,
        }
        for r in rows
    ]


def change(
    session: Session,
    *,
    pipeline: str,
    model_name: str,
    version: str,
    state: str,
    actor: str,
    reason: str | None = None,
) -> ModelDeployment:
    """Selects ``version`` of ``model_name`` for ``pipeline`` in ``state`` (shadow or active); audited.

    The previously selected version stays registered, unselected, in its state.
    """
    if state not in STATES:
        raise DeploymentError(f"state {state!r}: expected one of {', '.join(STATES)}")
    if pipeline not in pipeline_models():
        raise DeploymentError(f"unknown pipeline {pipeline!r}; known: {', '.join(sorted(pipeline_models()))}")
    row = session.scalar(
        select(ModelDeployment).where(
            ModelDeployment.pipeline == pipeline,
            ModelDeployment.model_name == model_name,
            ModelDeployment.version == version,
        )
    )
    if row is None:
        known = session.scalars(
            select(ModelDeployment.version).where(
                ModelDeployment.pipeline == pipeline, ModelDeployment.model_name == model_name
            )
        ).all()
        raise DeploymentError(
            f"{model_name} has no version {version!r} in pipeline {pipeline}"
            + (f"; registered: {', '.join(known)}" if known else "; none registered yet")
        )
    current = _selected(session, pipeline, model_name)
    old = f"{current.version} {current.state}" if current is not None else None
    now = utcnow()
    if current is not None and current.id != row.id:
        current.selected = False
        current.changed_by, current.changed_at = actor, now
    row.selected, row.state, row.changed_by, row.changed_at = True, state, actor, now
    if reason:
        row.note = reason
    session.flush()
    _audit(session, actor=actor, row=row, old=old, reason=reason)
    log.info("model %s %s in pipeline %s: %s, selected by %s", model_name, version, pipeline, state, actor)
    return row


def versions_root(settings: Settings) -> Path:
    return Path(settings.data_dir) / "model_versions"


def register(
    session: Session,
    settings: Settings,
    *,
    model_name: str,
    version: str,
    weights: Path,
    actor: str,
    pipelines: Iterable[str] | None = None,
) -> list[ModelDeployment]:
    """Copies trained weights (``model.pt`` with its ``.sha256`` and card) into the site's version store
    and registers them, in shadow and not selected, for every pipeline that runs the model; audited.

    The card's ``version`` is set to ``version`` (the name every finding and SR of it carries).
    """
    from models.errors import WeightsIntegrityError, WeightsMissingError
    from models.protocol import sha256_path, verify_weights

    if not VERSION_RE.match(version):
        raise DeploymentError(f"version {version!r}: 1-32 letters, digits, '.', '_', '+' or '-'")
    runs_it = [p for p, models in pipeline_models().items() if model_name in models]
    if not runs_it:
        raise DeploymentError(f"no pipeline runs {model_name!r}; deployable: {_deployable()}")
    targets = list(pipelines) if pipelines else runs_it
    bad = [p for p in targets if p not in runs_it]
    if bad:
        raise DeploymentError(f"pipeline(s) {', '.join(bad)} do not run {model_name}; these do: {', '.join(runs_it)}")
    weights = Path(weights)
    if weights.is_dir():
        weights = weights / "model.pt"
    try:
        sha = verify_weights(weights, what=f"weights {weights}")
    except (WeightsMissingError, WeightsIntegrityError, FileNotFoundError) as e:
        raise DeploymentError(f"cannot register {weights}: {e}") from None
    if not sha256_path(weights).is_file():
        raise DeploymentError(f"cannot register {weights}: {sha256_path(weights)} is missing")
    card_path = weights.parent / "card.json"
    card: dict[str, Any] = json.loads(card_path.read_text()) if card_path.is_file() else {}
    if card.get("name") not in (None, model_name):
        raise DeploymentError(f"{card_path} is the card of {card.get('name')!r}, not of {model_name!r}")
    existing = session.scalars(
        select(ModelDeployment).where(ModelDeployment.model_name == model_name, ModelDeployment.version == version)
    ).all()
    if any(r.weights_sha256 != sha for r in existing):
        raise DeploymentError(f"{model_name} version {version} is already registered with other weights")
    folder = versions_root(settings) / model_name / version
    folder.mkdir(parents=True, exist_ok=True)
    for src in (weights, sha256_path(weights)):
        shutil.copy2(src, folder / ("model.pt" if src == weights else "model.pt.sha256"))
    card.update(
        {"name": model_name, "version": version, "weights_file": "model.pt", "weights_sha256": sha},
    )
    card.setdefault("demo_weights", False)
    (folder / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    md = weights.parent / "MODEL_CARD.md"
    if md.is_file():
        shutil.copy2(md, folder / "MODEL_CARD.md")
    verify_weights(folder / "model.pt", what=f"registered weights of {model_name} {version}")
    now = utcnow()
    rows = []
    for p in targets:
        row = next((r for r in existing if r.pipeline == p), None)
        if row is None:
            row = ModelDeployment(
                pipeline=p,
                model_name=model_name,
                version=version,
                weights_sha256=sha,
                weights_dir=str(folder),
                state="shadow",
                selected=False,
                real_data_validated=card_validated(card),
                created_at=now,
                changed_by=actor,
                changed_at=now,
                note=f"registered from {weights}",
            )
            session.add(row)
            session.flush()
            _audit(session, actor=actor, row=row, old=None, reason=f"registered from {weights}")
        rows.append(row)
    log.info("model %s version %s registered for %s (sha256 %s)", model_name, version, ", ".join(targets), sha)
    return rows


def _deployable() -> str:
    return ", ".join(sorted({m for models in pipeline_models().values() for m in models}))


def registry_overrides(deployments: Mapping[str, Deployment]) -> dict[str, Path]:
    """Model → weights folder for the selected versions that are site versions (for `models.registry.Registry`)."""
    return {m: Path(d.weights_dir) for m, d in deployments.items() if d.weights_dir}
