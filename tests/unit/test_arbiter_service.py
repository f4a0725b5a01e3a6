"""The arbiter's request handling, without a network: bad requests are refused with a
ProtocolError (the server logs and drops them), and every new view is on disk before the
answer that announces it."""
import dataclasses
import json
from pathlib import Path

import pytest

import agent

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def arbiter(tmp_path):
    cfg = agent.load_config(str(REPO / "agent.ini"), "arb")
    cfg = dataclasses.replace(cfg, state_dir=str(tmp_path / "state"), log_dir=str(tmp_path))
    (tmp_path / "state").mkdir()
    a = agent.ArbiterAgent(cfg, b"k" * 32)
    a.state.save(a.view)
    return a


def on_disk(a):
    return json.loads(Path(a.state.path).read_text())


@pytest.mark.parametrize("sender,kind,body", [
    ("pg2", "promote", {"term": "1"}),                      # not an int
    ("arb", "promote", {"term": 1}),                        # not a database node
    ("pg1", "eligibility", {"term": 1, "seq": 0, "standby": "pg2"}),  # no "eligible"
    ("pg1", "eligibility", {"term": 1, "seq": 0, "standby": "x", "eligible": False}),
    ("pg1", "eligibility", {"term": 1, "standby": "pg2", "eligible": False}),  # no seq
    ("pg1", "handover", {"term": 1, "seq": 0, "to": "nobody"}),
    ("pg1", "handover", {"term": 1, "to": "pg2"}),  # no seq
    ("pg1", "reboot", {"term": 1}),
])
def test_bad_requests_are_refused_and_change_nothing(arbiter, sender, kind, body):
    before = on_disk(arbiter)
    with pytest.raises(agent.ProtocolError):
        arbiter.handle(sender, kind, body)
    assert on_disk(arbiter) == before and arbiter.view == agent.View.from_dict(before)


def test_no_promotion_while_the_arbiter_has_just_started(arbiter):
    reply = arbiter.handle("pg2", "promote", {"term": 1})
    assert not reply["granted"] and on_disk(arbiter)["term"] == 1


def test_a_new_view_is_on_disk_before_the_reply(arbiter):
    reply = arbiter.handle("pg1", "eligibility", {"term": 1, "seq": 0, "standby": "pg2",
                                                  "eligible": False})
    assert reply["granted"] and reply["view"]["eligible"] is None
    assert on_disk(arbiter) == reply["view"]
    refused = arbiter.handle("pg2", "eligibility", {"term": 1, "seq": 1, "standby": "pg2",
                                                    "eligible": True})
    assert not refused["granted"] and on_disk(arbiter) == reply["view"]


def test_grant_after_the_primary_was_lost(arbiter):
    arbiter.started_at -= 10  # the arbiter has been up, and has not seen pg1, for 10 s
    news = arbiter.status_body("pg2")  # what pg2 last heard from the arbiter, echoed back
    reply = arbiter.handle("pg2", "promote", {"term": 1, "echo": news})
    assert reply["granted"] and on_disk(arbiter)["term"] == 2
    assert on_disk(arbiter)["primary"] == "pg2"
    again = arbiter.handle("pg1", "promote", {"term": 1, "echo": news})  # the same term again
    assert not again["granted"] and on_disk(arbiter)["term"] == 2
    events = [json.loads(line) for line in Path(arbiter.events.path).read_text().splitlines()]
    assert [e["event"] for e in events] == ["granted"]
