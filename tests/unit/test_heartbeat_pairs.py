"""One heartbeat exchange per pair of nodes and round (agent.calls_peer): who starts it, and
that the agents' routines follow the rule -- the arbiter only answers, the standby calls the
arbiter only, the node its view names primary calls both peers."""
import itertools

import pytest

import agent
from agent import View, calls_peer
from tests.unit.test_operate_logic import lab_config

NODES = ("pg1", "pg2", "arb")


@pytest.mark.parametrize("me,peer,primary", [
    (me, peer, primary) for me, peer in itertools.permutations(NODES, 2)
    for primary in ("pg1", "pg2")])
def test_who_starts_each_exchange(me, peer, primary):
    view = View(3, primary, None)
    expected = me != "arb" and (peer == "arb" or me == primary)
    assert calls_peer(me, peer, view, "arb") is expected


def test_one_caller_per_pair_in_every_view():
    for primary in ("pg1", "pg2"):
        view = View(3, primary, None)
        for a, b in itertools.combinations(NODES, 2):
            assert calls_peer(a, b, view, "arb") != calls_peer(b, a, view, "arb"), (a, b)


class Recorder(agent.World):
    def __init__(self):
        super().__init__()
        self.called = []

    def call(self, cfg, key, peer, kind, body, timeout):
        self.called.append(peer.name)
        raise OSError("not on the network in this test")


def _routine_names(node):
    return [name for name, _ in node.routines()]


def test_the_arbiter_runs_no_heartbeat_routine(tmp_path):
    arb = agent.ArbiterAgent(lab_config(tmp_path, "arb"), b"k" * 32, world=Recorder())
    assert not [n for n in _routine_names(arb) if n.startswith("hb-")]


@pytest.mark.parametrize("node,calls", [("pg1", ["pg2", "arb"]), ("pg2", ["arb"])])
def test_a_database_node_calls_as_its_view_says(tmp_path, node, calls):
    """pg1 is the primary of the lab's first view: it calls both peers; pg2 only the arbiter,
    though it has a routine for pg1 too (it calls pg1 once its view makes it the primary)."""
    world = Recorder()
    db = agent.DbAgent(lab_config(tmp_path, node), b"k" * 32, world=world)
    assert [n for n in _routine_names(db) if n.startswith("hb-")] == [
        f"hb-{db.other.name}", "hb-arb"]
    for peer in db.peers():
        assert 0 <= db.heartbeat_step(peer) <= db.cfg.timing.check_interval
    assert world.called == calls
    db.view = db.view.changed(term=2, primary=db.other.name if node == "pg1" else node)
    world.called.clear()
    for peer in db.peers():
        db.heartbeat_step(peer)
    assert world.called == (["arb"] if node == "pg1" else ["pg1", "arb"])
