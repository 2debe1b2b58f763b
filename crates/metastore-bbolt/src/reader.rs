//! Reads bbolt files — ours, and those etcd and `etcdctl snapshot save` write (inline
//! buckets, overflow pages, freelists, any page size) — page by page from the file, so a
//! multi-GB file needs little memory.

use crate::{
    BoltError, BRANCH_FLAG, BUCKET_LEAF_FLAG, ELEMENT, LEAF_FLAG, MAGIC, PAGE_HEADER, VERSION,
};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Where a bucket's pairs are: a page of the file, or an inline page inside its header's value.
#[derive(Clone, Debug)]
enum Root {
    Page(u64),
    Inline(Vec<u8>),
}

/// Called with each key and value; false stops the walk.
pub type PairVisitor<'a> = dyn FnMut(&[u8], &[u8]) -> Result<bool, BoltError> + 'a;
/// Called with each leaf element's key, value and flags; false stops the walk.
type ElementVisitor<'a> = dyn FnMut(&[u8], &[u8], u32) -> Result<bool, BoltError> + 'a;

/// An open bbolt file (read-only).
pub struct BoltReader {
    file: File,
    page_size: usize,
    root: u64,
    high_water: u64,
}

fn corrupt(what: impl Into<String>) -> BoltError {
    BoltError::Corrupt(what.into())
}

fn le_u16(b: &[u8], at: usize) -> Result<u16, BoltError> {
    b.get(at..at + 2)
        .and_then(|s| s.try_into().ok())
        .map(u16::from_le_bytes)
        .ok_or_else(|| corrupt("truncated page"))
}
fn le_u32(b: &[u8], at: usize) -> Result<u32, BoltError> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| corrupt("truncated page"))
}
fn le_u64(b: &[u8], at: usize) -> Result<u64, BoltError> {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| corrupt("truncated page"))
}

/// The largest page size accepted (bbolt allows up to 64 KiB pages on some systems).
const MAX_PAGE_SIZE: usize = 1 << 20;
/// Nesting deeper than this is a damaged file, not a B+tree.
const MAX_DEPTH: usize = 64;

impl BoltReader {
    /// Opens `path` and picks the valid meta page with the higher transaction id.
    pub fn open(path: &Path) -> Result<Self, BoltError> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        let mut best: Option<(u64, usize, u64, u64)> = None;
        // The first meta says the page size; the second is one page further.
        let mut first = [0u8; 64 + PAGE_HEADER];
        file.read_exact_at(&mut first, 0)?;
        let page_size = le_u32(&first, PAGE_HEADER + 8)? as usize;
        let candidates = if (512..=MAX_PAGE_SIZE).contains(&page_size) {
            vec![0, page_size as u64]
        } else {
            // A torn first meta: look for the second at common page sizes.
            vec![4096, 8192, 16384, 65536]
        };
        for offset in candidates {
            let mut meta = [0u8; 64 + PAGE_HEADER];
            if offset + meta.len() as u64 > len || file.read_exact_at(&mut meta, offset).is_err() {
                continue;
            }
            let m = &meta[PAGE_HEADER..];
            if le_u32(m, 0)? != MAGIC
                || le_u32(m, 4)? != VERSION
                || le_u64(m, 56)? != crate::fnv1a64(&m[..56])
            {
                continue;
            }
            let page_size = le_u32(m, 8)? as usize;
            let (root, high_water, txid) = (le_u64(m, 16)?, le_u64(m, 40)?, le_u64(m, 48)?);
            if best.is_none_or(|(t, ..)| txid > t) {
                best = Some((txid, page_size, root, high_water));
            }
        }
        let Some((_, page_size, root, high_water)) = best else {
            return Err(corrupt(format!(
                "{}: no valid bbolt meta page",
                path.display()
            )));
        };
        if !(512..=MAX_PAGE_SIZE).contains(&page_size) {
            return Err(corrupt(format!("page size {page_size}")));
        }
        Ok(Self {
            file,
            page_size,
            root,
            high_water,
        })
    }

    /// The database's size as bbolt reports it (`tx.Size()`): pages in use times page size.
    pub fn size(&self) -> u64 {
        self.high_water * self.page_size as u64
    }

    /// Reads page `id` with its overflow pages.
    fn page(&self, id: u64) -> Result<Vec<u8>, BoltError> {
        if id < 2 || id >= self.high_water {
            return Err(corrupt(format!(
                "page {id} outside the file's {} pages",
                self.high_water
            )));
        }
        let mut head = vec![0u8; self.page_size];
        self.file
            .read_exact_at(&mut head, id * self.page_size as u64)?;
        let overflow = le_u32(&head, 12)? as u64;
        if id + overflow >= self.high_water {
            return Err(corrupt(format!("page {id} overflows the file")));
        }
        if overflow == 0 {
            return Ok(head);
        }
        let mut all = vec![0u8; (overflow as usize + 1) * self.page_size];
        self.file
            .read_exact_at(&mut all, id * self.page_size as u64)?;
        Ok(all)
    }

    /// The top-level buckets' names, in order.
    pub fn bucket_names(&self) -> Result<Vec<Vec<u8>>, BoltError> {
        let mut names = Vec::new();
        self.walk(&Root::Page(self.root), 0, &mut |k, _, flags| {
            if flags & BUCKET_LEAF_FLAG != 0 {
                names.push(k.to_vec());
            }
            Ok(true)
        })?;
        Ok(names)
    }

    /// Calls `visit` with each pair of the top-level bucket `name` in key order (nested
    /// buckets skipped) until it returns false; Ok(false) if there is no such bucket.
    pub fn for_each(&self, name: &[u8], visit: &mut PairVisitor<'_>) -> Result<bool, BoltError> {
        let mut root = None;
        self.walk(&Root::Page(self.root), 0, &mut |k, v, flags| {
            if flags & BUCKET_LEAF_FLAG != 0 && k == name {
                root = Some(bucket_root(v)?);
                return Ok(false);
            }
            Ok(true)
        })?;
        let Some(root) = root else {
            return Ok(false);
        };
        self.walk(&root, 0, &mut |k, v, flags| {
            if flags & BUCKET_LEAF_FLAG != 0 {
                return Ok(true);
            }
            visit(k, v)
        })?;
        Ok(true)
    }

    /// Visits the leaf elements under `root` in order; false from `visit` stops the walk.
    fn walk(
        &self,
        root: &Root,
        depth: usize,
        visit: &mut ElementVisitor<'_>,
    ) -> Result<bool, BoltError> {
        if depth > MAX_DEPTH {
            return Err(corrupt("B+tree deeper than any bbolt file"));
        }
        let page = match root {
            Root::Page(id) => self.page(*id)?,
            Root::Inline(bytes) => bytes.clone(),
        };
        let flags = le_u16(&page, 8)?;
        let count = le_u16(&page, 10)? as usize;
        for i in 0..count {
            let at = PAGE_HEADER + i * ELEMENT;
            let slice = |from: usize, len: usize| {
                page.get(from..from + len)
                    .ok_or_else(|| corrupt("an element points outside its page"))
            };
            if flags == BRANCH_FLAG {
                let child = le_u64(&page, at + 8)?;
                if !self.walk(&Root::Page(child), depth + 1, visit)? {
                    return Ok(false);
                }
            } else if flags == LEAF_FLAG {
                let element_flags = le_u32(&page, at)?;
                let pos = le_u32(&page, at + 4)? as usize;
                let (ksize, vsize) = (
                    le_u32(&page, at + 8)? as usize,
                    le_u32(&page, at + 12)? as usize,
                );
                let key = slice(at + pos, ksize)?;
                let value = slice(at + pos + ksize, vsize)?;
                if !visit(key, value, element_flags)? {
                    return Ok(false);
                }
            } else {
                return Err(corrupt(format!("page of kind {flags:#x} inside a bucket")));
            }
        }
        Ok(true)
    }
}

/// A bucket's root from its header value: a page id, or (0) an inline page after the header.
fn bucket_root(value: &[u8]) -> Result<Root, BoltError> {
    let root = le_u64(value, 0)?;
    if root != 0 {
        return Ok(Root::Page(root));
    }
    Ok(Root::Inline(value.get(16..).unwrap_or_default().to_vec()))
}
