//! The wire codec for replicated operations.
//!
//! Every replicated operation is a protobuf [`Command`]; many commands travel together as one
//! [`Batch`] in one raft entry. A frame is one header byte followed by the encoded batch:
//!
//! ```text
//! [ header: FRAME_VERSION << 4 | compression ][ payload: Batch, maybe compressed ]
//! ```
//!
//! Compression is applied only when the encoded batch is at least `min_compress_bytes`, and only
//! when it actually makes the frame smaller, so small single-command batches never pay for it.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use serde::{Deserialize, Serialize};

pub use metastore_proto::internal::{command::Op, Batch, Command};

/// Version of the frame layout, in the header's high nibble.
const FRAME_VERSION: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("empty frame")]
    Empty,
    #[error("unsupported frame version {0}")]
    Version(u8),
    #[error("unknown compression code {0}")]
    UnknownCompression(u8),
    #[error("decompression failed: {0}")]
    Decompress(String),
    #[error("protobuf decode failed: {0}")]
    Decode(#[from] prost::DecodeError),
}

/// How frames are compressed on the way into the raft log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    None,
    Snappy,
    Zstd,
}

impl Compression {
    fn code(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Snappy => 1,
            Compression::Zstd => 2,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct CodecOptions {
    pub compression: Compression,
    /// Frames smaller than this are never compressed.
    pub min_compress_bytes: usize,
    pub zstd_level: i32,
}

impl Default for CodecOptions {
    fn default() -> Self {
        Self {
            compression: Compression::None,
            min_compress_bytes: 1024,
            zstd_level: 1,
        }
    }
}

/// Encodes a batch into a frame.
pub fn encode_batch(batch: &Batch, opts: &CodecOptions) -> Bytes {
    let len = batch.encoded_len();
    let mut raw = BytesMut::with_capacity(len + 1);
    raw.put_u8(header(Compression::None));
    // Encoding into a buffer with enough capacity cannot fail.
    batch.encode_raw(&mut raw);
    if opts.compression == Compression::None || len < opts.min_compress_bytes {
        return raw.freeze();
    }
    let payload = &raw[1..];
    let compressed = match opts.compression {
        Compression::None => None,
        Compression::Snappy => snap::raw::Encoder::new().compress_vec(payload).ok(),
        Compression::Zstd => zstd::bulk::compress(payload, opts.zstd_level).ok(),
    };
    match compressed {
        Some(c) if c.len() < payload.len() => {
            let mut out = BytesMut::with_capacity(c.len() + 1);
            out.put_u8(header(opts.compression));
            out.extend_from_slice(&c);
            out.freeze()
        }
        _ => raw.freeze(),
    }
}

/// Checks a frame's header and undoes its compression: `None` means the payload is the
/// frame after its header byte, as written; `Some` holds the decompressed payload.
fn decompressed_payload(frame: &[u8]) -> Result<Option<Vec<u8>>, CodecError> {
    let (&head, payload) = frame.split_first().ok_or(CodecError::Empty)?;
    let version = head >> 4;
    if version != FRAME_VERSION {
        return Err(CodecError::Version(version));
    }
    match head & 0x0f {
        0 => Ok(None),
        1 => snap::raw::Decoder::new()
            .decompress_vec(payload)
            .map(Some)
            .map_err(|e| CodecError::Decompress(e.to_string())),
        2 => zstd::stream::decode_all(payload)
            .map(Some)
            .map_err(|e| CodecError::Decompress(e.to_string())),
        other => Err(CodecError::UnknownCompression(other)),
    }
}

/// Decodes a frame produced by [`encode_batch`] without copying its keys and values: they
/// are slices of `frame` (or of its decompressed form), which stays allocated while any of
/// them lives. Whoever keeps one beyond the request must copy it, or one small key would pin
/// a whole batch in memory.
pub fn decode_batch_shared(frame: Bytes) -> Result<Batch, CodecError> {
    Ok(match decompressed_payload(&frame)? {
        None => Batch::decode(frame.slice(1..))?,
        Some(raw) => Batch::decode(Bytes::from(raw))?,
    })
}

/// Decodes a frame produced by [`encode_batch`]; every key and value owns its memory.
pub fn decode_batch(frame: &[u8]) -> Result<Batch, CodecError> {
    Ok(match decompressed_payload(frame)? {
        None => Batch::decode(&frame[1..])?,
        Some(raw) => Batch::decode(raw.as_slice())?,
    })
}

/// Encodes one command on its own (used by tools and the batch size estimate).
pub fn encode_command(cmd: &Command) -> Bytes {
    cmd.encode_to_vec().into()
}

pub fn decode_command(data: &[u8]) -> Result<Command, CodecError> {
    Ok(Command::decode(data)?)
}

fn header(c: Compression) -> u8 {
    (FRAME_VERSION << 4) | c.code()
}

#[cfg(test)]
mod tests {
    use super::*;
    use metastore_proto::etcdserverpb::{
        CompactionRequest, DeleteRangeRequest, PutRequest, RequestOp, TxnRequest,
    };
    use proptest::prelude::*;

    fn arb_bytes(max: usize) -> impl Strategy<Value = Bytes> {
        prop::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
    }

    fn arb_command() -> impl Strategy<Value = Command> {
        prop_oneof![
            (arb_bytes(64), arb_bytes(2048), any::<i64>(), any::<bool>()).prop_map(
                |(key, value, lease, prev_kv)| Command {
                    auth: None,
                    op: Some(Op::Put(PutRequest {
                        key,
                        value,
                        lease,
                        prev_kv,
                        ignore_value: false,
                        ignore_lease: false,
                    })),
                }
            ),
            (arb_bytes(64), arb_bytes(64)).prop_map(|(key, range_end)| Command {
                auth: None,
                op: Some(Op::DeleteRange(DeleteRangeRequest {
                    key,
                    range_end,
                    prev_kv: true,
                })),
            }),
            (arb_bytes(32), arb_bytes(128)).prop_map(|(key, value)| Command {
                auth: None,
                op: Some(Op::Txn(TxnRequest {
                    compare: vec![],
                    success: vec![RequestOp {
                        request: Some(
                            metastore_proto::etcdserverpb::request_op::Request::RequestPut(
                                PutRequest {
                                    key,
                                    value,
                                    ..Default::default()
                                },
                            ),
                        ),
                    }],
                    failure: vec![],
                })),
            }),
            any::<i64>().prop_map(|revision| Command {
                auth: None,
                op: Some(Op::Compaction(CompactionRequest {
                    revision,
                    physical: true,
                })),
            }),
        ]
    }

    fn arb_opts() -> impl Strategy<Value = CodecOptions> {
        (
            prop_oneof![
                Just(Compression::None),
                Just(Compression::Snappy),
                Just(Compression::Zstd)
            ],
            0usize..4096,
        )
            .prop_map(|(compression, min_compress_bytes)| CodecOptions {
                compression,
                min_compress_bytes,
                zstd_level: 1,
            })
    }

    proptest! {
        #[test]
        fn batch_round_trips(id in any::<u64>(), commands in prop::collection::vec(arb_command(), 0..20), opts in arb_opts()) {
            let batch = Batch { id, commands };
            let frame = encode_batch(&batch, &opts);
            prop_assert_eq!(&decode_batch(&frame).expect("decode"), &batch);
            prop_assert_eq!(decode_batch_shared(frame).expect("decode shared"), batch);
        }

        #[test]
        fn command_round_trips(cmd in arb_command()) {
            prop_assert_eq!(decode_command(&encode_command(&cmd)).expect("decode"), cmd);
        }

        #[test]
        fn garbage_never_panics(data in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_batch(&data);
            let _ = decode_batch_shared(Bytes::from(data));
        }
    }

    #[test]
    fn large_repetitive_batches_are_compressed() {
        let commands = (0..100)
            .map(|i| Command {
                auth: None,
                op: Some(Op::Put(PutRequest {
                    key: format!("key-{i}").into(),
                    value: Bytes::from(vec![b'x'; 256]),
                    ..Default::default()
                })),
            })
            .collect();
        let batch = Batch { id: 7, commands };
        for compression in [Compression::Snappy, Compression::Zstd] {
            let opts = CodecOptions {
                compression,
                ..Default::default()
            };
            let frame = encode_batch(&batch, &opts);
            assert_eq!(frame[0] & 0x0f, compression.code());
            assert!(frame.len() < batch.encoded_len() / 2);
            assert_eq!(decode_batch(&frame).expect("decode"), batch);
        }
    }

    #[test]
    fn small_batches_stay_raw() {
        let batch = Batch {
            id: 1,
            commands: vec![],
        };
        let opts = CodecOptions {
            compression: Compression::Zstd,
            ..Default::default()
        };
        assert_eq!(encode_batch(&batch, &opts)[0] & 0x0f, 0);
    }

    #[test]
    fn shared_decode_points_into_the_frame() {
        let value = Bytes::from(vec![b'v'; 300]);
        let batch = Batch {
            id: 3,
            commands: vec![Command {
                auth: None,
                op: Some(Op::Put(PutRequest {
                    key: Bytes::from_static(b"key"),
                    value: value.clone(),
                    ..Default::default()
                })),
            }],
        };
        let frame = encode_batch(&batch, &CodecOptions::default());
        let frame_range = frame.as_ptr_range();
        let decoded = decode_batch_shared(frame.clone()).expect("decode");
        let Some(Op::Put(put)) = &decoded.commands[0].op else {
            panic!("not a put: {decoded:?}");
        };
        assert_eq!(put.value, value);
        assert!(
            frame_range.contains(&put.value.as_ptr()),
            "value was copied"
        );
        let owned = decode_batch(&frame).expect("decode");
        let Some(Op::Put(put)) = &owned.commands[0].op else {
            panic!("not a put: {owned:?}");
        };
        assert!(!frame_range.contains(&put.value.as_ptr()));
    }

    #[test]
    fn unknown_header_is_an_error() {
        assert!(matches!(
            decode_batch_shared(Bytes::new()),
            Err(CodecError::Empty)
        ));
        assert!(matches!(decode_batch(&[]), Err(CodecError::Empty)));
        assert!(matches!(decode_batch(&[0x20]), Err(CodecError::Version(2))));
        assert!(matches!(
            decode_batch(&[0x1f]),
            Err(CodecError::UnknownCompression(15))
        ));
    }
}
