"""How a finding, a QC refusal and a time are written: one function each, used by every view.

`worklists.triage.display_finding` (the worklist chips, the study page, the triage reasons and the
API's ``display``), `worklists.triage.qc_sentence` (QC reason codes in words) and
`node.web.queries.display_time` (the site's zone, 24-hour, ISO-like date).
"""

from __future__ import annotations

import datetime as dt
import re
from zoneinfo import ZoneInfo

import pytest

from node.web.queries import display_time
from support.findings import misgraded_acl
from worklists.triage import (
    DEFAULT_POLICY_PATH,
    QC_SENTENCES,
    TriageFinding,
    compute,
    display_finding,
    finding_name,
    load_policy,
    percent,
    qc_sentence,
)

pytestmark = pytest.mark.unit

BERLIN = ZoneInfo("Europe/Berlin")


# ---- the headline number and the grade split --------------------------------------------------


def test_headline_is_the_probability_of_the_finding_with_the_grade_split_beside_it():
    d = display_finding(misgraded_acl())
    assert d.probability == pytest.approx(0.98)  # P(tear of any grade), not P(partial)
    assert d.grades == (("partial", 0.71), ("complete", 0.27))  # positive grades, most probable first
    assert d.short == "ACL tear 98 %"
    assert d.text == "ACL tear 98 % (partial 71 %, complete 27 %)"
    assert d.name == "ACL tear" and d.grade == "partial"
    assert d.as_dict()["probability_text"] == "98 %"
    assert [g["text"] for g in d.as_dict()["grades"]] == ["71 %", "27 %"]


def test_the_name_never_carries_a_grade_or_a_model_name():
    # the models label a finding by its grade ("Complete ACL tear", "L4-L5: severe central canal stenosis");
    # a refused model is recorded under its own name; the display name is the finding's
    assert finding_name("acl_tear", "Complete ACL tear") == "ACL tear"
    assert finding_name("knee.acl", "knee.acl: not evaluated (motion)", "knee.acl") == "ACL tear"
    assert finding_name("spinal_stenosis", "L4-L5: severe central canal stenosis") == "Central canal stenosis"
    assert finding_name("superres", "Super-resolution not done (wrong_orientation)") == "Super-resolution"
    assert finding_name("site_code", "Site finding") == "Site finding"  # unknown codes keep their label


def test_levels_negatives_and_findings_without_a_headline():
    level = TriageFinding(
        code="spinal_stenosis",
        label="L4-L5: severe central canal stenosis",
        probability=0.95,
        positive=True,
        grade="severe",
        level="L4-L5",
        grade_probabilities={"normal": 0.05, "mild": 0.04, "moderate": 0.06, "severe": 0.85},
    )
    assert display_finding(level).text == "Central canal stenosis L4-L5 95 % (severe 85 %, moderate 6 %, mild 4 %)"
    negative = TriageFinding(
        code="acl_tear",
        label="No ACL tear",
        probability=0.04,
        positive=False,
        grade=None,
        grade_probabilities={"intact": 0.96, "partial": 0.03, "complete": 0.01},
    )
    d = display_finding(negative)
    assert d.short == "ACL tear 4 %" and d.grade is None
    # no headline recorded: the sum of the positive grades
    assert (
        display_finding(
            TriageFinding(
                code="acl_tear",
                label="x",
                probability=None,
                grade_probabilities={"intact": 0.4, "partial": 0.35, "complete": 0.25},
            )
        ).short
        == "ACL tear 60 %"
    )
    # one positive grade is the headline itself: no split
    assert (
        display_finding(
            TriageFinding(
                code="x", label="Effusion", probability=0.7, grade_probabilities={"none": 0.3, "effusion": 0.7}
            )
        ).text
        == "Effusion 70 %"
    )


@pytest.mark.parametrize(
    "p, text",
    [
        (None, "n/a"),
        (0.0, "<1 %"),
        (0.004, "<1 %"),
        (0.005, "1 %"),
        (0.5, "50 %"),
        (0.984, "98 %"),
        (0.994, "99 %"),
        (0.995, ">99 %"),
        (1.0, ">99 %"),
    ],
)
def test_percent_never_claims_certainty(p, text):
    assert percent(p) == text


def test_the_reasons_write_the_finding_exactly_as_the_pages_do():
    policy = load_policy(DEFAULT_POLICY_PATH)
    f = misgraded_acl()
    s = compute([f], policy)
    text = display_finding(f).text
    assert all(text in r for r in s.reasons[:2]), s.reasons
    assert not any(re.search(r"\bP \d\.\d\d\b|\d\.\d\d >=", r) for r in s.reasons)  # no "P 1.00" beside "98 %"
    assert all(r.isascii() for r in s.reasons)  # they also go into the DICOM SR


# ---- QC reasons in words -------------------------------------------------------------------------


def test_every_qc_reason_code_of_the_gate_has_words_that_name_no_plane_or_anatomy():
    from models.qc import REASONS

    assert set(REASONS) <= set(QC_SENTENCES)
    banned = re.compile(r"\b(sagittal|coronal|axial|knee|shoulder|spine|lumbar|hip|elbow|brain)\b", re.I)
    for code, sentence in QC_SENTENCES.items():
        assert sentence and "_" not in sentence and not banned.search(sentence), (code, sentence)
    assert qc_sentence("wrong_orientation") == "the quality check judged the slice orientation unsuitable for the model"
    assert qc_sentence("new_check") == "the series did not pass the image quality check (new check)"
    assert qc_sentence(None) == "no reason was recorded"


def test_a_refusal_is_written_once_in_words_without_the_gate_message():
    policy = load_policy(DEFAULT_POLICY_PATH)
    sr = TriageFinding(
        code="superres",
        label="Super-resolution not done (wrong_orientation)",
        model_name="superres",
        evaluated=False,
        qc_reason="wrong_orientation",
    )
    acl = TriageFinding(
        code="knee.acl",
        label="knee.acl: not evaluated (wrong_orientation)",
        model_name="knee.acl",
        evaluated=False,
        qc_reason="wrong_orientation",
    )
    s = compute([sr, sr, acl], policy)
    assert s.reasons[:2] == (
        "ACL tear not evaluated: the quality check judged the slice orientation unsuitable for the model"
        " - needs human review",
        "Super-resolution not done: the quality check judged the slice orientation unsuitable for the model"
        " - does not change the priority",
    )
    for r in s.reasons:
        assert "wrong_orientation" not in r and r.count("not done") <= 1 and "coronal" not in r


# ---- times -------------------------------------------------------------------------------------------


def test_times_are_the_site_zone_24_hour_iso_like():
    evening = dt.datetime(2025, 1, 15, 17, 46, 39, tzinfo=dt.UTC)  # 18:46:39 in Berlin (CET)
    assert display_time(evening, BERLIN, seconds=True) == "2025-01-15 18:46:39"
    assert display_time(evening, BERLIN) == "2025-01-15 18:46"
    summer = dt.datetime(2025, 7, 1, 22, 30, tzinfo=dt.UTC)  # CEST, past midnight
    assert display_time(summer, BERLIN) == "2025-07-02 00:30"
    # what the API returns (ISO 8601 with any offset), and naive node times (UTC)
    assert display_time("2025-01-15T17:46:39+00:00", BERLIN, seconds=True) == "2025-01-15 18:46:39"
    assert display_time("2025-01-15T12:46:39-05:00", BERLIN, seconds=True) == "2025-01-15 18:46:39"
    naive = dt.datetime(2025, 1, 15, 17, 46, 39)  # noqa: DTZ001 - a naive node time is UTC
    assert display_time(naive, BERLIN, seconds=True) == "2025-01-15 18:46:39"
    assert display_time(None, BERLIN) == "—" and display_time("", BERLIN) == "—"
    assert "PM" not in display_time(evening, ZoneInfo("America/New_York"), seconds=True)
