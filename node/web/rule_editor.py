"""A routing rule made from a series: the draft from its facts, the TOML block, the file change.

An admin looks at a series the rules did not route (or routed wrongly) and turns what
the node recognised — plane, contrast, anatomy, its description — into a ``[[rule]]``:

- `draft_from_series` prefills a `RuleDraft` from the series' facts;
- `check_draft` bounds and checks the admin's answer (`RuleRefused` says why);
- `toml_block` writes it as a ``[[rule]]`` block;
- `add_rule` inserts the block before the first ``[[rule]]`` of the configured rules file
  (rules are tried in order, so the site's own rule wins), validates the whole file with
  `node.intake.routing.parse_rules`, and replaces the file atomically (temporary file + rename,
  under a lock on its folder). `node.intake.routing.RulesFile` then reloads it by itself (it
  watches modification time and size).

The shipped default inside the package, or a file this process cannot write, is never
changed: `RulesReadOnly` carries the block and how to point ``MSKNODE_ROUTING_RULES`` at a
site copy. Errors: `RuleEditError` ← `RuleRefused` (the rule is invalid, 422) and
`RulesReadOnly` (the file cannot be changed here, 409).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from node.errors import NodeError, RoutingError
from node.intake.recognition import normalize_text
from node.intake.routing import LOCALIZER_ROLE, PIPELINE_ROLES, RoutingRules, parse_rules
from node.settings import PACKAGE_DIR

NAME_MAX = 100
REGEX_MAX = 200
VALUE_MAX = 32
CONTRASTS_MAX = 8
#: rule conditions taken from the series' recognised facts, when the routing rules know them
FACT_KEYS = ("plane", "contrast")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_VALUE = re.compile(r"^[a-z0-9_]+$")
_FIRST_RULE = re.compile(r"^\s*\[\[\s*rule\s*\]\]")
_REGEX_SPECIAL = re.compile(r"([.^$*+?{}\[\]\\|()])")
#: contrast classes that are fluid-sensitive (the *_fluid / sag_stir roles)
FLUID_CONTRASTS = frozenset({"pd_fs", "t2_fs", "stir", "dess"})


class RuleEditError(NodeError):
    """A rule could not be added (the message says why)."""


class RuleRefused(RuleEditError):
    """The rule as asked is invalid, or does not do what it was made for."""


class RulesReadOnly(RuleEditError):
    """The configured rules file is the shipped default or cannot be written by this process."""

    def __init__(self, message: str, *, path: Path, block: str):
        super().__init__(message)
        self.path = path
        self.block = block

    @property
    def how(self) -> str:
        return (
            f"Copy {self.path} to a site file the node can write (for example /etc/msknode/routing_rules.toml), "
            "paste the block above its first [[rule]], set MSKNODE_ROUTING_RULES to that file and restart the node; "
            "from then on rules added here go into the site file and it reloads by itself."
        )


@dataclass(frozen=True)
class RuleDraft:
    """A ``[[rule]]`` as the admin fills it in (``anatomy`` is a pipeline name or ``"any"``)."""

    name: str
    pipeline: str | None
    role: str | None
    anatomy: str = "any"
    plane: str | None = None
    contrast: tuple[str, ...] = ()
    description: str | None = None

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "pipeline": self.pipeline,
            "role": self.role,
            "anatomy": self.anatomy,
            "plane": self.plane,
            "contrast": list(self.contrast),
            "description": self.description,
        }


# ---- what the rules file understands ---------------------------------------------------------
def supported_fact_keys() -> tuple[str, ...]:
    """The fact keys (plane, contrast) the routing rules accept as conditions, tried on a probe rule."""
    out = []
    for key, value in (("plane", '"sagittal"'), ("contrast", '["pd_fs"]')):
        probe = f'version = 1\n[[rule]]\nname = "probe"\npipeline = "knee"\nrole = "sag_fluid"\nanatomy = "any"\n{key} = {value}\n'
        try:
            parse_rules(probe, source="<probe>")
        except RoutingError as e:
            if "unknown key" in str(e):
                continue
        out.append(key)
    return tuple(out)


# ---- the draft -------------------------------------------------------------------------------
def description_regex(description: str | None) -> str | None:
    """An anchored regex for exactly this description, as the rules read it (underscores as spaces)."""
    text = normalize_text(description)
    if not text:
        return None
    return "^" + _REGEX_SPECIAL.sub(r"\\\1", text)[: REGEX_MAX - 2] + "$"


def suggest_role(pipeline: str | None, plane: str | None, contrast: Sequence[str]) -> str | None:
    """The role plane + contrast point to in ``pipeline`` (a prefill the admin may change)."""
    if pipeline is None or pipeline not in PIPELINE_ROLES or not plane:
        return None
    prefix = next(
        (p for key, p in (("sag", "sag"), ("cor", "cor"), ("ax", "ax"), ("tra", "ax")) if plane.startswith(key)), None
    )
    if prefix is None:
        return None
    contrasts = set(contrast)
    order: tuple[str, ...]
    if contrasts & FLUID_CONTRASTS:
        order = ("fluid", "stir", "t2")
    elif "t1" in contrasts:
        order = ("t1", "pd")
    elif "pd" in contrasts:
        order = ("pd",)
    elif "t2" in contrasts:
        order = ("t2", "fluid")
    else:
        return None
    roles = PIPELINE_ROLES[pipeline]
    return next((f"{prefix}_{o}" for o in order if f"{prefix}_{o}" in roles), None)


def _fact_value(value: object) -> str | None:
    """A recognised value usable as a rule condition (not "unknown")."""
    if not isinstance(value, str):
        return None
    v = value.strip().lower()
    return v if _VALUE.match(v) and len(v) <= VALUE_MAX and v != "unknown" else None


def draft_from_series(series: dict, *, keys: Sequence[str] = FACT_KEYS, anatomy_hint: str | None = None) -> RuleDraft:
    """A draft from a series as `node.web.queries.series_routing_dict` shows it.

    ``anatomy_hint``: the anatomy the rules in force find for it (`current_anatomy`), used
    when none was recorded with the series.
    """
    facts = (series.get("routing") or {}).get("facts") or {}
    plane = _fact_value((facts.get("plane") or {}).get("value")) if "plane" in keys else None
    raw_contrast = (facts.get("contrast") or {}).get("value") if "contrast" in keys else None
    contrast = tuple(c for c in (_fact_value(raw_contrast),) if c)
    anatomy = _fact_value((facts.get("anatomy") or {}).get("value")) or _fact_value(anatomy_hint)
    decision = (series.get("routing") or {}).get("decision") or {}
    pipeline = decision.get("pipeline") or (anatomy if anatomy in PIPELINE_ROLES else None)
    role = decision.get("role") if decision.get("pipeline") else suggest_role(pipeline, plane, contrast)
    if role == LOCALIZER_ROLE and not decision.get("pipeline"):
        role = None
    number = series.get("number")
    label = " ".join(x for x in (anatomy or pipeline, plane, "/".join(contrast)) if x) or "series"
    name = f"site: {label} (from series {number if number is not None else series.get('id')})"
    return RuleDraft(
        name=name[:NAME_MAX],
        pipeline=pipeline,
        role=role,
        anatomy=anatomy if anatomy is not None and anatomy in PIPELINE_ROLES else "any",
        plane=plane,
        contrast=contrast,
        description=description_regex(series.get("description")),
    )


def check_draft(
    *,
    name: str,
    pipeline: str | None,
    role: str | None,
    anatomy: str | None,
    plane: str | None,
    contrast: str | Sequence[str] | None,
    description: str | None,
    keys: Sequence[str] = FACT_KEYS,
) -> RuleDraft:
    """The admin's answer as a `RuleDraft`, or `RuleRefused` naming the field and the problem."""
    name = (name or "").strip()
    if not name or len(name) > NAME_MAX or _CONTROL.search(name):
        raise RuleRefused(f"name: 1-{NAME_MAX} characters, no control characters")
    if pipeline is None or pipeline not in PIPELINE_ROLES:
        raise RuleRefused(f"pipeline: one of {', '.join(sorted(PIPELINE_ROLES))}")
    if role not in PIPELINE_ROLES[pipeline]:
        raise RuleRefused(f"role: {role!r} is not a role of {pipeline} (roles: {', '.join(PIPELINE_ROLES[pipeline])})")
    anatomy = (anatomy or pipeline).strip()
    if anatomy != "any" and anatomy not in PIPELINE_ROLES:
        raise RuleRefused(f'anatomy: a pipeline name or "any", not {anatomy!r}')
    plane = (plane or "").strip().lower() or None
    if plane is not None:
        if "plane" not in keys:
            raise RuleRefused("plane: the routing rules of this node do not take a plane condition yet")
        if not _VALUE.match(plane) or len(plane) > VALUE_MAX:
            raise RuleRefused(f"plane: lower-case letters, digits and _ (at most {VALUE_MAX}), not {plane!r}")
    if isinstance(contrast, str):
        contrast = [c for c in (x.strip().lower() for x in contrast.split(",")) if c]
    contrasts = tuple(dict.fromkeys(contrast or ()))
    if contrasts:
        if "contrast" not in keys:
            raise RuleRefused("contrast: the routing rules of this node do not take a contrast condition yet")
        if len(contrasts) > CONTRASTS_MAX or not all(_VALUE.match(c) and len(c) <= VALUE_MAX for c in contrasts):
            raise RuleRefused(f"contrast: at most {CONTRASTS_MAX} classes (e.g. pd_fs, t2_fs, stir), comma-separated")
    description = (description or "").strip() or None
    if description is not None:
        if len(description) > REGEX_MAX or _CONTROL.search(description):
            raise RuleRefused(f"description: a regex of at most {REGEX_MAX} characters, no control characters")
        try:
            re.compile(description)
        except re.error as e:
            raise RuleRefused(f"description: invalid regex {description!r}: {e}") from None
    if plane is None and not contrasts and description is None:
        raise RuleRefused(
            "a rule needs a condition (plane, contrast or description): without one it would route every "
            "series of its anatomy, ahead of every other rule"
        )
    return RuleDraft(
        name=name,
        pipeline=pipeline,
        role=role,
        anatomy=anatomy,
        plane=plane,
        contrast=contrasts,
        description=description,
    )


# ---- TOML --------------------------------------------------------------------------------------
def _toml_str(value: str) -> str:
    """A TOML string: literal ('...', regexes stay readable) unless it holds a quote or a control character."""
    if "'" not in value and not _CONTROL.search(value):
        return f"'{value}'"
    return json.dumps(value, ensure_ascii=False)


def toml_block(draft: RuleDraft, *, comment: str | None = None) -> str:
    """The draft as a ``[[rule]]`` block (with a comment line saying where it came from)."""
    lines = []
    if comment:
        lines.append("# " + _CONTROL.sub(" ", comment))
    lines.append("[[rule]]")
    lines.append(f"name = {json.dumps(draft.name, ensure_ascii=False)}")
    lines.append(f'pipeline = "{draft.pipeline}"')
    lines.append(f'role = "{draft.role}"')
    if draft.anatomy != draft.pipeline:
        lines.append(f'anatomy = "{draft.anatomy}"')
    if draft.plane:
        lines.append(f'plane = "{draft.plane}"')
    if draft.contrast:
        lines.append("contrast = [" + ", ".join(f'"{c}"' for c in draft.contrast) + "]")
    if draft.description:
        lines.append(f"description = {_toml_str(draft.description)}")
    return "\n".join(lines) + "\n"


def insert_before_first_rule(text: str, block: str) -> str:
    """``text`` with ``block`` before its first ``[[rule]]`` (and the comment lines right above it)."""
    lines = text.splitlines(keepends=True)
    first = next((i for i, line in enumerate(lines) if _FIRST_RULE.match(line)), None)
    if first is None:
        return text + ("" if not text or text.endswith("\n") else "\n") + "\n" + block
    at = first
    while at > 0 and lines[at - 1].lstrip().startswith("#"):
        at -= 1
    return "".join(lines[:at]) + block.rstrip("\n") + "\n\n" + "".join(lines[at:])


# ---- the file ----------------------------------------------------------------------------------
def is_shipped_default(path: Path) -> bool:
    """The rules file inside the installed package (replaced by every update: never edited)."""
    try:
        return Path(path).resolve().is_relative_to(PACKAGE_DIR)
    except OSError:
        return False


def writable(path: Path) -> bool:
    """Whether `add_rule` may change ``path`` (not the shipped default; file and folder writable)."""
    p = Path(path).resolve()
    return (
        not is_shipped_default(p) and p.is_file() and os.access(p, os.W_OK) and os.access(p.parent, os.W_OK | os.X_OK)
    )


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on the folder (every process that edits rules there takes it; released on close)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _replace(path: Path, text: str) -> None:
    """Writes ``text`` to a temporary file beside ``path`` and renames it over ``path`` (same mode)."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    mode = stat.S_IMODE(path.stat().st_mode)
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def add_rule(
    path: Path, draft: RuleDraft, block: str, *, check: Callable[[RoutingRules], None] | None = None
) -> RoutingRules:
    """Inserts ``block`` before the first ``[[rule]]`` of ``path``; returns the rules now in the file.

    The whole new file must pass `parse_rules` with the new rule first, and ``check(rules)``
    (e.g. "the rule routes the series it was made from") must not raise; otherwise the
    file stays as it was. `RulesReadOnly` for the shipped default or a file that cannot be
    written, `RuleRefused` for an invalid result.
    """
    target = Path(path).resolve()
    if is_shipped_default(target):
        raise RulesReadOnly(
            f"the routing rules in force are the shipped default ({target}), which an update replaces: "
            "rules are added to a site copy only",
            path=target,
            block=block,
        )
    if not target.is_file():
        raise RulesReadOnly(f"the routing rules file {target} does not exist", path=target, block=block)
    try:
        with _folder_lock(target.parent):
            text = target.read_text(encoding="utf-8")
            new_text = insert_before_first_rule(text, block)
            try:
                rules = parse_rules(new_text, source=str(target))
            except RoutingError as e:
                raise RuleRefused(str(e)) from None
            if not rules.rules or rules.rules[0].name != draft.name:
                raise RuleRefused(f"the rule did not land first in {target}: the file is left as it was")
            if check is not None:
                check(rules)
            _replace(target, new_text)
    except PermissionError as e:
        raise RulesReadOnly(
            f"the routing rules file {target} cannot be written by the node: {e.strerror}", path=target, block=block
        ) from None
    except OSError as e:
        raise RulesReadOnly(
            f"the routing rules file {target} cannot be changed: {e.strerror or e}", path=target, block=block
        ) from None
    return rules


# ---- from a series to the file, audited --------------------------------------------------------
@dataclass(frozen=True)
class RuleRequestFields:
    """What the admin submitted (form or JSON), before `check_draft`."""

    name: str
    pipeline: str | None
    role: str | None
    anatomy: str | None = None
    plane: str | None = None
    contrast: str | Sequence[str] | None = None
    description: str | None = None
    reroute: bool = True


class SeriesNotFound(RuleEditError):
    """No series with that id (404)."""


def _route_now(session, settings, rules: RoutingRules, se):
    """How ``rules`` route the series now, without recording anything on its row."""
    from node.intake import completeness

    explain = getattr(completeness, "explain_series", None)
    if explain is not None:
        return explain(session, settings, rules, se).route
    return completeness.route_series(session, settings, rules, se)


def current_anatomy(db, settings, series_id: int) -> str | None:
    """The anatomy the rules in force find for a series (its headers, the study, the other series), or None."""
    from node.db.schema import Series
    from node.intake.routing import load_rules

    try:
        rules = load_rules(settings.routing_rules)
    except RoutingError:
        return None
    with db.session() as s:
        se = s.get(Series, series_id)
        anatomy = _route_now(s, settings, rules, se).anatomy if se is not None else None
        s.rollback()  # a read: nothing of it is kept
        return anatomy


def rules_status(settings) -> dict:
    """Where rules go and whether this node may write them (for the form)."""
    path = Path(settings.routing_rules)
    return {
        "path": str(path),
        "shipped_default": is_shipped_default(path),
        "writable": writable(path),
        "fact_keys": list(supported_fact_keys()),
    }


def make_rule(db, settings, series_id: int, fields: RuleRequestFields, *, actor: str, now) -> dict:
    """Adds a rule made from series ``series_id`` to the configured rules file, audited; optionally re-routes it.

    Raises `SeriesNotFound`, `RuleRefused` (invalid, or it would not route that series) or
    `RulesReadOnly` (nothing written; carries the block to paste into a site copy).
    """
    import logging

    from node.db.schema import Series
    from node.intake.completeness import reroute_unrouted
    from node.intake.routing import SeriesFacts, is_own_object
    from worklists import audit

    log = logging.getLogger(__name__)
    keys = supported_fact_keys()
    draft = check_draft(
        name=fields.name,
        pipeline=fields.pipeline,
        role=fields.role,
        anatomy=fields.anatomy,
        plane=fields.plane,
        contrast=fields.contrast,
        description=fields.description,
        keys=keys,
    )
    with db.session() as s:
        se = s.get(Series, series_id)
        if se is None:
            raise SeriesNotFound(f"series {series_id} not found")
        facts = SeriesFacts(series_uid=se.series_uid, manufacturer=se.manufacturer, own_object=bool(se.own_object))
        if is_own_object(facts, settings.uid_root):
            raise RuleRefused(f"series {se.series_uid} is an object msknode created: such objects are never routed")
        series_uid, state_before = se.series_uid, se.state
        comment = f"added from series {series_uid} by {actor} on {now:%Y-%m-%d} (web UI)"
        block = toml_block(draft, comment=comment)

        def routes_the_series(rules: RoutingRules) -> None:
            route = _route_now(s, settings, rules, se)
            if route.rule != draft.name:
                outcome = f"{route.pipeline}/{route.role} by rule {route.rule!r}" if route.routed else route.rule
                raise RuleRefused(
                    f"the rule does not match series {series_uid} it was made from (with it the series would be "
                    f"{outcome}): loosen a condition"
                )

        rules = add_rule(Path(settings.routing_rules), draft, block, check=routes_the_series)
        rerouted = None
        if fields.reroute and state_before == "unrouted":
            route = reroute_unrouted(s, settings, rules, series_id, now)
            rerouted = {
                "routed": bool(route and route.routed),
                "pipeline": route.pipeline if route else None,
                "role": route.role if route else None,
                "rule": route.rule if route else None,
            }
        audit.record(
            s,
            actor=actor,
            action="routing.rule_add",
            entity_type="routing_rule",
            entity_id=draft.name[:128],
            new=f"{draft.pipeline}/{draft.role}",
            details={
                "path": str(Path(settings.routing_rules).resolve()),
                "sha256": rules.digest,
                "rules": len(rules.rules),
                "series_id": series_id,
                "series_uid": series_uid,
                "block": block,
                "rerouted": rerouted,
            },
        )
    log.info(
        "routing rule %r added to %s by %s from series %s (%d rules, sha256 %s)%s",
        draft.name,
        settings.routing_rules,
        actor,
        series_uid,
        len(rules.rules),
        rules.digest[:12],
        f"; series routed {rerouted['pipeline']}/{rerouted['role']}" if rerouted and rerouted["routed"] else "",
    )
    return {
        "rule": draft.as_dict(),
        "path": str(Path(settings.routing_rules).resolve()),
        "sha256": rules.digest,
        "rules": len(rules.rules),
        "block": block,
        "series_uid": series_uid,
        "rerouted": rerouted,
    }
