"""The agents' wire protocol: sealed messages pass, anything else is refused with a reason,
and a server drops bad input without crashing."""
import json
import logging
import socket
import threading
import time

import pytest

import agent

KEY = b"k" * 32
NODES = {"pg1": None, "pg2": None, "arb": None}


def test_roundtrip():
    line = agent.seal(KEY, "pg2", "arb", "promote", {"term": 3})
    message = agent.unseal(KEY, line, "arb", NODES)
    assert message["from"] == "pg2" and message["body"] == {"term": 3}


@pytest.mark.parametrize("mutate,reason", [
    (lambda m: {**m, "body": {"term": 4}}, "bad mac"),
    (lambda m: "garbage", "not JSON"),
])
def test_altered_messages_are_refused(mutate, reason):
    message = json.loads(agent.seal(KEY, "pg2", "arb", "promote", {"term": 3}))
    mutated = mutate(message)
    line = mutated.encode() if isinstance(mutated, str) else json.dumps(mutated).encode()
    with pytest.raises(agent.ProtocolError, match=reason):
        agent.unseal(KEY, line, "arb", NODES)


def test_wrong_key():
    with pytest.raises(agent.ProtocolError, match="bad mac"):
        agent.unseal(b"x" * 32, agent.seal(KEY, "pg2", "arb", "status", {}), "arb", NODES)


def test_addressed_elsewhere_unknown_sender_stale_clock():
    with pytest.raises(agent.ProtocolError, match="not to me"):
        agent.unseal(KEY, agent.seal(KEY, "pg2", "pg1", "status", {}), "arb", NODES)
    with pytest.raises(agent.ProtocolError, match="unknown node"):
        agent.unseal(KEY, agent.seal(KEY, "evil", "arb", "status", {}), "arb", NODES)
    old = agent.seal(KEY, "pg2", "arb", "status", {}, now=time.time() - 120)
    with pytest.raises(agent.ProtocolError, match="too far off"):
        agent.unseal(KEY, old, "arb", NODES)
    with pytest.raises(agent.ProtocolError, match="unknown type"):
        agent.unseal(KEY, agent.seal(KEY, "pg2", "arb", "reboot", {}), "arb", NODES)


def test_server_drops_bad_input_and_keeps_serving(tmp_path, caplog):
    """A real server on loopback: garbage and an unauthenticated request are logged and
    dropped; a good request afterwards is still answered."""
    cfg = agent.load_config(agent.__file__.replace("agent.py", "agent.ini"), "arb")
    cfg = agent.Config(**{**cfg.__dict__, "me": agent.Node("arb", "127.0.0.1", "arbiter",
                                                            5432, 0)})
    log = logging.getLogger("test-protocol")
    server = agent.AgentServer(cfg, KEY, lambda sender, kind, body: {"echo": body}, log)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with caplog.at_level(logging.WARNING, logger="test-protocol"):
            for payload in (b"not json at all\n", agent.seal(b"wrong" * 8, "pg2", "arb",
                                                             "status", {})):
                with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                    s.sendall(payload)
                    assert s.recv(100) == b""  # dropped: closed without a reply
        assert "not JSON" in caplog.text and "bad mac" in caplog.text
        peer = agent.Node("arb", "127.0.0.1", "arbiter", 5432, port)
        caller = agent.Config(**{**cfg.__dict__, "me": agent.Node("pg2", "127.0.0.1",
                                                                   "standby", 5432, 0)})
        assert agent.call(caller, KEY, peer, "status", {"x": 1}, timeout=2) == {"echo": {"x": 1}}
    finally:
        server.shutdown()
        server.server_close()
