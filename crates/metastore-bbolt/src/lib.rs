//! A streaming writer of bbolt database files (see the README for the format).
//!
//! ```no_run
//! # fn main() -> Result<(), metastore_bbolt::BoltError> {
//! let file = std::fs::File::create("db")?;
//! let mut db = metastore_bbolt::BoltWriter::new(file)?;
//! db.begin_bucket(b"meta")?;
//! db.put(b"consistent_index", &7u64.to_be_bytes())?;
//! db.end_bucket()?;
//! db.finish()?;
//! # Ok(())
//! # }
//! ```

mod reader;

pub use reader::BoltReader;
use std::io::{Seek, SeekFrom, Write};

/// bbolt's magic number and file format version.
const MAGIC: u32 = 0xED0C_DAED;
const VERSION: u32 = 2;
/// The page size written (the common OS page size; a reader takes it from the meta page).
pub const PAGE_SIZE: usize = 4096;
const PAGE_HEADER: usize = 16;
const ELEMENT: usize = 16;
const BRANCH_FLAG: u16 = 0x01;
const LEAF_FLAG: u16 = 0x02;
const META_FLAG: u16 = 0x04;
const FREELIST_FLAG: u16 = 0x10;
const BUCKET_LEAF_FLAG: u32 = 0x01;
/// Page ids 0 and 1 are the meta pages.
const FIRST_DATA_PAGE: u64 = 2;

#[derive(Debug, thiserror::Error)]
pub enum BoltError {
    #[error("writing the bbolt file: {0}")]
    Io(#[from] std::io::Error),
    #[error("key {key:?} of bucket {bucket:?} is not above the previous key")]
    Unsorted { bucket: String, key: Vec<u8> },
    #[error("bucket {0:?} was written twice")]
    DuplicateBucket(String),
    #[error("{0}")]
    Misuse(&'static str),
    #[error("a key or value of {0} bytes is larger than bbolt allows")]
    TooLarge(usize),
    #[error("not a valid bbolt file: {0}")]
    Corrupt(String),
}

/// One page's worth of elements being gathered.
#[derive(Default)]
struct Node {
    /// (key, value, flags) for a leaf; (key, child page id) in `children` for a branch.
    entries: Vec<(Vec<u8>, Vec<u8>, u32)>,
    bytes: usize,
}

/// What a written page is known by in its parent: its first key and id.
type PageRef = (Vec<u8>, u64);

/// Writes a bbolt file bucket by bucket: `begin_bucket`, `put` in ascending key order,
/// `end_bucket`, and `finish` once every bucket is written.
pub struct BoltWriter<W: Write + Seek> {
    out: W,
    next_page: u64,
    /// Top-level buckets written so far: (name, root page id).
    buckets: Vec<(Vec<u8>, u64)>,
    current: Option<BucketState>,
}

struct BucketState {
    name: Vec<u8>,
    leaf: Node,
    leaves: Vec<PageRef>,
    last_key: Option<Vec<u8>>,
}

impl<W: Write + Seek> BoltWriter<W> {
    /// Starts a file on `out` (positioned at its start); the meta pages are written last.
    pub fn new(mut out: W) -> Result<Self, BoltError> {
        out.seek(SeekFrom::Start(0))?;
        out.write_all(&[0u8; 2 * PAGE_SIZE])?;
        Ok(Self {
            out,
            next_page: FIRST_DATA_PAGE,
            buckets: Vec::new(),
            current: None,
        })
    }

    pub fn begin_bucket(&mut self, name: &[u8]) -> Result<(), BoltError> {
        if self.current.is_some() {
            return Err(BoltError::Misuse("a bucket is already open"));
        }
        if self.buckets.iter().any(|(n, _)| n == name) {
            return Err(BoltError::DuplicateBucket(
                String::from_utf8_lossy(name).into_owned(),
            ));
        }
        self.current = Some(BucketState {
            name: name.to_vec(),
            leaf: Node::default(),
            leaves: Vec::new(),
            last_key: None,
        });
        Ok(())
    }

    /// Adds a pair to the open bucket; keys must come in strictly ascending byte order.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), BoltError> {
        if key.len() > u32::MAX as usize / 2 || value.len() > u32::MAX as usize / 2 {
            return Err(BoltError::TooLarge(key.len().max(value.len())));
        }
        let Some(state) = self.current.as_mut() else {
            return Err(BoltError::Misuse("put outside a bucket"));
        };
        if key.is_empty() || state.last_key.as_deref().is_some_and(|last| last >= key) {
            return Err(BoltError::Unsorted {
                bucket: String::from_utf8_lossy(&state.name).into_owned(),
                key: key.to_vec(),
            });
        }
        state.last_key = Some(key.to_vec());
        let size = ELEMENT + key.len() + value.len();
        if !state.leaf.entries.is_empty() && PAGE_HEADER + state.leaf.bytes + size > PAGE_SIZE {
            let leaf = std::mem::take(&mut state.leaf);
            let page = write_node(&mut self.out, &mut self.next_page, LEAF_FLAG, &leaf)?;
            state.leaves.push(page);
        }
        state.leaf.bytes += size;
        state.leaf.entries.push((key.to_vec(), value.to_vec(), 0));
        Ok(())
    }

    /// Closes the open bucket: its last leaf and its branch levels are written.
    pub fn end_bucket(&mut self) -> Result<(), BoltError> {
        let Some(mut state) = self.current.take() else {
            return Err(BoltError::Misuse("no bucket is open"));
        };
        // An empty bucket is one empty leaf page.
        if !state.leaf.entries.is_empty() || state.leaves.is_empty() {
            let page = write_node(&mut self.out, &mut self.next_page, LEAF_FLAG, &state.leaf)?;
            state.leaves.push(page);
        }
        let root = self.write_branches(state.leaves)?;
        self.buckets.push((state.name, root));
        Ok(())
    }

    /// Writes branch levels over `children` until one page is left; returns its id.
    fn write_branches(&mut self, mut children: Vec<PageRef>) -> Result<u64, BoltError> {
        while children.len() > 1 {
            let mut parents = Vec::new();
            let mut node = Node::default();
            for (key, page) in children {
                let size = ELEMENT + key.len();
                if !node.entries.is_empty() && PAGE_HEADER + node.bytes + size > PAGE_SIZE {
                    let full = std::mem::take(&mut node);
                    parents.push(write_node(
                        &mut self.out,
                        &mut self.next_page,
                        BRANCH_FLAG,
                        &full,
                    )?);
                }
                node.bytes += size;
                node.entries.push((key, page.to_le_bytes().to_vec(), 0));
            }
            parents.push(write_node(
                &mut self.out,
                &mut self.next_page,
                BRANCH_FLAG,
                &node,
            )?);
            children = parents;
        }
        children
            .first()
            .map(|(_, page)| *page)
            .ok_or(BoltError::Misuse("a bucket without pages"))
    }

    /// Writes the root bucket, the (empty) freelist and the meta pages; returns the writer
    /// and the file's length in bytes.
    pub fn finish(mut self) -> Result<(W, u64), BoltError> {
        if self.current.is_some() {
            return Err(BoltError::Misuse("a bucket is still open"));
        }
        let mut buckets = std::mem::take(&mut self.buckets);
        buckets.sort();
        // The root bucket: one leaf entry per bucket, its value the bucket's header.
        let mut root = Node::default();
        let mut root_pages = Vec::new();
        for (name, page) in buckets {
            let mut header = Vec::with_capacity(16);
            header.extend_from_slice(&page.to_le_bytes());
            header.extend_from_slice(&0u64.to_le_bytes());
            let size = ELEMENT + name.len() + header.len();
            if !root.entries.is_empty() && PAGE_HEADER + root.bytes + size > PAGE_SIZE {
                let full = std::mem::take(&mut root);
                root_pages.push(write_node(
                    &mut self.out,
                    &mut self.next_page,
                    LEAF_FLAG,
                    &full,
                )?);
            }
            root.bytes += size;
            root.entries.push((name, header, BUCKET_LEAF_FLAG));
        }
        if !root.entries.is_empty() || root_pages.is_empty() {
            root_pages.push(write_node(
                &mut self.out,
                &mut self.next_page,
                LEAF_FLAG,
                &root,
            )?);
        }
        let root_page = self.write_branches(root_pages)?;
        // An empty freelist: every page below the high-water mark is in use.
        let freelist = self.next_page;
        let mut page = vec![0u8; PAGE_SIZE];
        header(&mut page, freelist, FREELIST_FLAG, 0, 0);
        self.out.write_all(&page)?;
        self.next_page += 1;
        let high_water = self.next_page;
        // Two valid metas (txids 0 and 1), as a new bbolt database has.
        for txid in 0..2u64 {
            let mut page = vec![0u8; PAGE_SIZE];
            header(&mut page, txid, META_FLAG, 0, 0);
            let mut meta = Vec::with_capacity(64);
            meta.extend_from_slice(&MAGIC.to_le_bytes());
            meta.extend_from_slice(&VERSION.to_le_bytes());
            meta.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
            meta.extend_from_slice(&0u32.to_le_bytes());
            meta.extend_from_slice(&root_page.to_le_bytes());
            meta.extend_from_slice(&0u64.to_le_bytes());
            meta.extend_from_slice(&freelist.to_le_bytes());
            meta.extend_from_slice(&high_water.to_le_bytes());
            meta.extend_from_slice(&txid.to_le_bytes());
            let checksum = fnv1a64(&meta);
            meta.extend_from_slice(&checksum.to_le_bytes());
            page[PAGE_HEADER..PAGE_HEADER + meta.len()].copy_from_slice(&meta);
            self.out.seek(SeekFrom::Start(txid * PAGE_SIZE as u64))?;
            self.out.write_all(&page)?;
        }
        self.out
            .seek(SeekFrom::Start(high_water * PAGE_SIZE as u64))?;
        self.out.flush()?;
        Ok((self.out, high_water * PAGE_SIZE as u64))
    }
}

fn header(page: &mut [u8], id: u64, flags: u16, count: u16, overflow: u32) {
    page[0..8].copy_from_slice(&id.to_le_bytes());
    page[8..10].copy_from_slice(&flags.to_le_bytes());
    page[10..12].copy_from_slice(&count.to_le_bytes());
    page[12..16].copy_from_slice(&overflow.to_le_bytes());
}

/// Writes `node` as the next page(s) (a node larger than a page spans overflow pages) and
/// returns its first key and page id.
fn write_node<W: Write>(
    out: &mut W,
    next_page: &mut u64,
    flags: u16,
    node: &Node,
) -> Result<PageRef, BoltError> {
    let count = node.entries.len();
    if count > u16::MAX as usize - 1 {
        return Err(BoltError::Misuse("too many elements for one page"));
    }
    let size = PAGE_HEADER + node.bytes;
    let pages = size.div_ceil(PAGE_SIZE).max(1);
    let mut buf = vec![0u8; pages * PAGE_SIZE];
    let id = *next_page;
    header(&mut buf, id, flags, count as u16, (pages - 1) as u32);
    // Elements first, then the keys (and values) in the same order.
    let mut data = PAGE_HEADER + count * ELEMENT;
    for (i, (key, value, entry_flags)) in node.entries.iter().enumerate() {
        let at = PAGE_HEADER + i * ELEMENT;
        let pos = (data - at) as u32;
        let element = &mut buf[at..at + ELEMENT];
        if flags == BRANCH_FLAG {
            element[0..4].copy_from_slice(&pos.to_le_bytes());
            element[4..8].copy_from_slice(&(key.len() as u32).to_le_bytes());
            element[8..16].copy_from_slice(value);
            buf[data..data + key.len()].copy_from_slice(key);
            data += key.len();
        } else {
            element[0..4].copy_from_slice(&entry_flags.to_le_bytes());
            element[4..8].copy_from_slice(&pos.to_le_bytes());
            element[8..12].copy_from_slice(&(key.len() as u32).to_le_bytes());
            element[12..16].copy_from_slice(&(value.len() as u32).to_le_bytes());
            buf[data..data + key.len()].copy_from_slice(key);
            data += key.len();
            buf[data..data + value.len()].copy_from_slice(value);
            data += value.len();
        }
    }
    out.write_all(&buf)?;
    *next_page += pages as u64;
    let first = node
        .entries
        .first()
        .map(|(k, _, _)| k.clone())
        .unwrap_or_default();
    Ok((first, id))
}

/// FNV-1a, 64 bits (Go's `hash/fnv.New64a`), over the meta fields before the checksum.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests;
