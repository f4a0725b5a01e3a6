#!/usr/bin/env python3
"""Bobry agent: one program for the primary (M), the synchronous standby (S) and the arbiter (A).

    agent.py --config agent.ini --node pg1              run the agent of node pg1
    agent.py --config agent.ini --node pg1 status       the whole cluster as one table
    agent.py --config agent.ini --node pg1 status --local   this host's status as JSON
    agent.py --config agent.ini --node pg1 switchover   ask the primary to hand over
    agent.py --config agent.ini --node pg1 pause|resume no automatic failover while paused
    agent.py --config agent.ini --node pg1 history      every term: who, when, why

The file has four parts, in this order:
  configuration  -- agent.ini parsed and checked; every error names file, section and key
  decisions      -- pure functions: observations + persisted view + timing -> one action
  adapters       -- thin I/O: the wire protocol, PostgreSQL, iptables, files
  the agent      -- threads that observe, a loop that decides and acts, the arbiter service

Only the standard library and psycopg2.
"""
from __future__ import annotations

import contextlib
import os
import sys

# `agent.py …` re-executes itself at once (the same pid, for systemd's and the lab's records)
# to run as a module that LAUNCHER compiles, for memory: run as a script, CPython keeps the
# file's whole syntax tree resident until the script returns (pyrun_file frees its AST arena
# after run_mod), 8 MiB for this file, a fifth of an agent's RSS; compiled with compile(), the
# tree lives only while it compiles. Never from a cached .pyc: a cache is judged by the
# source's mtime and size, and a deploy that keeps both would run the old code. The launcher
# keeps two modules out. `_hashlib`, OpenSSL's backend of hashlib: the agent's one hash,
# BLAKE2b, is built into Python. `ssl`, which psycopg2 imports only to leave OpenSSL's set-up to
# Python: libpq sets up its own OpenSSL, thread-safe since 1.1, and the agent's connections use
# no TLS. The two map the system's libcrypto beside the one psycopg2-binary's libpq brings
# (3.5 MiB, measured; with Debian's python3-psycopg2 it is the same libcrypto, and only the
# two modules are saved). First, it puts on sys.path, as a script run does, the script's own
# directory, not the current one that `-c` puts there (no module comes from wherever the agent
# was started), and it gives main() the argv of a script run.
LAUNCHER = """import os, sys, warnings
sys.path[:] = [p for p in sys.path if p]
if not (sys.flags.isolated or getattr(sys.flags, "safe_path", False)):  # -I, -P: none
    sys.path.insert(0, os.path.dirname(os.path.realpath(sys.argv[1])))
sys.modules.update(_hashlib=None, ssl=None)
if not sys.warnoptions:  # as for __main__: the agent's own deprecations are shown
    warnings.filterwarnings("default", category=DeprecationWarning, module="agent")
sys.argv[:] = sys.argv[1:]
agent = sys.modules["agent"] = type(sys)("agent")
agent.__file__ = sys.argv[0]
with open(agent.__file__, "rb") as source:
    code = compile(source.read(), agent.__file__, "exec")
exec(code, vars(agent))
del code
sys.exit(agent.main(sys.argv[1:]))
"""
FLAGS_WITHOUT_VALUE = set("bBdEIOPqsSuv")  # python's own; -X and -W take one. Not -x (skip
# the first line: compile() would not) nor -i (the prompt would open in LAUNCHER's namespace)


def relaunch_argv(orig_argv, argv, executable, running):
    """The command line that runs `agent.py …` under LAUNCHER, or None to run in place. Only
    for the interpreter started on the file itself, with options of its own at most (`python3
    -X dev agent.py …`; not `-m cProfile`, `-m pdb`, coverage: tools that run the file), and
    only when `executable` is the binary that runs (`running`: Python may have found another of
    that name on PATH)."""
    tail = len(argv)
    if not (executable and argv and argv[0].endswith(".py") and len(orig_argv) > tail
            and orig_argv[-tail:] == argv and running
            and os.path.realpath(executable) == os.path.realpath(running)):
        return None
    options, rest = orig_argv[1:-tail], list(orig_argv[1:-tail])
    while rest:
        token = rest.pop(0)
        if token in ("-X", "-W"):
            if not rest:
                return None
            rest.pop(0)
        elif not (token.startswith(("-X", "-W")) or (
                len(token) > 1 and token[0] == "-" and set(token[1:]) <= FLAGS_WITHOUT_VALUE)):
            return None
    return [executable, *options, "-c", LAUNCHER, os.path.abspath(argv[0]), *argv[1:]]


if __name__ == "__main__" and not sys.flags.inspect:  # PYTHONINSPECT: see -i above
    _relaunch = relaunch_argv(getattr(sys, "orig_argv", []), sys.argv, sys.executable,
                              "/proc/self/exe" if os.path.exists("/proc/self/exe") else "")
    if _relaunch:
        with contextlib.suppress(OSError):  # cannot exec (a seccomp filter …): in place
            os.execv(_relaunch[0], _relaunch)

import argparse
import configparser
import ctypes
import errno
import fcntl
import functools
import hashlib
import hmac
import http
import ipaddress
import json
import logging
import math
import pwd
import re
import resource
import secrets
import select
import selectors
import shlex
import shutil
import signal
import socket
import socketserver
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, replace

import psycopg2
import psycopg2.extensions

# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


class ConfigError(Exception):
    """A bad config: the message names the file, the section and the key."""

    def __init__(self, path, section, key, problem):
        where = f"{path}: [{section}]" + (f" {key}" if key else "")
        super().__init__(f"{where}: {problem}")


ROLES = ("primary", "standby", "arbiter")


@dataclass(frozen=True)
class Node:
    name: str
    address: str
    role: str  # role at bootstrap; who is primary later is the arbiter's view
    pg_port: int
    agent_port: int
    http_port: int | None = None  # the health endpoints (/primary, /replica, ...); optional


@dataclass(frozen=True)
class Timing:
    check_interval: float
    probe_timeout: float
    fence_timeout: float
    safety_margin: float
    failover_timeout: float
    restart_grace: float


@dataclass(frozen=True)
class Config:
    path: str
    me: Node
    nodes: dict
    timing: Timing
    replication_user: str
    replication_password_file: str
    app_user: str
    app_password_file: str
    app_database: str
    agent_key_file: str
    client_addresses: tuple
    strict_sync: bool
    pg_bin: str
    pg_os_user: str
    data_dir: str
    run_dir: str
    state_dir: str
    log_dir: str
    on_role_change: tuple | None = None  # argv of the role change hook (Hooks), optional

    def by_role(self, role):
        return next(n for n in self.nodes.values() if n.role == role)

    @functools.cached_property  # every heartbeat asks, on both sides; copy with replace()
    def arbiter(self):
        return self.by_role("arbiter")

    @property
    def db_nodes(self):
        return [n for n in self.nodes.values() if n.role != "arbiter"]

    def other_db(self, name):
        return next(n for n in self.db_nodes if n.name != name)


def _parse_positive_float(text):
    value = float(text)
    if value <= 0:
        raise ValueError("must be a positive number of seconds")
    return value


def _parse_port(text):
    value = int(text)
    if not 1 <= value <= 65535:
        raise ValueError("must be a port number, 1-65535")
    return value


def _parse_ip(text):
    address = ipaddress.ip_address(text)
    if address.version != 4:
        raise ValueError("must be an IPv4 address (the fence's rules are IPv4)")
    return str(address)


def _parse_cidrs(text):
    return tuple(str(ipaddress.ip_network(p.strip())) for p in text.split(",") if p.strip())


def _parse_bool(text):
    value = text.strip().lower()
    if value not in ("true", "false"):
        raise ValueError("must be true or false")
    return value == "true"


def _parse_role(text):
    if text not in ROLES:
        raise ValueError(f"must be one of {', '.join(ROLES)}")
    return text


def _parse_text(text):
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


def _parse_command(text):
    """A command line split as a shell would (shlex), but run without one: argv."""
    try:
        argv = tuple(shlex.split(text))
    except ValueError as exc:
        raise ValueError(f"not a command line: {exc}") from None
    if not argv:
        raise ValueError("must not be empty")
    return argv


OPTIONAL = object()  # a key that may be left out: its value is then None


# section -> key -> (parser, default or None when required)
SCHEMA = {
    "cluster": {
        "replication_user": (_parse_text, None),
        "replication_password_file": (_parse_text, None),
        "app_user": (_parse_text, None),
        "app_password_file": (_parse_text, None),
        "app_database": (_parse_text, None),
        "agent_key_file": (_parse_text, None),
        "client_addresses": (_parse_cidrs, None),
        "strict_sync": (_parse_bool, "false"),
    },
    "timing": {
        "check_interval": (_parse_positive_float, "0.1"),  # agent.ini's, which says why
        "probe_timeout": (_parse_positive_float, "0.25"),
        "fence_timeout": (_parse_positive_float, "1.0"),
        "safety_margin": (_parse_positive_float, "0.1"),
        "failover_timeout": (_parse_positive_float, "1.5"),
        "restart_grace": (_parse_positive_float, "6.0"),
    },
    "postgres": {
        "bin_dir": (_parse_text, "/usr/lib/postgresql/15/bin"),
        "os_user": (_parse_text, "postgres"),
        "data_dir": (_parse_text, None),
        "run_dir": (_parse_text, None),
    },
    "agent": {
        "state_dir": (_parse_text, None),
        "log_dir": (_parse_text, None),
        # run (no shell) at each role change of this node: Hooks
        "on_role_change": (_parse_command, OPTIONAL),
    },
    "node": {
        "address": (_parse_ip, None),
        "role": (_parse_role, None),
        "pg_port": (_parse_port, "5432"),
        "agent_port": (_parse_port, "7400"),
        # the health endpoints (HealthServer); no HTTP server without it
        "http_port": (_parse_port, OPTIONAL),
    },
}


def _read_section(path, parser, section, schema_name):
    values = {}
    schema = SCHEMA[schema_name]
    present = parser[section] if parser.has_section(section) else {}
    for key in present:
        if key not in schema:
            raise ConfigError(path, section, key, f"unknown key (known: {', '.join(schema)})")
    for key, (parse, default) in schema.items():
        raw = present.get(key, default)
        if raw is None:
            raise ConfigError(path, section, key, "missing (required)")
        if raw is OPTIONAL:
            values[key] = None
            continue
        try:
            values[key] = parse(raw)
        except ValueError as exc:
            raise ConfigError(path, section, key, f"bad value {raw!r}: {exc}") from None
    return values


CLOCK_RATE_ERROR = 1e-3
"""How far one host's monotonic clock, and its kernel's timers, may run from real time, as a
rate: 1000 ppm, more than a crystal's drift plus an NTP daemon's frequency trim (the kernel
caps that at 500 ppm). A clock slewed faster (chrony's maxslewrate defaults to 83 333 ppm
while it corrects a large offset) breaks check_timing's arithmetic: see README, "The timing
inequality, term by term"."""

KERNEL_TIMER_S = 0.02
"""How late the kernel may end an nftables element's timeout: it counts in jiffies (10 ms at
HZ=100), once for the lease and once for the armed window (Fence.arm)."""


def clock_allowance(t):
    """The seconds of failover_timeout - fence_timeout - safety_margin that the hosts' clocks
    may eat (check_timing): the lease runs on M's kernel timers, the failover on S's and A's
    clocks, each off by up to CLOCK_RATE_ERROR, and two kernel timeouts may each end late."""
    return 2 * CLOCK_RATE_ERROR * t.failover_timeout + KERNEL_TIMER_S


def check_timing(path, t):
    """Refuse timings under which S could be promoted while M's PostgreSQL port is open, or
    under which a healthy cluster could not work. Term by term (README, "The timing
    inequality"):

    Safety. The kernel enforces M's fence (see Fence): M's port is open only until a lease
    expires, and M extends the lease to at most fence_timeout after a moment `a` (M's clock)
    at which a peer provably heard M say "I am a running primary" (the peer echoed M's stamp
    `a`; the anchor). That peer counted M alive at `a` or later, and a promotion needs both S
    and A to have lost M for failover_timeout: the grant comes at a + failover_timeout or
    later. The kernel takes a lease write only within safety_margin of the moment the agent
    armed it, before computing the lease (Fence.arm), however long the agent stalls: the port
    closes by a + fence_timeout + safety_margin. So fence_timeout + safety_margin <
    failover_timeout keeps it closed before any grant -- on one clock. The lease runs on M's
    kernel timers and the failover on S's and A's clocks, each up to CLOCK_RATE_ERROR off real
    time, and each of the two kernel timeouts may end up to a jiffy late: clock_allowance must
    fit in the difference too.
    The promotion window (decide_grant): A refuses a request on news from it older than
    promote_window = failover_timeout - fence_timeout - safety_margin - clock_allowance. The
    standby decided after that news reached it, on no sign of M for failover_timeout; then
    every anchor M held ended by the time the standby decided, so M's lease had lapsed, and a
    lapsed lease reopens only on A's word, which A's failover clock counts. The allowance is
    subtracted here too: on A's clock the window may be CLOCK_RATE_ERROR long.

    Liveness. check_interval + probe_timeout < fence_timeout (and so probe_timeout <
    fence_timeout): a healthy primary's anchor is renewed every check_interval by a round
    trip of at most probe_timeout, so its lease never lapses between two heartbeats; the room
    left is what pauses and lost heartbeats may use. promote_window > check_interval +
    probe_timeout: a standby's newest news from A is about a heartbeat old (one lost, at most
    probe_timeout more), so its request can be on time. restart_grace > failover_timeout: a
    failover gets the first chance.
    The loop's speed, probe timeouts and blocking calls do not enter safety: a slow or frozen
    agent simply stops extending the lease.
    """
    allowance = clock_allowance(t)
    needed = t.fence_timeout + t.safety_margin + allowance
    if needed >= t.failover_timeout - 1e-9:
        raise ConfigError(path, "timing", "failover_timeout",
                          f"{t.failover_timeout} s is too short: it must exceed fence_timeout + "
                          f"safety_margin + {allowance:.3f} s for the hosts' clocks = "
                          f"{needed:.3f} s, or the standby could be promoted while the isolated "
                          "primary's lease still holds its port open")
    if t.probe_timeout >= t.fence_timeout:
        raise ConfigError(path, "timing", "probe_timeout",
                          "must be shorter than fence_timeout: one slow probe must never fence")
    if t.check_interval + t.probe_timeout >= t.fence_timeout:
        raise ConfigError(path, "timing", "check_interval",
                          "check_interval + probe_timeout must be shorter than fence_timeout: "
                          "a healthy primary's lease would lapse between two heartbeats")
    if promote_window(t) <= t.check_interval + t.probe_timeout:
        raise ConfigError(path, "timing", "failover_timeout",
                          f"failover_timeout - fence_timeout - safety_margin - {allowance:.3f} "
                          f"s for the hosts' clocks = {promote_window(t):.3f} s must exceed "
                          "check_interval + probe_timeout: a promotion request is judged on "
                          "news from the arbiter at most that old (decide_grant)")
    if t.restart_grace <= t.failover_timeout:
        raise ConfigError(path, "timing", "restart_grace",
                          "must exceed failover_timeout: a failover gets the first chance")


def promote_window(t):
    """How old the arbiter's news may be on which a standby asked to be promoted: within it,
    the primary's lease had lapsed before the standby decided (decide_grant), on the hosts'
    clocks too (clock_allowance)."""
    return t.failover_timeout - t.fence_timeout - t.safety_margin - clock_allowance(t)


def load_config(path, node_name):
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as exc:
        raise ConfigError(path, "-", None, f"cannot read: {exc.strerror}") from None
    except configparser.Error as exc:
        raise ConfigError(path, "-", None, f"not an ini file: {exc}") from None
    for section in parser.sections():
        if section not in SCHEMA and not section.startswith("node "):
            raise ConfigError(path, section, None, "unknown section")
    nodes = {}
    for section in parser.sections():
        if section.startswith("node "):
            name = section[5:].strip()
            values = _read_section(path, parser, section, "node")
            ports = [p for p in (values["agent_port"], values["http_port"]) if p is not None]
            if values["role"] != "arbiter":
                ports.append(values["pg_port"])
            if values["http_port"] is not None and ports.count(values["http_port"]) > 1:
                raise ConfigError(path, section, "http_port",
                                  f"{values['http_port']} is already the node's agent_port or "
                                  "pg_port: one port, one server")
            nodes[name] = Node(name=name, **values)
    for role in ROLES:
        holders = [n.name for n in nodes.values() if n.role == role]
        if len(holders) != 1:
            raise ConfigError(path, "node *", "role",
                              f"exactly one node must have role {role}, found {holders or 'none'}")
    if node_name not in nodes:
        raise ConfigError(path, f"node {node_name}", None,
                          f"no such node (the cluster has {', '.join(sorted(nodes))})")
    cluster = _read_section(path, parser, "cluster", "cluster")
    timing = Timing(**_read_section(path, parser, "timing", "timing"))
    check_timing(path, timing)
    pg = _read_section(path, parser, "postgres", "postgres")
    agent = _read_section(path, parser, "agent", "agent")

    def node_path(p):  # one config serves every host: {node} becomes the host's node name
        return p.replace("{node}", node_name)

    return Config(
        path=path, me=nodes[node_name], nodes=nodes, timing=timing,
        replication_user=cluster["replication_user"],
        replication_password_file=node_path(cluster["replication_password_file"]),
        app_user=cluster["app_user"],
        app_password_file=node_path(cluster["app_password_file"]),
        app_database=cluster["app_database"],
        agent_key_file=node_path(cluster["agent_key_file"]),
        client_addresses=cluster["client_addresses"], strict_sync=cluster["strict_sync"],
        pg_bin=pg["bin_dir"], pg_os_user=pg["os_user"],
        data_dir=node_path(pg["data_dir"]), run_dir=node_path(pg["run_dir"]),
        state_dir=node_path(agent["state_dir"]), log_dir=node_path(agent["log_dir"]),
        on_role_change=agent["on_role_change"],
    )


# --------------------------------------------------------------------------------------------
# decisions: pure functions, no I/O. Each returns a Decision whose reason is one sentence that
# the agent logs, so that a failover explains itself.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class View:
    """The arbiter's word on the cluster: who is primary in which term, and which standby is in
    sync (eligible for promotion). Only the arbiter makes a new view, and each one it makes has
    a higher seq; a new term is made only by a promotion it grants."""

    term: int  # 0: not yet heard from the arbiter (a local guess from the config)
    primary: str
    eligible: str | None  # the standby that may be promoted, None when none may
    seq: int = 0
    # An operator paused the cluster (`agent.py … pause`): no promotion, no grant, no handover,
    # no change of sync on an agent's own, and the primary's port stays open without a lease
    # timeout (nothing can be promoted meanwhile). See "Pause" in the README.
    paused: bool = False
    # The operator resumed, and the arbiter has not yet heard the primary say, under this view,
    # that its port is back under a timed lease: until then the arbiter grants nothing (the
    # primary may still hold its port open without a timeout). Cleared by the arbiter alone.
    resuming: bool = False

    def as_dict(self):
        return {"term": self.term, "primary": self.primary, "eligible": self.eligible,
                "seq": self.seq, "paused": self.paused, "resuming": self.resuming}

    @staticmethod
    def from_dict(d):
        term, primary, eligible, seq = d["term"], d["primary"], d.get("eligible"), d.get("seq", 0)
        paused, resuming = d.get("paused", False), d.get("resuming", False)
        if not (isinstance(term, int) and term >= 0 and isinstance(primary, str)
                and isinstance(seq, int) and (eligible is None or isinstance(eligible, str))
                and isinstance(paused, bool) and isinstance(resuming, bool)):
            raise ValueError(f"not a view: {d!r}")
        return View(term, primary, eligible, seq, paused, resuming)

    def changed(self, **fields):
        """The next view: what changes, and a higher seq."""
        return replace(self, seq=self.seq + 1, **fields)


@dataclass(frozen=True)
class Decision:
    action: str
    reason: str
    sync_names: str | None = None  # set_sync, drop_standby: what the primary waits for next


@dataclass(frozen=True)
class DbObservation:
    """What a database node's agent knows at one moment (monotonic seconds)."""

    now: float
    started_at: float          # a peer never heard from counts as lost since then
    pg: str                    # local PostgreSQL: primary | standby | down
    pg_down_since: float | None
    has_standby_signal: bool   # the data dir would start as a standby
    fenced: bool               # this agent holds no lease: the port is closed to clients
    view: View
    contact_at: dict           # peer -> latest moment the peer provably heard this agent
    primary_alive_at: float | None  # last sign that the view's primary serves (probe or report)
    sync_names: str | None     # local synchronous_standby_names, when running
    standby_seen_at: float | None = None  # primary: last reply from the other node's walreceiver
    standby_streaming: bool = False  # primary: the other node streams (caught up, not catchup)
    standby_synced: bool = False  # primary: it is the sync standby and has every acked commit
    switchover_requested: bool = False
    strict_sync: bool = False
    confirm_after: float | None = None  # fenced primary: only the arbiter's word on a view
    #                                     it sent after this moment may reopen the port
    port_open: bool | None = None  # the kernel lets clients in (None: taken as not fenced)
    handover_unsettled: bool = False  # a handover request of ours got no answer
    rewound: bool = False  # down without standby.signal, pg_control "in archive recovery":
    #                        a pg_rewind ran to its end (it writes pg_control last)
    rewind_unfinished: bool = False  # a pg_rewind of this data directory began and no
    #                                  standby.signal followed (LocalPostgres.rewind's mark)
    rewind_before_reboot: bool = False  # ... and the host has booted since it began


def _age(obs_now, started_at, at):
    return obs_now - (at if at is not None else started_at)


def desired_sync_names(view, standby_streaming=False, other=None, strict=False):
    """Whom the primary waits for: the eligible standby; with strict_sync, always the other
    node; or a standby that streams again, so that it can catch up under synchronous
    replication before the arbiter makes it eligible; else no one -- and a primary may only
    move to no one through drop_standby, on the arbiter's durable word that no one is
    eligible."""
    if view.eligible:
        return view.eligible
    if strict and other:
        return other
    return other if standby_streaming and other else ""


def lease_extension(held_until, anchor, now, timing, opening=False):
    """Until when a primary's lease may run (monotonic), or None: closed. It runs to
    fence_timeout after the latest moment a peer provably heard this node as a running primary
    (anchor), and never revives a lease that lapsed: after a lapse only the arbiter's fresh
    word opens a new one (decide_db's unfence, opening=True)."""
    if opening:
        until = None if anchor is None else anchor + timing.fence_timeout
        return until if until is not None and until > now else None
    if held_until is None or now >= held_until:
        return None
    if anchor is None:
        return held_until
    return max(held_until, anchor + timing.fence_timeout)


def standby_heard(previous_reply_time, previous_seen_at, reply_time, now):
    """(reply_time, seen_at): the primary hears from its standby when the walreceiver's
    reply_time changes. reply_time is stamped with the standby's clock, so only its change
    counts, timed on the primary's own clock: an offset between the hosts changes nothing."""
    if reply_time is None:
        return previous_reply_time, previous_seen_at
    if reply_time != previous_reply_time:
        return reply_time, now
    return previous_reply_time, previous_seen_at


PAUSED = "PAUSED"  # starts every decision's reason while the cluster is paused: loud in logs


def calls_peer(me, peer, view, arbiter, unheard_for, timing):
    """Whether `me` starts a heartbeat with `peer` this round. In a healthy cluster, one
    exchange per pair of nodes, its request and reply carrying both statuses and echoes: a
    database node calls the arbiter, and the node its view names primary calls the other
    database node, so that the primary's own requests anchor its lease and reach the standby
    as signs of it at once. The side that only answers learns that the caller heard it from
    the echo in the caller's next request, a round later. It calls too once the peer's
    requests have stopped for longer than check_interval + probe_timeout (unheard_for: since
    the last one, in seconds; the longest gap between a healthy caller's requests): a caller
    that cannot open connections (a one-way fault), or two views that each name the other
    node primary, then cost no exchange (README, "What the agents watch")."""
    if me != arbiter and (peer == arbiter or view.primary == me):
        return True
    return unheard_for > timing.check_interval + timing.probe_timeout


# A watching routine's rounds while all it watches looks as it should (round_period): two and
# a half rounds, 0.25 s at the defaults, where one a round was two fifths of an idle node's CPU
STEADY_ROUNDS = 2.5
# Longer still, what no decision waits for while all is well: a database node's loop (a
# primary's lease is renewed by the exchanges, and the drop of a silent standby comes at the
# first tick that sees it, up to 0.3 s later than on 2.5 rounds; a view learned, a switchover
# asked for wake it at once: Agent.wake) and the probes of the primary's PostgreSQL (the
# primary's heartbeats are its signs meanwhile)
QUIET_ROUNDS = 4
# The standby's replies come every second (wal_receiver_status_interval, set by the agent): a
# primary's round after next must come before a reply is failover_timeout old, with 0.1 s of
# room for a late one (db_steady), or its loop would never find all well
STANDBY_REPLY_ROOM = 1.1


def round_period(steady, timing, rounds=STEADY_ROUNDS):
    """The wait from one round to the next of a routine that watches for change -- a database
    node's decision loop, the probe of the primary's PostgreSQL: check_interval, or
    `rounds` (STEADY_ROUNDS; QUIET_ROUNDS for the loops, the probes) times that while all
    it watched looked as it should at its last round. A
    sign of trouble that a round sees -- a peer or the primary unheard for longer than a
    healthy exchange's longest gap (c + p), the standby's replies late -- brings the rounds
    back to check_interval in time for the decision it may lead to: the longer wait is
    allowed only when c + p + rounds x c stays within failover_timeout (0.75 s against 1.5 s
    for QUIET_ROUNDS at the defaults; QUIET_ROUNDS that do not fit fall back to
    STEADY_ROUNDS), so that the tick that first sees the primary lost for failover_timeout
    comes as soon as before. What waits longer is what no heartbeat shows and what comes
    between rounds: a PostgreSQL that stopped answering is acted on up to (rounds - 1) x c
    later (a view learned, a switchover asked for wake the loop: Agent.wake). Safety never
    rests on a round: the lease is the kernel's, a promotion the arbiter's (README,
    "Rounds")."""
    c = timing.check_interval
    for longer in (rounds, STEADY_ROUNDS):
        if steady and c + timing.probe_timeout + longer * c <= timing.failover_timeout:
            return c * longer
    return c


def primary_rounds(timing):
    """A primary's loop's longer rounds: QUIET_ROUNDS while they leave the standby's replies
    their room (failover_timeout - QUIET_ROUNDS c >= STANDBY_REPLY_ROOM: 1.1 s at the
    defaults), else STEADY_ROUNDS; db_steady holds the standby's replies to the same."""
    room = timing.failover_timeout - QUIET_ROUNDS * timing.check_interval
    return QUIET_ROUNDS if room >= STANDBY_REPLY_ROOM - 1e-9 else STEADY_ROUNDS


SLOT_SLACK = 0.1  # of a call period: how early a call may begin and still keep its slot


def steady_call_period(timing):
    """The period of a database node's calls while its loop is steady (DbAgent.call_period):
    the loop's longer round, as long as its longest interval (1 + SLOT_SLACK periods,
    Agent._until_slot) stays under c + p -- past which the called side's fallback would call
    too (calls_peer) -- and, with a reply as slow as probe_timeout, under fence_timeout -- so
    that a healthy primary's lease never lapses between two anchors (check_timing holds that
    for check_interval); else check_interval."""
    c, p = timing.check_interval, timing.probe_timeout
    longest = round_period(True, timing) * (1 + SLOT_SLACK)
    if longest >= c + p or longest + p >= timing.fence_timeout:
        return c
    return round_period(True, timing)


def heard_lately(ages, timing):
    """Whether every age (seconds since a peer was last heard) is within a healthy exchange's
    longest gap."""
    return all(age <= timing.check_interval + timing.probe_timeout for age in ages)


def db_steady(me, other, arbiter, obs, decision, previous_view, timing):
    """Whether a database node's loop may wait its longer rounds (round_period): it decided to
    do nothing, under the view it held at its round before, it is not fenced, and both peers
    heard it lately, as did the primary's signs when that is another node. A primary also
    needs its standby's latest reply young enough that the round after next still comes before
    it is failover_timeout old (when the standby is dropped from sync): replies come every
    second (wal_receiver_status_interval), so at the defaults a reply older than 1.1 s
    (failover_timeout - primary_rounds c) means every round."""
    ages = [obs.now - obs.contact_at.get(peer, -math.inf) for peer in (other, arbiter)]
    if obs.view.primary != me:
        # the primary calls us and echoes our reply's stamp in its next request: that contact
        # is one of its call periods older than the caller's own
        ages[0] -= steady_call_period(timing)
        ages.append(obs.now - (-math.inf if obs.primary_alive_at is None
                               else obs.primary_alive_at))
    elif (_age(obs.now, obs.started_at, obs.standby_seen_at)
          > timing.failover_timeout - primary_rounds(timing) * timing.check_interval):
        return False
    return (decision.action == "none" and obs.view == previous_view and not obs.fenced
            and heard_lately(ages, timing))


def decide_db(me, other, arbiter, obs, timing):
    """The one decision of a database node's agent, rule by rule (see README, "Rules"). While
    the view says paused, every reason starts with PAUSED."""
    decision = _decide_db(me, other, arbiter, obs, timing)
    if obs.view.paused:
        return replace(decision, reason=f"{PAUSED}: {decision.reason}")
    return decision


def _decide_db(me, other, arbiter, obs, timing):
    view = obs.view
    age = lambda at: _age(obs.now, obs.started_at, at)  # noqa: E731
    arbiter_lost = age(obs.contact_at.get(arbiter))
    if view.primary == me:
        return _decide_as_primary(me, other, arbiter, obs, timing, age, arbiter_lost)
    primary = view.primary
    primary_lost = age(obs.primary_alive_at)
    port_open = (not obs.fenced) if obs.port_open is None else obs.port_open
    if obs.pg == "primary" and port_open:
        return Decision("fence", f"{primary} is the primary of term {view.term}: I was "
                                 "replaced, so no client may use me")
    if obs.pg == "primary" or (obs.pg == "down" and not obs.has_standby_signal):
        if view.term == 0:  # a local guess from the config: never rewind on it
            return Decision("none", "not the primary of my unconfirmed view: waiting for the "
                                    "arbiter's view before rejoining")
        if primary_lost >= timing.fence_timeout:
            return Decision("none", f"replaced by {primary} in term {view.term}; waiting to "
                                    f"reach it to rejoin (unseen for {primary_lost:.1f} s)")
        # the agent died between pg_rewind and the start; after a reboot, pg_control (written
        # and fsynced before the rest of the directory) may say "rewound" over lost files
        if obs.pg == "down" and obs.rewound and not obs.rewind_before_reboot:
            return Decision("finish_rejoin", f"replaced by {primary} in term {view.term} and "
                                             "rewound before a restart: starting as its "
                                             "standby")
        if obs.pg == "down" and obs.rewind_unfinished:  # killed, timed out, a host crash
            return Decision("reclone", f"replaced by {primary} in term {view.term}; a pg_rewind "
                                       "of my data stopped half-way, leaving files of two "
                                       "servers: keeping them aside to clone afresh")
        return Decision("rejoin", f"replaced by {primary} in term {view.term}: rewinding to "
                                  "rejoin as its standby")
    if obs.pg == "down":
        return Decision("start_standby", f"PostgreSQL is down: starting it as a standby of "
                                         f"{primary}")
    if obs.fenced:
        return Decision("unfence", "I run as a read-only standby: lifting the fence")
    if view.eligible != me:
        return Decision("none", f"following {primary}; not eligible for promotion in term "
                                f"{view.term} (not known to be in sync)")
    if primary_lost < timing.failover_timeout:
        return Decision("none", f"following {primary}, the primary of term {view.term} "
                                f"(seen {primary_lost:.1f} s ago)")
    if arbiter_lost >= timing.fence_timeout:
        return Decision("none", f"lost {primary} for {primary_lost:.1f} s but {arbiter} is "
                                f"unreachable too ({arbiter_lost:.1f} s): no promotion")
    if view.paused:
        return Decision("none", f"lost {primary} for {primary_lost:.1f} s, but the cluster is "
                                "paused: no promotion")
    return Decision("request_promotion", f"lost {primary} for {primary_lost:.1f} s: asking "
                                         f"{arbiter} to confirm and grant term {view.term + 1}")


def _decide_as_primary(me, other, arbiter, obs, timing, age, arbiter_lost):
    view = obs.view
    if obs.pg == "standby":
        if view.term == 0:  # a local guess from the config (a lost state file): never promote
            return Decision("none", "a standby named primary only by my unconfirmed view: "
                                    "waiting for the arbiter's view")
        return Decision("promote", f"{arbiter} made me the primary of term {view.term}: promoting")
    if obs.pg == "down":
        if view.term == 0:
            return Decision("none", "PostgreSQL is down: waiting for the arbiter's view")
        down_for = age(obs.pg_down_since)
        if down_for < timing.restart_grace:
            return Decision("none", f"PostgreSQL is down ({down_for:.1f} s): {other} gets the "
                                    f"first chance to take over")
        return Decision("resume", f"PostgreSQL is down ({down_for:.1f} s) and no failover "
                                  f"happened: asking {arbiter} to let me restart it as primary")
    other_lost = age(obs.contact_at.get(other))
    if obs.fenced:
        if obs.handover_unsettled:
            return Decision("settle_handover", f"my handover request got no answer: asking "
                                               f"{arbiter} to settle it before I may reopen")
        confirmed = obs.contact_at.get(arbiter)
        fresh = (confirmed is not None and arbiter_lost < timing.fence_timeout
                 and (obs.confirm_after is None or confirmed > obs.confirm_after))
        if fresh and view.term > 0 and not obs.switchover_requested:
            return Decision("unfence", f"{arbiter} confirms I am the primary of term {view.term}")
        return Decision("none", f"fenced: waiting for {arbiter} to confirm that I am still "
                                "the primary")
    if other_lost >= timing.fence_timeout and arbiter_lost >= timing.fence_timeout \
            and view.paused:  # safe: the arbiter grants no promotion while it says paused
        return Decision("none", f"lost {other} ({other_lost:.1f} s) and {arbiter} "
                                f"({arbiter_lost:.1f} s), but the cluster is paused: my port "
                                "stays open")
    if other_lost >= timing.fence_timeout and arbiter_lost >= timing.fence_timeout:
        return Decision("fence", f"lost {other} ({other_lost:.1f} s) and {arbiter} "
                                 f"({arbiter_lost:.1f} s): I may be replaced, fencing myself")
    if obs.switchover_requested:
        if view.paused:
            return Decision("refuse_switchover", "the cluster is paused: no switchover")
        if view.eligible != other:
            return Decision("refuse_switchover", f"{other} is not in sync: no switchover")
        if arbiter_lost >= timing.fence_timeout:
            return Decision("refuse_switchover", f"{arbiter} is unreachable: no switchover")
        return Decision("handover", f"switchover: fencing myself and asking {arbiter} to make "
                                    f"{other} the primary of term {view.term + 1}")
    standby_lost = age(obs.standby_seen_at)
    if view.paused:  # no change of sync on our own: the operator holds the cluster as it is
        return Decision("none", f"I am ({me}) the primary of term {view.term}; "
                                f"synchronous_standby_names stays {obs.sync_names!r}, "
                                f"eligible {view.eligible}")
    if view.eligible == other and standby_lost >= timing.failover_timeout:
        if obs.strict_sync:
            return Decision("none", f"{other} streams no more ({standby_lost:.1f} s); "
                                    "strict_sync: writes wait for it")
        if arbiter_lost < timing.fence_timeout:
            return Decision("drop_standby", f"{other} streams no more ({standby_lost:.1f} s): "
                                            f"asking {arbiter} to mark it not in sync, so "
                                            "writes resume", sync_names="")
    if view.eligible is None and obs.standby_synced and arbiter_lost < timing.fence_timeout:
        return Decision("mark_eligible", f"{other} has caught up under synchronous "
                                         f"replication: asking {arbiter} to make it eligible")
    # a walsender row outlives a silent standby: only a recent reply counts as streaming
    streaming = obs.standby_streaming and standby_lost < timing.failover_timeout
    wanted = desired_sync_names(view, streaming, other, obs.strict_sync)
    if obs.sync_names is not None and obs.sync_names != wanted:
        if wanted == "":  # to stop waiting, the arbiter's durable word first, in its reply
            if arbiter_lost < timing.fence_timeout:
                return Decision("drop_standby", f"{other} streams no more: asking {arbiter} to "
                                                "confirm that no standby is eligible before "
                                                "writes stop waiting for it", sync_names="")
            return Decision("none", f"{other} streams no more and {arbiter} is unreachable: "
                                    f"writes keep waiting for {obs.sync_names!r}")
        return Decision("set_sync", f"synchronous_standby_names is {obs.sync_names!r}, "
                                    f"want {wanted!r} (eligible: {view.eligible})", wanted)
    return Decision("none", f"I am ({me}) the primary of term {view.term}")


def decide_grant(view, candidate, term, primary_alive_at, now, started_at, timing,
                 news_at=None):
    """The arbiter's answer to a standby asking to be promoted: (granted, new view, reason).
    A grant creates a new term; the caller persists it before answering. news_at: the
    arbiter's own stamp (its clock) that the candidate last had from it when it asked. The
    candidate decided that it had lost the primary after that moment; if the request reaches
    the arbiter more than promote_window later (held in the network, replayed, queued), the
    primary might have regained the standby meanwhile, so it is refused: ask again."""
    if view.primary == candidate:
        return True, view, f"{candidate} already is the primary of term {view.term}"
    if term != view.term:
        return False, view, f"{candidate} asks about term {term}, the current term is {view.term}"
    if view.eligible != candidate:
        return False, view, f"{candidate} is not eligible in term {view.term} (not in sync)"
    refusal = paused_refusal(view)
    if refusal:
        return False, view, refusal
    if news_at is None or now - news_at > promote_window(timing):
        return False, view, (f"{candidate} asked on news from me "
                             f"{'unknown' if news_at is None else f'{now - news_at:.1f} s'} old: "
                             "ask again")
    lost = _age(now, started_at, primary_alive_at)
    if lost < timing.failover_timeout:
        return False, view, f"I still see {view.primary} (last {lost:.1f} s ago)"
    new = view.changed(term=view.term + 1, primary=candidate, eligible=None)
    return True, new, (f"I lost {view.primary} too ({lost:.1f} s): {candidate} is the primary "
                       f"of term {new.term}")


def paused_refusal(view):
    """Why no new term may be made now, or None. While paused the primary may hold its port
    open without a lease timeout; after a resume it may still, until it has told the arbiter
    under the resumed view that its lease is timed again (decide_resume_ack)."""
    if view.paused:
        return "the cluster is paused: no promotion, no handover"
    if view.resuming:
        return (f"the cluster was resumed, but {view.primary} has not yet said that its port is "
                "under a timed lease again: no promotion, no handover until it has")
    return None


def decide_pause(view, term, seq, paused):
    """An operator pauses or resumes the cluster: (granted, new view, reason). The request
    names the view (term, seq) it is based on; one based on an older view is refused (ask
    again). A resume leaves the view `resuming` until the primary has left its untimed lease
    (decide_resume_ack)."""
    if (term, seq) != (view.term, view.seq):
        return False, view, (f"the request is based on view {term}.{seq}, the current one is "
                             f"{view.term}.{view.seq}: ask again")
    if paused:
        if view.paused:
            return True, view, "the cluster already is paused"
        return True, view.changed(paused=True, resuming=False), (
            "paused: no promotion, no handover, no sync change, no fencing on a timeout")
    if not view.paused:
        return True, view, "the cluster is not paused"
    return True, view.changed(paused=False, resuming=True), (
        f"resumed: promotions again once {view.primary} has its port under a timed lease")


def decide_resume_ack(view, sender, reported, lease_mode):
    """The arbiter, on a status from a database node: the new view when it ends `resuming`,
    else None. The primary must report the very view the arbiter holds (so it knows of the
    resume and will not go back to an untimed lease) and a timed lease ("primary") or none
    ("closed"): "paused" is still untimed, "busy" no answer."""
    if not view.resuming or view.paused or sender != view.primary:
        return None
    if not isinstance(reported, dict) or (reported.get("term"), reported.get("seq")) != \
            (view.term, view.seq) or lease_mode not in ("primary", "closed"):
        return None
    return view.changed(resuming=False)


def decide_resume(view, requester, term):
    """May a primary whose PostgreSQL was down start it again as primary? Only if it still is
    the primary of the current term (no failover happened meanwhile)."""
    if view.primary == requester and term == view.term:
        return True, f"{requester} still is the primary of term {view.term}"
    return False, (f"{view.primary} is the primary of term {view.term}; {requester} asked "
                   f"about term {term}")


def decide_eligibility(view, requester, term, seq, standby, eligible):
    """The primary of the current term says whether its standby is in sync: a standby it
    stopped waiting for is no longer eligible (recorded before the primary stops waiting), one
    that caught up under synchronous replication is eligible again. The request names the
    view (term, seq) it was based on: one based on an older view -- a late or replayed
    request, or a primary that missed a reply -- is refused, and the reply's view corrects
    the primary."""
    if requester != view.primary or term != view.term:
        return False, view, (f"only the primary of term {view.term} ({view.primary}) decides "
                             "who is in sync")
    if seq != view.seq:
        return False, view, (f"the request is based on view seq {seq}, the current one is "
                             f"{view.seq}: decide again on the current view")
    if standby == view.primary:
        return False, view, f"{standby} is the primary, not a standby"
    wanted = standby if eligible else None
    if view.eligible == wanted:
        return True, view, f"eligible standby already {wanted}"
    return True, view.changed(eligible=wanted), f"eligible standby now {wanted}"


def decide_handover(view, requester, term, seq, target, target_seen_at, now, timing):
    """A planned switchover: the primary (already fenced) hands its term over to the eligible
    standby, which the arbiter must see, so that someone picks the new term up. The request
    names the view (term, seq) it is based on: a late one, after the primary gave up waiting
    and settled (decide_settle), is refused."""
    if requester != view.primary or term != view.term:
        return False, view, f"{requester} is not the primary of term {term}"
    if seq != view.seq:
        return False, view, f"the request is based on view seq {seq}, the current one is {view.seq}"
    if view.eligible != target:
        return False, view, f"{target} is not eligible (not in sync)"
    refusal = paused_refusal(view)
    if refusal:
        return False, view, refusal
    if target_seen_at is None or now - target_seen_at >= timing.fence_timeout:
        return False, view, f"I do not see {target}"
    new = view.changed(term=view.term + 1, primary=target, eligible=None)
    return True, new, f"switchover: {target} is the primary of term {new.term}"


def decide_settle(view, requester, term):
    """A primary that got no answer to its handover request asks to settle it: while it still
    is the primary of the term, a new seq makes any late copy of that request stale; if the
    handover happened, the reply's view says so."""
    if requester != view.primary or term != view.term:
        return False, view, f"{view.primary} is the primary of term {view.term}"
    return True, view.changed(), f"{requester} stays the primary of term {view.term}"


def bootstrap_action(me, data_exists, view):
    """What to do with the data directory before anything else: adopt, initdb, basebackup,
    wait or refuse. Existing data is never re-initialised or re-cloned."""
    if data_exists:
        return Decision("adopt", "a data directory exists: adopting it")
    if view.term == 0:
        return Decision("wait", "no data directory yet: waiting for the arbiter's view")
    if view.primary == me:
        if view.term == 1:
            return Decision("initdb", "I am the first primary: initdb")
        return Decision("refuse", f"I am the primary of term {view.term} but my data directory "
                                  "is missing: refusing to initdb over the cluster's history")
    return Decision("basebackup", f"cloning the standby from {view.primary}")


def newer_view(current, offered):
    """Views only move forward: take an offered view when it is newer."""
    return offered if (offered.term, offered.seq) > (current.term, current.seq) else current


# --------------------------------------------------------------------------------------------
# operating: pure functions over statuses and records -- the cluster table, the health
# endpoints, the history, the role change events. The adapters below only carry their input
# and output.
# --------------------------------------------------------------------------------------------


def role_change_event(old, new):
    """The event the role change hook is run for, when a node's (role, fenced, term) moves
    from old to new (None: nothing to tell). old None: the agent's first tick ("start")."""
    if new == old:
        return None
    if old is None:
        return "start"
    (old_role, old_fenced, old_term), (role, fenced, term) = old, new
    if role != old_role:
        if role == "primary":
            return "promoted" if old_role == "standby" else "primary"
        if role == "replaced":
            return "replaced"
        if role == "standby":
            return "rejoined" if old_role == "replaced" else "standby"
        return role
    if fenced != old_fenced:
        return "fenced" if fenced else "unfenced"
    if term != old_term and role == "arbiter":
        return "new_term"
    return None


def _lease_text(lease, fenced):
    mode = (lease or {}).get("mode")
    if fenced:
        return "YES (port closed)"
    if mode == "primary":
        return f"no (lease {lease.get('left_s', 0):.1f} s)"
    if mode == "paused":
        return "no (paused: no timeout)"
    if mode == "standby":
        return "no (standby)"
    return f"no ({mode})" if mode else "no"


def _short(text, width=72):
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 1] + "…"


CLUSTER_COLUMNS = ("node", "role", "term", "timeline", "wal lsn", "lag", "sync", "eligible",
                   "fenced (lease)", "paused", "last decision")


def cluster_rows(statuses):
    """One row (a tuple of CLUSTER_COLUMNS texts) per node from the statuses the agents gave
    (node name -> status body, or {"error": why} for one that did not answer). The lag of a
    standby is what the primary reports of it (bytes of WAL it has not replayed)."""
    answered = {n: st for n, st in statuses.items() if "error" not in st}
    primary = next((st for st in answered.values()
                    if st.get("role") == "primary" and st.get("pg") == "primary"), None)
    rows = []
    for name, st in statuses.items():
        if "error" in st:
            rows.append((name, "NO ANSWER", "?", "?", "?", "?", "?", "?", "?", "?",
                         _short(st["error"])))
            continue
        view = st.get("view") or {}
        pg = st.get("postgres") or {}
        role = st.get("role", "?")
        if role not in ("arbiter",) and st.get("pg") not in (None, "none", "primary", "standby"):
            role = f"{role} (pg {st.get('pg')})"
        lag = sync = "-"
        if st.get("role") == "primary":
            sync = (f"{pg.get('standby_state') or 'no standby'}"
                    f"{'/' + pg['sync_state'] if pg.get('sync_state') else ''}, waits for "
                    f"{pg.get('sync_names') or 'no one'}")
        elif st.get("role") in ("standby", "replaced"):
            sync = pg.get("receiver") or "not receiving"
            ppg = (primary or {}).get("postgres") or {}
            if primary is None:
                lag = "?"
            elif ppg.get("lag_bytes") is not None:
                lag = f"{ppg['lag_bytes']} B"
                sync += f", {ppg.get('sync_state')}" if ppg.get("sync_state") else ""
        if st.get("role") == "arbiter":
            eligible = str(view.get("eligible"))
            fenced = "-"
        else:
            eligible = ("-" if view.get("primary") == name else
                        "yes" if view.get("eligible") == name else "no")
            fenced = _lease_text(st.get("lease"), st.get("fenced"))
        paused = "PAUSED" if view.get("paused") else "resuming" if view.get("resuming") else "-"
        decision = st.get("decision") or {}
        said = (f"{decision.get('action')} {decision.get('age_s', 0):.1f} s ago: "
                f"{decision.get('reason')}") if decision else "-"
        rows.append((name, role, str(view.get("term", "?")), str(pg.get("timeline") or "-"),
                     pg.get("lsn") or "-", lag, sync, eligible, fenced, paused, _short(said)))
    return rows


def cluster_table(statuses):
    """The cluster as one table (status_command), with a line for the arbiter's view."""
    rows = cluster_rows(statuses)
    lines = [CLUSTER_COLUMNS, *rows]
    widths = [max(len(row[i]) for row in lines) for i in range(len(CLUSTER_COLUMNS))]
    text = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in lines)
    views = [st["view"] for st in statuses.values() if isinstance(st.get("view"), dict)]
    arbiter = next((st for st in statuses.values() if st.get("role") == "arbiter"), None)
    view = (arbiter or {}).get("view") or max(views, key=lambda v: (v.get("term", 0),
                                                                   v.get("seq", 0)), default=None)
    if view:
        source = "the arbiter" if arbiter else "the newest a node reported; no arbiter"
        flag = ("   *** PAUSED: no failover, no fencing on timeouts, no sync changes ***"
                if view.get("paused") else
                "   (resuming: promotions wait for the primary's timed lease)"
                if view.get("resuming") else "")
        head = (f"view ({source}): term {view.get('term')}.{view.get('seq')}, primary "
                f"{view.get('primary')}, eligible {view.get('eligible')}{flag}")
    else:
        head = "view: no node answered"
    return head + "\n" + text


def _http_text(code, text):
    return code, "text/plain; charset=utf-8", (text + "\n").encode()


def endpoint_verdicts(snap):
    """(primary, replica): each (ok, why). Primary: the unfenced primary of the current term
    -- its view names it, its PostgreSQL says primary, its port is under a live lease (or
    paused). Replica: a standby whose walreceiver streams and whose port is open."""
    node, view = snap.get("node"), snap.get("view") or {}
    pg = snap.get("pg_now", snap.get("pg"))
    lease = snap.get("lease") or {}
    role = snap.get("role")
    if role == "arbiter":
        return (False, "the arbiter serves no clients"), (False, "the arbiter serves no clients")
    if view.get("primary") != node:
        primary = (False, f"{view.get('primary')} is the primary of term {view.get('term')}")
    elif pg != "primary":
        primary = (False, f"PostgreSQL is {pg}")
    elif snap.get("fenced") or not (lease.get("mode") == "paused" or (
            lease.get("mode") == "primary" and (lease.get("left_s") or 0) > 0)):
        primary = (False, "fenced: no lease")
    else:
        primary = (True, f"primary of term {view.get('term')}")
    receiver = (snap.get("postgres") or {}).get("receiver")
    if role != "standby" or pg != "standby":
        replica = (False, f"{role} (PostgreSQL {pg}), not a standby")
    elif receiver != "streaming":
        replica = (False, f"walreceiver {receiver or 'not running'}")
    elif snap.get("fenced"):
        replica = (False, "port closed")
    else:
        replica = (True, f"standby streaming from {view.get('primary')}")
    return primary, replica


def _metric(lines, name, kind, help_text, samples):
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        label = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        number = ("+Inf" if value == float("inf") else
                  str(int(value)) if isinstance(value, bool) or float(value).is_integer()
                  else f"{value:.3f}")
        lines.append(f"{name}{{{label}}} {number}" if label else f"{name} {number}")


def metrics_text(snap):
    """The snapshot in Prometheus' text format (version 0.0.4)."""
    view, lease = snap.get("view") or {}, snap.get("lease") or {}
    (primary_ok, _), (replica_ok, _) = endpoint_verdicts(snap)
    events = snap.get("events_total") or {}
    lines = []
    node = {"node": snap.get("node", "?")}
    _metric(lines, "bobry_term", "gauge", "The term of the newest view this node knows.",
            [({}, view.get("term", 0))])
    _metric(lines, "bobry_role", "gauge", "1 for this node's role.",
            [({**node, "role": r}, snap.get("role") == r)
             for r in ("primary", "standby", "replaced", "arbiter")])
    _metric(lines, "bobry_primary_ok", "gauge", "1 when GET /primary answers 200.",
            [({}, primary_ok)])
    _metric(lines, "bobry_replica_ok", "gauge", "1 when GET /replica answers 200.",
            [({}, replica_ok)])
    _metric(lines, "bobry_fenced", "gauge", "1 when this node's PostgreSQL port is closed "
            "to clients (no lease).", [({}, bool(snap.get("fenced")))])
    _metric(lines, "bobry_paused", "gauge", "1 while the view says the cluster is paused.",
            [({}, bool(view.get("paused")))])
    left = (lease.get("left_s") if lease.get("mode") == "primary" else
            float("inf") if lease.get("mode") in ("paused", "standby") else 0)
    if snap.get("role") != "arbiter":
        _metric(lines, "bobry_lease_seconds_left", "gauge", "Seconds left on the port's lease "
                "(+Inf: no timeout, 0: closed).", [({}, left or 0)])
    lag = (snap.get("postgres") or {}).get("lag_bytes")
    if lag is not None:
        _metric(lines, "bobry_standby_lag_bytes", "gauge", "Primary: WAL bytes its standby "
                "has not replayed.", [({}, lag)])
    _metric(lines, "bobry_peer_contact_age_seconds", "gauge", "Seconds since a peer last "
            "provably heard this node.", [({"peer": p}, age) for p, age in
                                          sorted((snap.get("contact_age_s") or {}).items())])
    _metric(lines, "bobry_decisions_total", "counter", "Decisions taken, by action (one a "
            "tick).", [({"action": a}, n) for a, n in sorted((snap.get("decisions_total")
                                                               or {}).items())])
    _metric(lines, "bobry_events_total", "counter", "Events logged, by kind.",
            [({"event": e}, n) for e, n in sorted(events.items())])
    _metric(lines, "bobry_promotions_total", "counter", "Promotions of this node's PostgreSQL.",
            [({}, events.get("promoted", 0))])
    _metric(lines, "bobry_failovers_total", "counter", "Arbiter: terms granted to a standby "
            "that lost the primary.", [({}, events.get("granted", 0))])
    _metric(lines, "bobry_handovers_total", "counter", "Arbiter: terms handed over in a "
            "switchover.", [({}, events.get("handover", 0))])
    return "\n".join(lines) + "\n"


def health_response(path, snap):
    """(HTTP status, content type, body) of a GET on the health port, from a status snapshot
    (Agent.health_snapshot); None: the agent could not make one."""
    path = path.split("?", 1)[0]
    if path not in ("/primary", "/replica", "/health", "/metrics"):
        return _http_text(404, "not found: GET /primary, /replica, /health or /metrics")
    if snap is None:
        return _http_text(503, "the agent has no status yet")
    (primary_ok, primary_why), (replica_ok, replica_why) = endpoint_verdicts(snap)
    if path == "/primary":
        return _http_text(200 if primary_ok else 503, primary_why)
    if path == "/replica":
        return _http_text(200 if replica_ok else 503, replica_why)
    if path == "/health":
        body = {**snap, "primary_ok": primary_ok, "replica_ok": replica_ok}
        return 200, "application/json", (json.dumps(body, sort_keys=True) + "\n").encode()
    return 200, "text/plain; version=0.0.4; charset=utf-8", metrics_text(snap).encode()


HISTORY_WHY = {"promote": "failover", "handover": "handover"}


def history_record(kind, old, new, wall, requester, lost_s, reason):
    """The arbiter's record of a new term (HistoryFile): who, when (wall clock), why."""
    record = {"term": new.term, "primary": new.primary, "t": round(wall, 3),
              "why": HISTORY_WHY.get(kind, kind), "previous": old.primary,
              "requested_by": requester, "reason": _short(reason, 200)}
    if kind == "promote":
        record["lost_s"] = round(lost_s, 2)
    return record


def missing_history(records, view, fresh, wall):
    """Records to append at the arbiter's start so that the history names the current term:
    term 1 of a fresh arbiter is the bootstrap; a term with no record (an arbiter that crashed
    between its state and its history, or began keeping one late) is recorded as unknown."""
    last = max((r.get("term", 0) for r in records), default=0)
    if last >= view.term:
        return []
    if fresh and view.term == 1:
        return [{"term": 1, "primary": view.primary, "t": round(wall, 3), "why": "bootstrap",
                 "reason": f"{view.primary} is the first primary (agent.ini)"}]
    return [{"term": view.term, "primary": view.primary, "t": round(wall, 3), "why": "unknown",
             "reason": f"term {view.term} was found at the arbiter's start without a record; "
                       "the time is that start"}]


def format_history(records):
    """The history as a table: term, primary, when (wall clock, UTC), why."""
    lines = [("term", "primary", "since (UTC)", "why")]
    for r in records:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.get("t", 0)))
        why = r.get("why", "?")
        if why == "failover":
            why = (f"failover: {r.get('previous')} lost for {r.get('lost_s')} s (the arbiter's "
                   f"count), {r.get('requested_by')} promoted")
        elif why == "handover":
            why = f"handover: switchover from {r.get('previous')}"
        elif why == "bootstrap":
            why = f"bootstrap: {r.get('reason')}"
        else:
            why = f"{why}: {r.get('reason')}"
        lines.append((str(r.get("term")), str(r.get("primary")), when, why))
    widths = [max(len(row[i]) for row in lines) for i in range(3)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(row[:3], widths)), row[3]])
                     for row in lines)


# --------------------------------------------------------------------------------------------
# adapters: the wire protocol
#
# A TCP connection carries one request and its reply at a time: heartbeats keep theirs
# (Channels), any other request gets one of its own. Each message (version 3) is one line of at
# most MAX_MESSAGE bytes: a MAC, a space, UTF-8 JSON, a newline:
#
#   <mac> {"v": 3, "from": "pg2", "to": "arb", "ts": 1764120000.5, "nonce": "9f1c…",
#          "type": "status" | "promote" | "resume" | "reply", "body": {…}}
#
# mac = hex keyed BLAKE2b-256(cluster key, the JSON's bytes as sent) (_mac; version 2 had
# HMAC-SHA256: the two do not understand each other). A receiver checks the length,
# then the MAC over the bytes received, and only then parses the JSON: nothing from a sender
# without the key is ever parsed. A reply has type "reply", swaps from/to and carries the
# request's nonce, which the caller checks. A receiver drops anything too long, without a
# valid MAC, malformed, addressed to another node, from an unknown node, with a clock more than
# MAX_SKEW seconds off, or replayed: a request whose (sender, nonce) it accepted within the
# last MAX_SKEW seconds (ReplayCache). The server runs at most MAX_PER_SOURCE handlers per
# source address and MAX_STRANGERS in all for addresses that are not the cluster's nodes, closes
# any other connection at once and one without a whole line after READ_TIMEOUT. Drops are
# logged at most once per DropLog.INTERVAL per kind, with a count (DropLog).
#
#   status      any -> any      body: the sender's status; reply: the receiver's status
#                               (a heartbeat's has pg, fenced, the sender's view, a database
#                               node's lease, its stamp -- its monotonic clock -- and the echo
#                               of the stamp and pg of the addressee's latest status: see
#                               Observations; the reply to an unstamped request, an operator's,
#                               is the whole status: node, role, probe, decision, postgres too)
#   promote     standby -> arb  {"term": t}: make me the primary of term t + 1
#   resume      primary -> arb  {"term": t}: may I restart my PostgreSQL as primary?
#   eligibility primary -> arb  {"term": t, "seq": s, "standby": name, "eligible": bool}
#   handover    primary -> arb  {"term": t, "seq": s, "to": name}: planned switchover (fenced)
#   settle      primary -> arb  {"term": t}: my handover got no answer; make it stale
#   pause       any -> arb      {"term": t, "seq": s, "paused": bool}: the operator pauses or
#                               resumes the cluster (agent.py … pause | resume)
#               replies to these six: {"granted": bool, "reason": str, "view": {…}}
#   switchover  cli -> primary  {}: hand over to the standby; reply {"done": bool, "reason"}
#   history     any -> arb      {"after": term}: the terms after that one, from the arbiter's
#                               history file; reply {"records": [...], "more": bool}
# --------------------------------------------------------------------------------------------

PROTOCOL_VERSION = 3
MAX_MESSAGE = 65536
MAX_SKEW = 30.0
REQUEST_TYPES = ("status", "promote", "resume", "eligibility", "handover", "settle",
                 "switchover", "pause", "history")


def _no_constant(name):
    raise ValueError(f"{name} is not a number this protocol carries")


# Made once: json.dumps and json.loads with options of their own build a new encoder or
# decoder (in Python) at every call, twice per heartbeat side, ten times a second
_WIRE_ENCODER = json.JSONEncoder(separators=(",", ":"))
_WIRE_DECODER = json.JSONDecoder(parse_constant=_no_constant)


class ProtocolError(Exception):
    """What is wrong with a message; kind names the sort of drop, for the log."""

    def __init__(self, message, kind="refused"):
        super().__init__(message)
        self.kind = kind


def _mac(key, payload):
    """Keyed BLAKE2b (RFC 7693), 32 bytes, hex. It replaced HMAC-SHA256 (version 2) for its
    cost: one C call where Python's HMAC runs a class of its own over two SHA-256 objects,
    and an idle agent computes two MACs per heartbeat side, ten times a second. BLAKE2b takes
    a key of at most 64 bytes: a longer one is hashed to 64 first (as HMAC hashes a key longer
    than its block)."""
    if len(key) > 64:
        key = hashlib.blake2b(key).digest()
    return hashlib.blake2b(payload, key=key, digest_size=32).hexdigest()


def seal(key, sender, to, kind, body, nonce=None, now=None):
    """One message as the line to send: MAC, space, JSON, newline."""
    message = {"v": PROTOCOL_VERSION, "from": sender, "to": to,
               "ts": time.time() if now is None else now,
               "nonce": nonce or os.urandom(8).hex(), "type": kind, "body": body}
    payload = _WIRE_ENCODER.encode(message).encode()  # ASCII: no newline inside
    return _mac(key, payload).encode() + b" " + payload + b"\n"


class ReplayCache:
    """The (sender, nonce) of each request accepted while its timestamp could still pass the
    MAX_SKEW check, so that a captured request cannot be played again. Bounded: past LIMIT
    entries the oldest goes, and its sender's messages no newer than it are refused from then
    on, so that an eviction never reopens a replay."""

    LIMIT = 4096

    def __init__(self, limit=LIMIT):
        self.limit = limit
        self._lock = threading.Lock()
        self._seen = {}   # (sender, nonce) -> ts, in the order accepted
        self._floor = {}  # sender -> ts of its newest entry evicted before it expired

    def admit(self, sender, nonce, ts, now):
        with self._lock:
            while self._seen:
                (old_sender, old_nonce), old_ts = next(iter(self._seen.items()))
                expired = now - old_ts > MAX_SKEW  # would fail the timestamp check now
                if not expired and len(self._seen) < self.limit:
                    break
                if not expired:
                    self._floor[old_sender] = max(old_ts, self._floor.get(old_sender, old_ts))
                del self._seen[(old_sender, old_nonce)]
            floor = self._floor.get(sender)
            if (sender, nonce) in self._seen or (floor is not None and ts <= floor):
                raise ProtocolError(f"replay: {sender} already sent nonce {nonce}", "replay")
            self._seen[(sender, nonce)] = ts


def unseal(key, line, me, known_nodes, now=None, replays=None):
    """The checked message, or ProtocolError saying what is wrong with it. With a ReplayCache,
    a request already accepted (same sender and nonce) is refused as a replay."""
    if len(line) > MAX_MESSAGE:
        raise ProtocolError("message too long", "too long")
    line = line[:-1] if line.endswith(b"\n") else line
    mac, space, payload = line.partition(b" ")
    if not space or len(mac) != 64:
        raise ProtocolError(f"no MAC (not a version {PROTOCOL_VERSION} message)", "no mac")
    if not hmac.compare_digest(mac, _mac(key, payload).encode()):
        raise ProtocolError("bad mac (wrong key, altered, or an agent of another protocol "
                            "version: upgrade all three nodes)", "bad mac")
    try:  # authenticated bytes, but a key holder's bug must not crash the server either
        message = _WIRE_DECODER.decode(  # as json.loads takes bytes
            payload.decode(json.detect_encoding(payload), "surrogatepass"))
    except (ValueError, RecursionError):
        raise ProtocolError("not JSON", "malformed") from None
    if not isinstance(message, dict):
        raise ProtocolError("not a message", "malformed")
    if message.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported version {message.get('v')!r}", "malformed")
    if message.get("to") != me:
        raise ProtocolError(f"addressed to {message.get('to')!r}, not to me", "misaddressed")
    if message.get("from") not in known_nodes:
        raise ProtocolError(f"from unknown node {message.get('from')!r}", "misaddressed")
    if message.get("type") not in REQUEST_TYPES + ("reply",):
        raise ProtocolError(f"unknown type {message.get('type')!r}", "malformed")
    ts = message.get("ts")
    current = time.time() if now is None else now
    if not isinstance(ts, (int, float)) or not abs(current - ts) <= MAX_SKEW:  # NaN too
        raise ProtocolError("timestamp missing or too far off", "stale")
    nonce = message.get("nonce")
    if not isinstance(message.get("body"), dict) or not isinstance(nonce, str) \
            or not 0 < len(nonce) <= 64:
        raise ProtocolError("no body or nonce", "malformed")
    if replays is not None:
        replays.admit(message["from"], nonce, ts, current)
    return message


def _add_to_line(data, chunk):
    """Add what was received (chunk) to the line being read (data, a bytearray), up to its
    newline: the whole line, newline included, once it has come, else None; what follows the
    newline is ignored. Raises ProtocolError past MAX_MESSAGE bytes."""
    end = chunk.find(b"\n")
    data += chunk if end < 0 else chunk[:end + 1]
    if len(data) > MAX_MESSAGE or (end < 0 and len(data) == MAX_MESSAGE):
        raise ProtocolError("message too long", "too long")
    return bytes(data) if end >= 0 else None


def _read_line(sock, deadline):
    """One line, newline included, of at most MAX_MESSAGE bytes (never more is read); what
    follows it is ignored."""
    data = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("timed out")
        sock.settimeout(remaining)
        chunk = sock.recv(min(65536, MAX_MESSAGE + 1 - len(data)))
        if not chunk:
            raise ConnectionError("connection closed")
        line = _add_to_line(data, chunk)
        if line is not None:
            return line


def _dial(cfg, peer, timeout):
    """A connection to a peer's agent from this node's address, which the peer's server counts
    as a cluster node's. TCP_NODELAY: on a kept connection, Nagle's algorithm would hold a
    message longer than a segment until the previous one's delayed ACK (40 ms or more)."""
    sock = socket.create_connection((peer.address, peer.agent_port), timeout=timeout,
                                    source_address=(cfg.me.address, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _reply_body(cfg, key, peer, nonce, line):
    """The body of the reply `line` to our request `nonce` to peer, checked."""
    reply = unseal(key, line, cfg.me.name, cfg.nodes)
    if reply["type"] != "reply" or reply["nonce"] != nonce or reply["from"] != peer.name:
        raise ProtocolError("reply does not match the request")
    return reply["body"]


def _exchange(sock, cfg, key, peer, kind, body, deadline):
    """One request on sock and its checked reply body, by deadline."""
    nonce = os.urandom(8).hex()
    request = seal(key, cfg.me.name, peer.name, kind, body, nonce=nonce)
    sock.settimeout(max(0.001, deadline - time.monotonic()))
    sock.sendall(request)
    return _reply_body(cfg, key, peer, nonce, _read_line(sock, deadline))


def call(cfg, key, peer, kind, body, timeout):
    """One request to a peer's agent on a new connection, and its checked reply body. Raises
    OSError or ProtocolError; never waits longer than timeout in all."""
    deadline = time.monotonic() + timeout
    with _dial(cfg, peer, timeout) as sock:
        return _exchange(sock, cfg, key, peer, kind, body, deadline)


class PendingCall:
    """A heartbeat in flight on a non-blocking connection (Channels.start), moved on by
    Channels.wait whenever its socket is ready: connect (unless a kept connection is at hand),
    send the request, read the reply's line, all by its deadline. `done` once it has its reply
    (`body`) or its error (`error`: OSError or ProtocolError). A kept connection found broken
    (the peer restarted: closed or reset before the reply) is replaced once by a new one within
    the same deadline; a call past its deadline is never asked again."""

    def __init__(self, channels, cfg, key, peer, kind, body, timeout):
        self.channels, self.cfg, self.key, self.peer = channels, cfg, key, peer
        self.kind, self.request_body = kind, body
        self.deadline = time.monotonic() + timeout
        self._seal()
        self.done, self.body, self.error = False, None, None
        self.sock = channels.take(peer)
        self.kept = self.sock is not None
        if self.kept:
            self._ready_to_send()
            self.advance()  # a kept connection takes the request at once: no wait to send
        else:
            self._connect()

    def _seal(self):
        """The request, with a nonce of its own: one asked again is a new request, never a
        replay of one the peer admitted before it lost the connection."""
        self.nonce = os.urandom(8).hex()
        self.request = seal(self.key, self.cfg.me.name, self.peer.name, self.kind,
                            self.request_body, nonce=self.nonce)

    def _connect(self):
        self.sock = None
        try:
            sock = self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # see _dial
            sock.bind((self.cfg.me.address, 0))
            failed = sock.connect_ex((self.peer.address, self.peer.agent_port))
            if failed not in (0, errno.EINPROGRESS):
                raise OSError(failed, os.strerror(failed))
        except OSError as exc:
            self.fail(exc)
            return
        self.state = "connect"

    def _ready_to_send(self):
        self.state, self.sent, self.data = "send", 0, bytearray()

    def events(self):
        """What the call waits for on its socket (poll's flags)."""
        return select.POLLIN if self.state == "read" else select.POLLOUT

    def advance(self):
        """Take the step that the socket's readiness allows."""
        try:
            if self.state == "connect":
                failed = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if failed:
                    raise OSError(failed, os.strerror(failed))
                self._ready_to_send()
            if self.state == "send":
                self.sent += self.sock.send(self.request[self.sent:])
                if self.sent == len(self.request):
                    self.state = "read"
                return
            chunk = self.sock.recv(min(65536, MAX_MESSAGE + 1 - len(self.data)))
            if not chunk:
                raise ConnectionError("connection closed")
            line = _add_to_line(self.data, chunk)
            if line is not None:
                self._finish(body=_reply_body(self.cfg, self.key, self.peer, self.nonce, line))
        except (BlockingIOError, InterruptedError):
            return  # not ready after all: wait again
        except (OSError, ProtocolError) as exc:
            if not self.kept:
                self.fail(exc)
                return
            self.sock.close()  # broken (the peer restarted): a new connection, in what is left
            self.kept = False
            self._seal()
            self._connect()

    def expire(self, now):
        """Fail the call if its deadline has come."""
        if not self.done and now >= self.deadline:
            self.fail(socket.timeout("timed out"))

    def fail(self, error):
        self._finish(error=error)

    def _finish(self, body=None, error=None):
        self.done, self.body, self.error = True, body, error
        if error is None:
            self.channels.keep(self.peer, self.sock)
        elif self.sock is not None:
            self.sock.close()
        self.sock = None

    def result(self):
        if self.error is not None:
            raise self.error
        return self.body


class Channels:
    """A connection kept to each peer's agent for its heartbeats ("status", which may be asked
    twice): a new connection each round -- a handshake, a thread the peer's server starts for
    it -- was most of an idle agent's CPU once the probe kept its session. Every heartbeat is
    still a round trip within its timeout, made on a non-blocking socket (PendingCall), so that
    one thread can have several in flight (World.run_heartbeats); any failure closes the
    connection. Other requests, and a heartbeat while another call holds the peer's
    connection, get a connection of their own (call; PendingCall dials a new one)."""

    def __init__(self):
        self._kept = {}  # peer name -> an idle connection
        self._lock = threading.Lock()

    def call(self, cfg, key, peer, kind, body, timeout):
        """One request and its reply body, waited for (a heartbeat: PendingCall)."""
        if kind != "status":
            return call(cfg, key, peer, kind, body, timeout)
        pending = self.start(cfg, key, peer, kind, body, timeout)
        while not pending.done:
            self.wait([pending], pending.deadline)
        return pending.result()

    def start(self, cfg, key, peer, kind, body, timeout):
        """A heartbeat, started: its PendingCall."""
        return PendingCall(self, cfg, key, peer, kind, body, timeout)

    def wait(self, calls, until):
        """Move the calls in flight on until one of them has had its socket ready, or until
        `until` or the earliest of their deadlines has come (a call past it without its reply
        is done, timed out). A reply found waiting is taken even past its deadline: it came
        while this thread was busy with another round, which a thread of its own would not
        have been, and what it proves is as old as the request's stamp, never younger. At
        once when one of the calls is done already (it failed as it started)."""
        live = [c for c in calls if not c.done]
        if len(live) < len(calls) or not live:
            return
        deadline = min(until, *(c.deadline for c in live))
        try:  # poll itself, not a selectors class: a quarter of the Python per wait
            by_fd = {c.sock.fileno(): c for c in live}
            poller = select.poll()
            for fd, c in by_fd.items():
                poller.register(fd, c.events())
            ready = poller.poll(math.ceil(max(0.0, deadline - time.monotonic()) * 1000))
        except (OSError, ValueError) as exc:  # e.g. no memory for the poll: these calls fail
            for c in live:
                c.fail(exc if isinstance(exc, OSError) else OSError(str(exc)))
            return
        for fd, _ in ready:  # an error or a hang-up too: advance() meets it
            by_fd[fd].advance()
        now = time.monotonic()
        for c in live:
            c.expire(now)

    def take(self, peer):
        """The connection kept to peer, if one is idle (it is the caller's until keep())."""
        with self._lock:
            return self._kept.pop(peer.name, None)

    def keep(self, peer, sock):
        """Keep sock for peer's next heartbeat, unless another call kept one meanwhile."""
        with self._lock:
            if peer.name not in self._kept:
                self._kept[peer.name], sock = sock, None
        if sock is not None:
            sock.close()


class DropLog:
    """Logs dropped input at most once per INTERVAL seconds for each kind ("bad mac",
    "replay", "too long", "too many connections", "idle", ...), with how many of that kind
    were dropped since its last line: a flood costs a few lines, not one per connection. The
    agent logs its own repeated failures (probes, lease extensions) the same way."""

    INTERVAL = 10.0

    def __init__(self, log, interval=INTERVAL, what="dropped", clock=time.monotonic):
        self.log, self.interval, self.what, self.clock = log, interval, what, clock
        self._lock = threading.Lock()
        self._kinds = {}  # kind -> [count since its last line, time of that line, latest]
        self.held = None  # called after a drop that leaves a count held back (QuietServer)

    def __call__(self, kind, source, detail):
        with self._lock:
            entry = self._kinds.setdefault(kind, [0, None, None])
            entry[0] += 1
            entry[2] = f"from {source}: {detail}"
        self.flush(kind)
        held = self.held  # read once: server_close may clear it meanwhile
        if held is not None:
            with self._lock:
                waiting = self._kinds[kind][0] > 0
            if waiting:  # a count held back (every drop of it: two threads may race)
                held()

    def flush(self, only=None, force=False):
        """Log each kind (or only that one) with drops not yet logged and no line for an
        interval (or at once: force). A server calls it whenever it wakes (a connection, a
        line due: due_in) and when it shuts down, so that a count is never held long nor
        lost."""
        now, lines = self.clock(), []
        with self._lock:
            for kind, entry in self._kinds.items():
                if (only in (None, kind) and entry[0] and (force or entry[1] is None
                                                           or now - entry[1] >= self.interval)):
                    lines.append((kind, entry[0], entry[2]))
                    entry[0], entry[1] = 0, now
        for kind, count, latest in lines:
            self.log.warning("%s (%s) %d since the last such line, the latest %s",
                             self.what, kind, count, latest)

    def due_in(self):
        """Seconds until a kind with drops not yet logged may have its line (flush); None when
        none waits."""
        now = self.clock()
        with self._lock:
            dues = [0.0 if entry[1] is None else entry[1] + self.interval - now
                    for entry in self._kinds.values() if entry[0]]
        return max(0.0, min(dues)) if dues else None


class QuietServer(socketserver.ThreadingTCPServer):
    """A ThreadingTCPServer whose serve_forever sleeps until a connection comes, a count of
    drops is due (DropLog.due_in) or shutdown() is called: socketserver's own looks every
    poll_interval (0.5 s), four wake-ups a second for nothing on a node's two servers
    (README, "The footprint"). shutdown() wakes it through a pipe."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, handler, drops):
        self.drops = drops
        drops.held = self._wake  # a count held back: due_in has changed
        self._stopping, self._stopped = False, threading.Event()
        self._pipe_lock = threading.Lock()  # no write to a descriptor closed (and reused)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)  # a full pipe wakes it all the same
        try:
            super().__init__(address, handler)
        except BaseException:  # no socket, or no bind: nothing will close the pipe
            self._close_pipe()
            raise

    def serve_forever(self, poll_interval=None):
        try:
            with selectors.PollSelector() as selector:  # no 1023 ceiling on descriptors
                selector.register(self, selectors.EVENT_READ)
                selector.register(self._wake_r, selectors.EVENT_READ)
                while not self._stopping:
                    ready = selector.select(self.drops.due_in())
                    if self._stopping:
                        break
                    for key, _ in ready:
                        if key.fileobj is self:
                            self._handle_request_noblock()
                        else:
                            with contextlib.suppress(BlockingIOError):
                                os.read(self._wake_r, 4096)
                    self.drops.flush()
        finally:
            self._stopped.set()

    def shutdown(self):
        """Stop serve_forever and wait for it (running in another thread), then log every
        count of drops still held."""
        self._stopping = True
        self._wake()
        self._stopped.wait()
        self.drops.flush(force=True)

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        self.drops("error", client_address[0], f"{type(exc).__name__}: {exc}")

    def _wake(self):
        with self._pipe_lock, contextlib.suppress(BlockingIOError):
            if self._wake_w is not None:
                os.write(self._wake_w, b"\0")

    def server_close(self):
        super().server_close()
        self._close_pipe()

    def _close_pipe(self):
        self.drops.held = None
        with self._pipe_lock:
            if self._wake_w is not None:
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._wake_r = self._wake_w = None


def raise_fd_limit():
    """Open files up to the hard limit: the server caps its connections, not the kernel."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass  # e.g. an unlimited hard limit, which the kernel does not take as a soft one


def lean_memory(first=True):
    """Give glibc's malloc back what is free and keep it from spreading: compiling this file
    (LAUNCHER) frees its syntax tree, whose pages stay resident until malloc_trim, and a running
    agent's heap keeps 1-1.5 MiB of freed pages a minute later (measured in the lab; the loop
    trims every TRIM_INTERVAL); each thread that allocates would get an arena of its own, for
    an agent that allocates little and mostly under the GIL anyway (M_ARENA_MAX 1, set once,
    before the first thread starts)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: its defaults then
        libc = ctypes.CDLL("libc.so.6")
        if first:
            libc.mallopt(-8, 1)  # M_ARENA_MAX, from malloc.h
        libc.malloc_trim(0)


class AgentServer(QuietServer):
    """Answers peers. handle(sender, kind, body) -> reply body; bad input is dropped and logged
    (DropLog). One thread per connection within caps: MAX_PER_SOURCE per source address, and
    MAX_STRANGERS in all for addresses that are not the cluster's nodes (strangers cannot crowd
    the nodes out); a connection over a cap is closed at once."""

    request_queue_size = 4096  # a burst waits in the kernel (up to somaxconn), not in SYN retries
    MAX_PER_SOURCE = 8
    MAX_STRANGERS = 64

    def __init__(self, cfg, key, handle, log):
        self.cfg, self.key, self.handle_request, self.log = cfg, key, handle, log
        self.replays = ReplayCache()
        self.members = {n.address for n in cfg.nodes.values()}
        self._slots_lock = threading.Lock()
        self._busy = {}      # source address -> its handlers running
        self._strangers = 0  # handlers running for addresses that are no node's
        super().__init__((cfg.me.address, cfg.me.agent_port), _RequestHandler, DropLog(log))

    def verify_request(self, request, client_address):
        """Take a handler slot for this connection, or refuse it (socketserver closes it)."""
        source = client_address[0]
        member = source in self.members
        with self._slots_lock:
            mine, strangers = self._busy.get(source, 0), self._strangers
            if mine < self.MAX_PER_SOURCE and (member or strangers < self.MAX_STRANGERS):
                self._busy[source] = mine + 1
                self._strangers += not member
                return True
        self.drops("too many connections", source,
                   f"{mine} handlers busy for it, {strangers} for addresses of no node")
        return False

    def _release(self, source):
        with self._slots_lock:
            self._busy[source] -= 1
            if not self._busy[source]:
                del self._busy[source]
            self._strangers -= source not in self.members

    def process_request(self, request, client_address):
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(client_address[0])  # no thread started: the slot is free again
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(client_address[0])


class _RequestHandler(socketserver.BaseRequestHandler):
    # a connection without a whole line by then is closed ("idle"); after a heartbeat it is
    # kept (Channels) for the next one, which comes a check_interval later unless the peer
    # stopped using it: then its close is no drop
    READ_TIMEOUT = 2.0

    def handle(self):
        server, source, kept = self.server, self.client_address[0], False
        keep_for = max(self.READ_TIMEOUT, 3 * server.cfg.timing.check_interval)
        try:
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # see _dial
            while True:
                line = _read_line(self.request, time.monotonic() + (keep_for if kept else
                                                                    self.READ_TIMEOUT))
                message = unseal(server.key, line, server.cfg.me.name, server.cfg.nodes,
                                 replays=server.replays)
                if message["type"] == "reply":
                    raise ProtocolError("a reply where a request was expected", "malformed")
                body = server.handle_request(message["from"], message["type"], message["body"])
                reply = seal(server.key, server.cfg.me.name, message["from"], "reply", body,
                             nonce=message["nonce"])
                self.request.settimeout(self.READ_TIMEOUT)
                self.request.sendall(reply)
                if message["type"] != "status":
                    return
                kept = True  # an authenticated peer's heartbeat: its next one may follow
        except ProtocolError as exc:
            server.drops(exc.kind, source, exc)
        except TimeoutError:
            if not kept:
                server.drops("idle", source, f"no whole line within {self.READ_TIMEOUT} s")
        except ConnectionError as exc:
            if not kept:
                server.drops("disconnected", source, f"{type(exc).__name__}: {exc}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            server.drops("error", source, f"{type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------------------------
# adapters: PostgreSQL
# --------------------------------------------------------------------------------------------


def _wait_ready(conn, deadline):
    """Until the async connection is ready. poll(), not select(): select() refuses a
    descriptor above 1023, which an agent serving many connections may well get."""
    while True:
        state = conn.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("PostgreSQL did not answer in time")
        poller = select.poll()  # anew each time: libpq may change sockets while connecting
        poller.register(conn.fileno(), select.POLLIN if state == psycopg2.extensions.POLL_READ
                        else select.POLLOUT)
        poller.poll(remaining * 1000)


def _connect(dsn, deadline):
    conn = psycopg2.connect(dsn, async_=True)
    try:
        _wait_ready(conn, deadline)
    except BaseException:
        conn.close()
        raise
    return conn


def _statement(conn, sql, params, deadline):
    cur = conn.cursor()
    cur.execute(sql, params)
    _wait_ready(conn, deadline)
    return cur.fetchall() if cur.description else []


def pg_query(dsn, sql, params=None, timeout=1.0):
    """Rows of one statement on a new connection, within timeout in all (connect included:
    libpq's own connect_timeout has a 2 s floor, too coarse for a failure detector).
    Raises psycopg2.Error or TimeoutError."""
    deadline = time.monotonic() + timeout
    conn = _connect(dsn, deadline)
    try:
        return _statement(conn, sql, params, deadline)
    finally:
        conn.close()


class Session:
    """A connection kept from one statement to the next, for the statements of every round
    (the probe of the primary, the local status): a new connection each round -- its SCRAM
    authentication, a backend forked for it -- was most of an idle agent's CPU. A statement
    that fails on the kept connection (not one that timed out) is tried once more on a new one
    within the same deadline, so the answer is a new connection's whenever the kept one broke
    (PostgreSQL restarted, a fence's reset). Every statement still makes the round trip to the server."""

    def __init__(self):
        self.dsn, self.conn = None, None
        self.lock = threading.Lock()

    def query(self, dsn, sql, params=None, timeout=1.0):
        """Rows of one statement within timeout in all, like pg_query."""
        with self.lock:
            deadline = time.monotonic() + timeout
            if self.conn is not None and self.dsn == dsn and not self.conn.closed:
                try:
                    return _statement(self.conn, sql, params, deadline)
                except TimeoutError:
                    self.close()  # slow: no time is left to ask again
                    raise
                except (psycopg2.Error, OSError):
                    pass  # broken (a restart, a reset): a new connection, in what is left
            self.close()
            self.conn, self.dsn = _connect(dsn, deadline), dsn
            try:
                return _statement(self.conn, sql, params, deadline)
            except BaseException:
                self.close()
                raise

    def close(self):
        if self.conn is not None:
            self.conn.close()
        self.dsn, self.conn = None, None


def local_dsn(cfg):
    return f"host={cfg.run_dir} port={cfg.me.pg_port} user=postgres dbname=postgres"


def remote_dsn(cfg, node):
    return (f"host={node.address} port={node.pg_port} user={cfg.replication_user} "
            f"dbname=postgres passfile={pgpass_path(cfg)} sslmode=disable "
            f"application_name=bobry-probe-{cfg.me.name}")


def pgpass_path(cfg):
    return os.path.join(cfg.run_dir, ".pgpass")


def write_pgpass(cfg, owner=None):
    """The replication role's passfile: replication, pg_rewind and the health probes."""
    password = read_secret(cfg.replication_password_file)
    write_atomically(pgpass_path(cfg), f"*:*:*:{cfg.replication_user}:{password}\n", owner=owner)


def primary_conninfo(cfg, primary):
    # connect_timeout and keepalives: a walreceiver must not sit in TCP SYN back-off after a
    # partition heals, nor keep a dead connection for minutes.
    return (f"host={primary.address} port={primary.pg_port} user={cfg.replication_user} "
            f"passfile={pgpass_path(cfg)} application_name={cfg.me.name} sslmode=disable "
            "connect_timeout=2 keepalives=1 keepalives_idle=2 keepalives_interval=1 "
            "keepalives_count=3 tcp_user_timeout=5000")


def pg_settings(cfg, view, sync_names=None):
    """The settings the agent owns, written to bobry.conf (included by postgresql.conf)."""
    settings = {
        "listen_addresses": f"{cfg.me.address},127.0.0.1",
        "port": str(cfg.me.pg_port),
        "unix_socket_directories": cfg.run_dir,
        "wal_level": "replica",
        "wal_log_hints": "on",  # pg_rewind needs it (checksums are on too)
        "max_wal_senders": "5",
        "max_replication_slots": "5",
        "hot_standby": "on",
        "synchronous_commit": "on",
        "synchronous_standby_names": (desired_sync_names(view) if sync_names is None
                                      else sync_names),
        # a dead peer is noticed in seconds, not the default minute; a fast shutdown of an
        # isolated primary cannot hang on its walsender for long either
        "wal_sender_timeout": "5s",
        "wal_receiver_timeout": "5s",
        "wal_retrieve_retry_interval": "1s",
        # the standby replies every second, so the primary sees within seconds that it is gone
        "wal_receiver_status_interval": "1s",
        # WAL kept for a standby that falls behind and for pg_rewind of a replaced primary,
        # which reads its own WAL back from the last checkpoint before the divergence: one
        # checkpoint distance (max_wal_size 1GB / (1 + checkpoint_completion_target 0.9),
        # about 540 MB) plus what it wrote alone before its fence ended the sessions. With
        # 256MB a bulk load cut half-way left pg_rewind without it (a clone instead).
        "wal_keep_size": "1GB",
        "password_encryption": "scram-sha-256",
    }
    if view.primary != cfg.me.name:
        settings["primary_conninfo"] = primary_conninfo(cfg, cfg.nodes[view.primary])
    return settings


def render_settings(settings):
    quoted = {k: v.replace("'", "''") for k, v in settings.items()}
    return "".join(f"{k} = '{v}'\n" for k, v in sorted(quoted.items()))


def render_hba(cfg):
    """Replication and probes only from the database nodes and the arbiter, clients only from
    the declared client addresses, local access by peer authentication."""
    lines = ["# written by the bobry agent at every start; edits are overwritten",
             "local all postgres peer map=bobry"]
    peers = [n for n in cfg.nodes.values()]
    for node in cfg.db_nodes:
        lines.append(f"host replication {cfg.replication_user} {node.address}/32 scram-sha-256")
    for node in peers:
        lines.append(f"host postgres {cfg.replication_user} {node.address}/32 scram-sha-256")
    for cidr in cfg.client_addresses:
        lines.append(f"host {cfg.app_database} {cfg.app_user} {cidr} scram-sha-256")
    return "\n".join(lines) + "\n"


def render_ident(cfg):
    # the agent runs as root and speaks to its PostgreSQL as the postgres role
    return f"bobry root postgres\nbobry {cfg.pg_os_user} postgres\n"


def sql_literal(text):
    return "'" + text.replace("'", "''") + "'"


# --------------------------------------------------------------------------------------------
# adapters: files, processes, iptables, the local PostgreSQL
# --------------------------------------------------------------------------------------------


def write_atomically(path, text, owner=None, mode=0o600):
    """Write, fsync, rename, fsync the directory: after a crash the file is old or new."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    if owner is not None:
        os.chown(tmp, owner.pw_uid, owner.pw_gid)
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_durably(path):
    """Unlink, fsync the directory: after a crash the file is there or gone for good."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
        dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def read_secret(path):
    try:
        with open(path, encoding="utf-8") as f:
            secret = f.read().strip()
    except OSError as exc:
        raise ConfigError(path, "secret", None, f"cannot read: {exc.strerror}") from None
    if not secret:
        raise ConfigError(path, "secret", None, "empty")
    return secret


class StateFile:
    """The view this node last learned, persisted so a restart cannot forget a grant."""

    def __init__(self, path, default):
        self.path, self.default = path, default

    def load(self):
        try:
            with open(self.path, encoding="utf-8") as f:
                return View.from_dict(json.load(f))
        except FileNotFoundError:
            return self.default
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(self.path, "state", None, f"unreadable state: {exc}") from None

    def save(self, view):
        write_atomically(self.path, json.dumps(view.as_dict()) + "\n", mode=0o644)

    def exists(self):
        return os.path.exists(self.path)


class EventLog:
    """events.jsonl: one JSON object per event, with wall-clock time, for the lab's reports."""

    def __init__(self, path, node):
        self.path, self.node = path, node

    def __call__(self, event, **detail):
        line = json.dumps({"t": time.time(), "node": self.node, "event": event, **detail})
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


class CountedEvents:
    """The event log (a World port), counting each kind of event for /metrics."""

    def __init__(self, log):
        self.log = log
        self.counts = {}

    def __call__(self, event, **detail):
        self.counts[event] = self.counts.get(event, 0) + 1
        self.log(event, **detail)

    def __getattr__(self, name):  # e.g. path: the port's own attributes
        return getattr(self.log, name)


class HistoryFile:
    """The arbiter's history: one JSON line per term, appended and fsynced before the reply
    that announces the term (history_record). Never rewritten; a line that does not parse (a
    torn last line after a crash) is skipped."""

    def __init__(self, path):
        self.path = path

    def append(self, record):
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        created = not os.path.exists(self.path)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(record, sort_keys=True) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:  # the new file's name is durable too
            dir_fd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def read(self):
        try:
            with open(self.path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return []
        records = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("term"), int):
                records.append(record)
        return records


class Hooks:
    """The operator's role change hook ([agent] on_role_change): argv + [event, role, term],
    the same in BOBRY_EVENT, BOBRY_ROLE, BOBRY_TERM (and BOBRY_NODE), no shell. Run in the
    background (World.spawn), one at a time in the order of the changes, so that a hook never
    delays a decision; killed (its process group) after TIMEOUT; a failure is logged,
    rate-limited (DropLog), and changes nothing else."""

    # A hook notifies (mail, chat, a DNS or virtual IP update): 30 s lets a slow endpoint
    # answer, and bounds how long later changes wait behind a hook that hangs.
    TIMEOUT = 30.0
    # Changes waiting for the hook: more than a flapping node makes in TIMEOUT; past that the
    # newest are dropped, and the drop is logged.
    QUEUE = 32

    def __init__(self, argv, node, spawn, warn, log):
        self.argv, self.node, self.spawn, self.warn, self.log = argv, node, spawn, warn, log
        self._lock = threading.Lock()
        self._queue = []
        self._running = False

    def fire(self, event, role, term):
        if not self.argv:
            return
        with self._lock:
            if len(self._queue) >= self.QUEUE:
                self.warn("role change hook", event, f"{self.QUEUE} changes already wait for "
                          "the hook: this one is not told")
                return
            self._queue.append((event, role, term))
            if self._running:
                return
            self._running = True
        self.spawn("hook", self._drain)

    def _drain(self):
        while True:
            with self._lock:
                if not self._queue:
                    self._running = False
                    return
                event, role, term = self._queue.pop(0)
            self.run(event, role, term)

    def run(self, event, role, term):
        """Run the hook once and wait for it (in the background thread)."""
        argv = [*self.argv, event, role, str(term)]
        env = {**os.environ, "BOBRY_EVENT": event, "BOBRY_ROLE": role,
               "BOBRY_TERM": str(term), "BOBRY_NODE": self.node}
        try:
            proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    start_new_session=True, cwd="/")
        except OSError as exc:
            self.warn("role change hook", event, f"cannot run {argv[0]}: {exc}")
            return
        try:
            _, err = proc.communicate(timeout=self.TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            self.warn("role change hook", event, f"killed after {self.TIMEOUT:.0f} s")
            return
        if proc.returncode != 0:
            tail = " ".join(err.decode(errors="replace").split())[-300:]
            self.warn("role change hook", event, f"exit status {proc.returncode}: {tail}")
        else:
            self.log.info("role change hook: %s %s %s: done", event, role, term)


class HealthServer(QuietServer):
    """The health endpoints (health_response) on the node's http_port: GET /primary,
    /replica, /health, /metrics. A thread per connection, at most MAX_HANDLERS at once (a
    connection over the cap is closed at once); one request per connection (HTTP/1.0); a
    client that has not sent its whole request within TIMEOUT is dropped. Requests are not
    logged (a checker every 200 ms would fill the log); drops are, rate-limited. A few lines of
    HTTP of its own: the standard library's http.server brought 1.8 MiB of modules (email,
    mimetypes, http.client) into every agent for four GET endpoints."""

    request_queue_size = 128  # a burst waits in the kernel's queue, not in SYN retries (1 s)
    MAX_HANDLERS = 16  # a few checkers (HAProxy, Prometheus, people) at once, with room
    TIMEOUT = 2.0      # a checker sends its request at once; HAProxy's own check timeout
    #                    is shorter than this, so a slow client only ever costs its thread
    MAX_REQUEST = 8192  # request line and headers: a checker's are a few hundred bytes

    def __init__(self, address, snapshot, log):
        self.snapshot, self.log = snapshot, log
        self._slots = threading.BoundedSemaphore(self.MAX_HANDLERS)
        super().__init__(address, _HealthHandler, DropLog(log))

    def verify_request(self, request, client_address):
        if self._slots.acquire(blocking=False):
            return True
        self.drops("too many connections", client_address[0],
                   f"{self.MAX_HANDLERS} health requests already being answered")
        return False

    def process_request(self, request, client_address):
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def read_http_request(sock, deadline, limit):
    """The request line of an HTTP request whose headers end by deadline within limit bytes
    (the headers are read and ignored), or None: cut short, too long or too slow."""
    data = bytearray()
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or len(data) >= limit:
            return None
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(limit - len(data))
        except TimeoutError:
            return None
        if not chunk:
            return None
        data += chunk
    return bytes(data).split(b"\n", 1)[0].rstrip(b"\r").decode("latin-1")


def http_reply(request_line, snapshot):
    """The bytes that answer one request line: GET or HEAD of a health endpoint, 400 for what
    is no request line, 501 for other methods. snapshot() gives health_response's snap."""
    parts = request_line.split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        code, ctype, payload = _http_text(400, "bad request")
    elif parts[0] not in ("GET", "HEAD"):
        code, ctype, payload = _http_text(501, "only GET and HEAD")
    else:
        code, ctype, payload = health_response(parts[1], snapshot())
    head = (f"HTTP/1.0 {code} {http.HTTPStatus(code).phrase}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(payload)}\r\nCache-Control: no-store\r\n\r\n")
    return head.encode() + (payload if parts[:1] != ["HEAD"] else b"")


class _HealthHandler(socketserver.BaseRequestHandler):
    def handle(self):
        server = self.server
        line = read_http_request(self.request, time.monotonic() + server.TIMEOUT,
                                 server.MAX_REQUEST)
        if line is None:
            return  # a checker that went away, or a client too slow or too long: no answer

        def snapshot():
            try:
                return server.snapshot()
            except Exception as exc:  # noqa: BLE001 -- a status that fails is a 503, not a crash
                server.drops("status", self.client_address[0], f"{type(exc).__name__}: {exc}")
                return None
        self.request.settimeout(server.TIMEOUT)
        self.request.sendall(http_reply(line, snapshot))


class Nftables:
    """nftables commands run by libnftables in the agent's own process, as `nft -f` would run
    them (the same parser, one kernel transaction per call): the fence's table and its rules,
    made once at start. One call at a time."""

    LIBRARY = "libnftables.so.1"  # Debian's libnftables1, which the nftables package brings

    def __init__(self):
        try:
            lib = ctypes.CDLL(self.LIBRARY)
        except OSError as exc:
            raise RuntimeError(f"cannot load {self.LIBRARY} (install nftables): {exc}") from exc
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
        for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, name).restype = ctypes.c_char_p
            getattr(lib, name).argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self.lib, self.ctx = lib, lib.nft_ctx_new(0)  # NFT_CTX_DEFAULT
        if not self.ctx or lib.nft_ctx_buffer_output(self.ctx) or lib.nft_ctx_buffer_error(
                self.ctx):
            raise RuntimeError("libnftables: no context")
        self.lock = threading.Lock()

    def run(self, commands):
        """subprocess.CompletedProcess-like: returncode (0 when the whole batch committed),
        stdout and stderr as nft would print them."""
        with self.lock:
            code = self.lib.nft_run_cmd_from_buffer(self.ctx, commands.encode())
            out = self.lib.nft_ctx_get_output_buffer(self.ctx) or b""
            err = self.lib.nft_ctx_get_error_buffer(self.ctx) or b""
        return subprocess.CompletedProcess(["nft"], 0 if code == 0 else 1,
                                           out.decode(errors="replace"),
                                           err.decode(errors="replace"))


class SetElements:
    """The elements of the sets of one nftables table (family inet), written and read with the
    nf_tables netlink messages that nft itself sends. libnftables parses each command and
    fetches the table's ruleset from the kernel first: 0.4 ms of CPU for a lease's arm and
    write and 0.15 ms for a listing, against 0.05 and 0.02 here, some thirty times a second
    on a primary (README, "The footprint"). A batch is one kernel transaction: all of its
    steps or none. One call at a time; a reply that does not come within TIMEOUT is an
    OSError."""

    TIMEOUT = 1.0
    SUBSYS = 10  # NFNL_SUBSYS_NFTABLES
    BATCH_BEGIN, BATCH_END = 0x10, 0x11  # NFNL_MSG_BATCH_*
    NEW, GET, DELETE = 12, 13, 14  # NFT_MSG_NEWSETELEM, _GETSETELEM, _DELSETELEM
    REQUEST, ACK, CREATE, DUMP, DUMP_INTR = 0x1, 0x4, 0x400, 0x300, 0x10  # NLM_F_*
    ERROR, DONE = 2, 3  # NLMSG_ERROR, NLMSG_DONE
    INET = 1  # NFPROTO_INET
    # attributes: NFTA_SET_ELEM_LIST_{TABLE,SET,ELEMENTS}, NFTA_LIST_ELEM,
    # NFTA_SET_ELEM_{KEY,TIMEOUT,EXPIRATION}, NFTA_DATA_VALUE; NLA_F_NESTED
    TABLE, SET, ELEMENTS, ELEMENT = 1, 2, 3, 1
    KEY, TIMEOUT_MS, EXPIRES_MS, VALUE = 1, 4, 5, 1
    NESTED = 0x8000

    def __init__(self, table):
        self.table = table.encode() + b"\0"
        self.sock = None
        self.seq = 0
        self.lock = threading.Lock()

    @staticmethod
    def _attr(kind, payload):
        size = 4 + len(payload)
        return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)

    def _nested(self, kind, *parts):
        return self._attr(kind | self.NESTED, b"".join(parts))

    def _message(self, kind, flags, payload=b"", family=INET, resource_id=0):
        self.seq = self.seq % 0xFFFFFFFF + 1  # a u32 on the wire: 1 after 2**32 - 1
        body = struct.pack("=BBH", family, 0, socket.htons(resource_id)) + payload
        return struct.pack("=IHHII", 16 + len(body), kind, flags, self.seq, 0) + body

    def _set_payload(self, name, elements):
        """elements: (key bytes, timeout in ms or None) pairs; None for the whole set."""
        parts = [self._attr(self.TABLE, self.table), self._attr(self.SET, name.encode() + b"\0")]
        if elements is not None:
            parts.append(self._nested(self.ELEMENTS, *(
                self._nested(self.ELEMENT, self._nested(self.KEY, self._attr(self.VALUE, key)),
                             *([] if ms is None else
                               [self._attr(self.TIMEOUT_MS, struct.pack(">Q", ms))]))
                for key, ms in elements)))
        return b"".join(parts)

    def commit(self, steps):
        """Run steps -- ("add" | "delete", set name, elements or None) -- as one transaction.
        "delete" with None empties the set, like `nft flush set`. Returns 0 when it committed,
        else the errno of a step that failed (ENOENT: an element or the table was not there),
        and then nothing was done. Each step is acknowledged; a commit that fails after every
        step passed (ENOMEM, say) is reported against the batch's first message, its
        BATCH_BEGIN, before or instead of those acknowledgements."""
        with self.lock:
            batch = [self._message(self.BATCH_BEGIN, self.REQUEST, family=0,
                                   resource_id=self.SUBSYS)]
            begin, waiting, errors = self.seq, set(), []
            for verb, name, elements in steps:
                add = verb == "add"
                batch.append(self._message(
                    self.SUBSYS << 8 | (self.NEW if add else self.DELETE),
                    self.REQUEST | self.ACK | (self.CREATE if add else 0),
                    self._set_payload(name, elements)))
                waiting.add(self.seq)
            batch.append(self._message(self.BATCH_END, self.REQUEST, family=0,
                                       resource_id=self.SUBSYS))
            for kind, _, seq, payload in self._exchange(b"".join(batch),
                                                     lambda: not waiting or errors):
                if kind == self.ERROR and (seq in waiting or seq == begin):
                    waiting.discard(seq)
                    error = -struct.unpack_from("=i", payload)[0]
                    if error:
                        errors.append(error)
            return errors[0] if errors else 0

    def elements(self, name):
        """The set's elements: (key bytes, ms left or None when it has no timeout). OSError
        when the set is not there."""
        found, errors = [], []
        with self.lock:
            request = self._message(self.SUBSYS << 8 | self.GET, self.REQUEST | self.DUMP,
                                    self._set_payload(name, None))
            seq = self.seq
            for kind, flags, reply_seq, payload in self._exchange(request, lambda: errors):
                if reply_seq != seq:
                    continue  # not ours: nothing else is in flight, but never trust that
                if kind in (self.DONE, self.ERROR):  # both carry an errno, 0 when all went well
                    errors.append(-struct.unpack_from("=i", payload)[0] if payload else 0)
                elif flags & self.DUMP_INTR:  # the set changed during the dump: untrusted
                    errors.append(errno.EINTR)
                else:
                    found.extend(self._decode(payload[4:]))  # past the nfgenmsg header
        if errors[0]:
            raise OSError(errors[0], os.strerror(errors[0]))
        return found

    def _decode(self, attributes):
        for kind, value in self._attributes(attributes):
            if kind != self.ELEMENTS:
                continue
            for _, element in self._attributes(value):
                fields = dict(self._attributes(element))
                key = dict(self._attributes(fields.get(self.KEY, b""))).get(self.VALUE, b"")
                expires = fields.get(self.EXPIRES_MS)
                yield key, None if expires is None else struct.unpack(">Q", expires)[0]

    @staticmethod
    def _attributes(data):
        at = 0
        while at + 4 <= len(data):
            size, kind = struct.unpack_from("=HH", data, at)
            if size < 4:
                return
            yield kind & 0x3FFF, data[at + 4:at + size]
            at += (size + 3) & ~3

    def _exchange(self, request, finished):
        """Send request; yield (type, flags, seq, payload) of each reply until finished(). Any
        failure drops the socket, so that no late reply is read as the next call's."""
        try:
            if self.sock is None:
                self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)  # NETFILTER
                self.sock.settimeout(self.TIMEOUT)
                self.sock.bind((0, 0))
            self.sock.send(request)
            while not finished():
                data = self.sock.recv(1 << 16)
                at = 0
                while at + 16 <= len(data) and not finished():
                    size, kind, flags, seq, _ = struct.unpack_from("=IHHII", data, at)
                    yield kind, flags, seq, data[at + 16:at + size]
                    at += (max(size, 16) + 3) & ~3
        except BaseException:
            if self.sock is not None:
                self.sock.close()
                self.sock = None
            raise


class Fence:
    """The fence, enforced by the kernel: an nftables table of the agent's own in which the
    PostgreSQL port takes packets (other than over loopback) only while the element of the set
    `lease` lives. A primary's element carries a timeout that the agent extends only while a
    peer hears it (lease_extension), so a primary cut off from its peers, or whose agent is
    frozen, stuck or dead, is fenced by the kernel on time; a standby's element has none.
    REJECT with a TCP reset: fenced clients fail at once and move on to the other host, and
    answers to sessions opened earlier never leave (only the resets themselves do). During a switchover the other database
    node alone is let through (set `handover`), so that it can stream the last WAL. The lab's
    fault injection uses iptables chains of its own: healing a partition never lifts a fence
    and the other way round. The table is made with libnftables (Nftables); its elements are
    written and read as netlink messages (SetElements)."""

    TABLE = "bobry_fence"
    VERSION = "bobry fence v5"  # a table of another version is replaced (closed) at start

    def __init__(self, pg_port):
        self.port = pg_port
        self.port_key = struct.pack(">H", pg_port)  # inet_service: network byte order
        self.comment = f"{self.VERSION} port {pg_port}"
        self.token = self._new_token()  # of the latest arm; this one was never armed
        self.nft = None  # libnftables, loaded at install
        self.sets = SetElements(self.TABLE)

    @staticmethod
    def _new_token():
        """A token the kernel has never seen: a write deletes its own arm's element, so a late
        write of an earlier incarnation (an `nft` child that outlived a killed agent, when
        writes were processes) never takes a restarted agent's window (2**-32 odds of
        meeting the next token)."""
        return secrets.randbits(32)

    def _nft(self, *args, script=None, check=True):
        if self.nft is None:
            self.nft = Nftables()
        result = self.nft.run(" ".join(args) if script is None else script)
        if check and result.returncode != 0:
            raise RuntimeError(f"nft failed: {result.stderr.strip()}")
        return result

    def _commit(self, *steps):
        """Run steps as one transaction: raises unless it committed."""
        error = self.sets.commit(steps)
        if error:
            raise RuntimeError(f"nft failed: {os.strerror(error)}")

    def install(self):
        """Make the table, closed, unless this very table is there already: a restarted agent
        keeps the kernel's state (a lease it did not open lapses on its own)."""
        listed = self._nft("list", "table", "inet", self.TABLE, check=False)
        if listed.returncode == 0 and f'comment "{self.comment}"' in listed.stdout:
            return
        port, t = self.port, self.TABLE
        delete = f"delete table inet {t}\n" if listed.returncode == 0 else ""
        self._nft(script=delete + f"""table inet {t} {{
  comment "{self.comment}"
  set lease {{ type inet_service; flags timeout; }}
  set fresh {{ type mark; flags timeout; }}
  set handover {{ type ipv4_addr; flags timeout; }}
  chain input {{ type filter hook input priority -10; policy accept;
    iifname "lo" accept
    tcp dport @lease accept
    tcp dport {port} ip saddr @handover accept
    tcp dport {port} reject with tcp reset
  }}
  chain output {{ type filter hook output priority -10; policy accept;
    oifname "lo" accept
    tcp sport @lease accept
    tcp sport {port} ip daddr @handover accept
    tcp sport {port} tcp flags & rst == rst accept
    tcp sport {port} reject with tcp reset
  }}
}}
""")

    def lease(self):
        """The kernel's word: None (closed), float('inf') (open for good) or seconds left.
        OSError when the kernel does not say (no permission, no answer)."""
        for attempt in range(3):
            try:
                return lease_left(self.sets.elements("lease"), self.port_key)
            except OSError as exc:
                if exc.errno == errno.ENOENT:  # no table (yet): closed
                    return None
                if exc.errno != errno.EINTR or attempt == 2:  # EINTR: a write during the dump
                    raise

    def arm(self, seconds):
        """Start the window in which the kernel takes the next lease write: an element of the
        set `fresh`, a token of this arm's own, that lives `seconds`. A write (open_for, renew,
        open, hold) deletes that very element in the same transaction, so a write that comes
        later than that -- from an agent stalled between computing the lease and handing it
        over, or from an earlier incarnation after a restarted agent armed again -- fails
        whole: a lease never runs more than `seconds` past the term the agent computed after
        arming."""
        self.token = self._new_token()
        self._commit(("delete", "fresh", None),
                     ("add", "fresh", [(self._token_key(), _ms(seconds))]))

    def _token_key(self):
        return struct.pack("=I", self.token)  # a mark: host byte order

    def _armed(self, *steps):
        """Run steps in one transaction that first deletes this arm's token: False, and nothing
        done, when the window has passed or was taken, or an element a step deletes is gone."""
        error = self.sets.commit([("delete", "fresh", [(self._token_key(), None)]), *steps])
        if error not in (0, errno.ENOENT):
            raise RuntimeError(f"nft failed: {os.strerror(error)}")
        return error == 0

    def _write(self, lease_step, seconds):
        return self._armed(lease_step, ("add", "lease", [(self.port_key, _ms(seconds))]))

    def open_for(self, seconds):
        """Open from closed (within the armed window): False when the window had passed."""
        return self._write(("delete", "lease", None), seconds)

    def renew(self, seconds):
        """Extend a live lease (within the armed window). If the lease has expired its delete
        fails, and the whole transaction with it: a late renewal never reopens a port that
        has closed. False when the lease or the window had passed."""
        return self._write(("delete", "lease", [(self.port_key, None)]), seconds)

    def open(self):
        """A standby's element, no timeout (within the armed window, like every write that
        opens: a late write of an earlier incarnation could otherwise give a later primary a
        lease that never ends). False when the window had passed."""
        return self._armed(("delete", "lease", None), ("add", "lease", [(self.port_key, None)]))

    def hold(self):
        """A paused primary: its live lease loses its timeout (within the armed window). Delete
        and add in one transaction, like renew: a lease that has lapsed stays closed. False
        when it had, or the window had passed."""
        element = [(self.port_key, None)]
        return self._armed(("delete", "lease", element), ("add", "lease", element))

    def close(self):
        self._commit(("delete", "lease", None))

    def let_through(self, address, seconds):
        self._commit(("delete", "handover", None),
                     ("add", "handover", [(socket.inet_aton(address), _ms(seconds))]))

    def stop_letting_through(self):
        self.sets.commit([("delete", "handover", None)])  # nothing to stop when it fails


def _ms(seconds):
    """A set element's timeout: whole milliseconds, at least one."""
    return max(1, int(seconds * 1000))


def lease_left(elements, port_key):
    """What the set `lease` says of the port: None (no element), inf (no timeout) or the
    seconds left."""
    for key, ms_left in elements:
        if key == port_key:  # an element that has run out but is still listed: closed
            return float("inf") if ms_left is None else (ms_left / 1000 or None)
    return None


# granted to the replication role, which is no superuser: what pg_rewind reads on its source,
# and the source's checkpoint timeline, which a rejoining node checks before rewinding
REPLICATOR_FUNCTIONS = ("pg_ls_dir(text, boolean, boolean)", "pg_stat_file(text, boolean)",
                        "pg_read_binary_file(text)",
                        "pg_read_binary_file(text, bigint, bigint, boolean)",
                        "pg_control_checkpoint()")

STATUS_SQL = """
select pg_is_in_recovery(), current_setting('synchronous_standby_names'),
       case when pg_is_in_recovery() then null
            else (pg_current_wal_flush_lsn() - '0/0'::pg_lsn)::bigint end,
       r.state, r.sync_state, (r.flush_lsn - '0/0'::pg_lsn)::bigint,
       extract(epoch from r.reply_time)::float8,
       case when pg_is_in_recovery()
            then coalesce((select received_tli from pg_stat_wal_receiver),
                          (select timeline_id from pg_control_checkpoint()))
            else ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int
       end,
       case when pg_is_in_recovery()
            then (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint end,
       (r.replay_lsn - '0/0'::pg_lsn)::bigint,
       (select status from pg_stat_wal_receiver)
from (select 1) as one
left join pg_stat_replication r on r.application_name = %s
order by r.reply_time desc nulls last limit 1"""


@dataclass(frozen=True)
class PgStatus:
    pg: str  # primary | standby | down
    sync_names: str | None = None
    lsn: int | None = None             # primary: WAL flushed (all a standby could have)
    standby_state: str | None = None   # primary: the other node's walsender state
    standby_sync: str | None = None
    standby_flush: int | None = None
    standby_reply_time: float | None = None  # the standby's clock: only its changes count
    # for `status` and the health endpoints only; no decision reads them
    timeline: int | None = None
    replay_lsn: int | None = None      # standby: WAL replayed
    standby_replay: int | None = None  # primary: WAL the other node has replayed
    receiver: str | None = None        # standby: its walreceiver's status (streaming, ...)

    def detail(self):
        """What `status` and the endpoints show of it (positions as PostgreSQL writes them)."""
        lag = (self.lsn - self.standby_replay
               if self.lsn is not None and self.standby_replay is not None else None)
        return {"timeline": self.timeline, "sync_names": self.sync_names,
                "lsn": format_lsn(self.lsn if self.pg == "primary" else self.replay_lsn),
                "standby_state": self.standby_state, "sync_state": self.standby_sync,
                "lag_bytes": None if lag is None else max(0, lag), "receiver": self.receiver}


WAL_FILE = re.compile(r"[0-9A-F]{24}")  # a WAL segment's file name: timeline, log, segment


def wal_gap(needed, local_files, valid_until, source_files, segment_bytes):
    """The first WAL segment, from the file `needed` (where this node's recovery starts) on,
    that neither its own pg_wal nor its primary's holds, as a file name of `needed`'s timeline;
    None when nothing is missing. Segments count by number: what the primary holds runs from
    its oldest file to its newest, and it streams them all; a file of our own counts only up
    to the segment of `valid_until` (pg_control's REDO or minimum recovery point, the later):
    past it, a name may be a recycled segment renamed ahead, full of old bytes. A standby that
    needs a missing segment waits for it for ever: after a long outage the primary has
    recycled WAL that no pg_rewind can bring back."""
    per_log = 0x100000000 // segment_bytes

    def number(name):
        return int(name[8:16], 16) * per_log + int(name[16:24], 16)

    source = [number(f) for f in source_files if WAL_FILE.fullmatch(f)]
    if not source:
        return None  # a primary always holds its current segment: nothing to judge by
    last_valid = valid_until // segment_bytes
    local = {n for n in (number(f) for f in local_files if WAL_FILE.fullmatch(f))
             if n <= last_valid}
    missing = next((n for n in range(number(needed), min(source)) if n not in local), None)
    if missing is None:
        return None
    return f"{needed[:8]}{missing // per_log:08X}{missing % per_log:08X}"


def parse_lsn(text):
    """A WAL position as PostgreSQL writes it (0/3000060) as a number."""
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


# the walreceiver's line (a standby's), not the walsender's, which a primary logs when its
# standby asks for what it no longer has
WAL_REMOVED = re.compile(r"could not receive data from WAL stream: ERROR:  requested WAL "
                         r"segment [0-9A-F]{24} has already been removed")
WAL_REMOVED_LOOKS = 2  # looks in a row that must find it: one stray line is no verdict


def starting_standby_verdict(me, view, looks_before, found):
    """A starting standby's PostgreSQL log, judged at one look (do_start_standby): (looks in a
    row that found WAL_REMOVED, whether to reclone now). The walreceiver's line says that the
    primary answered and no longer has the WAL this node waits for; WAL_REMOVED_LOOKS looks in
    a row make it a verdict, and never on a node the view names primary or eligible (the
    failover's target keeps its data; the primary drops a standby that does not stream from
    eligibility, and then the next looks decide)."""
    looks = looks_before + 1 if found else 0
    return looks, looks >= WAL_REMOVED_LOOKS and me not in (view.primary, view.eligible)


def format_lsn(value):
    """A WAL position as PostgreSQL writes it (0/3000060), or None."""
    return None if value is None else f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


class LocalPostgres:
    """The node's own PostgreSQL: pg_ctl and friends run as the PostgreSQL OS user."""

    CONF = "bobry.conf"

    def __init__(self, cfg):
        self.cfg = cfg
        self.owner = pwd.getpwnam(cfg.pg_os_user)
        self.logfile = os.path.join(cfg.log_dir, "postgresql.log")
        self.session = Session()  # the status of every round

    lock_fd = None  # the agent's lock (AgentLock), handed to children that write the data dir

    def _run(self, argv, timeout, stdin=None, env=None, holds_lock=False):
        switch = os.geteuid() == 0 and self.owner.pw_uid != 0
        keep = (self.lock_fd,) if holds_lock and self.lock_fd is not None else ()
        return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout,
                              user=self.owner.pw_uid if switch else None,
                              group=self.owner.pw_gid if switch else None,
                              extra_groups=[] if switch else None, pass_fds=keep,
                              cwd="/", env={**os.environ, **(env or {})})

    def _bin(self, name):
        return os.path.join(self.cfg.pg_bin, name)

    def data_exists(self):
        return os.path.exists(os.path.join(self.cfg.data_dir, "PG_VERSION"))

    def has_standby_signal(self):
        return os.path.exists(os.path.join(self.cfg.data_dir, "standby.signal"))

    def prepare_dirs(self):
        for d, owner in ((self.cfg.state_dir, None), (self.cfg.log_dir, self.owner),
                         (self.cfg.run_dir, self.owner),
                         (os.path.dirname(self.cfg.data_dir), self.owner)):
            os.makedirs(d, mode=0o700, exist_ok=True)
            if owner is not None:
                os.chown(d, owner.pw_uid, owner.pw_gid)
        write_pgpass(self.cfg, self.owner)

    def write_config(self, view, data_dir=None, sync_names=None):
        data_dir = data_dir or self.cfg.data_dir
        settings = pg_settings(self.cfg, view, sync_names)
        for name, text in ((self.CONF, render_settings(settings)),
                           ("pg_hba.conf", render_hba(self.cfg)),
                           ("pg_ident.conf", render_ident(self.cfg))):
            write_atomically(os.path.join(data_dir, name), text, owner=self.owner)

    def status(self, timeout, standby_name):
        """PgStatus; a PostgreSQL that does not answer in time counts as down."""
        try:
            rows = self.session.query(local_dsn(self.cfg), STATUS_SQL, (standby_name,),
                                      timeout=timeout)
        except (psycopg2.Error, TimeoutError, OSError):
            return PgStatus("down")
        (in_recovery, sync_names, lsn, state, sync_state, flush, reply_time, timeline,
         replay_lsn, standby_replay, receiver) = rows[0]
        return PgStatus("standby" if in_recovery else "primary", sync_names, lsn, state,
                        sync_state, flush, reply_time, timeline, replay_lsn, standby_replay,
                        receiver)

    def start(self):
        result = self._run([self._bin("pg_ctl"), "start", "-w", "-t", "60", "-D",
                            self.cfg.data_dir, "-l", self.logfile], timeout=90)
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {result.stdout}{result.stderr}".strip())

    def stop_immediate(self):
        """Immediate: a fast shutdown of a cut-off primary can hang on its walsender."""
        if not os.path.exists(os.path.join(self.cfg.data_dir, "postmaster.pid")):
            return  # not running
        result = self._run([self._bin("pg_ctl"), "stop", "-m", "immediate", "-t", "30", "-D",
                            self.cfg.data_dir], timeout=60)
        if result.returncode != 0 and "not running" not in result.stderr + result.stdout:
            raise RuntimeError(f"pg_ctl stop failed: {result.stderr.strip()}")

    def _controldata(self, *fields):
        """Fields of pg_control (running or not), by their untranslated labels: one value, or
        a tuple of them for several."""
        result = self._run([self._bin("pg_controldata"), "-D", self.cfg.data_dir], timeout=30,
                           env={"LC_ALL": "C"})
        found = dict(line.partition(":")[::2] for line in result.stdout.splitlines())
        missing = [f for f in fields if f not in found]
        if missing:
            raise RuntimeError(f"pg_controldata: {result.stderr.strip() or 'no ' + missing[0]}")
        values = tuple(found[f].strip() for f in fields)
        return values[0] if len(values) == 1 else values

    def wal_needs(self):
        """(the WAL file recovery starts from, the files in pg_wal, the position up to which
        they are ours, bytes per segment), for wal_gap. The start is a rewind's backup_label's,
        else the latest checkpoint's (or restartpoint's) REDO -- which a standby that began its
        recovery from a backup_label holds from then. pg_wal is listed first: a restartpoint
        in between removes files only before its new REDO."""
        files = os.listdir(os.path.join(self.cfg.data_dir, "pg_wal"))
        redo_file, redo, min_recovery, segment_bytes = self._controldata(
            "Latest checkpoint's REDO WAL file", "Latest checkpoint's REDO location",
            "Minimum recovery ending location", "Bytes per WAL segment")
        try:
            with open(os.path.join(self.cfg.data_dir, "backup_label"), encoding="ascii") as f:
                label = re.search(r"^START WAL LOCATION: .*\(file ([0-9A-F]{24})\)", f.read(),
                                  re.MULTILINE)
            redo_file = label.group(1) if label else redo_file
        except FileNotFoundError:
            pass
        return (redo_file, files, max(parse_lsn(redo), parse_lsn(min_recovery)),
                int(segment_bytes))

    def log_since(self, offset):
        """(what PostgreSQL logged from offset on, at most the last MiB; the new offset). A
        log that shrank (rotated, truncated) is read from its start."""
        try:
            with open(self.logfile, "rb") as f:
                end = f.seek(0, os.SEEK_END)
                start = 0 if offset is None or offset > end else offset
                f.seek(max(start, end - (1 << 20)))
                return f.read().decode(errors="replace"), end
        except FileNotFoundError:
            return "", 0

    def running(self):
        """Whether a postmaster runs on the data directory, answering or not (one that is
        starting up refuses connections until its recovery is consistent): the process that
        postmaster.pid names lives in the data directory (a postmaster's working directory).
        A PID alone is not enough: after a reboot a stale file may name any process, this
        agent's own among them."""
        data_dir = os.path.realpath(self.cfg.data_dir)
        try:
            with open(os.path.join(data_dir, "postmaster.pid"), encoding="ascii") as f:
                pid = int(f.readline())
            return pid > 0 and os.readlink(f"/proc/{pid}/cwd") == data_dir
        except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
            return False  # no file, no such process, or not ours to look at: not a postmaster

    def timeline(self):
        """The timeline of the last checkpoint."""
        return int(self._controldata("Latest checkpoint's TimeLineID"))

    def rewound(self):
        """Did a pg_rewind run to its end? Its last write to the data directory is the source's
        pg_control with the state "in archive recovery"; an old primary's, or one a rewind
        stopped half-way left, says "shut down" or "in production"."""
        return self._controldata("Database cluster state") == "in archive recovery"

    def _rewind_mark(self):
        return os.path.join(self.cfg.state_dir, "rewind-unfinished")

    def rewind_mark(self):
        """The boot id of the host when a pg_rewind of this data directory began, if no
        standby.signal followed (else None). A rewind killed or timed out half-way leaves
        files of two servers that a second pg_rewind cannot tell apart: only a fresh clone is
        safe (PostgreSQL's pg_rewind manual)."""
        try:
            with open(self._rewind_mark(), encoding="ascii") as f:
                return f.read().strip() or "unknown"
        except FileNotFoundError:
            return None

    def _forget_rewind(self):
        remove_durably(self._rewind_mark())

    def rewind(self, view, boot):
        """pg_rewind onto the new primary; the output names the point of divergence. The mark
        (this boot's id) goes down durably first and stays until make_standby, move_aside or a
        new data directory."""
        write_atomically(self._rewind_mark(), boot + "\n")
        source = self.cfg.nodes[view.primary]
        # a source that goes silent mid-copy ends the rewind within tcp_user_timeout, instead
        # of hanging with the node's lock (a child outlives a killed agent)
        dsn = (f"host={source.address} port={source.pg_port} user={self.cfg.replication_user} "
               f"dbname=postgres passfile={pgpass_path(self.cfg)} connect_timeout=3 "
               "tcp_user_timeout=30000 keepalives_idle=10 keepalives_interval=5 "
               "keepalives_count=3")
        result = self._run([self._bin("pg_rewind"), "-D", self.cfg.data_dir,
                            "--source-server", dsn], timeout=600, holds_lock=True)
        if result.returncode != 0:
            raise RuntimeError(f"pg_rewind from {source.name} failed: "
                               f"{(result.stderr or result.stdout).strip()}")
        return (result.stdout + result.stderr).strip()

    def move_aside(self):
        """Keep, never delete, a data directory that cannot rejoin: a later bootstrap clones."""
        aside = f"{self.cfg.data_dir}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(self.cfg.data_dir, aside)
        self._forget_rewind()
        return aside

    def make_standby(self, view):
        # the mark first: make_standby follows a complete rewind (pg_rewind returned after its
        # last fsync), and a rewound directory without either starts through finish_rejoin
        self._forget_rewind()
        write_atomically(os.path.join(self.cfg.data_dir, "standby.signal"), "", owner=self.owner)
        self.write_config(view)

    def reload(self):
        pg_query(local_dsn(self.cfg), "select pg_reload_conf()", timeout=5)

    def promote(self):
        rows = pg_query(local_dsn(self.cfg), "select pg_promote(true, 30)", timeout=35)
        if not rows[0][0]:
            raise RuntimeError("pg_promote() did not finish within 30 s")

    def checkpoint(self, timeout=600):
        pg_query(local_dsn(self.cfg), "checkpoint", timeout=timeout)

    def terminate_clients(self):
        pg_query(local_dsn(self.cfg), "select pg_terminate_backend(pid) from pg_stat_activity "
                 "where backend_type = 'client backend' and client_addr is not null", timeout=5)

    def _fresh_dir(self):
        tmp = self.cfg.data_dir + ".bootstrap"
        if os.path.exists(tmp):  # a bootstrap that died half-way: ours to remove
            shutil.rmtree(tmp)
        return tmp

    def initdb(self, view):
        """initdb, the agent's settings and roles, all in a temporary directory that is renamed
        into place at the end: a data directory that exists is a complete one."""
        tmp = self._fresh_dir()
        result = self._run([self._bin("initdb"), "-D", tmp, "-U", "postgres", "--data-checksums",
                            "--auth-local=peer", "--auth-host=scram-sha-256", "--no-locale",
                            "-E", "UTF8"], timeout=300, holds_lock=True)
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed: {result.stderr.strip()}")
        with open(os.path.join(tmp, "postgresql.conf"), "a", encoding="utf-8") as f:
            f.write(f"\ninclude_if_exists = '{self.CONF}'\n")
        self.write_config(view, tmp)
        repl = read_secret(self.cfg.replication_password_file)
        app = read_secret(self.cfg.app_password_file)
        sql = "\n".join([
            f"CREATE ROLE {self.cfg.replication_user} WITH LOGIN REPLICATION PASSWORD "
            f"{sql_literal(repl)};",
            f"CREATE ROLE {self.cfg.app_user} WITH LOGIN PASSWORD {sql_literal(app)};",
            f"CREATE DATABASE {self.cfg.app_database} OWNER {self.cfg.app_user};",
            *(f"GRANT EXECUTE ON FUNCTION pg_catalog.{fn} TO {self.cfg.replication_user};"
              for fn in REPLICATOR_FUNCTIONS), ""])
        result = self._run([self._bin("postgres"), "--single", "-D", tmp, "-c",
                            "synchronous_commit=local", "postgres"],
                           timeout=120, stdin=sql, holds_lock=True)
        if result.returncode != 0 or "ERROR" in result.stdout + result.stderr:
            raise RuntimeError(f"creating roles failed: {result.stdout}{result.stderr}".strip())
        os.rename(tmp, self.cfg.data_dir)
        self._forget_rewind()  # a mark left by a crash in move_aside is not this directory's

    def basebackup(self, view):
        primary = self.cfg.nodes[view.primary]
        tmp = self._fresh_dir()
        result = self._run([self._bin("pg_basebackup"), "-h", primary.address, "-p",
                            str(primary.pg_port), "-U", self.cfg.replication_user, "-D", tmp,
                            "-X", "stream", "-c", "fast", "-w"], timeout=900, holds_lock=True,
                           env={"PGPASSFILE": pgpass_path(self.cfg), "PGCONNECT_TIMEOUT": "3",
                                "PGAPPNAME": f"{self.cfg.me.name}-basebackup"})
        if result.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"pg_basebackup from {primary.name} failed: "
                               f"{result.stderr.strip()}")
        write_atomically(os.path.join(tmp, "standby.signal"), "", owner=self.owner)
        self.write_config(view, tmp)
        os.rename(tmp, self.cfg.data_dir)
        self._forget_rewind()  # a mark left by a crash in move_aside is not this directory's

    def timeline_and_replication(self, timeout=2.0):
        """For `status`: timeline, and what the primary reports of its standbys."""
        dsn = local_dsn(self.cfg)
        in_recovery = pg_query(dsn, "select pg_is_in_recovery()", timeout=timeout)[0][0]
        if in_recovery:
            row = pg_query(dsn, "select received_tli, status from pg_stat_wal_receiver",
                           timeout=timeout)
            tli = pg_query(dsn, "select timeline_id from pg_control_checkpoint()",
                           timeout=timeout)[0][0]
            return {"pg": "standby", "timeline": row[0][0] if row and row[0][0] else tli,
                    "receiver": row[0][1] if row else None}
        tli = pg_query(dsn, "select ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))"
                       "::bit(32)::int", timeout=timeout)[0][0]
        rows = pg_query(dsn, "select application_name, state, sync_state, "
                        "pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint "
                        "from pg_stat_replication order by application_name", timeout=timeout)
        return {"pg": "primary", "timeline": tli,
                "replication": [{"standby": r[0], "state": r[1], "sync_state": r[2],
                                 "lag_bytes": r[3]} for r in rows]}


class RemotePostgres:
    """Other nodes' PostgreSQL, as a client sees it: the probe and the rejoin check."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.probe = Session()

    def prepare(self):
        """The directories and the passfile the probes authenticate with (the arbiter)."""
        for d in (self.cfg.state_dir, self.cfg.log_dir, self.cfg.run_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        write_pgpass(self.cfg)

    def in_recovery(self, node, timeout):
        """Whether node's PostgreSQL is in recovery. Raises psycopg2.Error, TimeoutError or
        OSError when it cannot be asked within timeout."""
        return self.probe.query(remote_dsn(self.cfg, node), "select pg_is_in_recovery()",
                                timeout=timeout)[0][0]

    def checkpoint_timeline(self, node, timeout):
        """The timeline of node's latest checkpoint (its pg_control)."""
        return pg_query(remote_dsn(self.cfg, node), "select timeline_id from "
                        "pg_control_checkpoint()", timeout=timeout)[0][0]

    def wal_files(self, node, timeout):
        """The WAL segment files node's pg_wal holds now (pg_ls_dir, granted to the
        replication role)."""
        rows = pg_query(remote_dsn(self.cfg, node), "select f from pg_ls_dir('pg_wal', true, "
                        "false) as f where f ~ '^[0-9A-F]{24}$'", timeout=timeout)
        return [row[0] for row in rows]


class World:
    """The ports: everything by which an agent touches the world, each a small interface
    implemented here for real -- the clock, peer messaging, PostgreSQL (the node's own and the
    others'), the fence, the durable state file, the event log, the node lock, background
    work. The agents take a World (this one by default); the deterministic simulator under
    tests/sim gives them one that implements every port in memory, so that the same agent
    code runs there."""

    def monotonic(self):
        return time.monotonic()

    def sleep(self, seconds):
        time.sleep(seconds)

    def boot_id(self):
        """Which boot the monotonic clock counts from: a stamp of another boot is no stamp."""
        try:
            with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
                return f.read().strip()
        except OSError:
            return "unknown"

    def __init__(self):
        self.channels = Channels()

    def call(self, cfg, key, peer, kind, body, timeout):
        """One request to a peer's agent and its reply body (see call() and Channels)."""
        return self.channels.call(cfg, key, peer, kind, body, timeout)

    def serve(self, agent):
        """Answer peers with agent.handle until shutdown() of what this returns."""
        server = AgentServer(agent.cfg, agent.key, agent.handle, agent.log)
        threading.Thread(target=server.serve_forever, name="server", daemon=True).start()
        return server

    def serve_http(self, agent):
        """The health endpoints (HealthServer) on the node's http_port until shutdown() of
        what this returns; None when the node has no http_port."""
        if agent.cfg.me.http_port is None:
            return None
        try:
            server = HealthServer((agent.cfg.me.address, agent.cfg.me.http_port),
                                  agent.health_snapshot, agent.log)
        except OSError as exc:  # the endpoints are for operators: failover goes on without
            agent.log.error("no health endpoints: cannot listen on %s:%s: %s",
                            agent.cfg.me.address, agent.cfg.me.http_port, exc)
            return None
        threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
        return server

    def postgres(self, cfg):
        return LocalPostgres(cfg)

    def remote_postgres(self, cfg):
        return RemotePostgres(cfg)

    def fence(self, pg_port):
        return Fence(pg_port)

    def state_file(self, path, default):
        return StateFile(path, default)

    def history_file(self, path):
        """The arbiter's record of every term (HistoryFile)."""
        return HistoryFile(path)

    def event_log(self, path, node):
        return EventLog(path, node)

    def agent_lock(self, state_dir):
        return AgentLock(state_dir)

    def logger(self):
        return logging.getLogger("bobry")

    def spawn(self, name, step):
        """Run step once in the background (the real agent: a thread)."""
        threading.Thread(target=step, name=name, daemon=True).start()

    def event(self):
        """An event a routine waits on (Agent.wake)."""
        return threading.Event()

    def run_heartbeats(self, stop, cfg, key, rounds):
        """Run the heartbeat rounds (name -> a function that starts one: Agent.heartbeat_round)
        until stop is set, all in this thread: each round's call in flight on a non-blocking
        connection (Channels.start), so that a peer that is slow or silent never holds up the
        others' rounds, and the rounds due together share their wake-ups -- a thread per peer
        woke twice per call, each wake-up a cold run of the interpreter (README, "The
        footprint"). Each peer's next round begins the wait its round returned after it ended,
        as in run_routine."""
        due, flight = dict.fromkeys(rounds, 0.0), {}  # name -> (its round, its PendingCall)
        failures = DropLog(self.logger(), what="failed")

        def resume(name, round_=None, reply=None, error=None):
            """Begin (round_ None) or resume name's round up to its next call, or its end."""
            flight.pop(name, None)
            try:
                round_ = rounds[name]() if round_ is None else round_
                request = next_call(round_, reply, error)
                try:
                    pending = self.channels.start(cfg, key, *request)
                except Exception as exc:  # noqa: BLE001 -- e.g. a body JSON cannot encode
                    request = next_call(round_, None, exc)  # the round's to deal with, once
                    raise RuntimeError(f"it asked for another call: {request!r}") from exc
                flight[name] = round_, pending
                return
            except StopIteration as over:
                wait = over.value
                if not isinstance(wait, (int, float)):
                    failures(f"heartbeat round {name}", name, f"it ended with {wait!r}, not a wait")
                    wait = cfg.timing.check_interval
            except Exception as exc:  # noqa: BLE001 -- a bug in one round: the others go on
                self.logger().debug("the heartbeat round %s failed", name, exc_info=True)
                failures(f"heartbeat round {name}", name, f"{type(exc).__name__}: {exc}")
                wait = cfg.timing.check_interval  # as after a failed call
            due[name] = time.monotonic() + wait

        while not stop.is_set():
            for name in rounds:
                if name not in flight and due[name] <= time.monotonic():
                    resume(name)
            idle = [due[name] for name in rounds if name not in flight]
            until = min(idle, default=math.inf)
            if flight:
                self.channels.wait([pending for _, pending in flight.values()], until)
            else:
                stop.wait(max(0.0, until - time.monotonic()))
            for name, (round_, pending) in list(flight.items()):
                if pending.done:
                    resume(name, round_, pending.body, pending.error)
            failures.flush()

    def run_routine(self, stop, step, wake=None):
        """Run a routine until stop is set: step() returns how long to wait before the next
        step, which comes at once when `wake` is set meanwhile (during the step too; whoever
        sets stop sets wake as well). The real agent runs the probe this way in a thread of
        its own, and the loop in the main thread (the heartbeats: run_heartbeats)."""
        while not stop.is_set():
            if wake is None:
                stop.wait(step())
            else:
                wake.clear()  # before the step: a wake during it is not lost
                wake.wait(step())


def next_call(round_, reply=None, error=None):
    """Resume a heartbeat round (Agent.heartbeat_round) with its call's reply, or its error
    thrown in (neither: start it): the next call it makes, (peer, kind, body, timeout); its
    end raises StopIteration, whose value is the wait before its next round."""
    return round_.send(reply) if error is None else round_.throw(error)


def run_round(round_, call):
    """Run a heartbeat round to its end, each of its calls made by call(peer, kind, body,
    timeout) and waited for; the wait before its next round."""
    reply = error = None
    try:
        while True:
            request = next_call(round_, reply, error)
            try:
                reply, error = call(*request), None
            except Exception as exc:  # noqa: BLE001 -- the round's to deal with
                reply, error = None, exc
    except StopIteration as over:
        return over.value


# --------------------------------------------------------------------------------------------
# the agent: observer threads feed Observations; one loop decides and acts
# --------------------------------------------------------------------------------------------


def _finite(value):
    """A number a stamp can be: an int or float that a float holds, not NaN nor infinite."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


PG_STATES = ("primary", "standby", "down", "none")


class Observations:
    """Written by the observer threads and the server, read as a snapshot by the loop.

    Every status a node sends carries a stamp -- its monotonic clock, and the boot it counts
    from -- and echoes the stamp, PostgreSQL state and fence of the latest status it received
    from the addressee. An echo of one of our stamps proves that the peer heard us at that
    moment (our clock) or later: contact counts from there. When we said then that we were a
    running primary, the peer has counted us alive from there on -- an unfenced primary for a
    standby, any primary for the arbiter (Agent.counts_alive) -- and only such moments anchor
    a primary's lease."""

    def __init__(self, boot=None):
        self._lock = threading.Lock()
        self.boot = boot
        self.contact_at = {}  # peer -> latest moment (our clock) the peer provably heard us
        self.alive_at = {}    # node -> last sign that it serves as primary (our clock)
        self.lease_anchor = None  # latest moment a peer provably heard us as running primary
        self.stamps = {}      # peer -> its latest stamp (stamp, boot, pg, fenced): echoed back
        self.requested_at = {}  # peer -> when its latest heartbeat request reached us

    def heard(self, peer, echo, now, arbiter=False):
        """The peer echoed one of our stamps (a later one than any before counts); one from
        another boot, from our future or malformed is ignored."""
        if not isinstance(echo, dict) or not _finite(echo.get("stamp")) \
                or echo.get("boot") != self.boot or echo["stamp"] > now:
            return
        at = float(echo["stamp"])
        with self._lock:
            self.contact_at[peer] = max(at, self.contact_at.get(peer, at))
            if echo.get("pg") == "primary" and (arbiter or echo.get("fenced") is False):
                self.lease_anchor = max(at, self.lease_anchor or at)

    def remember_stamp(self, peer, body):
        if _finite(body.get("stamp")) and isinstance(body.get("boot"), str) \
                and body.get("pg") in PG_STATES and isinstance(body.get("fenced"), bool):
            with self._lock:
                self.stamps[peer] = {k: body[k] for k in ("stamp", "boot", "pg", "fenced")}

    def echo_for(self, peer):
        with self._lock:
            return self.stamps.get(peer)

    def alive(self, node, at):
        with self._lock:
            self.alive_at[node] = max(at, self.alive_at.get(node, at))

    def snapshot(self):
        with self._lock:
            return dict(self.contact_at), dict(self.alive_at)


class _OneLineFormatter(logging.Formatter):
    """One line per event, even when PostgreSQL's tools answer in several."""

    def format(self, record):
        return super().format(record).replace("\n", " | ")


class _RoleFilter(logging.Filter):
    def __init__(self, agent):
        super().__init__()
        self.agent = agent

    def filter(self, record):
        record.node, record.role = self.agent.cfg.me.name, self.agent.role_name()
        return True


class AgentLock:
    """One agent, and its children, per node: an exclusive flock on a file in the state
    directory, held by the agent and handed to the long-running children that write the data
    directory (initdb, pg_basebackup, pg_rewind). A child left running by a killed agent keeps
    holding it, so that the restarted agent waits for it instead of colliding with it."""

    def __init__(self, state_dir):
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(state_dir, "agent.lock")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)

    def acquire(self, log, stop):
        said = False
        while not stop.is_set():
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if not said:
                    log.warning("waiting for %s: another agent of this node, or a pg_rewind, "
                                "pg_basebackup or initdb left by a previous one, still holds it",
                                self.path)
                    said = True
                stop.wait(0.5)
        return False


NO_DIGITS = str.maketrans("", "", "0123456789")  # a decision's shape: its reason less figures


class Agent:
    """What every agent does: serve peers, exchange heartbeats, learn newer views, and log one
    sentence per decision (when it changes, and every REPEAT_LOG seconds while it holds)."""

    TRIM_INTERVAL = 60.0  # malloc_trim (lean_memory) takes well under a millisecond
    REPEAT_LOG = 30.0
    # How long after the fallback of calls_peer is due the answering side looks: a clock may
    # wake a thread a hair early, and calls_peer wants the gap past c + p, not at it
    FALLBACK_LAG = 0.001
    LOOP_PERIOD = None  # the decision loop's: check_interval

    def __init__(self, cfg, key, default_view, world=None):
        self.cfg, self.key = cfg, key
        self.world = world = world or World()
        self.clock = world.monotonic
        self.started_at = self.clock()
        self.trimmed_at = self.started_at  # lean_memory ran at the start (main)
        self.boot = world.boot_id()
        self.observations = Observations(self.boot)
        self.stop = threading.Event()
        # set when the loop should not wait out its round: a view learned, a switchover asked
        # for, the agent stopping (run_routine)
        self.wake = world.event()
        self.state = world.state_file(os.path.join(cfg.state_dir, "view.json"), default_view)
        self.events = CountedEvents(world.event_log(os.path.join(cfg.log_dir, "events.jsonl"),
                                                    cfg.me.name))
        self.decisions_total = {}  # action -> decisions taken (each tick's), for /metrics
        self.remote = world.remote_postgres(cfg)
        self.log = world.logger()
        self.log.addFilter(_RoleFilter(self))
        self.warn = DropLog(self.log, what="failed", clock=self.clock)
        self._view_lock = threading.RLock()
        self.view = default_view
        self._view_offered = None  # the view a peer offered last, dealt with (learn)
        self.calls_failing = set()  # peers whose last heartbeat this node started failed
        self.failure = None  # why the agent stopped on its own (serve_and_run), if it did
        self._last_said = (None, 0.0)
        self.last_decision = None  # (action, reason, monotonic time), for status
        self.probe = {"target": None, "ok_at": None, "error": None, "failures": 0}
        self.hooks = Hooks(cfg.on_role_change, cfg.me.name, world.spawn, self.warn, self.log)
        self._role_key = None  # (role, fenced, term) when the hook last heard of it

    # -- views ---------------------------------------------------------------------------
    def learn(self, offered, source):
        """Take a newer view, persisted before it counts. A view that cannot be persisted
        raises OSError: the caller must not count the exchange as contact. The view offered
        last, once dealt with, is not looked at again (nearly every heartbeat brings the same
        one): views only move forward, so what was not newer then is not newer now."""
        if offered == self._view_offered:
            return
        try:
            view = View.from_dict(offered)
        except (ValueError, KeyError, TypeError) as exc:
            self.log.warning("ignored a view from %s: %s", source, exc)
            self._view_offered = offered
            return
        db_nodes = {n.name for n in self.cfg.db_nodes}
        if view.primary not in db_nodes or (view.eligible and view.eligible not in db_nodes):
            self.log.warning("ignored a view from %s naming no database node: %s", source,
                             offered)
        else:
            with self._view_lock:
                if newer_view(self.view, view) is not self.view:
                    self.state.save(view)
                    self.log.info("learned from %s: %s is the primary of term %d (eligible: "
                                  "%s)%s", source, view.primary, view.term, view.eligible,
                                  f", {PAUSED}" if view.paused else
                                  ", resuming" if view.resuming else "")
                    self.view = view
                    self.wake.set()  # the loop acts on it now, not at its next round
        self._view_offered = offered

    # -- peers ---------------------------------------------------------------------------
    def own_status(self):
        """The whole status, for operators (`status`, the health endpoints)."""
        raise NotImplementedError

    def heartbeat_status(self):
        """What peers read of a heartbeat (note_status, the arbiter's resume check): what
        PostgreSQL runs as, the fence, the view, a database node's lease. A heartbeat's CPU
        cost grows with what it encodes and decodes, on both sides, ten times a second;
        operators get the whole own_status."""
        raise NotImplementedError

    def status_body(self, to=None, whole=False):
        """Our status for a peer, stamped, with the echo of the peer's latest stamp: the
        heartbeat's part, or (whole) all of own_status."""
        body = self.own_status() if whole else self.heartbeat_status()
        body["stamp"], body["boot"] = self.clock(), self.boot
        body["echo"] = self.observations.echo_for(to) if to else None
        return body

    def counts_alive(self, body):
        """Whether a peer's status is a sign that it serves as primary: a database node's
        agent counts only an unfenced one (a fenced primary serves no one); the arbiter
        counts any (Observations)."""
        return body.get("pg") == "primary" and body.get("fenced") is False

    def note_status(self, sender, body, at):
        """A peer's status (request or reply): its view is learned (and persisted) first;
        only then does the exchange count as contact (Observations.heard)."""
        if isinstance(body.get("view"), dict):
            self.learn(body["view"], sender)
        if self.counts_alive(body):
            self.observations.alive(sender, at)
        self.observations.remember_stamp(sender, body)
        self.observations.heard(sender, body.get("echo"), at,
                                arbiter=sender == self.cfg.arbiter.name)

    def handle(self, sender, kind, body):
        if kind == "status":
            now = self.clock()
            self.note_status(sender, body, now)
            heartbeat = _finite(body.get("stamp"))  # not an operator's `status`
            if heartbeat:
                self.observations.requested_at[sender] = now  # they reach us (calls_peer)
            return self.status_body(sender, whole=not heartbeat)
        raise ProtocolError(f"{kind!r} is not served by {self.cfg.me.name}")

    def _rest(self, began, period=None):
        """How long a routine waits after a step that began at `began`: a check_interval
        (or `period`) from step to step."""
        period = self.cfg.timing.check_interval if period is None else period
        return max(0.0, period - (self.clock() - began))

    def heartbeat_round(self, peer):
        """One heartbeat round with peer (every peer has a routine of its own), when calls_peer
        says this node starts it now: a generator that yields its call, (peer, kind, body, timeout), takes the
        reply (or has the call's error thrown in) and returns the wait before the next round --
        run by World.run_heartbeats, every peer's in one thread, or by run_round. A side that
        only answers wakes when its fallback would be due, not every round: a tenth of a
        percent of a core per pair (README, "The footprint")."""
        began = self.clock()
        timing = self.cfg.timing
        requested_at = self.observations.requested_at.get(peer.name, -math.inf)
        if not calls_peer(self.cfg.me.name, peer.name, self.view, self.cfg.arbiter.name,
                          began - requested_at, timing):
            # the side that answers: nothing to do before the peer's requests have stopped
            # for c + p (calls_peer), looked at FALLBACK_LAG after that, then it calls every
            # round while they stay away. A view that makes us the caller (a handover) is
            # acted on within c + p of the peer's last request. Past that moment without a
            # call (a rule that never falls back, as in the simulator's scenarios of the code
            # before the fallback): every round, never a wait of nothing
            self.calls_failing.discard(peer.name)  # not ours to call now
            until_due = requested_at + timing.check_interval + timing.probe_timeout + \
                self.FALLBACK_LAG - self.clock()
            return until_due if until_due > 0 else self._rest(began)
        try:
            body = yield peer, "status", self.status_body(peer.name), timing.probe_timeout
            self.note_status(peer.name, body, self.clock())
        except (OSError, ProtocolError) as exc:
            self.calls_failing.add(peer.name)
            self.log.debug("no heartbeat from %s: %s", peer.name, exc)
        except Exception as exc:  # noqa: BLE001 -- a routine must outlive anything a peer sends
            self.calls_failing.add(peer.name)
            self.warn("heartbeat", peer.name, f"{type(exc).__name__}: {exc}")
        else:
            self.calls_failing.discard(peer.name)
        return self._until_slot(began, self.call_period(peer))

    def heartbeat_step(self, peer):
        """One heartbeat round with peer, its call made through World.call and waited for
        (run_round): a routine of the simulator's."""
        return run_round(self.heartbeat_round(peer), self._call_waited)

    def _call_waited(self, peer, kind, body, timeout):
        return self.world.call(self.cfg, self.key, peer, kind, body, timeout)

    def call_period(self, peer):
        """From one heartbeat this node starts with peer to the next: check_interval."""
        return self.cfg.timing.check_interval

    def _until_slot(self, began, period):
        """The wait before the next call: `period` after this one began, moved earlier onto
        the period's slot (its multiples on this node's clock), the same for every peer, so
        that the calls to different peers on the same period are due together and their
        round (World.run_heartbeats) wakes once for all. In step: exactly `period`. A call
        that began up to SLOT_SLACK of a period early (a clock read a hair early) or late
        keeps its slot; a later one, or a change of period, costs one interval between
        SLOT_SLACK and 1 + SLOT_SLACK periods (kept under c + p by call_period's bound, past
        which the peer's fallback would call too)."""
        slack = period * SLOT_SLACK
        due = began + period
        due -= (due + slack) % period - slack
        return max(0.0, due - self.clock())

    def probe_step(self):
        """Can a client reach the primary's PostgreSQL and does it say it is a primary? Every
        round while the primary's signs (this probe's among them) are late, else every
        QUIET_ROUNDS (round_period). A primary has none to probe: it looks again every half
        failover_timeout, so a node that a view makes a standby probes its new primary well
        before a promotion could need the signs it brings (the primary's heartbeats bring
        them meanwhile); four wake-ups a second for nothing were 0.05 % of a core."""
        began = self.clock()
        primary = self.view.primary
        if primary == self.cfg.me.name:
            return self._rest(began, self.cfg.timing.failover_timeout / 2)
        try:
            self._probe_once(primary)
        except Exception as exc:  # noqa: BLE001 -- the probe routine must go on
            self.warn("probe", primary, f"{type(exc).__name__}: {exc}")
        seen_at = self.observations.snapshot()[1].get(primary, -math.inf)
        steady = heard_lately([self.clock() - seen_at], self.cfg.timing)
        return self._rest(began, round_period(steady, self.cfg.timing, QUIET_ROUNDS))

    def _probe_once(self, primary):
        probe = self.probe
        probe["target"] = primary
        try:
            in_recovery = self.remote.in_recovery(self.cfg.nodes[primary],
                                                  self.cfg.timing.probe_timeout)
        except (psycopg2.Error, TimeoutError, OSError) as exc:
            error = " ".join(str(exc).split()) or type(exc).__name__
        else:
            if not in_recovery:
                self.observations.alive(primary, self.clock())
                probe.update(ok_at=self.clock(), error=None)
                return
            error = "in recovery (not a primary)"
        probe["failures"] += 1
        probe["error"] = error
        self.warn("probe of the primary's PostgreSQL", primary, error)

    def probe_status(self):
        probe = self.probe
        return {"target": probe["target"], "error": probe["error"], "failures": probe["failures"],
                "ok_age_s": None if probe["ok_at"] is None
                else round(self.clock() - probe["ok_at"], 3)}

    def peers(self):
        raise NotImplementedError

    def heartbeat_rounds(self):
        """name -> a function that starts one heartbeat round with a peer (heartbeat_round)."""
        return {f"hb-{peer.name}": lambda peer=peer: self.heartbeat_round(peer)
                for peer in self.peers()}

    def routines(self):
        """The agent's concurrent routines, (name, step): each step does one round and returns
        how long to wait before the next -- the heartbeats with each peer (heartbeat_step), the
        probe, the decision loop ("loop"). The simulator schedules these steps; the real agent
        runs the very same rounds, the heartbeats' all in one thread (World.run_heartbeats),
        the probe in another (World.run_routine), the loop in the main thread."""
        routines = [(name, lambda begin=begin: run_round(begin(), self._call_waited))
                    for name, begin in self.heartbeat_rounds().items()]
        routines.append(("probe", self.probe_step))
        routines.append(("loop", self.loop_step))
        return routines

    def serve_and_run(self):
        """Serve peers, run every routine until stop is set, then stop serving. Raises
        RuntimeError when the heartbeats' thread ended meanwhile (_run_heartbeats)."""
        server = self.world.serve(self)
        http = None
        try:
            http = self.world.serve_http(self)
            rounds = self.heartbeat_rounds()
            threading.Thread(target=self._run_heartbeats, args=(rounds,), name="heartbeats",
                             daemon=True).start()
            others = dict(self.routines())
            loop = others.pop("loop")
            for name, step in others.items():
                if name not in rounds:
                    threading.Thread(target=self.world.run_routine, args=(self.stop, step),
                                     name=name, daemon=True).start()
            self.world.run_routine(self.stop, loop, self.wake)
        finally:
            server.shutdown()
            if http is not None:
                http.shutdown()
        if self.failure is not None:
            raise RuntimeError(self.failure)

    def _run_heartbeats(self, rounds):
        """World.run_heartbeats; should it end while the agent runs (a bug: every round's
        failures are its own), the agent stops with an error (exit status 1, for a supervisor
        to restart it) rather than run on without a heartbeat: a primary's lease would lapse
        meanwhile, and a standby could never be promoted."""
        try:
            self.world.run_heartbeats(self.stop, self.cfg, self.key, rounds)
            ended = "it returned"
        except BaseException as exc:  # noqa: BLE001 -- whatever ended it is the reason to stop
            ended = f"{type(exc).__name__}: {exc}"
        if not self.stop.is_set():
            self.failure = f"the heartbeats' thread ended ({ended})"
            self.log.critical("%s: stopping the agent", self.failure)
            self.halt()

    def halt(self):
        """Stop every routine (SIGTERM), the loop at once."""
        self.stop.set()
        self.wake.set()

    def hold_lock(self):
        """The node's lock (AgentLock), waited for; False when asked to stop meanwhile."""
        self.lock = self.world.agent_lock(self.cfg.state_dir)
        return self.lock.acquire(self.log, self.stop)

    # -- the loop ------------------------------------------------------------------------
    def say(self, decision):
        """Log the decision when it changes (figures aside) or has held for REPEAT_LOG s."""
        shape = (decision.action, decision.reason.translate(NO_DIGITS))
        now = self.clock()
        self.last_decision = (decision.action, decision.reason, now)
        self.decisions_total[decision.action] = self.decisions_total.get(decision.action, 0) + 1
        if shape != self._last_said[0] or now - self._last_said[1] >= self.REPEAT_LOG:
            self.log.info("%s. %s", decision.action, decision.reason)
            self._last_said = (shape, now)

    def decision_status(self):
        if self.last_decision is None:
            return None
        action, reason, at = self.last_decision
        return {"action": action, "reason": reason, "age_s": round(self.clock() - at, 3)}

    def tick(self):
        raise NotImplementedError

    def loop_step(self):
        """One round of the decision loop; returns the wait before the next."""
        began = self.clock()
        if began - self.trimmed_at >= self.TRIM_INTERVAL:
            self.trimmed_at = began
            lean_memory(first=False)
        try:
            self.tick()
        except (RuntimeError, OSError, psycopg2.Error, TimeoutError,
                subprocess.SubprocessError) as exc:
            self.log.error("%s: %s", type(exc).__name__, exc)
            return 1.0  # the failed step is retried on a later tick
        finally:
            self.note_role()
        return self._rest(began, self.loop_period())

    def loop_period(self):
        return self.LOOP_PERIOD

    # -- role changes, health ------------------------------------------------------------
    def role_key(self):
        """(role, fenced, term): what the role change hook is told about."""
        return (self.role_name(), False, self.view.term)

    def note_role(self):
        """Tell the hook (in the background) when the role or the fence changed."""
        key = self.role_key()
        event = role_change_event(self._role_key, key)
        self._role_key = key
        if event:
            self.hooks.fire(event, key[0], key[2])

    def health_snapshot(self):
        """What the health endpoints are computed from (health_response): the status, the
        peers' contact ages, the counters."""
        snap = self.own_status()
        contact_at, _ = self.observations.snapshot()
        now = self.clock()
        snap["contact_age_s"] = {peer.name: round(_age(now, self.started_at,
                                                       contact_at.get(peer.name)), 3)
                                 for peer in self.peers()}
        snap["decisions_total"] = dict(self.decisions_total)
        snap["events_total"] = dict(self.events.counts)
        return snap


class DbAgent(Agent):
    """The agent of a database node (primary or standby; which one is the arbiter's view)."""

    LOCAL_TIMEOUT = 1.0  # the local PostgreSQL answers over a unix socket, or counts as down
    SWITCHOVER_WAIT = 15.0  # how long a switchover request waits for the loop to carry it out
    WAL_RECHECK = 10.0  # how often a starting standby's log is read (do_start_standby): its
    #                     walreceiver retries every second, so each look finds the line anew
    HANDOVER_CATCHUP = 5.0  # a fenced primary waits this long for the standby to flush all

    def __init__(self, cfg, key, world=None):
        default = View(0, cfg.by_role("primary").name, cfg.by_role("standby").name)
        super().__init__(cfg, key, default, world)
        self.view = self.state.load()
        self.pg = self.world.postgres(cfg)
        self.fence = self.world.fence(cfg.me.pg_port)
        # What this process holds: "closed", "standby" (open, no timeout) or "primary" (open
        # until lease_until). A lease left by a previous process is not ours: it lapses.
        self._lease_lock = threading.Lock()
        self.lease_mode, self.lease_until = "closed", None
        self.fenced = True
        self.confirm_after = self.started_at
        self.handover_unsettled = False
        self.pg_state, self.pg_down_since = "down", None
        self.last_pg_answer = "down"  # the last state PostgreSQL itself told
        self.last_pg = None  # the last tick's PgStatus, for status and the endpoints
        self.steady = False  # the last tick found all as it should be (db_steady)
        self.ticked_view = None  # the view the last tick decided under
        self.other = cfg.other_db(cfg.me.name)
        self.reply_time = None       # primary: the standby's last reply_time (its clock)
        self.standby_seen_at = None  # primary: when that reply_time last changed (our clock)
        self.sync_barrier = None     # primary: WAL position when the standby became sync
        self.switchover = None       # {"done": Event, "result": dict} while one is asked for
        self._switchover_lock = threading.Lock()
        self.wal_checked_at = -math.inf  # when do_start_standby last read PostgreSQL's log
        self.pg_log_offset = None  # how far it read it; None: from the log's end next time
        self.wal_removed_looks = 0  # looks in a row that found WAL_REMOVED
        self.arbiter_news = None     # the arbiter's latest stamp as the last tick saw it

    def role_name(self):
        if self.view.primary == self.cfg.me.name:
            return "primary"
        if self.pg_state == "primary" or not self.pg.has_standby_signal():
            return "replaced"  # a former primary's data, not yet rejoined
        return "standby"

    def reported_pg(self):
        """What peers hear of our PostgreSQL: a status query that failed for less than
        fence_timeout repeats the last answer, so that a slow query or two do not cost a
        healthy primary its lease (peers count it alive on exactly what we report)."""
        down_since = self.pg_down_since
        if self.pg_state == "down" and down_since is not None \
                and self.clock() - down_since < self.cfg.timing.fence_timeout:
            return self.last_pg_answer
        return self.pg_state

    def heartbeat_status(self):
        lease, view = self.lease_and_view()
        return {"pg": self.reported_pg(), "fenced": self.fenced, "view": view.as_dict(),
                "lease": lease}

    def own_status(self):
        body = self.heartbeat_status()
        last = self.last_pg
        return {**body, "node": self.cfg.me.name, "role": self.role_name(),
                "paused": body["view"]["paused"], "probe": self.probe_status(),
                "decision": self.decision_status(),
                "postgres": last.detail() if last is not None else None}

    def role_key(self):
        return (self.role_name(), self.fenced, self.view.term)

    def health_snapshot(self):
        snap = super().health_snapshot()
        snap["pg_now"] = self.pg_state  # what PostgreSQL said at the last tick, unrepeated
        return snap

    def handle(self, sender, kind, body):
        if kind != "switchover":
            return super().handle(sender, kind, body)
        request, refusal = self.ask_switchover()
        if request is None:
            return refusal
        request["done"].wait(self.SWITCHOVER_WAIT)
        return self.end_switchover(request)

    def ask_switchover(self):
        """(request, None): a switchover request for the loop to carry out; (None, answer):
        refused."""
        request = {"done": threading.Event(), "result": None}
        with self._switchover_lock:
            if self.view.primary != self.cfg.me.name or self.switchover is not None:
                return None, {"done": False, "reason": f"{self.cfg.me.name} is not the primary "
                                                       "or a switchover is under way"}
            self.switchover = request
        self.wake.set()
        return request, None

    def end_switchover(self, request):
        """Stop waiting for a request (ask_switchover); the answer for the one who asked."""
        with self._switchover_lock:
            self.switchover = None
        return request["result"] or {"done": False, "reason": "timed out"}

    def _finish_switchover(self, done, reason):
        with self._switchover_lock:
            request = self.switchover
        if request is not None:
            request["result"] = {"done": done, "reason": reason, "view": self.view.as_dict()}
            request["done"].set()

    def run(self):
        if self.prepare():
            self.serve_and_run()

    def prepare(self):
        """Directories, the node's lock, the fence's table; False when stopped meanwhile."""
        self.pg.prepare_dirs()
        if not self.hold_lock():
            return False
        self.pg.lock_fd = self.lock.fd
        self.view = self.state.load()  # a predecessor may have written it while we waited
        self.fence.install()
        inherited = self.fence.lease()
        if self.view.primary == self.cfg.me.name and inherited == float("inf"):
            if self.view.paused:  # a paused primary's port stays open across a restart
                self.lease_mode, self.fenced = "paused", False
            else:  # never adopted: closed until the arbiter's word (rule 6)
                self.fence.close()
        elif self.view.primary == self.cfg.me.name and inherited is not None:
            # a live timed lease of our predecessor: kept, and extended only as it would have
            # been -- by renewals on fresh echoes, which the kernel refuses once it has lapsed
            with self._lease_lock:
                self.lease_mode, self.lease_until = "primary", self.clock() + inherited
            self.fenced = False
        elif self.view.primary != self.cfg.me.name and inherited == float("inf"):
            with self._lease_lock:  # a standby's element: kept for its readers; were it a
                self.lease_mode = "standby"  # primary's, decide_db fences it
            self.fenced = False
        self.log.info("starting: view %s, PostgreSQL port %s", self.view.as_dict(),
                      describe_lease(self.fence.lease()))
        if self.view.primary == self.cfg.me.name:
            # the checkpoint after a promotion (do_promote) may have died with the previous
            # process: without it the replaced node cannot rejoin for minutes
            self.world.spawn("checkpoint", self._checkpoint)
        return True

    def peers(self):
        return [self.other, self.cfg.arbiter]

    # -- the lease -----------------------------------------------------------------------
    def note_status(self, sender, body, at):
        """A peer's status, then the lease extended at once from the contact it proves: every
        anchor comes from here (Observations.heard), in the thread of the exchange -- a
        heartbeat's or the server's, never the decision loop's, so that a slow PostgreSQL or
        a blocking call there cannot make a healthy primary's lease lapse. A routine of its
        own would wake twice a round for this, a third of an idle primary's CPU."""
        super().note_status(sender, body, at)
        try:
            self.extend_lease()
        except Exception as exc:  # noqa: BLE001 -- the exchange must go on
            self.warn("lease extension", "nft", f"{type(exc).__name__}: {exc}")

    def extend_lease(self, opening=False, anchor=None):
        """Set the kernel's lease to what lease_extension allows, when that gains at least
        check_interval / 4 (fewer nft calls, yet a lease that stays close to its due). The write is armed first (Fence.arm): the kernel
        takes it only within safety_margin, so however long the agent stalls, the lease never
        ends later than safety_margin past the term computed here."""
        timing = self.cfg.timing
        with self._lease_lock:
            if self.lease_mode not in ("primary", "paused") and not opening:
                return
            # the anchor first, then the view: an exchange that replaced us taught us the new
            # view before it counted as an anchor (note_status)
            anchor = max(anchor or 0.0, self.observations.lease_anchor or 0.0) or None
            now = self.clock()
            view = self.view
            if view.primary != self.cfg.me.name:
                self._close_lease()
                return
            if self.lease_mode == "paused":
                if view.paused:
                    return  # open, no timeout: the arbiter grants nothing while paused
                # resumed: a timed lease anchored as usual, or closed until the arbiter's word;
                # "paused" until the kernel has taken either (the arbiter ends `resuming` on
                # any other mode: decide_resume_ack), so a write that fails is tried again
                opening, self.lease_until = True, None
            elif view.paused and not opening and now < self.lease_until:
                self.fence.arm(timing.safety_margin)
                if self.fence.hold():
                    self.lease_mode, self.lease_until = "paused", None
                elif self.fence.lease() is None:  # it had lapsed: never revived
                    self.lease_mode, self.lease_until = "closed", None
                return  # else the window passed (a stall): the timed lease runs on
            until = lease_extension(self.lease_until, anchor, now, timing, opening)
            if until is None:
                self._close_lease()
                return
            if not opening and until - self.lease_until < timing.check_interval / 4:
                return  # a lease kept within a heartbeat of its due: room for pauses
            self.fence.arm(timing.safety_margin)
            now = self.clock()  # after arming: the kernel's window started before this
            until = lease_extension(self.lease_until, anchor, now, timing, opening)
            if until is None:
                self._close_lease()
            elif (self.fence.open_for if opening else self.fence.renew)(until - now):
                self.lease_mode, self.lease_until = "primary", until
            elif not opening and self.fence.lease() is None:  # it had lapsed
                self.lease_mode, self.lease_until = "closed", None
            else:  # the window passed (a stall): nothing was written; try again later
                if opening:  # whatever was there -- a standby's element, a paused primary's
                    self._close_lease()  # hold, both untimed -- must not outlive it
                self.log.warning("the kernel did not take the lease in time: not %s",
                                 "opened" if opening else "extended")

    def _close_lease(self):
        """Close the port, and make sure of it: a failed close is tried again. The mode says
        "closed" only once the kernel has taken it: a paused primary's untimed element that
        could not be removed stays "paused" (decide_resume_ack), a timed lease lapses on its
        own and the loop sees it (_observe_fence)."""
        for attempt in range(5):
            try:
                self.fence.close()
                break
            except (RuntimeError, OSError, subprocess.SubprocessError):
                if attempt == 4:
                    raise
                self.world.sleep(0.01)
        self.lease_mode, self.lease_until = "closed", None

    def lease_status(self):
        mode, until = self.lease_mode, self.lease_until
        if mode == "primary" and until is not None:
            return {"mode": mode, "left_s": round(until - self.clock(), 3)}
        return {"mode": mode}

    def lease_and_view(self):
        """The lease and the view read together, under the lease's lock: a lease mode other
        than "paused" reported with a resumed view is one the agent will not leave for an
        untimed lease again (the arbiter's decide_resume_ack relies on it). A lock held long
        (an nft call) gives mode "busy", which the arbiter does not take as an answer."""
        if not self._lease_lock.acquire(timeout=0.05):
            return {"mode": "busy"}, self.view
        try:
            return self.lease_status(), self.view
        finally:
            self._lease_lock.release()

    def _observe_fence(self, now):
        """Fenced unless this process holds a live lease that the kernel has too; a lapse
        (frozen agent, lost peers) is noticed here, and counts from now for confirm_after."""
        kernel = self.fence.lease()
        with self._lease_lock:
            if self.lease_mode == "primary" and (kernel is None or self.lease_until is None
                                                  or now >= self.lease_until):
                self.lease_mode, self.lease_until = "closed", None
            if self.lease_mode == "paused" and kernel is None:
                self.lease_mode = "closed"
            if self.lease_mode == "closed" and kernel is not None:
                self._close_lease()  # an element we did not write (an earlier incarnation's)
                kernel = None        # or whose term we hold as over: no client may use it
            held = self.lease_mode != "closed" and kernel is not None
        if not held and not self.fenced:
            self.fenced, self.confirm_after = True, now
            self.events("fenced", reason="the lease lapsed", term=self.view.term)
            self._end_client_sessions()
        self.fenced = not held
        return kernel is not None

    def _observe_standby(self, st, now):
        """As primary: when the standby last replied (on our clock), whether it streams, and
        whether it has every acknowledged commit (it is the sync standby and has flushed past
        the WAL position at which it became one)."""
        if st.standby_state in ("streaming", "catchup"):
            self.reply_time, self.standby_seen_at = standby_heard(
                self.reply_time, self.standby_seen_at, st.standby_reply_time, now)
        sync_now = (st.pg == "primary" and st.sync_names == self.other.name
                    and st.standby_sync == "sync")
        if not sync_now:
            self.sync_barrier = None
        elif self.sync_barrier is None:
            self.sync_barrier = st.lsn
        synced = (sync_now and st.standby_flush is not None
                  and st.standby_flush >= self.sync_barrier)
        return st.standby_state == "streaming", synced

    def loop_period(self):
        primary = self.view.primary == self.cfg.me.name
        return round_period(self.steady, self.cfg.timing,
                            primary_rounds(self.cfg.timing) if primary else QUIET_ROUNDS)

    def call_period(self, peer):
        """A database node calls its peers on its loop's longer rounds (steady_call_period)
        while its last tick found all as it should be and no call it started has failed
        since its last reply, every check_interval from the tick that finds otherwise -- a
        peer unheard for longer than a healthy exchange's gap, the primary's signs late
        (db_steady) -- or from
        the first call that fails: the other peer's next call comes at most a period later
        (1 + SLOT_SLACK), and the primary's lease, resting on that peer alone, gets its
        anchors every round again. That comes well before a promotion could need the
        arbiter's news (c + p + the loop's rounds within failover_timeout: round_period) or the
        lease an anchor (fence_timeout: steady_call_period). A call still in flight counts
        only once it has failed: the calls to the two peers are due together (_until_slot),
        and the first reply's round ends while the other's call is on its way."""
        timing = self.cfg.timing
        if self.steady and not self.calls_failing:
            return steady_call_period(timing)
        return timing.check_interval

    def tick(self):
        self.steady = False
        step = bootstrap_action(self.cfg.me.name, self.pg.data_exists(), self.view)
        if step.action != "adopt":
            self.bootstrap(step)
            return
        st = self.pg.status(self.LOCAL_TIMEOUT, self.other.name)
        self.last_pg = st
        now = self.clock()
        if st.pg != "down":
            self.pg_down_since, self.last_pg_answer = None, st.pg
            self.forget_pg_log()  # it answers: no earlier line in its log is a verdict
        elif self.pg_down_since is None:
            self.pg_down_since = now
        self.pg_state = st.pg
        port_open = self._observe_fence(now)
        streaming, synced = self._observe_standby(st, now)
        # the arbiter's news before the snapshot: a promotion request echoes news that had
        # reached us when we judged the primary lost (decide_grant's promote_window), never
        # news that came later, maybe after a sign of the primary this decision did not see
        self.arbiter_news = self.observations.echo_for(self.cfg.arbiter.name)
        contact_at, alive_at = self.observations.snapshot()
        signal = self.pg.has_standby_signal()
        # pg_controldata only for a replaced node that is down: no extra process per tick
        replaced_down = (st.pg == "down" and not signal
                         and self.view.primary != self.cfg.me.name)
        rewound = replaced_down and self.pg.rewound()
        mark = self.pg.rewind_mark() if replaced_down else None
        obs = DbObservation(
            now=now, started_at=self.started_at, pg=self.pg_state,
            pg_down_since=self.pg_down_since, has_standby_signal=signal,
            fenced=self.fenced, view=self.view, contact_at=contact_at,
            primary_alive_at=alive_at.get(self.view.primary), sync_names=st.sync_names,
            standby_seen_at=self.standby_seen_at, standby_streaming=streaming,
            standby_synced=synced, switchover_requested=self.switchover is not None,
            strict_sync=self.cfg.strict_sync, confirm_after=self.confirm_after,
            port_open=port_open, handover_unsettled=self.handover_unsettled, rewound=rewound,
            rewind_unfinished=mark is not None,
            rewind_before_reboot=mark is not None and mark != self.boot)
        decision = decide_db(self.cfg.me.name, self.other.name, self.cfg.arbiter.name, obs,
                             self.cfg.timing)
        self.say(decision)
        getattr(self, "do_" + decision.action)(decision)
        self.note_round(obs, decision)

    def note_round(self, obs, decision):
        """After a tick: whether the next may wait longer (db_steady), judged on the view of
        the tick before."""
        self.steady = db_steady(self.cfg.me.name, self.other.name, self.cfg.arbiter.name, obs,
                                decision, self.ticked_view, self.cfg.timing)
        self.ticked_view = obs.view

    def bootstrap(self, decision):
        self.say(decision)
        if decision.action == "initdb":
            self.pg.initdb(self.view)
        elif decision.action == "basebackup":
            self.pg.basebackup(self.view)
        else:
            return
        self.events(decision.action)
        self.pg.start()

    # -- actions -------------------------------------------------------------------------
    def do_none(self, decision):
        pass

    def do_fence(self, decision):
        with self._lease_lock:
            self._close_lease()
        if not self.fenced:
            self.fenced, self.confirm_after = True, self.clock()
            self.events("fenced", reason=decision.reason, term=self.view.term)
        self._end_client_sessions()

    def _end_client_sessions(self):
        try:
            self.pg.terminate_clients()  # sessions opened before the fence end now
        except (psycopg2.Error, TimeoutError, OSError) as exc:
            self.log.warning("fenced, but could not end client sessions: %s", exc)

    def do_unfence(self, decision):
        if self.view.primary == self.cfg.me.name:
            self.extend_lease(opening=True)
            if self.lease_mode != "primary":
                self.log.info("no peer has heard me as the primary recently: staying fenced")
                return
        else:
            with self._lease_lock:
                self.fence.arm(self.cfg.timing.safety_margin)
                if not self.fence.open():
                    self.log.warning("the kernel did not take the standby's element in time: "
                                     "staying fenced")
                    return
                self.lease_mode, self.lease_until = "standby", None
        self.fenced = False
        self.events("unfenced", reason=decision.reason, term=self.view.term)

    def do_promote(self, decision, asked_at=None):
        """The new view has no eligible standby: the new primary waits for the old one only
        with strict_sync. Its port now needs a primary's lease: one anchored on our promotion
        request when the arbiter granted it (it heard us then, and can grant no other term
        before we make a standby eligible), else closed until the arbiter hears us."""
        if self.view.primary != self.cfg.me.name:
            self.log.warning("not promoting: the view names %s", self.view.primary)
            return
        self.extend_lease(opening=True, anchor=asked_at)
        self.fenced = self.lease_mode != "primary"
        if self.fenced:
            self.confirm_after = self.clock()
        self.pg.write_config(self.view, sync_names=self.wanted_sync_names())
        self.pg.reload()
        self.pg.promote()
        self.reply_time = self.standby_seen_at = self.sync_barrier = None
        self.events("promoted", term=self.view.term)
        self.log.info("promoted: I am the primary of term %d", self.view.term)
        # pg_rewind reads the new timeline from pg_control, written by the next checkpoint:
        # one now lets the old primary rejoin at once. In the background: it may take long.
        self.world.spawn("checkpoint", self._checkpoint)

    def wanted_sync_names(self):
        return desired_sync_names(self.view, other=self.other.name, strict=self.cfg.strict_sync)

    def _checkpoint(self):
        try:
            self.pg.checkpoint(timeout=600)
        except (psycopg2.Error, TimeoutError, OSError) as exc:
            self.log.warning("checkpoint after the promotion failed: %s", exc)

    def do_request_promotion(self, decision):
        asked_at = self.clock()
        if self._ask_arbiter("promote", {"echo": self.arbiter_news}) == "granted":
            self.do_promote(decision, asked_at)

    def do_resume(self, decision):
        if self._ask_arbiter("resume", {}) == "granted":
            self.pg.write_config(self.view, sync_names=self.wanted_sync_names())
            self.pg.start()
            self.events("restarted", term=self.view.term)

    def do_drop_standby(self, decision):
        """Stop waiting for the standby only on the arbiter's reply to this very request
        (based on our view's term and seq), with a durable view in which no one is eligible."""
        answer = self._ask_arbiter("eligibility", {"standby": self.other.name,
                                                   "eligible": False, "seq": self.view.seq})
        if answer == "granted" and self.view.eligible is None \
                and self.view.primary == self.cfg.me.name:
            self.do_set_sync(decision)

    def do_mark_eligible(self, decision):
        self._ask_arbiter("eligibility", {"standby": self.other.name, "eligible": True,
                                          "seq": self.view.seq})

    def _ask_arbiter(self, kind, body):
        """Ask the arbiter: "granted", "refused" or "unknown" (no answer: it may or may not
        have acted). Any answer's view is learned (and persisted) before acting on it."""
        arbiter = self.cfg.arbiter
        try:
            reply = self.world.call(self.cfg, self.key, arbiter, kind,
                                    {"term": self.view.term, **body},
                                    2 * self.cfg.timing.probe_timeout)
        except (OSError, ProtocolError) as exc:
            self.log.warning("%s: no answer from %s: %s", kind, arbiter.name, exc)
            return "unknown"
        granted = reply.get("granted") is True
        self.log.info("%s %s by %s: %s", kind, "granted" if granted else "refused", arbiter.name,
                      reply.get("reason"))
        if isinstance(reply.get("view"), dict):
            self.learn(reply["view"], arbiter.name)
        return "granted" if granted else "refused"

    def do_start_standby(self, decision):
        """Start PostgreSQL as a standby, unless its primary no longer has the WAL it would
        need (wal_gap: then keep the data aside, and the bootstrap clones). A postmaster that
        runs but does not answer yet (recovery not consistent: after a rewind, a long replay)
        is left to go on; every WAL_RECHECK s its log is read for PostgreSQL's own verdict
        that the WAL it waits for is gone (see _judge_starting_standby)."""
        view = self.view
        if self.pg.running():
            now = self.clock()
            if now - self.wal_checked_at >= self.WAL_RECHECK:
                self.wal_checked_at = now
                if self._judge_starting_standby(view):
                    return
            self.warn("local PostgreSQL", "start", "it runs but does not accept connections "
                      "yet (its recovery is not consistent): waiting")
            return
        if self._wal_reachable_or_reclone(view):
            self.pg.write_config(view)
            self.forget_pg_log()  # what it logged before this start is no verdict on it
            self.pg.start()
            self.events("started_standby", primary=view.primary)

    def forget_pg_log(self):
        """Judge PostgreSQL's log only from its end on (a start, an answer from PostgreSQL)."""
        self.pg_log_offset, self.wal_removed_looks = None, 0

    def _judge_starting_standby(self, view):
        """Read what PostgreSQL logged since the last look (the first look only finds where
        the log ends) and judge it (starting_standby_verdict); True when it recloned."""
        first_look = self.pg_log_offset is None
        logged, self.pg_log_offset = self.pg.log_since(self.pg_log_offset)
        removed = None if first_look else WAL_REMOVED.search(logged)
        self.wal_removed_looks, reclone = starting_standby_verdict(
            self.cfg.me.name, view, self.wal_removed_looks, removed is not None)
        if not reclone:
            return False
        self._reclone(view, f"{view.primary} no longer keeps WAL that my recovery waits for "
                            f"(PostgreSQL: {removed.group(0)})")
        return True

    def _wal_reachable_or_reclone(self, view):
        """False when view's primary answers that a WAL segment this node's recovery needs is
        gone from its pg_wal and from ours (wal_gap): PostgreSQL is then stopped and the data
        kept aside to clone afresh. True otherwise -- also when the primary cannot be asked: a
        standby starts without it, as it must to be promoted when the primary is lost."""
        if view.primary == self.cfg.me.name:
            return True  # nothing to fetch from: the caller's decision is out of date
        source = self.cfg.nodes[view.primary]
        try:
            needed, local, valid_until, segment_bytes = self.pg.wal_needs()
            held = self.remote.wal_files(source, 2 * self.cfg.timing.probe_timeout)
        except (RuntimeError, OSError, ValueError, psycopg2.Error, TimeoutError,
                subprocess.SubprocessError) as exc:
            self.warn("WAL check", source.name, f"{type(exc).__name__}: {exc}")
            return True
        missing = wal_gap(needed, local, valid_until, held, segment_bytes)
        if missing is None:
            return True
        self._reclone(view, f"{source.name} no longer keeps WAL segment {missing}, which my "
                            f"recovery needs (it starts at {needed}): a standby cannot catch "
                            "up from there")
        return False

    def _reclone(self, view, why):
        """Stop PostgreSQL and keep the data aside to clone afresh -- only while the view the
        judgement was made on is still ours (a new view may make this node the primary), looked
        at again under the view's lock right before the data moves (a rename)."""
        def unchanged():
            return (self.view.term, self.view.seq) == (view.term, view.seq)
        if unchanged():
            self.pg.stop_immediate()
            with self._view_lock:
                if unchanged():
                    self._keep_aside(why)
                    return
        self.log.info("not recloning: the view changed meanwhile (%s)", why)

    def do_set_sync(self, decision):
        self.pg.write_config(self.view, sync_names=decision.sync_names)
        self.pg.reload()
        self.events("sync_standby", names=decision.sync_names, term=self.view.term)

    def do_rejoin(self, decision):
        """Replaced: stop, rewind onto the new primary and start as its standby; if the rewind
        fails, keep the old data aside and clone afresh (the bootstrap does it next tick)."""
        source = self.cfg.nodes[self.view.primary]
        timeline = self.remote.checkpoint_timeline(source, 2 * self.cfg.timing.probe_timeout)
        if timeline <= self.pg.timeline():
            self.log.info("%s has not checkpointed its new timeline yet: rewinding later",
                          source.name)
            return
        self.pg.stop_immediate()
        # a rewound node needs WAL from its last checkpoint before the divergence on, which is
        # no later than its own latest one: a gap from there on makes the rewind pointless
        if not self._wal_reachable_or_reclone(self.view):
            return
        try:
            output = self.pg.rewind(self.view, self.boot)
        except RuntimeError as exc:
            self._keep_aside(str(exc))
            return
        diverged = next((line for line in output.splitlines() if "diverged" in line), output)
        self.log.info("rewound onto %s: %s", self.view.primary, diverged)
        self._start_rejoined(diverged)

    def do_reclone(self, decision):
        self.pg.stop_immediate()  # "down" may be a status query that timed out
        self._keep_aside("an earlier pg_rewind did not finish")

    def _keep_aside(self, why):
        """Keep, never delete, data that cannot rejoin; the bootstrap clones next tick."""
        aside = self.pg.move_aside()
        self.log.error("%s; old data kept in %s, cloning afresh", why, aside)
        self.events("rewind_failed", error=why[-500:], kept=aside)

    def do_finish_rejoin(self, decision):
        """An agent killed after pg_rewind and before standby.signal left a complete rewind
        (pg_control, its last write, says so): it needs only the standby's files and a start.
        Its timeline is already the new primary's: do_rejoin's check would wait forever."""
        self._start_rejoined("not known: rewound by an agent killed before it started "
                             "PostgreSQL")

    def _start_rejoined(self, divergence):
        if not self._wal_reachable_or_reclone(self.view):  # a long outage: recycled WAL
            return
        self.pg.make_standby(self.view)
        self.pg.start()
        self.events("rejoined", primary=self.view.primary, term=self.view.term,
                    divergence=divergence)

    def do_handover(self, decision):
        """Planned switchover: fence (no new writes; the standby alone still streams), let it
        flush everything, then hand the term over; the standby promotes on the new view, and
        this node rejoins. Without an answer, stay fenced until the arbiter settles it."""
        self.fence.let_through(self.other.address, self.HANDOVER_CATCHUP + 2)
        self.do_fence(decision)
        began = self.clock()
        while True:
            st = self.pg.status(self.LOCAL_TIMEOUT, self.other.name)
            if st.lsn is not None and st.standby_flush is not None and st.standby_flush >= st.lsn:
                self.log.info("%s has flushed all my WAL (%.2f s after the fence)",
                              self.other.name, self.clock() - began)
                break
            if self.clock() - began >= self.HANDOVER_CATCHUP:
                self.log.warning("%s is still %s bytes behind after %.0f s: handing over "
                                 "anyway (it is the synchronous standby: it has every "
                                 "acknowledged commit)", self.other.name,
                                 (st.lsn or 0) - (st.standby_flush or 0), self.HANDOVER_CATCHUP)
                break
            self.world.sleep(0.05)
        answer = self._ask_arbiter("handover", {"to": self.other.name, "seq": self.view.seq})
        self.fence.stop_letting_through()
        if answer == "granted":
            self._finish_switchover(True, f"{self.other.name} is the primary of term "
                                          f"{self.view.term}")
            return
        self.handover_unsettled = answer == "unknown"
        self.confirm_after = self.clock()  # reopen only on the arbiter's word from now on
        self._finish_switchover(False, "the arbiter refused the handover" if answer == "refused"
                                else "no answer from the arbiter: fenced until it settles")

    def do_settle_handover(self, decision):
        if self._ask_arbiter("settle", {}) != "unknown":
            self.handover_unsettled = False
            self.confirm_after = self.clock()

    def do_refuse_switchover(self, decision):
        self._finish_switchover(False, decision.reason)


def describe_lease(lease):
    if lease is None:
        return "closed (fenced)"
    return "open" if lease == float("inf") else f"open for {lease:.3f} s (a lease)"


class ArbiterAgent(Agent):
    """The arbiter: the one place where terms are created, durably, one at a time."""

    HISTORY_PAGE = 100  # terms per `history` reply: 100 records stay far below MAX_MESSAGE
    # The arbiter decides in its answers to requests; its loop only tells (one sentence, when
    # it changes): twice a second is enough for that (a tick every check_interval was a ninth
    # of an idle arbiter's CPU)
    LOOP_PERIOD = 0.5

    def __init__(self, cfg, key, world=None):
        default = View(1, cfg.by_role("primary").name, cfg.by_role("standby").name)
        super().__init__(cfg, key, default, world)
        self.history = self.world.history_file(
            os.path.join(cfg.state_dir, "history.jsonl"))

    def role_name(self):
        return "arbiter"

    def heartbeat_status(self):
        return {"pg": "none", "fenced": False, "view": self.view.as_dict()}

    def own_status(self):
        body = self.heartbeat_status()
        return {**body, "node": self.cfg.me.name, "role": "arbiter",
                "paused": body["view"]["paused"], "probe": self.probe_status(),
                "decision": self.decision_status()}

    def counts_alive(self, body):
        """Any primary, fenced or not: a fenced primary reopens on an echo of ours
        (Observations.heard), so every stamp of its that we echo must count here first."""
        return body.get("pg") == "primary"

    def note_status(self, sender, body, at):
        with self._view_lock:  # a status is taken whole before or after a grant, never across
            super().note_status(sender, body, at)
            lease = body.get("lease")
            new = decide_resume_ack(self.view, sender, body.get("view"),
                                    lease.get("mode") if isinstance(lease, dict) else None)
            if new is not None:
                self.state.save(new)  # durable before anyone hears of it
                self.view = new
                self.events("resume_acknowledged", primary=new.primary, term=new.term)
                self.log.info("%s has its port under a timed lease again: promotions and "
                              "handovers are possible again", sender)

    def status_body(self, to=None, whole=False):
        with self._view_lock:  # the view and the echo from one side of a grant
            return super().status_body(to, whole)

    def handle(self, sender, kind, body):
        if kind == "status":
            with self._view_lock:
                return super().handle(sender, kind, body)
        return self.decide_request(sender, kind, body)

    def news_from_me(self, body):
        """The arbiter's stamp (its clock) echoed in a request, or None."""
        echo = body.get("echo")
        if isinstance(echo, dict) and _finite(echo.get("stamp")) \
                and echo.get("boot") == self.boot and echo["stamp"] <= self.clock():
            return float(echo["stamp"])
        return None

    def run(self):
        if self.prepare():
            self.serve_and_run()

    def prepare(self):
        """Directories, the passfile (the probe of the primary's PostgreSQL authenticates with
        it), the node's lock, the view; False when stopped meanwhile."""
        self.remote.prepare()
        if not self.hold_lock():
            return False
        self.view = self.state.load()
        fresh = not self.state.exists()
        if fresh:
            self.state.save(self.view)  # term 1 exists durably before anyone is told of it
        for record in missing_history(self.history.read(), self.view, fresh, time.time()):
            self.history.append(record)
        self.log.info("starting: view %s", self.view.as_dict())
        return True

    def peers(self):
        return self.cfg.db_nodes

    def tick(self):
        contact_at, alive_at = self.observations.snapshot()
        now, view = self.clock(), self.view
        seen = _age(now, self.started_at, alive_at.get(view.primary))
        peers = ", ".join(f"{n.name} {'reachable' if _age(now, self.started_at, contact_at.get(n.name)) < self.cfg.timing.fence_timeout else 'unreachable'}"  # noqa: E501
                          for n in self.cfg.db_nodes)
        note = f"{PAUSED}: " if view.paused else ""
        if view.resuming:
            note = f"resuming (waiting for {view.primary} to leave its untimed lease): "
        self.say(Decision("none", f"{note}I am ({self.cfg.me.name}) the arbiter of term "
                                  f"{view.term}: {view.primary} is primary (seen {seen:.1f} s "
                                  f"ago), eligible standby {view.eligible}; {peers}"))

    def decide_request(self, sender, kind, body):
        term, seq = body.get("term"), body.get("seq")
        db_names = {n.name for n in self.cfg.db_nodes}
        if kind == "history":  # any node (the operator's command): read only
            after = body.get("after", 0)
            if not isinstance(after, int) or isinstance(after, bool):
                raise ProtocolError(f"bad history request from {sender}: {body!r}")
            records = [r for r in self.history.read() if r.get("term", 0) > after]
            return {"records": records[:self.HISTORY_PAGE],
                    "more": len(records) > self.HISTORY_PAGE}
        if not isinstance(term, int) or (sender not in db_names and kind != "pause"):
            raise ProtocolError(f"bad {kind} request from {sender}: {body!r}")
        with self._view_lock:  # one decision at a time: never two grants for one term
            now, view = self.clock(), self.view
            contact_at, alive_at = self.observations.snapshot()
            lost_s = _age(now, self.started_at, alive_at.get(view.primary))
            if kind == "pause" and isinstance(body.get("paused"), bool) \
                    and isinstance(seq, int):
                granted, new, reason = decide_pause(view, term, seq, body["paused"])
            elif kind == "promote":
                granted, new, reason = decide_grant(view, sender, term,
                                                    alive_at.get(view.primary), now,
                                                    self.started_at, self.cfg.timing,
                                                    self.news_from_me(body))
            elif kind == "resume":
                granted, reason = decide_resume(view, sender, term)
                new = view
                if granted:  # its PostgreSQL comes back now: no promotion for a while
                    self.observations.alive(sender, now)
            elif kind == "eligibility" and body.get("standby") in db_names \
                    and isinstance(body.get("eligible"), bool) and isinstance(seq, int):
                granted, new, reason = decide_eligibility(view, sender, term, seq,
                                                          body["standby"], body["eligible"])
            elif kind == "handover" and body.get("to") in db_names and isinstance(seq, int):
                granted, new, reason = decide_handover(view, sender, term, seq, body["to"],
                                                       contact_at.get(body["to"]), now,
                                                       self.cfg.timing)
            elif kind == "settle":
                granted, new, reason = decide_settle(view, sender, term)
            else:
                raise ProtocolError(f"bad {kind} request from {sender}: {body!r}")
            if new != view:
                self.state.save(new)  # durable before anyone hears of it
                if new.term != view.term:  # the history too, fsynced, before the reply
                    self.history.append(history_record(kind, view, new, time.time(), sender,
                                                       lost_s, reason))
                self.view = new
                event = (("paused" if new.paused else "resumed") if kind == "pause"
                         else ARBITER_EVENTS[kind])
                self.events(event, primary=new.primary, term=new.term,
                            eligible=new.eligible, reason=reason)
            self.log.info("%s from %s: %s. %s", kind, sender,
                          "granted" if granted else "refused", reason)
            return {"granted": granted, "reason": reason, "view": self.view.as_dict()}


ARBITER_EVENTS = {"promote": "granted", "handover": "handover", "eligibility": "eligibility",
                  "settle": "settled"}


def switchover_command(cfg, key):
    """Ask the current primary's agent to hand its role to the standby; print the answer."""
    try:
        view = call(cfg, key, cfg.me, "status", {}, timeout=2.0)["view"]
        primary = cfg.nodes[view["primary"]]
        reply = call(cfg, key, primary, "switchover", {}, timeout=DbAgent.SWITCHOVER_WAIT + 5)
    except (OSError, ProtocolError, KeyError, TypeError) as exc:
        reply = {"done": False, "reason": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(reply))
    return 0 if reply.get("done") else 1


def gather_statuses(cfg, key, timeout=1.0, ask=call):
    """Every node's agent's status (node -> body), asked at once; a node that does not answer
    within timeout is {"error": why}, never left out."""
    results = {}

    def one(node):
        try:
            results[node.name] = ask(cfg, key, node, "status", {}, timeout)
        except (OSError, ProtocolError) as exc:
            results[node.name] = {"error": f"{type(exc).__name__}: {exc}"}

    threads = [threading.Thread(target=one, args=(node,), daemon=True)
               for node in cfg.nodes.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 1.0)
    return {name: results.get(name, {"error": "no answer"}) for name in cfg.nodes}


def cluster_status_command(cfg, key, as_json=False, watch=False, count=None, out=None):
    """The whole cluster from any node: one table (or JSON); --watch refreshes every second
    until Ctrl-C or count rounds."""
    out = out or sys.stdout
    rounds = 0
    try:
        while True:
            statuses = gather_statuses(cfg, key)
            text = (json.dumps(statuses, indent=2, sort_keys=True) if as_json
                    else cluster_table(statuses))
            if watch and out.isatty():
                out.write("\033[H\033[J")  # clear the screen: the table stays in place
            stamp = time.strftime("%H:%M:%S")
            out.write((f"{stamp} (every 1 s, Ctrl-C stops)\n" if watch and not as_json
                       else "") + text + "\n")
            out.flush()
            rounds += 1
            if not watch or (count is not None and rounds >= count):
                return 0
            time.sleep(1.0)
    except KeyboardInterrupt:
        return 0


def pause_command(cfg, key, paused):
    """Ask the arbiter to pause or resume the cluster, on the view it holds now (a view that
    moved on between the two requests: asked again, a few times)."""
    reply = {"granted": False, "reason": "not asked"}
    for _ in range(3):
        try:
            view = call(cfg, key, cfg.arbiter, "status", {}, timeout=2.0)["view"]
            reply = call(cfg, key, cfg.arbiter, "pause",
                         {"term": view["term"], "seq": view["seq"], "paused": paused},
                         timeout=2.0)
        except (OSError, ProtocolError, KeyError, TypeError) as exc:
            reply = {"granted": False, "reason": f"{type(exc).__name__}: {exc}"}
            break
        if reply.get("granted"):
            break
    print(json.dumps(reply))
    return 0 if reply.get("granted") else 1


def history_command(cfg, key, as_json=False):
    """Every term, from the arbiter's history file."""
    records, after = [], 0
    try:
        while True:
            reply = call(cfg, key, cfg.arbiter, "history", {"after": after}, timeout=2.0)
            page = [r for r in reply.get("records", []) if isinstance(r, dict)]
            records += page
            if not reply.get("more") or not page:
                break
            after = max(r.get("term", 0) for r in page)
    except (OSError, ProtocolError) as exc:
        print(f"bobry: no history from {cfg.arbiter.name}: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 1
    print(json.dumps(records, indent=2) if as_json else format_history(records))
    return 0


def status_command(cfg, key):
    """This host's status as JSON (`status --local`), for `lab status` and for people."""
    out = {"node": cfg.me.name, "address": cfg.me.address, "config_role": cfg.me.role}
    try:
        body = call(cfg, key, cfg.me, "status", {}, timeout=2.0)
        out.update(agent="up", **{k: body.get(k) for k in ("role", "view", "lease", "probe",
                                                            "decision", "paused")})
    except (OSError, ProtocolError) as exc:
        out.update(agent="down", agent_error=str(exc))
    if cfg.me.role != "arbiter":
        try:
            lease = Fence(cfg.me.pg_port).lease()  # the kernel's word, whatever the agent says
        except OSError as exc:  # not root, say
            out.update(fenced=None, port=f"unknown: {exc}")
        else:
            out.update(fenced=lease is None, port=describe_lease(lease))
        try:
            out.update(LocalPostgres(cfg).timeline_and_replication())
        except (psycopg2.Error, TimeoutError, OSError):
            out["pg"] = "down"
    print(json.dumps(out))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description="Bobry failover agent")
    parser.add_argument("--config", required=True, help="the cluster's agent.ini")
    parser.add_argument("--node", required=True, help="which node of the cluster this host is")
    parser.add_argument("command", nargs="?", default="run",
                        choices=["run", "status", "switchover", "pause", "resume", "history"],
                        help="run the agent (default); status: the whole cluster as one table; "
                        "switchover: ask the primary to hand over to the standby; pause, "
                        "resume: no automatic failover while paused; history: every term")
    parser.add_argument("--debug", action="store_true", help="log every heartbeat failure")
    parser.add_argument("--local", action="store_true",
                        help="status: only this host, as JSON (agent, kernel fence, PostgreSQL)")
    parser.add_argument("--json", action="store_true", help="status, history: as JSON")
    parser.add_argument("--watch", action="store_true",
                        help="status: refresh every second (Ctrl-C stops)")
    parser.add_argument("--count", type=int, default=None,
                        help="status --watch: stop after this many tables")
    args = parser.parse_args(argv)
    if args.count is not None and args.count < 1:
        parser.error("--count must be at least 1")
    try:
        cfg = load_config(args.config, args.node)
        key = read_secret(cfg.agent_key_file).encode()
    except ConfigError as exc:
        print(f"bobry: bad config: {exc}", file=sys.stderr)
        return 2
    if args.command == "status" and args.local:
        return status_command(cfg, key)
    if args.command == "status":
        return cluster_status_command(cfg, key, args.json, args.watch, args.count)
    if args.command in ("pause", "resume"):
        return pause_command(cfg, key, args.command == "pause")
    if args.command == "history":
        return history_command(cfg, key, args.json)
    if args.command == "switchover":
        return switchover_command(cfg, key)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter("%(asctime)s %(node)s %(role)s %(levelname)s "
                                           "%(message)s"))
    logging.getLogger("bobry").addHandler(handler)
    logging.getLogger("bobry").setLevel(logging.DEBUG if args.debug else logging.INFO)
    raise_fd_limit()
    lean_memory()
    agent = (ArbiterAgent if cfg.me.role == "arbiter" else DbAgent)(cfg, key)
    stop_on_sigterm(agent)
    try:
        agent.run()
    except ConfigError as exc:
        agent.log.error("bad state or secret: %s", exc)
        return 2
    except RuntimeError as exc:  # e.g. nft missing: the fence cannot be installed
        agent.log.error("cannot run: %s", exc)
        return 1
    agent.log.info("stopped (PostgreSQL, if running, keeps running)")
    return 0


def stop_on_sigterm(agent):
    """SIGTERM halts the agent from a thread of its own: the handler runs in the main thread,
    which may hold the very lock that Event.set() takes (the loop's wake, cleared and waited
    on there), and Python's locks are not reentrant."""
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(
        target=agent.halt, name="halt", daemon=True).start())


if __name__ == "__main__":
    sys.exit(main())
