#!/usr/bin/env bash
# Fetches Debian's cloud kernel (linux-image-cloud-amd64 → the versioned package it
# depends on) with `apt-get download`, extracts vmlinuz and the module tree, runs depmod.
# Cached under $VM_DIR/kernel/<package>_<version>/. Prints that directory on stdout:
#   vmlinuz, lib/modules/<kver>/..., kver (a file holding the kernel release).
source "$(dirname "$0")/lib.sh"

resolve() {
  apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    sed -n 's/^ *Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | head -n1
}

fetch() {
  local pkg ver dir tmp
  pkg=$(resolve)
  if [ -z "$pkg" ]; then
    log "linux-image-cloud-amd64 unknown to apt-cache: apt-get update"
    apt-get update -qq
    pkg=$(resolve)
  fi
  [ -n "$pkg" ] || die "cannot resolve the package behind linux-image-cloud-amd64"
  ver=$(apt-cache policy "$pkg" | sed -n 's/^ *Candidate: //p')
  dir="$VM_DIR/kernel/${pkg}_${ver}"
  if [ ! -e "$dir/.done" ]; then
    log "fetching $pkg $ver"
    tmp=$(mktemp -d "$VM_DIR/kernel.tmp.XXXXXX")
    # apt's sandbox user cannot write into root-owned temp dirs; the download is verified
    # against the signed package lists all the same.
    (cd "$tmp" && chmod 0777 . && apt-get download -q "$pkg=$ver" >/dev/null) ||
      { apt-get update -qq && (cd "$tmp" && apt-get download -q "$pkg=$ver" >/dev/null); }
    mkdir -p "$tmp/x"
    dpkg-deb -x "$tmp"/*.deb "$tmp/x"
    local kver
    kver=$(ls "$tmp/x/lib/modules")
    [ -n "$kver" ] || die "no module tree in $pkg"
    depmod -b "$tmp/x" "$kver"
    rm -rf "$dir" && mkdir -p "$dir/lib/modules"
    cp "$tmp/x/boot/vmlinuz-$kver" "$dir/vmlinuz"
    cp "$tmp/x/boot/config-$kver" "$dir/config"
    mv "$tmp/x/lib/modules/$kver" "$dir/lib/modules/"
    echo "$kver" >"$dir/kver"
    rm -rf "$tmp"
    touch "$dir/.done"
  fi
  echo "$dir"
}

with_lock kernel fetch
