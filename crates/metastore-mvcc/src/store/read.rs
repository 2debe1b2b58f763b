//! Reads of MVCC records: one or many revisions (seeing the entry being applied through its
//! overlay), the revision a request may read at, and ranges with etcd's limit, count, sort,
//! filter and response-size rules.

use super::*;

impl<E: Engine> Store<E> {
    pub(super) fn load(&self, rev: Revision, view: &View<'_>) -> Result<KeyValue> {
        let key = rev_key(rev, false);
        let raw = match view.overlay.and_then(|o| o.get(rev)) {
            Some(v) => Some(v),
            None => self.engine.get(Space::Kv, &key)?,
        };
        // A record missing under a visible index entry can only have been removed by a
        // compaction racing this reader.
        let raw = raw.ok_or(MvccError::Compacted)?;
        KeyValue::decode(raw).map_err(|e| MvccError::Corrupt(rev.main, e.to_string()))
    }

    /// [`load`](Self::load) of several records with one engine lookup for those the view
    /// does not hold.
    pub(super) fn load_many(&self, revs: &[Revision], view: &View<'_>) -> Result<Vec<KeyValue>> {
        if let [rev] = revs {
            return Ok(vec![self.load(*rev, view)?]);
        }
        let mut raws: Vec<Option<Bytes>> = revs
            .iter()
            .map(|&r| view.overlay.and_then(|o| o.get(r)))
            .collect();
        let missing: Vec<usize> = (0..revs.len()).filter(|&i| raws[i].is_none()).collect();
        if !missing.is_empty() {
            let keys: Vec<Bytes> = missing.iter().map(|&i| rev_key(revs[i], false)).collect();
            let refs: Vec<&[u8]> = keys.iter().map(|k| &k[..]).collect();
            let found = self.engine.get_many(Space::Kv, &refs)?;
            for (i, raw) in missing.into_iter().zip(found) {
                raws[i] = raw;
            }
        }
        revs.iter()
            .zip(raws)
            .map(|(rev, raw)| {
                // As in `load`: only a racing compaction removes a record the index shows.
                let raw = raw.ok_or(MvccError::Compacted)?;
                KeyValue::decode(raw).map_err(|e| MvccError::Corrupt(rev.main, e.to_string()))
            })
            .collect()
    }

    pub(super) fn check_rev(&self, requested: i64, view: &View<'_>) -> Result<i64> {
        let rev = if requested <= 0 {
            view.current
        } else {
            requested
        };
        if rev > view.current {
            return Err(MvccError::FutureRev);
        }
        if rev < self.compact_revision().max(view.compact_floor) {
            return Err(MvccError::Compacted);
        }
        Ok(rev)
    }

    pub(super) fn range_in(&self, req: &RangeRequest, view: &View<'_>) -> Result<RangeResponse> {
        self.range_in_bounded(req, view, usize::MAX, &mut 0)
    }

    /// `used` carries the bytes counted so far across the ranges of one answer (a Txn's).
    pub(super) fn range_in_bounded(
        &self,
        req: &RangeRequest,
        view: &View<'_>,
        max_bytes: usize,
        used: &mut usize,
    ) -> Result<RangeResponse> {
        let rev = self.check_rev(req.revision, view)?;
        let sort_order = range_request::SortOrder::try_from(req.sort_order)
            .unwrap_or(range_request::SortOrder::None);
        let sort_target = range_request::SortTarget::try_from(req.sort_target)
            .unwrap_or(range_request::SortTarget::Key);
        let filtered = req.min_mod_revision != 0
            || req.max_mod_revision != 0
            || req.min_create_revision != 0
            || req.max_create_revision != 0;
        // As etcd: when sorting or filtering, fetch everything and cut afterwards; otherwise
        // fetch one more than the limit to know whether there is `more`.
        let fetch_limit =
            if sort_order != range_request::SortOrder::None || filtered || req.limit <= 0 {
                usize::MAX
            } else {
                (req.limit as usize).saturating_add(1)
            };
        let mut count = 0i64;
        let mut revs = Vec::new();
        self.index.visit(
            &KeyRange::new(&req.key, &req.range_end),
            rev,
            &mut |_, r| {
                count += 1;
                if !req.count_only && revs.len() < fetch_limit {
                    revs.push(r.rev);
                }
                true
            },
        );
        let mut kvs = Vec::with_capacity(revs.len());
        let bytes = used;
        for chunk in revs.chunks(LOAD_CHUNK) {
            for kv in self.load_many(chunk, view)? {
                if max_bytes != usize::MAX {
                    // Each key-value's field tag and length prefix included, as it is sent
                    // (with no value when only keys are asked for).
                    let value = if req.keys_only { kv.value.len() } else { 0 };
                    *bytes += kv.encoded_len() - value + 6;
                    if *bytes > max_bytes {
                        return Err(MvccError::ResponseTooLarge {
                            size: *bytes,
                            limit: max_bytes,
                        });
                    }
                }
                kvs.push(kv);
            }
        }
        // A compaction that ran while we read may have trimmed what we saw.
        if rev < self.compact_revision().max(view.compact_floor) {
            return Err(MvccError::Compacted);
        }
        if filtered {
            kvs.retain(|kv| {
                (req.max_mod_revision == 0 || kv.mod_revision <= req.max_mod_revision)
                    && (req.min_mod_revision == 0 || kv.mod_revision >= req.min_mod_revision)
                    && (req.max_create_revision == 0
                        || kv.create_revision <= req.max_create_revision)
                    && (req.min_create_revision == 0
                        || kv.create_revision >= req.min_create_revision)
            });
        }
        let order = match (sort_order, sort_target) {
            (range_request::SortOrder::None, range_request::SortTarget::Key) => None,
            (range_request::SortOrder::Ascend, range_request::SortTarget::Key) => None,
            (range_request::SortOrder::None, _) => Some(false),
            (range_request::SortOrder::Ascend, _) => Some(false),
            (range_request::SortOrder::Descend, _) => Some(true),
        };
        if let Some(descend) = order {
            fn key_of(kv: &KeyValue, sort_target: range_request::SortTarget) -> SortKey<'_> {
                match sort_target {
                    range_request::SortTarget::Key => SortKey::Bytes(&kv.key),
                    range_request::SortTarget::Version => SortKey::Int(kv.version),
                    range_request::SortTarget::Create => SortKey::Int(kv.create_revision),
                    range_request::SortTarget::Mod => SortKey::Int(kv.mod_revision),
                    range_request::SortTarget::Value => SortKey::Bytes(&kv.value),
                }
            }
            kvs.sort_by(|a, b| {
                let o = key_of(a, sort_target).cmp(&key_of(b, sort_target));
                if descend {
                    o.reverse()
                } else {
                    o
                }
            });
        }
        let mut more = false;
        if req.limit > 0 && kvs.len() > req.limit as usize {
            kvs.truncate(req.limit as usize);
            more = true;
        }
        if req.keys_only {
            for kv in &mut kvs {
                kv.value = Bytes::new();
            }
        }
        Ok(RangeResponse {
            header: header(view.current),
            kvs,
            more,
            count,
        })
    }
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum SortKey<'a> {
    Int(i64),
    Bytes(&'a [u8]),
}
