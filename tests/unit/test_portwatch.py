"""The port watcher tells a refused or reset connection (the port is closed to clients) from
one that got no answer (a lost packet says nothing about the port). Loopback only."""
import socket

from lab import portwatch
from lab.portwatch import port_state


def test_open_and_refused_ports():
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        assert port_state("127.0.0.1", port, 1.0) == ("port_open", None)
    assert port_state("127.0.0.1", port, 1.0) == ("port_closed", "ConnectionRefusedError")


def test_no_answer_says_nothing(monkeypatch):
    def silent(address, timeout):
        raise socket.timeout("timed out")

    monkeypatch.setattr(portwatch.socket, "create_connection", silent)
    assert port_state("127.0.0.1", 5432, 0.2) == (None, None)
