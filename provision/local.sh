#!/usr/bin/env bash
# The embedded lab on this Debian/Ubuntu machine, as root:
#   provision/local.sh setup   install PostgreSQL, iptables, nftables, iproute2 and a Python venv (.venv)
#   provision/local.sh demo    setup, bring the lab up, run the failover experiment, tear down,
#                              say where the report is
#   provision/local.sh test    setup, run the whole test suite (what CI runs)
set -euo pipefail
cd "$(dirname "$0")/.."

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
    .venv/bin/python -m pytest tests -v -p no:cacheprovider "$@" ;;
  *)
    echo "usage: $0 setup|demo|test [pytest args]" >&2
    exit 2 ;;
esac
