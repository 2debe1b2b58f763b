//! Member and cluster ids, derived from the bootstrap flags exactly as etcd derives them, and
//! fixed in the data dir at first start.

use crate::config::{ClusterState, Config};
use crate::ServerError;
use sha1::{Digest, Sha1};
use std::path::{Path, PathBuf};

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

/// etcd's `computeMemberID` for a member added at runtime: as [`member_id`], with the time of
/// the request (unix seconds, in decimal) after the token.
pub fn runtime_member_id(peer_urls: &[String], token: &str, unix_secs: u64) -> u64 {
    let mut urls: Vec<&str> = peer_urls.iter().map(String::as_str).collect();
    urls.sort_unstable();
    let mut bytes = urls.concat().into_bytes();
    bytes.extend_from_slice(token.as_bytes());
    bytes.extend_from_slice(unix_secs.to_string().as_bytes());
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
    /// The bootstrap members (a new cluster), or the members the cluster had when this
    /// member joined it.
    pub members: Vec<BootMember>,
    /// This member joined a running cluster (`--initial-cluster-state existing`): its log
    /// comes from the leader, not from a bootstrap.
    pub joined: bool,
    /// Read from the data dir: this is a restart, not a first start.
    pub restarted: bool,
}

/// How long a member joining a cluster keeps asking its peers who the cluster is.
const JOIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long each peer gets to answer.
const PEER_ASK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// The ids of this member, its cluster and its members: read from the data dir when it has
/// them (a restart ignores the bootstrap flags, as etcd does), else derived from the flags
/// (`new`) or learned from the running cluster (`existing`), and written there.
pub async fn identity(
    dir: &Path,
    cfg: &Config,
    flags: &[(String, Vec<String>)],
) -> Result<Identity, ServerError> {
    let id_path = dir.join("identity");
    let members_path = dir.join("members");
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
            joined: text.split_whitespace().any(|w| w == JOINED),
            restarted: true,
        });
    }
    let identity = match cfg.initial_cluster_state {
        ClusterState::New => bootstrap_identity(cfg, flags).await?,
        ClusterState::Existing => join_identity(cfg, flags).await?,
    };
    write_identity(dir, &identity)?;
    Ok(identity)
}

/// Fixes `identity` in the member dir `dir`: later starts read it and ignore the flags.
pub(crate) fn write_identity(dir: &Path, identity: &Identity) -> Result<(), ServerError> {
    let write = |path: &Path, text: String| {
        std::fs::write(path, text).map_err(|e| ServerError::DataDir(path.to_path_buf(), e))
    };
    // Members first: a crash between the two writes leaves no identity, so the next start
    // derives it again.
    write(&dir.join("members"), format_members(&identity.members))?;
    let joined = if identity.joined { JOINED } else { "" };
    write(
        &dir.join("identity"),
        format!(
            "{:x} {:x} {joined}\n",
            identity.member_id, identity.cluster_id
        ),
    )
}

/// Marks the identity of a member that joined a running cluster.
const JOINED: &str = "existing";

async fn bootstrap_identity(
    cfg: &Config,
    flags: &[(String, Vec<String>)],
) -> Result<Identity, ServerError> {
    let identity = new_cluster_identity(cfg, flags);
    let me = identity.member_id;
    let members = &identity.members;
    // etcd's `isMemberBootstrapped`: a member whose data dir was wiped must not bootstrap a
    // second time next to a cluster that already runs with it (it would start a new log and
    // diverge); it has to be removed and added again.
    for other in members.iter().filter(|m| m.id != me) {
        for url in &other.peer_urls {
            if let Ok(cluster) =
                metastore_transport::fetch_members(url, PEER_ASK_TIMEOUT, &cfg.peer_dialer()).await
            {
                if cluster
                    .members
                    .iter()
                    .any(|m| m.id == me && !m.client_urls.is_empty())
                {
                    return Err(ServerError::Identity(
                        PathBuf::from(&cfg.data_dir),
                        format!("member {me:x} has already been bootstrapped"),
                    ));
                }
            }
        }
    }
    Ok(identity)
}

/// The ids a new cluster's member gets from `--initial-cluster`, `--initial-cluster-token` and
/// `--name` (etcd's `NewClusterFromURLsMap`); member id 0 when the name is not among them.
pub(crate) fn new_cluster_identity(cfg: &Config, flags: &[(String, Vec<String>)]) -> Identity {
    let members: Vec<BootMember> = flags
        .iter()
        .map(|(name, urls)| BootMember {
            id: member_id(urls, &cfg.initial_cluster_token),
            name: name.clone(),
            peer_urls: urls.clone(),
        })
        .collect();
    let me = members
        .iter()
        .find(|m| m.name == cfg.name)
        .map(|m| m.id)
        .unwrap_or_default();
    let ids: Vec<u64> = members.iter().map(|m| m.id).collect();
    Identity {
        member_id: me,
        cluster_id: cluster_id(&ids),
        members,
        joined: false,
        restarted: false,
    }
}

/// `--initial-cluster-state existing`: asks the other members of `--initial-cluster` for
/// the cluster, and finds this member in it by its peer URLs (etcd's
/// `GetClusterFromRemotePeers` and `ValidateClusterAndAssignIDs`).
async fn join_identity(
    cfg: &Config,
    flags: &[(String, Vec<String>)],
) -> Result<Identity, ServerError> {
    let mut own_urls = cfg.peer_urls();
    own_urls.sort_unstable();
    let peer_urls: Vec<&String> = flags
        .iter()
        .filter(|(name, _)| *name != cfg.name)
        .flat_map(|(_, urls)| urls)
        .filter(|u| !own_urls.contains(u))
        .collect();
    let started = std::time::Instant::now();
    let mut last_error = String::from("--initial-cluster names no other member");
    while started.elapsed() < JOIN_TIMEOUT {
        for url in &peer_urls {
            match metastore_transport::fetch_members(url, PEER_ASK_TIMEOUT, &cfg.peer_dialer())
                .await
            {
                Ok(cluster) => {
                    let me = cluster.members.iter().find(|m| {
                        let mut urls = m.peer_urls.clone();
                        urls.sort_unstable();
                        urls == own_urls
                    });
                    let Some(me) = me else {
                        return Err(ServerError::Identity(
                            PathBuf::from(&cfg.data_dir),
                            format!(
                                "the cluster at {url} has no member with peer URLs {own_urls:?}; add this member first (etcdctl member add {} --peer-urls={})",
                                cfg.name,
                                own_urls.join(",")
                            ),
                        ));
                    };
                    tracing::info!(
                        member = format_args!("{:x}", me.id),
                        cluster = format_args!("{:x}", cluster.cluster_id),
                        from = %url,
                        "joining a running cluster"
                    );
                    return Ok(Identity {
                        member_id: me.id,
                        cluster_id: cluster.cluster_id,
                        members: cluster
                            .members
                            .iter()
                            .map(|m| BootMember {
                                id: m.id,
                                name: if m.name.is_empty() {
                                    "-".into()
                                } else {
                                    m.name.clone()
                                },
                                peer_urls: m.peer_urls.clone(),
                            })
                            .collect(),
                        joined: true,
                        restarted: false,
                    });
                }
                Err(e) => last_error = e.to_string(),
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    Err(ServerError::Identity(
        PathBuf::from(&cfg.data_dir),
        format!("cannot fetch cluster info from peer urls: {last_error}"),
    ))
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
    fn a_runtime_member_id_mixes_in_the_time() {
        let urls = vec!["http://127.0.0.1:2380".to_string()];
        let at = |t| runtime_member_id(&urls, "tok", t);
        assert_ne!(at(1), at(2));
        assert_ne!(at(1), member_id(&urls, "tok"));
        // The time goes in as decimal text after the token.
        let mut bytes = b"http://127.0.0.1:2380tok1700000000".to_vec();
        assert_eq!(at(1_700_000_000), sha1_u64(&bytes));
        bytes.push(b'0');
        assert_ne!(at(1_700_000_000), sha1_u64(&bytes));
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
