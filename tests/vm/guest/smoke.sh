# Harness smoke test: the kernel's dm-crypt with a keyring key, without the agent.
# vda: scratch disk. Prints the dm table between NCVM:TABLE markers.
printf 'passphrase-for-smoke-only' >/tmp/pw
cryptsetup luksFormat -q --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
  --cipher aes-xts-plain64 --key-size 512 /dev/vda /tmp/pw
cryptsetup open --perf-no_read_workqueue --perf-no_write_workqueue --key-file /tmp/pw /dev/vda smoke
echo "NCVM:TABLE $(dmsetup table smoke)"
dd if=/dev/urandom of=/dev/mapper/smoke bs=64k count=16 conv=fsync 2>/dev/null
echo "NCVM:SHA $(dd if=/dev/mapper/smoke bs=64k count=16 2>/dev/null | sha256sum)"
cryptsetup close smoke
