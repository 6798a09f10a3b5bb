"""Triage: a worklist priority, a score and the reasons for both, from a study's findings.

The policy is a TOML file (`worklists/triage_policy.toml` documents the default and why).
`compute` is a pure function of the findings and the policy; `age` applies the ageing
steps at read time (they depend on the clock, so they are never stored); `sort_key`
is the one reading order of the worklist: priority, then waiting time, then score.
"""

from __future__ import annotations

import datetime as dt
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worklists.errors import PolicyError
from worklists.tables import PRIORITIES

DEFAULT_POLICY_PATH = Path(__file__).resolve().with_name("triage_policy.toml")
PRIORITY_RANK = {p: i for i, p in enumerate(PRIORITIES)}  # STAT 0, URGENT 1, ROUTINE 2


def rank(priority: str) -> int:
    return PRIORITY_RANK[priority]


def higher(a: str, b: str) -> str:
    """The more urgent of two priorities."""
    return a if rank(a) <= rank(b) else b


@dataclass(frozen=True)
class SameLevel:
    """A second finding a rule requires at the same vertebral level (``[rule.same_level]``)."""

    code: str
    min_probability: float
    grades: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rule:
    id: str
    code: str
    min_probability: float
    priority: str
    weight: float
    why: str
    grades: tuple[str, ...] = ()
    min_levels: int = 1
    # with it, a finding matches only where this other finding reaches its own threshold at the same
    # level; the rule's probability is then the lower of the two (the pair is no surer than either)
    same_level: SameLevel | None = None


@dataclass(frozen=True)
class AgeingStep:
    from_priority: str
    to_priority: str
    after_hours: float


@dataclass(frozen=True)
class TriagePolicy:
    version: str
    rules: tuple[Rule, ...]
    ageing: tuple[AgeingStep, ...] = ()
    default_priority: str = "ROUTINE"
    qc_failure_flag: bool = True
    qc_failure_priority: str = "ROUTINE"
    uncertainty_k: float = 2.0
    informational_codes: tuple[str, ...] = ("superres",)
    source: str = ""
    # reading targets: minutes from the study's arrival to "read", per priority ([targets])
    targets: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class TriageFinding:
    """What triage needs of one finding (a `findings` row, a model `Finding`, or a not-evaluated model)."""

    code: str
    label: str
    model_name: str = ""
    evaluated: bool = True
    probability: float | None = None
    uncertainty: float | None = None
    positive: bool | None = None
    grade: str | None = None
    grade_probabilities: dict[str, float] | None = None
    level: str | None = None
    qc_reason: str | None = None


@dataclass(frozen=True)
class TriageSummary:
    """The outcome of triage: the priority, a score (0-100) and human-readable reasons."""

    priority: str
    score: float
    reasons: tuple[str, ...]
    needs_review: bool = False
    matched_rules: tuple[str, ...] = ()
    policy_version: str = ""


@dataclass(frozen=True)
class Ageing:
    priority: str
    reason: str | None = None


# ---- policy file ---------------------------------------------------------------------


def _priority(value: Any, where: str) -> str:
    if value not in PRIORITY_RANK:
        raise PolicyError(f"{where}: priority must be one of {', '.join(PRIORITIES)}, got {value!r}")
    return value


def _number(value: Any, where: str, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PolicyError(f"{where}: a number is required, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise PolicyError(f"{where}: must be between {lo} and {hi}, got {value}")
    return float(value)


def parse_policy(data: dict[str, Any], *, source: str = "<policy>") -> TriagePolicy:
    """Validates a policy mapping (the parsed TOML) and returns it typed."""
    known = {"version", "default_priority", "review", "ageing", "rule", "targets"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PolicyError(f"{source}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    version = str(data.get("version", "unversioned"))
    default = _priority(data.get("default_priority", "ROUTINE"), f"{source}: default_priority")
    review = data.get("review", {})
    if not isinstance(review, dict):
        raise PolicyError(f"{source}: [review] must be a table")
    bad = sorted(set(review) - {"qc_failure_flag", "qc_failure_priority", "uncertainty_k", "informational_codes"})
    if bad:
        raise PolicyError(f"{source}: unknown key review.{bad[0]}")
    qc_flag = review.get("qc_failure_flag", True)
    if not isinstance(qc_flag, bool):
        raise PolicyError(f"{source}: review.qc_failure_flag must be true or false")
    qc_priority = _priority(review.get("qc_failure_priority", "ROUTINE"), f"{source}: review.qc_failure_priority")
    k = _number(review.get("uncertainty_k", 2.0), f"{source}: review.uncertainty_k", 0, 10)
    info_codes = review.get("informational_codes", ["superres"])
    if not isinstance(info_codes, list) or not all(isinstance(c, str) and c for c in info_codes):
        raise PolicyError(f"{source}: review.informational_codes must be a list of strings")

    steps = []
    for i, raw in enumerate(data.get("ageing", [])):
        where = f"{source}: ageing[{i}]"
        if not isinstance(raw, dict):
            raise PolicyError(f"{where} must be a table")
        bad = sorted(set(raw) - {"from", "to", "after_hours"})
        if bad:
            raise PolicyError(f"{where}: unknown key {bad[0]!r}")
        frm = _priority(raw.get("from"), f"{where}.from")
        to = _priority(raw.get("to"), f"{where}.to")
        if rank(to) >= rank(frm):
            raise PolicyError(f"{where}: ageing must promote ({frm} -> {to} is not a promotion)")
        steps.append(AgeingStep(frm, to, _number(raw.get("after_hours"), f"{where}.after_hours", 0)))

    raw_targets = data.get("targets", {})
    if not isinstance(raw_targets, dict):
        raise PolicyError(f"{source}: [targets] must be a table of priority = minutes")
    targets = []
    for prio, minutes in raw_targets.items():
        _priority(prio, f"{source}: targets")
        targets.append((prio, _number(minutes, f"{source}: targets.{prio}", 1, 60 * 24 * 30)))

    rules = []
    seen: set[str] = set()
    raw_rules = data.get("rule", [])
    if not isinstance(raw_rules, list):
        raise PolicyError(f"{source}: rules are written as [[rule]] tables")
    for i, raw in enumerate(raw_rules):
        where = f"{source}: rule[{i}]"
        if not isinstance(raw, dict):
            raise PolicyError(f"{where} must be a table")
        allowed = {"id", "code", "grades", "min_probability", "min_levels", "priority", "weight", "why", "same_level"}
        bad = sorted(set(raw) - allowed)
        if bad:
            raise PolicyError(f"{where}: unknown key {bad[0]!r} (known: {', '.join(sorted(allowed))})")
        for key in ("id", "code", "why"):
            if not isinstance(raw.get(key), str) or not raw[key].strip():
                raise PolicyError(f"{where}: {key!r} is required (a non-empty string)")
        rid = raw["id"]
        if rid in seen:
            raise PolicyError(f"{where}: duplicate rule id {rid!r}")
        seen.add(rid)
        grades = raw.get("grades", [])
        if not isinstance(grades, list) or not all(isinstance(g, str) and g for g in grades):
            raise PolicyError(f"{where}: grades must be a list of strings")
        min_levels = raw.get("min_levels", 1)
        if isinstance(min_levels, bool) or not isinstance(min_levels, int) or min_levels < 1:
            raise PolicyError(f"{where}: min_levels must be an integer >= 1")
        same_level = _same_level(raw.get("same_level"), f"{where}.same_level")
        rules.append(
            Rule(
                id=rid,
                code=raw["code"],
                grades=tuple(grades),
                min_probability=_number(raw.get("min_probability"), f"{where}.min_probability", 0, 1),
                min_levels=min_levels,
                priority=_priority(raw.get("priority"), f"{where}.priority"),
                weight=_number(raw.get("weight", 0), f"{where}.weight", 0, 100),
                why=raw["why"],
                same_level=same_level,
            )
        )
    return TriagePolicy(
        version=version,
        rules=tuple(rules),
        ageing=tuple(steps),
        default_priority=default,
        qc_failure_flag=qc_flag,
        qc_failure_priority=qc_priority,
        uncertainty_k=k,
        informational_codes=tuple(info_codes),
        source=source,
        targets=tuple(targets),
    )


def _same_level(raw: Any, where: str) -> SameLevel | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise PolicyError(f"{where} must be a table (code, grades, min_probability)")
    bad = sorted(set(raw) - {"code", "grades", "min_probability"})
    if bad:
        raise PolicyError(f"{where}: unknown key {bad[0]!r} (known: code, grades, min_probability)")
    if not isinstance(raw.get("code"), str) or not raw["code"].strip():
        raise PolicyError(f"{where}: 'code' is required (a non-empty string)")
    grades = raw.get("grades", [])
    if not isinstance(grades, list) or not all(isinstance(g, str) and g for g in grades):
        raise PolicyError(f"{where}: grades must be a list of strings")
    return SameLevel(
        code=raw["code"],
        grades=tuple(grades),
        min_probability=_number(raw.get("min_probability"), f"{where}.min_probability", 0, 1),
    )


def load_policy(path: str | Path) -> TriagePolicy:
    """Reads and validates a policy file; raises `PolicyError` with one clear message."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PolicyError(f"triage policy {path}: not found") from None
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"triage policy {path}: invalid TOML: {e}") from None
    return parse_policy(data, source=f"triage policy {path}")


# ---- findings in, summary out ----------------------------------------------------------


def as_triage_finding(f: Any) -> TriageFinding:
    """Normalises a `findings` row, a `models.types.Finding` or a `TriageFinding`."""
    if isinstance(f, TriageFinding):
        return f
    details = getattr(f, "details", None) or {}
    grade_probs = getattr(f, "grade_probabilities", None) or details.get("grade_probabilities")
    return TriageFinding(
        code=f.code,
        label=getattr(f, "label", None) or f.code,
        model_name=getattr(f, "model_name", "") or "",
        evaluated=bool(getattr(f, "evaluated", True)),
        probability=getattr(f, "probability", None),
        uncertainty=getattr(f, "uncertainty", None),
        positive=getattr(f, "positive", None),
        grade=getattr(f, "grade", None),
        grade_probabilities=dict(grade_probs) if grade_probs else None,
        level=getattr(f, "level", None),
        qc_reason=getattr(f, "qc_reason", None),
    )


def findings_from_pipeline(output: Any) -> list[TriageFinding]:
    """The triage view of a `models.types.PipelineOutput`, refused models included."""
    out: list[TriageFinding] = []
    for mo in output.outputs:
        if not mo.qc.accepted:
            out.append(
                TriageFinding(
                    code=mo.model.name,
                    label=mo.model.name,
                    model_name=mo.model.name,
                    evaluated=False,
                    qc_reason=mo.qc.reason or "qc_refused",
                )
            )
            continue
        for f in mo.findings:
            tf = as_triage_finding(f)
            out.append(TriageFinding(**{**tf.__dict__, "model_name": mo.model.name}))
    return out


def rule_probability(rule: Rule, f: TriageFinding) -> float | None:
    """The probability that finding `f` is what `rule` describes, or None if it cannot be."""
    if f.code != rule.code or not f.evaluated:
        return None
    if not rule.grades:
        return f.probability
    if f.grade_probabilities:
        return float(sum(f.grade_probabilities.get(g, 0.0) for g in rule.grades))
    if f.grade in rule.grades:
        return f.probability
    return None


def level_key(level: str | None) -> str | None:
    """A vertebral level as one spelling ("L4/L5", "l4-l5" and "L4-L5" are one level)."""
    return level.upper().replace("/", "-").replace(" ", "") if level else None


def same_level_partner(
    rule: Rule, f: TriageFinding, evaluated: Iterable[TriageFinding]
) -> tuple[float, TriageFinding] | None:
    """For a rule with ``same_level``: the most probable other finding at ``f``'s level that reaches
    the ``same_level`` threshold, with its probability (None: there is none, or ``f`` has no level)."""
    need = rule.same_level
    key = level_key(f.level)
    if need is None or key is None:
        return None
    other = Rule(
        id="", code=need.code, grades=need.grades, min_probability=need.min_probability, priority="", weight=0, why=""
    )
    best: tuple[float, TriageFinding] | None = None
    for g in evaluated:
        if g is f or level_key(g.level) != key:
            continue
        p = rule_probability(other, g)
        if p is not None and p >= need.min_probability and (best is None or p > best[0]):
            best = (p, g)
    return best


def _p_name(rule: Rule | SameLevel) -> str:
    return f"P({' or '.join(rule.grades)})" if rule.grades else "P(finding)"


def _describe(f: TriageFinding) -> str:
    return display_finding(f).text + spread(f.uncertainty)


def _unique(items: list[str]) -> list[str]:
    """The items once each, in order (two refusals with the same words are one reason)."""
    return list(dict.fromkeys(items))


# ---- how a finding is written: the one wording of the worklist, the study page, the reasons and the API ----
#
# The headline number of a finding is the probability of the finding itself, whatever its grade:
# P(tear of any grade) = 1 - P(intact) for the ACL, 1 - P(normal) for a stenosis level (the model's
# `probability`). The grade split (the probability of each positive grade, most probable first) is
# written beside it: "ACL tear 98 % (complete 71 %, partial 27 %)". Everything here is ASCII (the
# reasons also go into the DICOM SR).

NEGATIVE_GRADES = frozenset({"intact", "none", "normal", "absent", "negative"})
# findings graded on a numbered scale: the grades that are not the finding, and how a grade is written
# (Pfirrmann I-II is a normal disc; degeneration is P(Pfirrmann III-V))
NEGATIVE_GRADES_OF = {"disc_degeneration": frozenset({"1", "2"})}
PFIRRMANN_NAMES = {
    "1": "Pfirrmann I",
    "2": "Pfirrmann II",
    "3": "Pfirrmann III",
    "4": "Pfirrmann IV",
    "5": "Pfirrmann V",
}


def grade_name(code: str, grade: str) -> str:
    """How a grade is written: "Pfirrmann IV" for a disc's "4", "full-thickness" for "full_thickness"."""
    if code == "disc_degeneration":
        return PFIRRMANN_NAMES.get(str(grade), f"Pfirrmann {grade}")
    return grade.replace("_", "-")


FINDING_NAMES = {
    "acl_tear": "ACL tear",
    "meniscal_tear": "Meniscal tear",
    "rotator_cuff_tear": "Supraspinatus tear",
    "spinal_stenosis": "Central canal stenosis",
    "disc_degeneration": "Disc degeneration",
    "disc_herniation": "Disc herniation",
    "disc_grading": "Disc degeneration and herniation",
    "superres": "Super-resolution",
}
# a model that did not evaluate is recorded under its own name: the finding it would have reported
MODEL_FINDINGS = {
    "knee.acl": "acl_tear",
    "knee.meniscus": "meniscal_tear",
    "shoulder.rotator_cuff": "rotator_cuff_tear",
    "lumbar_spine.stenosis": "spinal_stenosis",
    "lumbar_spine.discs": "disc_grading",
    "superres": "superres",
}
# QC gate reason codes in words. They name no plane and no anatomy: the gate's own message (which
# may, e.g., call a sagittal series "coronal" when the pixel classifier disagrees with the header)
# is kept for the admin's details view and never shown to a reader.
QC_SENTENCES = {
    "missing_series": "the series this model reads was not received",
    "wrong_modality": "the series is not an MR series",
    "missing_geometry": "the series has no slice position or orientation in its header",
    "localizer": "the series is a localizer, which the model does not read",
    "too_few_slices": "the series has too few slices for the model",
    "extreme_spacing": "the slice spacing, pixel size or field of view is outside the range the model was built for",
    "wrong_orientation": "the quality check judged the slice orientation unsuitable for the model",
    "empty_image": "the images hold almost no signal",
    "constant_image": "the images are blank",
    "low_snr": "the images are too noisy for the model",
    "motion": "the images show heavy motion artefacts",
    "wrong_anatomy": "the quality check could not confirm the expected body part in the images",
    "out_of_distribution": "the images are unlike those the model was trained on",
    "qc_unavailable": "the image quality check is not available on this node",
    "qc_refused": "the series did not pass the image quality check",
    "series_too_large": "the series is larger than this node reads (too many voxels)",
}


def qc_sentence(code: str | None) -> str:
    """A QC reason code as a plain sentence for a reader (an unknown code is named, never a free text)."""
    if not code:
        return "no reason was recorded"
    sentence = QC_SENTENCES.get(code)
    if sentence is None:
        return f"the series did not pass the image quality check ({code.replace('_', ' ')})"
    return sentence


def percent(p: float | None) -> str:
    """A probability in whole percent: "98 %", "<1 %", ">99 %" (never "0 %" or "100 %"); "n/a" for None."""
    if p is None:
        return "n/a"
    if p >= 0.995:
        return ">99 %"
    if p < 0.005:
        return "<1 %"
    return f"{int(p * 100 + 0.5)} %"  # halves round up, as a reader expects


def spread(u: float | None) -> str:
    """The uncertainty (one SD of the probability) in percentage points, as written after a finding."""
    return "" if u is None else f" (+/-{u * 100:.0f})"


def finding_name(code: str, label: str | None = None, model_name: str | None = None) -> str:
    """The name of a finding without its grade ("ACL tear", never "Partial ACL tear" or "knee.acl: ...")."""
    for key in (code, MODEL_FINDINGS.get(code), MODEL_FINDINGS.get(model_name or "")):
        if key in FINDING_NAMES:
            return FINDING_NAMES[key]
    return label or code


@dataclass(frozen=True)
class FindingDisplay:
    """How a finding is written everywhere: its name, the headline probability and the grade split."""

    name: str
    level: str | None
    evaluated: bool
    probability: float | None  # the headline: P(finding, any grade)
    grades: tuple[tuple[str, float], ...]  # positive grades, most probable first
    grade: str | None  # the grade the model reports (its most probable positive grade)
    short: str  # "ACL tear 98 %"
    text: str  # "ACL tear 98 % (complete 71 %, partial 27 %)", or "ACL tear not evaluated: <why>"
    qc_reason: str | None = None
    qc_text: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "level": self.level,
            "evaluated": self.evaluated,
            "probability": self.probability,
            "probability_text": percent(self.probability) if self.evaluated else None,
            "grade": self.grade,
            "grades": [{"grade": g, "probability": p, "text": percent(p)} for g, p in self.grades],
            "short": self.short,
            "text": self.text,
            "qc_reason": self.qc_reason,
            "qc_text": self.qc_text,
        }


def display_finding(f: Any) -> FindingDisplay:
    """The one formatting of a finding (a `findings` row, a model `Finding` or a `TriageFinding`)."""
    t = as_triage_finding(f)
    name = finding_name(t.code, t.label, t.model_name)
    where = f" {t.level}" if t.level else ""
    if not t.evaluated:
        why = qc_sentence(t.qc_reason)
        verb = "not done" if t.code == "superres" else "not evaluated"
        return FindingDisplay(
            name=name,
            level=t.level,
            evaluated=False,
            probability=None,
            grades=(),
            grade=None,
            short=f"{name}{where} {verb}",
            text=f"{name}{where} {verb}: {why}",
            qc_reason=t.qc_reason,
            qc_text=why,
        )
    probs = {g: float(p) for g, p in (t.grade_probabilities or {}).items() if p is not None}
    negative = NEGATIVE_GRADES | NEGATIVE_GRADES_OF.get(t.code, frozenset())
    positive = [(g, p) for g, p in probs.items() if g not in negative]
    grades = tuple(sorted(positive, key=lambda gp: -gp[1]))
    headline = t.probability
    if headline is None and probs:
        headline = sum(p for _, p in positive)
    grade = t.grade if t.grade and t.grade not in negative else (grades[0][0] if grades and t.positive else None)
    short = f"{name}{where} {percent(headline)}"
    split = ", ".join(f"{grade_name(t.code, g)} {percent(p)}" for g, p in grades)
    text = f"{short} ({split})" if len(grades) > 1 else short  # one positive grade is the headline itself
    return FindingDisplay(
        name=name,
        level=t.level,
        evaluated=True,
        probability=headline,
        grades=grades,
        grade=grade,
        short=short,
        text=text,
    )


def compute(
    findings: Iterable[Any],
    policy: TriagePolicy,
    *,
    waiting_since: dt.datetime | None = None,
    now: dt.datetime | None = None,
) -> TriageSummary:
    """The priority, score and reasons of a study from its findings (and, with times, ageing)."""
    items = [as_triage_finding(f) for f in findings]
    info = [f for f in items if f.code in policy.informational_codes]
    items = [f for f in items if f.code not in policy.informational_codes]
    priority = policy.default_priority
    score = 0.0
    reasons: list[str] = []
    matched: list[str] = []
    review = False

    evaluated = [f for f in items if f.evaluated]
    refused = [f for f in items if not f.evaluated]

    for rule in policy.rules:
        hits = []
        partners: dict[int, tuple[float, TriageFinding]] = {}
        for f in evaluated:
            p = rule_probability(rule, f)
            if p is None or p < rule.min_probability:
                continue
            if rule.same_level is not None:
                partner = same_level_partner(rule, f, evaluated)
                if partner is None:
                    continue
                partners[id(f)] = partner
                p = min(p, partner[0])
            hits.append((p, f))
        levels = {f.level or f"#{i}" for i, (_, f) in enumerate(hits)}
        if hits and len(levels) >= rule.min_levels:
            best_p, best = max(hits, key=lambda h: h[0])
            priority = higher(priority, rule.priority)
            score += rule.weight * best_p
            matched.append(rule.id)
            where = ""
            if rule.min_levels > 1 or len(hits) > 1:
                named = sorted(f.level for _, f in hits if f.level)
                where = f"; {len(hits)} levels: {', '.join(named)}" if named else f"; {len(hits)} findings"
            evidence = f"{_describe(best)}; {_p_name(rule)} {percent(best_p)} >= {percent(rule.min_probability)}{where}"
            if id(best) in partners and rule.same_level is not None:
                pp, pf = partners[id(best)]
                need = rule.same_level
                evidence = (
                    f"{_describe(best)} with {_describe(pf)} at the same level;"
                    f" {_p_name(rule)} {percent(rule_probability(rule, best))} >= {percent(rule.min_probability)},"
                    f" {_p_name(need)} {percent(pp)}"
                    f" >= {percent(need.min_probability)}{where}"
                )
            if rank(rule.priority) < rank(policy.default_priority):
                reasons.append(f"{rule.priority}: {evidence} - {rule.why} [rule {rule.id}]")
            else:
                reasons.append(f"score +{rule.weight * best_p:.0f}: {evidence} [rule {rule.id}]")

    # near-miss with wide uncertainty: flag, do not reprioritise
    k = policy.uncertainty_k
    for rule in policy.rules:
        if rule.id in matched or rank(rule.priority) >= rank(priority):
            continue
        for f in evaluated:
            p = rule_probability(rule, f)
            if p is None or f.uncertainty is None or p >= rule.min_probability:
                continue
            if rule.same_level is not None and same_level_partner(rule, f, evaluated) is None:
                continue  # a near miss of a pair rule counts only where the other finding is there
            if p + k * f.uncertainty >= rule.min_probability:
                review = True
                reasons.append(
                    f"uncertain: {_describe(f)}; {_p_name(rule)} {percent(p)} is within {k:g} SD of the"
                    f" {rule.priority} threshold {percent(rule.min_probability)} - needs review [rule {rule.id}]"
                )
                break

    # positive findings that no rule mentions are still listed
    for f in evaluated:
        if f.positive and not any(rule_probability(r, f) is not None and r.id in matched for r in policy.rules):
            reasons.append(f"finding: {_describe(f)} (no rule reached)")

    if refused and policy.qc_failure_flag:
        review = True
        reasons.extend(_unique([f"{display_finding(f).text} - needs human review" for f in refused]))
    reasons.extend(
        _unique([f"{display_finding(f).text} - does not change the priority" for f in info if not f.evaluated])
    )
    if not evaluated:
        review = review or policy.qc_failure_flag
        priority = higher(priority, policy.qc_failure_priority)
        if not items:
            reasons.append("no AI result for this study - read without AI support")
        else:
            reasons.append("no model could evaluate this study - read without AI support")
    elif not matched:
        reasons.append(f"{priority}: no finding reached a priority threshold")

    if waiting_since is not None and now is not None:
        aged = age(priority, waiting_since=waiting_since, now=now, policy=policy)
        if aged.reason:
            priority = aged.priority
            reasons.append(aged.reason)

    return TriageSummary(
        priority=priority,
        score=round(min(score, 100.0), 1),
        reasons=tuple(reasons),
        needs_review=review,
        matched_rules=tuple(matched),
        policy_version=policy.version,
    )


def age(priority: str, *, waiting_since: dt.datetime, now: dt.datetime, policy: TriagePolicy) -> Ageing:
    """Applies the ageing steps (repeatedly, so ROUTINE -> URGENT -> STAT chains work)."""
    hours = (now - waiting_since).total_seconds() / 3600.0
    reason = None
    changed = True
    while changed:
        changed = False
        for step in policy.ageing:
            if step.from_priority == priority and hours >= step.after_hours:
                reason = (
                    f"{step.to_priority}: waiting {hours:.1f} h >= {step.after_hours:g} h,"
                    f" promoted from {step.from_priority} (ageing)"
                )
                priority = step.to_priority
                changed = True
                break
    return Ageing(priority, reason)


def sort_key(priority: str, waiting_since: dt.datetime, score: float, entry_id: int) -> tuple:
    """The reading order: priority, then longest waiting, then score, then a stable id."""
    return (rank(priority), waiting_since.timestamp(), -score, entry_id)
