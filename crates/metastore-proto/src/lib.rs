//! Generated protobuf and gRPC types.
//!
//! The etcd packages keep their protobuf package names (`etcdserverpb`, `mvccpb`, …) so that the
//! gRPC paths (`/etcdserverpb.KV/Range`, …) are exactly etcd's.

#![allow(clippy::all, missing_docs)]

pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}
pub mod authpb {
    tonic::include_proto!("authpb");
}
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}
pub mod v3electionpb {
    tonic::include_proto!("v3electionpb");
}
pub mod v3lockpb {
    tonic::include_proto!("v3lockpb");
}
/// Nested as the protobuf package is (`metastore.internal`), so generated paths resolve.
pub mod metastore {
    pub mod internal {
        tonic::include_proto!("metastore.internal");
    }
    /// The batch API (`metastore.v1.Batch`), served beside etcd's services.
    pub mod v1 {
        tonic::include_proto!("metastore.v1");
    }
    /// Raft traffic between members (`metastore.peer.RaftPeer`, on the peer port).
    pub mod peer {
        tonic::include_proto!("metastore.peer");
    }
}
pub use metastore::internal;
