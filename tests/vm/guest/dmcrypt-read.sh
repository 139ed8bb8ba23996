# dm-crypt, host → guest: the host has encrypted its pattern into the disk images with
# the userspace engine; the agent opens them through dm-crypt and the guest hashes what
# the kernel decrypts.
. /scenarios/common.sh
start_broker
start_agent
for v in v512:vdb v4096:vdc; do
  id=${v%%:*} dev=/dev/${v#*:}
  nodecrypt open "$dev"
  size=$(stat -c %s "/state/pattern-$id.bin")
  echo "NCVM:SHA $id $(head -c "$size" "/dev/mapper/nodecrypt-$id" | sha256sum | cut -d' ' -f1)"
  nodecrypt close --volume-id "$id"
done
