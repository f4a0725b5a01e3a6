"""The agent's port under abuse, against a real arbiter agent process on loopback: 2000
connections at once, a 10 MB line, idle connections, deeply nested JSON, bad MACs, replayed
requests and a flood of 64 KiB lines with bad MACs. The agent stays up, answers a legitimate
node within its timeout throughout, refuses the replays, and logs each kind of drop a few
times, not thousands."""
import os
import re
import resource
import signal
import socket
import threading
import time

import pytest

import agent

ATTACKERS = [f"127.0.84.{i}" for i in range(1, 21)]  # 20 addresses, none a node's
FLOOD = 2000


@pytest.fixture
def fd_limit():
    """This process may open a few thousand descriptors (restored afterwards)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = FLOOD + 500
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def proc_status(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def connect(address, port, source, timeout=5.0):
    return socket.create_connection((address, port), timeout=timeout, source_address=(source, 0))


def exchange(arb, line, source="127.0.84.100"):
    """Send one raw line to the arbiter; its reply line, or b"" when it dropped the request."""
    with connect(arb.address, arb.agent_port, source) as s:
        try:
            s.sendall(line)
            return agent._read_line(s, time.monotonic() + 3)
        except ConnectionError:  # reset, or closed without a reply
            return b""


def junk_flood(arb, line, seconds, senders=40):
    """Send line again and again from the strangers' addresses (each connection one line);
    how many the agent read and dropped."""
    stop, dropped = threading.Event(), []

    def send(source):
        while not stop.is_set():
            try:
                with connect(arb.address, arb.agent_port, source, timeout=3) as s:
                    s.sendall(line)
                    if s.recv(1) == b"":
                        dropped.append(1)
            except OSError:  # refused by the cap, or reset
                pass

    threads = [threading.Thread(target=send, args=(ATTACKERS[i % len(ATTACKERS)],), daemon=True)
               for i in range(senders)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(5)
    return len(dropped)


class LegitimateNode(threading.Thread):
    """pg2 asking the arbiter for its status every 50 ms, as its heartbeats do."""

    TIMEOUT = 3.0

    def __init__(self, cfg, key):
        super().__init__(daemon=True)
        self.cfg, self.key = cfg, key
        self.stop, self.latencies, self.failures = threading.Event(), [], []

    def run(self):
        body = {"node": "pg2", "role": "standby", "pg": "standby", "fenced": False}
        while not self.stop.is_set():
            began = time.monotonic()
            try:
                reply = agent.call(self.cfg, self.key, self.cfg.arbiter, "status", body,
                                   self.TIMEOUT)
                assert reply["role"] == "arbiter"
                self.latencies.append(time.monotonic() - began)
            except (OSError, agent.ProtocolError) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
            self.stop.wait(0.05)


class ThreadCount(threading.Thread):
    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.stop, self.max = pid, threading.Event(), 0

    def run(self):
        while not self.stop.wait(0.01):
            self.max = max(self.max, proc_status(self.pid, "Threads"))


def test_a_real_agent_survives_abuse_and_keeps_answering(fd_limit, arbiter_process):
    proc, ini, log_path = arbiter_process
    pg1, pg2 = agent.load_config(ini, "pg1"), agent.load_config(ini, "pg2")
    key = agent.read_secret(pg2.agent_key_file).encode()
    arb = pg2.arbiter
    legit, threads = LegitimateNode(pg2, key), ThreadCount(proc.pid)
    legit.start()
    threads.start()
    held, report = [], {}
    try:
        # 1. FLOOD connections from 20 addresses, held open: the excess is closed at once
        began = time.monotonic()
        refused_connects = 0
        for i in range(FLOOD):
            try:
                held.append(connect(arb.address, arb.agent_port, ATTACKERS[i % len(ATTACKERS)]))
            except OSError:
                refused_connects += 1
        report["flood_s"] = time.monotonic() - began
        time.sleep(0.5)
        open_now = 0
        for s in held:
            s.setblocking(False)
            try:
                open_now += s.recv(1) != b""
            except BlockingIOError:
                open_now += 1
            except OSError:
                pass
        report.update(refused_connects=refused_connects, still_open=open_now)
        assert 0 < open_now <= agent.AgentServer.MAX_STRANGERS
        assert refused_connects < FLOOD // 10

        # 2. meanwhile, replays of captured requests (from pg1's address: the strangers' slots
        # are full): eligibility (re-marking a standby dropped since) and promote; the
        # honest requests, each with a new nonce, are answered
        mark = agent.seal(key, "pg1", "arb", "eligibility",
                          {"term": 1, "seq": 0, "standby": "pg2", "eligible": True})
        assert b'"granted":true' in exchange(arb, mark, pg1.me.address)
        drop = agent.call(pg1, key, arb, "eligibility",
                          {"term": 1, "seq": 0, "standby": "pg2", "eligible": False}, timeout=3)
        assert drop["granted"] and drop["view"]["eligible"] is None
        assert exchange(arb, mark, pg1.me.address) == b""  # the replay: dropped
        promote = agent.seal(key, "pg2", "arb", "promote", {"term": 1})
        assert b'"granted":false' in exchange(arb, promote, pg1.me.address)
        assert exchange(arb, promote, pg1.me.address) == b""
        view = agent.call(pg2, key, arb, "status", {}, timeout=3)["view"]
        assert view["term"] == 1 and view["eligible"] is None  # pg2 was not re-marked
        again = agent.call(pg1, key, arb, "eligibility",  # an honest retry: a new nonce
                           {"term": 1, "seq": 1, "standby": "pg2", "eligible": False},
                           timeout=3)
        assert again["granted"]

        # 3. the flood's connections that got a handler are idle: closed after READ_TIMEOUT
        time.sleep(agent._RequestHandler.READ_TIMEOUT + 0.5)
        idle = 0
        for s in held:
            try:
                idle += s.recv(1) != b""
            except BlockingIOError:
                idle += 1
            except ConnectionError:
                pass
        assert idle == 0

        # 4. a 10 MB line: refused after MAX_MESSAGE bytes, never held in memory
        rss_before = proc_status(proc.pid, "VmRSS")
        assert exchange(arb, b"x" * (10 << 20)) == b""  # reset once the agent has seen enough

        # 5. deeply nested JSON behind a MAC-looking prefix, and a wrong key
        prefix = b"0" * 64 + b' {"v":2,"from":"pg1","to":"arb","type":"status","body":'
        for depth in (100000, 30000):
            assert exchange(arb, prefix + b"[" * depth + b"]" * depth + b"}\n") == b""
        assert exchange(arb, agent.seal(b"w" * 32, "pg1", "arb", "status", {})) == b""
        report["rss_growth_kb"] = proc_status(proc.pid, "VmRSS") - rss_before
        assert report["rss_growth_kb"] < 100_000

        # 6. lines of MAX_MESSAGE bytes with bad MACs, from the strangers for 3 s: each costs
        # the agent a MAC over 64 KiB (Python's own SHA-256, agent.LAUNCHER), each is dropped
        junk = b"0" * 64 + b" " + b"x" * (agent.MAX_MESSAGE - 100) + b"\n"
        report["junk_lines"] = junk_flood(arb, junk, seconds=3)
        assert report["junk_lines"] > 0
    finally:
        legit.stop.set()
        threads.stop.set()
        legit.join(10)
        threads.join(1)
        for s in held:
            s.close()
    report.update(max_threads=threads.max, legit_calls=len(legit.latencies),
                  legit_max_s=max(legit.latencies, default=None))

    assert proc.poll() is None, "the agent died"
    os.kill(proc.pid, signal.SIGTERM)  # the agent logs the counts it still holds as it stops
    assert proc.wait(10) == 0
    assert not legit.failures, legit.failures
    assert len(legit.latencies) >= 10 and max(legit.latencies) < LegitimateNode.TIMEOUT
    # handlers: 64 for strangers, 8 per node address, plus the agent's own few threads
    server = agent.AgentServer
    assert threads.max <= server.MAX_STRANGERS + 3 * server.MAX_PER_SOURCE + 10
    text = log_path.read_text()
    dropped = [line for line in text.splitlines() if "dropped (" in line]
    for kind in ("too many connections", "idle", "too long", "bad mac", "replay"):
        assert f"dropped ({kind})" in text, text
    assert len(dropped) <= 30, "\n".join(dropped)  # rate-limited, not one line per connection
    assert "Traceback" not in text, text
    counted = sum(int(m) for m in re.findall(r"dropped \(too many connections\) (\d+)", text))
    report["refused_by_the_cap"] = counted
    print(report)
    assert FLOOD // 2 <= counted <= FLOOD

