"""A one-way cut (lab.backend.Backend.cut) drops new connections from A to B and ends those A
has open to B's services, on A's side: the agents keep their heartbeat connections and probe
sessions from round to round, which would otherwise outlive the cut. The commands are
recorded, not run."""
from pathlib import Path

from lab.backend import Backend

REPO = Path(__file__).resolve().parents[2]


class Recorder(Backend):
    addresses = {"pg1": "10.0.0.11", "pg2": "10.0.0.12", "arb": "10.0.0.13",
                 "client": "10.0.0.20"}
    config_file = REPO / "agent.ini"

    def __init__(self):
        self.commands = []

    def must(self, host, argv, timeout=60, input=None):
        self.commands.append((host, argv))
        return "1700000000.0"  # the clock _add_rules reads


def kills(backend):
    return [(host, " ".join(argv)) for host, argv in backend.commands if argv[0] == "ss"]


def test_the_connections_a_opened_to_bs_services_are_ended_on_as_side():
    backend = Recorder()
    backend.cut("pg1", "arb", one_way=True)
    assert kills(backend) == [("pg1", "ss -K -tn dst 10.0.0.13 ( dport = :7400 or "
                                      "dport = :8008 )")]
    backend.commands.clear()
    backend.cut("arb", "pg2", one_way=True)
    assert kills(backend) == [("arb", "ss -K -tn dst 10.0.0.12 ( dport = :5432 or "
                                      "dport = :7400 or dport = :8008 )")]


def test_the_client_serves_nothing_and_a_two_way_cut_ends_nothing():
    backend = Recorder()
    backend.cut("pg1", "client", one_way=True)
    backend.cut("pg1", "pg2")
    assert kills(backend) == []
