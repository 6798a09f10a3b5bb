"""Routing rules: which received series go to which pipeline, and in which role.

A rules file (TOML, ``MSKNODE_ROUTING_RULES``; the shipped default is
``node/routing_rules.toml``) has four parts:

- ``generic_body_parts``: BodyPartExamined values that do not name one anatomy
  (empty, ``EXTREMITY``, ``SPINE`` …): the anatomy is then inferred from text.
- ``[patterns]``: named regular-expression fragments, used as ``{name}`` in rules.
- ``[anatomy.<pipeline>]``: how a series' anatomy is recognised: ``body_part`` (a regex
  on BodyPartExamined) and ``text`` (a regex on SeriesDescription, ProtocolName and,
  last, the StudyDescription).
- ``[[rule]]``: an ordered list; the first rule whose conditions all hold decides.
  Conditions: ``modality`` (list), ``anatomy`` (the rule's pipeline by default, or
  ``"any"``), ``body_part`` / ``description`` / ``protocol`` / ``text`` (regexes or
  lists of regexes that must all match; ``text`` is the SeriesDescription, or the
  ProtocolName when the description is empty), ``not_text`` (regexes none of which may
  match), ``laterality`` (list), ``calling_ae`` (list), ``manufacturer`` (regex).
  Outcome: ``pipeline`` + ``role``, or ``route = false`` (stored, never processed).

Regexes are case-insensitive and see underscores as spaces (``t2_tse_fs_sag`` reads
as ``t2 tse fs sag``, so ``\\b`` word boundaries work on vendor names).

Objects msknode created (our UID root, Manufacturer/ContributingEquipment
``msknode``, flagged ``own_object`` by the listener) are never routed, whatever the
rules say. A series no rule matches is ``unrouted``.

`RulesFile` reloads the file when it changes; an invalid file is refused with a
logged message and the previous rules stay in force.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from node.errors import RoutingError

#: pipelines and the roles their series can take (contract C3)
PIPELINE_ROLES: Mapping[str, tuple[str, ...]] = {
    "knee": ("sag_fluid", "sag_pd", "cor_fluid", "cor_t1", "ax_fluid", "localizer"),
    "shoulder": ("cor_fluid", "cor_t1", "sag_fluid", "ax_fluid", "localizer"),
    "lumbar_spine": ("sag_t2", "sag_t1", "sag_stir", "ax_t2", "localizer"),
}
#: a localizer is routed (it belongs to the study) but never a model input
LOCALIZER_ROLE = "localizer"
OWN_MANUFACTURER = "msknode"

_RULE_KEYS = {
    "name", "pipeline", "role", "route", "modality", "anatomy", "body_part", "description",
    "protocol", "text", "not_text", "laterality", "calling_ae", "manufacturer",
}
_TOP_KEYS = {"version", "generic_body_parts", "patterns", "anatomy", "rule"}
_ANATOMY_KEYS = {"body_part", "text"}
_PATTERN_REF = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_FLAGS = re.IGNORECASE


def normalize_text(value: str | None) -> str:
    """A header value as the rules see it: underscores as spaces, runs of blanks collapsed."""
    if not value:
        return ""
    return " ".join(value.replace("_", " ").replace("^", " ").split())


@dataclass(frozen=True)
class SeriesFacts:
    """The header values routing looks at (all from the index columns)."""

    series_uid: str
    modality: str | None = None
    body_part: str | None = None
    series_description: str | None = None
    protocol_name: str | None = None
    laterality: str | None = None
    calling_ae: str | None = None
    manufacturer: str | None = None
    own_object: bool = False
    study_description: str | None = None


@dataclass(frozen=True)
class Route:
    """A routing decision. ``pipeline`` is None for an unrouted series; ``rule`` names why."""

    pipeline: str | None
    role: str | None
    rule: str
    anatomy: str | None = None
    anatomy_source: str | None = None

    @property
    def routed(self) -> bool:
        return self.pipeline is not None

    @property
    def is_model_input(self) -> bool:
        return self.pipeline is not None and self.role != LOCALIZER_ROLE

    @property
    def needs_anatomy(self) -> bool:
        """Unrouted only because the anatomy was unknown (more of the study may tell)."""
        return self.pipeline is None and self.rule == UNROUTED_NO_ANATOMY


UNROUTED_OWN = "unrouted:own_object"
UNROUTED_NO_ANATOMY = "unrouted:no_anatomy"
UNROUTED_NO_RULE = "unrouted:no_rule"
UNROUTED_OTHER_ANATOMY = "unrouted:other_anatomy"


@dataclass(frozen=True)
class Anatomy:
    name: str
    body_part: re.Pattern | None
    text: re.Pattern | None


@dataclass(frozen=True)
class Rule:
    name: str
    index: int
    pipeline: str | None  # None: route = false
    role: str | None
    modality: frozenset[str] | None
    anatomy: str | None  # a pipeline name, or None for "any"
    body_part: tuple[re.Pattern, ...] = ()
    description: tuple[re.Pattern, ...] = ()
    protocol: tuple[re.Pattern, ...] = ()
    text: tuple[re.Pattern, ...] = ()
    not_text: tuple[re.Pattern, ...] = ()
    laterality: frozenset[str] | None = None
    calling_ae: frozenset[str] | None = None
    manufacturer: re.Pattern | None = None

    def matches(self, facts: SeriesFacts, anatomy: str | None) -> bool:
        if self.modality is not None and (facts.modality or "").strip().upper() not in self.modality:
            return False
        if self.anatomy is not None and anatomy != self.anatomy:
            return False
        desc = normalize_text(facts.series_description)
        proto = normalize_text(facts.protocol_name)
        text = desc or proto
        checks = (
            (self.body_part, normalize_text(facts.body_part)),
            (self.description, desc),
            (self.protocol, proto),
            (self.text, text),
        )
        for patterns, value in checks:
            if any(not p.search(value) for p in patterns):
                return False
        if any(p.search(text) for p in self.not_text):
            return False
        if self.laterality is not None and (facts.laterality or "").strip().upper() not in self.laterality:
            return False
        if self.calling_ae is not None and (facts.calling_ae or "").strip().upper() not in self.calling_ae:
            return False
        if self.manufacturer is not None and not self.manufacturer.search(facts.manufacturer or ""):
            return False
        return True


@dataclass(frozen=True)
class RoutingRules:
    """A validated rules file. `route` is a pure function of the series facts."""

    rules: tuple[Rule, ...]
    anatomies: tuple[Anatomy, ...]
    generic_body_parts: frozenset[str]
    source: str = "<string>"
    digest: str = ""

    # ---- anatomy -------------------------------------------------------------
    def own_anatomy(self, facts: SeriesFacts) -> tuple[str | None, str | None]:
        """The anatomy a series' own headers name: (anatomy, which header), or (None, reason).

        A BodyPartExamined that names another region (HEAD, ANKLE …) is decisive: no
        description can turn a head series into a knee.
        """
        body = normalize_text(facts.body_part).upper()
        if body and body not in self.generic_body_parts:
            for a in self.anatomies:
                if a.body_part is not None and a.body_part.search(body):
                    return a.name, "body_part"
            return None, "other_body_part"
        for header, value in (("series_description", facts.series_description), ("protocol_name", facts.protocol_name)):
            found = self._text_anatomy(value)
            if found:
                return found, header
        return None, None

    def anatomy_of(self, facts: SeriesFacts, siblings: Sequence[SeriesFacts] = ()) -> tuple[str | None, str | None]:
        """The series' anatomy: its own headers, then the study description, then the other series."""
        found, source = self.own_anatomy(facts)
        if found or source == "other_body_part":
            return found, source
        found = self._text_anatomy(facts.study_description)
        if found:
            return found, "study_description"
        seen = set()
        for s in siblings:
            if s.series_uid == facts.series_uid or s.own_object:
                continue
            a, _ = self.own_anatomy(s)
            if a:
                seen.add(a)
        if len(seen) == 1:
            return seen.pop(), "other_series"
        return None, None

    def _text_anatomy(self, value: str | None) -> str | None:
        text = normalize_text(value)
        if not text:
            return None
        for a in self.anatomies:
            if a.text is not None and a.text.search(text):
                return a.name
        return None

    # ---- routing -------------------------------------------------------------
    def route(self, facts: SeriesFacts, *, uid_root: str, siblings: Sequence[SeriesFacts] = ()) -> Route:
        """Pipeline and role for one series (or why it is unrouted)."""
        if is_own_object(facts, uid_root):
            return Route(None, None, UNROUTED_OWN)
        anatomy, source = self.anatomy_of(facts, siblings)
        for rule in self.rules:
            if rule.matches(facts, anatomy):
                if rule.pipeline is None:
                    return Route(None, None, f"unrouted:{rule.name}", anatomy, source)
                return Route(rule.pipeline, rule.role, rule.name, anatomy, source)
        if anatomy is None and source == "other_body_part":
            return Route(None, None, UNROUTED_OTHER_ANATOMY, None, source)
        if anatomy is None and (facts.modality or "").strip().upper() == "MR":
            return Route(None, None, UNROUTED_NO_ANATOMY, None, source)
        return Route(None, None, UNROUTED_NO_RULE, anatomy, source)


def is_own_object(facts: SeriesFacts, uid_root: str) -> bool:
    """True for objects msknode created: never routed again (no loops with a forwarding PACS)."""
    if facts.own_object:
        return True
    if uid_root and facts.series_uid.startswith(uid_root):
        return True
    return (facts.manufacturer or "").strip().lower() == OWN_MANUFACTURER


# ---- loading and validation --------------------------------------------------
def load_rules(path: str | Path) -> RoutingRules:
    """Reads and validates a rules file; raises `RoutingError` naming the file and the problem."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise RoutingError(f"routing rules {p}: file not found") from None
    except OSError as e:
        raise RoutingError(f"routing rules {p}: cannot read: {e.strerror}") from None
    return parse_rules(data.decode("utf-8", errors="replace"), source=str(p))


def parse_rules(text: str, *, source: str = "<string>") -> RoutingRules:
    """Validates rules given as TOML text."""
    where = f"routing rules {source}"
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RoutingError(f"{where}: invalid TOML: {e}") from None
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise RoutingError(f"{where}: unknown top-level key(s) {sorted(unknown)} (allowed: {sorted(_TOP_KEYS)})")
    version = raw.get("version", 1)
    if version != 1:
        raise RoutingError(f"{where}: version {version!r} is not supported (this msknode reads version 1)")

    patterns = raw.get("patterns", {})
    if not isinstance(patterns, dict) or not all(isinstance(v, str) for v in patterns.values()):
        raise RoutingError(f"{where}: [patterns] must map names to regex strings")
    for name, value in patterns.items():
        if _PATTERN_REF.search(value):
            raise RoutingError(f"{where}: pattern {name!r} refers to another pattern; patterns cannot nest")
        _compile(value, f"{where}: pattern {name!r}")

    generic = raw.get("generic_body_parts", [""])
    if not isinstance(generic, list) or not all(isinstance(v, str) for v in generic):
        raise RoutingError(f"{where}: generic_body_parts must be a list of strings")
    generic_set = frozenset(normalize_text(v).upper() for v in generic) | {""}

    anatomies = []
    anatomy_raw = raw.get("anatomy", {})
    if not isinstance(anatomy_raw, dict):
        raise RoutingError(f"{where}: [anatomy] must be a table of [anatomy.<pipeline>] tables")
    for name, spec in anatomy_raw.items():
        ctx = f"{where}: [anatomy.{name}]"
        if name not in PIPELINE_ROLES:
            raise RoutingError(f"{ctx}: {name!r} is not a pipeline (pipelines: {', '.join(sorted(PIPELINE_ROLES))})")
        if not isinstance(spec, dict):
            raise RoutingError(f"{ctx}: must be a table")
        bad = set(spec) - _ANATOMY_KEYS
        if bad:
            raise RoutingError(f"{ctx}: unknown key(s) {sorted(bad)} (allowed: {sorted(_ANATOMY_KEYS)})")
        compiled = {}
        for key in _ANATOMY_KEYS:
            value = spec.get(key)
            if value is None:
                compiled[key] = None
            elif not isinstance(value, str):
                raise RoutingError(f"{ctx}: {key} must be a regex string")
            else:
                compiled[key] = _compile(_expand(value, patterns, f"{ctx}: {key}"), f"{ctx}: {key}")
        anatomies.append(Anatomy(name, compiled["body_part"], compiled["text"]))

    rules_raw = raw.get("rule", [])
    if not isinstance(rules_raw, list) or not rules_raw:
        raise RoutingError(f"{where}: no [[rule]] entries")
    rules = []
    names: set[str] = set()
    for i, r in enumerate(rules_raw, start=1):
        rule = _parse_rule(r, i, patterns, where)
        if rule.name in names:
            raise RoutingError(f"{where}: rule {i}: the name {rule.name!r} is used twice")
        names.add(rule.name)
        if rule.anatomy is not None and rule.anatomy not in {a.name for a in anatomies}:
            raise RoutingError(
                f"{where}: rule {i} ({rule.name!r}): anatomy {rule.anatomy!r} has no [anatomy.{rule.anatomy}] table"
            )
        rules.append(rule)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return RoutingRules(tuple(rules), tuple(anatomies), generic_set, source=source, digest=digest)


def _parse_rule(r: Any, index: int, patterns: Mapping[str, str], where: str) -> Rule:
    ctx = f"{where}: rule {index}"
    if not isinstance(r, dict):
        raise RoutingError(f"{ctx}: must be a table")
    name = r.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > 100:
        raise RoutingError(f"{ctx}: needs a name (a string of at most 100 characters)")
    ctx = f"{ctx} ({name!r})"
    unknown = set(r) - _RULE_KEYS
    if unknown:
        raise RoutingError(f"{ctx}: unknown key(s) {sorted(unknown)} (allowed: {sorted(_RULE_KEYS)})")

    route = r.get("route", True)
    if not isinstance(route, bool):
        raise RoutingError(f"{ctx}: route must be true or false")
    pipeline = r.get("pipeline")
    role = r.get("role")
    if route:
        if pipeline not in PIPELINE_ROLES:
            raise RoutingError(
                f"{ctx}: pipeline {pipeline!r} is not one of {', '.join(sorted(PIPELINE_ROLES))}"
                " (or set route = false)"
            )
        if role not in PIPELINE_ROLES[pipeline]:
            raise RoutingError(f"{ctx}: role {role!r} is not a role of {pipeline} (roles: {', '.join(PIPELINE_ROLES[pipeline])})")
    else:
        if role is not None:
            raise RoutingError(f"{ctx}: a rule with route = false has no role")
        if pipeline is not None and pipeline not in PIPELINE_ROLES:
            raise RoutingError(f"{ctx}: pipeline {pipeline!r} is not one of {', '.join(sorted(PIPELINE_ROLES))}")

    anatomy = r.get("anatomy", pipeline if pipeline is not None else "any")
    if not isinstance(anatomy, str):
        raise RoutingError(f"{ctx}: anatomy must be a pipeline name or \"any\"")
    anatomy_value = None if anatomy == "any" else anatomy
    if anatomy_value is not None and anatomy_value not in PIPELINE_ROLES:
        raise RoutingError(f"{ctx}: anatomy {anatomy!r} is not a pipeline name or \"any\"")

    def str_list(key: str, upper: bool = True) -> frozenset[str] | None:
        value = r.get(key)
        if value is None:
            return None
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or not value:
            raise RoutingError(f"{ctx}: {key} must be a string or a non-empty list of strings")
        return frozenset(v.strip().upper() if upper else v for v in value)

    def regexes(key: str) -> tuple[re.Pattern, ...]:
        value = r.get(key)
        if value is None:
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise RoutingError(f"{ctx}: {key} must be a regex string or a list of regex strings")
        return tuple(_compile(_expand(v, patterns, f"{ctx}: {key}"), f"{ctx}: {key}") for v in value)

    manufacturer = r.get("manufacturer")
    if manufacturer is not None and not isinstance(manufacturer, str):
        raise RoutingError(f"{ctx}: manufacturer must be a regex string")
    return Rule(
        name=name.strip(),
        index=index,
        pipeline=pipeline if route else None,
        role=role if route else None,
        modality=str_list("modality") if "modality" in r else frozenset({"MR"}),
        anatomy=anatomy_value,
        body_part=regexes("body_part"),
        description=regexes("description"),
        protocol=regexes("protocol"),
        text=regexes("text"),
        not_text=regexes("not_text"),
        laterality=str_list("laterality"),
        calling_ae=str_list("calling_ae"),
        manufacturer=_compile(manufacturer, f"{ctx}: manufacturer") if manufacturer else None,
    )


def _expand(value: str, patterns: Mapping[str, str], ctx: str) -> str:
    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name not in patterns:
            raise RoutingError(f"{ctx}: pattern {{{name}}} is not defined in [patterns]")
        return f"(?:{patterns[name]})"

    return _PATTERN_REF.sub(sub, value)


def _compile(value: str, ctx: str) -> re.Pattern:
    try:
        return re.compile(value, _FLAGS)
    except re.error as e:
        raise RoutingError(f"{ctx}: invalid regex {value!r}: {e}") from None


# ---- reloading ----------------------------------------------------------------
@dataclass
class RulesFile:
    """The rules in force, reloaded when the file changes.

    `current()` checks the file's modification time and size (cheap; called once per
    completeness tick). A changed, valid file replaces the rules and the reload is
    logged; an invalid one is refused with a logged message and the old rules stay.
    The first load must succeed (`RoutingError` otherwise).
    """

    path: Path
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("node.routing"))
    _rules: RoutingRules | None = field(default=None, init=False, repr=False)
    _stamp: tuple[int, int] | None = field(default=None, init=False, repr=False)
    last_error: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self._stamp = self._file_stamp()
        self._rules = load_rules(self.path)
        self.logger.info(
            "routing rules loaded from %s (%d rules, sha256 %s)", self.path, len(self._rules.rules), self._rules.digest[:12]
        )

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def current(self) -> RoutingRules:
        stamp = self._file_stamp()
        if stamp != self._stamp:
            self._stamp = stamp
            self.reload()
        assert self._rules is not None
        return self._rules

    def reload(self) -> bool:
        """Loads the file again; True if the new rules are in force."""
        try:
            new = load_rules(self.path)
        except RoutingError as e:
            self.last_error = str(e)
            self.logger.error("%s; the file is refused, the previous rules stay in force", e)
            return False
        self.last_error = None
        if self._rules is not None and new.digest == self._rules.digest:
            return True
        self._rules = new
        self.logger.info(
            "routing rules reloaded from %s (%d rules, sha256 %s)", self.path, len(new.rules), new.digest[:12]
        )
        return True


def roles_of(pipeline: str) -> tuple[str, ...]:
    return PIPELINE_ROLES[pipeline]


def describe(rules: RoutingRules) -> Iterable[str]:
    """One line per rule, for ``msknode routing check``."""
    for r in rules.rules:
        outcome = f"{r.pipeline}/{r.role}" if r.pipeline else "unrouted"
        yield f"{r.index:>3}. {r.name:<40} -> {outcome}"
