"""Regression scenarios: each finding of the review "Close every known path…" (issue 8) as a
scripted fault schedule on the simulator. Each passes on today's agent and fails with the
finding's fix reverted: `old()` puts the code before the fix back by monkeypatching (the
function as it was, or the world as the old fence saw it), so that the failure is shown, not
claimed (tests/sim/test_scenarios.py runs both ways)."""
import contextlib
import dataclasses

import agent

from . import world as simworld
from .run import run

SCENARIOS = {}


@dataclasses.dataclass
class Scenario:
    name: str
    script: object   # script(cluster): the faults, run on the simulated clock
    old: object      # a context manager: the code before the fix
    strict: bool = False
    expect: tuple = ()  # the violations the old code shows (any of them)
    seed: int = 1
    timing: object = None  # an agent.Timing the script's fixed delays are built on, or None
    fibers: bool = False   # steps as fibers: each thread blocks on its own, as real ones do

    @property
    def __doc__(self):
        return self.script.__doc__


def scenario(name, old, strict=False, expect=(), timing=None, fibers=False):
    def register(script):
        SCENARIOS[name] = Scenario(name, script, old, strict, expect, timing=timing,
                                   fibers=fibers)
        return script
    return register


# The windows some scripts were built on (agent.ini's [timing] until 2026-11-26): cut until
# its lease has lapsed (1.4 s), the primary is healed before the standby may ask for a
# failover (2.0 s), with room for a step that blocks. The defaults since leave 1.1 s and
# 1.5 s, too close for a fixed delay; the mechanism these scripts show (an armed window, its
# token) is the same.
WINDOWS_OF_2026 = agent.Timing(check_interval=0.2, probe_timeout=0.3, fence_timeout=1.2,
                               safety_margin=0.2, failover_timeout=2.0, restart_grace=6.0)


def run_scenario(name, old=False, log=None):
    s = SCENARIOS[name]
    with (s.old() if old else contextlib.nullcontext()):
        return run(s.seed, 0, strict=s.strict, log=log, setup=lambda c, plan: s.script(c),
                   wall_skew=0.0, timing=s.timing, fibers=s.fibers)


@contextlib.contextmanager
def patched(obj, attr, value):
    original = getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield original
    finally:
        setattr(obj, attr, original)


# -- helpers on the simulated cluster -----------------------------------------------------------

def wait(c, seconds):
    c.sched.run_until(c.sched.now + seconds)


def cut(c, a, b):
    for k in ((a, b), (b, a)):
        c.net.drop[k] = c.net.drop.get(k, 0) + 1
    c.trace("fault", f"cut {a} {b}")


def heal(c):
    c.net.drop.clear()
    c.net.block.clear()
    c.trace("fault", "heal everything")


def isolate(c, host, client_too=True):
    for other in simworld.HOSTS:
        if other != host and (client_too or other != "client"):
            cut(c, host, other)


def primary(c):
    return c.arb_view.primary


def until_fenced(c, node, within=3.0):
    """Run until node's agent has seen its lease lapse (cut off: its peers hear it no more):
    a heal then comes before the standby may ask for the next term, however early the
    standby's last sign of it was. (run_until looks between steps: some tenths later.)"""
    c.sched.run_until(c.sched.now + within, until=lambda: c.nodes[node].agent.fenced)
    assert c.nodes[node].agent.fenced, f"{node}'s lease never lapsed"


def write_gaps(c, start, end):
    times = sorted(t for t, _ in c.acked.values() if start <= t <= end)
    edges = [start, *times, end]
    return max(b - a for a, b in zip(edges, edges[1:]))


# -- 1. the primary stops waiting on a stale view -------------------------------------------------

@contextlib.contextmanager
def old_finding1():
    """Before the fix: a primary whose local view says nobody is eligible clears
    synchronous_standby_names at once, without the arbiter's word."""
    original = agent._decide_as_primary

    def decide(me, other, arbiter, obs, timing, age, arbiter_lost):
        d = original(me, other, arbiter, obs, timing, age, arbiter_lost)
        stale_branch = (d.action == "drop_standby" and obs.view.eligible is None) or \
            (d.action == "none" and "writes keep waiting" in d.reason)
        if stale_branch:
            return agent.Decision("set_sync", "(old) no standby is eligible in my view: "
                                              "writes stop waiting", "")
        return d

    with patched(agent, "_decide_as_primary", decide):
        yield


# fibers: as threads block, each on its own. In the nested mode a node whose step waits holding
# a lock takes no requests, and once calls_peer made the arbiter call the isolated primary
# (its requests having stopped), the standby's promotion requests waited out their deadline
# there: no grant, the script's premise gone (seeds 1-8 alike in fibers mode, both ways)
@scenario("finding1-stale-view-sync-clear", old_finding1, expect=("lost_acked",), fibers=True)
def finding1(c):
    """Finding 1: the arbiter records `eligible pg2` but its reply to pg1 is lost; pg2 stops
    streaming; pg1 must not stop waiting on its stale view; pg1 is then isolated and pg2
    asks for the promotion: no acknowledged write may be missing on pg2."""
    m, s = primary(c), c.other_db(primary(c))
    cut(c, m, s)                      # the standby is dropped (eligible None), durably
    wait(c, 4.0)
    heal(c)
    c.net.reply_drops.append((m, "eligibility"))  # the mark_eligible reply will be lost

    def marked(view):                 # and from that moment no one hears the arbiter
        if view.eligible == s:
            c.save_hooks.clear()
            cut(c, m, "arb")
            cut(c, s, "arb")
    c.save_hooks.append(marked)
    wait(c, 5.0)
    assert c.arb_view.eligible == s and c.nodes[m].agent.view.eligible is None
    c.pg[s].start_fails = True        # the standby's PostgreSQL stops and cannot start
    c.pg[s].stop("stopped behind the agent's back", clean=True)
    wait(c, 6.0)
    heal(c)
    isolate(c, m)                     # then the primary is cut off; the standby is back
    c.pg[s].start_fails = False
    grants = c.grants
    wait(c, 10.0)
    assert c.grants > grants, "the standby was never promoted: the scenario's premise failed"
    heal(c)


# -- 3. a restarted agent forgets how long it has been cut off ------------------------------------

@contextlib.contextmanager
def old_finding3():
    """Before the fix: a restarted agent ages peers it never heard from from its own start:
    as primary it serves until fence_timeout after its start, whatever the partition."""
    original = agent.DbAgent.prepare

    def prepare(self):
        ready = original(self)
        if ready and self.view.primary == self.cfg.me.name:
            self.observations.lease_anchor = self.clock()  # "heard" when it starts to act
            self.extend_lease(opening=True)
            self.fenced = self.lease_mode != "primary"
        return ready

    def open_for(self, seconds):  # and, as then, a write the kernel takes whenever it comes
        self._nft(lambda: self._set(self._timeout(seconds)))
        return True

    with patched(agent.DbAgent, "prepare", prepare), \
            patched(simworld.SimFence, "open_for", open_for):
        yield


@scenario("finding3-restarted-agent-forgets-partition", old_finding3, expect=("dual_rw",))
def finding3(c):
    """Finding 3: the primary is isolated, its agent killed 0.9 s into the partition (before
    it fenced) and started again 0.7 s later (as the lab's test does, a supervisor's delay):
    the port must be closed before the standby is granted the next term, whatever the
    restarted agent has not heard."""
    m = primary(c)
    isolate(c, m, client_too=False)
    wait(c, 0.9)
    c.crash(m, "SIGKILL (scenario)")
    wait(c, 0.7)
    c.start_agent(m)
    wait(c, 8.0)
    heal(c)


# -- 4. a switchover unfences when the arbiter did not answer ------------------------------

@contextlib.contextmanager
def old_finding4():
    """Before the fix: no answer to the handover request counts as a refusal, and the primary
    reopens its port at once."""
    def do_handover(self, decision):
        self.fence.let_through(self.other.address, self.HANDOVER_CATCHUP + 2)
        self.do_fence(decision)
        began = self.clock()
        while True:
            st = self.pg.status(self.LOCAL_TIMEOUT, self.other.name)
            if st.lsn is not None and st.standby_flush is not None \
                    and st.standby_flush >= st.lsn:
                break
            if self.clock() - began >= self.HANDOVER_CATCHUP:
                break
            self.world.sleep(0.05)
        answer = self._ask_arbiter("handover", {"to": self.other.name, "seq": self.view.seq})
        self.fence.stop_letting_through()
        if answer == "granted":
            self._finish_switchover(True, "done")
            return
        self.do_unfence(decision)  # (old) refused or unknown alike: reopen
        self._finish_switchover(False, "the arbiter refused the handover")

    with patched(agent.DbAgent, "do_handover", do_handover):
        yield


# fibers: see finding1 (seeds 1-8 alike in fibers mode, both ways)
@scenario("finding4-handover-without-answer", old_finding4, expect=("dual_rw", "dual_ack"),
          fibers=True)
def finding4(c):
    """Finding 4: a switchover whose handover request the arbiter grants but whose reply is
    lost: the old primary must stay fenced until the arbiter settles it."""
    m = primary(c)
    c.net.reply_drops.append((m, "handover"))
    request, refusal = c.nodes[m].agent.ask_switchover()
    assert request is not None, refusal
    wait(c, 10.0)
    assert c.handovers == 1, "the handover never happened: the scenario's premise failed"


# -- 5. contact is counted before the reply's view is learned -------------------------------------

@contextlib.contextmanager
def old_finding5():
    """Before the fix: the exchange counts as contact first, then the view is learned (and a
    view that cannot be persisted leaves the contact counted)."""
    def note_status(self, sender, body, at):
        self.observations.remember_stamp(sender, body)
        self.observations.heard(sender, body.get("echo"), at,
                                arbiter=sender == self.cfg.arbiter.name)
        if isinstance(body.get("view"), dict):
            self.learn(body["view"], sender)
        if self.counts_alive(body):
            self.observations.alive(sender, at)

    with patched(agent.Agent, "note_status", note_status):
        yield


@scenario("finding5-contact-before-view-learned", old_finding5, expect=("dual_rw", "dual_ack"))
def finding5(c):
    """Finding 5: the isolated primary is replaced; its disk fills up before the partition
    heals, so it cannot persist the new view: the exchange with the arbiter must not count
    as contact, or the replaced primary reopens as the primary of the old term."""
    m = primary(c)
    isolate(c, m, client_too=False)
    wait(c, 5.0)
    assert primary(c) != m, "no failover"
    c.nodes[m].disk_fail = True
    heal(c)
    wait(c, 10.0)
    c.nodes[m].disk_fail = False


# -- 6. the fence can be skipped or come late: now the kernel's lease ------------------------------

@contextlib.contextmanager
def old_finding6():
    """Before the fix: the fence was a rule the agent added itself; the kernel knew no
    deadline (an nft element without timeout: open until the agent closes it)."""
    def open_for(self, seconds):
        self._nft(lambda: self._set(float("inf")))
        return True

    def renew(self, seconds):
        return self._nft(lambda: self.k.open_at(self.w.sched.now))

    with patched(simworld.SimFence, "open_for", open_for), \
            patched(simworld.SimFence, "renew", renew):
        yield


@scenario("finding6-frozen-agent-fenced-by-the-kernel", old_finding6,
          expect=("dual_rw", "unbounded_lease"))
def finding6(c):
    """Finding 6: the primary is isolated and its agent frozen (SIGSTOP) for 6 s: the kernel
    closes the port before the standby may be granted the next term."""
    m = primary(c)
    isolate(c, m, client_too=False)
    c.nodes[m].paused_until = c.sched.now + 6.0
    wait(c, 8.0)
    heal(c)


# -- 7. clock offset between hosts -------------------------------

@contextlib.contextmanager
def old_finding7():
    """Before the fix: the standby's liveness was the primary's wall clock minus the
    walreceiver's reply_time, which is stamped with the standby's clock."""
    def observe_standby(self, st, now):
        if st.standby_state in ("streaming", "catchup") and st.standby_reply_time is not None:
            age = self.world.wall() - st.standby_reply_time
            seen = now - max(0.0, age)
            self.standby_seen_at = max(seen, self.standby_seen_at or seen)
        sync_now = (st.pg == "primary" and st.sync_names == self.other.name
                    and st.standby_sync == "sync")
        if not sync_now:
            self.sync_barrier = None
        elif self.sync_barrier is None:
            self.sync_barrier = st.lsn
        synced = (sync_now and st.standby_flush is not None
                  and st.standby_flush >= self.sync_barrier)
        return st.standby_state == "streaming", synced

    with patched(agent.DbAgent, "_observe_standby", observe_standby):
        yield


@scenario("finding7-standby-clock-behind", old_finding7, expect=("no_convergence",))
def finding7(c):
    """Finding 7: the standby's clock is 2.5 s behind the primary's; it loses its link for
    4 s and comes back: it must become the eligible synchronous standby again."""
    m, s = primary(c), c.other_db(primary(c))
    c.nodes[s].wall_offset = c.nodes[m].wall_offset - 2.5
    cut(c, m, s)
    wait(c, 4.0)
    heal(c)


# -- 8. one-way faults ---------------------------------------------------------------------------

@contextlib.contextmanager
def old_finding8():
    """Before the fix: only the round trips a node starts count as contact; a peer's request
    (which echoes our stamp) did not."""
    def handle(self, sender, kind, body):
        if kind == "status":
            if isinstance(body.get("view"), dict):
                self.learn(body["view"], sender)
            if self.counts_alive(body):
                self.observations.alive(sender, self.clock())
            self.observations.remember_stamp(sender, body)
            if agent._finite(body.get("stamp")):  # as today (calls_peer's fallback)
                self.observations.requested_at[sender] = self.clock()
            return self.status_body(sender)
        raise agent.ProtocolError(f"{kind!r} is not served by {self.cfg.me.name}")

    with patched(agent.Agent, "handle", handle):
        yield


def _one_way(c, src, dsts, seconds):
    for d in dsts:
        c.net.block[(src, d)] = 1
    c.trace("fault", f"one-way: {src} cannot connect to {', '.join(dsts)}")
    began = c.sched.now
    wait(c, seconds)
    gap = write_gaps(c, began, c.sched.now)
    c.net.block.clear()
    if gap > 8.0:
        c.violation("no_writes", f"one-way fault from {src}: no write acknowledged for "
                                 f"{gap:.1f} s (want a primary that writes, or a failover)")


@scenario("finding8-one-way-faults", old_finding8, expect=("no_writes",))
def finding8(c):
    """Finding 8: the primary cannot open connections to the arbiter nor the standby, which
    can reach it: it keeps its lease and its role (their calls reach it once its own stop,
    calls_peer, and their requests' echoes anchor its lease); then each other one-way
    direction in turn: writes go on (or fail over). Healed, a switchover must work: the
    arbiter knows that the standby hears it from the echoes in the standby's requests."""
    m = primary(c)
    grants = c.grants
    _one_way(c, m, [c.other_db(m), "arb"], 20.0)
    if c.grants != grants:
        c.violation("needless_failover", f"{m} lost its role while only its own connections "
                                         "failed")
    wait(c, 10.0)
    for src, dst in (("arb", primary(c)), (c.other_db(primary(c)), primary(c)),
                     (primary(c), "arb"), (primary(c), c.other_db(primary(c)))):
        _one_way(c, src, [dst], 10.0)
        wait(c, 10.0)
    m = primary(c)
    c.sched.run_until(c.sched.now + 20.0, until=lambda: c.arb_view.eligible == c.other_db(m))
    request, refusal = c.nodes[m].agent.ask_switchover()
    assert request is not None, refusal
    c.sched.run_until(c.sched.now + 10.0, until=lambda: primary(c) != m)
    if primary(c) == m:
        c.violation("no_switchover", f"{m} could not hand over to {c.other_db(m)} once healed")


# -- one exchange per pair: the answering side calls once the caller's requests stop -----------

@contextlib.contextmanager
def old_designated_callers_only():
    """Before the fix (found by the hostile read of one exchange per pair): only the
    designated side of a pair ever called, so a caller that could not open connections, or
    two views that each named the other node primary, left the pair without an exchange."""
    def calls_peer(me, peer, view, arbiter, unheard_for, timing):
        return me != arbiter and (peer == arbiter or view.primary == me)

    with patched(agent, "calls_peer", calls_peer):
        yield


# finding8's script again, its first phase against the code without the fallback: the primary
# that cannot open connections must keep its role
SCENARIOS["one-way-faults-without-the-fallback"] = dataclasses.replace(
    SCENARIOS["finding8-one-way-faults"], name="one-way-faults-without-the-fallback",
    old=old_designated_callers_only, expect=("needless_failover",))


def _set_pause(c, paused):
    arb, view = c.nodes["arb"].agent, c.arb_view
    return arb.handle("arb", "pause", {"term": view.term, "seq": view.seq, "paused": paused})


@scenario("resume-while-the-primary-cannot-call-the-arbiter", old_designated_callers_only,
          expect=("stuck_resuming", "no_failover"))
def resume_one_way(c):
    """Paused; the primary can no longer open connections to the arbiter; resumed. The
    arbiter must hear, by calling the primary, that its lease is timed again (else it stays
    "resuming" and grants nothing), and a failover must then be possible."""
    m, s = primary(c), c.other_db(primary(c))
    c.sched.run_until(c.sched.now + 20.0, until=lambda: c.arb_view.eligible == s)
    assert _set_pause(c, True)["granted"]
    wait(c, 2.0)
    c.net.block[(m, "arb")] = 1
    c.trace("fault", f"one-way: {m} cannot connect to arb")
    assert _set_pause(c, False)["granted"]
    wait(c, 5.0)
    if c.arb_view.resuming:
        c.violation("stuck_resuming", f"the arbiter never heard that {m}'s lease is timed again")
    grants = c.grants
    isolate(c, m)
    wait(c, 10.0)
    if c.grants == grants:
        c.violation("no_failover", f"{m} isolated for 10 s after the resume: no grant")
    heal(c)


@scenario("handover-then-the-new-primary-cannot-call-the-arbiter",
          old_designated_callers_only, expect=("no_writes",))
def handover_one_way(c):
    """A switchover; at once the new primary can no longer open connections to the arbiter.
    The old primary, which learned the new view, stops calling it; the new one, whose view
    may still name the old primary, does not call it either: unless the one not called
    calls, the new primary never learns its role and no write is acknowledged."""
    m, s = primary(c), c.other_db(primary(c))
    c.sched.run_until(c.sched.now + 20.0, until=lambda: c.arb_view.eligible == s)
    request, refusal = c.nodes[m].agent.ask_switchover()
    assert request is not None, refusal
    c.sched.run_until(c.sched.now + 10.0, until=lambda: primary(c) != m)
    _one_way(c, s, ["arb"], 15.0)
    heal(c)


# -- 9. strict_sync is forgotten after a failover -------------------------------------------------

@contextlib.contextmanager
def old_finding9():
    """Before the fix: whom the primary waits for ignored strict_sync once nobody was eligible
    (a new primary ran with synchronous_standby_names = '')."""
    def desired(view, standby_streaming=False, other=None, strict=False):
        if view.eligible:
            return view.eligible
        return other if standby_streaming and other else ""

    with patched(agent, "desired_sync_names", desired):
        yield


@scenario("finding9-strict-sync-after-failover", old_finding9, strict=True,
          expect=("strict_sync_single_host",))
def finding9(c):
    """Finding 9: with strict_sync, the primary is isolated and the standby takes over: no
    write may be acknowledged while it rests on one host."""
    m = primary(c)
    isolate(c, m, client_too=False)
    wait(c, 10.0)
    heal(c)


# -- found by the simulator: the checkpoint after a promotion dies with the agent ----------------

@contextlib.contextmanager
def old_checkpoint_at_start():
    """Before the fix: only do_promote asks for the checkpoint that lets the replaced node
    rejoin; a restarted primary agent does not."""
    def prepare(self):
        self.pg.prepare_dirs()
        if not self.hold_lock():
            return False
        self.pg.lock_fd = self.lock.fd
        self.view = self.state.load()
        self.fence.install()
        return True

    with patched(agent.DbAgent, "prepare", prepare):
        yield


@scenario("sim-promoted-agent-killed-before-checkpoint", old_checkpoint_at_start,
          expect=("no_convergence",))
def promoted_agent_killed(c):
    """Found by the simulator (seed 23): the new primary's agent is killed right after
    pg_promote(), before its checkpoint ran: the old primary must still rejoin within the
    bound (pg_rewind needs the new timeline in the new primary's pg_control)."""
    m, s = primary(c), c.other_db(primary(c))
    isolate(c, m, client_too=False)
    c.promotion_hooks.append(lambda name: c.crash(name, "SIGKILL right after pg_promote() "
                                                      "(scenario)"))
    c.sched.run_until(c.sched.now + 10.0, until=lambda: c.pg[s].is_primary)
    c.promotion_hooks.clear()
    wait(c, 1.0)
    c.start_agent(s)
    heal(c)
    wait(c, 2.0)



# -- found by the simulator ---------------------------------------------------------------------

@contextlib.contextmanager
def old_unarmed_writes():
    """Before the fix: no armed window (no arm before computing the lease); the kernel took a
    write whenever it came, with a timeout counted from then."""
    with patched(simworld.SimFence, "_armed_then", lambda self, change: change), \
            patched(simworld.SimFence, "arm", lambda self, seconds: None):
        yield


# fibers (since 2026-11-27, late), as finding1: with every peer's calls on one slot, the nested
# mode held the arbiter's answers to the standby's promotion requests behind the calls that
# blocked with them (a grant 3.6 s after the cut, not 2.0 s), later than the stalled opening
@scenario("sim-late-opening-outlives-the-grant", old_unarmed_writes,
          expect=("dual_rw", "dual_ack"), timing=WINDOWS_OF_2026, fibers=True)
def late_opening(c):
    """Found by the simulator (seed 5): a fenced primary decides to unfence on the arbiter's
    fresh word, and the opening reaches the kernel 2.5 s later (nft slow, or the agent stopped
    between computing the lease and running nft) while the primary is cut off. The element's
    timeout counts from when the kernel takes it, so without the armed window the port opens
    after the standby was granted the next term."""
    m = primary(c)
    agent_m = c.nodes[m].agent
    cut(c, m, "arb")
    cut(c, m, c.other_db(m))
    until_fenced(c, m)
    original = agent_m.do_unfence

    def do_unfence(decision):          # the moment it decides, nft stalls and the link goes
        agent_m.do_unfence = original
        c.nodes[m].nft_slow = 2.5
        cut(c, m, "arb")
        cut(c, m, c.other_db(m))
        return original(decision)
    agent_m.do_unfence = do_unfence
    heal(c)
    wait(c, 8.0)
    c.nodes[m].nft_slow = 0.0
    heal(c)


# -- found by the simulator: killed between pg_rewind and standby.signal -------------------------

@contextlib.contextmanager
def old_rewound_unseen():
    """Before the fix: the decision did not know what pg_control says of the data directory:
    a replaced node down without standby.signal always rejoined through do_rejoin, whose
    timeline check waits for the new primary's timeline to be newer than its own."""
    original = agent._decide_db

    def decide(me, other, arbiter, obs, timing):  # nor had it the rewind's mark then
        return original(me, other, arbiter,
                        dataclasses.replace(obs, rewound=False, rewind_unfinished=False), timing)

    with patched(agent, "_decide_db", decide):
        yield


@scenario("sim-killed-between-rewind-and-standby-signal", old_rewound_unseen,
          expect=("no_convergence",))
def killed_after_rewind(c):
    """Found by the simulator (seed 1124 of the long run): the replaced primary's agent is
    killed after pg_rewind finished and before it wrote standby.signal (in the lab: killed
    during the rewind, whose child outlives it and finishes). pg_control now shows the new
    primary's timeline, so a rejoin that first asks "has the new primary checkpointed a newer
    timeline than mine?" waits forever; pg_control also says "in archive recovery", which
    only a complete rewind leaves: the restarted agent must start it as a standby."""
    m, s = primary(c), c.other_db(primary(c))
    isolate(c, m, client_too=False)
    c.sched.run_until(c.sched.now + 10.0, until=lambda: c.pg[s].is_primary)
    pg_m = c.nodes[m].agent.pg
    original = pg_m.rewind

    def rewind(view, boot):
        original(view, boot)
        c.crash(m, "SIGKILL right after pg_rewind (scenario)")
        raise simworld.SimCrash(m)
    pg_m.rewind = rewind
    wait(c, 3.0)          # the new primary checkpoints its timeline
    heal(c)
    wait(c, 5.0)
    if c.nodes[m].alive is False:
        c.start_agent(m)
    wait(c, 2.0)


# -- a pg_rewind that stops half-way ------------------------------------------------------------

@contextlib.contextmanager
def old_unfinished_rewind_unseen():
    """Before the fix: the decision did not know that a rewind had begun: a replaced node down
    without standby.signal rewound again, whatever an earlier rewind had left."""
    original = agent._decide_db

    def decide(me, other, arbiter, obs, timing):
        return original(me, other, arbiter, dataclasses.replace(obs, rewind_unfinished=False),
                        timing)

    with patched(agent, "_decide_db", decide):
        yield


def _rewind_stops(c, how):
    m = primary(c)
    isolate(c, m, client_too=False)
    c.sched.run_until(c.sched.now + 10.0, until=lambda: c.pg[c.other_db(m)].is_primary)
    c.nodes[m].rewind_stops = how
    wait(c, 3.0)          # the new primary checkpoints its timeline
    heal(c)
    wait(c, 3.0)
    assert c.nodes[m].rewind_stops is None, "the replaced node never rewound"
    if not c.nodes[m].alive:
        c.start_agent(m)
    wait(c, 6.0)


@scenario("rewind-times-out-half-way", old_unfinished_rewind_unseen, expect=("torn_start",))
def rewind_times_out(c):
    """The replaced primary's pg_rewind stops half-way: subprocess.run's timeout (600 s) kills
    it, the source having gone silent mid-copy. Its files are now of two servers; PostgreSQL's
    manual says no second pg_rewind can repair them: the node must be cloned afresh, never
    rewound again and started."""
    _rewind_stops(c, "timeout")


@scenario("rewind-killed-with-its-agent", old_unfinished_rewind_unseen, expect=("torn_start",))
def rewind_killed(c):
    """The replaced primary's agent is SIGKILLed with its pg_rewind child (the whole unit, the
    OOM killer) half-way through the rewind; pg_control is still the old one, so nothing in
    the data directory says a rewind began: the agent's durable mark must."""
    _rewind_stops(c, "kill")


# -- found by the simulator: a promotion whose opening misses the armed window ---------------------

@contextlib.contextmanager
def old_standby_lease_kept():
    """Before the fix: an opening that missed its armed window left the lease as it was, so
    a promoted standby kept its standby element (open, no timeout)."""
    original = agent.DbAgent._close_lease

    def close_lease(self):
        import inspect
        if inspect.stack()[1].function == "extend_lease" and self.lease_mode == "standby":
            return
        original(self)

    with patched(agent.DbAgent, "_close_lease", close_lease):
        yield


@scenario("sim-promotion-opening-missed-keeps-standby-lease", old_standby_lease_kept,
          expect=("unbounded_lease", "dual_rw", "dual_ack"))
def promotion_opening_missed(c):
    """Found by the simulator (seed 1151 of the long run): the standby is granted the next
    term while its nft calls are slow, so the primary lease it opens misses the armed window
    and nothing is written; its standby element (open, no timeout) must not stay: later, cut
    off, it must still be fenced before the other node is granted."""
    m, s = primary(c), c.other_db(primary(c))

    def granted(view):
        if view.primary == s:
            c.save_hooks.clear()
            c.nodes[s].nft_slow = 0.5
    c.save_hooks.append(granted)
    isolate(c, m, client_too=False)
    c.sched.run_until(c.sched.now + 10.0, until=lambda: c.pg[s].is_primary)
    wait(c, 1.0)
    c.nodes[s].nft_slow = 0.0
    wait(c, 3.0)
    heal(c)
    c.sched.run_until(c.sched.now + 30.0, until=lambda: c.arb_view.eligible == m)
    isolate(c, s, client_too=False)
    wait(c, 8.0)
    heal(c)


# -- the open finding D of the hostile review: a killed agent's nft child -----------------------

def _stale_child_then_restart(c, node, write, within, what):
    """Heal; node's next fence `write` (within `within` s) has its nft child stall while the
    agent is SIGKILLed; 0.5 s later the agent starts again. Returns a list holding the child's
    change, for the script to commit when it likes (the child outlives the agent)."""
    stalled = _killed_while_nft_runs(c, node, write)
    heal(c)
    c.sched.run_until(c.sched.now + within, until=lambda: stalled)
    assert stalled, f"{node} never {what}"
    wait(c, 0.5)
    c.start_agent(node)
    return stalled


def _killed_while_nft_runs(c, node, write):
    """The next `write` of node's fence: its nft child stalls and the agent is SIGKILLed
    meanwhile. Returns a list that then holds the child's change."""
    fence, stalled = c.nodes[node].agent.fence, []
    original = getattr(fence, write)

    def stall(change):
        stalled.append(change)
        c.crash(node, "SIGKILL while its nft child stalls (scenario)")
        raise simworld.SimCrash(node)

    def killed_during(*args):
        fence._nft = stall
        return original(*args)
    setattr(fence, write, killed_during)
    return stalled


@contextlib.contextmanager
def old_shared_window():
    """Before the fix: every arm made the same element of the set `fresh` (the port), so a
    write took whichever armed window was open -- also one armed by a later incarnation."""
    def armed_then(self, change):
        def write():
            k = self.k
            if k.fresh is None or k.fresh[1] <= self.w.sched.now:
                return False
            k.fresh = None
            return change()
        return write

    with patched(simworld.SimFence, "_armed_then", armed_then):
        yield


# fibers (since 2026-11-27, late): see sim-late-opening-outlives-the-grant
@scenario("findingD-killed-agents-nft-child-takes-a-later-window", old_shared_window,
          expect=("dual_rw", "dual_ack"), timing=WINDOWS_OF_2026, fibers=True)
def stale_nft_child(c):
    """Finding D of the hostile review: a fenced primary's agent decides to unfence and is
    SIGKILLed while its opening's nft child stalls; the child outlives it. The restarted agent
    unfences too, cut off again at that moment, its nft slow (1 s). If the old child commits
    just after the new arm, it must not take the new window: it would open the lease for the
    old agent's full term, counted from then, past the standby's grant."""
    m = primary(c)
    cut(c, m, "arb")
    cut(c, m, c.other_db(m))
    until_fenced(c, m)
    stalled = _stale_child_then_restart(c, m, "open_for", 3.0, "unfenced")
    agent_m = c.nodes[m].agent
    original_arm = agent_m.fence.arm
    committed = []

    def commit_stale():
        committed.append(stalled.pop()())
        c.trace(m, f"the killed agent's nft child commits: {committed[-1]}")

    # The restarted agent's opening arms the fence: cut off again at that moment, its nft slow;
    # the old child commits 10 ms after the new arm does. (Its first unfence may find no
    # anchor yet -- its first heartbeat went out before its first look at PostgreSQL -- and
    # then stays fenced without arming.)
    def arm(seconds):
        if stalled:
            c.nodes[m].nft_slow = 1.0
            cut(c, m, "arb")
            cut(c, m, c.other_db(m))
            c.sched.at(c.sched.now + c.nodes[m].nft_slow + 0.01, commit_stale)
        original_arm(seconds)
    agent_m.fence.arm = arm
    wait(c, 8.0)
    assert committed == [False], "the old child's write was not refused (or never came)"
    c.nodes[m].nft_slow = 0.0
    heal(c)


@contextlib.contextmanager
def old_unarmed_open():
    """Before the fix: a standby's element (open, no timeout) was written unarmed, whenever
    nft got to it."""
    def open_(self):
        def change():
            self._set(float("inf"))
            return True
        return self._nft(change)

    with patched(simworld.SimFence, "open", open_):
        yield


@scenario("killed-standbys-open-child-commits-after-its-promotion", old_unarmed_open,
          expect=("unbounded_lease", "dual_rw", "dual_ack"))
def stale_open_child(c):
    """Found by the hostile read of the finding D fix: a replaced primary rejoins, and its
    agent is SIGKILLed while the nft child of its unfence as a standby (an element open, no
    timeout) stalls. Restarted, the node becomes the eligible standby and is promoted; if the
    old child commits then, the new primary holds a lease that never ends, and cut off it is
    never fenced."""
    m, s = primary(c), c.other_db(primary(c))
    isolate(c, m, client_too=False)
    c.sched.run_until(c.sched.now + 10.0, until=lambda: c.pg[s].is_primary)
    stalled = _stale_child_then_restart(c, m, "open", 10.0, "unfenced as a standby")
    c.sched.run_until(c.sched.now + 15.0, until=lambda: c.arb_view.eligible == m)
    assert c.arb_view.eligible == m, "the restarted node never became the eligible standby"
    isolate(c, s, client_too=False)
    c.sched.run_until(c.sched.now + 10.0, until=lambda: c.pg[m].is_primary)
    assert c.pg[m].is_primary, "the restarted node was never promoted"
    wait(c, 0.5)
    committed = stalled.pop()()
    c.trace(m, f"the killed agent's nft child commits: {committed}")
    c.check()  # what the child wrote, judged before any step of the agent's overwrites it
    wait(c, 0.5)
    isolate(c, m, client_too=False)    # the new primary cut off: it must be fenced in time
    wait(c, 8.0)
    heal(c)
