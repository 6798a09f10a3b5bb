"""The attack suite's folder marks its tests (so ``pytest -m attack`` selects exactly them)."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.unit]


def test_tests_in_this_folder_carry_the_attack_marker(request):
    assert request.node.get_closest_marker("attack") is not None
