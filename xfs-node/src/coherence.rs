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
//! * [`StorageShard`]: serves fetches (delegated replies) and write-backs from a [`BlockStore`].
//!
//! Nothing here does IO or reads a clock: a driver feeds inputs ([`ClientShard::start`],
//! [`ClientShard::receive`], [`ClientShard::kernel_invalidated`], [`ManagerShard::receive`],
//! [`StorageShard::receive`]) and executes the [`Output`]s. The `stateright` model
//! (`tests/model/`) and the shard loops ([`crate::shard`]) drive this same code.
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
//!   forwards until `EvictGrant`. If the block was the last cached copy, the manager may name
//!   a peer to take it (`Handoff`, N-chance forwarding, at most N times without a use).
//! * **Flush**: a dirty block is written back and stays private-clean.
//! * **Ordering**: the manager numbers its messages to each client (`seq`), and a delegated
//!   reply carries the number the manager reserved for it on the reader's channel. A client
//!   handles its manager's messages in that order, whichever path they took. Without the
//!   numbers ([`ProtocolConfig::sequenced`] = false, a variant kept for the model checker) a
//!   client handles them as they arrive and queues what it is not ready for: the xFS
//!   deadlock of Figure 2 (seed `000_…`, §3.3.2).
//!
//! Bounds: a client shard defers at most `clients + 2` messages per block (one per
//! outstanding forward, a revoke, a grant); a channel holds at most [`MAX_HELD`]
//! out-of-order messages; a manager queues at most one request per client per block.

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
    ReadReq { block: BlockId },
    /// Client → manager: acquire the write token; `has_data` when the client holds a copy,
    /// `whole` when it replaces the whole block (then it needs no data with the grant).
    WriteReq {
        block: BlockId,
        has_data: bool,
        whole: bool,
    },
    /// Client → manager: the client drops its (clean, kernel-invalidated) copy.
    EvictReq { block: BlockId },
    /// Client → manager: the copy named by a `Revoke` is gone (written back if it was dirty).
    RevokeAck { block: BlockId },
    /// Client → manager: a `Forward` found no copy here; serve `reader` from storage.
    ForwardFailed {
        block: BlockId,
        reader: NodeId,
        reader_seq: u32,
    },
    /// Manager → client: send your copy to `reader` (a delegated reply, `reader_seq` on the
    /// reader's channel); an owner becomes a reader.
    Forward {
        block: BlockId,
        seq: u32,
        reader: NodeId,
        reader_seq: u32,
    },
    /// Manager → client: drop your copy (write back first if dirty) and acknowledge.
    Revoke { block: BlockId, seq: u32 },
    /// Manager → client: your write may proceed on the copy you hold.
    Grant { block: BlockId, seq: u32 },
    /// Manager → client: eviction accepted; hand the copy to `handoff` (peer, its seq).
    EvictGrant {
        block: BlockId,
        seq: u32,
        handoff: Option<(NodeId, u32)>,
    },
    /// Manager → storage: send the block to `to` (a delegated reply, `seq` on its channel).
    Fetch {
        block: BlockId,
        to: NodeId,
        seq: u32,
        exclusive: bool,
    },
    /// Peer or storage → client: the block's data, the reply to a read (or, `exclusive`, a
    /// write) request; `from_cache` when a peer's cache sent it (cooperative caching).
    Data {
        block: BlockId,
        seq: u32,
        data: D,
        exclusive: bool,
        from_cache: bool,
    },
    /// Evicting client → peer: the last cached copy, N-chance forwarding.
    Handoff { block: BlockId, seq: u32, data: D },
    /// Client → storage: write the block.
    WriteBack { block: BlockId, data: D },
    /// Storage → client: the write-back is durable.
    WriteBackAck { block: BlockId },
}

impl<D> Msg<D> {
    /// The block the message is about.
    pub fn block(&self) -> BlockId {
        match self {
            Msg::ReadReq { block }
            | Msg::WriteReq { block, .. }
            | Msg::EvictReq { block }
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
            | Msg::Handoff { seq, .. } => Some(*seq),
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
            Msg::EvictReq { block } => Msg::EvictReq { block },
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
    Send { to: NodeId, msg: Msg<D> },
    /// Drop the kernel's cached pages of `block`, then call
    /// [`ClientShard::kernel_invalidated`] (from wherever the invalidation ran).
    InvalidateKernel { block: BlockId },
    /// A user operation finished (evictions the shard starts for room are not reported).
    Complete {
        op: OpId,
        block: BlockId,
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
        block: BlockId,
        msg: &'static str,
        state: &'static str,
    },
    /// A sequence number that was already used, or too far ahead.
    #[error("sequence number {seq} from node {from} out of window (expected {expected})")]
    BadSequence {
        from: NodeId,
        seq: u32,
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
}

impl Default for ProtocolConfig {
    fn default() -> Self {
        ProtocolConfig {
            sequenced: true,
            n_chance: 2,
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

/// Where a block's manager and storage server live. Same on every node.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Placement {
    /// Manager nodes; a block's manager is chosen by a hash of its id.
    pub managers: Vec<NodeId>,
    /// Storage nodes; likewise.
    pub storages: Vec<NodeId>,
    /// When set, the file system's manager map: a block's manager is
    /// `managers[(block >> shift) % managers.len()]` (the bits of its index number), and its
    /// storage role runs on the same node (the node whose log holds the block). `None`:
    /// both by a hash of the block id (the model and the block-level simulation).
    pub index_shift: Option<u32>,
}

/// A 64-bit mix (splitmix64's finaliser): spreads block ids over managers and shards.
pub fn mix(block: BlockId) -> u64 {
    am_core::engine::splitmix(block)
}

impl Placement {
    /// The block's manager.
    pub fn manager(&self, block: BlockId) -> NodeId {
        match self.index_shift {
            Some(shift) => self.managers[((block >> shift) % self.managers.len() as u64) as usize],
            None => self.managers[(mix(block) % self.managers.len() as u64) as usize],
        }
    }
    /// The block's storage server.
    pub fn storage(&self, block: BlockId) -> NodeId {
        match self.index_shift {
            Some(_) => self.manager(block),
            None => self.storages[((mix(block) >> 20) % self.storages.len() as u64) as usize],
        }
    }
}

/// A client's mode for a block it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    /// Read-Shared.
    Shared,
    /// Private: Private-Clean or (dirty) Private-Dirty.
    Private { dirty: bool },
}

/// The four stable states of the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BlockState {
    /// No copy.
    Invalid,
    /// Read-Shared.
    ReadShared,
    /// Private-Clean.
    PrivateClean,
    /// Private-Dirty.
    PrivateDirty,
}

/// A user operation waiting for the protocol.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PendingOp<D> {
    /// Waiting for `Data`.
    Read(OpId),
    /// Waiting for `Grant` or exclusive `Data`; then the block becomes `value`.
    Write(OpId, D),
    /// Waiting for `Grant` or exclusive `Data`; then the patch is applied to the content.
    Update(OpId, D),
    /// Waiting for `Grant` or exclusive `Data`; then the block is pinned.
    Acquire(OpId),
    /// Writing back / invalidating the kernel; `asked` once `EvictReq` is sent.
    Evict { op: OpId, asked: bool },
    /// Waiting for the write-back.
    Flush(OpId),
}

/// What to do once a write-back is durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AfterWriteBack {
    /// Send the block to this reader (reader, its seq) and keep a shared copy.
    Forward(NodeId, u32),
    /// Continue a revoke (invalidate the kernel, acknowledge).
    Revoke,
    /// Continue an eviction.
    Evict,
    /// Complete a flush.
    Flush,
}

/// A local step that blocks the block's manager messages until it finishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Step {
    /// Waiting for `WriteBackAck`.
    WriteBack(AfterWriteBack),
    /// Waiting for the kernel's invalidation; `revoke` acknowledges one, else it is an
    /// eviction's.
    KernelInvalidate { revoke: bool },
}

/// A client's state for one block.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientBlock<D> {
    /// The cached copy.
    pub data: Option<D>,
    /// Shared or private (meaningful while `data` is some).
    pub mode: Mode,
    /// The user operation in progress.
    pub op: Option<PendingOp<D>>,
    /// The local step in progress.
    pub step: Option<Step>,
    /// Manager messages that wait for `step` (or, unsequenced, for data) to finish.
    pub deferred: VecDeque<Msg<D>>,
    /// Held private by a multi-block transaction ([`UserOp::Acquire`]): revokes and
    /// forwards wait in `deferred` until [`UserOp::Release`].
    pub pinned: bool,
}

impl<D> Default for ClientBlock<D> {
    fn default() -> Self {
        ClientBlock {
            data: None,
            mode: Mode::Shared,
            op: None,
            step: None,
            deferred: VecDeque::new(),
            pinned: false,
        }
    }
}

impl<D> ClientBlock<D> {
    /// The stable state this block is in.
    pub fn state(&self) -> BlockState {
        match (&self.data, self.mode) {
            (None, _) => BlockState::Invalid,
            (Some(_), Mode::Shared) => BlockState::ReadShared,
            (Some(_), Mode::Private { dirty: false }) => BlockState::PrivateClean,
            (Some(_), Mode::Private { dirty: true }) => BlockState::PrivateDirty,
        }
    }

    /// Finish a write: the block holds `value`, private-dirty, and operation `op` is done.
    fn written(&mut self, block: BlockId, op: OpId, value: D, out: &mut Vec<Output<D>>) {
        self.data = Some(value);
        self.mode = Mode::Private { dirty: true };
        self.op = None;
        complete(out, op, block, Outcome::Written);
    }

    /// Finish an update: apply `patch` to the (current, private) content; operation `op`
    /// is done and reports the content before the patch.
    fn updated(&mut self, block: BlockId, op: OpId, patch: D, out: &mut Vec<Output<D>>)
    where
        D: Patch,
    {
        let old = self.data.take().unwrap_or_default();
        self.data = Some(old.patched(&patch));
        self.mode = Mode::Private { dirty: true };
        self.op = None;
        complete(out, op, block, Outcome::Updated(old));
    }

    /// Finish an acquire: the block is private (dirty if it was) and pinned.
    fn acquired(&mut self, block: BlockId, op: OpId, out: &mut Vec<Output<D>>)
    where
        D: Clone,
    {
        if let Mode::Shared = self.mode {
            self.mode = Mode::Private { dirty: false };
        }
        self.pinned = true;
        self.op = None;
        let d = self.data.clone();
        if let Some(d) = d {
            complete(out, op, block, Outcome::Acquired(d));
        }
    }

    /// Write the (dirty) copy back to `storage`, then do `then`.
    fn write_back(
        &mut self,
        block: BlockId,
        storage: NodeId,
        then: AfterWriteBack,
        out: &mut Vec<Output<D>>,
    ) where
        D: Clone,
    {
        if let Some(d) = &self.data {
            out.push(Output::Send {
                to: storage,
                msg: Msg::WriteBack {
                    block,
                    data: d.clone(),
                },
            });
        }
        self.step = Some(Step::WriteBack(then));
    }

    /// Send the (clean) copy to `reader` as the reply the manager delegated (`reader_seq`),
    /// keeping a shared copy.
    fn send_copy(
        &mut self,
        block: BlockId,
        reader: NodeId,
        reader_seq: u32,
        out: &mut Vec<Output<D>>,
    ) where
        D: Clone,
    {
        if let Some(d) = &self.data {
            out.push(Output::Send {
                to: reader,
                msg: Msg::Data {
                    block,
                    seq: reader_seq,
                    data: d.clone(),
                    exclusive: false,
                    from_cache: true,
                },
            });
        }
        self.mode = Mode::Shared;
    }

    /// Nothing in progress and nothing cached: the entry can go.
    fn is_empty(&self) -> bool {
        self.data.is_none()
            && self.op.is_none()
            && self.step.is_none()
            && self.deferred.is_empty()
            && !self.pinned
    }

    fn state_name(&self) -> &'static str {
        match (&self.op, &self.step) {
            (_, Some(Step::WriteBack(_))) => "writing-back",
            (_, Some(Step::KernelInvalidate { .. })) => "invalidating-kernel",
            (Some(PendingOp::Read(_)), None) => "reading",
            (Some(PendingOp::Write(..)), None) => "writing",
            (Some(PendingOp::Update(..)), None) => "updating",
            (Some(PendingOp::Acquire(_)), None) => "acquiring",
            (Some(PendingOp::Evict { .. }), None) => "evicting",
            (Some(PendingOp::Flush(_)), None) => "flushing",
            (None, None) => match self.state() {
                BlockState::Invalid => "invalid",
                BlockState::ReadShared => "read-shared",
                BlockState::PrivateClean => "private-clean",
                BlockState::PrivateDirty => "private-dirty",
            },
        }
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
        Msg::WriteBack { .. } => "WriteBack",
        Msg::WriteBackAck { .. } => "WriteBackAck",
    }
}

/// One manager → client channel: the next expected sequence number and what came early.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Channel<D> {
    /// The next sequence number to handle.
    pub next: u32,
    /// Messages that overtook an earlier one.
    pub held: BTreeMap<u32, Msg<D>>,
}

impl<D> Default for Channel<D> {
    fn default() -> Self {
        Channel {
            next: 0,
            held: BTreeMap::new(),
        }
    }
}

/// Counters a client shard keeps (for tests, the simulation and `status`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientCounters {
    /// Reads answered by a peer's cache (the data came from another client).
    pub peer_reads: u64,
    /// Reads answered by storage.
    pub storage_reads: u64,
    /// Revokes handled.
    pub revokes: u64,
    /// Forwards served to peers.
    pub forwards_served: u64,
    /// Forwards that found no copy here.
    pub forwards_failed: u64,
    /// Write-backs done before forwarding a dirty block.
    pub writebacks_before_forward: u64,
    /// Last copies handed to a peer on eviction.
    pub handoffs_sent: u64,
    /// Handed-off copies taken in.
    pub handoffs_taken: u64,
    /// Handed-off copies dropped because the block was busy here.
    pub handoffs_dropped: u64,
    /// Manager messages that arrived before an earlier one (held for order).
    pub reordered: u64,
    /// Of those, revokes: a revoke that overtook an earlier forward or delegated reply.
    pub revokes_held: u64,
    /// Evictions started because the cache was full.
    pub capacity_evictions: u64,
}

/// The client side of one shard: every block of the shard this client touches.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientShard<D> {
    /// This client's node.
    pub me: NodeId,
    /// Protocol variant.
    pub config: ProtocolConfig,
    /// Managers and storage servers.
    pub placement: Placement,
    /// Most blocks cached before a miss evicts one (0: unbounded).
    pub capacity: usize,
    /// Per block state; absent means invalid and idle.
    pub blocks: BTreeMap<BlockId, ClientBlock<D>>,
    /// Per (manager, block): the ordered channel (sequence numbers are per client and
    /// block, so a reply delayed for one block never holds back another block's messages).
    pub channels: BTreeMap<(NodeId, BlockId), Channel<D>>,
    /// Blocks holding data (kept as they change: a miss checks it against `capacity`).
    cached: usize,
    /// Counters.
    pub counters: ClientCounters,
}

impl<D: Clone + Debug + Patch> ClientShard<D> {
    /// An empty cache for client `me`.
    pub fn new(me: NodeId, config: ProtocolConfig, placement: Placement, capacity: usize) -> Self {
        ClientShard {
            me,
            config,
            placement,
            capacity,
            blocks: BTreeMap::new(),
            channels: BTreeMap::new(),
            cached: 0,
            counters: ClientCounters::default(),
        }
    }

    /// The block's stable state.
    pub fn state(&self, block: BlockId) -> BlockState {
        self.blocks
            .get(&block)
            .map_or(BlockState::Invalid, |b| b.state())
    }

    /// Whether a user operation may start on `block` now.
    pub fn is_idle(&self, block: BlockId) -> bool {
        self.blocks
            .get(&block)
            .is_none_or(|b| b.op.is_none() && b.step.is_none())
    }

    /// A read of a block whose copy is being dropped from the kernel: served from the copy
    /// at once (returns whether it was). The copy is still valid — the revoke or eviction
    /// is not acknowledged until the kernel let go, so no other write can have completed —
    /// and waiting would deadlock the FUSE front: the kernel's invalidation waits for the
    /// page lock that the kernel's own read of that page holds while it waits for this read.
    /// The kernel may cache what such a read returns after it dropped the pages: the shard
    /// loop has the kernel drop the block once more before the revoke goes on
    /// (`Shard::kernel_done`).
    pub fn read_while_invalidating(
        &mut self,
        op: OpId,
        block: BlockId,
        out: &mut Vec<Output<D>>,
    ) -> bool {
        match self.blocks.get(&block) {
            Some(ClientBlock {
                data: Some(d),
                op: None,
                step: Some(Step::KernelInvalidate { .. }),
                ..
            }) => {
                complete(out, op, block, Outcome::Read(d.clone()));
                true
            }
            _ => false,
        }
    }

    /// Blocks holding data.
    pub fn cached(&self) -> usize {
        debug_assert_eq!(
            self.cached,
            self.blocks.values().filter(|b| b.data.is_some()).count()
        );
        self.cached
    }

    /// Start a user operation. Errors with [`ProtocolError::Busy`] if the block has one (the
    /// driver queues user operations per block).
    pub fn start(
        &mut self,
        op: OpId,
        block: BlockId,
        user: UserOp<D>,
        out: &mut Vec<Output<D>>,
    ) -> Result<(), ProtocolError> {
        if !self.is_idle(block) {
            return Err(ProtocolError::Busy(block));
        }
        let missing = self.blocks.get(&block).is_none_or(|b| b.data.is_none());
        if missing
            && matches!(
                user,
                UserOp::Read | UserOp::Write(_) | UserOp::Update(_) | UserOp::Acquire
            )
        {
            self.make_room(block, out)?;
        }
        let manager = self.placement.manager(block);
        let storage = self.placement.storage(block);
        let mut released = false;
        let b = self.blocks.entry(block).or_default();
        match user {
            UserOp::Read => match &b.data {
                Some(d) => complete(out, op, block, Outcome::Read(d.clone())),
                None => {
                    b.op = Some(PendingOp::Read(op));
                    out.push(Output::Send {
                        to: manager,
                        msg: Msg::ReadReq { block },
                    });
                }
            },
            // Held private: at once; otherwise ask the manager (a whole-block write needs
            // no old data).
            UserOp::Write(_) | UserOp::Update(_) | UserOp::Acquire
                if b.data.is_some() && matches!(b.mode, Mode::Private { .. }) =>
            {
                match user {
                    UserOp::Write(value) => b.written(block, op, value, out),
                    UserOp::Update(patch) => b.updated(block, op, patch, out),
                    _ => b.acquired(block, op, out),
                }
            }
            UserOp::Write(_) | UserOp::Update(_) | UserOp::Acquire => {
                let whole = matches!(user, UserOp::Write(_));
                b.op = Some(match user {
                    UserOp::Write(value) => PendingOp::Write(op, value),
                    UserOp::Update(patch) => PendingOp::Update(op, patch),
                    _ => PendingOp::Acquire(op),
                });
                out.push(Output::Send {
                    to: manager,
                    msg: Msg::WriteReq {
                        block,
                        has_data: b.data.is_some(),
                        whole,
                    },
                });
            }
            UserOp::Release => {
                b.pinned = false;
                complete(out, op, block, Outcome::Released);
                released = true;
            }
            UserOp::Evict if b.pinned => {
                // A pinned block stays until its transaction releases it.
                return Err(ProtocolError::Busy(block));
            }
            UserOp::Evict => {
                if b.data.is_none() {
                    complete(out, op, block, Outcome::Evicted);
                } else {
                    b.op = Some(PendingOp::Evict { op, asked: false });
                    Self::continue_evict(block, b, storage, out);
                }
            }
            UserOp::Flush => match (&b.data, b.mode) {
                (Some(_), Mode::Private { dirty: true }) => {
                    b.op = Some(PendingOp::Flush(op));
                    b.write_back(block, storage, AfterWriteBack::Flush, out);
                }
                _ => complete(out, op, block, Outcome::Flushed),
            },
        }
        if released {
            self.drain(block, out)?;
        }
        self.tidy(block);
        Ok(())
    }

    /// A miss on `block` needs a slot: if the cache is full, evict the lowest idle cached
    /// block (an eviction the shard chooses, with no user operation behind it).
    fn make_room(&mut self, block: BlockId, out: &mut Vec<Output<D>>) -> Result<(), ProtocolError> {
        if self.capacity == 0 || self.cached() < self.capacity {
            return Ok(());
        }
        let victim = self
            .blocks
            .iter()
            .find(|(id, b)| {
                **id != block && b.data.is_some() && b.op.is_none() && b.step.is_none() && !b.pinned
            })
            .map(|(id, _)| *id);
        if let Some(victim) = victim {
            self.counters.capacity_evictions += 1;
            let storage = self.placement.storage(victim);
            if let Some(b) = self.blocks.get_mut(&victim) {
                b.op = Some(PendingOp::Evict {
                    op: OpId::MAX,
                    asked: false,
                });
                Self::continue_evict(victim, b, storage, out);
            }
        }
        Ok(())
    }

    /// Advance an eviction: write back if dirty, then invalidate the kernel, then ask.
    fn continue_evict(
        block: BlockId,
        b: &mut ClientBlock<D>,
        storage: NodeId,
        out: &mut Vec<Output<D>>,
    ) {
        let Some(PendingOp::Evict { asked, .. }) = &mut b.op else {
            return;
        };
        if *asked || b.step.is_some() {
            return;
        }
        match (&b.data, b.mode) {
            (Some(_), Mode::Private { dirty: true }) => {
                b.write_back(block, storage, AfterWriteBack::Evict, out);
            }
            _ => {
                b.step = Some(Step::KernelInvalidate { revoke: false });
                out.push(Output::InvalidateKernel { block });
            }
        }
    }

    /// The kernel has dropped its cached pages of `block`.
    pub fn kernel_invalidated(
        &mut self,
        block: BlockId,
        out: &mut Vec<Output<D>>,
    ) -> Result<(), ProtocolError> {
        let manager = self.placement.manager(block);
        let b = self.blocks.entry(block).or_default();
        match b.step {
            Some(Step::KernelInvalidate { revoke: true }) => {
                b.step = None;
                if b.data.take().is_some() {
                    self.cached -= 1;
                }
                b.mode = Mode::Shared;
                out.push(Output::Send {
                    to: manager,
                    msg: Msg::RevokeAck { block },
                });
            }
            Some(Step::KernelInvalidate { revoke: false }) => {
                b.step = None;
                if let Some(PendingOp::Evict { asked, .. }) = &mut b.op {
                    *asked = true;
                }
                out.push(Output::Send {
                    to: manager,
                    msg: Msg::EvictReq { block },
                });
            }
            _ => {
                let state = b.state_name();
                return Err(ProtocolError::Unexpected {
                    block,
                    msg: "KernelInvalidated",
                    state,
                });
            }
        }
        self.drain(block, out)?;
        self.tidy(block);
        Ok(())
    }

    /// Node `peer` restarted with empty state (a crash, then recovery from its log):
    /// forget its channel and drop the copies of the blocks it manages, whose cacher
    /// lists died with it. Call it at a quiescent point (no operation of this shard on
    /// those blocks in flight); returns how many dirty copies were dropped (0 when every
    /// write was flushed first, which the cluster's restart procedure does).
    pub fn peer_restarted(&mut self, peer: NodeId) -> usize {
        self.channels.retain(|(m, _), _| *m != peer);
        let mut dirty = 0;
        let placement = &self.placement;
        let mut dropped = 0;
        self.blocks.retain(|block, b| {
            if placement.manager(*block) != peer || b.op.is_some() || b.step.is_some() {
                return true;
            }
            if b.data.is_some() {
                dropped += 1;
                if b.mode == (Mode::Private { dirty: true }) {
                    dirty += 1;
                }
            }
            false
        });
        self.cached -= dropped;
        dirty
    }

    /// A message for this client's role, from node `from`.
    pub fn receive(
        &mut self,
        from: NodeId,
        msg: Msg<D>,
        out: &mut Vec<Output<D>>,
    ) -> Result<(), ProtocolError> {
        let block = msg.block();
        if let Msg::Data {
            exclusive: false,
            from_cache,
            ..
        } = msg
        {
            if from_cache {
                self.counters.peer_reads += 1;
            } else {
                self.counters.storage_reads += 1;
            }
        }
        match msg {
            Msg::WriteBackAck { .. } => {
                self.write_back_done(block, out)?;
            }
            m if m.seq().is_some() => {
                if self.config.sequenced {
                    let manager = self.placement.manager(block);
                    let seq = m.seq().unwrap_or_default();
                    let ch = self.channels.entry((manager, block)).or_default();
                    if seq != ch.next {
                        // Ahead of `next` (modulo 2^32: the numbers wrap) is early and held;
                        // behind it is a duplicate.
                        let early = seq.wrapping_sub(ch.next) < 1 << 31;
                        if !early || ch.held.len() >= MAX_HELD || ch.held.contains_key(&seq) {
                            return Err(ProtocolError::BadSequence {
                                from,
                                seq,
                                expected: ch.next,
                            });
                        }
                        if matches!(m, Msg::Revoke { .. }) {
                            self.counters.revokes_held += 1;
                        }
                        ch.held.insert(seq, m);
                        self.counters.reordered += 1;
                        return Ok(());
                    }
                    ch.next = ch.next.wrapping_add(1);
                    self.in_order(m, out)?;
                    loop {
                        let ch = self.channels.entry((manager, block)).or_default();
                        let next = ch.next;
                        let Some(m) = ch.held.remove(&next) else {
                            break;
                        };
                        ch.next = ch.next.wrapping_add(1);
                        self.in_order(m, out)?;
                    }
                } else {
                    self.in_order(m, out)?;
                }
            }
            m => {
                return Err(ProtocolError::Unexpected {
                    block,
                    msg: msg_name(&m),
                    state: "client",
                })
            }
        }
        self.tidy(block);
        Ok(())
    }

    /// A manager message (or a reply delegated by the manager) in the manager's order: handle
    /// it, or defer it behind the block's step.
    fn in_order(&mut self, m: Msg<D>, out: &mut Vec<Output<D>>) -> Result<(), ProtocolError> {
        let block = m.block();
        let sequenced = self.config.sequenced;
        let b = self.blocks.entry(block).or_default();
        let blocked = b.step.is_some() || b.pinned || !b.deferred.is_empty();
        // The faulty, unsequenced protocol: a client waiting for data is "not ready" for
        // the manager's other messages and queues them (xFS, §3.3.2).
        let not_ready = !sequenced
            && b.data.is_none()
            && matches!(b.op, Some(PendingOp::Read(_)))
            && matches!(m, Msg::Forward { .. } | Msg::Revoke { .. });
        let data_bypass = !sequenced && matches!(m, Msg::Data { .. } | Msg::Handoff { .. });
        if (blocked && !data_bypass) || not_ready {
            b.deferred.push_back(m);
            return Ok(());
        }
        self.dispatch(m, out)?;
        self.drain(block, out)
    }

    /// Handle deferred messages while the block is not blocked.
    fn drain(&mut self, block: BlockId, out: &mut Vec<Output<D>>) -> Result<(), ProtocolError> {
        loop {
            let sequenced = self.config.sequenced;
            let Some(b) = self.blocks.get_mut(&block) else {
                return Ok(());
            };
            if b.step.is_some() || b.pinned {
                return Ok(());
            }
            let Some(front) = b.deferred.front() else {
                return Ok(());
            };
            let not_ready = !sequenced
                && b.data.is_none()
                && matches!(b.op, Some(PendingOp::Read(_)))
                && matches!(front, Msg::Forward { .. } | Msg::Revoke { .. });
            if not_ready {
                return Ok(());
            }
            let Some(m) = b.deferred.pop_front() else {
                return Ok(());
            };
            self.dispatch(m, out)?;
        }
    }

    /// Apply one manager message to a block that is not blocked.
    fn dispatch(&mut self, m: Msg<D>, out: &mut Vec<Output<D>>) -> Result<(), ProtocolError> {
        let block = m.block();
        let manager = self.placement.manager(block);
        let storage = self.placement.storage(block);
        let b = self.blocks.entry(block).or_default();
        let had = b.data.is_some();
        let unexpected = ProtocolError::Unexpected {
            block,
            msg: msg_name(&m),
            state: b.state_name(),
        };
        let result = 'rules: {
            match m {
                Msg::Forward {
                    reader, reader_seq, ..
                } => match (&b.data, b.mode) {
                    (None, _) => {
                        self.counters.forwards_failed += 1;
                        out.push(Output::Send {
                            to: manager,
                            msg: Msg::ForwardFailed {
                                block,
                                reader,
                                reader_seq,
                            },
                        });
                    }
                    (Some(_), Mode::Private { dirty: true }) => {
                        // The reliability rule: durable on storage before it leaves this client.
                        self.counters.writebacks_before_forward += 1;
                        b.write_back(
                            block,
                            storage,
                            AfterWriteBack::Forward(reader, reader_seq),
                            out,
                        );
                    }
                    (Some(_), _) => {
                        self.counters.forwards_served += 1;
                        b.send_copy(block, reader, reader_seq, out);
                    }
                },
                Msg::Revoke { .. } => {
                    self.counters.revokes += 1;
                    match (&b.data, b.mode) {
                        (None, _) => out.push(Output::Send {
                            to: manager,
                            msg: Msg::RevokeAck { block },
                        }),
                        (Some(_), Mode::Private { dirty: true }) => {
                            b.write_back(block, storage, AfterWriteBack::Revoke, out);
                        }
                        (Some(_), _) => {
                            b.step = Some(Step::KernelInvalidate { revoke: true });
                            out.push(Output::InvalidateKernel { block });
                        }
                    }
                }
                Msg::Grant { .. } => match (b.op.take(), b.data.is_some()) {
                    (Some(PendingOp::Write(op, value)), _) => b.written(block, op, value, out),
                    (Some(PendingOp::Update(op, patch)), true) => b.updated(block, op, patch, out),
                    (Some(PendingOp::Acquire(op)), true) => b.acquired(block, op, out),
                    (op, _) => {
                        b.op = op;
                        break 'rules Err(unexpected);
                    }
                },
                Msg::EvictGrant { handoff, .. } => match &b.op {
                    Some(PendingOp::Evict { op, asked: true }) => {
                        let op = *op;
                        if handoff.is_some() && b.data.is_none() {
                            // The manager reserved a sequence number on the peer's channel for a copy
                            // this client no longer holds: report it, it would stall that channel.
                            break 'rules Err(unexpected);
                        }
                        if let (Some((peer, seq)), Some(d)) = (handoff, b.data.take()) {
                            self.counters.handoffs_sent += 1;
                            out.push(Output::Send {
                                to: peer,
                                msg: Msg::Handoff {
                                    block,
                                    seq,
                                    data: d,
                                },
                            });
                        }
                        b.data = None;
                        b.mode = Mode::Shared;
                        b.op = None;
                        complete(out, op, block, Outcome::Evicted);
                    }
                    _ => break 'rules Err(unexpected),
                },
                // A copy handed off to this client may already be here: the reply replaces it.
                Msg::Data {
                    data, exclusive, ..
                } => match (b.op.take(), exclusive) {
                    (Some(PendingOp::Read(op)), false) => {
                        b.data = Some(data.clone());
                        b.mode = Mode::Shared;
                        complete(out, op, block, Outcome::Read(data));
                    }
                    (Some(PendingOp::Write(op, value)), true) => b.written(block, op, value, out),
                    (Some(PendingOp::Update(op, patch)), true) => {
                        b.data = Some(data);
                        b.updated(block, op, patch, out)
                    }
                    (Some(PendingOp::Acquire(op)), true) => {
                        b.data = Some(data);
                        b.mode = Mode::Private { dirty: false };
                        b.acquired(block, op, out)
                    }
                    (op, _) => {
                        b.op = op;
                        break 'rules Err(unexpected);
                    }
                },
                // The manager now counts this client as a cacher: take the copy whatever the
                // block is doing (a pending read or write still waits for its own reply).
                Msg::Handoff { data, .. } => {
                    if b.data.is_none() {
                        self.counters.handoffs_taken += 1;
                        b.data = Some(data);
                        b.mode = Mode::Shared;
                    } else {
                        self.counters.handoffs_dropped += 1;
                    }
                }
                _ => break 'rules Err(unexpected),
            }
            Ok(())
        };
        // The cached-block count follows the copy (no second lookup).
        match (had, b.data.is_some()) {
            (false, true) => self.cached += 1,
            (true, false) => self.cached -= 1,
            _ => {}
        }
        result
    }

    /// Storage acknowledged a write-back.
    fn write_back_done(
        &mut self,
        block: BlockId,
        out: &mut Vec<Output<D>>,
    ) -> Result<(), ProtocolError> {
        let storage = self.placement.storage(block);
        let b = self.blocks.entry(block).or_default();
        let Some(Step::WriteBack(after)) = b.step else {
            return Err(ProtocolError::Unexpected {
                block,
                msg: "WriteBackAck",
                state: b.state_name(),
            });
        };
        b.step = None;
        b.mode = Mode::Private { dirty: false };
        match after {
            AfterWriteBack::Forward(reader, reader_seq) => {
                self.counters.forwards_served += 1;
                b.send_copy(block, reader, reader_seq, out);
            }
            AfterWriteBack::Revoke => {
                b.step = Some(Step::KernelInvalidate { revoke: true });
                out.push(Output::InvalidateKernel { block });
            }
            AfterWriteBack::Evict => Self::continue_evict(block, b, storage, out),
            AfterWriteBack::Flush => {
                if let Some(PendingOp::Flush(op)) = b.op.take() {
                    complete(out, op, block, Outcome::Flushed);
                }
            }
        }
        self.drain(block, out)?;
        self.tidy(block);
        Ok(())
    }

    fn tidy(&mut self, block: BlockId) {
        if self.blocks.get(&block).is_some_and(|b| b.is_empty()) {
            self.blocks.remove(&block);
        }
    }

    /// The shard with every node id passed through `f` (symmetry reduction in the model).
    pub fn renamed(&self, f: &impl Fn(NodeId) -> NodeId) -> Self {
        let mut s = self.clone();
        s.me = f(s.me);
        for b in s.blocks.values_mut() {
            if let Some(Step::WriteBack(AfterWriteBack::Forward(r, _))) = &mut b.step {
                *r = f(*r);
            }
            for m in b.deferred.iter_mut() {
                *m = m.renamed(f);
            }
        }
        for ch in s.channels.values_mut() {
            for m in ch.held.values_mut() {
                *m = m.renamed(f);
            }
        }
        s
    }
}

/// A write waiting for revoke acknowledgements.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WriteInProgress {
    /// The writer.
    pub writer: NodeId,
    /// The writer said it holds a copy.
    pub has_data: bool,
    /// The writer replaces the whole block (a grant needs no data).
    pub whole: bool,
    /// Holders whose acknowledgement is still due.
    pub waiting: BTreeSet<NodeId>,
}

/// A request the manager cannot serve yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Request {
    /// Read miss.
    Read,
    /// Write token (`whole`: the writer replaces the whole block).
    Write { has_data: bool, whole: bool },
    /// Eviction.
    Evict,
}

/// The manager's state for one block.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ManagerBlock {
    /// Clients holding (or being sent) a copy.
    pub cachers: BTreeSet<NodeId>,
    /// The client holding the write token.
    pub owner: Option<NodeId>,
    /// The write in progress.
    pub writing: Option<WriteInProgress>,
    /// Requests waiting for the write in progress.
    pub queue: VecDeque<(NodeId, Request)>,
    /// N-chance: times the last copy was handed on without being used.
    pub recirculated: u8,
    /// The client that read the block last: the preferred source of the next read (the
    /// copy most likely still cached, and not the writer's node again and again).
    pub last_reader: Option<NodeId>,
}

impl ManagerBlock {
    fn is_empty(&self) -> bool {
        self.cachers.is_empty()
            && self.owner.is_none()
            && self.writing.is_none()
            && self.queue.is_empty()
            && self.recirculated == 0
    }
}

/// Counters a manager shard keeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ManagerCounters {
    /// Reads delegated to a caching client.
    pub forwards: u64,
    /// Reads and writes served by storage.
    pub fetches: u64,
    /// Revokes sent.
    pub revokes: u64,
    /// Requests queued behind a write.
    pub queued: u64,
    /// Handoffs (N-chance) ordered.
    pub handoffs: u64,
}

/// The manager side of one shard.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ManagerShard {
    /// This manager's node.
    pub me: NodeId,
    /// Protocol variant.
    pub config: ProtocolConfig,
    /// Managers and storage servers.
    pub placement: Placement,
    /// Every client (candidates for N-chance handoffs).
    pub clients: Vec<NodeId>,
    /// Per block state; absent means nobody caches it.
    pub blocks: BTreeMap<BlockId, ManagerBlock>,
    /// Per (client, block): the sequence number of the next message to it about the block.
    pub next_seq: BTreeMap<(NodeId, BlockId), u32>,
    /// Counters.
    pub counters: ManagerCounters,
}

impl ManagerShard {
    /// A manager with no state.
    pub fn new(
        me: NodeId,
        config: ProtocolConfig,
        placement: Placement,
        clients: Vec<NodeId>,
    ) -> Self {
        ManagerShard {
            me,
            config,
            placement,
            clients,
            blocks: BTreeMap::new(),
            next_seq: BTreeMap::new(),
            counters: ManagerCounters::default(),
        }
    }

    fn seq(&mut self, client: NodeId, block: BlockId) -> u32 {
        let s = self.next_seq.entry((client, block)).or_insert(0);
        let v = *s;
        *s = s.wrapping_add(1);
        v
    }

    /// A message for the manager role, from client `from`.
    pub fn receive<D: Clone>(
        &mut self,
        from: NodeId,
        msg: Msg<D>,
        out: &mut Vec<Output<D>>,
    ) -> Result<(), ProtocolError> {
        let block = msg.block();
        match msg {
            Msg::ReadReq { .. } => self.request(block, from, Request::Read, out),
            Msg::WriteReq {
                has_data, whole, ..
            } => self.request(block, from, Request::Write { has_data, whole }, out),
            Msg::EvictReq { .. } => self.request(block, from, Request::Evict, out),
            Msg::RevokeAck { .. } => {
                let b = self.blocks.entry(block).or_default();
                let Some(w) = &mut b.writing else {
                    return Err(ProtocolError::Unexpected {
                        block,
                        msg: "RevokeAck",
                        state: "manager-idle",
                    });
                };
                if !w.waiting.remove(&from) {
                    return Err(ProtocolError::Unexpected {
                        block,
                        msg: "RevokeAck",
                        state: "manager-not-waiting-for-sender",
                    });
                }
                b.cachers.remove(&from);
                if b.owner == Some(from) {
                    b.owner = None;
                }
                if w.waiting.is_empty() {
                    let w = b
                        .writing
                        .take()
                        .unwrap_or_else(|| unreachable!("checked above"));
                    self.grant(block, w.writer, w.has_data, w.whole, out);
                    self.run_queue(block, out);
                }
                Ok(())
            }
            Msg::ForwardFailed {
                reader, reader_seq, ..
            } => {
                self.counters.fetches += 1;
                out.push(Output::Send {
                    to: self.placement.storage(block),
                    msg: Msg::Fetch {
                        block,
                        to: reader,
                        seq: reader_seq,
                        exclusive: false,
                    },
                });
                Ok(())
            }
            other => Err(ProtocolError::Unexpected {
                block,
                msg: msg_name(&other),
                state: "manager",
            }),
        }
        .map(|()| self.tidy(block))
    }

    /// Client `peer` died: it caches nothing any more. Unlike [`Self::peer_restarted`]
    /// its channel is kept (its messages still in flight may arrive), and a write waiting
    /// for its acknowledgement keeps waiting for the one the driver answers in its stead.
    pub fn peer_died(&mut self, peer: NodeId) {
        for b in self.blocks.values_mut() {
            let waited = b
                .writing
                .as_ref()
                .is_some_and(|w| w.waiting.contains(&peer));
            if !waited {
                b.cachers.remove(&peer);
            }
            if b.owner == Some(peer) && b.writing.is_none() {
                b.owner = None;
            }
            if b.last_reader == Some(peer) {
                b.last_reader = None;
            }
        }
        self.blocks.retain(|_, b| !b.is_empty());
    }

    /// Client `peer` restarted with an empty cache: it holds no copy, its requests are
    /// gone, and its channel starts again at 0. Call it at a quiescent point (no write
    /// waiting for `peer`'s acknowledgement).
    pub fn peer_restarted(&mut self, peer: NodeId) {
        self.next_seq.retain(|(c, _), _| *c != peer);
        for b in self.blocks.values_mut() {
            b.cachers.remove(&peer);
            if b.owner == Some(peer) {
                b.owner = None;
            }
            if b.last_reader == Some(peer) {
                b.last_reader = None;
            }
            b.queue.retain(|(c, _)| *c != peer);
        }
        self.blocks.retain(|_, b| !b.is_empty());
    }

    fn request<D: Clone>(
        &mut self,
        block: BlockId,
        from: NodeId,
        req: Request,
        out: &mut Vec<Output<D>>,
    ) -> Result<(), ProtocolError> {
        let b = self.blocks.entry(block).or_default();
        if b.writing.is_some() || !b.queue.is_empty() {
            self.counters.queued += 1;
            b.queue.push_back((from, req));
            return Ok(());
        }
        self.serve(block, from, req, out);
        Ok(())
    }

    fn run_queue<D: Clone>(&mut self, block: BlockId, out: &mut Vec<Output<D>>) {
        loop {
            let Some(b) = self.blocks.get_mut(&block) else {
                return;
            };
            if b.writing.is_some() {
                return;
            }
            let Some((from, req)) = b.queue.pop_front() else {
                return;
            };
            self.serve(block, from, req, out);
        }
    }

    fn serve<D: Clone>(
        &mut self,
        block: BlockId,
        from: NodeId,
        req: Request,
        out: &mut Vec<Output<D>>,
    ) {
        let storage = self.placement.storage(block);
        match req {
            Request::Read => {
                let reader_seq = self.seq(from, block);
                let b = self.blocks.entry(block).or_default();
                b.recirculated = 0;
                let last = b
                    .last_reader
                    .filter(|r| *r != from && b.cachers.contains(r));
                let source = match b.owner {
                    Some(o) if o != from => Some(o),
                    _ => last.or_else(|| b.cachers.iter().copied().find(|c| *c != from)),
                };
                b.owner = None;
                b.last_reader = Some(from);
                b.cachers.insert(from);
                match source {
                    Some(holder) => {
                        self.counters.forwards += 1;
                        let seq = self.seq(holder, block);
                        out.push(Output::Send {
                            to: holder,
                            msg: Msg::Forward {
                                block,
                                seq,
                                reader: from,
                                reader_seq,
                            },
                        });
                    }
                    None => {
                        self.counters.fetches += 1;
                        out.push(Output::Send {
                            to: storage,
                            msg: Msg::Fetch {
                                block,
                                to: from,
                                seq: reader_seq,
                                exclusive: false,
                            },
                        });
                    }
                }
            }
            Request::Write { has_data, whole } => {
                let b = self.blocks.entry(block).or_default();
                b.recirculated = 0;
                let mut holders: BTreeSet<NodeId> =
                    b.cachers.iter().copied().filter(|c| *c != from).collect();
                if let Some(o) = b.owner.filter(|o| *o != from) {
                    holders.insert(o);
                }
                if holders.is_empty() {
                    self.grant(block, from, has_data, whole, out);
                } else {
                    b.writing = Some(WriteInProgress {
                        writer: from,
                        has_data,
                        whole,
                        waiting: holders.clone(),
                    });
                    for h in holders {
                        self.counters.revokes += 1;
                        let seq = self.seq(h, block);
                        out.push(Output::Send {
                            to: h,
                            msg: Msg::Revoke { block, seq },
                        });
                    }
                }
            }
            Request::Evict => {
                let n_chance = self.config.n_chance;
                let b = self.blocks.entry(block).or_default();
                let was_cacher = b.cachers.remove(&from);
                if b.owner == Some(from) {
                    b.owner = None;
                }
                let mut handoff = None;
                if was_cacher
                    && b.cachers.is_empty()
                    && b.owner.is_none()
                    && b.recirculated < n_chance
                {
                    // The next client after the evicting one, round the ring.
                    let n = self.clients.len();
                    let at = self.clients.iter().position(|c| *c == from).unwrap_or(0);
                    let peer = (1..n)
                        .map(|i| self.clients[(at + i) % n])
                        .find(|c| *c != from);
                    if let Some(peer) = peer {
                        b.recirculated += 1;
                        b.cachers.insert(peer);
                        handoff = Some(peer);
                    }
                }
                let handoff = handoff.map(|p| {
                    self.counters.handoffs += 1;
                    (p, self.seq(p, block))
                });
                let seq = self.seq(from, block);
                out.push(Output::Send {
                    to: from,
                    msg: Msg::EvictGrant {
                        block,
                        seq,
                        handoff,
                    },
                });
            }
        }
    }

    fn grant<D: Clone>(
        &mut self,
        block: BlockId,
        writer: NodeId,
        has_data: bool,
        whole: bool,
        out: &mut Vec<Output<D>>,
    ) {
        let storage = self.placement.storage(block);
        let seq = self.seq(writer, block);
        let b = self.blocks.entry(block).or_default();
        // A whole-block write needs no data; otherwise the writer must still hold the
        // current copy, or storage sends it.
        let with_data = whole || (has_data && b.cachers.contains(&writer));
        b.cachers.clear();
        b.cachers.insert(writer);
        b.owner = Some(writer);
        if with_data {
            out.push(Output::Send {
                to: writer,
                msg: Msg::Grant { block, seq },
            });
        } else {
            self.counters.fetches += 1;
            out.push(Output::Send {
                to: storage,
                msg: Msg::Fetch {
                    block,
                    to: writer,
                    seq,
                    exclusive: true,
                },
            });
        }
    }

    fn tidy(&mut self, block: BlockId) {
        if self.blocks.get(&block).is_some_and(|b| b.is_empty()) {
            self.blocks.remove(&block);
        }
    }

    /// The shard with every node id passed through `f` (symmetry reduction in the model).
    pub fn renamed(&self, f: &impl Fn(NodeId) -> NodeId) -> Self {
        let mut s = self.clone();
        s.clients = s.clients.iter().map(|c| f(*c)).collect();
        s.next_seq = s
            .next_seq
            .iter()
            .map(|((c, b), n)| ((f(*c), *b), *n))
            .collect();
        for b in s.blocks.values_mut() {
            b.cachers = b.cachers.iter().map(|c| f(*c)).collect();
            b.owner = b.owner.map(f);
            b.last_reader = b.last_reader.map(f);
            if let Some(w) = &mut b.writing {
                w.writer = f(w.writer);
                w.waiting = w.waiting.iter().map(|c| f(*c)).collect();
            }
            for (c, _) in b.queue.iter_mut() {
                *c = f(*c);
            }
        }
        s
    }
}

/// Block storage as the storage role sees it: the node's log plugs in here (`node::LogStore`);
/// the simulation and the model use [`MemStore`]. Errors are strings naming what failed:
/// the storage role counts them and sends no reply (the requester times out with EIO),
/// never a made-up content.
pub trait BlockStore<D> {
    /// The block's current content (the default value if it was never written).
    fn read(&mut self, block: BlockId) -> Result<D, String>;
    /// Replace the block's content (durable once [`BlockStore::sync`] returns).
    fn write(&mut self, block: BlockId, data: D) -> Result<(), String>;
    /// Make every write so far durable.
    fn sync(&mut self) -> Result<(), SyncError> {
        Ok(())
    }
}

/// Why a store could not make its writes durable: the errno a client's `fsync` returns
/// (ENOSPC for a full device, EIO otherwise) and what failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SyncError {
    /// The errno.
    pub errno: i32,
    /// What failed.
    pub message: String,
}

impl SyncError {
    /// An I/O error (EIO) with `message`.
    pub fn io(message: impl Into<String>) -> SyncError {
        SyncError {
            errno: libc::EIO,
            message: message.into(),
        }
    }
}

/// An in-memory [`BlockStore`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemStore<D> {
    /// Written blocks.
    pub blocks: BTreeMap<BlockId, D>,
}

impl<D: Clone + Default> BlockStore<D> for MemStore<D> {
    fn read(&mut self, block: BlockId) -> Result<D, String> {
        Ok(self.blocks.get(&block).cloned().unwrap_or_default())
    }
    fn write(&mut self, block: BlockId, data: D) -> Result<(), String> {
        self.blocks.insert(block, data);
        Ok(())
    }
}

/// The storage side of one shard.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorageShard<S> {
    /// The store.
    pub store: S,
}

impl<S> StorageShard<S> {
    /// A message for the storage role, from node `from`.
    pub fn receive<D: Clone>(
        &mut self,
        from: NodeId,
        msg: Msg<D>,
        out: &mut Vec<Output<D>>,
    ) -> Result<(), ProtocolError>
    where
        S: BlockStore<D>,
    {
        match msg {
            Msg::Fetch {
                block,
                to,
                seq,
                exclusive,
            } => {
                let data = self.store.read(block).map_err(ProtocolError::Storage)?;
                out.push(Output::Send {
                    to,
                    msg: Msg::Data {
                        block,
                        seq,
                        data,
                        exclusive,
                        from_cache: false,
                    },
                });
                Ok(())
            }
            Msg::WriteBack { block, data } => {
                self.store
                    .write(block, data)
                    .map_err(ProtocolError::Storage)?;
                out.push(Output::Send {
                    to: from,
                    msg: Msg::WriteBackAck { block },
                });
                Ok(())
            }
            other => Err(ProtocolError::Unexpected {
                block: other.block(),
                msg: msg_name(&other),
                state: "storage",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: NodeId = 10;
    const S: NodeId = 11;

    fn placement() -> Placement {
        Placement {
            managers: vec![M],
            storages: vec![S],
            index_shift: None,
        }
    }

    fn client(me: NodeId) -> ClientShard<u64> {
        ClientShard::new(me, ProtocolConfig::default(), placement(), 0)
    }

    fn sends(out: &mut Vec<Output<u64>>) -> Vec<(NodeId, Msg<u64>)> {
        out.drain(..)
            .filter_map(|o| match o {
                Output::Send { to, msg } => Some((to, msg)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_read_miss_is_served_by_storage_then_by_the_caching_peer() {
        let mut m = ManagerShard::new(M, ProtocolConfig::default(), placement(), vec![1, 2]);
        let mut out = Vec::new();
        m.receive::<u64>(1, Msg::ReadReq { block: 9 }, &mut out)
            .unwrap();
        assert_eq!(
            sends(&mut out),
            vec![(
                S,
                Msg::Fetch {
                    block: 9,
                    to: 1,
                    seq: 0,
                    exclusive: false
                }
            )]
        );
        m.receive::<u64>(2, Msg::ReadReq { block: 9 }, &mut out)
            .unwrap();
        assert_eq!(
            sends(&mut out),
            vec![(
                1,
                Msg::Forward {
                    block: 9,
                    seq: 1,
                    reader: 2,
                    reader_seq: 0
                }
            )]
        );
        assert_eq!(m.blocks[&9].cachers, [1, 2].into_iter().collect());
    }

    #[test]
    fn a_dirty_owner_writes_back_before_it_forwards() {
        let mut c = client(1);
        let mut out = Vec::new();
        c.start(1, 4, UserOp::Write(7), &mut out).unwrap();
        c.receive(
            S,
            Msg::Data {
                block: 4,
                seq: 0,
                data: 0,
                exclusive: true,
                from_cache: false,
            },
            &mut out,
        )
        .unwrap();
        assert_eq!(c.state(4), BlockState::PrivateDirty);
        out.clear();
        c.receive(
            M,
            Msg::Forward {
                block: 4,
                seq: 1,
                reader: 2,
                reader_seq: 5,
            },
            &mut out,
        )
        .unwrap();
        assert_eq!(
            sends(&mut out),
            vec![(S, Msg::WriteBack { block: 4, data: 7 })]
        );
        c.receive(S, Msg::WriteBackAck { block: 4 }, &mut out)
            .unwrap();
        assert_eq!(
            sends(&mut out),
            vec![(
                2,
                Msg::Data {
                    block: 4,
                    seq: 5,
                    data: 7,
                    exclusive: false,
                    from_cache: true,
                }
            )]
        );
        assert_eq!(c.state(4), BlockState::ReadShared);
    }

    #[test]
    fn a_revoke_that_overtakes_the_reply_waits_for_it() {
        let mut c = client(1);
        let mut out = Vec::new();
        c.start(1, 4, UserOp::Read, &mut out).unwrap();
        out.clear();
        // The manager's revoke (seq 1) arrives before the peer's data (seq 0).
        c.receive(M, Msg::Revoke { block: 4, seq: 1 }, &mut out)
            .unwrap();
        assert!(out.is_empty());
        assert_eq!(c.counters.revokes_held, 1);
        c.receive(
            2,
            Msg::Data {
                block: 4,
                seq: 0,
                data: 3,
                exclusive: false,
                from_cache: false,
            },
            &mut out,
        )
        .unwrap();
        // The read completes with the data, then the revoke invalidates the kernel.
        assert!(out.contains(&Output::Complete {
            op: 1,
            block: 4,
            outcome: Outcome::Read(3)
        }));
        assert!(out.contains(&Output::InvalidateKernel { block: 4 }));
        out.clear();
        c.kernel_invalidated(4, &mut out).unwrap();
        assert_eq!(sends(&mut out), vec![(M, Msg::RevokeAck { block: 4 })]);
        assert_eq!(c.state(4), BlockState::Invalid);
    }

    #[test]
    fn inputs_without_a_rule_are_errors_not_panics() {
        let mut c = client(1);
        let mut out = Vec::new();
        let e = c
            .receive(M, Msg::Grant { block: 4, seq: 0 }, &mut out)
            .unwrap_err();
        assert!(
            matches!(e, ProtocolError::Unexpected { msg: "Grant", .. }),
            "{e}"
        );
        assert!(c
            .receive(S, Msg::WriteBackAck { block: 4 }, &mut out)
            .is_err());
        assert!(c.kernel_invalidated(4, &mut out).is_err());
        // A replayed sequence number.
        let e = c
            .receive(M, Msg::Revoke { block: 4, seq: 0 }, &mut out)
            .unwrap_err();
        assert!(
            matches!(
                e,
                ProtocolError::BadSequence {
                    seq: 0,
                    expected: 1,
                    ..
                }
            ),
            "{e}"
        );
        // Messages for another role.
        assert!(c.receive(M, Msg::ReadReq { block: 4 }, &mut out).is_err());
        let mut m = ManagerShard::new(M, ProtocolConfig::default(), placement(), vec![1]);
        assert!(m
            .receive::<u64>(1, Msg::RevokeAck { block: 4 }, &mut out)
            .is_err());
        assert!(m
            .receive::<u64>(1, Msg::Revoke { block: 4, seq: 0 }, &mut out)
            .is_err());
        // An operation on a busy block.
        c.start(2, 6, UserOp::Read, &mut out).unwrap();
        assert_eq!(
            c.start(3, 6, UserOp::Read, &mut out),
            Err(ProtocolError::Busy(6))
        );
    }

    #[test]
    fn sequence_numbers_wrap() {
        let mut c = client(1);
        let mut out = Vec::new();
        c.channels.entry((M, 4)).or_default().next = u32::MAX;
        // Seq 0 comes after u32::MAX: early, held; u32::MAX then releases it.
        c.receive(M, Msg::Revoke { block: 4, seq: 0 }, &mut out)
            .unwrap();
        assert!(out.is_empty());
        c.receive(
            M,
            Msg::Revoke {
                block: 4,
                seq: u32::MAX,
            },
            &mut out,
        )
        .unwrap();
        assert_eq!(sends(&mut out).len(), 2, "both revokes acknowledged");
        assert_eq!(c.channels[&(M, 4)].next, 1);
        // And u32::MAX again is now a duplicate.
        assert!(c
            .receive(
                M,
                Msg::Revoke {
                    block: 4,
                    seq: u32::MAX
                },
                &mut out
            )
            .is_err());
    }

    #[test]
    fn a_forward_to_a_client_without_a_copy_falls_back_to_storage() {
        let mut c = client(1);
        let mut out = Vec::new();
        let fwd = Msg::Forward {
            block: 4,
            seq: 0,
            reader: 2,
            reader_seq: 7,
        };
        c.receive(M, fwd, &mut out).unwrap();
        let failed = Msg::ForwardFailed {
            block: 4,
            reader: 2,
            reader_seq: 7,
        };
        assert_eq!(sends(&mut out), vec![(M, failed.clone())]);
        let mut m = ManagerShard::new(M, ProtocolConfig::default(), placement(), vec![1, 2]);
        m.receive::<u64>(1, failed, &mut out).unwrap();
        assert_eq!(
            sends(&mut out),
            vec![(
                S,
                Msg::Fetch {
                    block: 4,
                    to: 2,
                    seq: 7,
                    exclusive: false
                }
            )]
        );
    }
}
