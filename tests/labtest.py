"""Helpers for the tests that run a real embedded lab (integration and infra suites)."""
import time

from lab.backend import AGENT_HOSTS, LabError
from lab.netns import NetnsBackend


def fresh_lab(strict_sync=False):
    backend = NetnsBackend(strict_sync=strict_sync)
    if backend.exists():
        raise LabError("a lab is already up: `python -m lab down` first (tests build their own)")
    try:
        backend.up(progress=lambda *a, **k: None)
        backend.wait_until("primary with sync standby", backend.primary_with_sync_standby, 120)
        yield backend
    finally:
        backend.down()


def agent_log_tails(backend, lines=40):
    """The last lines each agent logged (one decision per line when it changes)."""
    tails = []
    for host in AGENT_HOSTS:
        try:
            text = backend.read_file(host, backend.lab_dir / "hosts" / host / "log" / "agent.log")
        except OSError as exc:
            text = f"(unreadable: {exc})"
        tails.append(f"--- {host}\n" + "\n".join(text.splitlines()[-lines:]))
    return "\n".join(tails)


def vagrant_lab(provider):
    """The running Vagrant lab (left up), or one brought up here and destroyed after."""
    from lab.vagrant import VagrantBackend
    backend = VagrantBackend(provider=provider)
    if backend.exists():
        backend.check_ready()
        yield backend
        return
    began = time.monotonic()
    try:
        backend.up(progress=print)
        backend.wait_until("primary with sync standby", backend.primary_with_sync_standby, 240)
        print(f"vagrant lab up in {time.monotonic() - began:.0f} s")
        yield backend
    finally:
        began = time.monotonic()
        backend.down()
        print(f"vagrant lab down in {time.monotonic() - began:.0f} s")


def eventually(predicate, timeout, interval=0.2):
    """The predicate's first truthy value within timeout, else AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {predicate.__doc__ or predicate}")
        time.sleep(interval)


def steadily(predicate, seconds, timeout, interval=0.2):
    """Wait until the predicate has held for `seconds` without a break, within timeout; else
    AssertionError."""
    deadline, since = time.monotonic() + timeout, None
    while time.monotonic() <= deadline:
        if not predicate():
            since = None
        elif since is None:
            since = time.monotonic()
        elif time.monotonic() - since >= seconds:
            return
        time.sleep(interval)
    raise AssertionError(f"not true for {seconds} s within {timeout} s: "
                         f"{predicate.__doc__ or predicate}")


def role_of(backend, host):
    return backend.host_status(host).get("pg")


def client_write(backend, sql, timeout=10):
    result = backend.client_sql(sql, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


