"""One simulated run: boot, faults from a seeded schedule for N steps, then quiet until the
cluster converges; and the shrinking of a failing run's fault schedule."""
import collections
import time

from .cluster import CONVERGE_BOUND_S, DB, Cluster
from .world import HOSTS, Violation

AGENTS = ("pg1", "pg2", "arb")
PAIRS = [(a, b) for i, a in enumerate(HOSTS) for b in HOSTS[i + 1:]]
ASKS = ("eligibility", "handover", "promote", "resume", "settle")

# kind -> weight. Every kind is drawn from the fault stream alone (never from the cluster's
# state), so that a schedule with some faults left out still draws the same others.
KINDS = {
    "cut": 6, "one_way_connect": 4, "one_way_drop": 3, "isolate": 5, "loss": 3,
    "slow_link": 2, "kill_agent": 6, "pause_agent": 4, "stop_pg": 3, "disk_slow": 2,
    "disk_fail": 2, "status_slow": 2, "nft_slow": 2, "nft_fail": 1, "wall_step": 1,
    "switchover": 3, "lose_reply": 3, "pg_start_fails": 2,
}


def isolation(host):
    """The links cut to isolate host: both ways to every other host (the client too)."""
    return [(host, o) for o in HOSTS if o != host] + [(o, host) for o in HOSTS if o != host]


class FaultPlan:
    """Faults at random moments (mean gap `mean_gap` s), each undone after a random time.
    Fault number i is left out when i is in `skip` (it is still drawn)."""

    def __init__(self, cluster, rng, skip=(), mean_gap=4.0):
        self.c, self.rng, self.skip, self.mean_gap = cluster, rng, set(skip), mean_gap
        self.kinds = list(KINDS)
        self.weights = [KINDS[k] for k in self.kinds]
        self.index = 0
        self.active = {}      # index -> undo
        self.applied = []     # (index, time, description)
        self.running = False

    def start(self):
        self.running = True
        self.c.restart_after = lambda: 0.2 + self.c.rng_misc.random() * 4.0
        self._next()

    def _next(self):
        gap = self.rng.expovariate(1.0 / self.mean_gap)
        self.c.sched.at(self.c.sched.now + gap, self._fire)

    def _fire(self):
        if not self.running:
            return
        i = self.index
        self.index += 1
        kind = self.rng.choices(self.kinds, self.weights)[0]
        duration = self.rng.choice((0.3, 1.0, 2.5, 5.0, 10.0, 20.0)) * (0.5 + self.rng.random())
        params = self._params(kind)
        if i not in self.skip:
            undo, text = self._apply(kind, params)
            self.c.faults[kind] += 1
            self.applied.append((i, round(self.c.sched.now, 3), text))
            self.c.trace("fault", f"#{i} {text}" + (f" for {duration:.2f} s" if undo else ""))
            if undo is not None:
                self.active[i] = undo
                self.c.sched.at(self.c.sched.now + duration, lambda: self._undo(i))
        self._next()

    def _undo(self, i):
        undo = self.active.pop(i, None)
        if undo is not None:
            undo()
            self.c.trace("fault", f"#{i} healed")

    def stop(self):
        """Every fault undone, every agent running again: the quiet phase."""
        self.running = False
        for i in sorted(self.active):
            self._undo(i)
        c = self.c
        c.restart_after = lambda: 0.0
        for n in AGENTS:
            node = c.nodes[n]
            node.paused_until = 0.0
            node.crash_countdown = None
            node.crash_after_save = False
            node.stall_at_next_call = 0.0
            if not node.alive:
                c.start_agent(n)
        c.net.reply_drops.clear()

    def _params(self, kind):
        r = self.rng
        return {"pair": r.choice(PAIRS), "flip": r.random() < 0.5, "host": r.choice(AGENTS),
                "db": r.choice(DB), "p": r.choice((0.05, 0.2, 0.5, 0.9)),
                "extra": r.choice((0.05, 0.15, 0.4)), "mode": r.random(),
                "k": r.randint(1, 25), "offset": r.uniform(-3, 3),
                "ask": r.choice(ASKS), "pause": r.choice((0.3, 0.8, 2.0, 5.0)),
                "slow": r.choice((0.05, 0.3, 0.8))}

    def _apply(self, kind, p):
        c, net = self.c, self.c.net
        a, b = p["pair"][::-1] if p["flip"] else p["pair"]
        if kind == "cut":
            return self._table(net.drop, [(a, b), (b, a)]), f"cut {a} {b}"
        if kind == "one_way_connect":
            return self._table(net.block, [(a, b)]), f"one-way: {a} cannot connect to {b}"
        if kind == "one_way_drop":
            return self._table(net.drop, [(a, b)]), f"one-way: packets {a} -> {b} dropped"
        if kind == "isolate":
            h = p["host"]
            return self._table(net.drop, isolation(h)), f"isolate {h}"
        if kind == "loss":
            return (self._table(net.loss, [(a, b), (b, a)], p["p"]),
                    f"loss {p['p']:.0%} between {a} and {b}")
        if kind == "slow_link":
            return (self._table(net.slow, [(a, b), (b, a)], p["extra"]),
                    f"+{p['extra']} s delay between {a} and {b}")
        node = c.nodes[p["host"]]
        if kind == "kill_agent":
            mode = p["mode"]
            if mode < 0.4:
                c.crash(node.name, "SIGKILL")
                return None, f"SIGKILL {node.name}'s agent"
            if mode < 0.75:
                node.crash_countdown = p["k"]
                return None, f"SIGKILL {node.name}'s agent at its port call #{p['k']} from now"
            node.crash_after_save = True
            return None, f"SIGKILL {node.name}'s agent right after its next durable write"
        if kind == "pause_agent":
            if p["mode"] < 0.5:
                node.paused_until = max(node.paused_until, c.sched.now + p["pause"])
                return None, f"SIGSTOP {node.name}'s agent for {p['pause']} s"
            node.stall_at_next_call = p["pause"]
            return None, (f"SIGSTOP {node.name}'s agent in the middle of its next step for "
                          f"{p['pause']} s")
        if kind == "disk_slow":
            node.disk_slow = p["slow"]
            return (lambda: setattr(node, "disk_slow", 0.0),
                    f"{node.name}'s disk: each state write takes {p['slow']} s")
        if kind == "disk_fail":
            node.disk_fail = True
            return lambda: setattr(node, "disk_fail", False), f"{node.name}'s disk full"
        if kind == "wall_step":
            node.wall_offset += p["offset"]
            return None, f"{node.name}'s wall clock steps {p['offset']:+.2f} s"
        db = p["db"]
        dnode, pg = c.nodes[db], c.pg[db]
        if kind == "stop_pg":
            pg.stop("stopped behind the agent's back", clean=True)
            return None, f"PostgreSQL on {db} stopped"
        if kind == "pg_start_fails":
            pg.stop("stopped behind the agent's back", clean=True)
            pg.start_fails = True
            return (lambda: setattr(pg, "start_fails", False),
                    f"PostgreSQL on {db} stopped and cannot start")
        if kind == "status_slow":
            pg.status_slow_until = float("inf")
            return (lambda: setattr(pg, "status_slow_until", 0.0),
                    f"{db}'s PostgreSQL answers its agent's status query too late")
        if kind == "nft_slow":
            dnode.nft_slow = p["slow"]
            return lambda: setattr(dnode, "nft_slow", 0.0), f"{db}'s nft calls take {p['slow']} s"
        if kind == "nft_fail":
            dnode.nft_fail = True
            return lambda: setattr(dnode, "nft_fail", False), f"{db}'s nft calls fail"
        if kind == "switchover":
            view = c.arb_view
            a_ = c.nodes[view.primary].agent if view else None
            if a_ is None:
                return None, "switchover asked (no primary agent running)"
            request, refusal = a_.ask_switchover()
            if request is not None:
                wait = a_.SWITCHOVER_WAIT
                c.sched.at(c.sched.now + wait, lambda: a_.end_switchover(request))
            return None, f"switchover asked of {view.primary}" + (
                f": refused ({refusal['reason']})" if refusal else "")
        if kind == "lose_reply":
            net.reply_drops.append((db, p["ask"]))
            return None, f"the network will lose the reply to {db}'s next {p['ask']} request"
        raise AssertionError(kind)

    @staticmethod
    def _table(table, keys, value=1):
        if table is not None and value != 1 and keys:  # loss / delay: values, not counters
            for k in keys:
                table[k] = table.get(k, 0) + value

            def undo():
                for k in keys:
                    table[k] -= value
                    if table[k] <= 1e-9:
                        del table[k]
            return undo
        for k in keys:
            table[k] = table.get(k, 0) + 1

        def undo_count():
            for k in keys:
                table[k] -= 1
                if table[k] <= 0:
                    del table[k]
        return undo_count


Result = collections.namedtuple("Result", "seed strict steps ticks sim_s faults writes acked "
                                          "grants handovers converge_s violation applied "
                                          "cluster wall_s")


def run(seed, steps, skip=(), log=None, strict=None, mean_gap=4.0, bound=CONVERGE_BOUND_S,
        setup=None, wall_skew=3.0, timing=None, fibers=False):
    """One run: boot until the cluster first converges, faults for `steps` scheduler steps,
    then quiet until it converges again (within `bound` s). setup(cluster) may script it;
    `timing` (an agent.Timing) replaces agent.ini's; `fibers`: steps block as fibers
    (world.Fiber) instead of nested runs."""
    began = time.perf_counter()
    c = Cluster(seed, strict_sync=strict, log=log, wall_skew=wall_skew, timing=timing,
                fibers=fibers)
    plan = FaultPlan(c, c.rng_faults, skip, mean_gap)
    violation, converge_s = None, None
    s = c.sched
    try:
        c.form()
        if setup is not None:
            setup(c, plan)
        else:
            plan.start()
            target = s.steps + steps
            s.run_until(float("inf"), until=lambda: s.steps >= target)
        plan.stop()
        quiet = s.now
        s.run_until(quiet + bound, until=c.converged)
        if not c.converged():
            c.violation("no_convergence", f"not back to a primary with an eligible synchronous "
                                          f"standby within {bound} s of the last fault")
        converge_s = round(s.now - quiet, 3)
        s.run_until(s.now + 3.0)
        primary = c.nodes["arb"].agent.view.primary
        missing = c.missing_on(primary)
        if missing:
            c.violation("lost_acked", f"acknowledged writes {missing[:5]} missing on the "
                                      f"primary {primary} at the end")
    except Violation as exc:
        violation = (round(s.now, 3), exc.kind, exc.detail)
    s.close()
    return Result(seed, c.strict, s.steps, c.ticks, round(s.now, 1), dict(c.faults), c.writes,
                  len(c.acked), c.grants, c.handovers, converge_s, violation, plan.applied, c,
                  time.perf_counter() - began)


def shrink(seed, steps, result, budget=40, **kw):
    """Leave faults out, one at a time from the last, while the run still fails the same
    way: the faults that remain are needed for the failure."""
    kind = result.violation[1]
    skip = set()
    best = result
    for tries, (index, _, _) in enumerate(reversed(result.applied)):
        if tries >= budget:
            break
        attempt = run(seed, steps, skip | {index}, **kw)
        if attempt.violation is not None and attempt.violation[1] == kind:
            skip.add(index)
            best = attempt
    return best, sorted(skip)


def report(result, skip=(), steps=None, out=print, options=""):
    """A failed run explained; `options`: the replay's other arguments (--timing ...)."""
    c = result.cluster
    t, kind, detail = result.violation
    out(f"VIOLATION {kind} at t={t} s, seed {result.seed}: {detail}")
    skip_arg = f" --skip {','.join(map(str, skip))}" if skip else ""
    out(f"replay: python -m tests.sim --seed {result.seed} --steps {steps}{skip_arg}{options} -v")
    out(f"faults applied ({len(result.applied)}):")
    for i, at, text in result.applied:
        out(f"  #{i:<4} t={at:<9} {text}")
    out("trace (last steps before the violation):")
    for at, node, text in list(c.traces)[-80:]:
        out(f"  {at:9.3f} {node:6} {text}")
    out("decisions (each agent's latest, oldest first):")
    for name in AGENTS:
        for at, action, reason in c.nodes[name].decisions:
            out(f"  {name:4} {at:9.3f} {action}: {reason}")
