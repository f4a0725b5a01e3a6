#!/usr/bin/env bash
# Provision one VM of the Vagrant lab: provision/vagrant.sh NODE (pg1, pg2, arb or client).
# Idempotent: running it again (vagrant provision) changes nothing.
set -euo pipefail

node="${1:?usage: vagrant.sh NODE}"
src=/vagrant
etc=/etc/bobry

export DEBIAN_FRONTEND=noninteractive
packages=(postgresql iptables nftables iproute2 python3 python3-psycopg2)
# A VM keeps its own clock (systemd-timesyncd); a container shares its host's.
in_container=no
if systemd-detect-virt --quiet --container; then
  in_container=yes
else
  packages+=(systemd-timesyncd)
fi
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's own cluster would hold 127.0.0.1:5432, which the agent's PostgreSQL listens on.
if systemctl is-enabled --quiet postgresql 2>/dev/null; then
  systemctl disable --now postgresql
fi

# One clock for every figure: the lab refuses experiments when a machine is off by > 50 ms.
if [ "$in_container" = yes ]; then
  echo "time: $(systemd-detect-virt --container) container, the host's clock"
else
  systemctl enable --quiet --now systemd-timesyncd
  if [ "$(timedatectl show -p NTP --value)" != yes ]; then
    echo "time: systemd-timesyncd is not active (timedatectl: NTP=no)" >&2
    exit 1
  fi
  echo "time: systemd-timesyncd active, synchronized: $(timedatectl show -p NTPSynchronized --value)"
fi

# Secrets: made once on the Vagrant host, installed once, root-only; the copy the file
# provisioner left in /tmp goes.
install -d -m 0755 "$etc"
for name in replication.password app.password agent.key; do
  if [ ! -f "$etc/$name" ]; then
    install -m 0600 -o root -g root "/tmp/bobry-secrets/$name" "$etc/$name"
  fi
done
rm -rf /tmp/bobry-secrets

# The lab's own iptables chains, made at every boot before the agent starts (see the script).
chains=/usr/local/sbin/bobry-lab-chains
if ! cmp -s "$src/provision/bobry-lab-chains.sh" "$chains"; then
  install -m 0755 "$src/provision/bobry-lab-chains.sh" "$chains"
fi
chains_unit=/etc/systemd/system/bobry-lab-chains.service
chains_unit_text="[Unit]
Description=Bobry lab: fault-injection iptables chains
Before=bobry-agent.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=$chains

[Install]
WantedBy=multi-user.target"
if [ ! -f "$chains_unit" ] || [ "$(cat "$chains_unit")" != "$chains_unit_text" ]; then
  printf '%s\n' "$chains_unit_text" > "$chains_unit"
  systemctl daemon-reload
fi
systemctl enable --quiet bobry-lab-chains
systemctl restart bobry-lab-chains

if [ "$node" = client ]; then
  # pgbench and the write probe authenticate as the application role
  pgpass="$etc/client.pgpass"
  line="*:*:*:app:$(cat "$etc/app.password")"
  if [ ! -f "$pgpass" ] || [ "$(cat "$pgpass")" != "$line" ]; then
    install -m 0600 /dev/null "$pgpass"
    printf '%s\n' "$line" > "$pgpass"
  fi
  exit 0
fi

changed=no
install -d -m 0755 /opt/bobry
for pair in "agent.py:/opt/bobry/agent.py:0755" "agent.ini:$etc/agent.ini:0644"; do
  IFS=: read -r from to mode <<< "$pair"
  if ! cmp -s "$src/$from" "$to"; then
    install -m "$mode" "$src/$from" "$to"
    changed=yes
  fi
done

unit=/etc/systemd/system/bobry-agent.service
want="[Unit]
Description=Bobry failover agent ($node)
After=network-online.target
Wants=network-online.target

[Service]
ExecStart=/usr/bin/python3 /opt/bobry/agent.py --config $etc/agent.ini --node $node
Restart=always
RestartSec=1
# SIGTERM stops the agent only; PostgreSQL keeps running and is adopted on restart.
KillMode=process

[Install]
WantedBy=multi-user.target"
if [ ! -f "$unit" ] || [ "$(cat "$unit")" != "$want" ]; then
  printf '%s\n' "$want" > "$unit"
  systemctl daemon-reload
fi
systemctl enable --quiet bobry-agent
if [ "$changed" = yes ]; then
  systemctl restart bobry-agent  # a restart is always safe: the agent adopts what it finds
else
  systemctl is-active --quiet bobry-agent || systemctl start bobry-agent
fi
