"""Each finding of the review (issue 8) as a simulator scenario: it passes on today's agent,
and fails, with the violation named, on the code before its fix (put back by monkeypatching,
see scenarios.py)."""
import sys

import pytest

from .scenarios import SCENARIOS, run_scenario

sys.setrecursionlimit(20000)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario_holds_on_todays_agent(name):
    r = run_scenario(name)
    assert r.violation is None, r.violation


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario_fails_on_the_code_before_its_fix(name):
    r = run_scenario(name, old=True)
    assert r.violation is not None, f"{name}: the old code passed"
    assert r.violation[1] in SCENARIOS[name].expect, r.violation

