"""The simulated cluster: three agent processes (the real agent.py code) on the world of
world.py, a client that writes, the fault schedule, and the invariants checked after every
step."""
import collections
import dataclasses
import random
from pathlib import Path

import agent

from .world import (
    DATA_RTO,
    Fence,
    FiberLock,
    Net,
    Pg,
    Scheduler,
    SimCrash,
    SimWorld,
    Violation,
    wire,
)

REPO = Path(__file__).resolve().parents[2]
KEY = b"k" * 32
DB = ("pg1", "pg2")

CONVERGE_BOUND_S = 30.0
"""After the last fault, the cluster must be back to a primary with an eligible synchronous
standby within this many simulated seconds (README, "Simulation and chaos")."""
CLIENT_DEADLINE_S = 1.0  # a commit counts as acknowledged only if it returned within this
WRITE_INTERVAL_S = 0.1
CONNECT_TIMEOUT_S = 2.0  # LabProbe: libpq's floor, as in the lab's DSN (lab/backend.py, dsn)


def configs(strict_sync=False, timing=None):
    """agent.ini for each node; `timing` (an agent.Timing) replaces its [timing]."""
    out = {}
    for name in ("pg1", "pg2", "arb"):
        cfg = agent.load_config(str(REPO / "agent.ini"), name)
        out[name] = dataclasses.replace(cfg, strict_sync=strict_sync,
                                        timing=timing or cfg.timing)
    return out


class Node:
    """One host's agent process: its incarnation, liveness, and what faults do to it."""

    def __init__(self, name, rng):
        self.name = name
        self.inc = 0
        self.alive = False
        self.agent = None
        self.replays = None
        self.paused_until = 0.0
        self.locked = 0
        self.lock_free_at = 0.0
        self.crash_countdown = None  # killed at the n-th port call from now
        self.crash_after_save = False
        self.stall_at_next_call = 0.0
        self.disk_view = None  # view.json
        self.history = []      # the arbiter's history file
        self.disk_fail = False
        self.disk_slow = 0.0
        self.nft_fail = False
        self.nft_slow = 0.0
        self.rewind_stops = None  # the next pg_rewind stops half-way: "timeout" or "kill"
        self.cpu_slow = 0.0  # each port call first waits up to this long (a CPU hog)
        self.mono_offset = rng.uniform(1e3, 1e6)
        self.wall_offset = 0.0
        self.decisions = collections.deque(maxlen=12)

    def busy(self):
        """Stopped, or (nested runs) a step waits holding a lock: its other steps and the
        requests to it wait. Fibers contend for the agent's locks themselves (FiberLock)."""
        return (self.locked > 0 and not self._sched.fibers) or self.paused_until > self._sched.now

    def free_at(self):
        return max(self.paused_until, self._sched.now + 0.01)


class Cluster:
    def __init__(self, seed, strict_sync=None, dup_rate=0.01, wall_skew=3.0, log=None,
                 timing=None, fibers=False, probe=False):
        self.seed = seed
        rng = random.Random(seed)
        self.rng_net = random.Random(rng.random())
        self.rng_faults = random.Random(rng.random())
        self.rng_misc = random.Random(rng.random())
        self.rng_cpu = random.Random(rng.random())  # drawn only on a host with cpu_slow
        self.strict = (self.rng_misc.random() < 0.25) if strict_sync is None else strict_sync
        self.sched = Scheduler(fibers)
        self.sched.after_step = self.check
        self.cfgs = configs(self.strict, timing)
        self.timing = self.cfgs["pg1"].timing
        self.by_address = {n.address: n.name for n in self.cfgs["pg1"].nodes.values()}
        self.net = Net(self.rng_net)
        self.dup_rate = dup_rate
        self.entry_seq = 0
        self.pg = {n: Pg(self, n) for n in DB}
        self.fences = {n: Fence() for n in DB}
        self.nodes = {}
        for n in ("pg1", "pg2", "arb"):
            node = Node(n, self.rng_misc)
            node._sched = self.sched
            node.wall_offset = self.rng_misc.uniform(-wall_skew, wall_skew)
            self.nodes[n] = node
        self.log = log
        self.traces = collections.deque(maxlen=300)
        self.counts = collections.Counter()
        self.faults = collections.Counter()
        # what the invariants look at
        self.acked = {}           # write id -> (time, node)
        self.acked_order = []
        self.writes = 0
        self.terms = {}           # term -> primary, as the arbiter persisted them
        self.arb_view = None      # the arbiter's durable view
        self.view_history = []    # (time, view) of every durable arbiter view
        self.violations = []
        self.nonce_seq = 0
        self.ticks = 0
        self.grants = 0
        self.handovers = 0
        self.event_log = []        # (time, node, event, detail) of every agent's event
        self.promotion_hooks = []  # scenarios: called with each node PostgreSQL promotes
        self.save_hooks = []       # scenarios: called with each view the arbiter persists
        self.restart_after = None  # crashed agents are started again after this (or never)
        self.write_interval = WRITE_INTERVAL_S  # the client's
        # the lab's write probe instead of the ideal client: True, or LabProbe's arguments
        self.probe = LabProbe(self, **(probe if isinstance(probe, dict) else {})) \
            if probe else None
        # wal_receiver_status_interval: an idle standby replies this often. Its 0.2 s ticks
        # add up to a hair under 1.0 s, so 1.0 makes it 1.2 s; the sweep asks 1.0 - 1e-6
        self.status_interval = 1.0

    # -- plumbing --------------------------------------------------------------------------
    def other_db(self, name):
        return "pg2" if name == "pg1" else "pg1" if name == "pg2" else None

    def nonce(self):
        self.nonce_seq += 1
        return f"{self.nonce_seq:016x}"

    def count(self, what, n=1):
        self.counts[what] += n

    def trace(self, node, text, kind="sim"):
        self.traces.append((round(self.sched.now, 3), node, text))
        if self.log:
            self.log(f"{self.sched.now:9.3f} {node:6} {text}")

    def event(self, node, event, detail):
        self.trace(node, f"event {event} {detail}")
        self.event_log.append((self.sched.now, node, event, detail))
        if event == "granted":
            self.grants += 1
        elif event == "handover":
            self.handovers += 1

    # -- agent processes -------------------------------------------------------------------
    def start_agent(self, name):
        node = self.nodes[name]
        node.inc += 1
        node.alive = True
        node.paused_until = 0.0
        node.locked = 0
        node.crash_countdown = None
        node.crash_after_save = False
        node.stall_at_next_call = 0.0
        world = SimWorld(self, node)
        cls = agent.ArbiterAgent if name == "arb" else agent.DbAgent
        try:
            a = cls(self.cfgs[name], KEY, world)
            if self.sched.fibers:  # its steps contend for its locks as threads do
                for owner, attr in ((a, "_view_lock"), (a, "_lease_lock"),
                                    (a, "_switchover_lock"), (a.observations, "_lock")):
                    if hasattr(owner, attr):
                        setattr(owner, attr, FiberLock(self.sched, getattr(owner, attr)))
            node.agent = a
            if not a.prepare():
                raise AssertionError("prepare refused")
        except SimCrash:
            return
        except (RuntimeError, OSError, agent.ConfigError) as exc:  # main() exits non-zero
            self.crash(name, f"exits at its start: {type(exc).__name__}: {exc}")
            return
        node.agent = a
        world.serve(a)
        self.trace(name, f"agent started (incarnation {node.inc})")
        for rname, step in a.routines():
            self.run_as(name, node.inc, self.sched.now + self.rng_misc.random() * 0.2, step,
                        rname, repeat=True, wake=a.wake if rname == "loop" else None)

    def run_as(self, name, inc, t, step, rname, repeat=False, wake=None):
        """Run step at t (and, repeat, again after the wait it returns); a wake (SimWake)
        brings a waiting step forward to now, and one set during the step makes the next come
        at once, as World.run_routine does."""
        node = self.nodes[name]
        due = {"at": t, "gen": 0}  # the next step's time (inf while one runs); gen: its firing

        def fire(gen=0):
            if gen != due["gen"] or node.inc != inc or not node.alive:
                return
            if node.busy():
                self.sched.launch(node.free_at(), lambda: fire(gen))
                return
            due["at"] = float("inf")
            if wake is not None:
                wake.clear()
            try:
                delay = step()
            except SimCrash as exc:
                assert exc.node == name, (exc.node, name)
                return
            except Exception as exc:  # noqa: BLE001 -- a routine that raises dies for real
                self.violation("routine_died", f"{name} {rname}: {type(exc).__name__}: {exc}")
                return
            if rname == "loop":
                self.ticks += 1
                d = node.agent.last_decision if node.agent is not None else None
                if d is not None and (not node.decisions or node.decisions[-1][1] != d[0]):
                    node.decisions.append((round(self.sched.now, 3), d[0], d[1]))
            if repeat and node.inc == inc:
                due["at"] = self.sched.now + (0.0 if wake is not None and wake.is_set() else delay)
                self.sched.launch(due["at"], lambda: fire(gen))

        def woken():
            if self.sched.now < due["at"] < float("inf"):  # waiting: the step comes now
                due["gen"] += 1
                due["at"] = self.sched.now
                self.sched.launch(self.sched.now, lambda g=due["gen"]: fire(g))

        if wake is not None:
            wake.on_set = woken
        self.sched.launch(t, fire)

    def crash(self, name, why):
        node = self.nodes[name]
        if not node.alive:
            return
        node.alive = False
        node.inc += 1
        node.agent = None
        node.locked = 0
        node.paused_until = 0.0
        self.trace(name, f"agent process dies: {why}")
        if self.restart_after is not None:
            self.sched.launch(self.sched.now + self.restart_after(), lambda: self.restart(name))

    def restart(self, name):
        if not self.nodes[name].alive:
            self.start_agent(name)

    def serve(self, dst, message):
        """The receiving agent's server: the replay cache and clock check of the real
        protocol, then agent.handle(); None when the request is dropped."""
        node = self.nodes[dst]
        a = node.agent
        if a is None or not node.alive:
            return None
        now_wall = self.sched.now + node.wall_offset
        if abs(now_wall - message["ts"]) > agent.MAX_SKEW:
            self.count("dropped stale")
            return None
        try:
            node.replays.admit(message["from"], message["nonce"], message["ts"], now_wall)
        except agent.ProtocolError:
            self.count("dropped replays")
            return None
        inc = node.inc
        try:
            body = a.handle(message["from"], message["kind"], message["body"])
        except SimCrash as exc:
            assert exc.node == dst
            return None
        except (agent.ProtocolError, OSError, ValueError, KeyError, TypeError):
            return None
        if node.inc != inc:
            return None
        return wire(body)

    def deliver_later(self, dst, message, t):
        def fire():
            node = self.nodes[dst]
            if not node.alive:
                return
            if node.busy():
                self.sched.launch(node.free_at(), fire)
                return
            self.serve(dst, message)
        self.sched.launch(t, fire)

    # -- what the durable writes and PostgreSQL tell the invariants ---------------------------
    def saved(self, name, view):
        if name != "arb":
            return
        old = self.arb_view
        self.arb_view = view
        for hook in list(self.save_hooks):
            hook(view)
        self.view_history.append((self.sched.now, view))
        known = self.terms.get(view.term)
        if known is not None and known != view.primary:
            self.violation("term_granted_twice",
                           f"term {view.term} made {known} primary, then {view.primary}")
        self.terms[view.term] = view.primary
        if old is None or old.primary != view.primary:
            self.trace("arb", f"the arbiter's view makes {view.primary} primary of term "
                              f"{view.term}")
            missing = self.missing_on(view.primary)
            if missing:
                self.violation("lost_acked", f"the arbiter made {view.primary} primary of term "
                                             f"{view.term} without acknowledged writes "
                                             f"{missing[:5]} ({len(missing)} missing)")

    def missing_on(self, name):
        writes = self.pg[name].writes
        return [w for w in self.acked_order if w not in writes]

    def opened_primary(self, name):
        missing = self.missing_on(name)
        if missing:
            self.violation("lost_acked", f"{name} serves as primary without acknowledged "
                                         f"writes {missing[:5]} ({len(missing)} missing)")

    def closed_primary(self, name):
        pass

    def fence_opened(self, name):
        self.trace(name, "fence: port open")

    def pg_reachable(self, src, dst, replication=False):
        pg = self.pg[dst]
        return (self.net.connect_ok(src, dst) and self.net.packet_ok(dst, src) and pg.running
                and self.fences[dst].admits(src, self.other_db(dst), self.sched.now))

    def rw(self, name):
        """Does this node take read-write sessions: PostgreSQL primary and the port open?"""
        return self.pg[name].is_primary and self.fences[name].open_at(self.sched.now)

    def commit_returned(self, name, write, deadline):
        """A commit's wait is over: the client hears of it if in time and if the answer can
        reach it (the fence rejects even answers on open sessions)."""
        now = self.sched.now
        if now > deadline or not self.fences[name].open_at(now) \
                or not self.net.packet_ok(name, "client"):
            self.count("commits not acknowledged")
            return
        self.acked[write] = (now, name)
        self.acked_order.append(write)
        if self.probe is not None:
            self.probe.acked(write)
        view = self.arb_view
        if view is None or view.primary != name:
            self.violation("dual_ack", f"{name} acknowledged write {write} while the arbiter's "
                                       f"view makes {view.primary if view else None} primary "
                                       f"(term {view.term if view else None})")
        if self.strict:
            holders = [n for n in DB if write in self.pg[n].writes]
            if len(holders) < 2:
                self.violation("strict_sync_single_host",
                               f"strict_sync: {name} acknowledged write {write} held by "
                               f"{holders} only")

    # -- replication ---------------------------------------------------------------------------
    def ship_soon(self, primary):
        pg = self.pg[primary]
        if pg.ship_due:
            return
        pg.ship_due = True

        def fire():
            pg.ship_due = False
            for s in DB:
                if self.pg[s].conn == primary:
                    self.walreceiver(s, ship_only=True)
        self.sched.at(self.sched.now + 0.001 + self.rng_net.random() * 0.01, fire)

    def walreceiver(self, name, ship_only=False):
        """The standby's walreceiver: connect (every second when down), notice a broken or
        silent connection, receive WAL, reply (with this host's clock)."""
        s, now = self.pg[name], self.sched.now
        if not s.running or not s.recovery:
            s.conn = None
            return
        target = s.active["primary"]
        if s.conn is not None and s.conn != target:
            s.conn = None
        if s.conn is None:
            if ship_only or now < s.retry_at or target is None:
                return
            s.retry_at = now + 1.0
            p = self.pg[target]
            if not (self.net.connect_ok(name, target) and self.net.packet_ok(target, name)
                    and p.is_primary and self.fences[target].admits(name, name, now)
                    and s.prefix_of(p)):
                return
            s.conn, s.silent_since, s.caught_up = target, None, False
            self.trace(name, f"walreceiver connected to {target}")
        p = self.pg[s.conn]
        if not p.is_primary or not self.fences[s.conn].admits(name, name, now):
            self._disconnect(s, "reset")
            return
        if not (self.net.packet_ok(name, s.conn) and self.net.packet_ok(s.conn, name)):
            if s.silent_since is None:
                s.silent_since = now
            elif now - s.silent_since > 5.0:  # wal_receiver_timeout / wal_sender_timeout
                self._disconnect(s, "timeout")
            return
        s.silent_since = None
        if not s.prefix_of(p):
            self._disconnect(s, "diverged")
            return
        new = p.wal[len(s.wal):]
        due = bool(new) or s.reply_at is None or now - s.reply_at >= self.status_interval
        if due and self.net.tcp and self._stream_held(s):
            return
        if new:
            s.wal.extend(new)
            s.writes.update(w for _, _, w in new if w)
            s.tli = p.tli
        s.caught_up = True
        if due:
            s.reply_wall, s.reply_at = round(now + self.nodes[name].wall_offset, 6), now
        p.release()

    def _stream_held(self, s):
        """TCP mode: a lost segment of the stream (WAL one way, the standby's reply the other)
        holds it for a retransmission timeout, doubled at each loss in a row; it goes on when
        the segment is through."""
        now = self.sched.now
        if now < s.held_until:
            return True
        extra = self.net.leg(s.conn, s.name, DATA_RTO) + self.net.leg(s.name, s.conn, DATA_RTO)
        if not extra:
            return False
        s.held_until = now + extra
        name = s.name
        self.sched.at(s.held_until, lambda: self.walreceiver(name, ship_only=True))
        return True

    def _disconnect(self, s, why):
        self.trace(s.name, f"walreceiver lost {s.conn} ({why})")
        s.conn, s.silent_since, s.caught_up = None, None, False
        s.retry_at = self.sched.now + 1.0

    def start_postgres_routines(self):
        def walreceiver_routine(name):
            def tick():
                self.walreceiver(name)
                self.sched.at(self.sched.now + 0.2, tick)
            return tick
        for name in DB:
            self.sched.at(0.1, walreceiver_routine(name))

    # -- the client ------------------------------------------------------------------------------
    def start_client(self):
        def write():
            self.client_write()
            self.sched.at(self.sched.now + self.write_interval, write)
        self.sched.at(1.0, self.probe.next if self.probe is not None else write)

    def client_write(self):
        """One insert through host=pg1,pg2 target_session_attrs=read-write."""
        now = self.sched.now
        for name in DB:
            pg = self.pg[name]
            if self.net.connect_ok("client", name) and self.net.packet_ok(name, "client") \
                    and pg.is_primary and self.fences[name].open_at(now):
                self.writes += 1
                pg.commit(self.writes, now + CLIENT_DEADLINE_S)
                return
        self.count("writes with no primary")

    # -- invariants ------------------------------------------------------------------------------
    def violation(self, kind, detail):
        self.violations.append((round(self.sched.now, 3), kind, detail))
        self.trace("check", f"VIOLATION {kind}: {detail}")
        raise Violation(kind, detail)

    def check(self):
        """After every step: at most one node takes read-write sessions."""
        view = self.arb_view
        # paused or resuming, the primary may hold its port open without a timeout: the
        # arbiter grants nothing until the primary said its lease is timed again
        if view is not None and not (view.paused or view.resuming) \
                and self.fences[view.primary].expiry == float("inf") \
                and self.pg[view.primary].is_primary:
            self.violation("unbounded_lease", f"{view.primary} serves as the primary of term "
                                              f"{view.term} with its port open and no timeout")
        both = self.rw("pg1") and self.rw("pg2")
        if both:
            self.violation("dual_rw", "pg1 and pg2 both run as primary with the port open to "
                                      "clients")

    def converged(self):
        """Primary + eligible synchronous standby, the port open, both agents agreeing with
        the arbiter."""
        arb = self.nodes["arb"].agent
        if arb is None:
            return False
        view = arb.view
        p, s = view.primary, self.other_db(view.primary)
        if view.eligible != s:
            return False
        pp, ps = self.pg[p], self.pg[s]
        if not (pp.is_primary and self.fences[p].open_at(self.sched.now)
                and pp.active["sync"] == s and ps.running and ps.recovery and ps.conn == p
                and ps.caught_up and ps.silent_since is None):
            return False
        for n in DB:
            a = self.nodes[n].agent
            if a is None or (a.view.term, a.view.seq) != (view.term, view.seq):
                return False
        return True

    # -- boot --------------------------------------------------------------------------------
    def boot(self):
        for n in ("arb", "pg1", "pg2"):
            self.start_agent(n)
        self.start_postgres_routines()
        self.start_client()

    def form(self):
        """Boot, and run until the cluster first converges (a violation if not in 60 s)."""
        self.boot()
        self.sched.run_until(60.0, until=self.converged)
        if not self.converged():
            self.violation("no_convergence", "the cluster did not form within 60 s of the start")



class LabProbe:
    """The lab's write probe (lab/probe.py) instead of the ideal client, which finds the
    primary at once for every write: one session through host=pg1,pg2
    target_session_attrs=read-write connect_timeout=2. An insert waits for its COMMIT up to
    its deadline (1 s); past it the session is dropped and the next insert connects again,
    libpq trying the hosts in order: a silent host costs connect_timeout, one that resets or
    refuses (the fence, PostgreSQL down) or is read-only costs nothing. A session that the
    fence resets is noticed only at the deadline (the lab's isolation drops its packets
    anyway)."""

    def __init__(self, c, deadline=CLIENT_DEADLINE_S, connect_timeout=CONNECT_TIMEOUT_S):
        self.c, self.deadline, self.connect_timeout = c, deadline, connect_timeout
        self.host = self.write = None
        self.began = 0.0

    def next(self):
        self.began = self.c.sched.now
        if self.host is None:
            self.walk(0)
        else:
            self.insert()

    def again(self):
        s = self.c.sched
        s.at(max(s.now, self.began + self.c.write_interval), self.next)

    def walk(self, i):
        c, now = self.c, self.c.sched.now
        if i == len(DB):  # no host took the session: an error; the next insert tries again
            c.count("probe connections failed")
            self.again()
        elif not (c.net.connect_ok("client", DB[i]) and c.net.packet_ok(DB[i], "client")):
            c.sched.at(now + self.connect_timeout, lambda: self.walk(i + 1))
        elif c.rw(DB[i]):
            self.host = DB[i]
            c.sched.at(now + 0.003, self.insert)  # connect, authenticate
        else:
            c.sched.at(now + 0.003, lambda: self.walk(i + 1))

    def insert(self):
        c, now = self.c, self.c.sched.now
        c.writes += 1
        self.write = write = c.writes
        deadline = now + self.deadline
        c.sched.at(deadline, lambda: self.gave_up(write))
        if c.net.packet_ok("client", self.host) and c.rw(self.host):
            c.pg[self.host].commit(write, deadline)

    def acked(self, write):
        if write == self.write:
            self.write = None
            self.again()

    def gave_up(self, write):
        if write == self.write:  # no COMMIT by the deadline: the session is dropped
            self.write = self.host = None
            self.again()
