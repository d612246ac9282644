//! The work a shard hands to its node's store when the store runs off the loop
//! ([`super::Shard::external_store`]; in a node, the log actor, `storage::log_actor`): block
//! reads and writes of the storage role and log syncs, each with where its answer goes;
//! and the answers the shard takes back ([`super::Shard::store_done`]).

use crate::coherence::{BlockId, NodeId, OpId, StoreReply, StoreRequest, SyncError};

/// Who asked for a log sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SyncFor {
    /// A caller on this node ([`super::Shard::sync`] with this node), by operation.
    Local(OpId),
    /// A peer's `SyncRequest`, answered with a `SyncReply`.
    Peer {
        /// The peer.
        from: NodeId,
        /// Its operation.
        op: OpId,
    },
}

/// One piece of store work, in the order the shard asked for it: the store must do them in
/// that order (a read after a write of the same block sees the write; a sync covers every
/// write asked for before it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreWork<D> {
    /// A block read or write of the storage role.
    Block(StoreRequest<D>),
    /// Make every write so far durable.
    Sync(SyncFor),
}

/// The store's answer to one [`StoreWork`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreDone<D> {
    /// A block request: the content read (`Some`), written (`None`), or what failed.
    Block {
        /// The block.
        block: BlockId,
        /// Where the answer goes.
        reply: StoreReply,
        /// The result.
        result: Result<Option<D>, String>,
    },
    /// A sync.
    Sync {
        /// Who asked.
        asked: SyncFor,
        /// Durable, or why not.
        result: Result<(), SyncError>,
    },
}
