//! A strict protobuf codec: prost's, plus a wire-level check that every field of an
//! incoming message (and of its nested messages) is one the contract declares.
//!
//! proto3 normally drops unknown fields; for a security API that is a trap (a client
//! that believes it set `force_destroy` gets silence). The check walks the wire format
//! against the compiled descriptor set and answers `INVALID_ARGUMENT` naming the field.

use std::any::Any;
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::OnceLock;

use bytes::Buf;
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;
use zeroize::Zeroize;

/// Field number → the full name of its message type (for nested checks), per message.
type Schema = HashMap<String, HashMap<u32, Option<String>>>;

fn schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let fds = prost_types::FileDescriptorSet::decode(crate::FILE_DESCRIPTOR_SET)
            .expect("the compiled descriptor set decodes");
        let mut schema = Schema::new();
        for file in &fds.file {
            let package = file.package.clone().unwrap_or_default();
            for msg in &file.message_type {
                add_message(&mut schema, &package, msg);
            }
        }
        schema
    })
}

fn add_message(schema: &mut Schema, scope: &str, msg: &prost_types::DescriptorProto) {
    let name = format!("{scope}.{}", msg.name());
    let fields = msg
        .field
        .iter()
        .map(|f| {
            let nested = (f.r#type() == prost_types::field_descriptor_proto::Type::Message)
                .then(|| f.type_name().trim_start_matches('.').to_string());
            (f.number() as u32, nested)
        })
        .collect();
    for nested in &msg.nested_type {
        add_message(schema, &name, nested);
    }
    schema.insert(name, fields);
}

/// Checks `buf` as an encoding of the message `type_name`; nested messages too.
fn check(type_name: &str, mut buf: &[u8], depth: u32) -> Result<(), Status> {
    let Some(fields) = schema().get(type_name) else {
        return Ok(()); // a type outside our contracts (none today): leave it to prost
    };
    if depth > 16 {
        return Err(Status::invalid_argument("message nested too deeply"));
    }
    while buf.has_remaining() {
        let key = prost::encoding::decode_varint(&mut buf)
            .map_err(|e| Status::invalid_argument(format!("malformed {type_name}: {e}")))?;
        let (number, wire_type) = ((key >> 3) as u32, key & 7);
        let Some(nested) = fields.get(&number) else {
            return Err(Status::invalid_argument(format!(
                "unknown field {number} in {type_name}: this server speaks the contract \
                 in proto/{}; upgrade the client or drop the field",
                type_name
                    .rsplit_once('.')
                    .map_or("", |(p, _)| p)
                    .replace('.', "/")
            )));
        };
        let malformed = || Status::invalid_argument(format!("malformed {type_name}"));
        match wire_type {
            0 => {
                prost::encoding::decode_varint(&mut buf).map_err(|_| malformed())?;
            }
            1 | 5 => {
                let n = if wire_type == 1 { 8 } else { 4 };
                if buf.remaining() < n {
                    return Err(malformed());
                }
                buf.advance(n);
            }
            2 => {
                let len = prost::encoding::decode_varint(&mut buf).map_err(|_| malformed())?;
                let len = usize::try_from(len).map_err(|_| malformed())?;
                if buf.remaining() < len {
                    return Err(malformed());
                }
                if let Some(nested) = nested {
                    check(nested, &buf[..len], depth + 1)?;
                }
                buf.advance(len);
            }
            _ => return Err(malformed()),
        }
    }
    Ok(())
}

/// Wipes the key bytes of a message that carries them, once they are encoded or taken.
/// Every message type of the contracts passes through here; only `VolumeKey` has any.
pub fn scrub<T: Any>(msg: &mut T) {
    let any: &mut dyn Any = msg;
    if let Some(k) = any.downcast_mut::<crate::keybroker::v1::VolumeKey>() {
        k.key.zeroize();
    }
}

/// prost's codec with unknown-field rejection on decode, and key bytes wiped from a
/// message as soon as it is encoded.
#[derive(Debug, Clone)]
pub struct StrictCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for StrictCodec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<T, U> Codec for StrictCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + prost::Name + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ScrubbingEncoder<T>;
    type Decoder = StrictDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ScrubbingEncoder { _pd: PhantomData }
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictDecoder { _pd: PhantomData }
    }
}

/// Encoder half of [`StrictCodec`]: prost's encoding, then [`scrub`] of the message (the
/// copy in the outgoing frame is tonic's, beyond reach).
#[derive(Debug, Clone)]
pub struct ScrubbingEncoder<T> {
    _pd: PhantomData<T>,
}

impl<T: Message + 'static> Encoder for ScrubbingEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, mut item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        let result = item
            .encode(buf)
            .map_err(|e| Status::internal(format!("encoding a response: {e}")));
        scrub(&mut item);
        result
    }
}

/// Decoder half of [`StrictCodec`].
#[derive(Debug, Clone)]
pub struct StrictDecoder<U> {
    _pd: PhantomData<U>,
}

impl<U: Message + prost::Name + Default> Decoder for StrictDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // tonic hands over one contiguous frame: it is checked and decoded in place. Were
        // it ever split, it is gathered into a buffer that is wiped after (it may hold
        // key bytes).
        let len = buf.remaining();
        let mut gathered = zeroize::Zeroizing::new(Vec::new());
        let contiguous = buf.chunk().len() == len;
        if !contiguous {
            gathered.resize(len, 0);
            buf.copy_to_slice(&mut gathered);
        }
        let frame: &[u8] = if contiguous { buf.chunk() } else { &gathered };
        check(&U::full_name(), frame, 0)?;
        let msg = U::decode(frame)
            .map_err(|e| Status::invalid_argument(format!("malformed {}: {e}", U::full_name())))?;
        if contiguous {
            buf.advance(len);
        }
        Ok(Some(msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keybroker::v1::{CreateVolumeKeyRequest, GetVolumeKeyRequest};

    #[test]
    fn known_fields_pass_and_unknown_fields_are_named() {
        let mut req = CreateVolumeKeyRequest {
            volume_id: "vol-1".into(),
            ..Default::default()
        };
        req.labels.insert("k".into(), "v".into());
        let bytes = req.encode_to_vec();
        check("nodecrypt.keybroker.v1.CreateVolumeKeyRequest", &bytes, 0).unwrap();

        // Field 99 appended: rejected with its number.
        let mut extra = bytes.clone();
        prost::encoding::uint64::encode(99, &7, &mut extra);
        let err = check("nodecrypt.keybroker.v1.CreateVolumeKeyRequest", &extra, 0).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().contains("unknown field 99"),
            "{}",
            err.message()
        );

        // A GetVolumeKeyRequest is not a CreateVolumeKeyRequest field-for-field... but its
        // fields 1 and 2 exist there too; field 3 of a map entry nests and is checked.
        let get = GetVolumeKeyRequest {
            volume_id: "v".into(),
            version: 2,
        }
        .encode_to_vec();
        check("nodecrypt.keybroker.v1.GetVolumeKeyRequest", &get, 0).unwrap();
    }

    #[test]
    fn unknown_field_inside_a_map_entry_is_rejected() {
        // labels entry (field 3) containing key=1, value=2 and a stray field 5.
        let mut entry = Vec::new();
        prost::encoding::string::encode(1, &"k".to_string(), &mut entry);
        prost::encoding::uint32::encode(5, &1, &mut entry);
        let mut msg = Vec::new();
        prost::encoding::bytes::encode(3, &entry, &mut msg);
        let err = check("nodecrypt.keybroker.v1.CreateVolumeKeyRequest", &msg, 0).unwrap_err();
        assert!(
            err.message().contains("unknown field 5"),
            "{}",
            err.message()
        );
    }

    #[test]
    fn scrub_wipes_key_bytes_and_nothing_else() {
        let mut k = crate::keybroker::v1::VolumeKey {
            volume_id: "vol-a".into(),
            version: 2,
            key: vec![0x5A; 64],
            current_version: 2,
        };
        scrub(&mut k);
        assert!(k.key.is_empty(), "key bytes left after scrub");
        assert_eq!((k.volume_id.as_str(), k.version), ("vol-a", 2));
        let mut req = GetVolumeKeyRequest {
            volume_id: "vol-a".into(),
            version: 3,
        };
        scrub(&mut req);
        assert_eq!(req.version, 3);
        assert_eq!(req.volume_id, "vol-a");
    }

    #[test]
    fn truncated_input_is_malformed_not_a_panic() {
        let bytes = GetVolumeKeyRequest {
            volume_id: "abcdef".into(),
            version: 1,
        }
        .encode_to_vec();
        for cut in 0..bytes.len() {
            let _ = check(
                "nodecrypt.keybroker.v1.GetVolumeKeyRequest",
                &bytes[..cut],
                0,
            );
        }
    }
}
