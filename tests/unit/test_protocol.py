"""The agents' wire protocol (version 3): sealed messages pass, anything else is refused with a
reason, the MAC is checked before any JSON is parsed, a replayed request is refused, and a
server drops bad input without crashing."""
import dataclasses
import hashlib
import hmac
import json
import logging
import socket
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import agent

KEY = b"k" * 32
NODES = {"pg1": None, "pg2": None, "arb": None}


def test_roundtrip():
    line = agent.seal(KEY, "pg2", "arb", "promote", {"term": 3})
    mac, payload = line.rstrip(b"\n").split(b" ", 1)
    assert len(mac) == 64 and line.endswith(b"\n") and b"\n" not in line[:-1]
    assert json.loads(payload)["v"] == agent.PROTOCOL_VERSION == 3
    message = agent.unseal(KEY, line, "arb", NODES)
    assert message["from"] == "pg2" and message["body"] == {"term": 3}


def _v1(line):  # the same message as version 1 sent it: JSON with a "mac" key
    mac, payload = line.rstrip(b"\n").split(b" ", 1)
    return json.dumps({**json.loads(payload), "mac": mac.decode()}).encode() + b"\n"


def _v2(line):  # the same message as version 2 sent it: HMAC-SHA256 over "v": 2
    payload = line.rstrip(b"\n").split(b" ", 1)[1].replace(b'"v":3', b'"v":2')
    return hmac.new(KEY, payload, hashlib.sha256).hexdigest().encode() + b" " + payload + b"\n"


def _other_body(line):  # the MAC of the original, the JSON of another request
    mac, payload = line.split(b" ", 1)
    return mac + b" " + payload.replace(b'"term":3', b'"term":4')


@pytest.mark.parametrize("mutate,reason", [
    (_other_body, "bad mac"),
    (lambda line: line[:64] + b" " + line[65:].upper(), "bad mac"),
    (lambda line: b"garbage\n", "no MAC"),
    (_v1, "no MAC"),
    (_v2, "bad mac"),
    (lambda line: line[65:], "no MAC"),  # the JSON alone
])
def test_altered_messages_are_refused(mutate, reason):
    line = agent.seal(KEY, "pg2", "arb", "promote", {"term": 3})
    with pytest.raises(agent.ProtocolError, match=reason):
        agent.unseal(KEY, mutate(line), "arb", NODES)


def test_wrong_key():
    with pytest.raises(agent.ProtocolError, match="bad mac"):
        agent.unseal(b"x" * 32, agent.seal(KEY, "pg2", "arb", "status", {}), "arb", NODES)


def test_addressed_elsewhere_unknown_sender_stale_clock():
    with pytest.raises(agent.ProtocolError, match="not to me"):
        agent.unseal(KEY, agent.seal(KEY, "pg2", "pg1", "status", {}), "arb", NODES)
    with pytest.raises(agent.ProtocolError, match="unknown node"):
        agent.unseal(KEY, agent.seal(KEY, "evil", "arb", "status", {}), "arb", NODES)
    old = agent.seal(KEY, "pg2", "arb", "status", {}, now=time.time() - 120)
    with pytest.raises(agent.ProtocolError, match="too far off"):
        agent.unseal(KEY, old, "arb", NODES)
    with pytest.raises(agent.ProtocolError, match="unknown type"):
        agent.unseal(KEY, agent.seal(KEY, "pg2", "arb", "reboot", {}), "arb", NODES)
    for ts in (float("nan"), float("inf"), "now", True):  # NaN would pass a plain > test
        with pytest.raises(agent.ProtocolError, match="too far off|not JSON"):
            agent.unseal(KEY, agent.seal(KEY, "pg2", "arb", "status", {}, now=ts), "arb", NODES)


def test_nested_json_is_not_parsed_without_the_key(monkeypatch):
    """Deep nesting behind a MAC-looking prefix: refused for its length (100000 deep) or its
    MAC (30000 deep, under MAX_MESSAGE), before json.loads ever sees it."""
    parsed = []
    loads = json.loads
    monkeypatch.setattr(json, "loads", lambda *a, **k: parsed.append(1) or loads(*a, **k))
    prefix = b"0" * 64 + b' {"v":2,"from":"pg2","to":"arb","type":"status","body":'
    for depth, reason in ((100000, "too long"), (30000, "bad mac")):
        line = prefix + b"[" * depth + b"]" * depth + b"}\n"
        with pytest.raises(agent.ProtocolError, match=reason):
            agent.unseal(KEY, line, "arb", NODES)
    assert not parsed


@pytest.mark.parametrize("payload", [b"[" * 30000 + b"]" * 30000, b'{"v":3,"x":"\xc3\x28"}',
                                     b"\xff\xfe[\x00", b"NaN"])
def test_a_key_holders_bad_json_is_refused_not_raised(payload):
    """Nested too deep, not UTF-8, UTF-16 garbage, a constant JSON does not carry."""
    line = agent._mac(KEY, payload).encode() + b" " + payload + b"\n"
    with pytest.raises(agent.ProtocolError, match="not JSON"):  # not RecursionError
        agent.unseal(KEY, line, "arb", NODES)


def test_too_long():
    line = agent.seal(KEY, "pg2", "arb", "status", {"pad": "x" * agent.MAX_MESSAGE})
    with pytest.raises(agent.ProtocolError, match="too long"):
        agent.unseal(KEY, line, "arb", NODES)


def test_a_long_line_is_refused_without_reading_it_all():
    class Endless:  # a peer that sends "[" for ever
        read = 0

        def settimeout(self, t):
            pass

        def recv(self, n):
            Endless.read += n
            return b"[" * n

    with pytest.raises(agent.ProtocolError, match="too long"):
        agent._read_line(Endless(), time.monotonic() + 5)
    assert Endless.read <= agent.MAX_MESSAGE + 1


def test_read_line_stops_at_the_newline():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"one line\nand more")
        assert agent._read_line(b, time.monotonic() + 2) == b"one line\n"


def test_replay_is_refused_and_an_honest_retry_passes():
    replays = agent.ReplayCache()
    body = {"term": 1, "standby": "pg2", "eligible": True}
    line = agent.seal(KEY, "pg1", "arb", "eligibility", body)
    assert agent.unseal(KEY, line, "arb", NODES, replays=replays)["body"] == body
    with pytest.raises(agent.ProtocolError, match="replay") as info:
        agent.unseal(KEY, line, "arb", NODES, replays=replays)
    assert info.value.kind == "replay"
    retry = agent.seal(KEY, "pg1", "arb", "eligibility", body)  # the same request, a new nonce
    assert agent.unseal(KEY, retry, "arb", NODES, replays=replays)["body"] == body
    nonce = json.loads(line.split(b" ", 1)[1])["nonce"]  # another sender may use that nonce
    agent.unseal(KEY, agent.seal(KEY, "pg2", "arb", "status", {}, nonce=nonce), "arb", NODES,
                 replays=replays)
    agent.unseal(KEY, line, "arb", NODES)  # without a cache (replies): no replay check


def test_replay_cache_is_bounded_and_never_reopens_a_replay():
    replays = agent.ReplayCache(limit=3)
    now = 1000.0
    for i in range(5):
        replays.admit("pg1", f"n{i}", now + i, now + i)
    assert len(replays._seen) <= 3
    with pytest.raises(agent.ProtocolError, match="replay"):
        replays.admit("pg1", "n0", now, now + 5)  # evicted early, still refused
    replays.admit("pg1", "n5", now + 5, now + 5)  # a newer message still passes
    replays.admit("pg2", "n0", now + 5, now + 5)  # and another sender's
    later = now + 5 + agent.MAX_SKEW + 1
    replays.admit("pg2", "x", later, later)  # everything older has expired
    assert list(replays._seen) == [("pg2", "x")]


def test_drop_log_is_rate_limited_with_a_count(caplog):
    log = logging.getLogger("test-drops")
    drops = agent.DropLog(log, interval=0.2)
    with caplog.at_level(logging.WARNING, logger="test-drops"):
        for i in range(1000):
            drops("bad mac", f"127.0.0.{i % 200}", "bad mac (wrong key or altered)")
        drops("replay", "127.0.0.2", "replay: pg1 already sent nonce 1")
        assert len(caplog.records) == 2
        time.sleep(0.25)
        drops.flush()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and "(bad mac) 1 " in lines[0] and "(replay) 1 " in lines[1]
    assert "(bad mac) 999 " in lines[2]


def _wakes(thread):
    """How often the thread has slept and woken (voluntary context switches)."""
    with open(f"/proc/self/task/{thread.native_id}/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f
                    if line.startswith("voluntary_ctxt_switches"))


def test_a_count_held_back_wakes_the_server_even_when_two_drops_race():
    """Another thread's drop lands between this drop's flush and its look at the count: the
    count is held (2), and the server is still woken to compute when to log it."""
    drops = agent.DropLog(logging.getLogger("test-race"), interval=10.0)
    wakes = []
    drops.held = lambda: wakes.append(1)
    drops("bad mac", "127.0.0.5", "first")  # logged at once: nothing held, no wake
    assert not wakes
    flush, raced = drops.flush, []

    def racing_flush(only=None, force=False):
        flush(only, force)
        if not raced:
            raced.append(1)
            drops("bad mac", "127.0.0.6", "second")  # the other thread's drop
    drops.flush = racing_flush
    drops("bad mac", "127.0.0.5", "third")
    assert drops._kinds["bad mac"][0] == 2 and drops.due_in() > 0
    assert wakes


def test_sigterm_halts_the_agent_even_while_its_main_thread_holds_the_wakes_lock(tmp_path):
    """The handler runs in the main thread between two bytecodes, maybe inside Event.clear()
    or Event.wait() of the loop's wake: halting from the handler itself would wait forever for
    the lock its own thread holds (a real process, killed if it hangs)."""
    script = tmp_path / "sigterm.py"
    script.write_text(f"""
import os, signal, sys, threading, time
sys.path.insert(0, {str(Path(agent.__file__).parent)!r})
import agent

class Stoppable:
    stop, wake = threading.Event(), threading.Event()
    def halt(self):
        self.stop.set()
        self.wake.set()

a = Stoppable()
agent.stop_on_sigterm(a)
with a.wake._cond:  # what Event.clear() and Event.wait() hold for a moment
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)  # the handler runs in here
sys.exit(0 if a.stop.wait(2) and a.wake.wait(2) else 1)
""")
    done = subprocess.run([sys.executable, str(script)], timeout=20, check=False)
    assert done.returncode == 0


def test_an_idle_server_sleeps_until_a_line_is_due_or_it_is_shut_down(caplog):
    """A server without connections does not wake to look (socketserver's serve_forever looks
    every poll_interval); a count of drops held back is logged when due, with no connection to
    wake the server; shutdown() ends serve_forever at once."""
    log = logging.getLogger("test-quiet")
    drops = agent.DropLog(log, interval=0.3)
    server = agent.QuietServer(("127.0.0.1", 0), socketserver.BaseRequestHandler, drops)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    try:
        with caplog.at_level(logging.WARNING, logger="test-quiet"):
            thread.start()
            time.sleep(0.1)
            before = _wakes(thread)
            time.sleep(1.2)
            assert _wakes(thread) - before <= 1
            drops("bad mac", "127.0.0.9", "first")   # logged at once
            drops("bad mac", "127.0.0.9", "second")  # held for the interval
            time.sleep(0.6)
            assert [r.getMessage().split(" the latest ")[1] for r in caplog.records] == \
                ["from 127.0.0.9: first", "from 127.0.0.9: second"]
        began = time.monotonic()
        server.shutdown()
        assert time.monotonic() - began < 0.1 and not thread.join(1) and not thread.is_alive()
    finally:
        server.server_close()


@pytest.fixture
def server(monkeypatch):
    cfg = agent.load_config(agent.__file__.replace("agent.py", "agent.ini"), "arb")
    nodes = {**cfg.nodes, "pg2": agent.Node("pg2", "127.0.0.1", "standby", 5432, 0)}
    cfg = dataclasses.replace(cfg, nodes=nodes,
                              me=agent.Node("arb", "127.0.0.1", "arbiter", 5432, 0))
    monkeypatch.setattr(agent._RequestHandler, "READ_TIMEOUT", 0.5)
    log = logging.getLogger("test-protocol")
    server = agent.AgentServer(cfg, KEY, lambda sender, kind, body: {"echo": body}, log)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def caller(server):
    """A node pg2 on 127.0.0.1, and the server as a peer."""
    cfg = dataclasses.replace(server.cfg, me=server.cfg.nodes["pg2"])
    return cfg, agent.Node("arb", "127.0.0.1", "arbiter", 5432, server.server_address[1])


def test_server_drops_bad_input_and_keeps_serving(server, caplog):
    """A real server on loopback: garbage, an unauthenticated request and a replay are logged
    and dropped; a good request afterwards is still answered."""
    port = server.server_address[1]
    cfg, peer = caller(server)
    good = agent.seal(KEY, "pg2", "arb", "status", {"x": 2})
    with caplog.at_level(logging.WARNING, logger="test-protocol"):
        bad = agent.seal(b"wrong" * 8, "pg2", "arb", "status", {})
        for payload, answered in ((b"not json at all\n", False), (bad, False), (good, True),
                                  (good, False)):  # the second time: a replay
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(payload)
                assert (s.recv(100) != b"") == answered  # dropped: closed without a reply
        assert "(no mac)" in caplog.text and "(bad mac)" in caplog.text
        assert "(replay)" in caplog.text
    assert agent.call(cfg, KEY, peer, "status", {"x": 1}, timeout=2) == {"echo": {"x": 1}}


def test_server_caps_connections_per_source_and_for_strangers(server, monkeypatch, caplog):
    """Over the caps a connection is closed at once; a node's own address still gets in while
    strangers fill theirs; idle connections are closed after READ_TIMEOUT, freeing slots."""
    monkeypatch.setattr(agent.AgentServer, "MAX_PER_SOURCE", 2)
    monkeypatch.setattr(agent.AgentServer, "MAX_STRANGERS", 3)
    port = server.server_address[1]
    cfg, peer = caller(server)
    held = []

    def connect(source):
        s = socket.create_connection(("127.0.0.1", port), timeout=2,
                                     source_address=(source, 0))
        held.append(s)
        return s

    try:
        with caplog.at_level(logging.WARNING, logger="test-protocol"):
            began = time.monotonic()
            per_source = [connect("127.0.0.77") for _ in range(3)]
            assert per_source[2].recv(10) == b""  # the third from one address: closed at once
            strangers = [connect("127.0.0.78"), connect("127.0.0.79")]
            assert strangers[1].recv(10) == b""   # four strangers' handlers: one too many
            assert time.monotonic() - began < 0.4  # before any idle timeout
            # the node pg2 (127.0.0.1) is no stranger: it is answered all the same
            assert agent.call(cfg, KEY, peer, "status", {}, timeout=2) == {"echo": {}}
            assert per_source[0].recv(10) == b""  # idle: closed after READ_TIMEOUT
            time.sleep(0.2)
            s = connect("127.0.0.77")  # slots are free again
            s.sendall(agent.seal(KEY, "pg2", "arb", "status", {}))
            assert s.recv(1000) != b""
        assert "(too many connections)" in caplog.text and "(idle)" in caplog.text
    finally:
        for s in held:
            s.close()


def test_a_key_longer_than_blake2b_takes_is_hashed_whole_not_cut():
    """BLAKE2b takes at most 64 key bytes: a longer key works, and all of it counts."""
    long_key, other = b"k" * 64 + b"1", b"k" * 64 + b"2"
    line = agent.seal(long_key, "pg2", "arb", "promote", {"term": 3})
    assert agent.unseal(long_key, line, "arb", NODES)["body"] == {"term": 3}
    with pytest.raises(agent.ProtocolError, match="bad mac"):
        agent.unseal(other, line, "arb", NODES)
