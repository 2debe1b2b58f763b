//! Member and cluster ids, derived from the bootstrap flags exactly as etcd derives them, and
//! fixed in the data dir at first start.

use crate::config::Config;
use crate::ServerError;
use sha1::{Digest, Sha1};
use std::path::Path;

fn sha1_u64(bytes: &[u8]) -> u64 {
    let hash = Sha1::digest(bytes);
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash[..8]);
    u64::from_be_bytes(first)
}

/// etcd's `computeMemberId` for a member of `--initial-cluster`: sha1 of its sorted peer URLs
/// joined, then the cluster token; the first 8 bytes, big-endian.
pub fn member_id(peer_urls: &[String], token: &str) -> u64 {
    let mut urls: Vec<&str> = peer_urls.iter().map(String::as_str).collect();
    urls.sort_unstable();
    let mut bytes = urls.concat().into_bytes();
    bytes.extend_from_slice(token.as_bytes());
    sha1_u64(&bytes)
}

/// etcd's `genID`: sha1 of the sorted member ids, 8 bytes big-endian each.
pub fn cluster_id(member_ids: &[u64]) -> u64 {
    let mut ids = member_ids.to_vec();
    ids.sort_unstable();
    let bytes: Vec<u8> = ids.iter().flat_map(|id| id.to_be_bytes()).collect();
    sha1_u64(&bytes)
}

/// One member as the bootstrap flags (or the data dir) name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootMember {
    pub id: u64,
    pub name: String,
    pub peer_urls: Vec<String>,
}

/// Who this member is and who its peers are.
#[derive(Clone, Debug)]
pub struct Identity {
    pub member_id: u64,
    pub cluster_id: u64,
    pub members: Vec<BootMember>,
}

/// The ids of this member, its cluster and its members: read from the data dir when it has
/// them (a restart ignores the bootstrap flags, as etcd does), else derived from the flags and
/// written there.
pub fn identity(
    dir: &Path,
    cfg: &Config,
    flags: &[(String, Vec<String>)],
) -> Result<Identity, ServerError> {
    let id_path = dir.join("identity");
    let members_path = dir.join("members");
    let from_flags: Vec<BootMember> = flags
        .iter()
        .map(|(name, urls)| BootMember {
            id: member_id(urls, &cfg.initial_cluster_token),
            name: name.clone(),
            peer_urls: urls.clone(),
        })
        .collect();
    if let Ok(text) = std::fs::read_to_string(&id_path) {
        let ids: Vec<u64> = text
            .split_whitespace()
            .filter_map(|w| u64::from_str_radix(w, 16).ok())
            .collect();
        let [member_id, cluster_id] = ids[..] else {
            return Err(ServerError::Identity(
                id_path,
                format!("unreadable identity file {text:?}"),
            ));
        };
        let members = match std::fs::read_to_string(&members_path) {
            Ok(text) => parse_members(&text).ok_or_else(|| {
                ServerError::Identity(
                    members_path.clone(),
                    format!("unreadable members file {text:?}"),
                )
            })?,
            // A data dir from before members were recorded (0.1) is a single member, whatever
            // the flags say now.
            Err(_) => vec![BootMember {
                id: member_id,
                name: cfg.name.clone(),
                peer_urls: cfg.peer_urls(),
            }],
        };
        return Ok(Identity {
            member_id,
            cluster_id,
            members,
        });
    }
    let me = from_flags
        .iter()
        .find(|m| m.name == cfg.name)
        .map(|m| m.id)
        .unwrap_or_default();
    let ids: Vec<u64> = from_flags.iter().map(|m| m.id).collect();
    let cluster = cluster_id(&ids);
    let write = |path: &Path, text: String| {
        std::fs::write(path, text).map_err(|e| ServerError::DataDir(path.to_path_buf(), e))
    };
    // Members first: a crash between the two writes leaves no identity, so the next start
    // bootstraps again from the flags.
    write(&members_path, format_members(&from_flags))?;
    write(&id_path, format!("{me:x} {cluster:x}\n"))?;
    Ok(Identity {
        member_id: me,
        cluster_id: cluster,
        members: from_flags,
    })
}

/// One line per member: `id-hex name peer-url[,peer-url...]`.
fn format_members(members: &[BootMember]) -> String {
    members
        .iter()
        .map(|m| format!("{:x} {} {}\n", m.id, m.name, m.peer_urls.join(",")))
        .collect()
}

fn parse_members(text: &str) -> Option<Vec<BootMember>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let mut parts = line.split_whitespace();
            let id = u64::from_str_radix(parts.next()?, 16).ok()?;
            let name = parts.next()?.to_string();
            let peer_urls = parts.next()?.split(',').map(str::to_string).collect();
            Some(BootMember {
                id,
                name,
                peer_urls,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Read from a real etcd 3.4 cluster started with `--initial-cluster-token tok-x` and
    /// `--initial-cluster n1=http://127.0.0.1:31380,n2=...:32380,n3=...:33380`.
    #[test]
    fn ids_are_the_ones_etcd_derives() {
        let id = |url: &str| member_id(&[url.to_string()], "tok-x");
        let n1 = id("http://127.0.0.1:31380");
        let n2 = id("http://127.0.0.1:32380");
        let n3 = id("http://127.0.0.1:33380");
        assert_eq!(n1, 14625752131426504725);
        assert_eq!(n2, 17162336044232586914);
        assert_eq!(n3, 10336670305312293281);
        assert_eq!(cluster_id(&[n2, n3, n1]), 13229929584943697009);
    }

    #[test]
    fn the_members_file_round_trips() {
        let members = vec![
            BootMember {
                id: 0xabc,
                name: "m1".into(),
                peer_urls: vec!["http://127.0.0.1:2380".into()],
            },
            BootMember {
                id: 0xdef,
                name: "m2".into(),
                peer_urls: vec!["http://a:1".into(), "http://b:2".into()],
            },
        ];
        assert_eq!(parse_members(&format_members(&members)), Some(members));
        assert_eq!(parse_members("zz m1 http://x"), None);
    }
}
