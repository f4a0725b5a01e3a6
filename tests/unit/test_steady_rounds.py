"""Longer rounds while all looks as it should (agent.round_period, db_steady): a database
node's decision loop and the probes wait STEADY_ROUNDS check intervals while the peers and the
primary are heard lately, nothing is to be done and the view holds, and one check interval
from the first round that finds otherwise."""
import dataclasses
import threading
import time

import pytest

import agent
from agent import DbObservation, Decision, View, db_steady, round_period
from tests.unit.test_operate_logic import lab_config

T = agent.Timing(check_interval=0.1, probe_timeout=0.25, fence_timeout=1.0, safety_margin=0.1,
                 failover_timeout=1.5, restart_grace=6.0)
NOW = 1000.0
LATELY, LATE = 0.34, 0.36  # seconds since last heard: within and past c + p (0.35)
VIEW = View(3, "pg1", "pg2", 7)
NONE = Decision("none", "all well")


def obs(view=VIEW, contact=None, primary_alive_at=NOW - 0.05, fenced=False,
        standby_seen_at=NOW - 0.9):
    return DbObservation(
        now=NOW, started_at=NOW - 100, pg="primary", pg_down_since=None,
        has_standby_signal=False, fenced=fenced, view=view,
        contact_at={"pg1": NOW - 0.05, "pg2": NOW - 0.05, "arb": NOW - 0.05, **(contact or {})},
        primary_alive_at=primary_alive_at, sync_names="pg2", standby_seen_at=standby_seen_at)


def steady(me, observed, decision=NONE, previous=VIEW):
    other = "pg2" if me == "pg1" else "pg1"
    return db_steady(me, other, "arb", observed, decision, previous, T)


def test_round_period():
    assert round_period(False, T) == pytest.approx(0.1)
    assert round_period(True, T) == pytest.approx(0.25)


def test_no_longer_rounds_where_they_would_delay_the_failover():
    """c + p + 2.5 c must stay within failover_timeout: the round after the last that found the
    primary heard lately must come before the primary is lost for failover_timeout."""
    slow = agent.Timing(check_interval=1.0, probe_timeout=0.2, fence_timeout=2.6,
                        safety_margin=0.1, failover_timeout=3.65, restart_grace=9.0)
    assert round_period(True, slow) == pytest.approx(1.0)
    edge = agent.Timing(check_interval=0.1, probe_timeout=0.25, fence_timeout=0.3,
                        safety_margin=0.01, failover_timeout=0.6, restart_grace=6.0)
    assert round_period(True, edge) == pytest.approx(0.25)
    assert round_period(True, dataclasses.replace(edge, failover_timeout=0.59)) == \
        pytest.approx(0.1)


@pytest.mark.parametrize("me", ["pg1", "pg2"])
def test_all_heard_lately_nothing_to_do_same_view_is_steady(me):
    assert steady(me, obs())
    assert steady(me, obs(contact={"pg1": NOW - LATELY, "pg2": NOW - LATELY,
                                   "arb": NOW - LATELY}, primary_alive_at=NOW - LATELY))


@pytest.mark.parametrize("me", ["pg1", "pg2"])
@pytest.mark.parametrize("peer", ["other", "arb"])
def test_a_peer_heard_late_or_never_is_not_steady(me, peer):
    name = peer if peer == "arb" else ("pg2" if me == "pg1" else "pg1")
    # the standby's contact with the primary, which calls it, lags one of the primary's calls
    lag = agent.steady_call_period(T) if (me, peer) == ("pg2", "other") else 0.0
    assert steady(me, obs(contact={name: NOW - LATELY - lag}))
    assert not steady(me, obs(contact={name: NOW - LATE - lag}))
    late = obs()
    del late.contact_at[name]
    assert not steady(me, late)


def test_the_standby_watches_the_primarys_signs_the_primary_does_not():
    assert not steady("pg2", obs(primary_alive_at=NOW - LATE))
    assert not steady("pg2", obs(primary_alive_at=None))
    assert steady("pg1", obs(primary_alive_at=None))  # its own signs: none to watch
    assert not steady("pg1", obs(view=View(4, "pg2", None, 8), primary_alive_at=None),
                      previous=View(4, "pg2", None, 8))  # replaced: pg2's signs count


@pytest.mark.parametrize("me", ["pg1", "pg2"])
def test_a_fenced_node_is_not_steady(me):
    """A fenced primary waits for the arbiter's word on its view: every round, to reopen at
    once."""
    assert not steady(me, obs(fenced=True))


def test_a_primary_whose_standby_replies_late_is_not_steady():
    """The standby's replies come every second; one older than 1.1 s (failover_timeout - 4 c,
    a primary's longer round) means every round, so that the drop from sync at 1.5 s is not
    late."""
    assert steady("pg1", obs(standby_seen_at=NOW - 1.09))
    assert not steady("pg1", obs(standby_seen_at=NOW - 1.11))
    assert not steady("pg1", obs(standby_seen_at=None))  # never: counted from the start
    assert steady("pg2", obs(standby_seen_at=None))  # a standby has no standby to watch


@pytest.mark.parametrize("me", ["pg1", "pg2"])
def test_something_to_do_or_a_new_view_is_not_steady(me):
    assert not steady(me, obs(), decision=Decision("set_sync", "the standby is back"))
    assert not steady(me, obs(), previous=None)  # the first round
    assert not steady(me, obs(), previous=View(3, "pg1", "pg2", 6))


class Probes(agent.World):
    """The primary's PostgreSQL as the probe sees it: answering as a primary or not at all.
    No fence: any use of it is recorded (these tests must not write the host's nftables)."""

    def __init__(self):
        super().__init__()
        self.answers = True
        self.probed = 0
        self.fence_calls = []

    def fence(self, pg_port):
        world = self

        class Untouched:
            def __getattr__(self, name):
                world.fence_calls.append(name)
                raise AssertionError(f"the fence was used: {name}")
        return Untouched()

    def call(self, cfg, key, peer, kind, body, timeout):
        raise OSError("not on the network in this test")

    def remote_postgres(self, cfg):
        world = self

        class Remote:
            def in_recovery(self, node, timeout):
                world.probed += 1
                if not world.answers:
                    raise OSError("no answer")
                return False
        return Remote()


@pytest.mark.parametrize("node", ["pg2", "arb"])
def test_the_probe_waits_longer_only_while_the_primary_is_heard_lately(tmp_path, node):
    cls = agent.ArbiterAgent if node == "arb" else agent.DbAgent
    world = Probes()
    a = cls(lab_config(tmp_path, node), b"k" * 32, world=world)
    c = a.cfg.timing.check_interval
    assert a.probe_step() == pytest.approx(
        round_period(True, a.cfg.timing, agent.QUIET_ROUNDS), abs=0.02)
    assert world.probed == 1
    world.answers = False
    a.observations.alive_at["pg1"] = a.clock() - LATE
    assert a.probe_step() <= c
    a.observations.alive_at["pg1"] = a.clock()  # its heartbeat, say: a sign of it
    assert a.probe_step() > c


def test_a_primary_probes_no_one_and_waits_half_a_failover_timeout(tmp_path):
    world = Probes()
    a = agent.DbAgent(lab_config(tmp_path, "pg1"), b"k" * 32, world=world)
    assert a.probe_step() == pytest.approx(a.cfg.timing.failover_timeout / 2, abs=0.02)
    assert world.probed == 0


def test_a_tick_is_judged_on_the_view_of_the_tick_before(tmp_path):
    a = agent.DbAgent(lab_config(tmp_path, "pg1"), b"k" * 32, world=Probes())
    a.note_round(obs(), NONE)
    assert not a.steady  # the first tick: no view before it
    a.note_round(obs(), NONE)
    assert a.steady
    a.note_round(obs(view=View(3, "pg1", "pg2", 8)), NONE)
    assert not a.steady  # a view learned since the tick before
    a.note_round(obs(view=View(3, "pg1", "pg2", 8)), NONE)
    assert a.steady


@pytest.mark.parametrize("me, rounds", [("pg1", agent.QUIET_ROUNDS),
                                       ("pg2", agent.QUIET_ROUNDS)])
def test_the_loop_waits_as_the_last_tick_found(tmp_path, me, rounds):
    """Both loops on the quiet rounds (a view learned, a switchover asked for wake them at
    once: the tests below)."""
    a = agent.DbAgent(lab_config(tmp_path, me), b"k" * 32, world=Probes())
    a.view = VIEW
    assert not a.steady and a.loop_period() == pytest.approx(a.cfg.timing.check_interval)
    a.steady = True
    assert a.loop_period() == pytest.approx(rounds * a.cfg.timing.check_interval)
    a.steady = False
    assert a.loop_period() == pytest.approx(a.cfg.timing.check_interval)


def test_a_view_learned_or_a_switchover_asked_for_wakes_the_loop(tmp_path):
    """The loop's longer rounds never delay what a view brings (a switchover's promotion, a
    handover) nor a switchover asked of the primary: each sets the loop's wake. A view that is
    not newer does not."""
    a = agent.DbAgent(lab_config(tmp_path, "pg2"), b"k" * 32, world=Probes())
    a.view = VIEW
    a.learn(VIEW.as_dict(), "arb")
    assert not a.wake.is_set()
    a.learn(View(4, "pg2", "pg1", 9).as_dict(), "arb")
    assert a.wake.is_set() and a.view.primary == "pg2"
    a.wake.clear()
    request, refusal = a.ask_switchover()
    assert request is not None and refusal is None and a.wake.is_set()


def test_run_routine_wakes_at_once_when_woken_during_or_between_steps():
    """World.run_routine: a wake set between two steps ends the wait at once, one set during a
    step makes the next come at once, and halting (stop, then wake) ends the routine without
    waiting out its round."""
    world, stop, wake = agent.World(), threading.Event(), threading.Event()
    steps = []

    def step():
        steps.append(time.monotonic())
        if len(steps) == 2:
            wake.set()  # during the step
        return 30.0

    runner = threading.Thread(target=world.run_routine, args=(stop, step, wake), daemon=True)
    runner.start()
    time.sleep(0.3)
    assert len(steps) == 1
    wake.set()
    time.sleep(0.3)
    assert len(steps) == 3 and steps[2] - steps[1] < 0.1 and steps[1] - steps[0] > 0.25
    stop.set()
    wake.set()
    runner.join(1)
    assert not runner.is_alive() and len(steps) == 3


def test_a_primarys_longer_loop_round_keeps_the_calls_on_theirs(tmp_path):
    a = agent.DbAgent(lab_config(tmp_path, "pg1"), b"k" * 32, world=Probes())
    a.view, a.steady = VIEW, True
    assert a.call_period(a.cfg.arbiter) == pytest.approx(
        agent.STEADY_ROUNDS * a.cfg.timing.check_interval)


def test_the_exchange_that_proves_contact_extends_the_lease_at_once(tmp_path):
    """No routine wakes for the lease: the heartbeat (or the server's handler) that brings the
    echo of our stamp extends it in the same step, and a node holding no lease writes none."""
    from tests.unit.test_review_findings_logic import Recorder
    primary = agent.DbAgent(lab_config(tmp_path / "p", "pg1"), b"k" * 32, world=Probes())
    assert "lease" not in {name for name, _ in primary.routines()}
    primary.fence = Recorder()
    primary.view, primary.pg_state, primary.fenced = VIEW, "primary", False
    primary.lease_mode, primary.lease_until = "primary", primary.clock() + 0.3
    said_at = primary.clock()
    echo = primary.status_body("pg2")  # what pg2 heard from us, echoed in its reply
    reply = {"pg": "standby", "fenced": False, "view": VIEW.as_dict(), "stamp": 5.0,
             "boot": "b", "echo": {k: echo[k] for k in ("stamp", "boot", "pg", "fenced")}}
    primary.note_status("pg2", reply, primary.clock())
    assert primary.fence.lease_left == pytest.approx(
        said_at + T.fence_timeout - primary.clock(), abs=0.02)
    assert primary.lease_until == pytest.approx(said_at + T.fence_timeout, abs=0.02)
    standby = agent.DbAgent(lab_config(tmp_path / "s", "pg2"), b"k" * 32, world=Probes())
    standby.note_status("pg1", {**reply, "pg": "primary"}, standby.clock())
    assert standby.world.fence_calls == []  # holds none: nothing written


@pytest.mark.parametrize("me", ["pg1", "pg2"])
def test_a_database_node_calls_its_peers_on_its_loops_rounds(tmp_path, me):
    """Both peers on the longer rounds while the last tick found all well, every round from a
    tick that did not; and never at a period whose longest interval (with the slot's slack)
    reaches c + p, where the called side's fallback would start calling too."""
    a = agent.DbAgent(lab_config(tmp_path, me), b"k" * 32, world=Probes())
    arb, other = a.cfg.arbiter, a.other
    c = a.cfg.timing.check_interval
    assert a.call_period(arb) == pytest.approx(c)  # no tick yet
    a.steady = True
    for peer in (arb, other):
        assert a.call_period(peer) == pytest.approx(agent.STEADY_ROUNDS * c)
    a.steady = False
    assert a.call_period(other) == pytest.approx(c)
    a.steady = True
    edge = (agent.STEADY_ROUNDS * (1 + agent.SLOT_SLACK) - 1) * c  # p where 2.75 c = c + p
    for p, period in ((edge * 1.01, agent.STEADY_ROUNDS * c), (edge, c)):
        a.cfg = dataclasses.replace(a.cfg, timing=dataclasses.replace(a.cfg.timing,
                                                                      probe_timeout=p))
        assert a.call_period(arb) == pytest.approx(period)


def test_the_steady_call_period_keeps_the_liveness_bounds():
    """The loop's longer round, unless its longest interval (1 + SLOT_SLACK of it) reaches
    c + p (the called side's fallback) or, with a reply as slow as p, fence_timeout (a
    healthy primary's lease would lapse between two anchors)."""
    assert agent.steady_call_period(T) == pytest.approx(agent.STEADY_ROUNDS * T.check_interval)
    longest = agent.STEADY_ROUNDS * T.check_interval * (1 + agent.SLOT_SLACK)
    slow = dataclasses.replace(T, probe_timeout=longest - T.check_interval)
    assert agent.steady_call_period(slow) == pytest.approx(T.check_interval)
    assert agent.steady_call_period(dataclasses.replace(
        slow, probe_timeout=slow.probe_timeout * 1.01)) == pytest.approx(longest / 1.1)
    # c = 0.1, p = 0.45, fence 0.6: c + p < fence, and 0.275 < c + p, but 0.275 + p > fence
    tight = dataclasses.replace(T, probe_timeout=0.45, fence_timeout=0.6)
    assert agent.steady_call_period(tight) == pytest.approx(T.check_interval)
    assert agent.steady_call_period(dataclasses.replace(tight, fence_timeout=0.73)) == \
        pytest.approx(agent.STEADY_ROUNDS * T.check_interval)


def test_a_call_without_its_reply_brings_every_call_back_to_every_round(tmp_path):
    """While a heartbeat this node started last has failed, its calls to every peer go every
    check_interval: the primary's lease, resting on the other peer alone, gets its anchors
    every round again before the loop's next tick."""
    a = agent.DbAgent(lab_config(tmp_path, "pg1"), b"k" * 32, world=Probes())
    other, arb = a.peers()
    c = a.cfg.timing.check_interval
    a.steady = True
    a.calls_failing.add(other.name)
    assert a.call_period(arb) == pytest.approx(c)
    assert a.call_period(other) == pytest.approx(c)
    a.calls_failing.discard(other.name)
    assert a.call_period(arb) == pytest.approx(agent.STEADY_ROUNDS * c)


class Clock:
    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


@pytest.mark.parametrize("period", [0.1, 0.25])
def test_calls_to_the_peers_share_the_periods_slot(tmp_path, period):
    """Every peer is called on the period's slot: a primary's two calls come together,
    whatever moment each routine started at, and stay there; a call that began a little late
    or a hair early keeps its slot."""
    a = agent.DbAgent(lab_config(tmp_path, "pg1"), b"k" * 32, world=Probes())
    other, arb = a.peers()
    base = 123456.789  # a monotonic clock far from 0, as a host's is
    a.clock = clock = Clock(base)
    starts = {}
    for peer, began in ((other, base + 0.0123), (arb, base + 0.0271)):
        calls = [began]
        for _ in range(40):
            clock.now = calls[-1] + 0.0004  # the call took 0.4 ms
            calls.append(clock.now + a._until_slot(calls[-1], period))
        gaps = [b - c for c, b in zip(calls[1:], calls[2:])]
        assert gaps == pytest.approx([period] * len(gaps), abs=1e-9)
        assert period * agent.SLOT_SLACK < calls[1] - calls[0] <= period
        starts[peer.name] = calls[-1]
    assert starts["arb"] == pytest.approx(starts[other.name], abs=1e-9)
    slot = starts["arb"] + period
    for jitter in (-0.5 * agent.SLOT_SLACK * period, 0.0, 0.003, 0.4 * period):
        clock.now = slot + jitter + 0.0004
        assert clock.now + a._until_slot(slot + jitter, period) == \
            pytest.approx(slot + period, abs=1e-9)


def test_a_late_call_waits_at_most_a_slack_longer(tmp_path):
    """A call that began past its slot's slack, or took longer than its period (a timeout):
    the next one comes on the slot after, no later than (1 + SLOT_SLACK) periods after it
    began, and never in the past."""
    a = agent.DbAgent(lab_config(tmp_path, "pg1"), b"k" * 32, world=Probes())
    a.clock = clock = Clock(5000.0)
    period = 0.25
    slot = 5000.0  # a multiple of the period: the slot
    for late in (0.05, 0.2, 0.249, 0.3):
        began = slot + late
        for took in (0.0004, 0.25, 0.6):
            clock.now = began + took
            wait = a._until_slot(began, period)
            assert wait >= 0
            assert clock.now + wait <= max(began + (1 + agent.SLOT_SLACK) * period, clock.now)
            if wait:
                assert (clock.now + wait - slot) % period == pytest.approx(0, abs=1e-9) or \
                    (clock.now + wait - slot) % period == pytest.approx(period, abs=1e-9)


class Peers(Probes):
    """Peers that answer a heartbeat in 0.4 ms, or (failing) refuse it at once, on the test's
    clock; every call's moment is recorded."""

    def __init__(self, clock):
        super().__init__()
        self.clock, self.failing, self.calls = clock, set(), []

    def call(self, cfg, key, peer, kind, body, timeout):
        self.calls.append((round(self.clock.now, 6), peer.name))
        if peer.name in self.failing:
            raise ConnectionRefusedError("refused")
        self.clock.now += 0.0004
        return {"pg": "standby" if peer.name != "arb" else "none", "fenced": False}


class Heartbeats:
    """The node's heartbeat routines on the test's clock, as World.run_routine runs them,
    from moments 10 ms apart."""

    def __init__(self, a, clock):
        self.a, self.clock = a, clock
        self.peers = {peer.name: peer for peer in a.peers()}
        self.due = {name: clock.now + 0.01 * i for i, name in enumerate(self.peers)}

    def run(self, until):
        while True:
            name = min(self.due, key=self.due.get)
            if self.due[name] >= until:
                return
            self.clock.now = max(self.clock.now, self.due[name])
            self.due[name] = self.clock.now + self.a.heartbeat_step(self.peers[name])


def test_a_steady_primary_calls_both_peers_together_every_longer_round(tmp_path):
    """Through heartbeat_step: on the loop's longer rounds, the two peers' calls on the same
    slot; once a call fails, every call every check_interval, from the other peer's next
    call on."""
    clock = Clock(7777.0)
    world = Peers(clock)
    a = agent.DbAgent(lab_config(tmp_path, "pg1"), b"k" * 32, world=world)
    a.clock, a.view, a.steady = clock, VIEW, True
    c, long = a.cfg.timing.check_interval, agent.steady_call_period(a.cfg.timing)
    routines = Heartbeats(a, clock)
    routines.run(7779.0)
    times = {name: [t for t, n in world.calls if n == name] for name in ("pg2", "arb")}
    for name in times:
        gaps = [b - t for t, b in zip(times[name][1:], times[name][2:])]
        assert gaps == pytest.approx([long] * len(gaps), abs=1e-6)
    assert abs(times["arb"][-1] - times["pg2"][-1]) < 1e-3  # the first call took 0.4 ms
    world.failing.add("pg2")
    world.calls.clear()
    failed_at = clock.now
    routines.run(failed_at + 2.0)
    arb = [t for t, n in world.calls if n == "arb"]
    assert arb[1] - arb[0] <= long * (1 + agent.SLOT_SLACK) + 1e-6
    gaps = [b - t for t, b in zip(arb[1:], arb[2:])]
    assert max(gaps) == pytest.approx(c, abs=1e-3)  # every round, on its slot
    assert a.calls_failing == {"pg2"}
    world.failing.clear()
    routines.run(clock.now + 1.0)
    assert a.calls_failing == set()


def test_quiet_rounds_that_do_not_fit_fall_back_to_the_steady_ones():
    """Where c + p + 4 c passes failover_timeout but c + p + 2.5 c does not, the probes and a
    primary's loop wait 2.5 rounds, not every round."""
    tight = dataclasses.replace(T, failover_timeout=0.7)
    assert round_period(True, tight, agent.QUIET_ROUNDS) == pytest.approx(0.25)
    assert round_period(True, T, agent.QUIET_ROUNDS) == pytest.approx(0.4)
    assert round_period(True, dataclasses.replace(T, failover_timeout=0.59),
                        agent.QUIET_ROUNDS) == pytest.approx(0.1)


def test_a_primary_waits_quiet_rounds_only_where_its_standbys_replies_have_room():
    """Replies come every second: a primary's round after next must come before one is
    failover_timeout old, with 0.1 s to spare. At c = 0.15 and failover_timeout 1.5, four
    rounds leave 0.9 s: the primary waits 2.5 rounds, and a reply 1.1 s old keeps it steady
    (at four rounds it never would be)."""
    assert agent.primary_rounds(T) == agent.QUIET_ROUNDS  # 1.5 - 0.4 = 1.1: just fits
    slow = agent.Timing(check_interval=0.15, probe_timeout=0.25, fence_timeout=0.8,
                        safety_margin=0.1, failover_timeout=1.5, restart_grace=6.0)
    agent.check_timing("agent.ini", slow)  # a valid configuration
    assert agent.primary_rounds(slow) == agent.STEADY_ROUNDS
    observed = obs(standby_seen_at=NOW - 1.1)
    assert db_steady("pg1", "pg2", "arb", observed, NONE, VIEW, slow)
    assert not db_steady("pg1", "pg2", "arb", obs(standby_seen_at=NOW - 1.13), NONE, VIEW,
                         slow)
