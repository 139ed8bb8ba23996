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

# download DIR PKG VER: apt-get download into DIR. apt's sandbox user must be able to
# write there; the package is verified against the signed lists all the same.
download() {
  chmod 0777 "$1"
  (cd "$1" && apt-get download -q "$2=$3" >/dev/null)
}

fetch() {
  local pkg ver dir tmp kver attempt
  for attempt in 1 2; do
    pkg=$(resolve)
    ver=$([ -z "$pkg" ] || apt-cache policy "$pkg" | sed -n 's/^ *Candidate: //p')
    dir="$VM_DIR/kernel/${pkg}_${ver}"
    [ -z "$pkg" ] || [ ! -e "$dir/.done" ] || { echo "$dir"; return; }
    tmp=$(mktemp -d "$VM_DIR/kernel.tmp.XXXXXX")
    if [ -n "$pkg" ] && [ -n "$ver" ] && download "$tmp" "$pkg" "$ver"; then
      break
    fi
    rm -rf "$tmp"
    # Unknown package or stale lists (the mirror dropped that version): refresh, retry.
    [ "$attempt" = 1 ] || die "cannot download the kernel behind linux-image-cloud-amd64 ($pkg $ver)"
    log "apt-get update (kernel package ${pkg:-unresolved} ${ver:-?} not downloadable)"
    apt-get update -qq
  done
  log "fetched $pkg $ver"
  mkdir -p "$tmp/x"
  dpkg-deb -x "$tmp"/*.deb "$tmp/x"
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
  # Older kernels are not needed any more.
  for old in "$VM_DIR"/kernel/*; do [ "$old" = "$dir" ] || rm -rf "$old"; done
  echo "$dir"
}

with_lock kernel fetch
