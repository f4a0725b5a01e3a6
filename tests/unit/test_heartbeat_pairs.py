"""One heartbeat exchange per pair of nodes and round while the cluster is healthy
(agent.calls_peer): who starts it, and the fallback -- the answering side calls too once the
peer's requests stop (a one-way fault, views that disagree) -- and that the agents' routines
follow the rule."""
import math

import pytest

import agent
from agent import View, calls_peer
from tests.unit.test_operate_logic import lab_config

T = agent.Timing(check_interval=0.1, probe_timeout=0.25, fence_timeout=1.0, safety_margin=0.1,
                 failover_timeout=1.5, restart_grace=6.0)
FRESH, STALE = 0.3, 0.4  # seconds since the peer's last request: within and past c + p (0.35)

# (me, peer, the view's primary) -> whether me calls peer while peer's requests keep coming
DESIGNATED = {
    ("pg1", "arb", "pg1"): True, ("pg1", "arb", "pg2"): True,
    ("pg2", "arb", "pg1"): True, ("pg2", "arb", "pg2"): True,
    ("pg1", "pg2", "pg1"): True, ("pg1", "pg2", "pg2"): False,
    ("pg2", "pg1", "pg1"): False, ("pg2", "pg1", "pg2"): True,
    ("arb", "pg1", "pg1"): False, ("arb", "pg1", "pg2"): False,
    ("arb", "pg2", "pg1"): False, ("arb", "pg2", "pg2"): False,
}


@pytest.mark.parametrize("me,peer,primary", sorted(DESIGNATED))
def test_who_calls_while_the_peer_calls(me, peer, primary):
    assert calls_peer(me, peer, View(3, primary, None), "arb", FRESH, T) is \
        DESIGNATED[(me, peer, primary)]


@pytest.mark.parametrize("me,peer,primary", sorted(DESIGNATED))
def test_everyone_calls_a_peer_whose_requests_stopped(me, peer, primary):
    view = View(3, primary, None)
    assert calls_peer(me, peer, view, "arb", STALE, T)
    assert calls_peer(me, peer, view, "arb", math.inf, T)  # never heard: at the start


def test_two_views_naming_each_other_primary_still_exchange():
    """pg1 learned that pg2 is the primary (a handover), pg2 has not: neither is the
    designated caller of the pair, and both call once the other's requests have stopped."""
    pg1_view, pg2_view = View(4, "pg2", None), View(3, "pg1", "pg2")
    assert not calls_peer("pg1", "pg2", pg1_view, "arb", FRESH, T)
    assert not calls_peer("pg2", "pg1", pg2_view, "arb", FRESH, T)
    assert calls_peer("pg1", "pg2", pg1_view, "arb", STALE, T)
    assert calls_peer("pg2", "pg1", pg2_view, "arb", STALE, T)


class Recorder(agent.World):
    def __init__(self):
        super().__init__()
        self.called = []

    def call(self, cfg, key, peer, kind, body, timeout):
        self.called.append(peer.name)
        raise OSError("not on the network in this test")


def _steps(node):
    node.world.called.clear()
    for peer in node.peers():
        t, before = node.cfg.timing, len(node.world.called)
        wait = node.heartbeat_step(peer)
        called = len(node.world.called) > before
        # a caller's next call is on its slot: at most 1 + SLOT_SLACK periods after this one
        assert 0 <= wait <= ((1 + agent.SLOT_SLACK) * t.check_interval if called else
                             t.check_interval + t.probe_timeout + node.FALLBACK_LAG)
    return node.world.called


def _request_from(node, sender):
    """An authenticated heartbeat request as the server hands it to the agent."""
    node.handle(sender, "status", {"node": sender, "pg": "standby", "fenced": False,
                                   "stamp": 1.0, "boot": "other"})


@pytest.mark.parametrize("node", ["pg1", "pg2", "arb"])
def test_an_agent_calls_as_the_rule_says(tmp_path, node):
    """The lab's first view: pg1 primary. At the start every node calls every peer (none has
    heard a request yet); once each peer's requests come, only the designated calls remain."""
    cls = agent.ArbiterAgent if node == "arb" else agent.DbAgent
    a = cls(lab_config(tmp_path, node), b"k" * 32, world=Recorder())
    assert sorted(n for n, _ in a.routines() if n.startswith("hb-")) == sorted(
        f"hb-{p.name}" for p in a.peers())
    assert sorted(_steps(a)) == sorted(p.name for p in a.peers())
    for peer in a.peers():
        _request_from(a, peer.name)
    assert _steps(a) == {"pg1": ["pg2", "arb"], "pg2": ["arb"], "arb": []}[node]
    for peer in a.peers():  # an operator's `status` (no stamp) is no heartbeat of the peer's
        a.observations.requested_at.pop(peer.name)
        a.handle(peer.name, "status", {})
    assert sorted(_steps(a)) == sorted(p.name for p in a.peers())
    for peer in a.peers():
        _request_from(a, peer.name)
    a.observations.requested_at = {p: t - 0.4 for p, t in a.observations.requested_at.items()}
    assert sorted(_steps(a)) == sorted(p.name for p in a.peers())


class Clocked(Recorder):
    now = 100.0

    def monotonic(self):
        return self.now


@pytest.mark.parametrize("second", [None, 0.01, 0.05, 0.1, 0.2])
def test_the_answering_side_wakes_when_its_fallback_is_due_and_then_calls(tmp_path, second):
    """pg2 answers pg1's requests: it sleeps until they would have stopped for c + p, and the
    step at that very moment calls, not a round later -- also when another request came
    (`second` s after the first) while it slept."""
    world = Clocked()
    a = agent.DbAgent(lab_config(tmp_path, "pg2"), b"k" * 32, world=world)
    pg1, t = a.cfg.nodes["pg1"], a.cfg.timing
    _request_from(a, "pg1")
    last, wait = world.now, a.heartbeat_step(pg1)
    assert wait == pytest.approx(t.check_interval + t.probe_timeout + a.FALLBACK_LAG)
    if second is not None:
        world.now += second
        _request_from(a, "pg1")
        last = world.now
        world.now += wait - second
    else:
        world.now += wait
    while world.called == []:
        wait = a.heartbeat_step(pg1)
        assert wait > 0
        world.now += 0 if world.called else wait
    assert world.now - last == pytest.approx(
        t.check_interval + t.probe_timeout + a.FALLBACK_LAG)  # called the moment it was due


def test_an_answering_side_past_its_fallback_without_calling_waits_a_round(tmp_path,
                                                                        monkeypatch):
    """A rule that never falls back (the simulator's scenario of the code before the
    fallback): past the moment, the step waits a round, never nothing (which would run it
    again at once, for ever)."""
    monkeypatch.setattr(agent, "calls_peer", lambda *args: False)
    world = Clocked()
    a = agent.DbAgent(lab_config(tmp_path, "pg2"), b"k" * 32, world=world)
    _request_from(a, "pg1")
    world.now += 10.0
    assert a.heartbeat_step(a.cfg.nodes["pg1"]) == pytest.approx(a.cfg.timing.check_interval)
