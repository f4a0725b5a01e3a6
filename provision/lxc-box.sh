#!/usr/bin/env bash
# Build the Vagrant box of the LXC provider, once: Debian 12 (bookworm, amd64) made with
# debootstrap from this machine's configured Debian mirror. Nothing comes from Vagrant Cloud.
#   provision/lxc-box.sh          build and `vagrant box add` it, unless the same box is there
#   provision/lxc-box.sh --force  build it again
# Idempotent: a box built by this very script (same content hash) is reused in about 10 ms.
# Needs root (debootstrap, chroot). Overridable: BOBRY_DEBIAN_MIRROR (default: the mirror of
# this machine's apt sources that serves bookworm), BOBRY_LXC_BOX (default bobry/bookworm-lxc).
set -euo pipefail
cd "$(dirname "$0")/.."

box="${BOBRY_LXC_BOX:-bobry/bookworm-lxc}"
suite=bookworm
boxes="${VAGRANT_HOME:-$HOME/.vagrant.d}/boxes/${box//\//-VAGRANTSLASH-}"
stamp_file="$boxes/bobry-build.sha256"
cache=/var/cache/bobry-lxc-box  # downloaded .deb files, kept for rebuilds
# What goes into the box: the base system, what Vagrant needs (ssh, sudo, rsync for the synced
# folder) and the packages provision/vagrant.sh installs, so that `vagrant up` needs no apt.
include=systemd,systemd-sysv,dbus,openssh-server,sudo,rsync,iproute2,iptables,nftables
include+=,python3,python3-psycopg2,ca-certificates,procps,less,iputils-ping,netbase
# PostgreSQL is installed in a second step, with its main cluster and services disabled.
late_packages=(postgresql)

if [ "$(id -u)" -ne 0 ]; then
  echo "lxc-box.sh: run as root (debootstrap and the LXC provider need it)" >&2
  exit 2
fi
if [ "$(dpkg --print-architecture)" != amd64 ]; then
  echo "lxc-box.sh: the box is amd64; this machine is $(dpkg --print-architecture)" >&2
  exit 2
fi

# One build at a time: Vagrant runs the triggers of the four machines in parallel, and the
# others then find the box built.
exec 9< "$0"
flock 9
want="$(sha256sum < "$0" | cut -d" " -f1)"
if [ "${1:-}" != --force ] && [ -d "$boxes" ] && [ "$(cat "$stamp_file" 2>/dev/null)" = "$want" ]; then
  echo "box $box: reused (built by this script, $(date -r "$stamp_file" +%F\ %T))"
  exit 0
fi

mirror() {
  # The first http(s) source of this machine that serves $suite's main (not -security).
  if [ -n "${BOBRY_DEBIAN_MIRROR:-}" ]; then
    echo "$BOBRY_DEBIAN_MIRROR"
    return
  fi
  python3 - "$suite" <<'EOF'
import glob, re, sys
suite = sys.argv[1]
found = []
for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        words = re.sub(r"\[[^]]*\]", "", line.split("#")[0]).split()
        if len(words) >= 4 and words[0] == "deb" and words[2] == suite and "main" in words[3:]:
            found.append(words[1])
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in open(path).read().split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            if ":" in line and not line.startswith(("#", " ")):
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.split()
        if (suite in fields.get("suites", []) and "main" in fields.get("components", [])
                and "deb" in fields.get("types", [])):
            found += fields.get("uris", [])
found = [u for u in found if u.startswith(("http://", "https://"))]
if not found:
    sys.exit(f"no apt source serves {suite} main: set BOBRY_DEBIAN_MIRROR")
print(found[0])
EOF
}

began=$(date +%s)
url="$(mirror)"
echo "box $box: building Debian $suite from $url (debootstrap, about a minute)"
# The build happens in a tmpfs of its own: unpacking and removing a root filesystem on disk is
# slow (on a filesystem mounted with `discard`, minutes), in memory it is not.
work="$(mktemp -d /var/tmp/bobry-box.XXXXXX)"
mount -t tmpfs -o size=3g,mode=0755 bobry-box "$work"
cleanup() {
  for m in var/cache/apt/archives proc; do
    if mountpoint -q "$work/rootfs/$m" 2>/dev/null; then umount -l "$work/rootfs/$m"; fi
  done
  umount -l "$work"
  rmdir "$work"
}
trap cleanup EXIT
root="$work/rootfs"

# Downloaded packages are kept in $cache: a rebuild downloads nothing it has.
mkdir -p "$cache/debootstrap" "$cache/apt/partial"
debootstrap --variant=minbase --cache-dir="$cache/debootstrap" --include="$include" \
  "$suite" "$root" "$url" \
  > "$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log" >&2; exit 1; }

# PostgreSQL without its own cluster, and no service started while building.
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
chmod 0755 "$root/usr/sbin/policy-rc.d"
mkdir -p "$root/etc/postgresql-common/createcluster.d"
echo "create_main_cluster = false" > "$root/etc/postgresql-common/createcluster.d/bobry.conf"
mount -t proc proc "$root/proc"
mount --bind "$cache/apt" "$root/var/cache/apt/archives"
DEBIAN_FRONTEND=noninteractive chroot "$root" apt-get install -y -qq --no-install-recommends \
  "${late_packages[@]}" > "$work/apt.log" 2>&1 || { tail -20 "$work/apt.log" >&2; exit 1; }
umount "$root/var/cache/apt/archives" "$root/proc"
rm -f "$root/usr/sbin/policy-rc.d"
rm -rf "$root"/var/lib/apt/lists/*

# The vagrant user: passwordless sudo, Vagrant's well-known insecure key (the Vagrantfile sets
# ssh.insert_key = false for this provider). The containers are reachable only from this
# machine, on the lab's bridge.
key=
for candidate in /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub \
                 /opt/vagrant/embedded/gems/gems/vagrant-*/keys/vagrant.pub; do
  [ -f "$candidate" ] && key="$candidate" && break
done
if [ -z "$key" ]; then
  echo "lxc-box.sh: Vagrant's insecure public key not found (is vagrant installed?)" >&2
  exit 1
fi
chroot "$root" useradd --create-home --shell /bin/bash vagrant
install -d -m 0700 -o 1000 -g 1000 "$root/home/vagrant/.ssh"
install -m 0600 -o 1000 -g 1000 "$key" "$root/home/vagrant/.ssh/authorized_keys"
chroot "$root" chown -R vagrant:vagrant /home/vagrant/.ssh
echo "vagrant ALL=(ALL) NOPASSWD: ALL" > "$root/etc/sudoers.d/vagrant"
chmod 0440 "$root/etc/sudoers.d/vagrant"
echo "UseDNS no" > "$root/etc/ssh/sshd_config.d/bobry.conf"

# Network: systemd-networkd, DHCP on eth0 (LXC's NAT bridge: apt); eth1 (the lab's bridge) is
# configured by LXC itself and left alone. ifupdown would need udev, which a container lacks.
cat > "$root/etc/systemd/network/eth0.network" <<'EOF'
[Match]
Name=eth0

[Network]
DHCP=ipv4
EOF
chroot "$root" systemctl enable --quiet systemd-networkd
chroot "$root" systemctl mask --quiet systemd-udevd.service systemd-udevd-control.socket \
  systemd-udevd-kernel.socket
echo "nameserver 10.0.3.1" > "$root/etc/resolv.conf"  # dnsmasq of LXC's NAT bridge
echo "bobry-box" > "$root/etc/hostname"
rm -f "$root"/etc/ssh/ssh_host_*  # each container makes its own (below, at first boot)
cat > "$root/etc/systemd/system/bobry-ssh-keys.service" <<'EOF'
[Unit]
Description=Generate this container's ssh host keys
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
EOF
chroot "$root" systemctl enable --quiet bobry-ssh-keys.service
: > "$root/etc/machine-id"

# The box: metadata.json ("version" 1.0.0, empty template-opts), lxc-config, rootfs.tar.gz
# with numeric owners and extended attributes (ping's cap_net_raw), entries under ./rootfs/.
cat > "$work/metadata.json" <<EOF
{"provider": "lxc", "version": "1.0.0", "built-on": "$(date -u +%FT%TZ)", "template-opts": {}}
EOF
cat > "$work/lxc-config" <<'EOF'
lxc.include = /usr/share/lxc/config/debian.common.conf
lxc.arch = amd64
EOF
tar --numeric-owner --xattrs --xattrs-include='*' -C "$work" -czf "$work/rootfs.tar.gz" ./rootfs
tar -C "$work" -czf "$work/bobry.box" metadata.json lxc-config rootfs.tar.gz
vagrant box add --force --name "$box" "$work/bobry.box" > "$work/box-add.log" 2>&1 \
  || { cat "$work/box-add.log" >&2; exit 1; }
echo "$want" > "$stamp_file"
echo "box $box: built and added in $(( $(date +%s) - began )) s ($(du -h "$work/bobry.box" | cut -f1))"
