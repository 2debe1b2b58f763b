//! Round trips through a minimal reader that checks what `bbolt check` checks: valid metas,
//! every page below the high-water mark reached exactly once, keys sorted, branch keys equal
//! to their child's first key. (The tests with real etcd read the files with bbolt itself.)

use super::*;
use std::collections::BTreeMap;
use std::io::Cursor;

/// Bucket name → its pairs in order.
type Buckets = BTreeMap<Vec<u8>, Vec<(Vec<u8>, Vec<u8>)>>;

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

struct Reader<'a> {
    file: &'a [u8],
    seen: Vec<bool>,
}

impl Reader<'_> {
    fn page(&mut self, id: u64) -> (u16, &[u8]) {
        let at = id as usize * PAGE_SIZE;
        let page = &self.file[at..];
        assert_eq!(u64_at(page, 0), id, "page id");
        let overflow = u32_at(page, 12) as usize;
        for p in id as usize..=id as usize + overflow {
            assert!(!self.seen[p], "page {p} reached twice");
            self.seen[p] = true;
        }
        (
            u16_at(page, 8),
            &self.file[at..at + (overflow + 1) * PAGE_SIZE],
        )
    }

    /// Every (key, value, flags) under the node at `id`, in order.
    fn walk(&mut self, id: u64, out: &mut Vec<(Vec<u8>, Vec<u8>, u32)>) -> Vec<u8> {
        let (flags, page) = self.page(id);
        let page = page.to_vec();
        let count = u16_at(&page, 10) as usize;
        let mut first = None;
        for i in 0..count {
            let at = PAGE_HEADER + i * ELEMENT;
            if flags == BRANCH_FLAG {
                let (pos, ksize) = (u32_at(&page, at) as usize, u32_at(&page, at + 4) as usize);
                let key = page[at + pos..at + pos + ksize].to_vec();
                let child = u64_at(&page, at + 8);
                let child_first = self.walk(child, out);
                assert_eq!(key, child_first, "branch key is the child's first key");
                first.get_or_insert(key);
            } else {
                assert_eq!(flags, LEAF_FLAG);
                let (f, pos) = (u32_at(&page, at), u32_at(&page, at + 4) as usize);
                let (ksize, vsize) = (
                    u32_at(&page, at + 8) as usize,
                    u32_at(&page, at + 12) as usize,
                );
                let key = page[at + pos..at + pos + ksize].to_vec();
                let value = page[at + pos + ksize..at + pos + ksize + vsize].to_vec();
                first.get_or_insert(key.clone());
                out.push((key, value, f));
            }
        }
        first.unwrap_or_default()
    }
}

fn read(file: &[u8]) -> Buckets {
    let mut metas = Vec::new();
    for id in 0..2 {
        let meta = &file[id * PAGE_SIZE + PAGE_HEADER..];
        assert_eq!(u32_at(meta, 0), MAGIC);
        assert_eq!(u32_at(meta, 4), VERSION);
        assert_eq!(u64_at(meta, 56), fnv1a64(&meta[..56]), "meta checksum");
        assert_eq!(u64_at(meta, 48), id as u64, "txid");
        metas.push((u64_at(meta, 16), u64_at(meta, 32), u64_at(meta, 40)));
    }
    assert_eq!(metas[0], metas[1]);
    let (root, freelist, high_water) = metas[0];
    assert_eq!(file.len(), high_water as usize * PAGE_SIZE);
    let mut reader = Reader {
        file,
        seen: vec![false; high_water as usize],
    };
    reader.seen[0] = true;
    reader.seen[1] = true;
    let (flags, page) = reader.page(freelist);
    assert_eq!((flags, u16_at(page, 10)), (FREELIST_FLAG, 0));
    let mut top = Vec::new();
    reader.walk(root, &mut top);
    let mut buckets = BTreeMap::new();
    let mut previous: Option<Vec<u8>> = None;
    for (name, value, flags) in top {
        assert_eq!(flags, BUCKET_LEAF_FLAG);
        assert!(
            previous.as_ref().is_none_or(|p| *p < name),
            "buckets sorted"
        );
        previous = Some(name.clone());
        let mut pairs = Vec::new();
        reader.walk(u64_at(&value, 0), &mut pairs);
        assert!(pairs.windows(2).all(|w| w[0].0 < w[1].0), "keys sorted");
        buckets.insert(name, pairs.into_iter().map(|(k, v, _)| (k, v)).collect());
    }
    assert!(reader.seen.iter().all(|s| *s), "every page is reachable");
    buckets
}

fn write(buckets: &Buckets) -> Vec<u8> {
    let mut db = BoltWriter::new(Cursor::new(Vec::new())).expect("new");
    // Written out of order: the root bucket sorts them.
    for (name, pairs) in buckets.iter().rev() {
        db.begin_bucket(name).expect("begin");
        for (k, v) in pairs {
            db.put(k, v).expect("put");
        }
        db.end_bucket().expect("end");
    }
    let (cursor, len) = db.finish().expect("finish");
    let file = cursor.into_inner();
    assert_eq!(file.len() as u64, len);
    file
}

#[test]
fn small_empty_and_large_buckets_round_trip() {
    let mut buckets = BTreeMap::new();
    buckets.insert(b"empty".to_vec(), Vec::new());
    buckets.insert(
        b"meta".to_vec(),
        vec![(b"consistent_index".to_vec(), 9u64.to_be_bytes().to_vec())],
    );
    // Enough pairs for three branch levels, a value spanning overflow pages among them.
    let many: Vec<(Vec<u8>, Vec<u8>)> = (0..200_000u64)
        .map(|i| {
            let value = if i == 777 {
                vec![7u8; 3 * PAGE_SIZE]
            } else {
                i.to_le_bytes().to_vec()
            };
            (format!("key/{i:08}").into_bytes(), value)
        })
        .collect();
    buckets.insert(b"key".to_vec(), many);
    let file = write(&buckets);
    assert_eq!(read(&file), buckets);
}

#[test]
fn out_of_order_keys_are_refused() {
    let mut db = BoltWriter::new(Cursor::new(Vec::new())).expect("new");
    db.begin_bucket(b"b").expect("begin");
    db.put(b"b", b"1").expect("put");
    assert!(matches!(
        db.put(b"a", b"2"),
        Err(BoltError::Unsorted { .. })
    ));
    assert!(matches!(
        db.put(b"b", b"2"),
        Err(BoltError::Unsorted { .. })
    ));
    db.end_bucket().expect("end");
    assert!(matches!(
        db.begin_bucket(b"b"),
        Err(BoltError::DuplicateBucket(_))
    ));
}

#[test]
fn the_reader_reads_what_the_writer_wrote() {
    let mut buckets = Buckets::new();
    buckets.insert(b"alarm".to_vec(), Vec::new());
    buckets.insert(
        b"key".to_vec(),
        (0..20_000u32)
            .map(|i| (i.to_be_bytes().to_vec(), vec![i as u8; (i % 300) as usize]))
            .collect(),
    );
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("db");
    std::fs::write(&path, write(&buckets)).expect("write");
    let reader = BoltReader::open(&path).expect("open");
    assert_eq!(reader.size(), std::fs::metadata(&path).expect("meta").len());
    assert_eq!(
        reader.bucket_names().expect("names"),
        vec![b"alarm".to_vec(), b"key".to_vec()]
    );
    for (name, pairs) in &buckets {
        let mut read = Vec::new();
        assert!(reader
            .for_each(name, &mut |k, v| {
                read.push((k.to_vec(), v.to_vec()));
                Ok(true)
            })
            .expect("walk"));
        assert_eq!(&read, pairs);
    }
    assert!(!reader
        .for_each(b"nope", &mut |_, _| Ok(true))
        .expect("walk"));
    // A damaged meta checksum on both metas: refused, not misread.
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[PAGE_HEADER + 20] ^= 1;
    bytes[PAGE_SIZE + PAGE_HEADER + 20] ^= 1;
    std::fs::write(&path, bytes).expect("write");
    assert!(matches!(
        BoltReader::open(&path),
        Err(BoltError::Corrupt(_))
    ));
}
