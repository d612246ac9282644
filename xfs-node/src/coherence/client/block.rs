//! One block as the client sees it: its state, the user operation in progress and the
//! local step ([`ClientBlock`]), and how each manager message moves it.

use super::super::*;

/// A client's mode for a block it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    /// Read-Shared.
    Shared,
    /// Private: Private-Clean or (dirty) Private-Dirty.
    Private {
        /// Whether the copy holds writes storage does not have yet.
        dirty: bool,
    },
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
    Evict {
        /// The user operation (or eviction) this is for.
        op: OpId,
        /// Whether `EvictReq` was sent.
        asked: bool,
    },
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
    KernelInvalidate {
        /// Whether a `Revoke` waits for it (else an eviction does).
        revoke: bool,
    },
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
    /// Used again (a hit) since an eviction last passed it (a bounded cache only): it
    /// gets a second chance ([`super::ClientShard`]'s `make_room`).
    pub referenced: bool,
    /// Read here (a hit or a miss) since it came (a bounded cache only): its eviction asks
    /// for a handoff (`EvictReq::keep`); a block handed here and not read since does not.
    pub read_here: bool,
    /// Written here since it came (a bounded cache only): its eviction asks for a handoff
    /// if [`crate::coherence::ProtocolConfig::hand_off_written`] says so.
    pub written_here: bool,
    /// Brought in by a prefetch and not read since (a bounded cache only): the first read
    /// is not a hit for the eviction order.
    pub prefetched: bool,
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
            referenced: false,
            read_here: false,
            written_here: false,
            prefetched: false,
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
    pub(super) fn written(&mut self, block: BlockId, op: OpId, value: D, out: &mut Vec<Output<D>>) {
        self.data = Some(value);
        self.mode = Mode::Private { dirty: true };
        self.op = None;
        complete(out, op, block, Outcome::Written);
    }

    /// Finish an update: apply `patch` to the (current, private) content; operation `op`
    /// is done and reports the content before the patch.
    pub(super) fn updated(&mut self, block: BlockId, op: OpId, patch: D, out: &mut Vec<Output<D>>)
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
    pub(super) fn acquired(&mut self, block: BlockId, op: OpId, out: &mut Vec<Output<D>>)
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
    pub(super) fn write_back(
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
    pub(super) fn send_copy(
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

    /// Start a read: served from the copy, or asked of `manager`.
    #[inline]
    pub(super) fn start_read(
        &mut self,
        block: BlockId,
        op: OpId,
        manager: NodeId,
        out: &mut Vec<Output<D>>,
    ) where
        D: Clone,
    {
        match &self.data {
            Some(d) => complete(out, op, block, Outcome::Read(d.clone())),
            None => {
                self.op = Some(PendingOp::Read(op));
                out.push(Output::Send {
                    to: manager,
                    msg: Msg::ReadReq { block },
                });
            }
        }
    }

    /// Start a write, update or acquire (`user`): held private, at once; otherwise ask
    /// `manager` (a whole-block write needs no old data).
    #[inline]
    pub(super) fn start_write(
        &mut self,
        block: BlockId,
        op: OpId,
        user: UserOp<D>,
        manager: NodeId,
        out: &mut Vec<Output<D>>,
    ) where
        D: Clone + Patch,
    {
        if self.data.is_some() && matches!(self.mode, Mode::Private { .. }) {
            match user {
                UserOp::Write(value) => self.written(block, op, value, out),
                UserOp::Update(patch) => self.updated(block, op, patch, out),
                _ => self.acquired(block, op, out),
            }
            return;
        }
        let whole = matches!(user, UserOp::Write(_));
        self.op = Some(match user {
            UserOp::Write(value) => PendingOp::Write(op, value),
            UserOp::Update(patch) => PendingOp::Update(op, patch),
            _ => PendingOp::Acquire(op),
        });
        out.push(Output::Send {
            to: manager,
            msg: Msg::WriteReq {
                block,
                has_data: self.data.is_some(),
                whole,
            },
        });
    }

    /// Start a flush: a dirty copy is written back to `storage`; anything else is done.
    #[inline]
    pub(super) fn start_flush(
        &mut self,
        block: BlockId,
        op: OpId,
        storage: NodeId,
        out: &mut Vec<Output<D>>,
    ) where
        D: Clone,
    {
        match (&self.data, self.mode) {
            (Some(_), Mode::Private { dirty: true }) => {
                self.op = Some(PendingOp::Flush(op));
                self.write_back(block, storage, AfterWriteBack::Flush, out);
            }
            _ => complete(out, op, block, Outcome::Flushed),
        }
    }

    /// `Forward` from `manager`: send the copy to the reader (`reader`, its seq), after a
    /// write-back to `storage` if dirty; without a copy, tell the manager.
    #[inline]
    pub(super) fn forwarded(
        &mut self,
        block: BlockId,
        manager: NodeId,
        storage: NodeId,
        (reader, reader_seq): (NodeId, u32),
        counters: &mut ClientCounters,
        out: &mut Vec<Output<D>>,
    ) where
        D: Clone,
    {
        match (&self.data, self.mode) {
            (None, _) => {
                counters.forwards_failed += 1;
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
                counters.writebacks_before_forward += 1;
                self.write_back(
                    block,
                    storage,
                    AfterWriteBack::Forward(reader, reader_seq),
                    out,
                );
            }
            (Some(_), _) => {
                counters.forwards_served += 1;
                self.send_copy(block, reader, reader_seq, out);
            }
        }
    }

    /// `Revoke` from `manager`: acknowledge at once without a copy; otherwise write back
    /// to `storage` if dirty, then have the kernel drop the block.
    #[inline]
    pub(super) fn revoked(
        &mut self,
        block: BlockId,
        manager: NodeId,
        storage: NodeId,
        counters: &mut ClientCounters,
        out: &mut Vec<Output<D>>,
    ) where
        D: Clone,
    {
        counters.revokes += 1;
        match (&self.data, self.mode) {
            (None, _) => out.push(Output::Send {
                to: manager,
                msg: Msg::RevokeAck { block },
            }),
            (Some(_), Mode::Private { dirty: true }) => {
                self.write_back(block, storage, AfterWriteBack::Revoke, out);
            }
            (Some(_), _) => {
                self.step = Some(Step::KernelInvalidate { revoke: true });
                out.push(Output::InvalidateKernel { block });
            }
        }
    }

    /// `Grant`: finish the pending write, update or acquire. False if none waits for it.
    #[inline]
    pub(super) fn granted(&mut self, block: BlockId, out: &mut Vec<Output<D>>) -> bool
    where
        D: Clone + Patch,
    {
        match (self.op.take(), self.data.is_some()) {
            (Some(PendingOp::Write(op, value)), _) => self.written(block, op, value, out),
            (Some(PendingOp::Update(op, patch)), true) => self.updated(block, op, patch, out),
            (Some(PendingOp::Acquire(op)), true) => self.acquired(block, op, out),
            (op, _) => {
                self.op = op;
                return false;
            }
        }
        true
    }

    /// `EvictGrant`: drop the copy (handing it to the peer the manager chose, if any) and
    /// finish the eviction. False if no eviction asked for it, or the manager chose a peer
    /// for a copy this client no longer holds.
    #[inline]
    pub(super) fn evict_granted(
        &mut self,
        block: BlockId,
        handoff: Option<(NodeId, u32)>,
        counters: &mut ClientCounters,
        out: &mut Vec<Output<D>>,
    ) -> bool {
        let Some(PendingOp::Evict { op, asked: true }) = &self.op else {
            return false;
        };
        let op = *op;
        if let (Some((peer, seq)), None) = (handoff, &self.data) {
            // The manager reserved a sequence number on the peer's channel for a copy this
            // client never got (a handoff to it was called off, `Msg::Skip`, while its
            // eviction request was on its way): tell the peer nothing comes there.
            out.push(Output::Send {
                to: peer,
                msg: Msg::Skip { block, seq },
            });
        }
        if let (Some((peer, seq)), Some(d)) = (handoff, self.data.take()) {
            counters.handoffs_sent += 1;
            out.push(Output::Send {
                to: peer,
                msg: Msg::Handoff {
                    block,
                    seq,
                    data: d,
                },
            });
        }
        self.data = None;
        self.mode = Mode::Shared;
        self.op = None;
        complete(out, op, block, Outcome::Evicted);
        true
    }

    /// `Data`: the copy the pending read, write, update or acquire waited for (replacing
    /// a copy handed off here meanwhile). False if none waits for it.
    #[inline]
    pub(super) fn data_arrived(
        &mut self,
        block: BlockId,
        data: D,
        exclusive: bool,
        out: &mut Vec<Output<D>>,
    ) -> bool
    where
        D: Clone + Patch,
    {
        match (self.op.take(), exclusive) {
            (Some(PendingOp::Read(op)), false) => {
                self.data = Some(data.clone());
                self.mode = Mode::Shared;
                complete(out, op, block, Outcome::Read(data));
            }
            (Some(PendingOp::Write(op, value)), true) => self.written(block, op, value, out),
            (Some(PendingOp::Update(op, patch)), true) => {
                self.data = Some(data);
                self.updated(block, op, patch, out)
            }
            (Some(PendingOp::Acquire(op)), true) => {
                self.data = Some(data);
                self.mode = Mode::Private { dirty: false };
                self.acquired(block, op, out)
            }
            (op, _) => {
                self.op = op;
                return false;
            }
        }
        true
    }

    /// `Handoff`: the manager now counts this client as a cacher: take the copy whatever
    /// the block is doing (a pending read or write still waits for its own reply), unless
    /// it has one.
    #[inline]
    pub(super) fn handed_off(&mut self, data: D, counters: &mut ClientCounters) {
        if self.data.is_none() {
            counters.handoffs_taken += 1;
            // Handed on again only if it is read here: a scan's blocks (read once, handed
            // on at each eviction) would otherwise go round every peer's cache. A read
            // waiting for its own reply already counts.
            if self.op.is_none() {
                self.read_here = false;
                self.written_here = false;
            }
            self.data = Some(data);
            self.mode = Mode::Shared;
        } else {
            counters.handoffs_dropped += 1;
        }
    }

    /// Nothing in progress and nothing cached: the entry can go.
    pub(super) fn is_empty(&self) -> bool {
        self.data.is_none()
            && self.op.is_none()
            && self.step.is_none()
            && self.deferred.is_empty()
            && !self.pinned
    }

    pub(super) fn state_name(&self) -> &'static str {
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
