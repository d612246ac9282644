//! The per-block cache-coherence protocol of DESIGN.md §4, as a pure state machine.
//!
//! Three machines, one per role, each owning the state of many blocks (a *shard*):
//!
//! * [`ClientShard`]: the client's block cache. Per block: `Invalid`, `Read-Shared`,
//!   `Private-Clean`, `Private-Dirty` ([`ClientBlock::state`]), plus the transient states that
//!   waiting needs: a user operation in progress ([`PendingOp`]), a local step that blocks the
//!   block's manager messages ([`Step`]: a write-back to storage, a kernel-cache invalidation),
//!   and manager messages deferred behind that step.
//! * [`ManagerShard`]: per block, the cachers and the owner, a write in progress (revokes out,
//!   acknowledgements in), the queue of requests it cannot serve yet, and per client the
//!   sequence number of its next outgoing message.
//! * [`StorageShard`]: serves fetches (delegated replies) and write-backs: sans-IO, it turns
//!   a message into a [`StoreRequest`] ([`StorageShard::request`]) and the store's result
//!   into the reply ([`StorageShard::answer`]); [`StorageShard::receive`] does both at once
//!   on a [`BlockStore`] (the model's and tests' [`MemStore`]).
//!
//! Nothing here reads a clock or does IO: in a node the storage requests go to the node's
//! log actor (`storage::log_actor`) and come back as completions (docs/architecture.md). A
//! driver feeds inputs ([`ClientShard::start`], [`ClientShard::receive`],
//! [`ClientShard::kernel_invalidated`], [`ManagerShard::receive`],
//! [`StorageShard::request`], [`StorageShard::answer`]) and executes the [`Output`]s. The
//! `stateright` model (`tests/model/`) and the shard loops ([`crate::shard`]) drive this
//! same code.
//!
//! ## The protocol
//!
//! * **Read miss**: client → manager `ReadReq`. The manager adds the reader to the cachers at
//!   once and delegates the reply: to the owner if there is one, else to another cacher
//!   (`Forward`: the holder sends `Data` straight to the reader: cooperative caching), else to
//!   storage (`Fetch`). A dirty owner **writes the block back to storage before it forwards
//!   it** (the reliability rule) and keeps a shared copy.
//! * **Write**: client → manager `WriteReq`. The manager revokes every other copy (`Revoke`;
//!   a dirty holder writes back first; every holder invalidates its kernel cache before it
//!   acknowledges), queues other requests for the block until all acknowledgements are in,
//!   then grants: `Grant` if the writer still holds the current data, else storage sends it
//!   (`Fetch` with `exclusive`).
//! * **Evict** (user, or chosen by cache capacity when a miss needs a slot): a dirty block is
//!   written back, the kernel cache is invalidated, then `EvictReq`; the client keeps serving
//!   forwards until `EvictGrant`. If the block was the last cached copy and the client says
//!   it is worth keeping (`EvictReq { keep }`: read there, or written there with
//!   `ProtocolConfig::hand_off_written`, in a bounded cache; always in an unbounded one), the manager may name a peer to take it (`Handoff`, N-chance
//!   forwarding, at most N times without a use); the peer makes room for it as for a miss.
//! * **Flush**: a dirty block is written back and stays private-clean.
//! * **Ordering**: the manager numbers its messages to each client (`seq`), and a delegated
//!   reply carries the number the manager reserved for it on the reader's channel. A client
//!   handles its manager's messages in that order, whichever path they took. Without the
//!   numbers ([`ProtocolConfig::sequenced`] = false, a variant kept for the model checker) a
//!   client handles them as they arrive and queues what it is not ready for: the xFS
//!   deadlock of Figure 2 (seed `000_…`, §3.3.2).
//!
//! * **Fencing** ([`Fence`]): every message carries its sender's membership epoch; the
//!   manager and storage roles refuse a node the cluster removed, and an old incarnation's
//!   messages, so a node that stalled cannot write its stale copy over a newer one. When
//!   a client is removed the manager answers for it ([`ManagerShard::peer_removed`]):
//!   writes waiting for its acknowledgement go on, and readers it was to serve (a forward,
//!   a handoff: [`ManagerBlock::delegated`]) are served again from another copy or from
//!   storage; a reply that comes twice is dropped by its sequence number.
//! * **Undeliverable messages** ([`ManagerShard::undeliverable`]): a revoke counts as
//!   acknowledged, a forward is served from another copy (storage only when no other copy
//!   is left: a former owner may still be writing the block back), a handoff comes from
//!   storage.
//!
//! Bounds: a client shard defers at most `clients + 2` messages per block (one per
//! outstanding forward, a revoke, a grant); a channel holds at most [`MAX_HELD`]
//! out-of-order messages; a manager queues at most one request per client per block.

mod client;
mod fence;
mod manager;
mod placement;
mod storage;
#[cfg(test)]
mod tests;
pub mod wire;

pub use client::*;
pub use fence::*;
pub use manager::*;
pub use placement::*;
pub use storage::*;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Debug;

/// A node of the cluster (its client, manager and storage roles share it).
pub type NodeId = u16;
/// A block: (index number, block number) packed by the caller.
pub type BlockId = u64;
/// A user operation, named by the driver so that it can match completions.
pub type OpId = u64;

/// Most out-of-order manager messages one client channel holds before it reports an error.
pub const MAX_HELD: usize = 1024;

/// Which role of a node a message is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// The client's block cache.
    Client,
    /// The block's manager.
    Manager,
    /// The block's storage server.
    Storage,
}

/// Protocol messages. `seq` is the manager's per-client sequence number.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Msg<D> {
    /// Client → manager: read miss.
    ReadReq {
        /// The block.
        block: BlockId,
    },
    /// Client → manager: acquire the write token; `has_data` when the client holds a copy,
    /// `whole` when it replaces the whole block (then it needs no data with the grant).
    WriteReq {
        /// The block.
        block: BlockId,
        /// Whether the client holds a copy.
        has_data: bool,
        /// Whether the client replaces the whole block (no data needed with the grant).
        whole: bool,
    },
    /// Client → manager: the client drops its (clean, kernel-invalidated) copy.
    EvictReq {
        /// The block.
        block: BlockId,
        /// Whether the copy is worth another client's room if it is the last one (read
        /// where it is cached, or written there with `hand_off_written`; never a copy
        /// handed there and not read since): the manager hands off (N-chance) only such
        /// copies.
        keep: bool,
    },
    /// Client → manager: the copy named by a `Revoke` is gone (written back if it was dirty).
    RevokeAck {
        /// The block.
        block: BlockId,
    },
    /// Client → manager: a `Forward` found no copy here; serve `reader` from storage.
    ForwardFailed {
        /// The block.
        block: BlockId,
        /// The client the forward was for.
        reader: NodeId,
        /// The sequence number reserved for the reply on the reader's channel.
        reader_seq: u32,
    },
    /// Manager → client: send your copy to `reader` (a delegated reply, `reader_seq` on the
    /// reader's channel); an owner becomes a reader.
    Forward {
        /// The block.
        block: BlockId,
        /// The manager's sequence number of this message on the receiving client's channel.
        seq: u32,
        /// Where to send the copy.
        reader: NodeId,
        /// The sequence number reserved for the reply on the reader's channel.
        reader_seq: u32,
    },
    /// Manager → client: drop your copy (write back first if dirty) and acknowledge.
    Revoke {
        /// The block.
        block: BlockId,
        /// The manager's sequence number of this message on the receiving client's channel.
        seq: u32,
    },
    /// Manager → client: your write may proceed on the copy you hold.
    Grant {
        /// The block.
        block: BlockId,
        /// The manager's sequence number of this message on the receiving client's channel.
        seq: u32,
    },
    /// Manager → client: eviction accepted; hand the copy to `handoff` (peer, its seq).
    EvictGrant {
        /// The block.
        block: BlockId,
        /// The manager's sequence number of this message on the receiving client's channel.
        seq: u32,
        /// The peer to hand the last copy to, with the sequence number reserved on its channel.
        handoff: Option<(NodeId, u32)>,
    },
    /// Manager → storage: send the block to `to` (a delegated reply, `seq` on its channel).
    Fetch {
        /// The block.
        block: BlockId,
        /// The client to send the block to.
        to: NodeId,
        /// The sequence number reserved for the reply on that client's channel.
        seq: u32,
        /// Whether the reply grants the write token.
        exclusive: bool,
    },
    /// Peer or storage → client: the block's data, the reply to a read (or, `exclusive`, a
    /// write) request; `from_cache` when a peer's cache sent it (cooperative caching).
    Data {
        /// The block.
        block: BlockId,
        /// The sequence number the manager reserved for this reply on the receiver's channel.
        seq: u32,
        /// The block's content.
        data: D,
        /// Whether this grants the write token.
        exclusive: bool,
        /// Whether a peer's cache sent it (cooperative caching).
        from_cache: bool,
    },
    /// Evicting client → peer: the last cached copy, N-chance forwarding.
    Handoff {
        /// The block.
        block: BlockId,
        /// The sequence number reserved for it on the peer's channel.
        seq: u32,
        /// The block's content.
        data: D,
    },
    /// Client → storage: write the block.
    WriteBack {
        /// The block.
        block: BlockId,
        /// The block's content.
        data: D,
    },
    /// Storage → client: the write-back is durable.
    WriteBackAck {
        /// The block.
        block: BlockId,
    },
    /// Manager → client: nothing comes at `seq` (a handoff ordered for this client whose
    /// evicting client was removed before it sent it): the channel moves on.
    Skip {
        /// The block.
        block: BlockId,
        /// The sequence number that was reserved for the handoff.
        seq: u32,
    },
}

impl<D> Msg<D> {
    /// The block the message is about.
    pub fn block(&self) -> BlockId {
        match self {
            Msg::ReadReq { block }
            | Msg::WriteReq { block, .. }
            | Msg::EvictReq { block, .. }
            | Msg::RevokeAck { block }
            | Msg::ForwardFailed { block, .. }
            | Msg::Forward { block, .. }
            | Msg::Revoke { block, .. }
            | Msg::Grant { block, .. }
            | Msg::EvictGrant { block, .. }
            | Msg::Fetch { block, .. }
            | Msg::Data { block, .. }
            | Msg::Handoff { block, .. }
            | Msg::WriteBack { block, .. }
            | Msg::Skip { block, .. }
            | Msg::WriteBackAck { block } => *block,
        }
    }

    /// The role that handles the message.
    pub fn role(&self) -> Role {
        match self {
            Msg::ReadReq { .. }
            | Msg::WriteReq { .. }
            | Msg::EvictReq { .. }
            | Msg::RevokeAck { .. }
            | Msg::ForwardFailed { .. } => Role::Manager,
            Msg::Fetch { .. } | Msg::WriteBack { .. } => Role::Storage,
            Msg::Forward { .. }
            | Msg::Revoke { .. }
            | Msg::Grant { .. }
            | Msg::EvictGrant { .. }
            | Msg::Data { .. }
            | Msg::Handoff { .. }
            | Msg::Skip { .. }
            | Msg::WriteBackAck { .. } => Role::Client,
        }
    }

    /// The manager's sequence number, for messages on a manager → client channel.
    pub fn seq(&self) -> Option<u32> {
        match self {
            Msg::Forward { seq, .. }
            | Msg::Revoke { seq, .. }
            | Msg::Grant { seq, .. }
            | Msg::EvictGrant { seq, .. }
            | Msg::Data { seq, .. }
            | Msg::Handoff { seq, .. }
            | Msg::Skip { seq, .. } => Some(*seq),
            _ => None,
        }
    }

    /// The same message with its block data (if any) passed through `f`.
    pub fn map_data<E>(self, f: impl FnOnce(D) -> E) -> Msg<E> {
        match self {
            Msg::ReadReq { block } => Msg::ReadReq { block },
            Msg::WriteReq {
                block,
                has_data,
                whole,
            } => Msg::WriteReq {
                block,
                has_data,
                whole,
            },
            Msg::EvictReq { block, keep } => Msg::EvictReq { block, keep },
            Msg::RevokeAck { block } => Msg::RevokeAck { block },
            Msg::ForwardFailed {
                block,
                reader,
                reader_seq,
            } => Msg::ForwardFailed {
                block,
                reader,
                reader_seq,
            },
            Msg::Forward {
                block,
                seq,
                reader,
                reader_seq,
            } => Msg::Forward {
                block,
                seq,
                reader,
                reader_seq,
            },
            Msg::Revoke { block, seq } => Msg::Revoke { block, seq },
            Msg::Grant { block, seq } => Msg::Grant { block, seq },
            Msg::EvictGrant {
                block,
                seq,
                handoff,
            } => Msg::EvictGrant {
                block,
                seq,
                handoff,
            },
            Msg::Fetch {
                block,
                to,
                seq,
                exclusive,
            } => Msg::Fetch {
                block,
                to,
                seq,
                exclusive,
            },
            Msg::Data {
                block,
                seq,
                data,
                exclusive,
                from_cache,
            } => Msg::Data {
                block,
                seq,
                data: f(data),
                exclusive,
                from_cache,
            },
            Msg::Handoff { block, seq, data } => Msg::Handoff {
                block,
                seq,
                data: f(data),
            },
            Msg::WriteBack { block, data } => Msg::WriteBack {
                block,
                data: f(data),
            },
            Msg::WriteBackAck { block } => Msg::WriteBackAck { block },
            Msg::Skip { block, seq } => Msg::Skip { block, seq },
        }
    }

    /// The same message with every node id passed through `f` (symmetry reduction).
    pub fn renamed(&self, f: &impl Fn(NodeId) -> NodeId) -> Msg<D>
    where
        D: Clone,
    {
        let mut m = self.clone();
        match &mut m {
            Msg::ForwardFailed { reader, .. } | Msg::Forward { reader, .. } => *reader = f(*reader),
            Msg::EvictGrant {
                handoff: Some((peer, _)),
                ..
            } => *peer = f(*peer),
            Msg::Fetch { to, .. } => *to = f(*to),
            _ => {}
        }
        m
    }
}

/// What the state machine asks its driver to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output<D> {
    /// Send `msg` to node `to` (to the role [`Msg::role`] names).
    Send {
        /// The node to send to.
        to: NodeId,
        /// The message.
        msg: Msg<D>,
    },
    /// Drop the kernel's cached pages of `block`, then call
    /// [`ClientShard::kernel_invalidated`] (from wherever the invalidation ran).
    InvalidateKernel {
        /// The block.
        block: BlockId,
    },
    /// A user operation finished (evictions the shard starts for room are not reported).
    Complete {
        /// The operation.
        op: OpId,
        /// The block.
        block: BlockId,
        /// How it ended.
        outcome: Outcome<D>,
    },
}

/// How a user operation ended.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome<D> {
    /// A read returned this data.
    Read(D),
    /// A write is applied (the client holds the block private-dirty).
    Written,
    /// An update is applied; this was the content before it.
    Updated(D),
    /// The block is held private and pinned; its content.
    Acquired(D),
    /// The block is no longer pinned.
    Released,
    /// The block left the cache.
    Evicted,
    /// The block is durable on storage (or was not dirty).
    Flushed,
}

/// A user operation on one block.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UserOp<D> {
    /// Read the block.
    Read,
    /// Read the block into the cache ahead of a reader (read-ahead): a read in every way
    /// (completes with [`Outcome::Read`]), except that it is not a use of the block: its
    /// first real read counts as the one that brought it in (a bounded cache's eviction
    /// order and N-chance handoffs go by use).
    Prefetch,
    /// Replace the block's content.
    Write(D),
    /// Apply a patch atomically ([`Patch::patched`] on the current content, with the
    /// block held private): the read-modify-write that metadata and partial writes need.
    /// Completes with [`Outcome::Updated`] carrying the content before the patch.
    Update(D),
    /// Get the block private and keep it (a multi-block transaction: acquire blocks in
    /// increasing id order, update them, release them): the manager's revokes and forwards
    /// wait until [`UserOp::Release`]. Completes with [`Outcome::Acquired`] and the content.
    Acquire,
    /// Let an acquired block go (its deferred manager messages run).
    Release,
    /// Drop the block from the cache.
    Evict,
    /// Write the block back to storage if it is dirty.
    Flush,
}

/// A protocol violation: a message arrived in a state that has no rule for it, or a driver
/// broke the contract. The model checker asserts none happens; a node counts and logs them.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, thiserror::Error)]
pub enum ProtocolError {
    /// No rule handles this message in this state.
    #[error("no rule for {msg} on block {block} in state {state}")]
    Unexpected {
        /// The block.
        block: BlockId,
        /// The message's name.
        msg: &'static str,
        /// The block's state's name.
        state: &'static str,
    },
    /// A sequence number that was already used, or too far ahead.
    #[error("sequence number {seq} from node {from} out of window (expected {expected})")]
    BadSequence {
        /// The sending node.
        from: NodeId,
        /// The sequence number it sent.
        seq: u32,
        /// The sequence number expected next.
        expected: u32,
    },
    /// The storage role's store failed (no reply was sent).
    #[error("storage: {0}")]
    Storage(String),
    /// The driver started an operation on a block that already has one.
    #[error("block {0} already has an operation in progress")]
    Busy(BlockId),
}

/// Protocol variants, for the model checker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProtocolConfig {
    /// Clients handle manager messages in the manager's order (true in every real node).
    pub sequenced: bool,
    /// How many times an unused last copy may be handed to a peer on eviction (N-chance).
    pub n_chance: u8,
    /// Whether a bounded cache offers a copy written there (and not read) for a handoff
    /// too, as xFS's N-chance does with every last copy; else only copies read there go.
    /// A copy handed to a peer and not read there is never handed on.
    pub hand_off_written: bool,
}

impl Default for ProtocolConfig {
    fn default() -> Self {
        ProtocolConfig {
            sequenced: true,
            n_chance: 2,
            hand_off_written: true,
        }
    }
}

/// Block content that can be patched in place ([`UserOp::Update`]): the new content is a
/// pure function of the old content and the patch, applied while the client holds the block
/// private, so no other write can come between the read and the write.
pub trait Patch: Clone + Default {
    /// The content after applying `patch`.
    fn patched(&self, patch: &Self) -> Self;
}

/// Small values (the model, the simulation): a patch adds to the value, so a lost update
/// shows as a wrong sum.
impl Patch for u8 {
    fn patched(&self, patch: &u8) -> u8 {
        self.wrapping_add(*patch)
    }
}

impl Patch for u64 {
    fn patched(&self, patch: &u64) -> u64 {
        self.wrapping_add(*patch)
    }
}

/// Report user operation `op` done (the shard's own evictions, `OpId::MAX`, are not).
fn complete<D>(out: &mut Vec<Output<D>>, op: OpId, block: BlockId, outcome: Outcome<D>) {
    if op != OpId::MAX {
        out.push(Output::Complete { op, block, outcome });
    }
}

fn msg_name<D>(m: &Msg<D>) -> &'static str {
    match m {
        Msg::ReadReq { .. } => "ReadReq",
        Msg::WriteReq { .. } => "WriteReq",
        Msg::EvictReq { .. } => "EvictReq",
        Msg::RevokeAck { .. } => "RevokeAck",
        Msg::ForwardFailed { .. } => "ForwardFailed",
        Msg::Forward { .. } => "Forward",
        Msg::Revoke { .. } => "Revoke",
        Msg::Grant { .. } => "Grant",
        Msg::EvictGrant { .. } => "EvictGrant",
        Msg::Fetch { .. } => "Fetch",
        Msg::Data { .. } => "Data",
        Msg::Handoff { .. } => "Handoff",
        Msg::Skip { .. } => "Skip",
        Msg::WriteBack { .. } => "WriteBack",
        Msg::WriteBackAck { .. } => "WriteBackAck",
    }
}
