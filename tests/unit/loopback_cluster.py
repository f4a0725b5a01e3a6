"""Three nodes on loopback addresses, for the unit suites that run a real agent process."""
import configparser
import os
import socket
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ADDRESSES = {"pg1": "127.0.83.11", "pg2": "127.0.83.12", "arb": "127.0.83.13"}


def free_port(address):
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def write_cluster(directory):
    """agent.ini for three nodes on loopback, everything under directory; its path."""
    d = Path(directory)
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(REPO / "agent.ini")
    for name, content in (("agent.key", os.urandom(32).hex()), ("replication.password", "r"),
                          ("app.password", "a")):
        (d / name).write_text(content + "\n")
        (d / name).chmod(0o600)
    parser["cluster"].update(agent_key_file=str(d / "agent.key"),
                             replication_password_file=str(d / "replication.password"),
                             app_password_file=str(d / "app.password"),
                             client_addresses="127.0.0.0/8")
    parser["postgres"].update(data_dir=str(d / "{node}" / "data"), run_dir=str(d / "{node}"))
    parser["agent"].update(state_dir=str(d / "{node}" / "state"), log_dir=str(d / "{node}"))
    for name, address in ADDRESSES.items():
        parser[f"node {name}"].update(address=address, agent_port=str(free_port(address)),
                                      pg_port=str(free_port(address)))
    with open(d / "agent.ini", "w") as f:
        parser.write(f)
    return str(d / "agent.ini")
