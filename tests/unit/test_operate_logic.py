"""Operating Bobry (issue "Operate and observe"): the cluster table, the health endpoints in
every role, pause and resume (decisions, the arbiter, the primary's lease), the history, the
role change hook, and the config keys they add. Pure functions first, then the adapters for
real: an HTTP server on loopback, a history file, a hook script in a temporary directory."""
import contextlib
import dataclasses
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import agent
from agent import View

REPO = Path(__file__).resolve().parents[2]
T = agent.Timing(check_interval=0.2, probe_timeout=0.3, fence_timeout=1.0, safety_margin=0.3,
                 failover_timeout=2.0, restart_grace=6.0)
NOW = 1000.0
PAUSED = View(1, "pg1", "pg2", 5, paused=True)


def lab_config(tmp_path, node, **changes):
    cfg = agent.load_config(str(REPO / "agent.ini"), node)
    for d in ("state", "log"):
        (tmp_path / node / d).mkdir(parents=True, exist_ok=True)
    return dataclasses.replace(cfg, state_dir=str(tmp_path / node / "state"),
                               log_dir=str(tmp_path / node / "log"), **changes)


# -- config -------------------------------------------------------------------------------------

def write(tmp_path, text):
    path = tmp_path / "agent.ini"
    path.write_text(text)
    return str(path)


def shipped():
    return (REPO / "agent.ini").read_text()


def test_http_port_and_hook_are_optional(tmp_path):
    text = "\n".join(line for line in shipped().splitlines()
                     if not line.startswith(("http_port", "on_role_change")))
    cfg = agent.load_config(write(tmp_path, text), "pg1")
    assert cfg.me.http_port is None and cfg.on_role_change is None


def test_shipped_config_has_health_ports():
    for node in ("pg1", "pg2", "arb"):
        assert agent.load_config(str(REPO / "agent.ini"), node).me.http_port == 8008


@pytest.mark.parametrize("value,problem", [
    ("http", "bad value 'http'"), ("0", "1-65535"), ("70000", "1-65535"),
    ("7400", "already the node's agent_port or pg_port"),
    ("5432", "already the node's agent_port or pg_port"),
])
def test_a_bad_http_port_names_file_section_and_key(tmp_path, value, problem):
    text = shipped().replace("[node pg2]\n", f"[node pg2]\nhttp_port = {value}\n", 1)
    text = "\n".join(line for line in text.splitlines()
                     if not (line.startswith("http_port = 8008")))
    with pytest.raises(agent.ConfigError) as err:
        agent.load_config(write(tmp_path, text), "pg1")
    assert "[node pg2] http_port" in str(err.value) and problem in str(err.value)


def test_the_hook_is_split_like_a_shell_would_but_run_without_one(tmp_path):
    text = shipped().replace("[agent]\n", "[agent]\non_role_change = /usr/bin/notify "
                                          "--to 'ops team' \"a b\"\n", 1)
    cfg = agent.load_config(write(tmp_path, text), "pg2")
    assert cfg.on_role_change == ("/usr/bin/notify", "--to", "ops team", "a b")


@pytest.mark.parametrize("value,problem", [("'unclosed", "not a command line"),
                                           ("   ", "must not be empty")])
def test_a_bad_hook_names_file_section_and_key(tmp_path, value, problem):
    text = shipped().replace("[agent]\n", f"[agent]\non_role_change = {value}\n", 1)
    with pytest.raises(agent.ConfigError) as err:
        agent.load_config(write(tmp_path, text), "pg1")
    assert "[agent] on_role_change" in str(err.value) and problem in str(err.value)


# -- pause: the arbiter, the primary's lease ----------------------------------------------------

@pytest.fixture
def arbiter(tmp_path):
    a = agent.ArbiterAgent(lab_config(tmp_path, "arb"), b"k" * 32)
    a.state.save(a.view)
    return a


def test_the_arbiter_records_a_pause_durably_from_any_node(arbiter):
    view = arbiter.view
    reply = arbiter.handle("arb", "pause", {"term": view.term, "seq": view.seq, "paused": True})
    assert reply["granted"] and reply["view"]["paused"]
    assert json.loads(Path(arbiter.state.path).read_text())["paused"] is True
    arbiter.started_at -= 10  # pg1 unseen for 10 s: only the pause holds the promotion back
    news = arbiter.status_body("pg2")
    refused = arbiter.handle("pg2", "promote", {"term": view.term, "echo": news})
    assert not refused["granted"] and "paused" in refused["reason"]
    with pytest.raises(agent.ProtocolError):  # "paused" must be a bool
        arbiter.handle("pg1", "pause", {"term": 1, "seq": 1, "paused": "no"})


def test_after_a_resume_the_arbiter_waits_for_the_primary_to_leave_its_untimed_lease(arbiter):
    arbiter.started_at -= 10
    v = arbiter.view
    arbiter.handle("pg2", "pause", {"term": v.term, "seq": v.seq, "paused": True})
    v = arbiter.view
    reply = arbiter.handle("pg2", "pause", {"term": v.term, "seq": v.seq, "paused": False})
    assert reply["granted"] and reply["view"]["resuming"]
    news = arbiter.status_body("pg2")
    assert not arbiter.handle("pg2", "promote", {"term": 1, "echo": news})["granted"]
    # pg1 reports the resumed view with its lease still untimed: not yet
    arbiter.handle("pg1", "status", {"view": arbiter.view.as_dict(), "lease": {"mode": "paused"}})
    assert arbiter.view.resuming
    arbiter.handle("pg1", "status", {"view": arbiter.view.as_dict(),
                                     "lease": {"mode": "primary", "left_s": 0.8}})
    assert not arbiter.view.resuming
    assert json.loads(Path(arbiter.state.path).read_text())["resuming"] is False
    news = arbiter.status_body("pg2")
    assert arbiter.handle("pg2", "promote", {"term": 1, "echo": news})["granted"]


class Fence:
    """The kernel's lease as the agent's lease code drives it."""

    def __init__(self, left=None):
        self.left = left  # None: closed, inf: open without timeout, else seconds
        self.late = False  # every armed write reaches the kernel after its window

    def lease(self):
        return self.left

    def arm(self, seconds):
        pass

    def open_for(self, seconds):
        if self.late:
            return False
        self.left = seconds
        return True

    def renew(self, seconds):
        if self.left is None:
            return False
        self.left = seconds
        return True

    def hold(self):
        if self.left is None:
            return False
        self.left = float("inf")
        return True

    def open(self):
        self.left = float("inf")
        return True

    def close(self):
        self.left = None


class Clock:
    def __init__(self):
        self.now = 500.0

    def __call__(self):
        return self.now


@pytest.fixture
def primary(tmp_path):
    node = agent.DbAgent(lab_config(tmp_path, "pg1"), b"k" * 32)
    node.clock = Clock()
    node.fence = Fence()
    node.view = View(1, "pg1", "pg2", 5)
    node.observations.lease_anchor = node.clock.now
    node.extend_lease(opening=True)  # as do_unfence does
    node.fenced = False
    fence_timeout = node.cfg.timing.fence_timeout
    assert node.lease_mode == "primary" and node.fence.left == pytest.approx(fence_timeout)
    return node


def test_a_paused_primary_holds_its_port_open_without_a_timeout(primary):
    primary.view = PAUSED
    primary.extend_lease()
    assert primary.lease_mode == "paused" and primary.fence.left == float("inf")
    primary.clock.now += 3600  # no peer for an hour: still open
    primary.extend_lease()
    assert primary.fence.left == float("inf")
    assert primary._observe_fence(primary.clock.now) and primary.fenced is False
    lease, view = primary.lease_and_view()
    assert lease == {"mode": "paused"} and view.paused


def test_on_resume_the_lease_is_timed_again_anchored_as_usual(primary):
    primary.view = PAUSED
    primary.extend_lease()
    primary.view = View(1, "pg1", "pg2", 7, resuming=True)
    primary.observations.lease_anchor = primary.clock.now - 0.2  # a peer heard us 0.2 s ago
    primary.extend_lease()
    due = primary.cfg.timing.fence_timeout - 0.2
    assert primary.lease_mode == "primary" and primary.fence.left == pytest.approx(due)


def test_on_resume_without_a_valid_anchor_the_port_closes_until_the_arbiters_word(primary):
    primary.view = PAUSED
    primary.extend_lease()
    primary.clock.now += 60  # paused and alone for a minute: the anchor is long gone
    primary.view = View(1, "pg1", "pg2", 7, resuming=True)
    primary.extend_lease()
    assert primary.lease_mode == "closed" and primary.fence.left is None
    primary._observe_fence(primary.clock.now)
    assert primary.fenced and primary.confirm_after == primary.clock.now


def test_a_resume_whose_opening_misses_its_window_closes_the_untimed_port(primary):
    """Found by a hostile read: the resumed lease's opening came too late (nft slow), nothing
    was written, and the paused hold (open, no timeout) stayed while the agent reported its
    lease closed -- on which the arbiter ends the resume and may grant again."""
    primary.view = PAUSED
    primary.extend_lease()
    assert primary.fence.left == float("inf")
    primary.view = View(1, "pg1", "pg2", 7, resuming=True)
    primary.observations.lease_anchor = primary.clock.now - 0.2
    primary.fence.late = True
    primary.extend_lease()
    assert primary.lease_mode == "closed" and primary.fence.left is None


def test_a_lapsed_lease_is_not_revived_by_a_pause(primary):
    primary.fence.left = None  # the kernel let it lapse
    primary.view = PAUSED
    primary.extend_lease()
    assert primary.lease_mode == "closed" and primary.fence.left is None


def test_a_restarted_agent_keeps_a_paused_primarys_port_open_but_closes_a_stray_one(tmp_path):
    for paused, kept in ((True, True), (False, False)):
        node = agent.DbAgent(lab_config(tmp_path, "pg1"), b"k" * 32)
        node.fence = Fence(float("inf"))
        node.fence.install = lambda: None
        node.pg.prepare_dirs = lambda: None
        node.state.save(View(1, "pg1", "pg2", 5, paused=paused))
        assert node.prepare()
        assert (node.fence.left == float("inf")) is kept
        assert node.lease_mode == ("paused" if kept else "closed")
        os.close(node.lock.fd)


# -- the health endpoints, every endpoint in every role -----------------------------------------

def snap(role="primary", pg="primary", fenced=False, lease=None, receiver=None, view=None,
         node="pg1"):
    view = view or {"term": 2, "seq": 3, "primary": "pg1", "eligible": "pg2", "paused": False}
    return {"node": node, "role": role, "pg": pg, "pg_now": pg, "fenced": fenced,
            "view": view, "lease": lease or {"mode": "primary", "left_s": 0.8},
            "postgres": {"timeline": 2, "lsn": "0/3000060", "receiver": receiver,
                         "lag_bytes": 0 if role == "primary" else None},
            "decision": {"action": "none", "reason": "ok", "age_s": 0.1},
            "contact_age_s": {"pg2": 0.1, "arb": 0.2},
            "decisions_total": {"none": 10}, "events_total": {"promoted": 1}}


REPLACED_VIEW = {"term": 3, "seq": 0, "primary": "pg2", "eligible": None}
ROLES = {
    "primary": snap(),
    "paused primary": snap(lease={"mode": "paused"}),
    "fenced primary": snap(fenced=True, lease={"mode": "closed"}),
    "primary, lease run out": snap(lease={"mode": "primary", "left_s": -0.1}),
    "primary, PostgreSQL down": snap(pg="down"),
    "replaced": snap(role="replaced", fenced=True, lease={"mode": "closed"},
                     view=REPLACED_VIEW),
    "standby streaming": snap(role="standby", pg="standby", receiver="streaming",
                              lease={"mode": "standby"}, node="pg2"),
    "standby not streaming": snap(role="standby", pg="standby", receiver="waiting",
                                  lease={"mode": "standby"}, node="pg2"),
    "standby, port closed": snap(role="standby", pg="standby", receiver="streaming",
                                 fenced=True, lease={"mode": "closed"}, node="pg2"),
    "arbiter": {**snap(role="arbiter", pg="none", node="arb"), "lease": None,
                "postgres": None},
}
EXPECTED = {  # (/primary, /replica)
    "primary": (200, 503), "paused primary": (200, 503), "fenced primary": (503, 503),
    "primary, lease run out": (503, 503), "primary, PostgreSQL down": (503, 503),
    "replaced": (503, 503), "standby streaming": (503, 200),
    "standby not streaming": (503, 503), "standby, port closed": (503, 503),
    "arbiter": (503, 503),
}


@pytest.mark.parametrize("role", sorted(ROLES))
def test_every_endpoint_in_every_role(role):
    want_primary, want_replica = EXPECTED[role]
    code, ctype, body = agent.health_response("/primary", ROLES[role])
    assert code == want_primary and ctype.startswith("text/plain") and body.strip()
    code, _, _ = agent.health_response("/replica", ROLES[role])
    assert code == want_replica
    code, ctype, body = agent.health_response("/health", ROLES[role])
    health = json.loads(body)
    assert code == 200 and ctype == "application/json"
    assert health["primary_ok"] == (want_primary == 200)
    assert health["replica_ok"] == (want_replica == 200)
    code, ctype, body = agent.health_response("/metrics", ROLES[role])
    text = body.decode()
    assert code == 200 and "version=0.0.4" in ctype
    assert f"bobry_primary_ok {int(want_primary == 200)}\n" in text
    assert f'bobry_role{{node="{ROLES[role]["node"]}",role="{ROLES[role]["role"]}"}} 1' in text


def test_unknown_paths_and_a_missing_status():
    assert agent.health_response("/", snap())[0] == 404
    assert agent.health_response("/primary?x=1", snap())[0] == 200
    for path in ("/primary", "/replica", "/health", "/metrics"):
        assert agent.health_response(path, None)[0] == 503


def test_metrics_are_prometheus_text():
    text = agent.metrics_text(ROLES["primary"])
    samples = [line for line in text.splitlines() if not line.startswith("#")]
    for line in samples:
        name, value = line.rsplit(" ", 1)
        assert name.startswith("bobry_") and (value == "+Inf" or float(value) >= 0)
    for want in ("bobry_term 2", "bobry_fenced 0", "bobry_paused 0",
                 "bobry_lease_seconds_left 0.800", "bobry_standby_lag_bytes 0",
                 'bobry_peer_contact_age_seconds{peer="arb"} 0.200',
                 'bobry_decisions_total{action="none"} 10', "bobry_promotions_total 1",
                 "bobry_failovers_total 0", "# TYPE bobry_decisions_total counter"):
        assert want in samples or want in text.splitlines(), want
    assert "bobry_lease_seconds_left +Inf" in agent.metrics_text(ROLES["paused primary"])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Log:
    def __init__(self):
        self.lines = []

    def warning(self, fmt, *args):
        self.lines.append(fmt % args)

    info = warning


@pytest.fixture
def http_server():
    state = {"snap": ROLES["primary"]}
    port = free_port()
    log = Log()
    server = agent.HealthServer(("127.0.0.1", port), lambda: state["snap"], log)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{port}", state, server, log
    server.shutdown()
    server.server_close()


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_the_http_server_answers_from_the_current_snapshot(http_server):
    url, state, _, _ = http_server
    assert get(url + "/primary") == (200, "primary of term 2\n")
    assert get(url + "/replica")[0] == 503
    state["snap"] = ROLES["fenced primary"]
    assert get(url + "/primary") == (503, "fenced: no lease\n")
    assert json.loads(get(url + "/health")[1])["fenced"] is True
    assert "bobry_fenced 1" in get(url + "/metrics")[1]


def test_the_http_server_caps_its_threads_and_drops_idle_clients(http_server):
    url, _, _, log = http_server
    port = int(url.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(30)]
    try:
        time.sleep(0.5)
        assert any("too many connections" in line for line in log.lines)  # 14 over the cap
        began = time.monotonic()
        while True:  # the idle ones are dropped after TIMEOUT: the server answers again
            try:
                if get(url + "/primary")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() - began < agent.HealthServer.TIMEOUT + 3
            time.sleep(0.2)
    finally:
        for sock in idle:
            sock.close()


def test_http_replies_to_what_is_no_get():
    snap = lambda: ROLES["primary"]  # noqa: E731
    head, _, body = agent.http_reply("GET /primary HTTP/1.1", snap).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK\r\n") and body == b"primary of term 2\n"
    assert b"Content-Length: 18\r\n" in head
    head_only = agent.http_reply("HEAD /primary HTTP/1.0", snap)
    assert head_only.endswith(b"\r\n\r\n") and b"Content-Length: 18" in head_only
    assert agent.http_reply("POST /primary HTTP/1.0", snap).startswith(b"HTTP/1.0 501 ")
    for junk in ("", "GET", "GET /primary", "hello there you", "GET / SMTP/1.0"):
        assert agent.http_reply(junk, snap).startswith(b"HTTP/1.0 400 "), junk
    assert agent.http_reply("GET /nope HTTP/1.0", snap).startswith(b"HTTP/1.0 404 ")


def test_an_http_request_is_read_whole_within_its_deadline_and_size():
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        threading.Timer(0.1, b.sendall, (b"Accept: */*\r\n\r\n",)).start()
        assert agent.read_http_request(a, time.monotonic() + 2, 8192) == "GET /health HTTP/1.1"
        b.sendall(b"GET /health HTTP/1.0\r\n")  # never ends its headers
        began = time.monotonic()
        assert agent.read_http_request(a, began + 0.3, 8192) is None
        assert time.monotonic() - began < 1.0
        b.sendall(b"X" * 9000 + b"\r\n\r\n")
        assert agent.read_http_request(a, time.monotonic() + 2, 8192) is None
    c, d = socket.socketpair()
    with c:
        d.sendall(b"GET /health")
        d.close()  # cut short
        assert agent.read_http_request(c, time.monotonic() + 2, 8192) is None


def test_a_failing_status_is_a_503_not_a_crash(http_server):
    url, state, server, _ = http_server
    server.snapshot = lambda: 1 / 0
    assert get(url + "/primary")[0] == 503
    server.snapshot = lambda: state["snap"]
    assert get(url + "/primary")[0] == 200


def test_a_real_agent_serves_its_own_snapshot(tmp_path):
    cfg = lab_config(tmp_path, "pg2")
    cfg = dataclasses.replace(cfg, me=dataclasses.replace(cfg.me, address="127.0.0.1",
                                                          http_port=free_port()))
    node = agent.DbAgent(cfg, b"k" * 32)
    server = agent.World().serve_http(node)
    try:
        url = f"http://127.0.0.1:{cfg.me.http_port}"
        assert get(url + "/replica")[0] == 503  # no tick yet: PostgreSQL down, port closed
        health = json.loads(get(url + "/health")[1])
        assert health["node"] == "pg2" and health["pg_now"] == "down"
        assert set(health["contact_age_s"]) == {"pg1", "arb"}
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as busy:  # a port already taken: logged, and the agent goes on
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = dataclasses.replace(cfg, me=dataclasses.replace(
            cfg.me, address="127.0.0.1", http_port=busy.getsockname()[1]))
        assert agent.World().serve_http(agent.DbAgent(taken, b"k" * 32)) is None
    no_port = dataclasses.replace(cfg, me=dataclasses.replace(cfg.me, http_port=None))
    assert agent.World().serve_http(agent.DbAgent(no_port, b"k" * 32)) is None


# -- the cluster table --------------------------------------------------------------------------

def body(node, role, pg, view, **extra):
    return {"node": node, "role": role, "pg": pg, "view": view, "paused": view.get("paused"),
            "decision": {"action": "none", "reason": f"{node} says hi", "age_s": 0.15},
            **extra}


VIEW = {"term": 2, "seq": 4, "primary": "pg2", "eligible": "pg1", "paused": False}


def statuses(**changes):
    st = {
        "pg1": body("pg1", "standby", "standby", VIEW, fenced=False, lease={"mode": "standby"},
                    postgres={"timeline": 2, "lsn": "0/3000000", "receiver": "streaming"}),
        "pg2": body("pg2", "primary", "primary", VIEW, fenced=False,
                    lease={"mode": "primary", "left_s": 0.93},
                    postgres={"timeline": 2, "lsn": "0/3000060", "standby_state": "streaming",
                              "sync_state": "sync", "lag_bytes": 96, "sync_names": "pg1"}),
        "arb": body("arb", "arbiter", "none", VIEW, fenced=False),
    }
    st.update(changes)
    return st


def test_the_cluster_table_has_one_row_per_node_with_what_an_operator_needs():
    lines = agent.cluster_table(statuses()).splitlines()
    assert lines[0] == "view (the arbiter): term 2.4, primary pg2, eligible pg1"
    assert lines[1].split("  ")[0] == "node"
    for column in agent.CLUSTER_COLUMNS:
        assert column in lines[1]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert set(rows) == {"pg1", "pg2", "arb"}
    assert "0/3000000" in rows["pg1"] and "96 B" in rows["pg1"] and "streaming, sync" in rows[
        "pg1"]
    assert "streaming/sync, waits for pg1" in rows["pg2"] and "lease 0.9 s" in rows["pg2"]
    assert "none 0.1 s ago: pg2 says hi" in rows["pg2"] or "none 0.2 s ago" in rows["pg2"]


def test_a_node_that_does_not_answer_is_shown_not_omitted():
    table = agent.cluster_table(statuses(arb={"error": "TimeoutError: timed out"}))
    row = next(line for line in table.splitlines() if line.startswith("arb"))
    assert "NO ANSWER" in row and "timed out" in row
    assert "newest a node reported; no arbiter" in table.splitlines()[0]


def test_the_table_shows_a_pause_loudly():
    paused = {**VIEW, "paused": True}
    table = agent.cluster_table({n: {**b, "view": paused} for n, b in statuses().items()})
    assert "*** PAUSED" in table.splitlines()[0]
    assert all("PAUSED" in line for line in table.splitlines()[2:])


def test_gather_statuses_asks_everyone_at_once_and_keeps_the_silent():
    cfg = agent.load_config(str(REPO / "agent.ini"), "pg1")
    asked = []

    def ask(cfg, key, node, kind, body, timeout):
        asked.append((node.name, kind))
        if node.name == "pg2":
            raise socket.timeout("timed out")
        return {"node": node.name}

    got = agent.gather_statuses(cfg, b"k", ask=ask)
    assert list(got) == ["pg1", "pg2", "arb"] and "timed out" in got["pg2"]["error"]
    assert sorted(asked) == [("arb", "status"), ("pg1", "status"), ("pg2", "status")]


def test_status_watch_stops_after_count(monkeypatch, capsys):
    cfg = agent.load_config(str(REPO / "agent.ini"), "pg1")
    monkeypatch.setattr(agent, "gather_statuses", lambda cfg, key: statuses())
    monkeypatch.setattr(agent.time, "sleep", lambda s: None)
    assert agent.cluster_status_command(cfg, b"k", watch=True, count=3) == 0
    out = capsys.readouterr().out
    assert out.count("view (the arbiter)") == 3 and "Ctrl-C" in out
    assert agent.cluster_status_command(cfg, b"k", as_json=True) == 0
    assert json.loads(capsys.readouterr().out)["pg2"]["role"] == "primary"


# -- the history --------------------------------------------------------------------------------

def test_a_new_term_is_in_the_history_file_before_the_reply(arbiter):
    arbiter.started_at -= 10
    news = arbiter.status_body("pg2")
    history = Path(arbiter.history.path)
    real_save = arbiter.state.save

    def save(view):  # the state first, then the history: both before the reply
        real_save(view)
        if view.term == 2 and view.primary == "pg2" and view.eligible is None:
            assert not history.exists() or "\"term\": 2" not in history.read_text()
    arbiter.state.save = save
    reply = arbiter.handle("pg2", "promote", {"term": 1, "echo": news})
    assert reply["granted"]
    (record,) = [json.loads(line) for line in history.read_text().splitlines()]
    assert record["term"] == 2 and record["primary"] == "pg2" and record["why"] == "failover"
    assert record["previous"] == "pg1" and record["lost_s"] >= 9.9
    assert abs(record["t"] - time.time()) < 5
    # a handover, by the new primary
    arbiter.observations.contact_at["pg1"] = arbiter.clock()
    arbiter.handle("pg2", "eligibility", {"term": 2, "seq": arbiter.view.seq, "standby": "pg1",
                                          "eligible": True})
    reply = arbiter.handle("pg2", "handover", {"term": 2, "seq": arbiter.view.seq, "to": "pg1"})
    assert reply["granted"]
    records = [json.loads(line) for line in history.read_text().splitlines()]
    assert [(r["term"], r["why"]) for r in records] == [(2, "failover"), (3, "handover")]


def test_history_starts_with_the_bootstrap_and_fills_a_gap(tmp_path):
    a = agent.ArbiterAgent(lab_config(tmp_path, "arb"), b"k" * 32)
    a.remote.prepare = lambda: None  # no passfile here
    assert a.prepare()
    (boot,) = a.history.read()
    assert boot["term"] == 1 and boot["why"] == "bootstrap" and boot["primary"] == "pg1"
    os.close(a.lock.fd)
    a.state.save(View(3, "pg2", None, 9))  # term 3 without a record (e.g. a crash)
    b = agent.ArbiterAgent(lab_config(tmp_path, "arb"), b"k" * 32)
    b.remote.prepare = lambda: None
    assert b.prepare()
    assert [(r["term"], r["why"]) for r in b.history.read()] == [(1, "bootstrap"), (3, "unknown")]
    os.close(b.lock.fd)


def test_history_is_served_in_pages_and_printed(arbiter, monkeypatch):
    for term in range(1, 251):
        arbiter.history.append({"term": term, "primary": "pg1" if term % 2 else "pg2",
                                "t": 1764120000 + term, "why": "failover", "previous": "pg2",
                                "requested_by": "pg1", "lost_s": 2.1, "reason": "x"})
    first = arbiter.handle("pg1", "history", {"after": 0})
    assert len(first["records"]) == 100 and first["more"]
    assert len(json.dumps(first)) < agent.MAX_MESSAGE
    last = arbiter.handle("arb", "history", {"after": 200})
    assert [r["term"] for r in last["records"]] == list(range(201, 251)) and not last["more"]
    with pytest.raises(agent.ProtocolError):
        arbiter.handle("pg1", "history", {"after": "x"})
    cfg = agent.load_config(str(REPO / "agent.ini"), "pg1")
    monkeypatch.setattr(agent, "call", lambda cfg, key, peer, kind, body, timeout:
                        arbiter.handle("pg1", kind, body))
    records = []
    monkeypatch.setattr(agent, "format_history", lambda r: records.extend(r) or "")
    assert agent.history_command(cfg, b"k") == 0
    assert [r["term"] for r in records] == list(range(1, 251))


def test_format_history():
    records = [
        {"term": 1, "primary": "pg1", "t": 1764115200.0, "why": "bootstrap",
         "reason": "pg1 is the first primary (agent.ini)"},
        {"term": 2, "primary": "pg2", "t": 1764115260.5, "why": "failover", "previous": "pg1",
         "requested_by": "pg2", "lost_s": 2.1},
        {"term": 3, "primary": "pg1", "t": 1764115320.0, "why": "handover", "previous": "pg2"},
    ]
    lines = agent.format_history(records).splitlines()
    assert lines[0].split() == ["term", "primary", "since", "(UTC)", "why"]
    assert lines[1].split()[:4] == ["1", "pg1", "2025-11-26", "00:00:00"]
    assert lines[1].endswith("bootstrap: pg1 is the first primary (agent.ini)")
    assert lines[2].endswith("failover: pg1 lost for 2.1 s (the arbiter's count), pg2 promoted")
    assert lines[3].endswith("handover: switchover from pg2")


def test_a_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "history.jsonl"
    history = agent.HistoryFile(str(path))
    history.append({"term": 1, "primary": "pg1"})
    with open(path, "a") as f:
        f.write('{"term": 2, "prim')
    assert history.read() == [{"term": 1, "primary": "pg1"}]


# -- the role change hook -----------------------------------------------------------------------

def test_role_change_events():
    ev = agent.role_change_event
    assert ev(None, ("standby", True, 1)) == "start"
    assert ev(("standby", True, 1), ("standby", True, 1)) is None
    assert ev(("standby", True, 1), ("standby", False, 1)) == "unfenced"
    assert ev(("standby", False, 1), ("primary", False, 2)) == "promoted"
    assert ev(("primary", False, 2), ("primary", True, 2)) == "fenced"
    assert ev(("primary", True, 2), ("replaced", True, 3)) == "replaced"
    assert ev(("replaced", True, 3), ("standby", False, 3)) == "rejoined"
    assert ev(("arbiter", False, 1), ("arbiter", False, 2)) == "new_term"
    assert ev(("standby", False, 1), ("standby", False, 2)) is None


class Warn:
    def __init__(self):
        self.calls = []

    def __call__(self, kind, source, detail):
        self.calls.append((kind, source, detail))


def script(tmp_path, body):
    path = tmp_path / "hook.sh"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_the_hook_runs_in_the_background_with_arguments_and_environment(tmp_path):
    out = tmp_path / "calls"
    hook = script(tmp_path, f'echo "$1 $2 $3 $BOBRY_EVENT $BOBRY_ROLE $BOBRY_TERM $BOBRY_NODE '
                            f'$4" >> {out}\nsleep 0.3\n')
    threads = []

    def spawn(name, step):
        t = threading.Thread(target=step, name=name)
        threads.append(t)
        t.start()

    warn = Warn()
    hooks = agent.Hooks((hook, "extra arg"), "pg2", spawn, warn, Log())
    began = time.monotonic()
    hooks.fire("promoted", "primary", 2)
    hooks.fire("fenced", "primary", 2)
    assert time.monotonic() - began < 0.2  # the caller never waits for the hook
    for t in threads:
        t.join(5)
    assert len(threads) == 1  # one worker drains both, in order
    assert out.read_text().splitlines() == [
        "extra arg promoted primary promoted primary 2 pg2 2",
        "extra arg fenced primary fenced primary 2 pg2 2"]
    assert warn.calls == []


def test_a_failing_or_hanging_hook_is_logged_and_killed(tmp_path, monkeypatch):
    warn = Warn()
    failing = agent.Hooks((script(tmp_path, "echo boom >&2\nexit 3\n"),), "pg1",
                          lambda n, step: step(), warn, Log())
    failing.fire("start", "primary", 1)
    assert warn.calls[-1][0] == "role change hook" and "exit status 3: boom" in warn.calls[-1][2]
    missing = agent.Hooks((str(tmp_path / "nope"),), "pg1", lambda n, step: step(), warn, Log())
    missing.fire("start", "primary", 1)
    assert "cannot run" in warn.calls[-1][2]
    monkeypatch.setattr(agent.Hooks, "TIMEOUT", 0.5)
    child = tmp_path / "child.pid"
    hanging = agent.Hooks((script(tmp_path, f"sleep 60 & echo $! > {child}\nsleep 60\n"),),
                          "pg1", lambda n, step: step(), warn, Log())
    began = time.monotonic()
    hanging.fire("start", "primary", 1)
    assert time.monotonic() - began < 5 and "killed after" in warn.calls[-1][2]
    pid = int(child.read_text())
    time.sleep(0.1)
    with contextlib.suppress(FileNotFoundError):  # its group went: gone, or a zombie
        assert Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"


def test_the_agent_tells_the_hook_of_each_role_change(tmp_path):
    node = agent.DbAgent(lab_config(tmp_path, "pg2"), b"k" * 32)
    fired = []
    node.hooks.fire = lambda event, role, term: fired.append((event, role, term))
    node.role_name = lambda: node._role
    node._role = "standby"
    node.note_role()
    node.fenced = False
    node.note_role()
    node.note_role()
    node._role, node.view = "primary", View(2, "pg2", None, 7)
    node.note_role()
    assert fired == [("start", "standby", 0), ("unfenced", "standby", 0),
                     ("promoted", "primary", 2)]


def test_the_decisions_and_events_are_counted(tmp_path):
    node = agent.DbAgent(lab_config(tmp_path, "pg2"), b"k" * 32)
    node.say(agent.Decision("none", "a"))
    node.say(agent.Decision("none", "a"))
    node.events("promoted", term=2)
    snap = node.health_snapshot()
    assert snap["decisions_total"] == {"none": 2} and snap["events_total"] == {"promoted": 1}
    assert Path(node.events.path).read_text().count("promoted") == 1


def test_the_haproxy_example_config_is_valid():
    if not shutil.which("haproxy"):
        pytest.skip("haproxy is not installed (provision/local.sh test installs it)")
    result = subprocess.run(["haproxy", "-c", "-f", str(REPO / "provision" / "haproxy.cfg")],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    text = (REPO / "provision" / "haproxy.cfg").read_text()
    assert "option httpchk GET /primary" in text and "inter 200ms" in text


def test_the_lab_runs_the_example_config_with_its_own_addresses(tmp_path):
    from lab.netns import NetnsBackend
    lab = NetnsBackend(lab_dir=tmp_path)
    (tmp_path / "secrets").mkdir()
    lab.config_file.write_text(lab.render_config(tmp_path / "secrets"))
    text = lab.proxy_config()
    assert "192.168.56" not in text and "bind 10.89.0.20:5000" in text
    assert "server pg1 10.89.0.11:5432 check port 8008" in text
    lab.proxy = True
    assert "host=10.89.0.20 port=5000 " in lab.dsn()



class StartingPostgres:
    """A postmaster that runs (or not) and is not consistent yet, the log it writes between two
    looks of do_start_standby, and the WAL wal_gap is told about."""

    def __init__(self, logs=(), running=True, wal=None):
        self.logs, self.calls, self.offset = list(logs), [], 0
        self.is_running, self.wal = running, wal

    def running(self):
        return self.is_running

    def has_standby_signal(self):  # what the log lines' role is told from
        return True

    def log_since(self, offset):
        self.calls.append(("log_since", offset))
        self.offset += 100
        return self.logs.pop(0), self.offset

    def wal_needs(self):
        if isinstance(self.wal, Exception):
            raise self.wal
        return self.wal

    def write_config(self, view):
        self.calls.append("write_config")

    def start(self):
        self.calls.append("start")

    def stop_immediate(self):
        self.calls.append("stop_immediate")

    def move_aside(self):
        self.calls.append("move_aside")
        return "/data.replaced-x"


REMOVED = ("FATAL:  could not receive data from WAL stream: ERROR:  requested WAL segment "
           "000000020000000000000003 has already been removed\n")
WALSENDER = ("ERROR:  requested WAL segment 000000020000000000000003 has already been "
             "removed\n")  # a primary's walsender, when its standby asked too late


@pytest.mark.parametrize("looks_before", range(4))
@pytest.mark.parametrize("found", [False, True])
@pytest.mark.parametrize("primary, eligible", [("pg1", None), ("pg1", "pg2"), ("pg2", None),
                                               ("pg1", "pg1")])
def test_starting_standby_verdict(looks_before, found, primary, eligible):
    view = agent.View(term=2, primary=primary, eligible=eligible, seq=3)
    looks, reclone = agent.starting_standby_verdict("pg2", view, looks_before, found)
    assert looks == (looks_before + 1 if found else 0)  # a look without the line starts over
    assert reclone is (found and looks_before + 1 >= 2 and "pg2" not in (primary, eligible))


def starting_standby(tmp_path, pg, eligible=None):
    node = agent.DbAgent(lab_config(tmp_path, "pg2"), b"k" * 32)
    node.view = agent.View(term=2, primary="pg1", eligible=eligible, seq=3)
    node.pg = pg
    now = [0.0]
    node.clock = lambda: now[0]
    return node, now


@pytest.mark.parametrize("logs, eligible, recloned", [
    # PostgreSQL's word, new since the first look, in two looks in a row
    (["", REMOVED, REMOVED, ""], None, True),
    # an old line before the first look is never judged; one look alone is no verdict
    ([REMOVED, REMOVED, "", ""], None, False),
    ([REMOVED, "", REMOVED, ""], None, False),
    (["", WALSENDER, WALSENDER, WALSENDER], None, False),  # a primary's line is no verdict
    (["", REMOVED, REMOVED, REMOVED], "pg2", False),  # the failover's target keeps its data
    (["", "", "", "LOG:  consistent recovery state reached\n"], None, False),
])
def test_a_starting_standby_is_recloned_on_postgresqls_own_word(tmp_path, logs, eligible,
                                                                 recloned):
    node, now = starting_standby(tmp_path, StartingPostgres(logs), eligible)
    for _ in range(4):
        node.do_start_standby(None)
        node.do_start_standby(None)  # within WAL_RECHECK: no second look
        now[0] += agent.DbAgent.WAL_RECHECK
        if "move_aside" in node.pg.calls:
            break
    looks = [c for c in node.pg.calls if c[0] == "log_since"]
    assert looks == [("log_since", None), ("log_since", 100), ("log_since", 200),
                     ("log_since", 300)][:3 if recloned else 4]
    assert (node.pg.calls[-2:] == ["stop_immediate", "move_aside"]) is recloned
    assert "start" not in node.pg.calls


def test_postgresql_answering_or_starting_again_forgets_what_it_logged(tmp_path):
    node, now = starting_standby(tmp_path, StartingPostgres(["", REMOVED, "", REMOVED]))
    node.do_start_standby(None)
    now[0] += agent.DbAgent.WAL_RECHECK
    node.do_start_standby(None)  # one look found it
    node.forget_pg_log()  # as the tick does when PostgreSQL answers
    for _ in range(2):
        now[0] += agent.DbAgent.WAL_RECHECK
        node.do_start_standby(None)
    assert [c for c in node.pg.calls if c[0] == "log_since"][-2:] == [
        ("log_since", None), ("log_since", 300)]
    assert "move_aside" not in node.pg.calls  # the first look after forgetting only reads


def test_a_view_that_changes_meanwhile_stops_a_reclone(tmp_path):
    node, _ = starting_standby(tmp_path, StartingPostgres())
    judged_on = node.view
    node.view = agent.View(term=3, primary="pg2", eligible=None, seq=4)  # promoted meanwhile
    node._reclone(judged_on, "stale")
    assert node.pg.calls == []
    node.view = judged_on
    node._reclone(judged_on, "gone")
    assert node.pg.calls == ["stop_immediate", "move_aside"]


MIB16 = 16 * 1024 * 1024
GAP = ("000000010000000000000003", [], 0x3000028, MIB16)  # needs 3, holds nothing of its own


@pytest.mark.parametrize("wal, primary_holds, started", [
    (GAP, ["000000020000000000000003"], True),          # the primary still has it
    (GAP, ["000000020000000000000029"], False),         # a long outage: gone
    (GAP, TimeoutError("primary silent"), True),        # cannot be asked: start, as before
    (RuntimeError("pg_controldata: no pg_control"), [], True),
])
def test_a_standby_starts_unless_its_primary_says_its_wal_is_gone(tmp_path, wal, primary_holds,
                                                                  started):
    node, _ = starting_standby(tmp_path, StartingPostgres(running=False, wal=wal))

    class Remote:
        def wal_files(self, node, timeout):
            if isinstance(primary_holds, Exception):
                raise primary_holds
            return primary_holds
    node.remote = Remote()
    node.pg_log_offset, node.wal_removed_looks = 500, 1  # from an earlier run of PostgreSQL
    node.do_start_standby(None)
    assert ("start" in node.pg.calls) is started
    if started:  # what it logged before this start is no verdict on it
        assert (node.pg_log_offset, node.wal_removed_looks) == (None, 0)
    assert ("move_aside" in node.pg.calls) is not started
    node.pg.calls.clear()
    node.view = agent.View(term=3, primary="pg2", eligible=None, seq=4)  # named primary now
    assert node._wal_reachable_or_reclone(node.view) is True and node.pg.calls == []


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
