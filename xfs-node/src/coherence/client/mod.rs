//! The client's machine: per block its state, pending user operation and local step
//! ([`ClientBlock`]), the channels from each manager, and [`ClientShard`].

use super::*;

mod block;
pub use block::*;

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
    /// Second replies at a sequence number already served or held: a delegated reply the
    /// manager had served again when its sender was removed, and the first one came after
    /// all (dropped).
    pub duplicate_replies: u64,
}

/// What [`ClientShard::take_for_move`] took from a block whose manager slot moved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TakenForMove<D> {
    /// The operation in progress, to run again under the new manager.
    pub again: Option<(OpId, UserOp<D>)>,
    /// The copy dropped, if any.
    pub data: Option<D>,
    /// Whether it was dirty (to write back to the new storage node).
    pub dirty: bool,
}

impl<D> Default for TakenForMove<D> {
    fn default() -> Self {
        TakenForMove {
            again: None,
            data: None,
            dirty: false,
        }
    }
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
                UserOp::Read
                    | UserOp::Prefetch
                    | UserOp::Write(_)
                    | UserOp::Update(_)
                    | UserOp::Acquire
            )
        {
            self.make_room(block, out)?;
        }
        let manager = self.placement.manager(block);
        let storage = self.placement.storage(block);
        let mut released = false;
        let b = self.blocks.entry(block).or_default();
        // A hit marks the block used again (only in a bounded cache: an unbounded one never
        // evicts, and its model-checked states stay as they were). A block a miss brings
        // in is not marked: one used once (a scan) goes before one used again.
        let bounded = self.capacity > 0;
        if !matches!(user, UserOp::Read | UserOp::Prefetch) {
            b.referenced = bounded && !missing;
        }
        match user {
            UserOp::Prefetch => {
                // Not a use: the eviction order and handoffs wait for a real read.
                b.prefetched |= bounded && missing;
                b.start_read(block, op, manager, out)
            }
            UserOp::Read => {
                // The first read of a prefetched block is the one that brought it in.
                b.referenced = bounded && !missing && !b.prefetched;
                b.prefetched = false;
                b.read_here |= bounded;
                b.start_read(block, op, manager, out)
            }
            UserOp::Write(_) | UserOp::Update(_) | UserOp::Acquire => {
                b.written_here |= bounded;
                b.start_write(block, op, user, manager, out)
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
            UserOp::Flush => b.start_flush(block, op, storage, out),
        }
        if released {
            self.drain(block, out)?;
        }
        self.tidy(block);
        Ok(())
    }

    /// A miss on `block` needs a slot: if the cache is full, evict an idle cached block
    /// (an eviction the shard chooses, with no user operation behind it): the lowest
    /// numbered one not used again since an eviction last passed it. Blocks passed on the
    /// way lose their use bit (a second chance, as a clock gives). The lowest number, not
    /// a moving hand: a sequential scan, which brings blocks in ascending, then evicts
    /// the blocks it already read rather than those it is about to (with a moving hand,
    /// a cold sequential read of a file twice the cache ran at half the speed).
    fn make_room(&mut self, block: BlockId, out: &mut Vec<Output<D>>) -> Result<(), ProtocolError> {
        self.make_room_for(block, false, out)
    }

    /// [`ClientShard::make_room`]; for a handed-off copy (`handoff`) the victim is not
    /// handed on in turn (as in Dahlin's N-chance, the taker just drops it): otherwise
    /// each handoff into a full cache could start a chain of them round the peers.
    fn make_room_for(
        &mut self,
        block: BlockId,
        handoff: bool,
        out: &mut Vec<Output<D>>,
    ) -> Result<(), ProtocolError> {
        if self.capacity == 0 || self.cached() < self.capacity {
            return Ok(());
        }
        let victim = self.eviction_victim(block);
        if let Some(victim) = victim {
            self.counters.capacity_evictions += 1;
            let storage = self.placement.storage(victim);
            if let Some(b) = self.blocks.get_mut(&victim) {
                b.read_here &= !handoff;
                b.written_here &= !handoff;
                b.op = Some(PendingOp::Evict {
                    op: OpId::MAX,
                    asked: false,
                });
                Self::continue_evict(victim, b, storage, out);
            }
        }
        Ok(())
    }

    /// The block [`ClientShard::make_room`] evicts (not `keep`), if any is idle.
    fn eviction_victim(&mut self, keep: BlockId) -> Option<BlockId> {
        let idle = |id: BlockId, b: &ClientBlock<D>| {
            id != keep && b.data.is_some() && b.op.is_none() && b.step.is_none() && !b.pinned
        };
        // The second pass finds every bit the first one passed cleared.
        for _ in 0..2 {
            for (id, b) in self.blocks.iter_mut() {
                if !idle(*id, b) {
                    continue;
                }
                if !b.referenced {
                    return Some(*id);
                }
                b.referenced = false;
            }
        }
        None
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
                // The next copy starts unread.
                b.read_here = false;
                b.written_here = false;
                b.prefetched = false;
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
                // An unbounded cache (the model's) always offers its copy, as before.
                let keep = self.capacity == 0
                    || b.read_here
                    || (self.config.hand_off_written && b.written_here);
                out.push(Output::Send {
                    to: manager,
                    msg: Msg::EvictReq { block, keep },
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

    /// Give up on `block`: its manager or storage node was removed from the cluster (or
    /// restarted) while an operation or step waited for it, so no answer will come. The
    /// block's state goes (a dirty copy with it: its write-back cannot be made); returns
    /// the waiting operation, for the driver to fail with EIO, and whether a copy was
    /// dropped (the kernel must drop its pages too).
    pub fn abandon(&mut self, block: BlockId) -> (Option<OpId>, bool) {
        let Some(b) = self.blocks.remove(&block) else {
            return (None, false);
        };
        let had = b.data.is_some();
        if had {
            self.cached -= 1;
        }
        let op = b.op.map(|op| match op {
            PendingOp::Read(op)
            | PendingOp::Write(op, _)
            | PendingOp::Update(op, _)
            | PendingOp::Acquire(op)
            | PendingOp::Evict { op, .. }
            | PendingOp::Flush(op) => op,
        });
        (op, had)
    }

    /// The block's manager slot moved to another node (a committed map change): the new
    /// manager knows nothing of this copy, so it goes, with the block's channel. Returns
    /// the operation in progress, as a user operation to run again under the new manager;
    /// a dirty copy's content, for the caller to write back to the new storage node (an
    /// un-fsynced write survives its manager's failure); and whether a copy was dropped
    /// (the kernel must drop its pages too).
    pub fn take_for_move(&mut self, block: BlockId) -> TakenForMove<D> {
        self.channels.retain(|(_, b), _| *b != block);
        let Some(b) = self.blocks.remove(&block) else {
            return TakenForMove::default();
        };
        let had = b.data.is_some();
        if had {
            self.cached -= 1;
        }
        let dirty = b.mode == (Mode::Private { dirty: true });
        let again = b.op.map(|op| match op {
            PendingOp::Read(op) => (op, UserOp::Read),
            PendingOp::Write(op, d) => (op, UserOp::Write(d)),
            PendingOp::Update(op, d) => (op, UserOp::Update(d)),
            PendingOp::Acquire(op) => (op, UserOp::Acquire),
            PendingOp::Evict { op, .. } => (op, UserOp::Evict),
            PendingOp::Flush(op) => (op, UserOp::Flush),
        });
        TakenForMove {
            again,
            data: b.data,
            dirty,
        }
    }

    /// [`ClientShard::abandon`] every block managed by `peer` that waits for it (an
    /// operation or a step in progress); returns (block, operation, copy dropped).
    pub fn abandon_managed_by(&mut self, peer: NodeId) -> Vec<(BlockId, Option<OpId>, bool)> {
        let placement = &self.placement;
        let waiting: Vec<BlockId> = self
            .blocks
            .iter()
            .filter(|(block, b)| {
                placement.manager(**block) == peer && (b.op.is_some() || b.step.is_some())
            })
            .map(|(block, _)| *block)
            .collect();
        waiting
            .into_iter()
            .map(|block| {
                let (op, had) = self.abandon(block);
                (block, op, had)
            })
            .collect()
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
                        if matches!(m, Msg::Data { .. } | Msg::Handoff { .. } | Msg::Skip { .. })
                            && (!early || ch.held.contains_key(&seq))
                        {
                            self.counters.duplicate_replies += 1;
                            return Ok(());
                        }
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
        let handoff = matches!(m, Msg::Handoff { .. });
        let busy = b.op.is_some();
        let unexpected = ProtocolError::Unexpected {
            block,
            msg: msg_name(&m),
            state: b.state_name(),
        };
        let counters = &mut self.counters;
        let expected = match m {
            Msg::Forward {
                reader, reader_seq, ..
            } => {
                b.forwarded(block, manager, storage, (reader, reader_seq), counters, out);
                true
            }
            Msg::Revoke { .. } => {
                b.revoked(block, manager, storage, counters, out);
                true
            }
            Msg::Grant { .. } => b.granted(block, out),
            Msg::EvictGrant { handoff, .. } => b.evict_granted(block, handoff, counters, out),
            // The handoff reserved at this number will not come: nothing to do.
            Msg::Skip { .. } => true,
            Msg::Data {
                data, exclusive, ..
            } => b.data_arrived(block, data, exclusive, out),
            Msg::Handoff { data, .. } => {
                b.handed_off(data, counters);
                true
            }
            _ => false,
        };
        // The cached-block count follows the copy (no second lookup).
        match (had, b.data.is_some()) {
            (false, true) => self.cached += 1,
            (true, false) => self.cached -= 1,
            _ => {}
        }
        if !expected {
            return Err(unexpected);
        }
        // A copy handed here takes a slot like a miss does: a full cache evicts another
        // (else every peer's cache would grow without bound under N-chance handoffs). A
        // read waiting for its own reply made room when it started.
        if handoff && !had && !busy && self.cached > self.capacity {
            self.make_room_for(block, true, out)?;
        }
        Ok(())
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
