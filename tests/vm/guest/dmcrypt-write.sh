# dm-crypt, guest → host: the agent formats /dev/vdb (512-byte sectors) and /dev/vdc
# (4096-byte sectors), opens them through dm-crypt, and writes the host's pattern files
# through /dev/mapper/nodecrypt-<id>. The host then decrypts the disk images itself.
. /scenarios/common.sh
start_broker
start_agent
for v in v512:vdb:512 v4096:vdc:4096; do
  id=${v%%:*} rest=${v#*:}
  dev=/dev/${rest%%:*} sector=${rest#*:}
  nodecrypt format "$dev" --volume-id "$id" --sector-size "$sector"
  nodecrypt open "$dev"
  echo "NCVM:TABLE $id $(dmsetup table "nodecrypt-$id")"
  dd if="/state/pattern-$id.bin" of="/dev/mapper/nodecrypt-$id" bs=64k conv=fsync 2>/dev/null
  size=$(stat -c %s "/state/pattern-$id.bin")
  echo "NCVM:SHA $id $(head -c "$size" "/dev/mapper/nodecrypt-$id" | sha256sum | cut -d' ' -f1)"
done
nodecrypt --json status >/state/logs/status.json
for id in v512 v4096; do nodecrypt close --volume-id "$id"; done
echo "NCVM:CLOSED $(ls /dev/mapper)"
