import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # labtest: helpers shared by the lab suites


def pytest_addoption(parser):
    parser.addoption("--lab-backend", choices=["netns", "vagrant"], default="netns",
                     help="tests/infra: check the embedded lab (built by the tests) or the "
                          "Vagrant lab; tests/vagrant runs only with vagrant")
    parser.addoption("--vagrant-provider", choices=["virtualbox", "lxc"],
                     default=os.environ.get("VAGRANT_DEFAULT_PROVIDER") or "virtualbox",
                     help="the provider of a Vagrant lab that the tests bring up themselves")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--lab-backend") != "vagrant":
        skip = pytest.mark.skip(reason="the Vagrant lab's suite: run with --lab-backend vagrant")
        for item in items:
            if "tests/vagrant/" in str(item.fspath).replace(os.sep, "/"):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def vagrant_lab(request):
    """The Vagrant lab. One that is up already is used and left up; otherwise the tests bring
    one up (--vagrant-provider) and destroy it at the end, whatever happened."""
    from labtest import vagrant_lab
    yield from vagrant_lab(request.config.getoption("--vagrant-provider"))
