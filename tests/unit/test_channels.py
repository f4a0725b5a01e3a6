"""Heartbeats on a kept connection (agent.Channels and the server's handler), against a real
AgentServer on loopback: one connection carries every heartbeat, each is still a round trip
within its timeout, a broken one is asked again on a new connection, other requests never
share it, and a kept connection the peer stops using is closed without a drop. Every peer's
rounds in one thread (World.run_heartbeats): a slow peer holds up no other's."""
import contextlib
import dataclasses
import errno
import logging
import socket
import threading
import time

import pytest
from loopback_cluster import write_cluster

import agent


class CountingServer(agent.AgentServer):
    def __init__(self, *args):
        self.connections = []
        super().__init__(*args)

    @property
    def accepted(self):
        return len(self.connections)

    def verify_request(self, request, client_address):
        self.connections.append(request)
        return super().verify_request(request, client_address)


class Drops(list):
    """The server's DropLog, by kind."""

    def __call__(self, kind, source, detail):
        self.append(kind)

    def flush(self, only=None, force=False):
        pass

    def due_in(self):
        return None


class Arbiter:
    """The arbiter's port (or another node's), served in this process; `slow` delays the
    answers."""

    def __init__(self, path, name="arb"):
        self.cfg = agent.load_config(path, name)
        self.key = agent.read_secret(self.cfg.agent_key_file).encode()
        self.slow, self.kinds, self.dropped = 0.0, [], Drops()
        self.log = logging.getLogger("test-channels")
        self.start()

    def handle(self, sender, kind, body):
        self.kinds.append(kind)
        time.sleep(self.slow)
        return {"kind": kind}

    def start(self):
        self.server = CountingServer(self.cfg, self.key, self.handle, self.log)
        self.server.drops = self.dropped
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self):
        """As the agent's process ending would: its connections close too."""
        self.server.shutdown()
        self.server.server_close()
        for conn in self.server.connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def cluster(tmp_path):
    path = write_cluster(tmp_path)
    arb = Arbiter(path)
    pg1 = agent.load_config(path, "pg1")
    yield arb, pg1, agent.Channels()
    arb.stop()


def heartbeat(channels, me, arb, timeout=1.0):
    return channels.call(me, arb.key, me.arbiter, "status", {}, timeout)


def test_every_heartbeat_is_a_round_trip_on_one_connection(cluster):
    arb, me, channels = cluster
    for _ in range(5):
        assert heartbeat(channels, me, arb) == {"kind": "status"}
    assert arb.kinds == ["status"] * 5
    assert arb.server.accepted == 1
    assert arb.dropped == []


def test_a_heartbeat_whose_kept_connection_broke_is_asked_again_on_a_new_one(cluster):
    arb, me, channels = cluster
    heartbeat(channels, me, arb)
    arb.stop()  # the peer's agent restarts: its kept connection is gone
    arb.start()
    time.sleep(0.1)
    assert heartbeat(channels, me, arb) == {"kind": "status"}
    assert arb.server.accepted == 1  # the new server's first connection


def test_a_late_answer_fails_the_heartbeat_on_time_and_is_never_taken_later(cluster):
    arb, me, channels = cluster
    heartbeat(channels, me, arb)
    arb.slow = 0.5
    began = time.monotonic()
    with pytest.raises(OSError):
        heartbeat(channels, me, arb, timeout=0.2)
    assert time.monotonic() - began < 0.4
    assert arb.server.accepted == 1  # no time was left: not asked again on a new connection
    arb.slow = 0.0
    time.sleep(0.5)  # the late answer has been sent on the connection the failure closed
    assert heartbeat(channels, me, arb) == {"kind": "status"}
    assert arb.server.accepted == 2


def test_other_requests_get_connections_of_their_own(cluster):
    arb, me, channels = cluster
    heartbeat(channels, me, arb)
    assert channels.call(me, arb.key, me.arbiter, "pause", {}, 1.0) == {"kind": "pause"}
    assert channels.call(me, arb.key, me.arbiter, "pause", {}, 1.0) == {"kind": "pause"}
    heartbeat(channels, me, arb)
    assert arb.server.accepted == 3
    assert arb.dropped == []


def test_a_kept_connection_left_idle_is_closed_without_a_drop(cluster, monkeypatch):
    arb, me, channels = cluster
    monkeypatch.setattr(agent._RequestHandler, "READ_TIMEOUT", 0.2)
    heartbeat(channels, me, arb)
    kept = channels._kept[me.arbiter.name]
    kept.settimeout(2.0)
    assert kept.recv(1) == b""  # the server closed it after READ_TIMEOUT
    assert arb.dropped == []
    assert heartbeat(channels, me, arb) == {"kind": "status"}


def test_a_connection_silent_from_the_start_is_still_dropped_as_idle(cluster, monkeypatch):
    arb, me, _ = cluster
    monkeypatch.setattr(agent._RequestHandler, "READ_TIMEOUT", 0.2)
    with agent._dial(me, me.arbiter, 1.0) as sock:
        sock.settimeout(2.0)
        assert sock.recv(1) == b""
    assert arb.dropped == ["idle"]


def test_every_peers_rounds_run_in_one_thread_and_a_slow_peer_holds_up_no_other(tmp_path):
    """World.run_heartbeats with the arbiter answering at once and pg2 too slow for the
    timeout: the arbiter's rounds keep their pace while pg2's calls are in flight, pg2's fail
    on time, and every round runs in the one thread."""
    path = write_cluster(tmp_path)
    arb, pg2 = Arbiter(path), Arbiter(path, "pg2")
    pg2.slow = 0.5
    me = agent.load_config(path, "pg1")
    world, stop = agent.World(), threading.Event()
    outcomes, threads = {"arb": [], "pg2": []}, set()

    def rounds(peer):
        began = time.monotonic()
        threads.add(threading.get_ident())
        try:
            yield peer, "status", {}, 0.2
            outcomes[peer.name].append(("reply", time.monotonic() - began))
        except OSError:
            outcomes[peer.name].append(("timeout", time.monotonic() - began))
        return 0.05

    runner = threading.Thread(target=world.run_heartbeats, daemon=True, args=(
        stop, me, arb.key, {p.name: lambda p=p: rounds(p) for p in (me.nodes["pg2"], me.arbiter)}))
    try:
        runner.start()
        time.sleep(1.2)
    finally:
        stop.set()
        runner.join(2.0)
        arb.stop()
        pg2.stop()
    assert not runner.is_alive()
    assert threads == {runner.ident}
    assert len(outcomes["arb"]) >= 12  # a round every 0.05 s, not one per pg2's 0.25 s
    assert all(kind == "reply" and took < 0.1 for kind, took in outcomes["arb"])
    assert 3 <= len(outcomes["pg2"]) <= 5
    assert all(kind == "timeout" and 0.19 < took < 0.3 for kind, took in outcomes["pg2"])


def test_a_heartbeat_to_a_port_without_a_server_fails_at_once(cluster):
    arb, me, channels = cluster
    arb.stop()
    began = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        heartbeat(channels, me, arb)
    assert time.monotonic() - began < 0.1


def test_a_round_that_raises_is_logged_and_tried_again_while_the_others_go_on(cluster, caplog):
    """A bug in one peer's round (World.run_heartbeats) -- it raises, it ends without a wait,
    its call cannot start and it asks for another: each is logged (a DropLog: once, then
    counts), that peer's next round comes a check_interval later, as after a failed call,
    and the other peer's rounds never stop (found by two reviews: each of these ended the one
    heartbeat thread, or held it in one wake-up for good)."""
    arb, me, _ = cluster
    c = me.timing.check_interval
    replies, begun = [], {"raises": [], "no wait": [], "again": []}

    def calls_arbiter():
        yield me.arbiter, "status", {}, 0.2
        replies.append(time.monotonic())
        return 0.05

    def raises():
        begun["raises"].append(time.monotonic())
        raise KeyError("a bug")
        yield  # a generator, as every round is

    def no_wait():
        begun["no wait"].append(time.monotonic())
        yield me.arbiter, "status", {}, 0.2

    def again():  # its call cannot start (a body JSON cannot encode): it asks again, forever
        begun["again"].append(time.monotonic())
        while True:
            with contextlib.suppress(TypeError):
                yield me.arbiter, "status", {"x": object()}, 0.2

    rounds = {"hb-arb": calls_arbiter, "hb-raises": raises, "hb-no-wait": no_wait,
              "hb-again": again}
    with caplog.at_level(logging.WARNING, logger="bobry"):
        alive = run_rounds(me, arb.key, rounds, 1.0)
    assert alive
    assert len(replies) >= 10
    for name, times in begun.items():
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert len(times) >= 5 and min(gaps) >= c - 0.005, (name, gaps)
    for what in ("from hb-raises: KeyError: 'a bug'", "from hb-no-wait: it ended with None",
                 "from hb-again: RuntimeError: it asked for another call"):
        assert caplog.text.count(what) == 1, what  # once: then counts, every 10 s


def test_an_agent_whose_heartbeats_thread_ends_stops_with_an_error(tmp_path, monkeypatch):
    """Should World.run_heartbeats ever end while the agent runs, the agent stops, and
    serve_and_run raises (main: exit status 1, for a supervisor to restart it), rather than
    run on without heartbeats (found by the review of 03bbeed)."""
    path = write_cluster(tmp_path)
    cfg = agent.load_config(path, "arb")
    a = agent.ArbiterAgent(cfg, agent.read_secret(cfg.agent_key_file).encode())

    def ends(*args):
        time.sleep(0.2)
        raise KeyError("a bug")

    monkeypatch.setattr(a.world, "run_heartbeats", ends)
    began = time.monotonic()
    with pytest.raises(RuntimeError, match="the heartbeats' thread ended .KeyError"):
        a.serve_and_run()
    assert time.monotonic() - began < 2.0
    assert a.stop.is_set()


def counting_round(outcomes, peer, timeout=0.2, wait=0.05):
    """A heartbeat round that records each call's outcome and how long it took."""
    def round_():
        began = time.monotonic()
        try:
            yield peer, "status", {}, timeout
            outcomes[peer.name].append(("reply", time.monotonic() - began))
        except OSError as exc:
            outcomes[peer.name].append((type(exc).__name__, time.monotonic() - began))
        return wait
    return round_


def run_rounds(me, key, rounds, seconds, name="heartbeats", meanwhile=None):
    """World.run_heartbeats in a thread for `seconds` (meanwhile() halfway); alive at the end?"""
    stop = threading.Event()
    runner = threading.Thread(target=agent.World().run_heartbeats, daemon=True, name=name,
                              args=(stop, me, key, rounds))
    runner.start()
    try:
        time.sleep(seconds / 2)
        if meanwhile is not None:
            meanwhile()
        time.sleep(seconds / 2)
        return runner.is_alive()
    finally:
        stop.set()
        runner.join(2.0)


def test_a_socket_that_cannot_be_made_fails_one_call_not_the_heartbeats(tmp_path, monkeypatch):
    """No descriptor left (EMFILE) when a call connects: that call fails, the rounds go on
    (found by the review of ba01e20, where it ended the one heartbeat thread)."""
    path = write_cluster(tmp_path)
    arb, pg2 = Arbiter(path), Arbiter(path, "pg2")
    me = agent.load_config(path, "pg1")
    outcomes, real_socket, failed = {"arb": [], "pg2": []}, socket.socket, []

    def flaky_socket(*args, **kwargs):
        if threading.current_thread().name == "hb-test" and not failed:
            failed.append(1)
            raise OSError(errno.EMFILE, "Too many open files")
        return real_socket(*args, **kwargs)

    monkeypatch.setattr(agent.socket, "socket", flaky_socket)
    rounds = {"pg2": counting_round(outcomes, me.nodes["pg2"]),
              "arb": counting_round(outcomes, me.arbiter)}
    try:
        alive = run_rounds(me, arb.key, rounds, 0.6, name="hb-test")
    finally:
        arb.stop()
        pg2.stop()
    assert failed and alive
    assert ("OSError", pytest.approx(0, abs=0.05)) in outcomes["pg2"]
    assert len(outcomes["arb"]) >= 5 and len(outcomes["pg2"]) >= 5


def test_a_call_that_fails_as_it_starts_ends_its_round_at_once(tmp_path):
    """A connect the kernel refuses at once (here: no route from a loopback source) ends its
    round then, not when the other peer's slow reply comes (found by the review of
    ba01e20: up to probe_timeout late)."""
    path = write_cluster(tmp_path)
    pg2 = Arbiter(path, "pg2")
    me = agent.load_config(path, "pg1")
    nowhere = dataclasses.replace(me.arbiter, address="203.0.113.1")  # TEST-NET-3, never sent
    outcomes = {"arb": [], "pg2": []}
    rounds = {"pg2": counting_round(outcomes, me.nodes["pg2"], timeout=0.4),
              "arb": counting_round(outcomes, nowhere, timeout=0.4)}

    def slow():
        pg2.slow = 0.3  # within the timeout: its calls stay in flight 0.3 s

    try:
        run_rounds(me, pg2.key, rounds, 2.0, meanwhile=slow)
    finally:
        pg2.stop()
    late = [took for _, took in outcomes["arb"][-4:]]
    assert len(late) == 4 and all(took < 0.05 for took in late), late


class FailsOnce(Arbiter):
    """A peer whose handling of one heartbeat raises OSError (say learn() could not persist a
    view): its server closes the connection without a reply, the request's nonce admitted."""

    fail_next = False

    def handle(self, sender, kind, body):
        if self.fail_next:
            self.fail_next = False
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().handle(sender, kind, body)


def test_a_heartbeat_asked_again_on_a_new_connection_is_sealed_anew(tmp_path):
    """The retry after a kept connection broke carries a new nonce: the peer, which admitted
    the first, answers it rather than dropping it as a replay (found by the review of
    ba01e20)."""
    path = write_cluster(tmp_path)
    arb = FailsOnce(path)
    me, channels = agent.load_config(path, "pg1"), agent.Channels()
    try:
        heartbeat(channels, me, arb)
        arb.fail_next = True
        assert heartbeat(channels, me, arb) == {"kind": "status"}
    finally:
        arb.stop()
    assert "replay" not in arb.dropped


def test_a_reply_that_came_while_another_round_ran_is_taken(tmp_path):
    """pg2's reply comes 0.1 s into its 0.2 s timeout, while the arbiter's round still works
    on its own reply (0.3 s: a view written and fsynced, say): it is taken when the thread
    is free, as a thread of its own would have taken it (found by the review of 03bbeed,
    where it counted as a timeout)."""
    path = write_cluster(tmp_path)
    arb, pg2 = Arbiter(path), Arbiter(path, "pg2")
    pg2.slow = 0.1
    me = agent.load_config(path, "pg1")
    outcomes = {"arb": [], "pg2": []}

    def busy_after_its_reply():
        yield me.arbiter, "status", {}, 0.2
        outcomes["arb"].append("reply")
        time.sleep(0.3)
        return 10.0

    rounds = {"arb": busy_after_its_reply,
              "pg2": counting_round(outcomes, me.nodes["pg2"], timeout=0.2, wait=10.0)}
    try:
        run_rounds(me, arb.key, rounds, 0.8)
    finally:
        arb.stop()
        pg2.stop()
    assert outcomes["arb"] == ["reply"]
    assert [kind for kind, _ in outcomes["pg2"]] == ["reply"]
