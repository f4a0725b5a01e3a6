#!/usr/bin/env bash
# The labs on this Debian/Ubuntu machine, as root:
#   provision/local.sh setup         install PostgreSQL, iptables, nftables, iproute2 and a Python venv (.venv)
#   provision/local.sh demo          setup, bring the embedded lab up, run the failover experiment, tear down,
#                                    say where the report is
#   provision/local.sh test          setup, the whole test suite (what CI runs): `pytest tests` (unit
#                                    and simulator while the LXC box builds, then the embedded lab and
#                                    testinfra on it), then the Vagrant-LXC suite below
#   provision/local.sh test ARGS…    only `pytest ARGS…` (e.g. tests/unit -k config)
#   provision/local.sh test-vagrant [ARGS…]
#                                    the Vagrant lab with the LXC provider: install lxc, vagrant and
#                                    vagrant-lxc from Debian, build the box once, `vagrant up` the four
#                                    containers, run tests/vagrant and tests/infra against them over ssh,
#                                    destroy them (an LXC lab that is up already is used and left up)
set -euo pipefail
cd "$(dirname "$0")/.."
export VAGRANT_CHECKPOINT_DISABLE=1  # Vagrant never phones home

if [ "$(id -u)" -ne 0 ]; then
  echo "run as root: network namespaces, iptables and PostgreSQL's OS user need it" >&2
  exit 2
fi

# setup [extra command:package …]: install what is missing, then the virtualenv
setup() {
  local missing=()
  for cmd in initdb:postgresql iptables:iptables nft:nftables ip:iproute2 runuser:util-linux "$@"; do
    if ! command -v "${cmd%%:*}" >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/"${cmd%%:*}" >/dev/null 2>&1; then
      missing+=("${cmd##*:}")
    fi
  done
  if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    missing+=(python3-venv)
  fi
  if [ "${#missing[@]}" -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      postgresql iptables nftables iproute2 python3-venv "${missing[@]}" >/dev/null
  fi
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
}

# The LXC provider's host packages (Debian's; vagrant-lxc registers itself as a system plugin).
setup_lxc() {
  local missing=()
  for pair in lxc-start:lxc vagrant:vagrant debootstrap:debootstrap dnsmasq:dnsmasq-base \
              rsync:rsync ssh:openssh-client iptables:iptables nft:nftables; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair##*:}")
  done
  [ -d /usr/share/lxc/config ] || missing+=(lxc-templates)
  dpkg-query -W -f='${Status}' vagrant-lxc 2>/dev/null | grep -q "install ok installed" \
    || missing+=(vagrant-lxc)
  if [ "${#missing[@]}" -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" lxc-templates >/dev/null
  fi
}

vagrant_lxc_suite() {
  setup_lxc
  local began=$SECONDS rc=0
  .venv/bin/python -m pytest tests/vagrant tests/infra --lab-backend vagrant \
    --vagrant-provider lxc -v -p no:cacheprovider --capture=tee-sys --durations=5 "$@" || rc=$?
  echo "Vagrant-LXC suite: $((SECONDS - began)) s"
  return "$rc"  # (the echo's status, before: a failed suite passed CI)
}

case "${1:-}" in
  setup)
    setup ;;
  demo)
    setup
    # the report folder outlives the lab (`lab down` removes /var/tmp/bobry-lab)
    report="${BOBRY_REPORT_DIR:-/var/tmp/bobry-reports}/demo-$(date +%Y%m%d-%H%M%S)"
    trap '.venv/bin/python -m lab down' EXIT
    .venv/bin/python -m lab up
    rc=0
    .venv/bin/python -m lab experiment failover --report-dir "$report" || rc=$?
    .venv/bin/python -m lab down
    trap - EXIT
    echo "the report (picture, timeline, figures): $report/report.md" >&2
    exit "$rc" ;;
  test)
    # the tests also check the Vagrantfile (vagrant validate) and the shell scripts
    # and the HAProxy example config (haproxy -c)
    setup vagrant:vagrant shellcheck:shellcheck haproxy:haproxy
    shift
    if [ "$#" -gt 0 ]; then
      exec .venv/bin/python -m pytest -v -p no:cacheprovider "$@"
    fi
    status=0
    began=$SECONDS
    # the LXC box (debootstrap: minutes on a fresh machine) is built while the unit tests and the
    # simulation budget run; the lab suites, whose timings a busy machine disturbs, wait for it
    box_log=$(mktemp /tmp/bobry-lxc-box.XXXXXX)
    (setup_lxc && bash provision/lxc-box.sh) >"$box_log" 2>&1 &
    box_pid=$!
    .venv/bin/python -m pytest tests/unit tests/sim -v -p no:cacheprovider --durations=10 || status=$?
    if ! wait "$box_pid"; then
      status=1
    fi
    echo "the LXC box (built beside the unit tests):"
    cat "$box_log"
    rm -f "$box_log"
    .venv/bin/python -m pytest tests --ignore=tests/unit --ignore=tests/sim -v \
      -p no:cacheprovider --durations=25 || status=$?
    echo "embedded suite: $((SECONDS - began)) s"
    vagrant_lxc_suite || status=$?
    exit "$status" ;;
  test-vagrant)
    setup vagrant:vagrant shellcheck:shellcheck
    shift
    vagrant_lxc_suite "$@" ;;
  *)
    echo "usage: $0 setup|demo|test [pytest args]|test-vagrant [pytest args]" >&2
    exit 2 ;;
esac
