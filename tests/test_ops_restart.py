"""Restart with backoff, the policy of msknode serve's parts and of the listener processes."""

from __future__ import annotations

import pytest

from node.ops.restart import RestartBackoff

pytestmark = pytest.mark.unit


def test_delays_double_up_to_the_cap_and_reset_after_a_stable_run():
    b = RestartBackoff(max_delay=30.0, stable_seconds=60.0)
    assert not b.waiting and not b.due(0.0)
    delays = []
    t = 0.0
    for _ in range(7):
        delays.append(b.exited(t, started_at=t - 1.0))
        assert b.waiting and not b.due(t) and b.due(t + delays[-1])
        b.started()
        t += 100.0
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert b.exited(t, started_at=t - 61.0) == 1.0  # ran a minute: the count starts again


def test_without_stable_seconds_the_count_never_resets():
    b = RestartBackoff(stable_seconds=None)
    assert [b.exited(0.0, started_at=-1e6) for _ in range(3)] == [1.0, 2.0, 4.0]
