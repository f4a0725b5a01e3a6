"""Integration tests run the real thing: network namespaces, iptables, PostgreSQL, agents.
Each test gets a fresh embedded lab and tears it down, whatever happens."""
import os

import pytest

from labtest import agent_log_tails, fresh_lab


def pytest_collection_modifyitems(items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="integration tests need root (netns, iptables)")
        for item in items:
            if "integration" in str(item.fspath):
                item.add_marker(skip)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report ends with each agent's last decisions: the lab is gone by the
    time anyone reads it, and CI keeps only what pytest printed."""
    report = yield
    backend = item.funcargs.get("lab") or item.funcargs.get("strict_lab")
    if report.when == "call" and report.failed and backend is not None:
        report.sections.append(("agent logs, last lines", agent_log_tails(backend)))
    return report


@pytest.fixture(scope="session", autouse=True)
def report_root(tmp_path_factory):
    """The experiments' report folders go to pytest's temporary directory, not to
    /var/tmp/bobry-reports (unless BOBRY_REPORT_DIR says where)."""
    if not os.environ.get("BOBRY_REPORT_DIR"):
        os.environ["BOBRY_REPORT_DIR"] = str(tmp_path_factory.mktemp("reports"))
    yield os.environ["BOBRY_REPORT_DIR"]


@pytest.fixture
def lab():
    yield from fresh_lab()


@pytest.fixture
def strict_lab():
    """A lab whose primary never stops waiting for its standby (strict_sync = true)."""
    yield from fresh_lab(strict_sync=True)
