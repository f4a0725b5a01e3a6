"""CI's simulation budget: at least 15 simulated hours of the real agents and 12 000 random
faults, across seeds, with no invariant violated (README, "Simulation and chaos"). Counted in
time and faults, not decision-loop ticks: a loop that finds all well waits STEADY_ROUNDS
rounds, so the same hours take fewer ticks.
A failure prints the failing seeds and the first one shrunk, with its trace and decisions;
`python -m tests.sim --seed S --steps 100000` replays it."""
import json
import os

from .__main__ import many
from .run import report, run, shrink

SEEDS = int(os.environ.get("BOBRY_SIM_SEEDS", "96"))
STEPS = int(os.environ.get("BOBRY_SIM_STEPS", "62000"))  # 16.7 h, 14 978 faults on 4ecdf3c
MIN_HOURS = float(os.environ.get("BOBRY_SIM_MIN_HOURS", "15"))
MIN_FAULTS = int(os.environ.get("BOBRY_SIM_MIN_FAULTS", "12000"))


def test_simulation_budget():
    totals = many(1, SEEDS, STEPS, jobs=2)
    print(json.dumps({k: v for k, v in totals.items() if k != "failures"}))
    if totals["failures"]:  # the first one shrunk and explained, as the CLI would
        seed = totals["failures"][0][0]
        best, skip = shrink(seed, STEPS, run(seed, STEPS), budget=15)
        lines = []
        report(best, skip, STEPS, out=lines.append)
        raise AssertionError("\n".join([str(totals["failures"]), *lines]))
    assert totals["sim_hours"] >= MIN_HOURS, totals["sim_hours"]
    assert totals["faults_total"] >= MIN_FAULTS, totals["faults_total"]
