"""The simulator's fibers and the timing sweep's runs (tests/sim/sweep.py): seeded, and with
fibers no step waits longer than it asked, however many block at once."""
import socket
import sys

from . import sweep, world
from .run import run

sys.setrecursionlimit(20000)

TODAY = sweep.CANDIDATES["today"]


def test_fibers_replay_exactly():
    a, b = run(11, 8000, fibers=True), run(11, 8000, fibers=True)
    assert (a.steps, a.ticks, a.applied, list(a.cluster.traces)) == \
        (b.steps, b.ticks, b.applied, list(b.cluster.traces))
    assert a.violation is None


def overruns(monkeypatch):
    """How far past its timeout each peer call returned."""
    late = []
    call = world.SimWorld.call

    def timed(self, cfg, key, peer, kind, body, timeout):
        began = self.sched.now
        try:
            return call(self, cfg, key, peer, kind, body, timeout)
        except socket.timeout:
            late.append(self.sched.now - began - timeout)
            raise
    monkeypatch.setattr(world.SimWorld, "call", timed)
    return late


def test_under_loss_fibers_never_outlast_their_timeout(monkeypatch):
    late = overruns(monkeypatch)
    sweep.jitter_run(1, TODAY, 30, {"pause_fraction": 0.0, "spike_max": 0.0})
    assert late and max(late) < 0.03  # at most the slow host's wait for a core


def test_jitter_and_failover_runs_replay_exactly():
    jitter = sweep.jitter_run(2, TODAY, 20)
    assert jitter == sweep.jitter_run(2, TODAY, 20)
    assert 0 < jitter["lease_low_s"] < TODAY.fence_timeout + TODAY.safety_margin
    assert 0 < jitter["primary_silent_s"] < TODAY.failover_timeout
    first = sweep.failover_run(3, TODAY)
    assert first == sweep.failover_run(3, TODAY)
    # 1.99-2.28 s over seeds 1-20 (a standby's loop acts on the grant the moment it learns it)
    assert first["violation"] is None and 1.8 <= first["failover_s"] < 3.0


def test_the_lab_probe_waits_out_its_deadline_and_the_silent_host():
    """As measured in the lab (README: failover_s about 3.05 s): the insert in flight at the
    cut waits for its 1 s deadline, then libpq waits 2 s on the isolated primary before it
    tries the new one."""
    probe = sweep.failover_run(3, TODAY, probe=True)
    assert probe["violation"] is None and 2.9 <= probe["failover_s"] <= 3.2
    quick = sweep.failover_run(3, TODAY, probe={"deadline": 0.5, "connect_timeout": 0.3})
    assert quick["failover_s"] < 2.5
