#!/usr/bin/env bash
# Boots the guest once under TCG (no KVM needed), no network, and waits for it to power
# off. Data disks are raw images attached as virtio drives (vda, vdb, ... in order);
# the serial console goes to a file. Hard timeout: qemu is killed when it expires (exit
# 124, as timeout(1)).
# Usage: boot.sh --kernel DIR --initrd FILE --console LOG --timeout SECS
#                [--append "ARGS"] [--smp N] [--disk IMG]...
source "$(dirname "$0")/lib.sh"

kdir= initrd= console= timeout_s= append= smp=2 disks=()
while (($#)); do
  case "$1" in
    --kernel) kdir=$2; shift 2 ;;
    --initrd) initrd=$2; shift 2 ;;
    --console) console=$2; shift 2 ;;
    --timeout) timeout_s=$2; shift 2 ;;
    --append) append=$2; shift 2 ;;
    --smp) smp=$2; shift 2 ;;
    --disk) disks+=("$2"); shift 2 ;;
    *) die "unknown argument $1" ;;
  esac
done
[ -n "$kdir" ] && [ -n "$initrd" ] && [ -n "$console" ] && [ -n "$timeout_s" ] ||
  die "usage: boot.sh --kernel DIR --initrd FILE --console LOG --timeout SECS [--disk IMG]..."

args=(
  -machine q35 -accel tcg,thread=multi -cpu max -smp "$smp" -m 1024
  -nic none -nographic -no-reboot -monitor none -serial "file:$console"
  -kernel "$kdir/vmlinuz" -initrd "$initrd"
  -append "console=ttyS0 panic=-1 loglevel=4 $append"
  -device virtio-rng-pci
)
for d in "${disks[@]}"; do
  args+=(-drive "file=$d,format=raw,if=virtio,cache=unsafe")
done

: >"$console"
exec timeout --kill-after=5 "$timeout_s" qemu-system-x86_64 "${args[@]}" </dev/null
