"""The safety invariants of the agent's decisions, each stated once: one function per invariant,
whose docstring names the rule of README.md it stands for ("The rules", "After the fault:
healing") or the docstring of agent.py it comes from. An invariant returns whether its premise
held (it "engaged") and fails with the case when it does not hold.

Each invariant runs over every combination of every input where the space allows it
(itertools, with the boundary values of every window: an age exactly at fence_timeout,
failover_timeout or restart_grace) and, for decide_db, whose inputs are too many for that, over
a fixed-seed hypothesis search of the whole DbObservation (every field drawn) as well as
exhaustive grids of the inputs each of its branches reads. An exhaustive sweep also checks that
each of its invariants engaged: an invariant whose premise never held proves nothing.

Each invariant was seen to fail on a deliberate breakage of agent.py (in a scratch copy);
tests/mutation.py measures how many breakages of the decision functions these tests catch."""
import dataclasses
import itertools
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import agent
from agent import DbObservation, View

T = agent.Timing(check_interval=0.2, probe_timeout=0.3, fence_timeout=1.0, safety_margin=0.3,
                 failover_timeout=2.0, restart_grace=6.0)
NOW = 1000.0
DB = ("pg1", "pg2")
ARB = "arb"
ACTIONS = {name[3:] for name in dir(agent.DbAgent) if name.startswith("do_")}
# hypothesis: a fixed sequence of examples (derandomize), the same in CI and everywhere
SWEEP = settings(max_examples=2000, derandomize=True, database=None, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])
SMALL = settings(SWEEP, max_examples=500)  # small input spaces, mostly covered exhaustively


def at(age):
    return None if age is None else NOW - age


def other(me):
    return "pg2" if me == "pg1" else "pg1"


PAUSE_STATES = ((False, False), (True, False), (False, True), (True, True))  # (paused, resuming)


def views(terms=(0, 1, 2), seqs=(0,), eligibles=(None, "pg1", "pg2"), pauses=((False, False),)):
    return [View(t, p, e, s, *pause) for t, p, e, s, pause
            in itertools.product(terms, DB, eligibles, seqs, pauses)]


class Case:
    """One decide_db call: who, what it saw, what it decided, and the ages it judged by."""

    def __init__(self, me, o, d):
        self.me, self.peer, self.o, self.d, self.view = me, other(me), o, d, o.view

    def age(self, moment):
        return self.o.now - (moment if moment is not None else self.o.started_at)

    @property
    def arbiter_fresh(self):
        return self.age(self.o.contact_at.get(ARB)) < T.fence_timeout

    @property
    def mine(self):  # the view names me primary
        return self.view.primary == self.me

    @property
    def port_open(self):  # what decide_db takes the kernel to say
        return (not self.o.fenced) if self.o.port_open is None else self.o.port_open

    def __repr__(self):
        return f"\n  me={self.me}\n  {self.o}\n  -> {self.d}"


def decide(me, o):
    return Case(me, o, agent.decide_db(me, other(me), ARB, o, T))


# -- decide_db: the database node's one decision ------------------------------------------------

def known_action(c):
    """Every decision is one the DbAgent can carry out (a do_<action> method) and says why
    (agent.py, "decisions": each returns a Decision whose reason is one sentence)."""
    assert c.d.action in ACTIONS and c.d.reason, c
    return True


def promote_only_on_a_view_naming_me(c):
    """Rule 1: S promotes only when A granted it the term: the view it holds names it primary,
    and its PostgreSQL runs as a standby."""
    if c.d.action != "promote":
        return False
    assert c.mine and c.o.pg == "standby", c
    return True


def role_changes_only_on_the_arbiters_view(c):
    """Rules 1 and 6: a promotion, a rewind or the start of a rewound node as a standby follows
    a view that the arbiter made (term > 0), never the local guess of an agent that has not
    heard from it (term 0, from the config). It was a known violation, found by this sweep and
    fixed."""
    if c.d.action not in ("promote", "rejoin", "finish_rejoin", "reclone"):
        return False
    assert c.view.term > 0, c
    return True


def request_promotion_only_when_the_rules_allow(c):
    """Rules 1, 2 and 3: S asks A for the next term only as the eligible standby (running, not
    the primary) that lost M for failover_timeout while A answers (age < fence_timeout)."""
    if c.d.action != "request_promotion":
        return False
    assert not c.mine and c.view.eligible == c.me and c.o.pg == "standby", c
    assert c.age(c.o.primary_alive_at) >= T.failover_timeout and c.arbiter_fresh, c
    return True


def standby_asks_once_the_rules_allow(c):
    """Rule 1, the other half: the eligible, running, unfenced standby that lost M for
    failover_timeout and reaches A asks it (else no failover ever happens) -- unless the cluster
    is paused."""
    if not (not c.mine and c.o.pg == "standby" and not c.o.fenced and not c.view.paused
            and c.view.eligible == c.me and c.age(c.o.primary_alive_at) >= T.failover_timeout
            and c.arbiter_fresh):
        return False
    assert c.d.action == "request_promotion", c
    return True


def primary_fences_exactly_when_it_lost_both_peers(c):
    """Rule 5: the unfenced running primary of the view fences itself when it has had no round
    trip with S nor with A for fence_timeout, and never while one of them answers (rule 7);
    while the cluster is paused it never fences on a timeout (README, "Pause and resume")."""
    if not (c.mine and c.o.pg == "primary" and not c.o.fenced):
        return False
    both_lost = (c.age(c.o.contact_at.get(c.peer)) >= T.fence_timeout
                 and not c.arbiter_fresh)
    assert (c.d.action == "fence") == (both_lost and not c.view.paused), c
    return True


def fence_only_a_lost_or_replaced_primary(c):
    """Rules 5 and 6: fence closes a primary's port only when it lost both peers (rule 5) or the
    view names another node (rule 6); no other case fences."""
    if c.d.action != "fence":
        return False
    assert c.o.pg == "primary", c
    if c.mine:
        assert not c.o.fenced and not c.arbiter_fresh and not c.view.paused, c
        assert c.age(c.o.contact_at.get(c.peer)) >= T.fence_timeout, c
    return True


def replaced_primary_takes_no_write(c):
    """Rule 6: a replaced M (running as primary, the view names the other node) whose port is
    open fences, whatever else it sees; with the port closed it stays fenced (none) or rewinds
    (rejoin), and never reopens nor promotes."""
    if not (c.o.pg == "primary" and not c.mine):
        return False
    if c.port_open:
        assert c.d.action == "fence", c
    else:
        assert c.d.action in ("none", "rejoin"), c
    return True


def unfence_only_a_standby_or_a_confirmed_primary(c):
    """Rule 6: unfence opens the port of a read-only standby (the view names the other node),
    or of the primary of a term > 0 view naming me on the arbiter's fresh word -- contact newer
    than confirm_after and younger than fence_timeout -- with no switchover asked and no
    handover left unsettled."""
    if c.d.action != "unfence":
        return False
    if not c.mine:
        assert c.o.pg == "standby", c
        return True
    arbiter = c.o.contact_at.get(ARB)
    assert c.o.pg == "primary" and c.o.fenced and c.view.term > 0, c
    assert not c.o.switchover_requested and not c.o.handover_unsettled, c
    assert arbiter is not None and c.arbiter_fresh, c
    assert c.o.confirm_after is None or arbiter > c.o.confirm_after, c
    return True


def fenced_primary_unfences_on_the_arbiters_word(c):
    """Rule 6, the other half: a fenced primary of a term > 0 view that has the arbiter's fresh
    word after confirm_after, no switchover and no unsettled handover, reopens."""
    arbiter = c.o.contact_at.get(ARB)
    if not (c.mine and c.o.pg == "primary" and c.o.fenced and c.view.term > 0
            and not c.o.switchover_requested and not c.o.handover_unsettled
            and arbiter is not None and c.arbiter_fresh
            and (c.o.confirm_after is None or arbiter > c.o.confirm_after)):
        return False
    assert c.d.action == "unfence", c
    return True


def resume_only_the_primary_after_restart_grace(c):
    """Rule 8: a primary whose PostgreSQL is down asks A to restart it (resume) only when the
    view (term > 0) still names it and it has been down for restart_grace, so that a failover
    gets the first chance."""
    if c.d.action != "resume":
        return False
    assert c.mine and c.o.pg == "down" and c.view.term > 0, c
    assert c.age(c.o.pg_down_since) >= T.restart_grace, c
    return True


def primary_down_resumes_after_restart_grace(c):
    """Rule 8, the other half: the view's primary (term > 0) down for restart_grace asks."""
    if not (c.mine and c.o.pg == "down" and c.view.term > 0
            and c.age(c.o.pg_down_since) >= T.restart_grace):
        return False
    assert c.d.action == "resume", c
    return True


def rejoin_only_a_replaced_node_onto_a_live_primary(c):
    """Healing, "Rejoin": only a replaced node -- PostgreSQL running as primary behind a closed
    port, or down without standby.signal -- rewinds, and only onto a primary seen within
    fence_timeout."""
    if c.d.action != "rejoin":
        return False
    assert not c.mine, c
    assert ((c.o.pg == "primary" and not c.port_open)
            or (c.o.pg == "down" and not c.o.has_standby_signal)), c
    assert c.age(c.o.primary_alive_at) < T.fence_timeout, c
    return True


def reclone_only_after_an_unfinished_rewind_onto_a_live_primary(c):
    """Healing, "Rejoin", and DbAgent.do_reclone: a node moves its data aside only when the
    view names the other node, its PostgreSQL is down without standby.signal, a pg_rewind of
    it began and did not finish (pg_control does not say it ran to its end), and the primary
    was seen within fence_timeout (so that the clone can follow)."""
    if c.d.action != "reclone":
        return False
    assert not c.mine, c
    assert c.o.pg == "down" and not c.o.has_standby_signal, c
    assert c.o.rewind_unfinished and (not c.o.rewound or c.o.rewind_before_reboot), c
    assert c.age(c.o.primary_alive_at) < T.fence_timeout, c
    return True


def unfinished_rewind_is_never_rewound_again(c):
    """PostgreSQL's pg_rewind manual: a rewind that failed half-way leaves a directory no
    second rewind can repair. A down node with an unfinished rewind and no complete one never
    rewinds nor starts (a rejoin, a start as a standby); it keeps the data aside or waits. Nor
    does one whose host booted since the rewind began: pg_rewind fsyncs pg_control ("in
    archive recovery") before the rest, so a crash in between leaves "rewound" over lost
    files."""
    if not (c.o.pg == "down" and c.o.rewind_unfinished
            and (not c.o.rewound or c.o.rewind_before_reboot)
            and not c.o.has_standby_signal and not c.mine):
        return False
    assert c.d.action in ("reclone", "none"), c
    return True


def finish_rejoin_only_a_rewound_replaced_node_onto_a_live_primary(c):
    """Healing, "Rejoin", and DbAgent.do_finish_rejoin: a node starts a data directory without
    standby.signal as a standby only when the view names the other node, its PostgreSQL is
    down, pg_control says a rewind ran to its end, and the primary was seen within
    fence_timeout."""
    if c.d.action != "finish_rejoin":
        return False
    assert not c.mine, c
    assert c.o.pg == "down" and not c.o.has_standby_signal and c.o.rewound, c
    assert not c.o.rewind_before_reboot, c
    assert c.age(c.o.primary_alive_at) < T.fence_timeout, c
    return True


def rewound_node_finishes_its_rejoin(c):
    """Healing, "Rejoin", the other half (found by the simulator): a replaced node that is down
    with a complete rewind and no standby.signal, on a view of the arbiter's (term > 0), with
    the primary seen within fence_timeout, starts as a standby -- never rewinds again, whose
    timeline check would wait forever (pg_control has the new primary's timeline)."""
    if not (not c.mine and c.view.term > 0 and c.o.pg == "down" and not c.o.has_standby_signal
            and c.o.rewound and not c.o.rewind_before_reboot
            and c.age(c.o.primary_alive_at) < T.fence_timeout):
        return False
    assert c.d.action == "finish_rejoin", c
    return True


def start_standby_only_with_standby_signal(c):
    """Rule 8: a node whose PostgreSQL is down starts it itself only as a standby (its data
    directory has standby.signal) of a view naming the other node."""
    if c.d.action != "start_standby":
        return False
    assert c.o.pg == "down" and c.o.has_standby_signal and not c.mine, c
    return True


def sync_names_go_to_no_one_only_through_drop_standby(c):
    """Healing, "Standby lost" (and desired_sync_names): writes stop waiting for the standby
    (synchronous_standby_names '') only through drop_standby, on the arbiter's durable word;
    set_sync changes the names to someone, never to '', and while a standby is eligible only
    to it. Only these two actions carry sync_names."""
    carries = c.d.action in ("set_sync", "drop_standby")
    assert (c.d.sync_names is not None) == carries, c
    if not carries:
        return False
    assert c.mine and c.o.pg == "primary" and not c.o.fenced, c
    if c.d.action == "drop_standby":
        assert c.d.sync_names == "", c
    else:
        assert c.o.sync_names is not None, c  # the current setting is known
        assert c.d.sync_names not in ("", c.o.sync_names), c
        assert c.view.eligible in (None, c.d.sync_names), c
    return True


def strict_sync_never_drops(c):
    """Healing, "Standby lost": with strict_sync the primary never stops waiting for its
    standby."""
    if not c.o.strict_sync:
        return False
    assert c.d.action != "drop_standby", c
    return True


def drop_standby_only_with_a_fresh_arbiter(c):
    """Healing, "Standby lost": the primary asks A to mark its standby not in sync only while
    A answers (the drop must be durable at A before writes stop waiting)."""
    if c.d.action != "drop_standby":
        return False
    assert c.arbiter_fresh, c
    return True


def drop_standby_only_when_writes_wait(c):
    """Healing, "Standby lost": the primary asks A to drop a standby only when writes wait for
    one -- the view names it eligible, or synchronous_standby_names names someone -- never
    over and over for nothing."""
    if c.d.action != "drop_standby":
        return False
    assert c.view.eligible == c.peer or c.o.sync_names not in (None, ""), c
    return True


def wait_for_a_returning_standby_only_once_it_streams(c):
    """Healing, "Standby back": while no standby is eligible (and without strict_sync), the
    primary starts waiting for the standby only once it streams (walsender `streaming`, not
    `catchup`) and has replied within failover_timeout: writes never stall on a standby that
    is still catching up or silent."""
    if not (c.d.action == "set_sync" and c.view.eligible is None and not c.o.strict_sync):
        return False
    assert c.o.standby_streaming and c.age(c.o.standby_seen_at) < T.failover_timeout, c
    return True


def silent_eligible_standby_is_dropped_when_allowed(c):
    """Healing, "Standby lost", the other half: the unfenced primary, not asked to switch over,
    reaching A, whose eligible standby has not replied for failover_timeout, asks A to drop
    it -- unless strict_sync, or the cluster is paused."""
    if not (c.mine and c.o.pg == "primary" and not c.o.fenced and not c.view.paused
            and not c.o.switchover_requested and c.view.eligible == c.peer
            and c.age(c.o.standby_seen_at) >= T.failover_timeout and c.arbiter_fresh):
        return False
    assert c.d.action == ("none" if c.o.strict_sync else "drop_standby"), c
    return True


def handover_only_to_an_eligible_standby_with_the_arbiter(c):
    """Healing, "Planned switchover": the primary hands over only when asked to, unfenced, to
    the eligible standby, while A answers; it refuses only when asked to."""
    if c.d.action == "refuse_switchover":
        assert c.o.switchover_requested and c.mine, c
        return True
    if c.d.action != "handover":
        return False
    assert c.o.switchover_requested and c.mine and c.o.pg == "primary" and not c.o.fenced, c
    assert c.view.eligible == c.peer and c.arbiter_fresh, c
    return True


def mark_eligible_only_a_synced_standby(c):
    """Healing, "Standby back": the primary asks A to make its standby eligible only when none
    is, the standby is the sync standby with every acknowledged commit, and A answers."""
    if c.d.action != "mark_eligible":
        return False
    assert c.mine and c.o.pg == "primary" and not c.o.fenced, c
    assert c.view.eligible is None and c.o.standby_synced and c.arbiter_fresh, c
    return True


def settle_only_an_unsettled_handover(c):
    """decide_settle's docstring (review finding 4): a fenced primary whose handover request got
    no answer asks A to settle it before anything else, and only then."""
    if c.d.action != "settle_handover":
        return False
    assert c.mine and c.o.pg == "primary" and c.o.fenced and c.o.handover_unsettled, c
    return True


def paused_no_promotion_no_handover_no_sync_change(c):
    """README, "Pause and resume": while the view says paused no standby asks to be promoted,
    the primary hands nothing over (it refuses a switchover, or holds if it lost both peers)
    and changes synchronous replication on its own in no way (no drop_standby, mark_eligible,
    set_sync)."""
    if not c.view.paused:
        return False
    assert c.d.action not in ("request_promotion", "handover", "drop_standby",
                              "mark_eligible", "set_sync"), c
    if c.mine and c.o.pg == "primary" and not c.o.fenced and c.o.switchover_requested:
        both_lost = (c.age(c.o.contact_at.get(c.peer)) >= T.fence_timeout
                     and not c.arbiter_fresh)  # then it holds its port open, says none
        assert c.d.action == ("none" if both_lost else "refuse_switchover"), c
    return True


def paused_reasons_say_so(c):
    """README, "Pause and resume": while paused every decision's reason starts with PAUSED,
    and only then."""
    assert c.d.reason.startswith(agent.PAUSED + ": ") == c.view.paused, c
    return c.view.paused


DB_INVARIANTS = [
    known_action, promote_only_on_a_view_naming_me, request_promotion_only_when_the_rules_allow,
    standby_asks_once_the_rules_allow, primary_fences_exactly_when_it_lost_both_peers,
    fence_only_a_lost_or_replaced_primary, replaced_primary_takes_no_write,
    unfence_only_a_standby_or_a_confirmed_primary, fenced_primary_unfences_on_the_arbiters_word,
    resume_only_the_primary_after_restart_grace, primary_down_resumes_after_restart_grace,
    rejoin_only_a_replaced_node_onto_a_live_primary,
    finish_rejoin_only_a_rewound_replaced_node_onto_a_live_primary,
    reclone_only_after_an_unfinished_rewind_onto_a_live_primary,
    unfinished_rewind_is_never_rewound_again, rewound_node_finishes_its_rejoin,
    start_standby_only_with_standby_signal,
    sync_names_go_to_no_one_only_through_drop_standby, strict_sync_never_drops,
    drop_standby_only_with_a_fresh_arbiter, drop_standby_only_when_writes_wait,
    wait_for_a_returning_standby_only_once_it_streams,
    silent_eligible_standby_is_dropped_when_allowed,
    handover_only_to_an_eligible_standby_with_the_arbiter, mark_eligible_only_a_synced_standby,
    settle_only_an_unsettled_handover, role_changes_only_on_the_arbiters_view,
    paused_no_promotion_no_handover_no_sync_change, paused_reasons_say_so,
]


# -- the arbiter's decisions ----------------------------------------------------------------------

ARB_VIEWS = views(terms=(0, 1, 2), seqs=(0, 1), pauses=PAUSE_STATES)
SEEN = (None, NOW - 0.1, NOW - 1.0, NOW - 1.9, NOW - 2.0, NOW - 10)


# the arbiter's timing for decide_grant: the defaults but safety_margin 0.25 (promote_window
# about 0.726 s: news 0.72 s old is in time, 0.73 s old too old)
GRANT_T = dataclasses.replace(T, safety_margin=0.25)


def clock_allowance(t):
    """README, "The timing inequality": the lease runs on M's kernel timers and the failover
    on S's and A's clocks, each up to 1000 ppm off real time, and two kernel timeouts (the
    lease's, the armed window's) may each end a jiffy (10 ms at HZ=100) late."""
    return 2 * 1e-3 * t.failover_timeout + 0.02


def promote_window(t):
    """check_timing's and decide_grant's docstrings: the news on which a standby asks to be
    promoted may be this old -- within it, the primary's lease had lapsed before it decided,
    on the hosts' clocks too."""
    return t.failover_timeout - t.fence_timeout - t.safety_margin - clock_allowance(t)
NEWS = (None, NOW - 0.1, NOW - 0.72, NOW - 0.73, NOW - 3.0)  # the standby's news from the arbiter


def grant_creates_one_term_for_the_eligible_candidate(view, candidate, term, seen, started,
                                                      news, granted, new):
    """Rules 1 and 4, and decide_grant's docstring: a new view from a promotion request is
    exactly the next term, with the candidate as primary and no eligible standby yet, for the
    eligible standby asking about the current term on news from A no older than promote_window
    (a request held in the network, replayed or queued is refused), when A itself has seen no
    sign of the primary for failover_timeout, and never while the cluster is paused or resuming
    (README, "Pause and resume"). A grant without a new view only re-answers the candidate that
    already is the primary (a lost reply); a refusal changes nothing."""
    if new == view:
        if granted:
            assert candidate == view.primary
        return False
    assert granted and new == View(view.term + 1, candidate, None, view.seq + 1)
    assert view.eligible == candidate and term == view.term and candidate != view.primary
    assert not view.paused and not view.resuming  # README, "Pause and resume"
    assert news is not None and NOW - news <= promote_window(GRANT_T)
    assert NOW - (seen if seen is not None else started) >= GRANT_T.failover_timeout
    return True


def grant_once_the_rules_allow(view, candidate, term, seen, started, news, granted, new):
    """Rule 1, the other half: the eligible standby asking about the current term on fresh news,
    once A lost the primary for failover_timeout, is granted; the primary asking again is
    answered yes."""
    if candidate == view.primary:
        assert granted and new == view
        return True
    if not (view.eligible == candidate and term == view.term and news is not None
            and not view.paused and not view.resuming
            and NOW - news <= promote_window(GRANT_T)
            and NOW - (seen if seen is not None else started) >= GRANT_T.failover_timeout):
        return False
    assert granted and new.term == view.term + 1
    return True


def test_decide_grant_over_every_combination():
    engaged = Counter()
    for view, candidate, term, seen, started, news in itertools.product(
            ARB_VIEWS, DB, (0, 1, 2, 3), SEEN, (NOW - 100, NOW - 0.5, NOW - 2.0), NEWS):
        granted, new, reason = agent.decide_grant(view, candidate, term, seen, NOW, started,
                                                  GRANT_T, news)
        assert reason
        for inv in (grant_creates_one_term_for_the_eligible_candidate,
                    grant_once_the_rules_allow):
            engaged[inv.__name__] += inv(view, candidate, term, seen, started, news, granted,
                                         new)
    assert len(engaged) == 2 and all(engaged.values()), engaged
    assert agent.promote_window(GRANT_T) == promote_window(GRANT_T)
    assert round(promote_window(GRANT_T), 9) == 0.726
    assert agent.clock_allowance(GRANT_T) == clock_allowance(GRANT_T)
    # news_at is required: without it no new term
    assert agent.decide_grant(View(1, "pg1", "pg2"), "pg2", 1, None, NOW, NOW - 100,
                              GRANT_T)[1] == View(1, "pg1", "pg2")


def resume_only_for_the_current_primary(view, requester, term, granted):
    """Rule 8: A lets a primary restart its PostgreSQL as primary exactly when it still is the
    primary of the current term (no failover happened meanwhile)."""
    assert granted == (requester == view.primary and term == view.term)
    return granted


def test_decide_resume_over_every_combination():
    results = []
    for view, requester, term in itertools.product(ARB_VIEWS, DB, (0, 1, 2, 3)):
        granted, reason = agent.decide_resume(view, requester, term)
        assert reason
        results.append(resume_only_for_the_current_primary(view, requester, term, granted))
    assert any(results) and not all(results)


def eligibility_only_from_the_primary_on_the_current_view(view, requester, term, seq, standby,
                                                          eligible, granted, new):
    """Healing, "Standby lost"/"Standby back", and decide_eligibility's docstring: only the
    primary of the current term, on the current view (term, seq), about the other node, says
    who is eligible; the answer is the view with exactly that change (and the next seq), or
    the same view if nothing changes; a stale or foreign request changes nothing. The current
    primary's current request is always answered."""
    current = requester == view.primary and term == view.term and seq == view.seq
    if not (current and standby != view.primary):
        assert not granted and new == view
        return False
    wanted = standby if eligible else None
    assert granted
    assert new == (view if view.eligible == wanted else view.changed(eligible=wanted))
    return True


def test_decide_eligibility_over_every_combination():
    results = []
    for view, requester, term, seq, standby, eligible in itertools.product(
            ARB_VIEWS, DB, (0, 1, 2, 3), (0, 1, 2), DB, (False, True)):
        granted, new, reason = agent.decide_eligibility(view, requester, term, seq, standby,
                                                        eligible)
        assert reason
        results.append(eligibility_only_from_the_primary_on_the_current_view(
            view, requester, term, seq, standby, eligible, granted, new))
    assert any(results) and not all(results)


def handover_only_to_the_eligible_standby_the_arbiter_sees(view, requester, term, seq, target,
                                                           seen, granted, new):
    """Healing, "Planned switchover", and decide_handover's docstring: the current primary, on
    the current view (term, seq), hands the next term to the eligible standby that A heard
    within fence_timeout, never while the cluster is paused or resuming (README, "Pause and
    resume"), and nothing else does; the answer is exactly the next term with the target as
    primary and no eligible standby."""
    allowed = (requester == view.primary and term == view.term and seq == view.seq
               and not view.paused and not view.resuming
               and view.eligible == target and seen is not None
               and NOW - seen < T.fence_timeout)
    assert granted == allowed
    assert new == (View(view.term + 1, target, None, view.seq + 1) if allowed else view)
    return allowed


def test_decide_handover_over_every_combination():
    results = []
    for view, requester, term, seq, target, seen in itertools.product(
            ARB_VIEWS, DB, (0, 1, 2, 3), (0, 1, 2), DB, SEEN):
        granted, new, reason = agent.decide_handover(view, requester, term, seq, target, seen,
                                                     NOW, T)
        assert reason
        results.append(handover_only_to_the_eligible_standby_the_arbiter_sees(
            view, requester, term, seq, target, seen, granted, new))
    assert any(results) and not all(results)


def settle_bumps_seq_only_for_the_primary_of_the_term(view, requester, term, granted, new):
    """decide_settle's docstring (review finding 4): for the primary of the current term, the
    same view with the next seq (any late handover request becomes stale); for anyone else,
    nothing changes."""
    allowed = requester == view.primary and term == view.term
    assert granted == allowed
    assert new == (dataclasses.replace(view, seq=view.seq + 1) if allowed else view)
    return allowed


def test_decide_settle_over_every_combination():
    results = []
    for view, requester, term in itertools.product(ARB_VIEWS, DB, (0, 1, 2, 3)):
        granted, new, reason = agent.decide_settle(view, requester, term)
        assert reason
        results.append(settle_bumps_seq_only_for_the_primary_of_the_term(view, requester, term,
                                                                          granted, new))
    assert any(results) and not all(results)


def pause_only_on_the_current_view(view, term, seq, paused, granted, new):
    """README, "Pause and resume", and decide_pause's docstring: a pause or a resume based on
    an older view (term, seq) is refused and changes nothing; a pause makes the next view paused
    (and not resuming); a resume makes the next view not paused but resuming, until the primary
    has its port under a timed lease again; asking for what already holds changes nothing."""
    if (term, seq) != (view.term, view.seq):
        assert not granted and new == view
        return False
    assert granted
    if paused:
        assert new == (view if view.paused else view.changed(paused=True, resuming=False))
    else:
        assert new == (view.changed(paused=False, resuming=True) if view.paused else view)
    return new != view


def test_decide_pause_over_every_combination():
    results = []
    for view, term, seq, paused in itertools.product(ARB_VIEWS, (0, 1, 2, 3), (0, 1, 2),
                                                     (False, True)):
        granted, new, reason = agent.decide_pause(view, term, seq, paused)
        assert reason
        results.append(pause_only_on_the_current_view(view, term, seq, paused, granted, new))
    assert any(results) and not all(results)


def resuming_ends_only_on_the_primarys_timed_lease(view, sender, reported, lease_mode, new):
    """decide_resume_ack's docstring (README, "Pause and resume"): a resumed cluster stays
    `resuming` (no promotion, no handover) until its primary, reporting the very view the
    arbiter holds, says its lease is timed again ("primary") or closed; then the next view
    is the same but not resuming. Nothing else ends it, and nothing else changes."""
    ends = (view.resuming and not view.paused and sender == view.primary
            and isinstance(reported, dict)
            and (reported.get("term"), reported.get("seq")) == (view.term, view.seq)
            and lease_mode in ("primary", "closed"))
    assert new == (view.changed(resuming=False) if ends else None)
    return ends


def test_decide_resume_ack_over_every_combination():
    results = []
    for view, sender, reported, lease_mode in itertools.product(
            ARB_VIEWS, DB, (None, "x", {"term": 1, "seq": 0}, {"term": 1, "seq": 1},
                            {"term": 2, "seq": 1}, {"seq": 0}),
            ("primary", "closed", "paused", "busy", "standby")):
        new = agent.decide_resume_ack(view, sender, reported, lease_mode)
        results.append(resuming_ends_only_on_the_primarys_timed_lease(view, sender, reported,
                                                                      lease_mode, new))
    assert any(results) and not all(results)


def views_only_move_forward(current, offered, taken):
    """Rule 8 and newer_view's docstring: an agent takes an offered view only when it is newer
    by (term, seq); otherwise it keeps its own."""
    newer = (offered.term, offered.seq) > (current.term, current.seq)
    assert taken is (offered if newer else current)
    return newer


def test_newer_view_over_every_pair():
    some = views(terms=(0, 1, 2), seqs=(0, 1, 2), eligibles=(None, "pg2"))
    results = [views_only_move_forward(a, b, agent.newer_view(a, b))
               for a, b in itertools.product(some, some)]
    assert any(results) and not all(results)


def bootstrap_never_touches_existing_data(me, data_exists, view, action):
    """Rule 8 and bootstrap_action's docstring: existing data is adopted, never re-initialised or
    re-cloned; without data a node waits for the arbiter's view (term 0), the first primary
    (term 1) runs initdb, a later primary refuses, a standby clones the primary."""
    if data_exists:
        expected = "adopt"
    elif view.term == 0:
        expected = "wait"
    elif view.primary != me:
        expected = "basebackup"
    else:
        expected = "initdb" if view.term == 1 else "refuse"
    assert action == expected
    return True


def test_bootstrap_action_over_every_combination():
    for me, data_exists, view in itertools.product(DB, (False, True), views(terms=(0, 1, 2, 3))):
        d = agent.bootstrap_action(me, data_exists, view)
        assert d.reason
        bootstrap_never_touches_existing_data(me, data_exists, view, d.action)


def primary_waits_for_the_eligible_standby(view, streaming, other_node, strict, wanted):
    """desired_sync_names' docstring, healing "Standby lost"/"Standby back": the primary waits
    for the eligible standby; with strict_sync, for the other node always; else for a standby
    that streams again; and for no one ('') only when none of these holds."""
    if view.eligible:
        expected = view.eligible
    elif other_node and (strict or streaming):
        expected = other_node
    else:
        expected = ""
    assert wanted == expected
    return wanted == ""


def test_desired_sync_names_over_every_combination():
    results = []
    for view, streaming, other_node, strict in itertools.product(
            views(), (False, True), (None, "pg1", "pg2"), (False, True)):
        wanted = agent.desired_sync_names(view, streaming, other_node, strict)
        results.append(primary_waits_for_the_eligible_standby(view, streaming, other_node,
                                                              strict, wanted))
        if not streaming:  # the agent's calls (pg_settings, wanted_sync_names) use defaults
            assert agent.desired_sync_names(view, other=other_node, strict=strict) == wanted
            if not strict:
                assert agent.desired_sync_names(view, other=other_node) == wanted
    assert any(results) and not all(results)


def test_the_arbiters_history_never_gives_a_term_twice():
    """Rule 1 and View's docstring, over every sequence of two requests (promote, handover,
    eligibility, settle, pause and resume) from two views: each new view has a higher (term,
    seq) than the one before, a term once given to a primary is never given to another, and
    no term is made while the cluster is paused or resuming."""
    requests = [("promote", c, t) for c in DB for t in (1, 2)]
    requests += [("handover", c, t, s, target) for c in DB for t in (1, 2) for s in (0, 1, 2)
                 for target in DB]
    requests += [("eligibility", c, t, s, standby, e) for c in DB for t in (1, 2)
                 for s in (0, 1, 2) for standby in DB for e in (False, True)]
    requests += [("settle", c, t) for c in DB for t in (1, 2)]
    requests += [("pause", t, s, p) for t in (1, 2) for s in (0, 1, 2) for p in (False, True)]
    apply = {
        "promote": lambda v, c, t: agent.decide_grant(v, c, t, None, NOW, NOW - 100, T, NOW)[1],
        "handover": lambda v, c, t, s, to: agent.decide_handover(v, c, t, s, to, NOW, NOW, T)[1],
        "eligibility": lambda v, *a: agent.decide_eligibility(v, *a)[1],
        "settle": lambda v, c, t: agent.decide_settle(v, c, t)[1],
        "pause": lambda v, *a: agent.decide_pause(v, *a)[1],
    }
    for start in (View(1, "pg1", "pg2"), View(1, "pg1", None), View(1, "pg1", "pg2", 1, True)):
        for steps in itertools.product(requests, repeat=2):
            view, given_to = start, {start.term: start.primary}
            for kind, *args in steps:
                new = apply[kind](view, *args)
                if new != view:
                    assert (new.term, new.seq) > (view.term, view.seq), (view, new)
                    assert given_to.setdefault(new.term, new.primary) == new.primary
                    if new.term > view.term:  # never while paused or resuming
                        assert not view.paused and not view.resuming, (view, new)
                view = new


# -- the primary's lease, the standby's replies, the timing -------------------------------------

def lease_never_revives_nor_shrinks(held_until, anchor, now, opening, until):
    """Rule 5, lease_extension's docstring (review finding 3): a lease that lapsed (or was never
    held) is not extended; a held one never shrinks and is extended only to anchor +
    fence_timeout, the latest moment a peer provably heard this node as primary; a new one is
    opened (unfence, opening) only to anchor + fence_timeout, and only if that is still ahead."""
    if opening:
        bound = None if anchor is None else anchor + T.fence_timeout
        assert until == (bound if bound is not None and bound > now else None)
        return until is not None
    if held_until is None or now >= held_until:
        assert until is None
        return False
    assert until is not None and until >= held_until
    assert until == held_until or (anchor is not None and until == anchor + T.fence_timeout)
    assert anchor is None or until >= anchor + T.fence_timeout
    return until > held_until


MOMENTS = (None, NOW - 2.0, NOW - 1.0, NOW - 0.5, NOW - 0.1, NOW, NOW + 0.1, NOW + 0.5, NOW + 1)


def test_lease_extension_over_every_combination():
    results = []
    for held, anchor, opening in itertools.product(MOMENTS, MOMENTS, (False, True)):
        until = agent.lease_extension(held, anchor, NOW, T, opening)
        results.append(lease_never_revives_nor_shrinks(held, anchor, NOW, opening, until))
        if not opening:  # extending is the default
            assert agent.lease_extension(held, anchor, NOW, T) == until
    assert any(results) and not all(results)


def standby_seen_only_when_its_reply_time_changes(prev_reply, prev_seen, reply, now, result):
    """Healing "Standby lost" and standby_heard's docstring (review finding 7): the primary
    hears its standby (seen_at moves to now) exactly when the walreceiver's reply_time changes;
    a repeated or missing reply_time changes nothing, whatever the standby's clock says."""
    if reply is not None and reply != prev_reply:
        assert result == (reply, now)
        return True
    assert result == (prev_reply, prev_seen)
    return False


def test_standby_heard_over_every_combination():
    results = []
    replies = (None, 1.7e9, 1.7e9 + 1, NOW, NOW + 5)
    for prev_reply, prev_seen, reply in itertools.product(replies, MOMENTS, replies):
        results.append(standby_seen_only_when_its_reply_time_changes(
            prev_reply, prev_seen, reply, NOW, agent.standby_heard(prev_reply, prev_seen, reply,
                                                                   NOW)))
    assert any(results) and not all(results)


def timing_accepted_only_if_the_fence_closes_before_a_grant(t, refusal):
    """Rule 5 and check_timing's docstring: a config is accepted exactly when fence_timeout +
    safety_margin + clock_allowance < failover_timeout (the isolated primary's port closes
    before any grant, on the hosts' clocks too; a difference under 1e-9 s counts as equal),
    probe_timeout < fence_timeout and check_interval + probe_timeout < fence_timeout (one slow
    probe never fences, a healthy lease never lapses between heartbeats), promote_window =
    failover_timeout - fence_timeout - safety_margin - clock_allowance > check_interval +
    probe_timeout (a standby's promotion request, judged on news from the arbiter at most that
    old, can be on time: decide_grant), and restart_grace > failover_timeout (a failover gets
    the first chance). A refusal names the first key that breaks them (README, "agent.py": a
    bad config names the file, the section and the key)."""
    broken = [key for key, holds in (
        ("failover_timeout", t.fence_timeout + t.safety_margin + clock_allowance(t)
         < t.failover_timeout - 1e-9),
        ("probe_timeout", t.probe_timeout < t.fence_timeout),
        ("check_interval", t.check_interval + t.probe_timeout < t.fence_timeout),
        ("failover_timeout", promote_window(t) > t.check_interval + t.probe_timeout),
        ("restart_grace", t.restart_grace > t.failover_timeout)) if not holds]
    if broken:
        assert refusal is not None and f"[timing] {broken[0]}:" in refusal, (t, refusal)
    else:
        assert refusal is None, (t, refusal)
    return not broken


def refusal(t):
    try:
        agent.check_timing("agent.ini", t)
    except agent.ConfigError as exc:
        return str(exc)
    return None


def test_check_timing_over_a_grid():
    results = []
    for values in itertools.product((0.2, 0.25, 0.7), (0.25, 0.3, 1.0), (1.0,),
                                    (0.25, 0.3, 0.7, 0.999999999),
                                    (1.2, 1.27, 1.28, 1.3, 1.7, 1.72, 1.73, 1.75, 2.0),
                                    (1.3, 6.0)):
        t = agent.Timing(*values)
        results.append(timing_accepted_only_if_the_fence_closes_before_a_grant(t, refusal(t)))
    assert any(results) and not all(results)


# -- decide_db over every input (last: the slowest sweeps) -----------------------------------

TERM1 = View(1, "pg1", "pg2")


def obs(me, pg="standby", view=TERM1, fenced=False, peer=0.1, arbiter=0.1,
        primary=0.1, down=None, signal=True, started=100.0, sync=None, seen=0.1,
        streaming=True, synced=True, switchover=False, strict=False, confirm_after=None,
        port_open=None, unsettled=False, rewound=False, unfinished=False, rebooted=False):
    """A DbObservation at NOW from ages (seconds before NOW; None: never)."""
    contact = {k: at(a) for k, a in ((other(me), peer), (ARB, arbiter)) if a is not None}
    return DbObservation(
        now=NOW, started_at=NOW - started, pg=pg, pg_down_since=at(down),
        has_standby_signal=signal, fenced=fenced, view=view, contact_at=contact,
        primary_alive_at=at(primary), sync_names=sync, standby_seen_at=at(seen),
        standby_streaming=streaming, standby_synced=synced, switchover_requested=switchover,
        strict_sync=strict, confirm_after=confirm_after, port_open=port_open,
        handover_unsettled=unsettled, rewound=rewound, rewind_unfinished=unfinished,
        rewind_before_reboot=rebooted)


# (rewound, rewind_unfinished, rewind_before_reboot): a boot since the rewind needs its mark
REWIND_STATES = [(r, u, b) for r, u, b in itertools.product((False, True), repeat=3)
                 if u or not b]
STARTED = (100.0, 0.5)  # an agent long up, or one just started (never heard: 0.5 s ago)
CONFIRM = (None, NOW - 50, NOW - 1.0, NOW - 0.1, NOW)  # before, at, between, after contact


def db_cases():
    """Exhaustive grids, one per branch of decide_db, each over the inputs that branch reads,
    at every window's boundaries (the hypothesis sweep below draws all inputs at once)."""
    for me in DB:
        mine = [v for v in views() if v.primary == me]
        theirs = [v for v in views() if v.primary != me]
        # a standby, a replaced primary, a node whose PostgreSQL is down: the view names the peer
        # (rewound and rewind_unfinished are observed only when PostgreSQL is down: the grid
        # draws them everywhere)
        for view, pg, fenced, port, signal, (rewound, unfinished, rebooted), primary, arbiter, \
                started in itertools.product(theirs, ("primary", "standby", "down"),
                                             (False, True), (None, False, True), (False, True),
                                             REWIND_STATES,
                                     (0.1, 0.5, 1.0, 1.5, 2.0, None), (0.1, 1.0, None),
                                     STARTED):
            yield me, obs(me, pg, view, fenced, primary=primary, arbiter=arbiter,
                          signal=signal, started=started, port_open=port, rewound=rewound,
                          unfinished=unfinished, rebooted=rebooted,
                          sync="" if pg == "primary" else None)
        # the view names me, PostgreSQL not running as a primary
        for view, pg, fenced, signal, down, started in itertools.product(
                mine, ("standby", "down"), (False, True), (False, True),
                (None, 1.0, 5.0, 6.0, 10.0), STARTED):
            yield me, obs(me, pg, view, fenced, signal=signal, down=down, started=started)
        # the fenced primary
        for view, unsettled, switchover, arbiter, confirm, peer, started in itertools.product(
                mine, (False, True), (False, True), (0.1, 1.0, None), CONFIRM, (0.1, None),
                STARTED):
            yield me, obs(me, "primary", view, True, peer=peer, arbiter=arbiter,
                          started=started, confirm_after=confirm, unsettled=unsettled,
                          switchover=switchover, sync=other(me), signal=False)
        # a paused cluster: the standby that would ask, the unfenced primary that would fence,
        # hand over or change sync (the other branches read no `paused`: hypothesis draws it)
        for view, fenced, primary, arbiter in itertools.product(
                views(terms=(1, 2), pauses=((True, False),)), (False, True),
                (0.1, 2.0, None), (0.1, 1.0, None)):
            if view.primary != me:
                yield me, obs(me, "standby", view, fenced, primary=primary, arbiter=arbiter)
        for (view, peer, arbiter, switchover, seen, strict, synced, streaming,
             sync) in itertools.product(
                [v for v in views(terms=(1,), pauses=((True, False),)) if v.primary == me],
                (0.1, 1.0, None), (0.1, 1.0, None), (False, True), (0.1, 2.0, None),
                (False, True), (False, True), (False, True), (None, "", "pg1", "pg2")):
            yield me, obs(me, "primary", view, False, peer=peer, arbiter=arbiter, seen=seen,
                          switchover=switchover, strict=strict, synced=synced,
                          streaming=streaming, sync=sync, signal=False)
        # the unfenced primary
        for (view, peer, arbiter, switchover, seen, strict, synced, streaming, sync,
             started) in itertools.product(
                [v for v in mine if v.term < 2], (0.1, 1.0, None), (0.1, 1.0, None),
                (False, True), (0.1, 2.0, None), (False, True), (False, True), (False, True),
                (None, "", "pg1", "pg2"), STARTED):
            yield me, obs(me, "primary", view, False, peer=peer, arbiter=arbiter, seen=seen,
                          started=started, switchover=switchover, strict=strict,
                          synced=synced, streaming=streaming, sync=sync, signal=False)


def check_all(invariants, cases, require_engaged=True):
    engaged = Counter()
    count = 0
    for me, o in cases:
        c = decide(me, o)
        count += 1
        for inv in invariants:
            try:
                engaged[inv.__name__] += inv(c)
            except AssertionError as exc:
                raise AssertionError(f"{inv.__name__}: {exc}") from None
    if require_engaged:
        idle = [inv.__name__ for inv in invariants if not engaged[inv.__name__]]
        assert not idle, f"invariants never engaged over {count} cases: {idle}"
    return count


def test_decide_db_invariants_over_every_boundary_combination():
    check_all(DB_INVARIANTS, db_cases())


# every age at, just under and just over each window (fence_timeout 1, failover_timeout 2,
# restart_grace 6), in between, far beyond; None: never
ANY_AGE = (None, 0.0, 0.1, 0.5, 0.99, 1.0, 1.01, 1.5, 1.99, 2.0, 2.01, 5.0, 5.99, 6.0, 6.01, 10.0,
           100.0, 1000.0)
moments = st.sampled_from([at(a) for a in ANY_AGE])
names = st.sampled_from(DB)
flags = st.booleans()


@st.composite
def db_observations(draw):
    """Every input of decide_db drawn at once: who I am, every field of DbObservation (contact
    with either peer may be missing), the view's term, primary, eligible standby, seq, paused
    and resuming."""
    me = draw(names)
    contact = {p: draw(moments) for p in (other(me), ARB)}
    view = View(draw(st.sampled_from((0, 1, 2, 3))), draw(names),
                draw(st.sampled_from((None, "pg1", "pg2"))), draw(st.sampled_from((0, 1, 5))),
                draw(flags), draw(flags))
    return me, DbObservation(
        now=NOW, started_at=NOW - draw(st.sampled_from((0.0, 0.5, 1.0, 2.0, 100.0))),
        pg=draw(st.sampled_from(("primary", "standby", "down"))), pg_down_since=draw(moments),
        has_standby_signal=draw(flags), fenced=draw(flags), view=view,
        contact_at={p: moment for p, moment in contact.items() if moment is not None},
        primary_alive_at=draw(moments),
        sync_names=draw(st.sampled_from((None, "", "pg1", "pg2"))),
        standby_seen_at=draw(moments), standby_streaming=draw(flags),
        standby_synced=draw(flags), switchover_requested=draw(flags), strict_sync=draw(flags),
        confirm_after=draw(moments), port_open=draw(st.sampled_from((None, False, True))),
        handover_unsettled=draw(flags), rewound=draw(flags), rewind_unfinished=draw(flags),
        rewind_before_reboot=draw(flags))


@SMALL
@given(st.one_of(st.none(), st.floats(990, 1010)), st.one_of(st.none(), st.floats(990, 1010)),
       st.floats(990, 1010), st.booleans())
def test_lease_extension_over_any_moments(held, anchor, now, opening):
    lease_never_revives_nor_shrinks(held, anchor, now, opening,
                                    agent.lease_extension(held, anchor, now, T, opening))


@SMALL
@given(st.lists(st.one_of(st.none(), st.integers(0, 3)), max_size=30),
       st.floats(-1e6, 1e6, allow_nan=False))
def test_standby_heard_is_blind_to_the_standbys_clock(replies, offset):
    """The same replies from a standby whose clock is `offset` s off: the same seen_at."""
    state_a = state_b = (None, None)
    for tick, reply in enumerate(replies):
        now = NOW + tick * 0.2
        state_a = agent.standby_heard(*state_a, reply, now)
        before = state_b
        state_b = agent.standby_heard(*state_b, None if reply is None else reply + offset, now)
        standby_seen_only_when_its_reply_time_changes(
            *before, None if reply is None else reply + offset, now, state_b)
        assert state_a[1] == state_b[1]


@SMALL
@given(st.builds(agent.Timing, *[st.floats(0.01, 10, allow_nan=False)] * 6))
def test_check_timing_over_any_timing(t):
    timing_accepted_only_if_the_fence_closes_before_a_grant(t, refusal(t))


@SWEEP
@given(db_observations())
def test_decide_db_invariants_over_every_input(case):
    me, o = case
    check_all(DB_INVARIANTS, [(me, o)], require_engaged=False)
