"""python -m lab [--backend netns|vagrant] COMMAND …  (python -m lab --help lists them)"""
import argparse
import json
import sys

from lab.backend import DB_HOSTS, HOSTS, LabError, check_host


def progress(text, end="\n"):
    print(text, end=end, file=sys.stderr, flush=True)


def make_backend(name, provider=None):
    if name == "vagrant":
        from lab.vagrant import VagrantBackend
        return VagrantBackend(provider=provider)
    from lab.netns import NetnsBackend
    return NetnsBackend()


def status_table(rows):
    header = ("host", "address", "agent", "postgres", "timeline", "fenced", "term", "replication")
    lines = [header]
    for st in rows:
        view = st.get("view") or {}
        reps = "; ".join(f"{r['standby']} {r['state']} {r['sync_state']} lag {r['lag_bytes']} B"
                         for r in st.get("replication") or [])
        if st.get("pg") == "standby":
            reps = f"receiver {st.get('receiver') or 'down'}"
        if st.get("config_role") == "arbiter" and view:
            reps = f"view: {view.get('primary')} primary, eligible {view.get('eligible')}"
        lines.append((st.get("node", "?"), st.get("address", "?"), st.get("agent", "?"),
                      st.get("pg", "-") if st.get("config_role") != "arbiter" else "-",
                      str(st.get("timeline", "-")), str(st.get("fenced", "-")),
                      str(view.get("term", "-")), reps or "-"))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in lines)


def cmd_up(backend, args):
    if args.strict_sync:
        backend.strict_sync = True
    backend.up(progress)
    backend.wait_until("waiting for a primary with a synchronous standby",
                       backend.primary_with_sync_standby, args.timeout, progress)
    if getattr(args, "proxy", False):
        backend.start_proxy(progress)
    print(status_table(backend.status()))


def cmd_status(backend, args):
    rows = backend.status()
    print(json.dumps(rows, indent=2) if args.json else status_table(rows))
    if not args.json:  # and the agents' own cluster table (agent.py … status), from one host
        print("\n" + (backend.cluster_table() or "cluster table: no agent answered"))


def cmd_down(backend, args):
    backend.down()
    progress("lab down")


def cmd_sh(backend, args):
    return backend.interactive(check_host(args.host), args.cmd)


def cmd_psql(backend, args):
    check_host(args.host, DB_HOSTS)
    return backend.interactive(args.host, backend.psql_argv(args.host, args.c))


def cmd_dsn(backend, args):
    backend.proxy = args.proxy
    print(backend.dsn())


def cmd_cut(backend, args):
    backend.cut(args.a, args.b, one_way=args.one_way)
    print(f"cut new connections {args.a} -> {args.b}" if args.one_way
          else f"cut the link {args.a} <-> {args.b}")


def cmd_isolate(backend, args):
    backend.isolate(args.host)
    print(f"isolated {args.host} from {', '.join(h for h in HOSTS if h != args.host)}")


def cmd_heal(backend, args):
    backend.heal(args.a, args.b)
    what = (f"the link {args.a} <-> {args.b}" if args.b else
            f"every link of {args.a}" if args.a else "every fault on every host")
    print(f"healed {what}")


def cmd_flood(backend, args):
    proc = backend.flood(args.source, args.target, args.seconds, args.connections)
    proc.proc.wait(args.seconds + 30)
    print(f"flooded {args.target}'s agent port from {args.source} for {args.seconds} s")


def cmd_kill_agent(backend, args):
    pid = backend.signal_agent(args.host, args.signal)
    print(f"sent SIG{args.signal} to the agent on {args.host} (pid {pid})")


def cmd_start_agent(backend, args):
    pid = backend.start_agent(args.host)
    print(f"agent on {args.host} running (pid {pid})")


def cmd_stop_pg(backend, args):
    result = backend.stop_pg(args.host)
    print(f"stop PostgreSQL on {args.host}: {(result.stdout + result.stderr).strip()}")
    return result.returncode


def cmd_start_pg(backend, args):
    result = backend.start_pg(args.host)
    print(f"start PostgreSQL on {args.host}: {(result.stdout + result.stderr).strip()}")
    return result.returncode


def cmd_switchover(backend, args):
    answer = backend.switchover()
    print(json.dumps(answer))
    return 0 if answer.get("done") else 1


def cmd_experiment(backend, args):
    from lab import experiments
    if not backend.exists():  # it would wait two minutes for a primary that is not there
        raise LabError("the lab is not up: run `python -m lab up` first (a benchmark builds "
                       "its own)")
    backend.proxy = getattr(args, "proxy", False)  # the load goes through HAProxy
    result = experiments.EXPERIMENTS[args.name](backend, progress, args)
    print(json.dumps(result, indent=2) if args.json else experiments.report(args.name, result))
    if result.get("report_dir"):
        progress(f"the report: {result['report_dir']}/report.md")
    return 0 if result.get("ok") else 1


def cmd_bench(backend, args):
    from lab import bench
    # the embedded lab is rebuilt for a benchmark (seconds); a Vagrant lab is reused (minutes)
    result = bench.run(backend, progress, args.what, args.trials,
                       fresh=backend.name == "netns", args=args)
    print(json.dumps(result, indent=2) if args.json else bench.report(result))
    if result.get("report_dir"):
        progress(f"the report: {result['report_dir']}/report.md")
    return 0 if result.get("ok") else 1


def _load_options(sp):
    sp.add_argument("--rate", type=int, default=100,
                    help="failover: pgbench's transactions per second (0: unthrottled)")
    sp.add_argument("--bulk-mb", type=int, default=0,
                    help="failover: a bulk load of this many MiB, cut half-way")
    sp.add_argument("--probe-deadline", type=float, default=None,
                    help="failover: how long the write probe waits for a commit before it "
                    "drops the connection and walks the hosts again (s; default 0.8)")


def cmd_report(backend, args):
    from lab import report
    try:
        path = report.render(args.dir)
    except FileNotFoundError as exc:
        raise LabError(f"not a report folder: {exc.filename} is missing") from None
    print(path)


def cmd_events(backend, args):
    import time

    from lab import report
    events = backend.events()
    if args.since is not None:
        events = [e for e in events if e["t"] >= time.time() - args.since]
    if args.json:
        print("".join(json.dumps(e) + "\n" for e in events), end="")
    else:
        print("\n".join(report.timeline_lines(events)))


def cmd_chaos(backend, args):
    from lab import chaos
    result = chaos.chaos(backend, progress, args)
    print(json.dumps(result, indent=2) if args.json else chaos.report(result))
    return 0 if result.get("ok") else 1


def parser():
    p = argparse.ArgumentParser(prog="python -m lab", description=__doc__)
    p.add_argument("--backend", choices=["netns", "vagrant"], default="netns",
                   help="netns: the embedded lab on this machine (default); vagrant: VMs or "
                        "LXC containers (Vagrantfile)")
    p.add_argument("--provider", choices=["virtualbox", "lxc"],
                   help="vagrant: the provider `up` uses (default: $VAGRANT_DEFAULT_PROVIDER, "
                        "else virtualbox)")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, func, help_text):
        sp = sub.add_parser(name, help=help_text)
        sp.set_defaults(func=func)
        return sp

    sp = add("up", cmd_up, "build the lab and wait for primary + sync standby")
    sp.add_argument("--timeout", type=float, default=180)
    sp.add_argument("--strict-sync", action="store_true",
                    help="embedded lab: strict_sync = true (commits always wait for the "
                         "standby); refused by the Vagrant lab, which runs agent.ini as it is")
    sp.add_argument("--proxy", action="store_true",
                    help="embedded lab: HAProxy on the client host, checking GET /primary")
    add("status", cmd_status, "one line per host").add_argument("--json", action="store_true")
    add("down", cmd_down, "stop everything the lab started and remove it")
    sp = add("sh", cmd_sh, "run a command on a host")
    sp.add_argument("host")
    sp.add_argument("cmd", nargs=argparse.REMAINDER)
    sp = add("psql", cmd_psql, "psql on a database host (local socket, as postgres)")
    sp.add_argument("host")
    sp.add_argument("-c", help="run one statement and exit")
    add("dsn", cmd_dsn, "the clients' multi-host connection string").add_argument(
        "--proxy", action="store_true", help="HAProxy's address instead (lab up --proxy)")
    sp = add("cut", cmd_cut, "drop all traffic between two hosts")
    sp.add_argument("a")
    sp.add_argument("b")
    sp.add_argument("--one-way", action="store_true",
                    help="drop only new connections from a to b (b can still connect to a)")
    add("isolate", cmd_isolate, "cut every link of a host").add_argument("host")
    sp = add("heal", cmd_heal, "heal every fault, a host's links, or one link")
    sp.add_argument("a", nargs="?")
    sp.add_argument("b", nargs="?")
    sp = add("flood", cmd_flood, "abuse a host's agent port (connections, garbage, 10 MB lines)")
    sp.add_argument("target")
    sp.add_argument("--source", default="client")
    sp.add_argument("--seconds", type=float, default=10.0)
    sp.add_argument("--connections", type=int, default=1000)
    sp = add("kill-agent", cmd_kill_agent, "signal a host's agent")
    sp.add_argument("host")
    sp.add_argument("--signal", choices=["KILL", "TERM", "STOP", "CONT"], default="KILL")
    add("start-agent", cmd_start_agent, "start a host's agent").add_argument("host")
    add("stop-pg", cmd_stop_pg, "stop PostgreSQL on a host (fast)").add_argument("host")
    add("start-pg", cmd_start_pg, "start PostgreSQL on a host as its data dir says").add_argument(
        "host")
    sp = add("experiment", cmd_experiment, "run a scripted experiment and report")
    sp.add_argument("name", choices=["failover", "switchover", "standby-loss", "pingpong",
                                     "jitter"])
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--minutes", type=float, default=5.0, help="jitter: how long")
    sp.add_argument("--pause", type=float, help="jitter: each agent pause in seconds (default "
                                                "0.5: half of the default fence_timeout)")
    sp.add_argument("--hog", default="primary", choices=["primary", *HOSTS, "none"],
                    help="jitter: the host that runs a busy loop (default: the primary's)")
    sp.add_argument("--rounds", type=int, default=3, help="pingpong: how many failovers")
    _load_options(sp)
    sp.add_argument("--report-dir", help="write the report folder here (default: a new "
                                         "folder under $BOBRY_REPORT_DIR or "
                                         "/var/tmp/bobry-reports)")
    sp.add_argument("--proxy", action="store_true",
                    help="the load connects through HAProxy (lab up --proxy)")
    add("switchover", cmd_switchover, "planned switchover: the standby becomes the primary")
    sp = add("chaos", cmd_chaos, "random faults from a seeded schedule under load; checks "
                                 "one writer, nothing lost, convergence")
    sp.add_argument("--minutes", type=float, default=3.0)
    sp.add_argument("--seed", type=int, default=1)
    sp.add_argument("--json", action="store_true")
    sp = add("bench", cmd_bench, "repeat an experiment on one lab and print medians (a fresh "
                                 "embedded lab; the running Vagrant lab)")
    sp.add_argument("what", choices=["failover", "switchover", "standby-loss"])
    sp.add_argument("--trials", type=int, default=10)
    _load_options(sp)
    sp.add_argument("--json", action="store_true")
    sp = add("report", cmd_report, "draw an experiment's (or a benchmark's) report folder "
                                   "again from its raw records")
    sp.add_argument("dir")
    sp = add("events", cmd_events, "the merged timeline of every host's events and the port "
                                   "watcher's, one line each")
    sp.add_argument("--since", type=float, metavar="S", help="only the last S seconds")
    sp.add_argument("--json", action="store_true", help="the events as JSON lines")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        backend = make_backend(args.backend, args.provider)
        if args.command not in ("up", "down", "sh", "dsn"):
            backend.check_ready()
        return args.func(backend, args) or 0
    except LabError as exc:
        print(f"lab: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


