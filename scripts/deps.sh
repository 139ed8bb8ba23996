#!/usr/bin/env bash
# Installs what nodecrypt needs to build, test, bench and demo, if it is missing.
# Idempotent: a no-op when everything is present.
set -euo pipefail

packages=(
  pkg-config clang libclang-dev           # bindgen for libcryptsetup-rs / libblkid-rs
  libcryptsetup-dev cryptsetup-bin        # LUKS2 through the real libcryptsetup; the CLI as independent checker
  libblkid-dev util-linux                 # signature probing, losetup, blkid, sfdisk
  libssl-dev                              # the OpenSSL peer in tests and benches
  e2fsprogs                               # mkfs.ext4 / fsck in tests and the demo
  fuse3 libfuse3-dev                      # userspace data path
  kmod                                    # modprobe/lsmod in doctor
  fdisk                                   # sfdisk: partition tables in tests
  systemd                                 # systemd-analyze and systemd-fstab-generator (tests/tests/systemd.rs)
  etcd-server etcd-client                 # the broker's scale-out store: a real 3-member cluster in tests/tests/etcd.rs
  protobuf-compiler libprotobuf-dev       # protoc and its well-known types, for etcd-client's build script
  qemu-system-x86 busybox-static debootstrap dmsetup binutils  # VM tests: TCG guest, its initramfs and root image
  softhsm2 opensc                         # the broker's PKCS#11 KEK seal against SoftHSM2 (tests/tests/hsm.rs); pkcs11-tool
  ${NODECRYPT_EXTRA_PACKAGES:-}
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "deps: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "deps: cargo is required (rustup.rs)"; exit 1; }
