#!/usr/bin/env bash
# Makes a bootable ext4 root image: the cached Debian tree (rootfs.sh), then each overlay
# directory copied on top in order (binaries, units, configs, test units), then
# `systemctl enable` of the given units, inside the tree (no boot needed).
# Usage: root-image.sh TREE OUT.img SIZE_MIB OVERLAY_DIR... [-- UNIT_TO_ENABLE...]
source "$(dirname "$0")/lib.sh"

tree=$1 out=$2 size=$3
shift 3
overlays=() units=()
while (($#)); do
  if [ "$1" = -- ]; then shift; units=("$@"); break; fi
  overlays+=("$1"); shift
done

stage=$(mktemp -d "$VM_DIR/root-image.XXXXXX")
trap 'rm -rf "$stage"' EXIT
cp -a "$tree/." "$stage/"
for o in "${overlays[@]}"; do cp -a "$o/." "$stage/"; done
# Every binary we installed must find its libraries in the image.
for b in "$stage"/usr/bin/nodecrypt*; do
  [ -e "$b" ] || continue
  missing=$(chroot "$stage" ldd "/usr/bin/$(basename "$b")" | grep 'not found' || true)
  [ -z "$missing" ] || die "$(basename "$b") lacks libraries in the root image: $missing (add the package to rootfs.sh)"
done
if ((${#units[@]})); then
  systemctl --root="$stage" enable "${units[@]}" >/dev/null 2>&1 ||
    die "systemctl --root enable ${units[*]} failed"
fi
rm -f "$out" && truncate -s "${size}M" "$out"
mkfs.ext4 -q -F -L root -E root_owner=0:0 -d "$stage" "$out"
