"""The unit suites' real arbiter agent on loopback (tests/unit/test_agent_under_abuse.py,
test_launcher.py)."""
import configparser
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import agent

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


@pytest.fixture
def arbiter_process():
    """`agent.py --config … --node arb` on loopback: (process, config dir, log path)."""
    with tempfile.TemporaryDirectory(prefix="bobry-abuse-") as directory:
        ini = write_cluster(directory)
        log_path = Path(directory) / "agent.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, str(REPO / "agent.py"), "--config", ini,
                                     "--node", "arb"], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=directory)
        try:
            cfg = agent.load_config(ini, "pg2")
            key = agent.read_secret(cfg.agent_key_file).encode()
            deadline = time.monotonic() + 15
            while True:
                try:
                    agent.call(cfg, key, cfg.arbiter, "status", {}, timeout=0.5)
                    break
                except (OSError, agent.ProtocolError):
                    assert proc.poll() is None, log_path.read_text()
                    assert time.monotonic() < deadline, log_path.read_text()
                    time.sleep(0.1)
            yield proc, ini, log_path
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(5)
