"""The simulated world: a scheduler, the network, PostgreSQL, the kernel's fence, disks and
clocks, and the agent.World ports implemented on them.

Time. One global simulated clock (`Scheduler.now`, seconds) that only moves forward. An agent
step runs to its end unless it blocks: whatever takes time in the real world (a round trip to
a peer, a timeout, a probe, world.sleep, a slow fsync or nft call, a SIGSTOP that lands in the
middle of a step) is a nested run of the scheduler up to the moment the step may go on, so
everything else -- the other nodes, this node's other routines, the network -- moves on
meanwhile, as the real threads would. Each host has its own clocks: monotonic = now + an offset
(large and different per host), wall = now + a smaller offset (seconds, per seed).
Nested runs have a cost: a step that blocks returns only when every step that blocked inside
its wait has returned, so under many timeouts at once (loss) a heartbeat can come back seconds
after its own timeout. With fibers (Scheduler(fibers=True); the timing sweep, `--fibers`) each
step runs in a thread of its own that yields to the scheduler when it blocks and is resumed
when its wait is over: one thread runs at a time, so a seed still replays exactly, and no step
waits longer than it asked.

Locks. An agent step that blocks while it holds one of the agent's locks (the view lock around
a state file write, the lease lock around an nft call) marks its node `locked`: until it
returns, the node's other routines and requests to it wait (they would block on the lock).
With fibers the steps contend for the agent's very locks instead (FiberLock).
"""
import heapq
import logging
import socket
import subprocess
import threading

import agent


class SimCrash(BaseException):
    """Raised in a node's own port call when its agent process is killed there: it unwinds
    the step (no agent code catches BaseException) and the scheduler forgets the process."""

    def __init__(self, node):
        super().__init__(node)
        self.node = node


class Violation(BaseException):
    """An invariant broken (or the simulator's own bug, kind "sim_bug"). A BaseException, so
    that no `except` of the agent's code swallows it in a blocked step."""

    def __init__(self, kind, detail):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


def wire(value):
    """What the other end gets of a JSON message: a deep copy, tuples as lists, keys as
    strings (json.loads(json.dumps(value)), faster)."""
    if isinstance(value, dict):
        return {str(k): wire(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [wire(v) for v in value]
    return value


# -- the scheduler -----------------------------------------------------------------------------

class Scheduler:
    def __init__(self, fibers=False):
        self.now = 0.0
        self.heap = []
        self.seq = 0
        self.steps = 0
        self.after_step = None  # invariant checks, called after every step
        self.fibers = fibers    # steps block as fibers (Fiber), not as nested runs
        self.current = None     # the fiber running now, None in the scheduler's own thread
        self.suspended = set()  # fibers waiting to be resumed

    def at(self, t, fn):
        self.seq += 1
        heapq.heappush(self.heap, (max(t, self.now), self.seq, fn))

    def launch(self, t, step):
        """Run step at t; with fibers, as a fiber of its own (a step that may block)."""
        self.at(t, (lambda: Fiber(self, step).resume()) if self.fibers else step)

    def sleep_until(self, t):
        """Block the running step until t: its fiber yields, or (no fiber) a nested run of
        the scheduler."""
        if self.current is not None:
            self.current.wait_until(t)
        else:
            self.run_until(t)

    def close(self):
        """End every suspended fiber (their threads unwind with FiberEnded)."""
        while self.suspended:
            fiber = self.suspended.pop()
            fiber.ended = True
            fiber.resume()

    def run_until(self, target, until=None):
        """Run every event due by target (or until `until()` holds); nested calls are how a
        step blocks."""
        heap = self.heap
        while heap and heap[0][0] <= target:
            t, _, fn = heapq.heappop(heap)
            self.now = max(self.now, t)
            try:
                fn()
            except Exception as exc:  # the simulator's own bug: never into the agent's code
                raise Violation("sim_bug", f"{type(exc).__name__}: {exc}") from exc
            self.steps += 1
            if self.after_step is not None:
                self.after_step()
            if until is not None and until():
                return
        self.now = max(self.now, target)


class FiberEnded(BaseException):
    """Unwinds a suspended fiber when its run is over (Scheduler.close)."""


class Fiber:
    """A step run in a thread of its own, so that it can block without nesting: its wait
    yields to the scheduler, which resumes it when the wait is over. One thread runs at a
    time -- the scheduler's or one fiber's, handing over explicitly -- so a seed still replays
    exactly. Nested runs (Scheduler.fibers False) make a step that blocks wait for every step
    that blocked while it waited: a heartbeat can return seconds after its timeout when many
    steps block at once (timeouts under loss), which real threads never do."""

    def __init__(self, sched, step):
        self.sched, self.step = sched, step
        self.go, self.back = threading.Semaphore(0), threading.Semaphore(0)
        self.error, self.ended, self.started = None, False, False

    def _main(self):
        self.go.acquire()
        try:
            self.step()
        except BaseException as exc:  # noqa: BLE001 -- handed to the scheduler's thread
            self.error = exc
        self.back.release()

    def resume(self):
        """Run the fiber (in the scheduler's thread) until it blocks or ends."""
        sched = self.sched
        sched.suspended.discard(self)
        outer, sched.current = sched.current, self
        if not self.started:
            self.started = True
            threading.Thread(target=self._main, daemon=True).start()
        self.go.release()
        self.back.acquire()
        sched.current = outer
        error, self.error = self.error, None
        if error is not None and not isinstance(error, FiberEnded):
            raise error

    def wait_until(self, t):
        """In the fiber's thread: yield until t."""
        sched = self.sched
        sched.at(t, self.resume)
        sched.suspended.add(self)
        self.back.release()
        self.go.acquire()
        if self.ended:
            raise FiberEnded()


class FiberLock:
    """An agent's lock when steps are fibers: a fiber that finds it taken (by a fiber that
    is waiting while it holds it) yields until it is free, where a real acquire would block
    the one thread that runs. Locked and owned as the lock it wraps."""

    POLL_S = 0.001

    def __init__(self, sched, lock):
        self.sched, self.lock = sched, lock

    def acquire(self, blocking=True, timeout=-1):
        if self.lock.acquire(blocking=False):
            return True
        sched = self.sched
        if not blocking:
            return False
        if sched.current is None:  # nothing would ever release it
            raise AssertionError("the scheduler's thread would block on a fiber's lock")
        give_up = sched.now + timeout if timeout >= 0 else float("inf")
        while sched.now < give_up:
            sched.current.wait_until(min(sched.now + self.POLL_S, give_up))
            if self.lock.acquire(blocking=False):
                return True
        return False

    def release(self):
        self.lock.release()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def locked(self):
        return self.lock.locked()

    def _is_owned(self):
        return self.lock._is_owned()


# -- the network ---------------------------------------------------------------------------------

HOSTS = ("pg1", "pg2", "arb", "client")


class Net:
    """Per ordered pair of hosts: packet drops (a -> b; a symmetric cut drops both ways),
    connection blocks (new connections from a to b refused: the lab's one-way cut), loss
    probability and extra delay. Counters, so that overlapping faults heal independently."""

    def __init__(self, rng):
        self.rng = rng
        self.drop, self.block, self.loss, self.slow = {}, {}, {}, {}
        self.reply_drops = []  # [(src, kind)]: lose the reply to src's next request of kind
        # TCP mode (the sweep's jitter profile): a lost segment is sent again after TCP's
        # retransmission timeout instead of failing the call outright (leg)
        self.tcp = False

    @staticmethod
    def _add(table, key, value):
        table[key] = table.get(key, 0) + value
        if abs(table[key]) < 1e-12:
            del table[key]

    def packet_ok(self, a, b):
        return (a, b) not in self.drop

    def connect_ok(self, a, b):
        return (a, b) not in self.drop and (b, a) not in self.drop and (a, b) not in self.block

    def lost(self, a, b):
        p = self.loss.get((a, b))
        return p is not None and self.rng.random() < p

    def delay(self, a, b):
        return 0.0004 + self.rng.random() * 0.002 + self.slow.get((a, b), 0.0)

    def leg(self, a, b, rto):
        """TCP mode: the extra time one segment a -> b takes under loss. Each loss costs a
        retransmission timeout, doubled at each loss in a row (Linux: 1 s for a SYN, 200 ms
        for data on a connection)."""
        extra = 0.0
        while extra < 8.0 and self.lost(a, b):
            extra += rto
            rto *= 2
        return extra


SYN_RTO, DATA_RTO = 1.0, 0.2  # Linux's first SYN retransmission; TCP_RTO_MIN
SIM_WAL_FILE = "000000010000000000000001"  # the one WAL file a simulated pg_wal names
PG_ROUND_TRIPS = 4  # a probe of PostgreSQL: startup, SCRAM's two round trips, the query


# -- PostgreSQL ----------------------------------------------------------------------------------

class Pg:
    """One node's PostgreSQL: its data directory (WAL as a list of entries, each a unique id
    with its timeline and the client write it carries), the server process, its settings
    (written and active), the walreceiver's connection, and the commits waiting for the
    synchronous standby. Entries are never changed once made, so two WALs agree up to a
    position iff their entries at that position are the same."""

    def __init__(self, cluster, name):
        self.c, self.name = cluster, name
        self.exists = False
        self.signal = False
        self.running = False
        self.recovery = False
        self.tli = 1
        self.ckpt_tli = 1
        self.control = None    # pg_control's "Database cluster state" (pg_controldata)
        self.torn = False      # a pg_rewind stopped half-way: files of two servers
        self.rewind_mark = None  # LocalPostgres.rewind's mark in the state directory (boot id)
        self.wal = []          # [(entry id, timeline, write id or 0)]
        self.writes = set()    # write ids in the WAL
        self.conf = {"sync": "", "primary": None}
        self.active = dict(self.conf)
        self.pending = []      # [write id, lsn, client deadline]
        self.conn = None       # walreceiver: the primary it streams from
        self.silent_since = None
        self.caught_up = False
        self.retry_at = 0.0
        self.held_until = 0.0  # TCP mode: the stream waits for a retransmission until then
        self.reply_wall = None  # the walreceiver's last reply, stamped with this host's clock
        self.reply_at = None   # ... and when (simulated time)
        self.ship_due = False
        self.primary_since = None
        self.status_slow_until = 0.0
        self.start_fails = False

    # data
    def set_wal(self, wal):
        self.wal = list(wal)
        self.writes = {w for _, _, w in self.wal if w}

    def append(self, tli, write=0):
        self.c.entry_seq += 1
        self.wal.append((self.c.entry_seq, tli, write))
        if write:
            self.writes.add(write)

    def prefix_of(self, other):
        n = len(self.wal)
        return n <= len(other.wal) and (n == 0 or self.wal[-1][0] == other.wal[n - 1][0])

    def common_prefix(self, other):
        lo, hi = 0, min(len(self.wal), len(other.wal))
        while lo < hi:  # entries agree up to a position iff they agree there
            mid = (lo + hi + 1) // 2
            if self.wal[mid - 1][0] == other.wal[mid - 1][0]:
                lo = mid
            else:
                hi = mid - 1
        return lo

    # the server
    @property
    def is_primary(self):
        return self.running and not self.recovery

    def start(self):
        if self.torn:
            self.c.violation("torn_start", f"{self.name} starts PostgreSQL on files that a "
                                           "pg_rewind stopped half-way left")
        self.running = True
        self.recovery = self.signal
        self.control = "in archive recovery" if self.recovery else "in production"
        self.active = dict(self.conf)
        self.conn, self.silent_since, self.retry_at = None, None, 0.0
        if not self.recovery:
            self.ckpt_tli = self.tli  # crash recovery ends with a checkpoint
            self.became_primary("started")

    def stop(self, why, clean=False):
        """clean: a fast or smart shutdown, which says so in pg_control; an immediate one, or
        a crash, leaves it as it was."""
        if self.running:
            self.c.trace(self.name, f"postgres stops ({why})")
            if clean:
                self.control = "shut down in recovery" if self.recovery else "shut down"
        if self.is_primary:
            self.c.closed_primary(self.name)
        self.running = False
        self.conn = None
        self.fail_pending()

    def became_primary(self, how):
        self.primary_since = self.c.sched.now
        self.c.trace(self.name, f"postgres runs as primary ({how}, timeline {self.tli})")
        self.c.opened_primary(self.name)

    def promote(self):
        self.tli += 1
        self.append(self.tli)  # the timeline switch
        self.recovery = self.signal = False
        self.control = "in production"
        self.conn = None
        self.became_primary("promoted")
        for hook in list(self.c.promotion_hooks):
            hook(self.name)
        tli = self.tli

        def checkpointed():  # the spread checkpoint PostgreSQL requests itself at promotion:
            if self.is_primary and self.tli == tli:  # 0.9 x checkpoint_timeout (5 min)
                self.ckpt_tli = max(self.ckpt_tli, tli)
        self.c.sched.at(self.c.sched.now + 270.0, checkpointed)

    def fail_pending(self):
        self.pending = []

    def commit(self, write, deadline):
        self.append(self.tli, write)
        self.pending.append([write, len(self.wal), deadline])
        self.release()
        if self.pending:
            self.c.ship_soon(self.name)

    def sync_standby(self):
        """The standby that synchronous replication counts on now, or None."""
        name = self.active["sync"]
        if not name or name == self.name:
            return None
        s = self.c.pg[name]
        if s.conn == self.name and s.silent_since is None and s.caught_up and s.running:
            return s
        return None

    def release(self):
        """Commits whose wait is over: no synchronous standby named, or it has flushed them."""
        if not self.pending or not self.is_primary:
            return
        if self.active["sync"] == "":
            done, self.pending = self.pending, []
        else:
            s = self.sync_standby()
            if s is None:
                return
            flushed = len(s.wal)
            done = [p for p in self.pending if p[1] <= flushed]
            self.pending = [p for p in self.pending if p[1] > flushed]
        for write, _, deadline in done:
            self.c.commit_returned(self.name, write, deadline)

    def walsender_row(self, standby):
        """What pg_stat_replication says of `standby` on this primary: (state, sync_state,
        flush, reply_time) or None. A row outlives a silent standby by wal_sender_timeout."""
        s = self.c.pg.get(standby)
        if s is None or s.conn != self.name or not s.running:
            return None
        state = "streaming" if s.caught_up else "catchup"
        sync = "sync" if self.active["sync"] == standby and s.caught_up else "async"
        return state, sync, len(s.wal), s.reply_wall


class Fence:
    """The kernel's side of agent.Fence: the lease element (None closed, inf, or an expiry in
    simulated time) and the handover element. Survives agent restarts."""

    def __init__(self):
        self.installed = False
        self.expiry = None
        self.handover_until = None
        self.fresh = None  # the armed window of the next lease write: (token, until) (Fence.arm)
        self.arms = 0  # tokens handed out, by all incarnations
        self.opened_at = None  # when the current client window opened

    def open_at(self, now):
        return self.expiry is not None and self.expiry > now

    def admits(self, src, other_db, now):
        """Is a new connection (or a packet of one) from src to the PostgreSQL port let in?"""
        if self.open_at(now):
            return True
        return src == other_db and self.handover_until is not None and self.handover_until > now


# -- the ports -----------------------------------------------------------------------------------

class SimWorld(agent.World):
    """agent.World for one incarnation of one node's agent process."""

    def __init__(self, cluster, node):
        self.c, self.node, self.name = cluster, node, node.name
        self.inc = node.inc
        self.sched = cluster.sched

    # -- the process: every port call is a point where it can be killed or stopped ----------
    def _enter(self):
        node = self.node
        if node.inc != self.inc:
            raise SimCrash(self.name)
        if node.crash_countdown is not None:
            node.crash_countdown -= 1
            if node.crash_countdown <= 0:
                node.crash_countdown = None
                self.c.crash(self.name, "killed in the middle of a step")
                raise SimCrash(self.name)
        if node.stall_at_next_call:  # SIGSTOP lands in the middle of this step
            stall, node.stall_at_next_call = node.stall_at_next_call, 0.0
            node.paused_until = max(node.paused_until, self.sched.now + stall)
            self._wait(0.0, locked=True)  # it may hold a lock here: no thread of it runs
        if node.cpu_slow:  # a CPU hog on the host: each port call first waits for a core
            self._wait(self.c.rng_cpu.random() * node.cpu_slow)

    def _holds_locks(self):
        """Does any step of this agent hold one of its locks now?"""
        a = self.node.agent
        if a is None or self.node.inc != self.inc:
            return False
        locks = [getattr(a, "_lease_lock", None), getattr(a, "_switchover_lock", None),
                 a.observations._lock]
        return any(lk is not None and lk.locked() for lk in locks) or a._view_lock._is_owned()

    def _wait(self, seconds, locked=False, pause=True):
        """Block this step for `seconds` (more if the node is stopped meanwhile, or a nested
        wait overruns); everything else runs meanwhile -- but none of this node's steps while
        it holds one of its locks."""
        node, sched = self.node, self.sched
        locked = locked or self._holds_locks()
        if locked:
            node.locked += 1
        try:
            sched.sleep_until(sched.now + seconds)
            while pause and node.paused_until > sched.now and node.inc == self.inc:
                sched.sleep_until(node.paused_until)
        finally:
            if locked and node.inc == self.inc:
                node.locked -= 1
        if node.inc != self.inc:
            raise SimCrash(self.name)

    # -- clock ------------------------------------------------------------------------------
    def monotonic(self):
        return self.sched.now + self.node.mono_offset

    def wall(self):
        return self.sched.now + self.node.wall_offset

    def sleep(self, seconds):
        self._enter()
        self._wait(seconds)

    def boot_id(self):
        return f"sim-boot-{self.name}"  # hosts do not reboot in the simulation

    # -- peers ------------------------------------------------------------------------------
    def call(self, cfg, key, peer, kind, body, timeout):
        self._enter()
        c, src, dst = self.c, self.name, peer.name
        net, deadline = c.net, self.sched.now + timeout
        c.count("messages")
        if not net.connect_ok(src, dst) or (not net.tcp and net.lost(src, dst)):
            self._wait(timeout)
            raise socket.timeout("timed out")
        hold = self.handshake(src, dst, timeout) + net.leg(src, dst, DATA_RTO) if net.tcp \
            else 0.0
        message = {"from": src, "kind": kind, "nonce": c.nonce(), "ts": self.wall(),
                   "body": wire(body)}
        if c.rng_net.random() < c.dup_rate:  # the network delivers a copy later
            c.count("duplicates")
            c.deliver_later(dst, message, self.sched.now + c.rng_net.random() * 3)
        there = net.delay(src, dst) + hold
        if net.tcp and self.sched.now + there > deadline:
            # the caller gives up; its kernel still delivers the request it had sent
            c.deliver_later(dst, message, self.sched.now + there)
            self.give_up(deadline)
        self._wait(there)
        target = c.nodes[dst]
        if not target.alive:
            raise ConnectionRefusedError(f"{dst}: connection refused")
        if target.busy():  # stopped or blocked on a lock: the request waits in its socket
            c.deliver_later(dst, message, target.free_at())
            self._wait(max(0.0, deadline - self.sched.now))
            raise socket.timeout("timed out")
        reply = c.serve(dst, message)
        if reply is None:
            raise ConnectionResetError(f"{dst} closed the connection")
        for i, (who, what) in enumerate(net.reply_drops):
            if who == src and what == kind:
                del net.reply_drops[i]
                c.trace(src, f"the network loses {dst}'s reply to {kind}")
                reply = None
                break
        d2 = net.delay(dst, src) + (net.leg(dst, src, DATA_RTO) if net.tcp else 0.0)
        if reply is None or not net.packet_ok(dst, src) or (not net.tcp and net.lost(dst, src)) \
                or self.sched.now + d2 > deadline:
            self.give_up(deadline)
        self._wait(d2)
        return reply

    def give_up(self, deadline):
        """Wait out a call's deadline, then time out."""
        self._wait(max(0.0, deadline - self.sched.now))
        raise socket.timeout("timed out")

    def handshake(self, src, dst, timeout):
        """TCP mode: the time the SYN and the SYN-ACK take; a connect that takes longer than
        the timeout fails, after the timeout."""
        net = self.c.net
        took = net.leg(src, dst, SYN_RTO) + net.leg(dst, src, SYN_RTO)
        if took >= timeout:
            self._wait(timeout)
            raise socket.timeout("timed out")
        return took

    def serve(self, agent_):
        self.node.replays = agent.ReplayCache()
        return _Server()

    # -- the world's objects ------------------------------------------------------------------
    def postgres(self, cfg):
        return SimPostgres(self)

    def remote_postgres(self, cfg):
        return SimRemote(self)

    def fence(self, pg_port):
        return SimFence(self)

    def state_file(self, path, default):
        return SimStateFile(self, default)

    def event_log(self, path, node):
        return SimEvents(self)

    def history_file(self, path):
        return SimHistory(self)

    def serve_http(self, agent_):
        return None  # the health endpoints are for operators: not simulated

    def agent_lock(self, state_dir):
        return _Lock()

    def logger(self):
        log = logging.Logger(f"bobry.{self.name}", logging.INFO)  # one per agent, not shared
        log.addHandler(_TraceHandler(self.c, self.name))
        return log

    def spawn(self, name, step):
        self.c.run_as(self.name, self.inc, self.sched.now + 0.01, step, name)

    def event(self):
        return SimWake()

    def run_routine(self, stop, step, wake=None):
        raise AssertionError("the simulator schedules routines itself")


class SimWake:
    """Agent.wake in the simulator: set() brings the loop's next step forward to now, through
    on_set (Cluster.run_as); a set during the step makes the next one come at once, as
    World.run_routine does."""

    def __init__(self):
        self.flag, self.on_set = False, None

    def set(self):
        self.flag = True
        if self.on_set is not None:
            self.on_set()

    def clear(self):
        self.flag = False

    def is_set(self):
        return self.flag


class _Server:
    def shutdown(self):
        pass


class _Lock:
    fd = None

    def acquire(self, log, stop):
        return True


class _TraceHandler(logging.Handler):
    def __init__(self, cluster, node):
        super().__init__(logging.INFO)
        self.c, self.node = cluster, node

    def emit(self, record):
        self.c.trace(self.node, record.getMessage(), kind="log")


class SimStateFile:
    """view.json: write, fsync, rename -- a crash before the rename keeps the old file."""

    def __init__(self, world, default):
        self.w, self.default = world, default

    def load(self):
        self.w._enter()
        return self.w.node.disk_view or self.default

    def exists(self):
        return self.w.node.disk_view is not None

    def save(self, view):
        w = self.w
        w._enter()
        node = w.node
        if node.disk_fail:
            raise OSError(28, "No space left on device")
        if node.disk_slow:
            w._wait(node.disk_slow, locked=True)
        node.disk_view = view
        w.c.saved(w.name, view)
        if node.crash_after_save:
            node.crash_after_save = False
            w.c.crash(w.name, "killed right after a durable write")
            raise SimCrash(w.name)


class SimHistory:
    """The arbiter's history file: appended records survive restarts (a slow disk too)."""

    def __init__(self, world):
        self.w = world

    def append(self, record):
        w = self.w
        w._enter()
        if w.node.disk_fail:
            raise OSError(28, "No space left on device")
        if w.node.disk_slow:
            w._wait(w.node.disk_slow, locked=True)
        w.node.history.append(wire(record))

    def read(self):
        self.w._enter()
        return [dict(r) for r in self.w.node.history]


class SimEvents:
    def __init__(self, world):
        self.w = world

    def __call__(self, event, **detail):
        self.w._enter()
        self.w.c.event(self.w.name, event, detail)


class SimFence:
    """agent.Fence on the simulated kernel (Cluster.fences)."""

    def __init__(self, world):
        self.w = world
        self.k = world.c.fences[world.name]
        self.token = None  # of this incarnation's latest arm

    def _nft(self, change):
        """Run nft: `change()` is what the kernel does, when nft is done -- nft_slow after the
        call, whatever happens to the agent meanwhile (a SIGSTOP, a delay in resuming its
        step). The agent goes on afterwards, when it is not stopped; nft's answer is
        change()'s value."""
        w = self.w
        w._enter()
        if w.node.nft_fail:
            raise RuntimeError("nft failed: simulated")
        result = []
        if not w.node.nft_slow:
            result.append(change())
        else:
            w.sched.at(w.sched.now + w.node.nft_slow, lambda: result.append(change()))
            w._wait(w.node.nft_slow, locked=True, pause=False)
            while not result:  # a nested wait may not have reached nft's moment yet
                w._wait(0.001, locked=True, pause=False)
        w._wait(0.0, locked=True)
        return result[0]

    def install(self):
        def change():
            if not self.k.installed:
                self.k.installed = True
                self._set(None)
        self._nft(change)

    def lease(self):
        self.w._enter()
        k, now = self.k, self.w.sched.now
        if not k.open_at(now):
            return None
        return k.expiry - now

    def _set(self, expiry):
        c, k, now = self.w.c, self.k, self.w.sched.now
        was_open = k.open_at(now)
        k.expiry = expiry
        if k.open_at(now) and not was_open:
            k.opened_at = now
            c.fence_opened(self.w.name)
        elif was_open and not k.open_at(now):
            c.trace(self.w.name, "fence: port closed")

    def _timeout(self, seconds):
        """An element's timeout counts from when the kernel takes it."""
        return self.w.sched.now + max(0.001, int(seconds * 1000) / 1000)

    def arm(self, seconds):
        self.k.arms += 1
        self.token = self.k.arms  # one per arm, never reused (agent.Fence.arm)

        def change():
            self.k.fresh = (self.token, self._timeout(seconds))
        self._nft(change)

    def _armed_then(self, change):
        """The write deletes its own armed window's element in the same transaction: a write
        the kernel gets after that window, or after a later arm, fails whole, changing
        nothing (False)."""
        token = self.token  # what the nft child was handed

        def write():
            k = self.k
            if k.fresh is None or k.fresh[0] != token or k.fresh[1] <= self.w.sched.now:
                return False
            k.fresh = None
            return change()
        return write

    def open_for(self, seconds):
        def change():
            self._set(self._timeout(seconds))
            return True
        return self._nft(self._armed_then(change))

    def _live_then(self, expiry):
        """delete + add in one transaction: fails, changing nothing, on a lapsed element."""
        def change():
            if not self.k.open_at(self.w.sched.now):
                return False
            self._set(expiry() if callable(expiry) else expiry)
            return True
        return change

    def renew(self, seconds):
        """Extend a live lease (within the armed window); False (and nothing done) when it
        has lapsed or the window has passed."""
        return self._nft(self._armed_then(self._live_then(lambda: self._timeout(seconds))))

    def open(self):
        """A standby's element (within the armed window); False when the window had passed."""
        def change():
            self._set(float("inf"))
            return True
        return self._nft(self._armed_then(change))

    def hold(self):
        """A paused primary's live lease loses its timeout (within the armed window); False
        when it had lapsed or the window had passed."""
        return self._nft(self._armed_then(self._live_then(float("inf"))))

    def close(self):
        self._nft(lambda: self._set(None))

    def let_through(self, address, seconds):
        def change():
            self.k.handover_until = self.w.sched.now + int(seconds * 1000) / 1000
        self._nft(change)

    def stop_letting_through(self):
        def change():
            self.k.handover_until = None
        self._nft(change)


class SimPostgres:
    """agent.LocalPostgres on the simulated PostgreSQL of this node."""

    lock_fd = None

    def __init__(self, world):
        self.w = world
        self.c = world.c
        self.pg = world.c.pg[world.name]
        self.cfg = world.c.cfgs[world.name]

    def _local(self, seconds=0.001):
        """A query over the local socket: fails at once when the server is down."""
        self.w._enter()
        if not self.pg.running:
            raise OSError("could not connect to server: No such file or directory")
        self.w._wait(seconds)
        if not self.pg.running:
            raise OSError("server closed the connection unexpectedly")

    def prepare_dirs(self):
        self.w._enter()

    def data_exists(self):
        self.w._enter()
        return self.pg.exists

    def has_standby_signal(self):
        return self.pg.signal

    def write_config(self, view, data_dir=None, sync_names=None):
        self.w._enter()
        settings = agent.pg_settings(self.cfg, view, sync_names)
        conninfo = settings.get("primary_conninfo")
        primary = None
        if conninfo:
            address = conninfo.split()[0].split("=")[1]
            primary = self.c.by_address[address]
        self.pg.conf = {"sync": settings["synchronous_standby_names"], "primary": primary}

    def status(self, timeout, standby_name):
        self.w._enter()
        pg, now = self.pg, self.w.sched.now
        if pg.running and pg.status_slow_until > now:
            self.w._wait(timeout)
            return agent.PgStatus("down")
        if not pg.running:
            return agent.PgStatus("down")
        self.w._wait(0.001)
        if not pg.running:
            return agent.PgStatus("down")
        if pg.recovery:
            return agent.PgStatus("standby", pg.active["sync"])
        row = pg.walsender_row(standby_name)
        if row is None:
            return agent.PgStatus("primary", pg.active["sync"], len(pg.wal))
        state, sync, flush, reply = row
        return agent.PgStatus("primary", pg.active["sync"], len(pg.wal), state, sync, flush,
                              reply)

    def start(self):
        self.w._enter()
        if self.pg.running:
            raise RuntimeError("pg_ctl start failed: another server might be running")
        if not self.pg.exists:
            raise RuntimeError("pg_ctl start failed: no data directory")
        if self.pg.start_fails:
            raise RuntimeError("pg_ctl start failed: simulated (the server would not start)")
        self.w._wait(0.05)
        if not self.pg.running:
            self.pg.start()
            self.c.trace(self.w.name, "postgres started" + (" (standby)" if self.pg.recovery
                                                             else ""))

    def stop_immediate(self):
        self.w._enter()
        self.pg.stop("pg_ctl stop -m immediate")

    def running(self):
        self.w._enter()
        return self.pg.running

    def wal_needs(self):
        """The simulator never recycles WAL: every segment stays with its primary."""
        self.w._enter()
        if not self.pg.exists:
            raise RuntimeError("pg_controldata: no data directory")
        return SIM_WAL_FILE, [], 0, 16 * 1024 * 1024

    def log_since(self, offset):
        """PostgreSQL's log: the simulator writes none (no WAL is ever found gone)."""
        self.w._enter()
        return "", 0

    def timeline(self):
        self.w._enter()
        if not self.pg.exists:
            raise RuntimeError("pg_controldata: no data directory")
        return self.pg.ckpt_tli

    def rewound(self):
        self.w._enter()
        if not self.pg.exists:
            raise RuntimeError("pg_controldata: no data directory")
        return self.pg.control == "in archive recovery"

    def rewind_mark(self):
        self.w._enter()
        return self.pg.rewind_mark

    def rewind(self, view, boot):
        """A second rewind of a torn directory "succeeds" and leaves it torn: pg_rewind cannot
        know what a killed one copied (the worst case of its manual's warning)."""
        self.w._enter()
        pg, c = self.pg, self.c
        pg.rewind_mark = boot
        if pg.running:
            raise RuntimeError("pg_rewind failed: target server must be shut down cleanly")
        source = view.primary
        src = c.pg[source]
        if not c.pg_reachable(self.w.name, source):
            raise RuntimeError(f"pg_rewind from {source} failed: could not connect")
        torn_before, pg.torn = pg.torn, True  # copying: killed now (with the agent), it is torn
        self.w._wait(0.2)
        pg.torn = torn_before
        stops, self.w.node.rewind_stops = self.w.node.rewind_stops, None
        if stops:
            pg.torn = True
            c.trace(self.w.name, f"pg_rewind onto {source} stops half-way ({stops})")
            if stops == "kill":  # the agent and its child, as a unit's cgroup is killed
                c.crash(self.w.name, "SIGKILL, its pg_rewind child with it")
                raise SimCrash(self.w.name)
            raise subprocess.TimeoutExpired("pg_rewind", 600)
        if pg.control not in ("shut down", "shut down in recovery"):
            pg.control = "shut down"  # pg_rewind's crash recovery in single-user mode
        if src.ckpt_tli <= pg.ckpt_tli and not pg.prefix_of(src):
            raise RuntimeError(f"pg_rewind from {source} failed: source and target cluster "
                               "are on the same timeline")
        at = pg.common_prefix(src)
        pg.set_wal(src.wal)
        pg.tli, pg.ckpt_tli = src.tli, src.ckpt_tli
        pg.control = "in archive recovery"  # the source's pg_control, pg_rewind's last write
        c.trace(self.w.name, f"pg_rewind onto {source}: diverged at {at}")
        return f"pg_rewind: servers diverged at WAL location 0/{at:X} on timeline {pg.tli}"

    def move_aside(self):
        self.w._enter()
        self.pg.exists = False
        self.pg.torn, self.pg.rewind_mark = False, None
        self.pg.signal = False
        self.pg.control = None
        self.pg.set_wal([])
        return f"{self.cfg.data_dir}.replaced-sim"

    def make_standby(self, view):
        self.w._enter()
        self.pg.rewind_mark = None
        self.pg.signal = True
        self.write_config(view)

    def reload(self):
        self._local()
        self.pg.active = dict(self.pg.conf)
        self.pg.release()

    def promote(self):
        self._local(0.02)
        if not self.pg.recovery:
            raise RuntimeError("pg_promote failed: recovery is not in progress")
        self.pg.promote()

    def checkpoint(self, timeout=600):
        self._local(0.05)
        self.pg.ckpt_tli = self.pg.tli

    def terminate_clients(self):
        self._local()
        if self.pg.pending:
            self.c.trace(self.w.name, f"client sessions ended: {len(self.pg.pending)} "
                                      "commits get an error")
        self.pg.fail_pending()

    def initdb(self, view):
        self.w._enter()
        self.w._wait(0.5)
        pg = self.pg
        pg.exists, pg.signal, pg.tli, pg.ckpt_tli = True, False, 1, 1
        pg.control = "shut down"
        pg.set_wal([])
        pg.append(1)
        self.write_config(view)

    def basebackup(self, view):
        self.w._enter()
        source = view.primary
        self.w._wait(0.5)
        if not self.c.pg_reachable(self.w.name, source, replication=True):
            raise RuntimeError(f"pg_basebackup from {source} failed: could not connect")
        src, pg = self.c.pg[source], self.pg
        pg.set_wal(src.wal)
        pg.exists, pg.signal, pg.tli, pg.ckpt_tli = True, True, src.tli, src.tli
        pg.control = "in production"  # the running primary's pg_control, copied as it is
        self.write_config(view)


class SimRemote:
    """agent.RemotePostgres: the other nodes' PostgreSQL, over the simulated network."""

    def __init__(self, world):
        self.w = world

    def prepare(self):
        self.w._enter()

    def _ask(self, node, timeout):
        w, c = self.w, self.w.c
        w._enter()
        src, dst, net = w.name, node.name, c.net
        deadline = w.sched.now + timeout
        if not net.connect_ok(src, dst) or (not net.tcp and net.lost(src, dst)):
            w._wait(timeout)
            raise TimeoutError("PostgreSQL did not answer in time")
        w._wait(net.delay(src, dst) + (w.handshake(src, dst, timeout) if net.tcp else 0.0))
        pg = c.pg[dst]
        if not pg.running:
            raise OSError(f"could not connect to {dst}: connection refused")
        if not c.fences[dst].admits(src, c.other_db(dst), w.sched.now):
            raise OSError(f"could not connect to {dst}: connection reset (fenced)")
        if not net.packet_ok(dst, src) or (not net.tcp and net.lost(dst, src)):
            w._wait(timeout)
            raise TimeoutError("PostgreSQL did not answer in time")
        back = net.delay(dst, src)
        if net.tcp:  # the startup, authentication and query, each segment maybe sent again
            back += sum(net.leg(src, dst, DATA_RTO) + net.leg(dst, src, DATA_RTO)
                        for _ in range(PG_ROUND_TRIPS))
            if w.sched.now + back > deadline:
                w.give_up(deadline)
        w._wait(back)
        return pg

    def in_recovery(self, node, timeout):
        return self._ask(node, timeout).recovery

    def checkpoint_timeline(self, node, timeout):
        return self._ask(node, timeout).ckpt_tli

    def wal_files(self, node, timeout):
        self._ask(node, timeout)
        return [SIM_WAL_FILE]
