"""CI's simulation budget: at least a million simulated decision-loop ticks of the real agents,
across seeds, under random faults, with no invariant violated (README, "Simulation and chaos").
A failure prints the failing seeds and the first one shrunk, with its trace and decisions;
`python -m tests.sim --seed S --steps 100000` replays it."""
import json
import os

from .__main__ import many
from .run import report, run, shrink

SEEDS = int(os.environ.get("BOBRY_SIM_SEEDS", "96"))
STEPS = int(os.environ.get("BOBRY_SIM_STEPS", "110000"))
MIN_TICKS = int(os.environ.get("BOBRY_SIM_MIN_TICKS", "1000000"))


def test_simulation_budget():
    totals = many(1, SEEDS, STEPS, jobs=2)
    print(json.dumps({k: v for k, v in totals.items() if k != "failures"}))
    if totals["failures"]:  # the first one shrunk and explained, as the CLI would
        seed = totals["failures"][0][0]
        best, skip = shrink(seed, STEPS, run(seed, STEPS), budget=15)
        lines = []
        report(best, skip, STEPS, out=lines.append)
        raise AssertionError("\n".join([str(totals["failures"]), *lines]))
    assert totals["ticks"] >= MIN_TICKS, totals["ticks"]
