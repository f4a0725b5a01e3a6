"""CI's simulation budget: at least a million simulated decision-loop ticks of the real agents,
across seeds, under random faults, with no invariant violated (README, "Simulation and chaos").
A failure prints the seed; `python -m tests.sim --seed S --steps 200000` replays and shrinks it."""
import json
import os

from .__main__ import many

SEEDS = int(os.environ.get("BOBRY_SIM_SEEDS", "84"))
STEPS = int(os.environ.get("BOBRY_SIM_STEPS", "100000"))
MIN_TICKS = int(os.environ.get("BOBRY_SIM_MIN_TICKS", "1000000"))


def test_simulation_budget():
    totals = many(1, SEEDS, STEPS, jobs=2)
    print(json.dumps({k: v for k, v in totals.items() if k != "failures"}))
    assert not totals["failures"], totals["failures"]
    assert totals["ticks"] >= MIN_TICKS, totals["ticks"]
