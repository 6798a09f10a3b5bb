"""Findings as the triage policy and the web pages see them."""

from __future__ import annotations

from typing import Any

from worklists.triage import TriageFinding


def misgraded_acl(**kw: Any) -> TriageFinding:
    """The radiologist's case: P(tear) 0.98, the model names the grade "partial" (a complete tear misgraded)."""
    base: dict[str, Any] = dict(
        code="acl_tear",
        label="Partial ACL tear",
        model_name="knee.acl",
        probability=0.98,
        uncertainty=0.01,
        positive=True,
        grade="partial",
        grade_probabilities={"intact": 0.02, "partial": 0.71, "complete": 0.27},
    )
    return TriageFinding(**{**base, **kw})
