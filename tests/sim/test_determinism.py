"""A seed is a run: the same seed replays the same steps, faults, decisions and figures."""
import sys

from .run import run

sys.setrecursionlimit(20000)


def fingerprint(r):
    return (r.steps, r.ticks, r.sim_s, r.faults, r.writes, r.acked, r.grants, r.handovers,
            r.violation, r.applied, list(r.cluster.traces))


def test_a_seed_replays_exactly():
    assert fingerprint(run(11, 30000)) == fingerprint(run(11, 30000))


def test_seeds_differ():
    assert run(11, 30000).applied != run(12, 30000).applied


def test_a_left_out_fault_leaves_the_others_in_place():
    full = run(13, 30000)
    skipped = run(13, 30000, skip={0})
    assert [a[2] for a in full.applied[1:5]] == [a[2] for a in skipped.applied[:4]]
