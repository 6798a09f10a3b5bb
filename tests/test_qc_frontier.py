"""The QC gate's out-of-source trade-off (`models.qc_evaluation.frontier`): for each acceptance of served anatomy,
the most refusing rule and both rates, as `msknode evaluate qc.anatomy --loso` and the model card report it."""

from __future__ import annotations

import numpy as np
import pytest

from models.qc_evaluation import frontier, frontier_table

pytestmark = pytest.mark.unit


def table(support_in: list[float], support_other: list[float]) -> dict[str, np.ndarray]:
    """Claims that differ only in P(claimed anatomy): served-anatomy claims, then other-anatomy claims."""
    n_in, n_other = len(support_in), len(support_other)
    n = n_in + n_other
    return {
        "fold": np.array(["f"] * n),
        "source": np.array(["a"] * n_in + ["b"] * n_other),
        "kind": np.array(["real_in"] * n_in + ["real_other"] * n_other),
        "key": np.array([str(i) for i in range(n)]),
        "rival": np.zeros(n),
        "other_plane": np.zeros(n),
        "support": np.array(support_in + support_other),
        "ratio": np.zeros(n),
    }


def test_refusing_more_unseen_anatomy_costs_acceptance_and_the_curve_says_how_much():
    # 20 served-anatomy claims with P(claimed) 0.05..1.0, 10 other-anatomy claims with 0.02..0.47
    t = table([0.05 * k for k in range(1, 21)], [0.02 + 0.05 * k for k in range(10)])
    pts = {p["accept_at_least"]: p for p in frontier(t)}
    # accepting 19 of 20 served claims allows support 0.1: the two other claims below it are refused
    assert pts[0.95]["accepted"] == 0.95 and pts[0.95]["refused"] == pytest.approx(0.2)
    assert pts[0.8]["accepted"] >= 0.8 and pts[0.8]["refused"] == pytest.approx(0.5)
    refused = [pts[a]["refused"] for a in sorted(pts, reverse=True)]
    assert refused == sorted(refused) and refused[0] < refused[-1]
    for p in pts.values():
        assert p["rule"]["support"] > 0 and set(p["rule"]) == {"contradiction", "plane", "support", "ood_ratio"}
    rows = frontier_table(list(pts.values()))["rows"]
    assert len(rows) == len(pts) and rows[0][0] == "0.97"


def test_separable_claims_reach_both_targets():
    t = table([0.9] * 20, [0.1] * 10)
    best = {p["accept_at_least"]: p for p in frontier(t)}[0.97]
    assert (best["accepted"], best["refused"]) == (1.0, 1.0)
