#!/usr/bin/env bash
# Builds (once) a Debian 12 root tree with debootstrap: minbase + systemd + udev + the
# libraries the nodecrypt binaries link, and the cloud kernel's module tree (the kernel
# auto-loads dm-crypt/xts/aesni from it). Cached under $VM_DIR/rootfs/<key>/tree, the key
# covering the package list and the kernel. Prints the tree's path on stdout.
# Usage: rootfs.sh KERNEL_DIR
source "$(dirname "$0")/lib.sh"

kdir=$1
mirror=${NODECRYPT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
include=systemd,systemd-sysv,udev,dmsetup,libcryptsetup12,libblkid1,libssl3,libfuse3-3,fuse3,e2fsprogs,kmod,util-linux,procps
key=$(printf '%s|%s|%s' "$include" "$(basename "$kdir")" "$(sha256sum "$0" | cut -c1-16)" | sha256sum | cut -c1-16)
dir="$VM_DIR/rootfs/bookworm-$key"

build() {
  [ -e "$dir/.done" ] && return
  rm -rf "$dir" && mkdir -p "$dir"
  log "debootstrap bookworm (minbase + $include) from $mirror"
  if ! debootstrap --variant=minbase --include="$include" bookworm "$dir/tree" "$mirror" \
    >"$dir/debootstrap.log" 2>&1; then
    tail -n 30 "$dir/debootstrap.log" >&2
    die "debootstrap failed (log: $dir/debootstrap.log)"
  fi
  local t=$dir/tree kver
  kver=$(cat "$kdir/kver")
  cp -a "$kdir/lib/modules/$kver" "$t/lib/modules/"
  echo nodecrypt-vm >"$t/etc/hostname"
  echo "127.0.0.1 localhost nodecrypt-vm" >"$t/etc/hosts"
  # A fixed machine id: every boot is the same machine (no first-boot behaviour).
  echo 6e6f64656372797074766d0000000001 >"$t/etc/machine-id"
  # Nothing on this image needs these; they only slow the boot down under TCG.
  rm -f "$t"/etc/systemd/system/timers.target.wants/*
  ln -sf /dev/null "$t/etc/systemd/system/getty@.service"
  ln -sf /dev/null "$t/etc/systemd/system/serial-getty@.service"
  ln -sf /dev/null "$t/etc/systemd/system/getty-static.service"
  apt-get clean -o "Dir=$t" -o "Dir::Cache=$t/var/cache/apt" 2>/dev/null || true
  rm -rf "$t"/var/cache/apt/archives/*.deb "$t"/var/lib/apt/lists/*
  touch "$dir/.done"
  # Older trees (another package list or kernel) are not needed any more.
  for old in "$VM_DIR"/rootfs/bookworm-*; do [ "$old" = "$dir" ] || rm -rf "$old"; done
}

with_lock rootfs build
echo "$dir/tree"
