"""The simulator's model of the loop's wake (SimWake, Cluster.run_as) behaves as
World.run_routine does for the real agent: a wake brings a waiting step forward to now, a wake
set during a step makes the next come at once, and the step's own schedule is dropped (never
run twice)."""
from .cluster import Cluster
from .world import SimWake


def test_a_wake_brings_the_waiting_step_forward_and_one_during_a_step_repeats_it():
    c = Cluster(1, fibers=False)
    node = c.nodes["pg1"]
    node.alive = True  # a process that runs only this step: no agent started
    wake, steps = SimWake(), []

    def step():
        steps.append(round(c.sched.now, 6))
        if len(steps) == 2:
            wake.set()  # during the step
        return 10.0

    c.run_as("pg1", node.inc, 0.1, step, "loop", repeat=True, wake=wake)
    c.sched.at(0.5, wake.set)
    c.sched.run_until(30.0)
    # at 0.1; woken at 0.5; again at once (set during that step); then its own 10 s rounds,
    # not also the 10.1 s the first step had asked for
    assert steps == [0.1, 0.5, 0.5, 10.5, 20.5]
