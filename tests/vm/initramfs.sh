#!/usr/bin/env bash
# Builds the guest initramfs (an uncompressed newc cpio):
#   busybox-static, the guest init (tests/vm/init) and scenarios (tests/vm/guest/*.sh),
#   the kernel modules the guest needs (virtio, dm-crypt, xts, aesni, af_alg and their
#   dependencies from modules.dep), dmsetup and cryptsetup for inspection, and the given
#   binaries (debug info stripped) with every library they link (ldd).
# Usage: initramfs.sh KERNEL_DIR OUT.cpio BINARY...
source "$(dirname "$0")/lib.sh"

kdir=$1 out=$2
shift 2
kver=$(cat "$kdir/kver")
modules=(virtio_pci virtio_blk dm_mod dm_crypt xts aesni_intel algif_skcipher virtio_rng)

stage=$(mktemp -d "$VM_DIR/initramfs.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,run,tmp,mnt,root,scenarios,lib/modules}

# busybox and its applets (as symlinks, so ash finds every tool on PATH).
cp /bin/busybox "$stage/bin/busybox"
for applet in $("$stage/bin/busybox" --list); do
  [ -e "$stage/bin/$applet" ] || ln -s busybox "$stage/bin/$applet"
done
ln -sf ../bin/busybox "$stage/sbin/modprobe"

# Modules: copy each one modprobe would load, then index them for busybox modprobe.
for m in "${modules[@]}"; do
  modprobe -d "$kdir" -S "$kver" --show-depends "$m" | while read -r kind path _; do
    [ "$kind" = insmod ] || continue
    rel=${path#"$kdir"/}
    mkdir -p "$stage/$(dirname "$rel")"
    cp "$path" "$stage/$rel"
  done
done
cp "$kdir/lib/modules/$kver"/modules.{order,builtin,builtin.modinfo} "$stage/lib/modules/$kver/"
depmod -b "$stage" "$kver"

# Binaries and the libraries they link.
copy_libs() {
  ldd "$1" 2>/dev/null | grep -o '/[^ ]*' | while read -r lib; do
    [ -e "$stage$lib" ] && continue
    mkdir -p "$stage$(dirname "$lib")"
    cp -L "$lib" "$stage$lib"
  done
}
for tool in /usr/sbin/dmsetup /usr/sbin/cryptsetup; do
  cp "$tool" "$stage/usr/sbin/"
  copy_libs "$tool"
done
for b in "$@"; do
  [ -x "$b" ] || die "not an executable: $b"
  strip --strip-debug -o "$stage/usr/bin/$(basename "$b")" "$b"
  copy_libs "$b"
done

cp "$VM_SRC/init" "$stage/init"
cp "$VM_SRC"/guest/*.sh "$stage/scenarios/"
chmod 0755 "$stage/init" "$stage"/scenarios/*.sh
echo "root:x:0:0:root:/root:/bin/sh" >"$stage/etc/passwd"
echo "root:x:0:" >"$stage/etc/group"

(cd "$stage" && find . -print0 | sort -z | busybox cpio -o -H newc -R 0:0 -0 2>/dev/null) >"$out.tmp"
mv "$out.tmp" "$out"
log "initramfs $(du -h "$out" | cut -f1) → $out"
