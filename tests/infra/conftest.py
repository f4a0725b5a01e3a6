"""testinfra against the lab's hosts. The same test file checks the embedded lab's network
namespaces (built here, torn down after) and the Vagrant lab's VMs (which must be up)."""
import os

import pytest
import testinfra
from testinfra.backend.local import LocalBackend

from lab.backend import HOSTS
from labtest import fresh_lab


class NetnsTestinfraBackend(LocalBackend):
    """testinfra's local backend, each command run inside a lab host's network namespace."""

    NAME = "netns"

    def __init__(self, namespace, *args, **kwargs):
        self.namespace = namespace
        super().__init__(*args, **kwargs)

    def get_pytest_id(self):
        return self.namespace

    def run(self, command, *args, **kwargs):
        command = self.get_command(command, *args)
        return self.run_local("ip netns exec %s sh -c %s", self.namespace, command)


def netns_hosts(lab):
    hosts = {}
    for name in HOSTS:
        backend = NetnsTestinfraBackend(lab.ns(name))
        hosts[name] = testinfra.host.Host(backend)
        backend.set_host(hosts[name])
    return hosts


def vagrant_hosts(lab):
    """testinfra's ssh backend with the lab's own ssh config (vagrant ssh-config) and
    ControlMaster socket (its path doubled %: testinfra %-formats the ssh command line)."""
    control_path = lab._control_path().replace("%", "%%")
    return {name: testinfra.get_host(f"ssh://{name}", ssh_config=str(lab.ssh_config_file),
                                     sudo=True, controlpath=control_path,
                                     ssh_extra_args="-T -o BatchMode=yes")
            for name in HOSTS}


@pytest.fixture(scope="module")
def lab(request):
    if request.config.getoption("--lab-backend") == "vagrant":
        yield request.getfixturevalue("vagrant_lab")
        return
    if os.geteuid() != 0:
        pytest.skip("the embedded lab needs root (netns, iptables)")
    yield from fresh_lab()


@pytest.fixture(scope="module")
def hosts(lab, tmp_path_factory):
    if lab.name == "vagrant":
        return vagrant_hosts(lab)
    return netns_hosts(lab)
