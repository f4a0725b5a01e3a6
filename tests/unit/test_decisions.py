"""The agent's decisions, rule by rule (README, "The rules"), example by example. The invariants
over every combination of their inputs are in test_decision_invariants.py. Pure functions: no
I/O, no clock."""
import dataclasses

import pytest

import agent
from agent import DbObservation, View, bootstrap_action, decide_db, decide_grant, decide_resume

T = agent.Timing(check_interval=0.2, probe_timeout=0.3, fence_timeout=1.0, safety_margin=0.3,
                 failover_timeout=2.0, restart_grace=6.0)
NOW = 1000.0
FRESH, LOST, LONG_LOST = NOW - 0.1, NOW - 1.5, NOW - 10.0
TERM1 = View(1, "pg1", "pg2")
PAUSED = View(1, "pg1", "pg2", 5, paused=True)


def obs(pg="primary", view=TERM1, fenced=False, other=FRESH, arbiter=FRESH, primary=FRESH,
        down_since=None, standby_signal=False, sync="pg2", me="pg1", standby=FRESH,
        streaming=True, synced=True, switchover=False, strict=False, rewound=False,
        unfinished=False, rebooted=False):
    peer = "pg2" if me == "pg1" else "pg1"
    return DbObservation(now=NOW, started_at=NOW - 100, pg=pg, pg_down_since=down_since,
                         has_standby_signal=standby_signal, fenced=fenced, view=view,
                         contact_at={peer: other, "arb": arbiter}, primary_alive_at=primary,
                         sync_names=sync if pg == "primary" else None, standby_seen_at=standby,
                         standby_streaming=streaming, standby_synced=synced,
                         switchover_requested=switchover, strict_sync=strict, rewound=rewound,
                         rewind_unfinished=unfinished, rewind_before_reboot=rebooted)


def same(a, b):  # views equal but for seq
    return (a.term, a.primary, a.eligible) == (b.term, b.primary, b.eligible)


def m(**kw):  # the primary's agent, pg1
    return decide_db("pg1", "pg2", "arb", obs(me="pg1", **kw), T)


def s(**kw):  # the standby's agent, pg2
    kw.setdefault("pg", "standby")
    kw.setdefault("standby_signal", True)
    return decide_db("pg2", "pg1", "arb", obs(me="pg2", **kw), T)


# -- rule 1: S promotes only when it lost M for failover_timeout and A grants --------------

def test_rule1_standby_asks_the_arbiter_after_losing_the_primary():
    d = s(primary=NOW - 2.0)
    assert d.action == "request_promotion" and "lost pg1 for 2.0 s" in d.reason


def test_rule1_standby_waits_out_the_window():
    assert s(primary=NOW - 1.9).action == "none"


def test_rule1_a_granted_view_makes_the_standby_promote():
    assert s(view=View(2, "pg2", None)).action == "promote"


def test_rule1_arbiter_grants_once_and_records_a_new_term():
    granted, view, reason = decide_grant(TERM1, "pg2", 1, NOW - 2.5, NOW, NOW - 100, T, NOW - 0.1)
    assert granted and same(view, View(2, "pg2", None)) and view.seq == TERM1.seq + 1
    assert "term 2" in reason
    # the same request again (a lost reply, a restarted agent): the same answer, no new term
    again, view2, _ = decide_grant(view, "pg2", 1, NOW - 2.5, NOW, NOW - 100, T, NOW - 0.1)
    assert again and view2 == view
    # the old primary can never be granted the term that was just given away
    other, view3, why = decide_grant(view, "pg1", 1, None, NOW, NOW - 100, T)
    assert not other and view3 == view and "current term is 2" in why


def test_rule1_arbiter_refuses_a_standby_not_in_sync():
    granted, _, reason = decide_grant(View(2, "pg2", None), "pg1", 2, None, NOW, NOW - 100, T)
    assert not granted and "not eligible" in reason


# -- rule 2: no promotion when S reaches neither M nor A -------------------------------------

def test_rule2_no_promotion_without_the_arbiter():
    d = s(primary=LONG_LOST, arbiter=LOST, other=LONG_LOST)
    assert d.action == "none" and "unreachable too" in d.reason


# -- rule 3: no promotion when S lost A but M is alive ----------------------------------------

def test_rule3_primary_alive_arbiter_lost():
    assert s(primary=FRESH, arbiter=LONG_LOST).action == "none"


# -- rule 4: no promotion when A still sees M --------------------------------------------------

def test_rule4_arbiter_refuses_while_it_sees_the_primary():
    granted, view, reason = decide_grant(TERM1, "pg2", 1, NOW - 0.4, NOW, NOW - 100, T, NOW - 0.1)
    assert not granted and view == TERM1 and "I still see pg1" in reason


def test_rule4_arbiter_just_started_counts_from_its_start():
    granted, _, _ = decide_grant(TERM1, "pg2", 1, None, NOW, NOW - 0.5, T)
    assert not granted


# -- rule 5: M fences itself when it lost S and A for fence_timeout ----------------------------

def test_rule5_fence_when_both_lost():
    d = m(other=NOW - 1.0, arbiter=NOW - 1.0)
    assert d.action == "fence" and "lost pg2" in d.reason and "arb" in d.reason


@pytest.mark.parametrize("other,arbiter", [(FRESH, LOST), (LOST, FRESH), (NOW - 0.9, LOST)])
def test_rule5_no_fence_while_one_peer_answers(other, arbiter):
    assert m(other=other, arbiter=arbiter).action == "none"


def test_rule5_timing_inequality_is_enforced():
    bad = agent.Timing(0.2, 0.3, 1.0, 0.3, 1.3, 6.0)
    with pytest.raises(agent.ConfigError, match="failover_timeout"):
        agent.check_timing("agent.ini", bad)
    agent.check_timing("agent.ini", T)  # the defaults satisfy it


# -- rule 6: a fenced M unfences only on A's word that it still is the primary -----------------

def test_rule6_unfence_when_the_arbiter_confirms():
    d = m(fenced=True, other=LONG_LOST, arbiter=FRESH)
    assert d.action == "unfence" and "term 1" in d.reason


def test_rule6_stay_fenced_without_the_arbiter():
    assert m(fenced=True, other=FRESH, arbiter=LOST).action == "none"


def test_rule6_replaced_primary_fences_and_stays_fenced():
    replaced = View(2, "pg2", None)
    assert m(view=replaced).action == "fence"
    # fenced until it can rejoin: it never unfences as a primary
    d = m(view=replaced, fenced=True, arbiter=FRESH, primary=LONG_LOST)
    assert d.action == "none" and "waiting to reach it" in d.reason


def test_rule6_unconfirmed_view_never_unfences():
    assert m(view=View(0, "pg1", "pg2"), fenced=True, arbiter=FRESH).action == "none"


# -- rule 7: decisions rest on a window, not one failed probe -----------------------------------

def test_rule7_one_missed_heartbeat_is_not_loss():
    assert m(other=NOW - 0.5, arbiter=NOW - 0.5).action == "none"
    assert s(primary=NOW - 0.5).action == "none"


def test_rule7_never_heard_counts_from_agent_start():
    o = DbObservation(now=NOW, started_at=NOW - 0.5, pg="primary", pg_down_since=None,
                      has_standby_signal=False, fenced=False, view=TERM1, contact_at={},
                      primary_alive_at=None, sync_names="pg2")
    assert decide_db("pg1", "pg2", "arb", o, T).action == "none"


# -- rule 8: restart safety --------------------------------------------------------------------

def test_rule8_primary_with_postgres_down_leaves_the_failover_a_chance():
    assert m(pg="down", down_since=NOW - 3).action == "none"
    d = m(pg="down", down_since=NOW - 6.5)
    assert d.action == "resume" and "asking arb" in d.reason


def test_rule8_resume_only_for_the_current_primary():
    assert decide_resume(TERM1, "pg1", 1)[0]
    assert not decide_resume(View(2, "pg2", None), "pg1", 1)[0]
    assert not decide_resume(TERM1, "pg2", 1)[0]


def test_rule8_replaced_primary_with_postgres_down_does_not_start_it():
    d = m(view=View(2, "pg2", None), pg="down", down_since=LONG_LOST, primary=LONG_LOST)
    assert d.action == "none"


def test_rule8_standby_with_postgres_down_starts_it():
    assert s(pg="down", down_since=LONG_LOST).action == "start_standby"


def test_rule8_bootstrap_never_touches_existing_data():
    for view in (TERM1, View(0, "pg1", "pg2"), View(5, "pg2", None)):
        assert bootstrap_action("pg1", True, view).action == "adopt"
    assert bootstrap_action("pg1", False, View(0, "pg1", "pg2")).action == "wait"
    assert bootstrap_action("pg1", False, TERM1).action == "initdb"
    assert bootstrap_action("pg2", False, TERM1).action == "basebackup"
    assert bootstrap_action("pg1", False, View(3, "pg1", None)).action == "refuse"


def test_views_only_move_forward():
    assert agent.newer_view(View(2, "pg2", None), TERM1) == View(2, "pg2", None)
    assert agent.newer_view(TERM1, View(2, "pg2", None)) == View(2, "pg2", None)


def test_new_primary_stops_waiting_for_a_standby_only_on_the_arbiters_word():
    o = obs(me="pg2", view=View(2, "pg2", None), sync="pg1", streaming=False, standby=None,
            synced=False)
    d = decide_db("pg2", "pg1", "arb", o, T)
    assert d.action == "drop_standby" and d.sync_names == ""


# -- issue 4: the standby lost and found, switchover, rejoin -------------------------------------

def test_standby_lost_primary_asks_the_arbiter_before_it_stops_waiting():
    d = m(standby=NOW - 2.0, other=LONG_LOST)
    assert d.action == "drop_standby" and d.sync_names == ""
    assert m(standby=NOW - 1.5).action == "none"  # a late reply is not a lost standby


def test_standby_lost_without_the_arbiter_keeps_waiting():
    assert m(standby=LONG_LOST, other=FRESH, arbiter=LOST).action == "none"


def test_strict_sync_never_drops_the_standby():
    d = m(standby=LONG_LOST, strict=True)
    assert d.action == "none" and "strict_sync" in d.reason


def test_standby_back_primary_waits_for_it_then_asks_to_make_it_eligible():
    dropped = View(1, "pg1", None, 3)
    d = m(view=dropped, sync="", streaming=True, synced=False)
    assert d.action == "set_sync" and d.sync_names == "pg2"
    assert m(view=dropped, sync="pg2", synced=True).action == "mark_eligible"
    # a walsender row that no longer gets replies does not count as streaming; to stop
    # waiting for it the primary asks the arbiter first
    d = m(view=dropped, sync="pg2", standby=LONG_LOST, synced=False)
    assert d.action == "drop_standby" and d.sync_names == ""


def test_arbiter_eligibility_only_from_the_primary_of_the_term():
    ok, new, _ = agent.decide_eligibility(TERM1, "pg1", 1, 0, "pg2", False)
    assert ok and new.eligible is None and new.seq == TERM1.seq + 1 and new.term == 1
    assert agent.newer_view(TERM1, new) == new  # the same term, yet newer
    for requester, term in (("pg2", 1), ("pg1", 0)):
        ok, same_view, _ = agent.decide_eligibility(TERM1, requester, term, 0, "pg2", False)
        assert not ok and same_view == TERM1
    ok, back, _ = agent.decide_eligibility(new, "pg1", 1, new.seq, "pg2", True)
    assert ok and back.eligible == "pg2" and back.seq == new.seq + 1


def test_switchover_hands_over_only_to_an_eligible_standby_the_arbiter_sees():
    assert m(switchover=True).action == "handover"
    assert m(switchover=True, view=View(1, "pg1", None)).action == "refuse_switchover"
    ok, new, _ = agent.decide_handover(TERM1, "pg1", 1, 0, "pg2", NOW - 0.1, NOW, T)
    assert ok and same(new, View(2, "pg2", None))
    assert not agent.decide_handover(TERM1, "pg1", 1, 0, "pg2", NOW - 5, NOW, T)[0]
    assert not agent.decide_handover(TERM1, "pg2", 1, 0, "pg1", NOW - 0.1, NOW, T)[0]
    # a primary fenced for a switchover does not unfence before the handover is decided
    assert m(switchover=True, fenced=True).action == "none"


def test_replaced_primary_rejoins_when_it_reaches_the_new_primary():
    replaced = View(2, "pg2", None)
    assert m(view=replaced, fenced=True, primary=FRESH).action == "rejoin"
    assert m(view=replaced, pg="down", primary=FRESH).action == "rejoin"
    # once it runs as a standby, the fence goes
    assert m(view=replaced, pg="standby", fenced=True, standby_signal=True).action == "unfence"


def test_replaced_primary_killed_after_its_rewind_starts_as_a_standby():
    """Found by the simulator: the agent killed after pg_rewind, before standby.signal. Its
    pg_control says "in archive recovery" (rewound) and has the new primary's timeline, so a
    second rewind would wait forever for a newer one: it starts as the standby instead, on
    the same conditions as the rejoin."""
    replaced = View(2, "pg2", None)
    d = m(view=replaced, pg="down", rewound=True)
    assert d.action == "finish_rejoin"
    assert d.reason == ("replaced by pg2 in term 2 and rewound before a restart: starting as "
                        "its standby")
    assert m(view=replaced, pg="down").action == "rejoin"  # not rewound: rewind
    # the same conditions as the rejoin: a view of the arbiter's, the new primary seen lately
    assert m(view=View(0, "pg2", None), pg="down", rewound=True).action == "none"
    assert m(view=replaced, pg="down", rewound=True, primary=NOW - 0.99).action == \
        "finish_rejoin"
    assert m(view=replaced, pg="down", rewound=True, primary=NOW - 1.0).action == "none"
    assert m(view=replaced, pg="down", rewound=True, primary=None).action == "none"
    # standby.signal written already: a plain start; PostgreSQL running: rewound says nothing
    assert m(view=replaced, pg="down", rewound=True, standby_signal=True).action == \
        "start_standby"
    assert m(view=replaced, pg="primary", fenced=True, rewound=True).action == "rejoin"
    # the view names me: the primary's rules, whatever pg_control says
    assert m(pg="down", rewound=True, down_since=NOW - 10).action == "resume"
    # paused: it rejoins all the same (as the rewind does), and says PAUSED
    d = m(view=View(2, "pg2", None, 3, paused=True), pg="down", rewound=True)
    assert d.action == "finish_rejoin" and d.reason.startswith("PAUSED: ")


def test_replaced_primary_whose_rewind_stopped_half_way_is_cloned_afresh():
    """A pg_rewind killed or timed out half-way (its mark there, pg_control not "in archive
    recovery") leaves files of two servers: never rewound again nor started, kept aside so
    that the bootstrap clones -- on the same conditions as the rejoin."""
    replaced = View(2, "pg2", None)
    d = m(view=replaced, pg="down", unfinished=True)
    assert d.action == "reclone"
    assert d.reason == ("replaced by pg2 in term 2; a pg_rewind of my data stopped half-way, "
                        "leaving files of two servers: keeping them aside to clone afresh")
    # the rewind ran to its end (pg_control says so) before the agent died: start it
    assert m(view=replaced, pg="down", unfinished=True, rewound=True).action == "finish_rejoin"
    # the new primary unseen for fence_timeout, or a view not the arbiter's: wait
    assert m(view=replaced, pg="down", unfinished=True, primary=NOW - 1.0).action == "none"
    assert m(view=View(0, "pg2", None), pg="down", unfinished=True).action == "none"
    # standby.signal written (after a complete rewind): a plain start
    assert m(view=replaced, pg="down", unfinished=True, standby_signal=True).action == \
        "start_standby"
    # the host booted since: pg_control ("rewound") was fsynced before the files it vouches for
    assert m(view=replaced, pg="down", unfinished=True, rewound=True,
             rebooted=True).action == "reclone"


# -- pause (README, "Pause and resume"): the decisions ----------------------------------------

def pobs(view=PAUSED, other=NOW - 0.1, arbiter=NOW - 0.1, primary=NOW - 0.1,
         standby=NOW - 0.1, **rest):
    """obs() under a paused view, with every peer heard 0.1 s ago."""
    return obs(view=view, other=other, arbiter=arbiter, primary=primary, standby=standby,
               **rest)


def pm(**kw):
    return decide_db("pg1", "pg2", "arb", pobs(me="pg1", **kw), T)


def ps(**kw):
    kw.setdefault("pg", "standby")
    kw.setdefault("standby_signal", True)
    return decide_db("pg2", "pg1", "arb", pobs(me="pg2", **kw), T)


def test_paused_standby_does_not_ask_to_be_promoted():
    unpaused = dataclasses.replace(PAUSED, paused=False)
    assert ps(view=unpaused, primary=NOW - 5).action == "request_promotion"
    d = ps(primary=NOW - 5)
    assert d.action == "none" and d.reason.startswith("PAUSED: ") and "no promotion" in d.reason


def test_paused_primary_does_not_fence_on_a_timeout():
    unpaused = dataclasses.replace(PAUSED, paused=False)
    assert pm(view=unpaused, other=NOW - 5, arbiter=NOW - 5).action == "fence"
    d = pm(other=NOW - 5, arbiter=NOW - 5)
    assert d.action == "none" and d.reason.startswith("PAUSED: ") and "stays open" in d.reason


@pytest.mark.parametrize("case", ["drop", "drop_on_stale_names", "mark_eligible", "set_sync"])
def test_paused_primary_changes_no_sync_on_its_own(case):
    unpaused = dataclasses.replace(PAUSED, paused=False)
    kw = {"drop": {"standby": NOW - 5},
          "drop_on_stale_names": {"view": View(1, "pg1", None, 5), "streaming": False,
                                  "synced": False},
          "mark_eligible": {"view": View(1, "pg1", None, 5), "sync": "pg2"},
          "set_sync": {"sync": ""}}[case]
    view = kw.pop("view", unpaused)
    normal = pm(view=view, **kw).action
    assert normal in ("drop_standby", "mark_eligible", "set_sync")  # what pause prevents
    d = pm(view=dataclasses.replace(view, paused=True), **kw)
    assert d.action == "none" and d.reason.startswith("PAUSED: ")


def test_paused_primary_refuses_a_switchover():
    d = pm(switchover=True)
    assert d.action == "refuse_switchover" and "paused" in d.reason


def test_while_paused_safety_still_acts():
    """A granted term is finished, a replaced primary still fences, and a fenced primary
    still reopens on the arbiter's word: pause stops automatic failover, not the rules
    that protect data."""
    granted = View(2, "pg2", None, 6, paused=True)
    assert ps(view=granted).action == "promote"
    assert pm(view=granted, pg="primary").action == "fence"
    assert pm(fenced=True).action == "unfence"


def test_every_decision_says_paused_while_paused():
    for d in (pm(), ps(), pm(other=NOW - 5, arbiter=NOW - 5), ps(primary=NOW - 5)):
        assert d.reason.startswith("PAUSED: ")
    assert not pm(view=dataclasses.replace(PAUSED, paused=False)).reason.startswith("PAUSED")


def grant(view, news=NOW - 0.1):
    return agent.decide_grant(view, "pg2", view.term, NOW - 5, NOW, NOW - 100, T, news)


def test_the_arbiter_grants_no_promotion_or_handover_while_paused_or_resuming():
    normal = View(1, "pg1", "pg2", 5)
    assert grant(normal)[0]
    for view in (PAUSED, View(1, "pg1", "pg2", 6, resuming=True)):
        granted, new, reason = grant(view)
        assert not granted and new == view and ("paused" in reason or "resumed" in reason)
        handed, new, reason = agent.decide_handover(view, "pg1", 1, view.seq, "pg2", NOW - 0.1,
                                                    NOW, T)
        assert not handed and new == view
    assert agent.decide_handover(normal, "pg1", 1, 5, "pg2", NOW - 0.1, NOW, T)[0]


def test_pause_and_resume_name_the_view_they_are_based_on():
    view = View(1, "pg1", "pg2", 5)
    refused = agent.decide_pause(view, 1, 4, True)
    assert not refused[0] and refused[1] == view and "ask again" in refused[2]
    granted, paused, _ = agent.decide_pause(view, 1, 5, True)
    assert granted and paused.paused and paused.seq == 6 and not paused.resuming
    assert agent.decide_pause(paused, 1, 6, True) == (True, paused,
                                                      "the cluster already is paused")
    granted, resumed, _ = agent.decide_pause(paused, 1, 6, False)
    assert granted and not resumed.paused and resumed.resuming and resumed.seq == 7
    # not paused: nothing to resume, and the operator is told so (no error)
    assert agent.decide_pause(view, 1, 5, False) == (True, view, "the cluster is not paused")


def test_resume_ends_when_the_primary_reports_a_timed_lease_under_the_resumed_view():
    resuming = View(1, "pg1", "pg2", 7, resuming=True)
    ack = agent.decide_resume_ack
    assert ack(resuming, "pg1", resuming.as_dict(), "paused") is None  # still untimed
    assert ack(resuming, "pg1", PAUSED.as_dict(), "primary") is None   # has not learned it
    assert ack(resuming, "pg1", resuming.as_dict(), "busy") is None    # no answer
    assert ack(resuming, "pg2", resuming.as_dict(), "primary") is None  # not the primary
    for mode in ("primary", "closed"):
        new = ack(resuming, "pg1", resuming.as_dict(), mode)
        assert new == View(1, "pg1", "pg2", 8)
    assert ack(View(1, "pg1", "pg2", 8), "pg1", {"term": 1, "seq": 8}, "primary") is None


def test_views_carry_pause_and_old_views_read_as_not_paused():
    assert View.from_dict(PAUSED.as_dict()) == PAUSED
    assert View.from_dict({"term": 1, "primary": "pg1", "eligible": None}).paused is False
    with pytest.raises(ValueError):
        View.from_dict({"term": 1, "primary": "pg1", "paused": "yes"})

def test_pause_the_paused_primary_keeps_its_port_open_from_the_bound_on():
    for other, arbiter in ((NOW - 1.0, NOW - 5), (NOW - 5, NOW - 1.0), (NOW - 1.0, NOW - 1.0)):
        d = pm(other=other, arbiter=arbiter)
        assert d.action == "none" and "my port stays open" in d.reason
    for other, arbiter in ((NOW - 0.9, NOW - 5), (NOW - 5, NOW - 0.9)):  # one peer still hears
        d = pm(other=other, arbiter=arbiter)
        assert d.action == "none" and "synchronous_standby_names stays 'pg2'" in d.reason


def test_pause_the_paused_primarys_plain_decision():
    d = pm()
    assert d == agent.Decision("none", "PAUSED: I am (pg1) the primary of term 1; "
                                       "synchronous_standby_names stays 'pg2', eligible pg2")


def test_pause_what_the_arbiter_may_not_do_is_said():
    assert agent.paused_refusal(View(1, "pg1", "pg2")) is None
    assert "paused" in agent.paused_refusal(PAUSED)
    assert "has not yet said" in agent.paused_refusal(View(1, "pg1", "pg2", 6, resuming=True))


def test_pause_no_resume_ack_on_a_paused_view():
    both = View(1, "pg1", "pg2", 7, paused=True, resuming=True)
    assert agent.decide_resume_ack(both, "pg1", both.as_dict(), "primary") is None
    resuming = View(1, "pg1", "pg2", 7, resuming=True)
    assert agent.decide_resume_ack(resuming, "pg1", "not a dict", "primary") is None
    assert agent.decide_resume_ack(resuming, "pg1", {"term": 1, "seq": 6}, "primary") is None
    assert agent.decide_resume_ack(resuming, "pg1", {"term": 0, "seq": 7}, "closed") is None


def test_the_promotion_window_and_check_timing_hold_at_their_exact_bounds():
    """The mutation run's survivors after the clock allowance came in: each bound is exact.
    News exactly promote_window old is still good (decide_grant refuses only older news); a
    promote_window exactly check_interval + probe_timeout is refused (it must exceed it); a
    failover_timeout exactly fence_timeout + safety_margin + clock_allowance is refused."""
    wide = dataclasses.replace(T, fence_timeout=1.0, safety_margin=0.3, failover_timeout=2.846)
    window = agent.promote_window(wide)
    assert NOW - (NOW - window) == window  # exact in binary floating point
    ok, view, _ = agent.decide_grant(agent.View(1, "pg1", "pg2", 4), "pg2", 1, NOW - 5, NOW,
                                     NOW - 100, wide, NOW - window)
    assert ok and view.term == 2
    # (check_interval 0.127 + probe_timeout 0.25 == promote_window 0.377, exactly)
    tight = dataclasses.replace(T, check_interval=0.127, probe_timeout=0.25, fence_timeout=1.0,
                                safety_margin=0.1, failover_timeout=1.5)
    assert agent.promote_window(tight) == tight.check_interval + tight.probe_timeout
    with pytest.raises(agent.ConfigError, match="must exceed check_interval"):
        agent.check_timing("agent.ini", tight)
    agent.check_timing("agent.ini", dataclasses.replace(tight, check_interval=0.126))
    # the allowance grows with failover_timeout: its fixed point F = (1.0 + 0.2 + 0.02) / 0.998
    fixed = (1.0 + 0.2 + agent.KERNEL_TIMER_S) / (1 - 2 * agent.CLOCK_RATE_ERROR)
    short = dataclasses.replace(T, fence_timeout=1.0, safety_margin=0.2, failover_timeout=fixed)
    assert abs(1.0 + 0.2 + agent.clock_allowance(short) - fixed) < 1e-12
    with pytest.raises(agent.ConfigError, match="too short"):
        agent.check_timing("agent.ini", short)
