//! The objects of the Kubernetes-shaped workload: their keys, sizes and values, and what one
//! client knows about the objects it owns.

use std::time::Instant;

/// Resource types, in the order their ids are dealt out (more than these get `crd-N` names).
const TYPE_NAMES: [&str; 8] = [
    "pods",
    "configmaps",
    "secrets",
    "events",
    "services",
    "endpointslices",
    "deployments",
    "leases",
];

/// Bytes at the start of every value: send time (ns since the run's epoch), object id and the
/// generation the owning client wrote, each a little-endian u64.
pub(crate) const HEADER: usize = 24;

/// Where objects live and how large they are.
#[derive(Clone, Debug)]
pub(crate) struct Layout {
    pub(crate) types: usize,
    pub(crate) namespaces: u64,
    pub(crate) min_size: usize,
    pub(crate) max_size: usize,
}

impl Layout {
    pub(crate) fn type_name(&self, t: usize) -> String {
        match TYPE_NAMES.get(t) {
            Some(name) => (*name).to_string(),
            None => format!("crd-{t}"),
        }
    }

    pub(crate) fn type_of(&self, id: u64) -> usize {
        (id % self.types as u64) as usize
    }

    /// `/registry/<type>/` — what a list or a watch of one type covers.
    pub(crate) fn type_prefix(&self, t: usize) -> String {
        format!("/registry/{}/", self.type_name(t))
    }

    /// `/registry/<type>/<namespace>/<name>`, the key kube-apiserver gives a namespaced object.
    pub(crate) fn key(&self, id: u64) -> Vec<u8> {
        let t = self.type_of(id);
        let ns = (id / self.types as u64) % self.namespaces;
        format!("{}ns-{ns:04}/obj-{id:010}", self.type_prefix(t)).into_bytes()
    }

    /// Sizes are log-uniform between the bounds (most objects small, a tail of large ones, as
    /// in a real cluster), fixed per object so an update keeps its object's size.
    pub(crate) fn size(&self, id: u64) -> usize {
        let u = (mix64(id) >> 11) as f64 / (1u64 << 53) as f64;
        let ratio = self.max_size as f64 / self.min_size as f64;
        let size = self.min_size as f64 * ratio.powf(u);
        (size as usize).clamp(self.min_size, self.max_size)
    }

    /// The value of generation `gen` of object `id`, stamped with the time it is sent.
    pub(crate) fn value(&self, id: u64, gen: u64, epoch: Instant) -> Vec<u8> {
        let size = self.size(id).max(HEADER);
        let mut v = Vec::with_capacity(size);
        let sent = epoch.elapsed().as_nanos() as u64;
        v.extend_from_slice(&sent.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
        v.extend_from_slice(&gen.to_le_bytes());
        v.resize(size, b'a' + (id % 26) as u8);
        v
    }
}

/// What a value's header says: (sent ns since the epoch, object id, generation).
pub(crate) fn parse_value(v: &[u8]) -> Option<(u64, u64, u64)> {
    let word = |i: usize| -> Option<u64> {
        let bytes: [u8; 8] = v.get(i * 8..i * 8 + 8)?.try_into().ok()?;
        Some(u64::from_le_bytes(bytes))
    };
    Some((word(0)?, word(1)?, word(2)?))
}

/// The first key after every key that starts with `prefix` (etcd's prefix range end).
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// splitmix64's finaliser: spreads consecutive ids over the whole u64 range.
fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// An object one client owns, as it last wrote it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Live {
    pub(crate) id: u64,
    pub(crate) mod_rev: i64,
    pub(crate) gen: u64,
}

/// The objects one client owns: ids `client, client + clients, …`. No other client writes
/// them, so any answer that disagrees with this record is the server's error.
pub(crate) struct Owned {
    pub(crate) live: Vec<Live>,
    /// The next id this client creates.
    pub(crate) next_id: u64,
    stride: u64,
    rng: u64,
}

impl Owned {
    /// Client `client` of `clients`, owning its share of ids below `objects` once loaded.
    pub(crate) fn new(client: usize, clients: usize) -> Self {
        Self {
            live: Vec::new(),
            next_id: client as u64,
            stride: clients as u64,
            rng: mix64(client as u64 + 1) | 1,
        }
    }

    pub(crate) fn take_next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += self.stride;
        id
    }

    /// A random index into `live` (which must not be empty).
    pub(crate) fn pick(&mut self) -> usize {
        (self.random() % self.live.len() as u64) as usize
    }

    pub(crate) fn random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout {
            types: 3,
            namespaces: 5,
            min_size: 1024,
            max_size: 16 * 1024,
        }
    }

    #[test]
    fn keys_fall_under_their_types_prefix_and_range() {
        let l = layout();
        for id in 0..100 {
            let key = l.key(id);
            let prefix = l.type_prefix(l.type_of(id)).into_bytes();
            assert!(key.starts_with(&prefix));
            assert!(key < prefix_end(&prefix));
        }
        assert_eq!(l.key(4), b"/registry/configmaps/ns-0001/obj-0000000004");
        assert_eq!(Layout { types: 9, ..l }.type_name(8), "crd-8");
    }

    #[test]
    fn sizes_stay_in_bounds_and_spread_out() {
        let l = layout();
        let sizes: Vec<usize> = (0..10_000).map(|id| l.size(id)).collect();
        assert!(sizes.iter().all(|&s| (1024..=16 * 1024).contains(&s)));
        let small = sizes.iter().filter(|&&s| s < 4096).count();
        // log-uniform: half the objects below the geometric mean (4 KiB)
        assert!((4_000..6_000).contains(&small), "{small}");
    }

    #[test]
    fn a_value_carries_its_object_and_generation() {
        let l = layout();
        let epoch = Instant::now();
        let v = l.value(42, 7, epoch);
        assert_eq!(v.len(), l.size(42));
        let (_, id, gen) = parse_value(&v).expect("header");
        assert_eq!((id, gen), (42, 7));
        assert_eq!(parse_value(&v[..10]), None);
    }

    #[test]
    fn prefix_end_skips_trailing_ff() {
        assert_eq!(prefix_end(b"/registry/pods/"), b"/registry/pods0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    #[test]
    fn clients_own_disjoint_ids() {
        let mut a = Owned::new(0, 3);
        let mut b = Owned::new(1, 3);
        let ids_a: Vec<u64> = (0..4).map(|_| a.take_next_id()).collect();
        let ids_b: Vec<u64> = (0..4).map(|_| b.take_next_id()).collect();
        assert_eq!(ids_a, [0, 3, 6, 9]);
        assert_eq!(ids_b, [1, 4, 7, 10]);
    }
}
