#![allow(clippy::unwrap_used)]

//! Random sequences of appends / syncs / reopens / purges against an in-memory model that
//! also models segmentation (rotation is deterministic given the records written).

mod common;

use metastore_wal::{encoded_len, Record, Wal, WalOptions};
use proptest::prelude::*;

const SEGMENT_SIZE: u64 = 200;

#[derive(Clone, Debug)]
enum Op {
    Append(Vec<(u8, u64, Vec<u8>)>),
    AppendSync(u8, u64, Vec<u8>),
    Sync,
    Reopen,
    Purge(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let record = (
        any::<u8>(),
        0u64..64,
        prop::collection::vec(any::<u8>(), 0..80),
    );
    prop_oneof![
        4 => prop::collection::vec(record.clone(), 0..5).prop_map(Op::Append),
        3 => record.prop_map(|(k, i, p)| Op::AppendSync(k, i, p)),
        2 => Just(Op::Sync),
        1 => Just(Op::Reopen),
        2 => (0u64..70).prop_map(Op::Purge),
    ]
}

#[derive(Default)]
struct ModelSeg {
    records: Vec<Record>,
    size: u64,
}

#[derive(Default)]
struct Model {
    /// Segments on disk (written records), oldest first.
    segments: Vec<ModelSeg>,
    /// Appended, not yet written.
    pending: Vec<Record>,
    /// Lsn of the last appended record.
    last_lsn: u64,
}

impl Model {
    fn flush(&mut self) {
        for r in self.pending.drain(..) {
            let rotate = self.segments.last().is_none_or(|s| s.size > SEGMENT_SIZE);
            if rotate {
                self.segments.push(ModelSeg::default());
            }
            let seg = self.segments.last_mut().unwrap();
            seg.size += encoded_len(r.payload.len()) as u64;
            seg.records.push(r);
        }
    }

    fn purge(&mut self, index: u64) -> usize {
        let mut n = 0;
        while self.segments.len() > 1 && self.segments[0].records.iter().all(|r| r.index < index) {
            self.segments.remove(0);
            n += 1;
        }
        n
    }

    fn all(&self) -> Vec<Record> {
        self.segments
            .iter()
            .flat_map(|s| s.records.iter().cloned())
            .collect()
    }
}

fn opts() -> WalOptions {
    WalOptions {
        segment_size: SEGMENT_SIZE,
        ..WalOptions::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn matches_model(ops in prop::collection::vec(op(), 1..60)) {
        let tmp = tempfile::tempdir().unwrap();
        let (mut wal, recovered) = Wal::open(tmp.path(), opts()).unwrap();
        prop_assert!(recovered.is_empty());
        let mut model = Model::default();

        for op in ops {
            match op {
                Op::Append(recs) => {
                    let batch: Vec<(u8, u64, &[u8])> =
                        recs.iter().map(|(k, i, p)| (*k, *i, p.as_slice())).collect();
                    let lsn = wal.append(&batch).unwrap();
                    model.last_lsn += batch.len() as u64;
                    for (kind, index, payload) in recs {
                        model.pending.push(Record { kind, index, payload });
                    }
                    prop_assert_eq!(lsn, model.last_lsn);
                }
                Op::AppendSync(kind, index, payload) => {
                    let lsn = wal.append_sync(kind, index, &payload).unwrap();
                    model.pending.push(Record { kind, index, payload });
                    model.last_lsn += 1;
                    prop_assert_eq!(lsn, model.last_lsn);
                    model.flush();
                }
                Op::Sync => {
                    wal.sync_to(model.last_lsn).unwrap();
                    model.flush();
                }
                Op::Reopen => {
                    drop(wal);
                    model.flush(); // drop writes what is buffered
                    let (w, recovered) = Wal::open(tmp.path(), opts()).unwrap();
                    wal = w;
                    let expected = model.all();
                    prop_assert_eq!(&recovered, &expected);
                    model.last_lsn = expected.len() as u64;
                }
                Op::Purge(index) => {
                    let removed = wal.purge_below(index).unwrap();
                    prop_assert_eq!(removed, model.purge(index));
                }
            }
            prop_assert_eq!(wal.segment_count(), model.segments.len());
            prop_assert_eq!(common::segment_files(tmp.path()).len(), model.segments.len());
        }

        drop(wal);
        model.flush();
        let (_wal, recovered) = Wal::open(tmp.path(), opts()).unwrap();
        prop_assert_eq!(recovered, model.all());
    }
}
