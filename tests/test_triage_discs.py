"""Triage of disc grading: the shipped pair rule (disc herniation with severe central canal stenosis at
the same level), the ``[rule.same_level]`` policy language behind it, and how disc findings are worded."""

from __future__ import annotations

import pytest

from worklists.errors import PolicyError
from worklists.triage import (
    DEFAULT_POLICY_PATH,
    TriageFinding,
    compute,
    display_finding,
    load_policy,
    parse_policy,
)

pytestmark = [pytest.mark.unit]

PAIR = "disc_herniation_severe_stenosis"


@pytest.fixture(scope="module")
def policy():
    return load_policy(DEFAULT_POLICY_PATH)


def stenosis(level: str, p_severe: float, *, grade: str = "moderate") -> TriageFinding:
    """A stenosis level whose most probable grade is ``grade`` and P(severe) is ``p_severe``."""
    rest = 1.0 - p_severe
    split = {"normal": rest * 0.2, "mild": rest * 0.2, "moderate": rest * 0.6, "severe": p_severe}
    return TriageFinding(
        code="spinal_stenosis",
        label="Central canal stenosis",
        model_name="lumbar_spine.stenosis",
        probability=1.0 - split["normal"],
        uncertainty=0.03,
        positive=True,
        grade=grade,
        grade_probabilities=split,
        level=level,
    )


def herniation(level: str, p: float, *, uncertainty: float | None = 0.03) -> TriageFinding:
    return TriageFinding(
        code="disc_herniation",
        label="Disc herniation",
        model_name="lumbar_spine.discs",
        probability=p,
        uncertainty=uncertainty,
        positive=p >= 0.5,
        level=level,
    )


def degeneration(level: str, grade: str, p: float) -> TriageFinding:
    split = dict.fromkeys("12345", (1.0 - 0.8) / 4)
    split[grade] = 0.8
    return TriageFinding(
        code="disc_degeneration",
        label="Disc degeneration",
        model_name="lumbar_spine.discs",
        probability=p,
        uncertainty=0.02,
        positive=int(grade) >= 3,
        grade=grade,
        grade_probabilities=split,
        level=level,
    )


def test_herniation_with_severe_stenosis_at_the_same_level_is_urgent(policy):
    # P(severe) 0.40 alone is below the single-level severe rule (0.50): ROUTINE without the herniation
    alone = compute([stenosis("L4-L5", 0.40)], policy)
    assert alone.priority == "ROUTINE" and "stenosis_severe" not in alone.matched_rules

    s = compute([stenosis("L4-L5", 0.40), herniation("L4-L5", 0.82), degeneration("L4-L5", "4", 0.93)], policy)
    assert s.priority == "URGENT"
    assert PAIR in s.matched_rules
    reason = next(r for r in s.reasons if f"[rule {PAIR}]" in r)
    assert reason.startswith("URGENT: Disc herniation L4-L5 82 %")
    assert "with Central canal stenosis L4-L5" in reason and "at the same level" in reason
    assert "P(finding) 82 % >= 50 %" in reason and "P(severe) 40 % >= 30 %" in reason
    assert "cauda equina" in reason
    # the pair counts with the lower of its two probabilities: 80 x 0.40
    others = compute([stenosis("L4-L5", 0.40), degeneration("L4-L5", "4", 0.93)], policy)
    assert s.score - others.score == pytest.approx(80 * 0.40 + 15 * 0.82, abs=0.11)


def test_the_pair_needs_one_level(policy):
    s = compute([stenosis("L4-L5", 0.40), herniation("L3-L4", 0.82)], policy)
    assert s.priority == "ROUTINE"
    assert PAIR not in s.matched_rules
    assert "disc_herniation" in s.matched_rules  # still listed and scored
    # the same level however it is spelled
    same = compute([stenosis("L4/L5", 0.40), herniation("l4-l5", 0.82)], policy)
    assert same.priority == "URGENT" and PAIR in same.matched_rules
    # a finding without a level pairs with nothing
    s = compute([stenosis("L4-L5", 0.40), herniation(None, 0.9)], policy)  # type: ignore[arg-type]
    assert PAIR not in s.matched_rules


def test_each_half_of_the_pair_has_its_own_threshold(policy):
    weak_herniation = compute([stenosis("L5-S1", 0.45), herniation("L5-S1", 0.40, uncertainty=None)], policy)
    assert PAIR not in weak_herniation.matched_rules and weak_herniation.priority == "ROUTINE"
    weak_stenosis = compute([stenosis("L5-S1", 0.20), herniation("L5-S1", 0.95)], policy)
    assert PAIR not in weak_stenosis.matched_rules and weak_stenosis.priority == "ROUTINE"


def test_a_near_miss_of_the_pair_is_flagged_only_where_the_stenosis_is(policy):
    near = compute([stenosis("L4-L5", 0.40), herniation("L4-L5", 0.46, uncertainty=0.05)], policy)
    assert near.priority == "ROUTINE" and near.needs_review
    assert any(r.startswith("uncertain: Disc herniation L4-L5 46 %") and f"[rule {PAIR}]" in r for r in near.reasons)
    elsewhere = compute([stenosis("L2-L3", 0.40), herniation("L4-L5", 0.46, uncertainty=0.05)], policy)
    assert not elsewhere.needs_review
    assert not any(f"[rule {PAIR}]" in r for r in elsewhere.reasons)


def test_degenerated_discs_raise_the_score_in_one_reason_and_say_their_pfirrmann_grade(policy):
    s = compute(
        [degeneration("L4-L5", "4", 0.93), degeneration("L5-S1", "3", 0.8), degeneration("L3-L4", "2", 0.2)], policy
    )
    assert s.priority == "ROUTINE" and s.matched_rules == ("disc_degeneration",)
    reason = next(r for r in s.reasons if "[rule disc_degeneration]" in r)
    assert "2 levels: L4-L5, L5-S1" in reason
    assert not any("no rule reached" in r for r in s.reasons)
    d = display_finding(degeneration("L4-L5", "4", 0.93))
    assert d.name == "Disc degeneration" and d.grade == "4"
    assert d.text.startswith("Disc degeneration L4-L5 93 % (Pfirrmann IV 80 %, ")
    assert "Pfirrmann I " not in d.text and "Pfirrmann II " not in d.text  # I-II are a normal disc
    assert display_finding(degeneration("L3-L4", "2", 0.2)).grade is None
    refused = TriageFinding(code="lumbar_spine.discs", label="", model_name="lumbar_spine.discs", evaluated=False)
    assert display_finding(refused).text.startswith("Disc degeneration and herniation not evaluated")


@pytest.mark.parametrize(
    ("same_level", "message"),
    [
        ("true", "same_level must be a table"),
        (
            '{ code = "spinal_stenosis", grades = ["severe"], min_probability = 0.3, level = "L4-L5" }',
            "unknown key 'level'",
        ),
        ('{ grades = ["severe"], min_probability = 0.3 }', "'code' is required"),
        ('{ code = "spinal_stenosis", min_probability = 1.5 }', "same_level.min_probability: must be between 0 and 1"),
        ('{ code = "spinal_stenosis", grades = "severe", min_probability = 0.3 }', "grades must be a list of strings"),
    ],
)
def test_a_bad_same_level_table_is_refused_with_its_key(same_level, message):
    import tomllib

    text = f"""
[[rule]]
id = "pair"
code = "disc_herniation"
min_probability = 0.5
priority = "URGENT"
weight = 10
why = "test"
same_level = {same_level}
"""
    with pytest.raises(PolicyError, match="rule\\[0\\]") as e:
        parse_policy(tomllib.loads(text), source="p.toml")
    assert message in str(e.value)
