#!/bin/sh
# The lab's own iptables chains (lab/backend.py CHAIN_IN, CHAIN_OUT), jumped to from INPUT and
# OUTPUT: faults go there, never into the agent's nftables fence. Installed by
# provision/vagrant.sh as /usr/local/sbin/bobry-lab-chains, run at every boot by the unit
# bobry-lab-chains.service. Idempotent.
set -e
for pair in bobry-lab-in:INPUT bobry-lab-out:OUTPUT; do
  chain=${pair%%:*}
  hook=${pair##*:}
  iptables -w 5 -n -L "$chain" >/dev/null 2>&1 || iptables -w 5 -N "$chain"
  iptables -w 5 -C "$hook" -j "$chain" 2>/dev/null || iptables -w 5 -I "$hook" 1 -j "$chain"
done
