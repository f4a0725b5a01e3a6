"""`lab status`: one readable line per host."""
from lab.cli import status_table

ROWS = [
    {"node": "pg1", "address": "10.89.0.11", "agent": "up", "config_role": "primary",
     "pg": "primary", "timeline": 2, "fenced": False, "view": {"term": 2},
     "replication": [{"standby": "pg2", "state": "streaming", "sync_state": "sync",
                      "lag_bytes": 0}]},
    {"node": "pg2", "address": "10.89.0.12", "agent": "down", "config_role": "standby",
     "pg": "standby", "timeline": 2, "fenced": True, "view": {"term": 2}, "receiver": None},
    {"node": "arb", "address": "10.89.0.13", "agent": "up", "config_role": "arbiter",
     "view": {"term": 2, "primary": "pg1", "eligible": "pg2"}},
]


def test_one_line_per_host_with_role_replication_and_view():
    header, pg1, pg2, arb = status_table(ROWS).splitlines()
    assert header.split() == ["host", "address", "agent", "postgres", "timeline", "fenced",
                              "term", "replication"]
    assert pg1.split() == ["pg1", "10.89.0.11", "up", "primary", "2", "False", "2", "pg2",
                           "streaming", "sync", "lag", "0", "B"]
    assert pg2.split() == ["pg2", "10.89.0.12", "down", "standby", "2", "True", "2",
                           "receiver", "down"]
    assert arb.split()[:3] == ["arb", "10.89.0.13", "up"]
    assert arb.endswith("view: pg1 primary, eligible pg2")
