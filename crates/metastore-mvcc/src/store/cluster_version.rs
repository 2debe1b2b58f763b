//! The replicated cluster version: the MetaStore version every member runs at least, set by
//! the leader through raft (etcd's `ClusterVersionSet`). It gates what may be proposed and
//! stops a member that is older than the cluster instead of letting it apply what it cannot
//! read.

use super::{Store, WriteCtx};
use crate::MvccError;
use metastore_engine::{Engine, Space};
use std::fmt;

/// Meta key of the cluster version ("major.minor" as text).
const META_CLUSTER_VERSION: &[u8] = b"cluster_version";

/// A MetaStore `major.minor` version, ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClusterVersion {
    pub major: u32,
    pub minor: u32,
}

impl ClusterVersion {
    /// The version of this build (the workspace version, shared by every crate).
    pub fn this_build() -> ClusterVersion {
        ClusterVersion::parse(env!("CARGO_PKG_VERSION"))
            .unwrap_or(ClusterVersion { major: 0, minor: 0 })
    }

    /// Parses "major.minor" or "major.minor.patch" (the patch level never matters between
    /// members, as in etcd).
    pub fn parse(text: &str) -> Option<ClusterVersion> {
        // A pre-release or build suffix ("1.0.0-rc.1") says nothing about compatibility.
        let core = text.trim().split(['-', '+']).next()?;
        let mut parts = core.split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        if let Some(patch) = parts.next() {
            patch.parse::<u32>().ok()?;
        }
        parts
            .next()
            .is_none()
            .then_some(ClusterVersion { major, minor })
    }

    /// The version a cluster of members running `members` may use: the lowest of them.
    pub fn decide(members: &[ClusterVersion]) -> Option<ClusterVersion> {
        members.iter().min().copied()
    }
}

impl fmt::Display for ClusterVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Reads the stored cluster version, and refuses a data dir written by a newer cluster: an
/// older binary cannot know what that cluster wrote (etcd: "invalid downgrade").
pub(super) fn load(
    engine: &dyn Engine,
    supported: ClusterVersion,
) -> Result<Option<ClusterVersion>, MvccError> {
    let Some(raw) = engine.get(Space::Meta, META_CLUSTER_VERSION)? else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(&raw);
    let version = ClusterVersion::parse(&text)
        .ok_or_else(|| MvccError::Corrupt(0, format!("unreadable cluster version {text:?}")))?;
    if version > supported {
        return Err(MvccError::Downgrade {
            cluster: version.to_string(),
            member: supported.to_string(),
        });
    }
    Ok(Some(version))
}

impl<E: Engine> Store<E> {
    /// The cluster version, once the leader has set one (None: a data dir from before 0.2, or a
    /// member that has not applied the first `ClusterVersionSet` yet).
    pub fn cluster_version(&self) -> Option<ClusterVersion> {
        *self.cluster_version.read()
    }

    /// Applies `ClusterVersionSet`. A version newer than this build fails the whole apply, so
    /// the member stops (as etcd's `mustDetectDowngrade`) instead of going on beside members
    /// that will propose what it cannot read. A version older than the current one is
    /// ignored: the cluster version never goes down.
    pub(super) fn set_cluster_version(
        &self,
        text: &str,
        ctx: &mut WriteCtx,
    ) -> Result<Option<ClusterVersion>, MvccError> {
        let version = ClusterVersion::parse(text).ok_or_else(|| {
            MvccError::Corrupt(ctx.rev, format!("unreadable cluster version {text:?}"))
        })?;
        let supported = ClusterVersion::this_build();
        if version > supported {
            return Err(MvccError::Downgrade {
                cluster: version.to_string(),
                member: supported.to_string(),
            });
        }
        let mut current = self.cluster_version.write();
        if current.is_some_and(|c| c >= version) {
            return Ok(*current);
        }
        ctx.batch.put(
            Space::Meta,
            META_CLUSTER_VERSION.to_vec(),
            version.to_string().into_bytes(),
        );
        tracing::info!(
            from = %current.map(|c| c.to_string()).unwrap_or_else(|| "none".into()),
            to = %version,
            "cluster version set"
        );
        *current = Some(version);
        Ok(*current)
    }
}

#[cfg(test)]
mod tests {
    use super::ClusterVersion;

    #[test]
    fn versions_parse_and_order() {
        let v = |s| ClusterVersion::parse(s).expect(s);
        assert_eq!(v("0.2"), ClusterVersion { major: 0, minor: 2 });
        assert_eq!(v("0.2.7"), v("0.2"));
        assert_eq!(v("1.0.0-rc.1"), v("1.0"));
        assert!(v("0.10") > v("0.9"));
        assert!(v("1.0") > v("0.99"));
        for bad in ["", "1", "a.b", "1.2.3.4", "1.x"] {
            assert_eq!(ClusterVersion::parse(bad), None, "{bad:?}");
        }
        assert_eq!(
            ClusterVersion::decide(&[v("0.3"), v("0.2"), v("0.4")]),
            Some(v("0.2"))
        );
        assert_eq!(v("0.2").to_string(), "0.2");
    }
}
