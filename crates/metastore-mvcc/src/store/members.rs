//! Member attributes (name, client URLs) each member publishes through raft, as etcd's
//! `ClusterMemberAttrSet`: every member's MemberList can then name every member's client URLs.

use super::{Store, WriteCtx};
use crate::MvccError;
use metastore_engine::{Engine, Space};
use metastore_proto::internal::MemberAttrSet;
use prost::Message;
use std::collections::BTreeMap;
use std::ops::Bound;

const META_MEMBER_PREFIX: &[u8] = b"member_attr/";

fn member_key(id: u64) -> Vec<u8> {
    let mut k = META_MEMBER_PREFIX.to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

pub(super) fn load(engine: &dyn Engine) -> Result<BTreeMap<u64, MemberAttrSet>, MvccError> {
    let mut end = META_MEMBER_PREFIX.to_vec();
    end.push(0xff);
    let mut members = BTreeMap::new();
    let mut bad = None;
    engine.scan(
        Space::Meta,
        (
            Bound::Included(META_MEMBER_PREFIX),
            Bound::Excluded(&end[..]),
        ),
        &mut |_, v| {
            match MemberAttrSet::decode(&v[..]) {
                Ok(attr) => {
                    members.insert(attr.member_id, attr);
                }
                Err(e) => bad = Some(e.to_string()),
            }
            true
        },
    )?;
    match bad {
        Some(e) => Err(MvccError::Corrupt(0, format!("member attributes: {e}"))),
        None => Ok(members),
    }
}

impl<E: Engine> Store<E> {
    /// The attributes every member has published, by member id.
    pub fn member_attrs(&self) -> BTreeMap<u64, MemberAttrSet> {
        self.member_attrs.read().clone()
    }

    pub(super) fn set_member_attrs(&self, attr: &MemberAttrSet, ctx: &mut WriteCtx) {
        ctx.batch.put(
            Space::Meta,
            member_key(attr.member_id),
            attr.encode_to_vec(),
        );
        self.member_attrs
            .write()
            .insert(attr.member_id, attr.clone());
    }
}
