"""Routing rules: which received series go to which pipeline, and in which role, and why.

A series is first recognised from what the scanner measured (`node.intake.recognition`): its plane
from ImageOrientationPatient, its contrast class from the acquisition parameters, its flags
(localizer, calibration, derived, mpr, projection, post_contrast, Dixon components); then its
anatomy (`RoutingRules.anatomy_finding`): AnatomicRegionSequence codes, BodyPartExamined, the
descriptions, the study description, the other series of the study and, only when all of these
are silent, a pixel classifier hook (`PixelAnatomy`). Regions without a pipeline (cervical
spine, head, hip …) are recognised and never routed.

A rules file (TOML, ``MSKNODE_ROUTING_RULES``; the shipped default is
``node/intake/routing_rules.toml``) has four parts:

- ``generic_body_parts``: BodyPartExamined values that do not name one anatomy
  (empty, ``EXTREMITY``, ``SPINE`` …): the anatomy is then inferred from text.
- ``[patterns]``: named regular-expression fragments, used as ``{name}`` in rules. Those
  named like `node.intake.recognition.DEFAULT_TEXT_PATTERNS` (sag, cor, ax, fat_sat, stir, pd, t1,
  t2, gre, fse3d, dess, localizer, calibration, post_contrast, derived, dixon, dixon_water)
  also replace what recognition reads in the text.
- ``[anatomy.<pipeline>]``: how a series' anatomy is recognised: ``body_part`` (a regex
  on BodyPartExamined) and ``text`` (a regex on SeriesDescription, ProtocolName and,
  last, the StudyDescription).
- ``[[rule]]``: an ordered list; the first rule whose conditions all hold decides.
  Conditions: ``plane`` (a string or list of `node.intake.recognition.PLANE_VALUES`),
  ``contrast`` (a list of `node.intake.recognition.CONTRASTS`), ``flags`` (all present),
  ``not_flags`` (none present), ``image_type`` / ``sequence`` (regexes on ImageType and on
  the sequence names), ``modality`` (list), ``anatomy`` (the rule's pipeline by default, or
  ``"any"``), ``body_part`` / ``description`` / ``protocol`` / ``text`` (regexes or
  lists of regexes that must all match; ``text`` is the SeriesDescription, or the
  ProtocolName when the description is empty), ``not_text`` (regexes none of which may
  match), ``laterality`` (list), ``calling_ae`` (list), ``manufacturer`` (regex).
  Outcome: ``pipeline`` + ``role``, or ``route = false`` (stored, never processed).
  Files with text conditions only route exactly as before.

Regexes are case-insensitive and see underscores as spaces (``t2_tse_fs_sag`` reads
as ``t2 tse fs sag``, so ``\\b`` word boundaries work on vendor names).

Objects msknode created (our UID root, Manufacturer/ContributingEquipment
``msknode``, flagged ``own_object`` by the listener) are never routed, whatever the
rules say. A series no rule matches is ``unrouted``.

`explain` returns the decision with every signal (`Explanation`, whose ``to_json`` is the
``routing_explanation`` of the series row and of ``msknode routing explain --json``);
`RoutingRules.route` is its decision alone.

`RulesFile` reloads the file when it changes; an invalid file is refused with a
logged message and the previous rules stay in force.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.errors import RoutingError
from node.intake.recognition import (
    CONTRASTS,
    FLAGS,
    GENERIC_CODED,
    PLANE_VALUES,
    Acquisition,
    Decision,
    Recognition,
    Signal,
    TextPatterns,
    anatomy_of_codes,
    normalize_text,
    other_anatomy_of_text,
    recognize,
    tag_source,
)

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
    "name",
    "pipeline",
    "role",
    "route",
    "modality",
    "anatomy",
    "body_part",
    "description",
    "protocol",
    "text",
    "not_text",
    "laterality",
    "calling_ae",
    "manufacturer",
    "plane",
    "contrast",
    "flags",
    "not_flags",
    "image_type",
    "sequence",
}
_TOP_KEYS = {"version", "generic_body_parts", "patterns", "anatomy", "rule"}
_ANATOMY_KEYS = {"body_part", "text"}
_PATTERN_REF = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_FLAGS = re.IGNORECASE


@dataclass(frozen=True)
class SeriesFacts:
    """The header values routing looks at (all from the index columns).

    ``orientations``: (ImageOrientationPatient, instance count) per distinct orientation of
    the series' instances; ``acquisition``: the acquisition parameters of its first instance.
    """

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
    orientations: tuple[tuple[str | None, int], ...] = ()
    acquisition: Acquisition = field(default_factory=Acquisition)

    def text(self) -> tuple[str, str]:
        """The text the rules read (the SeriesDescription, else the ProtocolName) and which header it is."""
        desc = normalize_text(self.series_description)
        if desc:
            return desc, tag_source("SeriesDescription")
        proto = normalize_text(self.protocol_name)
        return proto, (tag_source("ProtocolName") if proto else "")


@dataclass(frozen=True)
class Route:
    """A routing decision. ``pipeline`` is None for an unrouted series; ``rule`` names why."""

    pipeline: str | None
    role: str | None
    rule: str
    anatomy: str | None = None
    anatomy_source: str | None = None
    plane: str | None = None
    contrast: str | None = None
    flags: tuple[str, ...] = ()

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
UNROUTED_ANATOMY_CONFLICT = "unrouted:anatomy_conflict"

#: the pixel anatomy hook: (series) -> (anatomy or None, probability); consulted only when
#: every header, text and study signal is silent
PixelAnatomy = Callable[["SeriesFacts"], "tuple[str | None, float]"]
#: a pixel anatomy is used at this probability or above
PIXEL_ANATOMY_MIN_PROBABILITY = 0.9
#: anatomies the pixels may decide. Not the lumbar spine: the classifier has not learned the
#: cervical and thoracic spine, which it would take for lumbar; a spine needs a header or text.
PIXEL_ANATOMIES = ("knee", "shoulder")
#: flags that make a series no model input under any rule worth a pixel check
_NOT_ANATOMICAL = frozenset({"localizer", "calibration", "derived", "mpr", "projection"})


@dataclass(frozen=True)
class Anatomy:
    name: str
    body_part: re.Pattern[str] | None
    text: re.Pattern[str] | None


@dataclass(frozen=True)
class Rule:
    name: str
    index: int
    pipeline: str | None  # None: route = false
    role: str | None
    modality: frozenset[str] | None
    anatomy: str | None  # a pipeline name, or None for "any"
    body_part: tuple[re.Pattern[str], ...] = ()
    description: tuple[re.Pattern[str], ...] = ()
    protocol: tuple[re.Pattern[str], ...] = ()
    text: tuple[re.Pattern[str], ...] = ()
    not_text: tuple[re.Pattern[str], ...] = ()
    laterality: frozenset[str] | None = None
    calling_ae: frozenset[str] | None = None
    manufacturer: re.Pattern[str] | None = None
    plane: frozenset[str] | None = None
    contrast: frozenset[str] | None = None
    flags: frozenset[str] = frozenset()
    not_flags: frozenset[str] = frozenset()
    image_type: tuple[re.Pattern[str], ...] = ()
    sequence: tuple[re.Pattern[str], ...] = ()

    def matches(self, facts: SeriesFacts, anatomy: str | None, recognition: Recognition | None = None) -> bool:
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
        if self.plane is not None or self.contrast is not None or self.flags or self.not_flags:
            if recognition is None:
                return False
            if self.plane is not None and (recognition.plane.value or "unknown") not in self.plane:
                return False
            if self.contrast is not None and (recognition.contrast.value or "unknown") not in self.contrast:
                return False
            if not self.flags <= set(recognition.flags) or self.not_flags & set(recognition.flags):
                return False
        acq = facts.acquisition
        if self.image_type and any(not p.search(" ".join(acq.image_type)) for p in self.image_type):
            return False
        if self.sequence:
            names = " ".join(
                v
                for v in (
                    acq.sequence_name,
                    acq.pulse_sequence_name,
                    acq.ge_pulse_sequence,
                    acq.ge_internal_pulse_sequence,
                    acq.philips_scanning_technique,
                )
                if v
            )
            if any(not p.search(names) for p in self.sequence):
                return False
        return True


@dataclass(frozen=True)
class AnatomyFinding:
    """The anatomy decided for a series.

    ``pipeline``: the pipeline anatomy (None when none); ``value``: what was recognised (a
    pipeline, another region such as ``cervical_spine``, ``other`` for an unnamed region, or
    None); ``kind``: pipeline / other / conflict / none; ``source``: the routing key of the
    evidence (body_part, anatomic_region, series_description, protocol_name,
    study_description, other_series, pixels, other_body_part, conflict).
    """

    pipeline: str | None
    value: str | None
    kind: str
    source: str | None
    detail: str
    signals: tuple[Signal, ...] = ()


_SOURCE_LABELS = {
    "anatomic_region": "AnatomicRegionSequence",
    "body_part": "BodyPartExamined",
    "other_body_part": "BodyPartExamined",
    "series_description": "SeriesDescription",
    "protocol_name": "ProtocolName",
    "study_description": "StudyDescription",
    "other_series": "other series of the study",
    "pixels": "pixels",
    "conflict": "conflicting headers",
}
_HEADER_NAMES = {
    "series_description": "SeriesDescription",
    "protocol_name": "ProtocolName",
    "study_description": "StudyDescription",
}


@dataclass(frozen=True)
class RoutingRules:
    """A validated rules file. `route` is a pure function of the series facts."""

    rules: tuple[Rule, ...]
    anatomies: tuple[Anatomy, ...]
    generic_body_parts: frozenset[str]
    source: str = "<string>"
    digest: str = ""
    text_patterns: TextPatterns = field(default_factory=TextPatterns.build)

    # ---- anatomy -------------------------------------------------------------
    def own_anatomy(self, facts: SeriesFacts) -> tuple[str | None, str | None]:
        """The anatomy a series' own headers name: (anatomy, which header), or (None, reason).

        A BodyPartExamined that names another region (HEAD, ANKLE …) is decisive: no
        description can turn a head series into a knee.
        """
        found = self._own(facts)
        if found.kind == "pipeline":
            return found.pipeline, found.source
        if found.kind in ("other", "conflict"):
            return None, found.source
        return None, None

    def anatomy_of(self, facts: SeriesFacts, siblings: Sequence[SeriesFacts] = ()) -> tuple[str | None, str | None]:
        """The series' anatomy: its own headers, then the study description, then the other series."""
        found = self.anatomy_finding(facts, siblings)
        if found.kind == "pipeline":
            return found.pipeline, found.source
        return None, found.source

    def _body_part(self, value: str | None) -> tuple[str | None, str | None]:
        """(kind, anatomy) a BodyPartExamined names: pipeline/other, or (None, None) when empty or generic."""
        body = normalize_text(value).upper()
        if not body or body in self.generic_body_parts:
            return None, None
        for a in self.anatomies:
            if a.body_part is not None and a.body_part.search(body):
                return "pipeline", a.name
        others = other_anatomy_of_text(body)
        return "other", (others[0] if len(others) == 1 else "other")

    def _text_anatomies(self, value: str | None) -> list[tuple[str, str]]:
        """Every (kind, anatomy) a text names: pipelines first, then regions without a pipeline."""
        text = normalize_text(value)
        if not text:
            return []
        found = [("pipeline", a.name) for a in self.anatomies if a.text is not None and a.text.search(text)]
        found += [("other", name) for name in other_anatomy_of_text(text)]
        return found

    def _own(self, facts: SeriesFacts) -> AnatomyFinding:
        """The anatomy the series' own headers name (coded region, body part, descriptions)."""
        signals: list[Signal] = []
        codes = facts.acquisition.anatomic_region
        coded, code_read = anatomy_of_codes(codes)
        decisive_code = coded if coded is not None and coded not in GENERIC_CODED else None
        if codes:
            signals.append(
                Signal(
                    "anatomy (coded)",
                    f"{coded or 'no known code'} ({code_read})",
                    facts.acquisition.origin("anatomic_region", tag_source("AnatomicRegionSequence")),
                    False,
                )
            )
        body_kind, body_anatomy = self._body_part(facts.body_part)
        if facts.body_part:
            shown = body_anatomy or "names no one region"
            signals.append(
                Signal("anatomy (body part)", f"{facts.body_part} -> {shown}", tag_source("BodyPartExamined"), False)
            )
        if facts.laterality:
            signals.append(Signal("laterality", facts.laterality, tag_source("Laterality"), False))

        def used(i: int) -> tuple[Signal, ...]:
            out = list(signals)
            out[i] = Signal(out[i].name, out[i].value, out[i].source, True)
            return tuple(out)

        pipelines = {a.name for a in self.anatomies}
        if decisive_code is not None:
            code_kind = "pipeline" if decisive_code in pipelines else "other"
            if body_kind is not None and body_anatomy != "other" and body_anatomy != decisive_code:
                return AnatomyFinding(
                    None,
                    None,
                    "conflict",
                    "conflict",
                    f"AnatomicRegionSequence says {decisive_code}, BodyPartExamined {facts.body_part} "
                    f"says {body_anatomy}: not guessed",
                    tuple(Signal(s.name, s.value, s.source, True) for s in signals),
                )
            detail = f"coded {code_read}"
            if body_anatomy == "other":
                detail += f" (BodyPartExamined {facts.body_part} names no known region)"
            return AnatomyFinding(
                decisive_code if code_kind == "pipeline" else None,
                decisive_code,
                code_kind,
                "anatomic_region",
                detail,
                used(0),
            )
        if body_kind is not None:
            i = 1 if codes else 0
            if body_kind == "pipeline":
                return AnatomyFinding(
                    body_anatomy, body_anatomy, "pipeline", "body_part", f"BodyPartExamined {facts.body_part}", used(i)
                )
            return AnatomyFinding(
                None,
                body_anatomy,
                "other",
                "other_body_part",
                f"BodyPartExamined {facts.body_part} names another region: no description overrides it",
                used(i),
            )
        for header, value in (("series_description", facts.series_description), ("protocol_name", facts.protocol_name)):
            found = self._text_anatomies(value)
            if not found:
                continue
            names = sorted({n for _, n in found})
            src = tag_source(_HEADER_NAMES[header])
            if len(names) == 1:
                kind, name = found[0]
                signals.append(Signal("anatomy (text)", name, src, True))
                return AnatomyFinding(
                    name if kind == "pipeline" else None,
                    name,
                    kind,
                    header,
                    f"the {_HEADER_NAMES[header]} names {name}",
                    tuple(signals),
                )
            signals.append(Signal("anatomy (text)", "several: " + ", ".join(names), src, False))
        return AnatomyFinding(None, None, "none", None, "no header names the anatomy", tuple(signals))

    def anatomy_finding(
        self,
        facts: SeriesFacts,
        siblings: Sequence[SeriesFacts] = (),
        pixel_anatomy: PixelAnatomy | None = None,
        recognition: Recognition | None = None,
    ) -> AnatomyFinding:
        """The anatomy: own headers, the study description, the other series, then (when all are silent) the pixels."""
        own = self._own(facts)
        if own.kind != "none":
            return own
        signals = list(own.signals)
        found = self._text_anatomies(facts.study_description)
        src = tag_source("StudyDescription")
        names = sorted({n for _, n in found})
        if len(names) == 1:
            kind, name = found[0]
            signals.append(Signal("anatomy (study)", name, src, True))
            return AnatomyFinding(
                name if kind == "pipeline" else None,
                name,
                kind,
                "study_description",
                f"the StudyDescription names {name}",
                tuple(signals),
            )
        if names:
            signals.append(Signal("anatomy (study)", "several: " + ", ".join(names), src, False))
        seen: dict[str, str] = {}
        for s in siblings:
            if s.series_uid == facts.series_uid or s.own_object:
                continue
            other = self._own(s)
            if other.value is not None and other.kind in ("pipeline", "other"):
                seen[other.value] = other.kind
        if len(seen) == 1:
            ((name, kind),) = seen.items()
            signals.append(Signal("anatomy (other series)", name, "the other series of the study", True))
            return AnatomyFinding(
                name if kind == "pipeline" else None,
                name,
                kind,
                "other_series",
                f"every other series of the study that names an anatomy names {name}",
                tuple(signals),
            )
        if seen:
            signals.append(
                Signal(
                    "anatomy (other series)",
                    "several: " + ", ".join(sorted(seen)),
                    "the other series of the study",
                    False,
                )
            )
        if pixel_anatomy is None:
            return AnatomyFinding(
                None, None, "none", None, "no header, text or other series names the anatomy", tuple(signals)
            )
        flags = set(recognition.flags) if recognition is not None else set()
        plane = recognition.plane.value if recognition is not None else None
        if (facts.modality or "").strip().upper() != "MR" or flags & _NOT_ANATOMICAL or plane == "multi":
            signals.append(
                Signal(
                    "anatomy (pixels)", "not consulted (not an anatomical MR series)", "pixel anatomy classifier", False
                )
            )
            return AnatomyFinding(
                None, None, "none", None, "no header, text or other series names the anatomy", tuple(signals)
            )
        try:
            label, probability = pixel_anatomy(facts)
        except Exception as e:  # the hook must never stop routing
            signals.append(
                Signal("anatomy (pixels)", f"unavailable ({type(e).__name__})", "pixel anatomy classifier", False)
            )
            return AnatomyFinding(
                None, None, "none", None, "no header, text or other series names the anatomy", tuple(signals)
            )
        if label is None:
            signals.append(Signal("anatomy (pixels)", "no answer", "pixel anatomy classifier", False))
            return AnatomyFinding(
                None, None, "none", None, "no header, text or other series names the anatomy", tuple(signals)
            )
        value = f"{label} (p={probability:.2f})"
        if (
            label in PIXEL_ANATOMIES
            and label in {a.name for a in self.anatomies}
            and probability >= PIXEL_ANATOMY_MIN_PROBABILITY
        ):
            signals.append(Signal("anatomy (pixels)", value, "pixel anatomy classifier", True))
            return AnatomyFinding(
                label,
                label,
                "pipeline",
                "pixels",
                f"only the pixels tell: {label} with probability {probability:.2f} "
                f"(threshold {PIXEL_ANATOMY_MIN_PROBABILITY:g})",
                tuple(signals),
            )
        why = (
            "below the threshold"
            if probability < PIXEL_ANATOMY_MIN_PROBABILITY
            else "the pixels never decide this anatomy"
            if label not in ("other",)
            else "not a pipeline anatomy"
        )
        signals.append(Signal("anatomy (pixels)", f"{value}: {why}", "pixel anatomy classifier", False))
        return AnatomyFinding(
            None,
            None,
            "none",
            None,
            f"no header, text or other series names the anatomy; the pixels say {label} ({why})",
            tuple(signals),
        )

    def _text_anatomy(self, value: str | None) -> str | None:
        text = normalize_text(value)
        if not text:
            return None
        for a in self.anatomies:
            if a.text is not None and a.text.search(text):
                return a.name
        return None

    # ---- routing -------------------------------------------------------------
    def recognize(self, facts: SeriesFacts) -> Recognition:
        """Plane, contrast and flags of the series (`node.intake.recognition`), with this file's text patterns."""
        text, text_source = facts.text()
        return recognize(
            orientations=facts.orientations,
            acquisition=facts.acquisition,
            text=text,
            text_source=text_source,
            patterns=self.text_patterns,
            manufacturer=facts.manufacturer,
        )

    def route(
        self,
        facts: SeriesFacts,
        *,
        uid_root: str,
        siblings: Sequence[SeriesFacts] = (),
        pixel_anatomy: PixelAnatomy | None = None,
    ) -> Route:
        """Pipeline and role for one series (or why it is unrouted)."""
        return explain(facts, self, uid_root=uid_root, siblings=siblings, pixel_anatomy=pixel_anatomy).route


def is_own_object(facts: SeriesFacts, uid_root: str) -> bool:
    """True for objects msknode created: never routed again (no loops with a forwarding PACS)."""
    if facts.own_object:
        return True
    if uid_root and facts.series_uid.startswith(uid_root):
        return True
    return (facts.manufacturer or "").strip().lower() == OWN_MANUFACTURER


# ---- explanation ----------------------------------------------------------------
@dataclass(frozen=True)
class Explanation:
    """Why a series was routed as it was: the decision, plane, contrast, anatomy, flags and every signal.

    `to_json` is the ``routing_explanation`` of the series row, ``msknode routing explain
    --json`` and what the web pages show::

        {"decision": {"pipeline": str|null, "role": str|null, "rule": str, "routed": bool},
         "plane": {"value": str|null, "source": str, "detail": str},
         "contrast": {"value": str|null, "source": str, "detail": str},
         "anatomy": {"value": str|null, "source": str, "detail": str},
         "flags": [str],
         "signals": [{"name": str, "value": str, "source": str, "used": bool}]}
    """

    route: Route
    plane: Decision
    contrast: Decision
    anatomy: Decision
    flags: tuple[str, ...]
    signals: tuple[Signal, ...]

    def to_json(self) -> dict[str, Any]:
        r = self.route
        return {
            "decision": {"pipeline": r.pipeline, "role": r.role, "rule": r.rule, "routed": r.routed},
            "plane": self.plane.to_json(),
            "contrast": self.contrast.to_json(),
            "anatomy": self.anatomy.to_json(),
            "flags": list(self.flags),
            "signals": [s.to_json() for s in self.signals],
        }

    def summary(self) -> str:
        """One line for the log: decisions and their sources only (no header text, no patient data)."""
        r = self.route
        outcome = f"{r.pipeline}/{r.role} (rule {r.rule!r})" if r.routed else r.rule
        flags = ",".join(self.flags) or "-"
        return (
            f"plane {self.plane.value or '?'} ({self.plane.source}), contrast {self.contrast.value or '?'} "
            f"({self.contrast.source}), anatomy {self.anatomy.value or '?'} ({self.anatomy.source}), "
            f"flags {flags} -> {outcome}"
        )


def explain(
    facts: SeriesFacts,
    rules: RoutingRules,
    *,
    uid_root: str,
    siblings: Sequence[SeriesFacts] = (),
    pixel_anatomy: PixelAnatomy | None = None,
) -> Explanation:
    """Routes one series and says why: plane (geometry first), contrast (parameters first), anatomy, rule.

    ``siblings``: the other series of the study (anatomy context); ``pixel_anatomy``: the
    pixel classifier hook, called only when every header, text and study signal is silent.
    """
    recognition = rules.recognize(facts)
    signals = list(recognition.signals)

    def done(route: Route, anatomy: Decision, extra: Sequence[Signal] = ()) -> Explanation:
        route = Route(
            route.pipeline,
            route.role,
            route.rule,
            route.anatomy,
            route.anatomy_source,
            recognition.plane.value,
            recognition.contrast.value,
            recognition.flags,
        )
        return Explanation(
            route, recognition.plane, recognition.contrast, anatomy, recognition.flags, (*signals, *extra)
        )

    if is_own_object(facts, uid_root):
        own = Signal(
            "own object",
            "msknode created it (UID root, Manufacturer or ContributingEquipment)",
            "SeriesInstanceUID / Manufacturer (0008,0070)",
            True,
        )
        return done(
            Route(None, None, UNROUTED_OWN), Decision(None, "none", "not evaluated: msknode's own object"), [own]
        )
    found = rules.anatomy_finding(facts, siblings, pixel_anatomy, recognition)
    anatomy = Decision(found.value, _SOURCE_LABELS.get(found.source or "", "none"), found.detail)
    extra = list(found.signals)
    for rule in rules.rules:
        if rule.matches(facts, found.pipeline, recognition):
            extra.append(Signal("rule", f"{rule.index}. {rule.name}", f"routing rules {rules.source}", True))
            if rule.pipeline is None:
                return done(Route(None, None, f"unrouted:{rule.name}", found.pipeline, found.source), anatomy, extra)
            return done(Route(rule.pipeline, rule.role, rule.name, found.pipeline, found.source), anatomy, extra)
    if found.kind == "conflict":
        return done(Route(None, None, UNROUTED_ANATOMY_CONFLICT, None, found.source), anatomy, extra)
    if found.kind == "other":
        return done(Route(None, None, UNROUTED_OTHER_ANATOMY, None, found.source), anatomy, extra)
    if found.pipeline is None and (facts.modality or "").strip().upper() == "MR":
        return done(Route(None, None, UNROUTED_NO_ANATOMY, None, found.source), anatomy, extra)
    return done(Route(None, None, UNROUTED_NO_RULE, found.pipeline, found.source), anatomy, extra)


# ---- a table of series (vendor_series.toml) ------------------------------------------
#: header keys of a table row (besides vendor, description, body_part, protocol,
#: study_description, modality, laterality, calling_ae, expect, note)
TABLE_HEADER_KEYS: Mapping[str, str] = {
    "orientation": "ImageOrientationPatient of every instance (6 numbers or 'a\\\\b\\\\c\\\\d\\\\e\\\\f')",
    "orientations": "several orientations: a list of [orientation, instance count]",
    "instances": "instances of the series (default 20)",
    "image_type": "ImageType",
    "scanning_sequence": "ScanningSequence",
    "sequence_variant": "SequenceVariant",
    "scan_options": "ScanOptions",
    "mr_acquisition_type": "MRAcquisitionType",
    "sequence_name": "SequenceName",
    "pulse_sequence_name": "PulseSequenceName",
    "tr": "RepetitionTime (ms)",
    "te": "EchoTime (ms)",
    "ti": "InversionTime (ms)",
    "flip_angle": "FlipAngle",
    "etl": "EchoTrainLength",
    "field_strength": "MagneticFieldStrength (T)",
    "contrast_agent": "ContrastBolusAgent",
    "spectrally_selected_suppression": "SpectrallySelectedSuppression",
    "ge_pulse_sequence": "GE (0019,xx9C) pulse sequence name",
    "philips_scanning_technique": "Philips (2001,xx20) scanning technique",
    "philips_image_type": "Philips (2005,xx11) image type",
    "anatomic_region": "AnatomicRegionSequence codes, e.g. ['SCT:72696002']",
}
_TABLE_KEYS = {
    "vendor",
    "description",
    "body_part",
    "protocol",
    "study_description",
    "modality",
    "laterality",
    "calling_ae",
    "expect",
    "note",
    "expect_plane",
    "expect_contrast",
    "expect_flags",
    *TABLE_HEADER_KEYS,
}
_TABLE_ACQ = {
    "image_type": "image_type",
    "scanning_sequence": "scanning_sequence",
    "sequence_variant": "sequence_variant",
    "scan_options": "scan_options",
    "mr_acquisition_type": "mr_acquisition_type",
    "sequence_name": "sequence_name",
    "pulse_sequence_name": "pulse_sequence_name",
    "tr": "repetition_time",
    "te": "echo_time",
    "ti": "inversion_time",
    "flip_angle": "flip_angle",
    "etl": "echo_train_length",
    "field_strength": "magnetic_field_strength",
    "contrast_agent": "contrast_bolus_agent",
    "spectrally_selected_suppression": "spectrally_selected_suppression",
    "ge_pulse_sequence": "ge_pulse_sequence",
    "philips_scanning_technique": "philips_scanning_technique",
    "philips_image_type": "philips_image_type",
}


def facts_from_table_entry(entry: Mapping[str, Any], *, series_uid: str = "1.2.3") -> SeriesFacts:
    """The `SeriesFacts` of one row of a series table (``vendor_series.toml``): text and, when given, headers."""
    if not isinstance(entry, Mapping):
        raise RoutingError("series table: each [[series]] must be a table")
    unknown = set(entry) - _TABLE_KEYS
    if unknown:
        raise RoutingError(
            f"series table: entry {entry.get('description')!r}: unknown key(s) {sorted(unknown)} "
            f"(allowed: {sorted(_TABLE_KEYS)})"
        )
    acq: dict[str, Any] = {v: entry[k] for k, v in _TABLE_ACQ.items() if k in entry}
    if "anatomic_region" in entry:
        codes = entry["anatomic_region"]
        codes = [codes] if isinstance(codes, str) else list(codes)
        acq["anatomic_region"] = [[*(str(c).split(":", 1) if ":" in str(c) else ["SCT", str(c)]), ""] for c in codes]
    n = int(entry.get("instances", 20))

    def orientation_text(v: Any) -> str:
        return v if isinstance(v, str) else "\\".join(str(x) for x in v)

    orientations: list[tuple[str | None, int]] = []
    if "orientation" in entry:
        orientations.append((orientation_text(entry["orientation"]), n))
    for item in entry.get("orientations", []):
        if isinstance(item, (list, tuple)) and len(item) == 2 and not isinstance(item[1], float):
            orientations.append((orientation_text(item[0]), int(item[1])))
        else:
            orientations.append((orientation_text(item), 1))
    return SeriesFacts(
        series_uid=series_uid,
        modality=entry.get("modality", "MR"),
        body_part=entry.get("body_part"),
        series_description=entry.get("description"),
        protocol_name=entry.get("protocol"),
        study_description=entry.get("study_description"),
        laterality=entry.get("laterality"),
        calling_ae=entry.get("calling_ae"),
        manufacturer=entry.get("vendor"),
        orientations=tuple(orientations),
        acquisition=Acquisition.from_json(acq),
    )


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
        compiled: dict[str, re.Pattern[str] | None] = {}
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
    return RoutingRules(
        tuple(rules),
        tuple(anatomies),
        generic_set,
        source=source,
        digest=digest,
        text_patterns=TextPatterns.build(patterns),
    )


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
        if pipeline is None or pipeline not in PIPELINE_ROLES:
            raise RoutingError(
                f"{ctx}: pipeline {pipeline!r} is not one of {', '.join(sorted(PIPELINE_ROLES))} (or set route = false)"
            )
        if role not in PIPELINE_ROLES[pipeline]:
            raise RoutingError(
                f"{ctx}: role {role!r} is not a role of {pipeline} (roles: {', '.join(PIPELINE_ROLES[pipeline])})"
            )
    else:
        if role is not None:
            raise RoutingError(f"{ctx}: a rule with route = false has no role")
        if pipeline is not None and pipeline not in PIPELINE_ROLES:
            raise RoutingError(f"{ctx}: pipeline {pipeline!r} is not one of {', '.join(sorted(PIPELINE_ROLES))}")

    anatomy = r.get("anatomy", pipeline if pipeline is not None else "any")
    if not isinstance(anatomy, str):
        raise RoutingError(f'{ctx}: anatomy must be a pipeline name or "any"')
    anatomy_value = None if anatomy == "any" else anatomy
    if anatomy_value is not None and anatomy_value not in PIPELINE_ROLES:
        raise RoutingError(f'{ctx}: anatomy {anatomy!r} is not a pipeline name or "any"')

    def str_list(key: str, upper: bool = True) -> frozenset[str] | None:
        value = r.get(key)
        if value is None:
            return None
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or not value:
            raise RoutingError(f"{ctx}: {key} must be a string or a non-empty list of strings")
        return frozenset(v.strip().upper() if upper else v for v in value)

    def regexes(key: str) -> tuple[re.Pattern[str], ...]:
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

    def vocabulary(key: str, allowed: Sequence[str]) -> frozenset[str] | None:
        value = str_list(key, upper=False)
        if value is None:
            return None
        value = frozenset(v.strip().lower() for v in value)
        bad = sorted(value - set(allowed))
        if bad:
            raise RoutingError(f"{ctx}: {key} {', '.join(map(repr, bad))} is not one of {', '.join(allowed)}")
        return value

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
        plane=vocabulary("plane", PLANE_VALUES),
        contrast=vocabulary("contrast", CONTRASTS),
        flags=vocabulary("flags", FLAGS) or frozenset(),
        not_flags=vocabulary("not_flags", FLAGS) or frozenset(),
        image_type=regexes("image_type"),
        sequence=regexes("sequence"),
    )


def _expand(value: str, patterns: Mapping[str, str], ctx: str) -> str:
    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in patterns:
            raise RoutingError(f"{ctx}: pattern {{{name}}} is not defined in [patterns]")
        return f"(?:{patterns[name]})"

    return _PATTERN_REF.sub(sub, value)


def _compile(value: str, ctx: str) -> re.Pattern[str]:
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
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("node.intake.routing"))
    _rules: RoutingRules | None = field(default=None, init=False, repr=False)
    _stamp: tuple[int, int] | None = field(default=None, init=False, repr=False)
    last_error: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self._stamp = self._file_stamp()
        self._rules = load_rules(self.path)
        self.logger.info(
            "routing rules loaded from %s (%d rules, sha256 %s)",
            self.path,
            len(self._rules.rules),
            self._rules.digest[:12],
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
