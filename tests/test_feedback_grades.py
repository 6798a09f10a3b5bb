"""Readers' answers on graded scales: which answers count as a positive finding, and what the model said.

A Pfirrmann grade I or II disc is not degenerated (the disc model's finding is positive from grade III),
so a reader answering "2" disagrees with a grade-4 call as a negative, and agrees with a grade-2 call
in kind; the dashboard's confusion table (worklists.monitoring) counts these answers.
"""

from __future__ import annotations

import pytest

from node.db.schema import Finding
from worklists import feedback

pytestmark = pytest.mark.unit


def disc(grade: str, positive: bool) -> Finding:
    probs = {str(g): 0.05 for g in range(1, 6)}
    probs[grade] = 0.8
    return Finding(
        code="disc_degeneration",
        level="L4-L5",
        grade=grade,
        positive=positive,
        details={"grade_probabilities": probs},
    )


def test_pfirrmann_one_and_two_are_negative_answers_three_to_five_positive():
    f = disc("4", True)
    scale = feedback.scale_of(f)
    assert scale == ("1", "2", "3", "4", "5")
    assert [feedback.is_positive_answer(f.code, scale, a) for a in scale] == [False, False, True, True, True]


@pytest.mark.parametrize(("grade", "positive"), [("1", False), ("2", False), ("3", True), ("5", True)])
def test_the_model_answer_is_its_pfirrmann_grade_negative_or_positive(grade, positive):
    f = disc(grade, positive)
    assert feedback.ai_answer(f, feedback.scale_of(f)) == grade


def test_other_scales_keep_one_normal_class():
    f = Finding(code="spinal_stenosis", level="L4-L5", grade="mild", positive=True, details=None)
    scale = feedback.scale_of(f)
    assert [feedback.is_positive_answer(f.code, scale, a) for a in scale] == [False, True, True, True]
    assert (
        feedback.ai_answer(Finding(code="acl_tear", positive=False, details=None), ("intact", "partial", "complete"))
        == "intact"
    )
    assert (
        feedback.ai_answer(
            Finding(code="acl_tear", positive=True, grade=None, details=None), ("intact", "partial", "complete")
        )
        == "complete"
    )
