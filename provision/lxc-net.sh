#!/usr/bin/env bash
# The host's side of the LXC lab, as root (the Vagrantfile's triggers and `python -m lab
# --backend vagrant up|down` run it; idempotent):
#   provision/lxc-net.sh up              guard route, lab bridge, LXC's NAT bridge, the tmpfs
#                                        of the containers' root filesystems
#   provision/lxc-net.sh down            remove all of it, restore ip_forward
#   provision/lxc-net.sh down-if-unused  `down` once no container is attached to the lab bridge
#   provision/lxc-net.sh status          what exists
# The lab bridge (bobrybr0, 192.168.56.1/24) joins the containers' eth1; this machine's address
# on it lets ssh and the port watcher reach the containers. While the lab exists, the guard
# route `unreachable 192.168.56.0/24 metric 1000` keeps lab addresses from ever following the
# default route off this machine (the bridge's connected route wins while the bridge is up),
# and nftables table `inet bobry_lab` drops anything routed between the lab bridge and another
# interface. LXC's NAT bridge (lxcbr0, 10.0.3.0/24, dnsmasq) gives the containers the Debian
# mirror (apt); it is started here only if it is not up, and then stopped by `down`.
set -euo pipefail

rootfs=/var/lib/bobry-lxc  # a tmpfs: the containers' root filesystems (Vagrantfile)
bridge=bobrybr0
address=192.168.56.1/24
subnet=192.168.56.0/24
state=/run/bobry-lxc-lab  # what `up` changed, so that `down` undoes only that
lxc_net=/usr/libexec/lxc/lxc-net

if [ "$(id -u)" -ne 0 ]; then
  echo "lxc-net.sh: run as root" >&2
  exit 2
fi
# One run at a time: Vagrant runs the triggers of the four machines in parallel.
exec 9< "$0"
flock 9

# (grep without -q in pipelines: an early exit would SIGPIPE the writer, and pipefail would
# turn a match into a failure)
guard_present() { ip route show type unreachable | grep "^unreachable $subnet " >/dev/null; }

up() {
  mkdir -p "$state"
  [ -f "$state/ip_forward" ] || cat /proc/sys/net/ipv4/ip_forward > "$state/ip_forward"
  # the guard first: from here on no lab address can leave by the default route
  guard_present || ip route add unreachable "$subnet" metric 1000
  if ! ip link show "$bridge" >/dev/null 2>&1; then
    ip link add "$bridge" type bridge
  fi
  ip addr show dev "$bridge" | grep "inet $address " >/dev/null || ip addr add "$address" dev "$bridge"
  ip link set "$bridge" up
  nft -f - <<EOF
table inet bobry_lab
delete table inet bobry_lab
table inet bobry_lab {
  chain forward {
    type filter hook forward priority -5; policy accept;
    iifname "$bridge" oifname != "$bridge" drop
    oifname "$bridge" iifname != "$bridge" drop
  }
}
EOF
  if ! ip link show lxcbr0 >/dev/null 2>&1; then
    "$lxc_net" start >/dev/null
    touch "$state/lxc-net-started"
  fi
  # The containers' root filesystems live in memory (about 0.8 GB each): made and removed in
  # seconds, where a disk mounted with `discard` takes minutes to delete them.
  mkdir -p "$rootfs"
  mountpoint -q "$rootfs" || mount -t tmpfs -o size=8g,mode=0755 bobry-lxc "$rootfs"
}

down() {
  if [ -f "$state/lxc-net-started" ]; then
    "$lxc_net" stop >/dev/null || true
    rm -f "$state/lxc-net-started"
  fi
  if mountpoint -q "$rootfs"; then
    umount "$rootfs" || echo "lxc-net.sh: $rootfs still in use (containers left?): kept" >&2
  fi
  if [ -d "$rootfs" ] && ! mountpoint -q "$rootfs"; then rmdir "$rootfs"; fi
  nft delete table inet bobry_lab 2>/dev/null || true
  if ip link show "$bridge" >/dev/null 2>&1; then
    ip link set "$bridge" down
    ip link del "$bridge"
  fi
  # the guard goes last, once no lab address is on this machine any more
  if guard_present; then
    ip route del unreachable "$subnet" metric 1000
  fi
  if [ -f "$state/ip_forward" ]; then
    cat "$state/ip_forward" > /proc/sys/net/ipv4/ip_forward
  fi
  rm -rf "$state"
}

in_use() {
  # a container whose configuration links an interface to the lab bridge
  grep -ls "^lxc.net.[0-9]*.link *= *$bridge\$" /var/lib/lxc/*/config 2>/dev/null | grep . >/dev/null
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  down-if-unused)
    if in_use; then
      echo "lxc-net.sh: containers still use $bridge; leaving the lab network up"
    else
      down
    fi ;;
  status)
    ip -br addr show "$bridge" 2>/dev/null || echo "$bridge: absent"
    ip -br addr show lxcbr0 2>/dev/null || echo "lxcbr0: absent"
    ip route show type unreachable | grep "$subnet" || echo "guard route: absent"
    echo "ip_forward: $(cat /proc/sys/net/ipv4/ip_forward)"
    if mountpoint -q "$rootfs"; then echo "$rootfs: mounted"; else echo "$rootfs: absent"; fi ;;
  *)
    echo "usage: $0 up|down|down-if-unused|status" >&2
    exit 2 ;;
esac
