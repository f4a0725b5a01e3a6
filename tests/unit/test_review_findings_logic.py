"""The findings of the hostile review (issue "Close every known path…"), one test or more each,
named after the finding. Where the lab cannot produce the timing, the agent's own code runs
here against stand-ins for the world: a real ArbiterAgent (its decisions and state file) behind
a message path that can lose replies, and recorders for PostgreSQL and the kernel's fence."""
import dataclasses
import fcntl
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import agent
from agent import DbObservation, View, decide_db

REPO = Path(__file__).resolve().parents[2]
T = agent.Timing(check_interval=0.2, probe_timeout=0.3, fence_timeout=1.0, safety_margin=0.3,
                 failover_timeout=2.0, restart_grace=6.0)
NOW = 1000.0


def primary_obs(**kw):
    base = {"now": NOW, "started_at": NOW - 100, "pg": "primary", "pg_down_since": None,
            "has_standby_signal": False, "fenced": False, "view": View(1, "pg1", "pg2", 4),
            "contact_at": {"pg2": NOW - 0.1, "arb": NOW - 0.1}, "primary_alive_at": None,
            "sync_names": "pg2", "standby_seen_at": NOW - 0.1, "standby_streaming": True,
            "standby_synced": True}
    return DbObservation(**{**base, **kw})


# -- stand-ins ----------------------------------------------------------------------------------

class Recorder:
    """PostgreSQL and the fence, as far as the actions under test touch them."""

    def __init__(self):
        self.calls = []
        self.lease_left = None

    def write_config(self, view, data_dir=None, sync_names=None):
        self.calls.append(("write_config", sync_names))

    def reload(self):
        self.calls.append(("reload",))

    def terminate_clients(self):
        self.calls.append(("terminate_clients",))

    def has_standby_signal(self):
        return False

    def status(self, timeout, standby):  # the standby has flushed everything
        return agent.PgStatus("primary", "pg2", 100, "streaming", "sync", 100, 1.0)

    # the fence
    def arm(self, seconds):
        pass

    def open_for(self, seconds):
        self.lease_left = seconds
        return True

    def renew(self, seconds):
        self.lease_left = seconds
        return True

    def open(self):
        self.lease_left = float("inf")

    def close(self):
        self.lease_left = None

    def lease(self):
        return self.lease_left

    def let_through(self, address, seconds):
        self.calls.append(("let_through", address))

    def stop_letting_through(self):
        self.calls.append(("stop_letting_through",))


def lab_config(tmp_path, node):
    cfg = agent.load_config(str(REPO / "agent.ini"), node)
    for d in ("state", "log"):
        (tmp_path / node / d).mkdir(parents=True, exist_ok=True)
    return dataclasses.replace(cfg, state_dir=str(tmp_path / node / "state"),
                               log_dir=str(tmp_path / node / "log"))


class Wire:
    """Requests from a DbAgent go straight to a real ArbiterAgent's handle(); a reply can be
    lost after the arbiter acted on the request."""

    def __init__(self, arbiter):
        self.arbiter, self.lose_next_reply, self.down = arbiter, False, False

    def __call__(self, cfg, key, peer, kind, body, timeout):
        if self.down:
            raise socket.timeout("timed out")
        reply = self.arbiter.handle(cfg.me.name, kind, body)
        if self.lose_next_reply:
            self.lose_next_reply = False
            raise socket.timeout("timed out")  # the arbiter acted; pg1 never hears of it
        return reply


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    arb = agent.ArbiterAgent(lab_config(tmp_path, "arb"), b"k" * 32)
    arb.view = View(1, "pg1", None, 4)
    arb.state.save(arb.view)
    pg1 = agent.DbAgent(lab_config(tmp_path, "pg1"), b"k" * 32)
    pg1.view = arb.view
    pg1.pg = pg1.fence = Recorder()
    wire = Wire(arb)
    monkeypatch.setattr(agent, "call", wire)
    return arb, pg1, wire


def act(node, obs):
    decision = decide_db("pg1", "pg2", "arb", obs, T)
    getattr(node, "do_" + decision.action)(decision)
    return decision


# -- 1. the primary stops waiting on a stale view -----------------------------------------------

def test_finding1_primary_never_stops_waiting_on_its_local_view():
    """eligible None locally, the standby silent: clearing synchronous_standby_names needs the
    arbiter's word first (drop_standby), and without the arbiter writes keep waiting."""
    silent = {"view": View(1, "pg1", None, 5), "sync_names": "pg2", "standby_streaming": False,
              "standby_seen_at": NOW - 10, "standby_synced": False}
    d = decide_db("pg1", "pg2", "arb", primary_obs(**silent), T)
    assert d.action == "drop_standby" and d.sync_names == ""
    cut_off = primary_obs(contact_at={"pg2": NOW - 10, "arb": NOW - 1.5}, **silent)
    d = decide_db("pg1", "pg2", "arb", cut_off, T)
    assert d.action in ("none", "fence") and d.sync_names is None


def test_finding1_lost_reply_to_mark_eligible_never_releases_writes(cluster):
    """The lab reproduction, with the real arbiter: it records `eligible pg2` but its reply to
    pg1 is lost; pg2 stops streaming. pg1 may clear synchronous_standby_names only after the
    arbiter has durably recorded that no standby is eligible, in its reply to that request."""
    arb, pg1, wire = cluster
    wire.lose_next_reply = True
    act(pg1, primary_obs(view=pg1.view, sync_names="pg2"))  # mark_eligible, reply lost
    assert arb.view.eligible == "pg2" and pg1.view.eligible is None
    for _ in range(3):  # the standby is silent now
        obs = primary_obs(view=pg1.view, sync_names="pg2", standby_streaming=False,
                          standby_seen_at=NOW - 10, standby_synced=False)
        act(pg1, obs)
        cleared = ("write_config", "") in pg1.pg.calls
        assert not cleared or arb.state.load().eligible is None, \
            "pg1 stopped waiting while the arbiter's durable view still made pg2 eligible"
        if cleared:
            break
    assert cleared and pg1.view.eligible is None


def test_finding1_a_stale_eligibility_request_is_refused():
    """A delayed mark_eligible based on view seq 4 arrives after the drop made seq 5."""
    dropped = View(1, "pg1", None, 5)
    ok, view, reason = agent.decide_eligibility(dropped, "pg1", 1, 4, "pg2", True)
    assert not ok and view == dropped and "seq 4" in reason
    ok, view, _ = agent.decide_eligibility(dropped, "pg1", 1, 5, "pg2", True)
    assert ok and view.eligible == "pg2" and view.seq == 6


# -- 3. a restarted agent forgets how long it has been cut off ----------------------------------

def test_finding3_a_lease_is_never_revived_nor_adopted():
    """A lease that lapsed, or one a previous process left, is not extended by new contact:
    only the arbiter's confirmation opens a new one (unfence)."""
    assert agent.lease_extension(None, NOW - 0.1, NOW, T) is None  # never held by us
    assert agent.lease_extension(NOW - 0.01, NOW - 0.1, NOW, T) is None  # lapsed
    assert agent.lease_extension(NOW + 0.5, NOW - 0.1, NOW, T) == pytest.approx(NOW + 0.9)
    assert agent.lease_extension(NOW + 0.5, None, NOW, T) == NOW + 0.5
    assert agent.lease_extension(None, NOW - 0.2, NOW, T, opening=True) == pytest.approx(
        NOW + 0.8)
    assert agent.lease_extension(None, NOW - 1.2, NOW, T, opening=True) is None


def test_finding3_a_restarted_primary_agent_starts_fenced(tmp_path):
    node = agent.DbAgent(lab_config(tmp_path, "pg1"), b"k" * 32)
    assert node.fenced and node.lease_mode == "closed" and node.confirm_after == node.started_at


# -- 4. a switchover unfences when the arbiter did not answer -----------------------------------

def test_finding4_handover_without_an_answer_stays_fenced_until_settled(cluster):
    arb, pg1, wire = cluster
    arb.view = View(1, "pg1", "pg2", 4)
    arb.state.save(arb.view)
    pg1.view = arb.view
    pg1.switchover = {"done": threading.Event(), "result": None}
    arb.observations.heard("pg2", {"stamp": time.monotonic(), "boot": arb.boot,
                                   "pg": "standby", "fenced": False}, time.monotonic())
    wire.lose_next_reply = True  # the arbiter records the handover; pg1 hears nothing
    pg1.do_handover(agent.Decision("handover", "test"))
    assert arb.view.primary == "pg2"  # it did happen
    assert pg1.fenced and pg1.handover_unsettled and pg1.fence.lease() is None
    obs = primary_obs(view=pg1.view, fenced=True, handover_unsettled=True,
                      contact_at={"pg2": NOW - 0.1, "arb": NOW - 0.05},
                      confirm_after=NOW - 0.5)
    assert decide_db("pg1", "pg2", "arb", obs, T).action == "settle_handover"
    pg1.do_settle_handover(None)
    assert pg1.view.primary == "pg2" and not pg1.handover_unsettled  # learned: replaced


def test_finding4_a_late_handover_request_is_stale_after_settling():
    view = View(1, "pg1", "pg2", 4)
    ok, settled, _ = agent.decide_settle(view, "pg1", 1)
    assert ok and settled.seq == 5 and settled.primary == "pg1"
    ok, after, _ = agent.decide_handover(settled, "pg1", 1, 4, "pg2", NOW, NOW, T)
    assert not ok and after == settled


def test_finding4_switchover_requests_are_set_under_a_lock(tmp_path):
    node = agent.DbAgent(lab_config(tmp_path, "pg1"), b"k" * 32)
    node.view = View(1, "pg1", "pg2", 4)
    node.SWITCHOVER_WAIT = 0.3
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(
        node.handle("cli", "switchover", {}))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    busy = [a for a in answers if "under way" in a["reason"]]
    assert len(busy) == 7 and node.switchover is None


# -- 5. contact is counted before the reply's view is learned ------------------------------------

class FailingState(agent.StateFile):
    def save(self, view):
        raise OSError(28, "No space left on device")


def test_finding5_a_view_that_cannot_be_persisted_is_no_contact(tmp_path):
    node = agent.DbAgent(lab_config(tmp_path, "pg1"), b"k" * 32)
    node.view = View(1, "pg1", "pg2", 4)
    node.state = FailingState(node.state.path, node.view)
    stamp = time.monotonic()
    newer = {"pg": "none", "view": View(2, "pg2", None, 5).as_dict(), "stamp": 1.0,
             "echo": {"stamp": stamp, "boot": node.boot, "pg": "primary", "fenced": False}}
    with pytest.raises(OSError):
        node.note_status("arb", newer, time.monotonic())
    assert "arb" not in node.observations.contact_at and node.observations.lease_anchor is None
    assert node.view.term == 1


def test_finding5_the_view_is_learned_before_the_contact_counts(tmp_path):
    node = agent.DbAgent(lab_config(tmp_path, "pg1"), b"k" * 32)
    node.view = View(1, "pg1", "pg2", 4)
    seen = []
    original = node.observations.heard

    def heard(peer, echo, now, arbiter=False):
        seen.append(node.view.term)
        original(peer, echo, now, arbiter)

    node.observations.heard = heard
    node.note_status("arb", {"pg": "none", "view": View(2, "pg2", None, 5).as_dict(),
                             "stamp": 1.0, "echo": {"stamp": time.monotonic(), "boot": node.boot,
                                                    "pg": "primary", "fenced": False}},
                     time.monotonic())
    assert seen == [2]


def test_finding5_contact_is_what_the_peer_provably_heard():
    """An echo of our stamp is contact from that stamp; only a stamp sent as a running,
    unfenced primary anchors the lease (a fenced one only when the arbiter echoes it: only the
    arbiter counts a fenced primary alive); an echo from another boot, from our future, or of
    nothing is no contact."""
    obs = agent.Observations("boot-1")

    def echo(stamp, pg="primary", fenced=False, boot="boot-1"):
        return {"stamp": stamp, "boot": boot, "pg": pg, "fenced": fenced}

    obs.heard("arb", None, NOW)
    obs.heard("arb", echo(NOW - 0.5, boot="boot-0"), NOW)  # before a reboot: monotonic reset
    obs.heard("arb", echo(NOW + 5), NOW)  # never in our future
    obs.heard("arb", echo(float("nan")), NOW)
    assert obs.contact_at == {} and obs.lease_anchor is None
    obs.heard("arb", echo(NOW - 0.3, pg="standby"), NOW)
    assert obs.contact_at == {"arb": NOW - 0.3} and obs.lease_anchor is None
    obs.heard("pg2", echo(NOW - 0.25, fenced=True), NOW)
    assert obs.lease_anchor is None  # the standby did not count a fenced primary alive
    obs.heard("arb", echo(NOW - 0.22, fenced=True), NOW, arbiter=True)
    assert obs.lease_anchor == NOW - 0.22
    obs.heard("pg2", echo(NOW - 0.2), NOW)
    assert obs.lease_anchor == NOW - 0.2


# -- 6. the fence can be skipped or come late ----------------------------------------------------

def test_finding6_the_timing_inequality_is_the_kernels():
    agent.check_timing("agent.ini", T)
    with pytest.raises(agent.ConfigError, match="failover_timeout"):
        agent.check_timing("agent.ini", dataclasses.replace(T, failover_timeout=1.3))
    with pytest.raises(agent.ConfigError, match="check_interval"):
        agent.check_timing("agent.ini", dataclasses.replace(T, check_interval=0.7))


def test_finding6_a_slow_postgres_status_does_not_skip_the_fence():
    """pg 'down' because a status query timed out: the primary's lease still lapses on its
    own (the kernel), and a replaced node whose port is open is fenced whatever pg says."""
    d = decide_db("pg1", "pg2", "arb", primary_obs(view=View(2, "pg2", None, 6), pg="primary",
                                                   fenced=True, port_open=True), T)
    assert d.action == "fence"
    assert agent.lease_extension(NOW - 0.001, None, NOW, T) is None


def test_finding6_the_lease_is_read_from_the_kernels_elements():
    """A GETSETELEM reply's attributes, as the kernel nests them (the kernel test checks the
    real thing): each element's key and the milliseconds it has left, if it has a timeout."""
    sets = agent.SetElements("bobry_fence")
    attr, nested = sets._attr, sets._nested

    def element(key, ms_left):
        expires = [] if ms_left is None else [attr(5, struct.pack(">Q", ms_left))]
        return nested(1, nested(1, attr(1, key)), attr(4, struct.pack(">Q", 1000)), *expires)

    port_5432, other = b"\x15\x38", b"\x15\x39"
    reply = attr(1, b"bobry_fence\0") + attr(2, b"lease\0") + nested(
        3, element(other, 5), element(port_5432, 873))
    elements = list(sets._decode(reply))
    assert elements == [(other, 5), (port_5432, 873)]
    assert agent.lease_left(elements, port_5432) == pytest.approx(0.873)
    assert agent.lease_left([(port_5432, None)], port_5432) == float("inf")
    assert agent.lease_left([(other, 5)], port_5432) is None
    assert agent.Fence(5432).port_key == port_5432


# -- 7. clock offset between hosts ---------------------------------------------------------------

@pytest.mark.parametrize("offset", [-2.0, 0.0, 5.0])
def test_finding7_standby_liveness_is_judged_on_the_primarys_clock(offset):
    """A standby replying every second with its clock `offset` s off: heard at each reply."""
    reply_time, seen_at = None, None
    for tick in range(50):
        now = NOW + tick * 0.2
        standby_clock = 1.7e9 + int(now - NOW) + offset  # a new reply_time every second
        reply_time, seen_at = agent.standby_heard(reply_time, seen_at, standby_clock, now)
        assert now - seen_at < 1.0 + 1e-9
    # the standby goes silent: its reply_time stops changing, and it is lost on our clock
    for tick in range(1, 15):
        reply_time, seen_at2 = agent.standby_heard(reply_time, seen_at, reply_time,
                                                   now + tick * 0.2)
        assert seen_at2 == seen_at


# -- 9. strict_sync is forgotten after a failover -------------------------------------------------

def test_finding9_strict_sync_holds_from_the_new_primarys_first_moment(tmp_path):
    granted = View(2, "pg2", None, 6)
    assert agent.desired_sync_names(granted, other="pg1", strict=True) == "pg1"
    assert agent.desired_sync_names(granted, other="pg1", strict=False) == ""
    cfg = dataclasses.replace(lab_config(tmp_path, "pg2"), strict_sync=True)
    node = agent.DbAgent(cfg, b"k" * 32)
    node.view = granted
    assert node.wanted_sync_names() == "pg1"
    d = decide_db("pg2", "pg1", "arb", primary_obs(view=granted, sync_names="",
                                                   standby_streaming=False, standby_synced=False,
                                                   strict_sync=True), T)
    assert d.action == "set_sync" and d.sync_names == "pg1"


# -- 11. children outlive a killed agent ----------------------------------------------------------

def test_finding11_a_restarted_agent_waits_for_a_leftover_child(tmp_path):
    """The lock passes to pg_rewind/pg_basebackup-like children: while one outlives its agent,
    the next agent waits; once it is gone, the next agent runs."""
    state = tmp_path / "state"
    first = agent.AgentLock(str(state))
    assert first.acquire(agent.logging.getLogger("t"), threading.Event())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"],
                             pass_fds=(first.fd,))
    os.close(first.fd)  # the agent is killed; its child lives on with the lock
    try:
        stop = threading.Event()
        threading.Timer(0.5, stop.set).start()
        began = time.monotonic()
        assert not agent.AgentLock(str(state)).acquire(agent.logging.getLogger("t"), stop)
        assert time.monotonic() - began >= 0.45
        child.wait(5)
        assert agent.AgentLock(str(state)).acquire(agent.logging.getLogger("t"),
                                                   threading.Event())
    finally:
        child.kill()
        child.wait()


def test_finding11_data_directory_children_hold_the_lock(tmp_path):
    cfg = lab_config(tmp_path, "pg1")
    pg = agent.LocalPostgres(cfg)
    lock = agent.AgentLock(cfg.state_dir)
    pg.lock_fd = lock.fd
    probe = ["sh", "-c", f"flock -n {lock.fd} && echo inherited"]  # run as PostgreSQL's user
    held = pg._run(probe, timeout=10, holds_lock=True)
    assert held.stdout.strip() == "inherited", held.stderr
    plain = pg._run(probe, timeout=10)
    assert plain.returncode != 0 and "inherited" not in plain.stdout
    fcntl.flock(lock.fd, fcntl.LOCK_UN)


# -- rule 8: a standby killed after the grant was persisted, before pg_promote() ----------------

class Crash(BaseException):
    """The process dies here (SIGKILL): nothing after this line runs."""


def test_rule8_standby_killed_between_the_grant_and_pg_promote_promotes_after_restart(
        tmp_path, monkeypatch):
    arb = agent.ArbiterAgent(lab_config(tmp_path, "arb"), b"k" * 32)
    arb.view = View(1, "pg1", "pg2", 4)
    arb.state.save(arb.view)
    arb.started_at -= 10  # the arbiter has not seen pg1 for 10 s
    monkeypatch.setattr(agent, "call", Wire(arb))
    cfg = lab_config(tmp_path, "pg2")
    pg2 = agent.DbAgent(cfg, b"k" * 32)
    pg2.view = arb.view
    pg2.pg = pg2.fence = Recorder()

    def killed(*args, **kwargs):
        raise Crash()

    pg2.do_promote = killed
    pg2.observations.remember_stamp("arb", arb.status_body("pg2"))  # its latest news from arb
    pg2.arbiter_news = pg2.observations.echo_for("arb")  # as its tick saw it (DbAgent.tick)
    standby = {"pg": "standby", "has_standby_signal": True, "sync_names": None,
               "view": pg2.view, "primary_alive_at": NOW - 10,
               "contact_at": {"pg1": NOW - 10, "arb": NOW - 0.1}}
    with pytest.raises(Crash):
        decision = decide_db("pg2", "pg1", "arb", primary_obs(**standby), T)
        assert decision.action == "request_promotion"
        pg2.do_request_promotion(decision)
    assert arb.view.term == 2
    restarted = agent.DbAgent(cfg, b"k" * 32)  # the grant was persisted before acting on it
    assert (restarted.view.term, restarted.view.primary) == (2, "pg2")
    standby["view"] = restarted.view
    assert decide_db("pg2", "pg1", "arb", primary_obs(**standby), T).action == "promote"
    again = arb.handle("pg2", "promote", {"term": 1})  # a retried request: no second term
    assert again["granted"] and arb.view.term == 2


# -- the second hostile review (after the fixes above) ------------------------------------------

def test_review2_S1_a_promotion_asked_on_stale_news_is_refused():
    """A promote request held in the network (or queued) reaches the arbiter late: the
    primary may have regained the standby meanwhile. It carries the arbiter's latest stamp
    the standby had; older than promote_window (0.676 s here: 0.7 s less the hosts' clocks'
    allowance), it is refused."""
    assert agent.promote_window(T) == pytest.approx(0.676)
    for news in (None, NOW - 1.0):
        ok, view, reason = agent.decide_grant(agent.View(1, "pg1", "pg2", 4), "pg2", 1,
                                              NOW - 5, NOW, NOW - 100, T, news)
        assert not ok and view.term == 1 and "ask again" in reason
    ok, view, _ = agent.decide_grant(agent.View(1, "pg1", "pg2", 4), "pg2", 1, NOW - 5, NOW,
                                     NOW - 100, T, NOW - 0.5)
    assert ok and view.term == 2


class StandbyPg(Recorder):
    """A standby's PostgreSQL, streaming."""

    def data_exists(self):
        return True

    def has_standby_signal(self):
        return True

    def status(self, timeout, standby):
        return agent.PgStatus("standby", "")


def test_a_promotion_request_echoes_the_news_its_decision_saw(tmp_path, monkeypatch):
    """decide_grant's promote_window holds only for news that had reached the standby when it
    judged the primary lost (README, "The timing inequality, term by term"). A thread switch
    after the tick's snapshot may bring a sign of the primary and, after it, fresher news
    from the arbiter: the request must echo the news from before the snapshot."""
    sent = []
    monkeypatch.setattr(agent, "call", lambda cfg, key, peer, kind, body, timeout:
                        sent.append((kind, body)) or {"granted": False, "reason": "test"})
    pg2 = agent.DbAgent(lab_config(tmp_path, "pg2"), b"k" * 32)
    pg2.view = View(1, "pg1", "pg2", 4)
    pg2.pg = pg2.fence = StandbyPg()
    pg2.fence.open()
    pg2.lease_mode = "standby"
    pg2.started_at -= 10  # pg1 unseen for 10 s
    now = pg2.clock()
    obs = pg2.observations
    obs.contact_at["arb"] = now
    news = {"stamp": 1.0, "boot": "arb-boot", "pg": "none", "fenced": False}
    obs.remember_stamp("arb", news)
    snapshot = obs.snapshot

    def racing_snapshot():  # the heartbeat threads run right after it
        seen = snapshot()
        obs.alive("pg1", pg2.clock())
        obs.remember_stamp("arb", {**news, "stamp": 2.0})
        return seen

    obs.snapshot = racing_snapshot
    pg2.tick()
    assert sent == [("promote", {"term": 1, "echo": news})]


def test_review2_S2_a_status_is_taken_whole_before_or_after_a_grant(tmp_path):
    arb = agent.ArbiterAgent(lab_config(tmp_path, "arb"), b"k" * 32)
    done = threading.Event()
    with arb._view_lock:  # a grant in progress (decide, fsync, assign)
        worker = threading.Thread(target=lambda: (arb.handle("pg1", "status", {"pg": "primary"}),
                                                  done.set()))
        worker.start()
        assert not done.wait(0.3)  # the status waits for the grant to finish
    assert done.wait(5)
    worker.join()


def test_review2_S4_the_anchor_is_read_before_the_view(tmp_path):
    """The lease routine must not extend on an echo that came with the view replacing us."""
    node = agent.DbAgent(lab_config(tmp_path, "pg1"), b"k" * 32)
    node.view = View(1, "pg1", "pg2", 4)
    node.fence = Recorder()
    node.lease_mode, node.lease_until = "primary", time.monotonic() + 0.5

    class Racing(agent.Observations):
        @property
        def lease_anchor(self):  # the heartbeat thread learns term 2, then records the echo
            node.view = View(2, "pg2", None, 5)
            return time.monotonic()

        @lease_anchor.setter
        def lease_anchor(self, value):
            pass

    node.observations = Racing()
    node.extend_lease()
    assert node.lease_mode == "closed" and node.fence.lease() is None


def test_review2_L1_a_fenced_primary_is_no_sign_of_life_for_the_standby(tmp_path):
    standby = agent.DbAgent(lab_config(tmp_path, "pg2"), b"k" * 32)
    arb = agent.ArbiterAgent(lab_config(tmp_path, "arb"), b"k" * 32)
    fenced = {"pg": "primary", "fenced": True}
    assert not standby.counts_alive(fenced) and arb.counts_alive(fenced)
    assert standby.counts_alive({"pg": "primary", "fenced": False})


def test_review2_L2_a_slow_status_query_is_not_reported_as_down_at_once(tmp_path):
    node = agent.DbAgent(lab_config(tmp_path, "pg1"), b"k" * 32)
    node.last_pg_answer, node.pg_state = "primary", "down"
    node.pg_down_since = time.monotonic() - 0.5
    assert node.reported_pg() == "primary"
    node.pg_down_since = time.monotonic() - 1.5
    assert node.reported_pg() == "down"


def test_review2_no_peer_input_ends_a_routine(tmp_path):
    """An echo stamp too large for a float, NaN contact, odd pg values: the heartbeat routine
    goes on (and contact is not counted)."""
    node = agent.DbAgent(lab_config(tmp_path, "pg1"), b"k" * 32)

    class World(agent.World):
        def call(self, cfg, key, peer, kind, body, timeout):
            return {"pg": {"x": 1}, "stamp": 10 ** 400, "boot": node.boot, "fenced": "no",
                    "echo": {"stamp": 10 ** 400, "boot": node.boot, "pg": "primary"}}

    node.world = World()
    assert node.heartbeat_step(node.cfg.arbiter) >= 0
    assert node.observations.contact_at == {} and node.observations.echo_for("arb") is None



class _FailingWrites(Recorder):
    """A fence whose writes fail the given way: arm raises, or the write misses its window
    and the close after it raises."""

    def __init__(self, how):
        super().__init__()
        self.how, self.lease_left = how, float("inf")  # the paused primary's untimed element

    def arm(self, seconds):
        if self.how == "arm":
            raise RuntimeError("nft failed: Cannot allocate memory")

    def open_for(self, seconds):
        return False  # the window passed

    def close(self):
        raise RuntimeError("nft failed: Cannot allocate memory")


@pytest.mark.parametrize("how", ["arm", "close"])
def test_review4_F5_a_resume_the_kernel_did_not_take_is_never_reported_closed(tmp_path, how):
    """Resumed while holding the untimed paused lease: until the kernel has taken a timed lease
    or the close, the agent must not say "closed" -- the arbiter would end `resuming` on it
    (decide_resume_ack) and grant again while the port is open without a timeout."""
    node = agent.DbAgent(lab_config(tmp_path, "pg1"), b"k" * 32)
    node.view = View(3, "pg1", "pg2", 8, paused=False, resuming=True)
    node.fence = _FailingWrites(how)
    node.lease_mode, node.lease_until = "paused", None
    node.observations.lease_anchor = node.clock()
    with pytest.raises(RuntimeError):
        node.extend_lease()
    lease, view = node.lease_and_view()
    assert lease["mode"] == "paused"
    assert agent.decide_resume_ack(view, "pg1", view.as_dict(), lease["mode"]) is None
    node.fence.how = None  # the kernel takes writes again: the resume completes
    node.fence.open_for = lambda seconds: True
    node.extend_lease()
    assert node.lease_and_view()[0]["mode"] == "primary"


def test_a_view_offered_again_is_not_looked_at_but_one_not_yet_persisted_is(tmp_path):
    """learn() skips the view it dealt with last (every heartbeat brings it again); one whose
    save failed was not dealt with: the next offer must try to persist it again, or the
    exchange would count as contact with the view never persisted."""
    node = agent.DbAgent(lab_config(tmp_path, "pg2"), b"k" * 32)
    newer = View(node.view.term + 1, "pg2", None, node.view.seq + 1).as_dict()
    saves = []

    def failing_save(view):
        saves.append(view)
        raise OSError("disk full")
    node.state.save = failing_save
    for _ in range(2):
        with pytest.raises(OSError):
            node.learn(dict(newer), "arb")
    assert len(saves) == 2 and node.view.term == newer["term"] - 1
    node.state.save = saves.append
    node.learn(dict(newer), "arb")
    assert node.view == View.from_dict(newer) and len(saves) == 3
    node.state.save = failing_save  # looked at again, it would be saved again (and fail)
    node.learn(dict(newer), "arb")
    assert len(saves) == 3
