//! Generated protobuf and gRPC types.
//!
//! The etcd packages keep their protobuf package names (`etcdserverpb`, `mvccpb`, …) so that the
//! gRPC paths (`/etcdserverpb.KV/Range`, …) are exactly etcd's.

#![allow(clippy::all, missing_docs)]

pub mod mvccpb {
    tonic::include_proto!("mvccpb");
    include!(concat!(env!("OUT_DIR"), "/mvccpb.serde.rs"));
}
pub mod authpb {
    tonic::include_proto!("authpb");
    include!(concat!(env!("OUT_DIR"), "/authpb.serde.rs"));
}
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.serde.rs"));
}
pub mod v3electionpb {
    tonic::include_proto!("v3electionpb");
    include!(concat!(env!("OUT_DIR"), "/v3electionpb.serde.rs"));
}
pub mod v3lockpb {
    tonic::include_proto!("v3lockpb");
    include!(concat!(env!("OUT_DIR"), "/v3lockpb.serde.rs"));
}
/// Nested as the protobuf package is (`metastore.internal`), so generated paths resolve.
pub mod metastore {
    pub mod internal {
        tonic::include_proto!("metastore.internal");
    }
    /// The batch API (`metastore.v1.Batch`), served beside etcd's services.
    pub mod v1 {
        tonic::include_proto!("metastore.v1");
        include!(concat!(env!("OUT_DIR"), "/metastore.v1.serde.rs"));
    }
    /// Raft traffic between members (`metastore.peer.RaftPeer`, on the peer port).
    pub mod peer {
        tonic::include_proto!("metastore.peer");
    }
}
pub use metastore::internal;
