//! The manager's machine: per block the cachers, the owner, a write in progress and the
//! queue of requests it cannot serve yet ([`ManagerShard`]).

use super::*;

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
    Write {
        /// Whether the writer holds a copy.
        has_data: bool,
        /// Whether the writer replaces the whole block.
        whole: bool,
    },
    /// Eviction (`keep`: the copy is worth a handoff if it is the last one).
    Evict {
        /// Whether the evicting client says the copy is worth another client's room.
        keep: bool,
    },
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
    /// Replies delegated and not yet known to have arrived: per receiving client, the
    /// client asked to send it (a forward's holder, a handoff's evicting client) and the
    /// sequence number reserved for it on the receiver's channel. If that client is
    /// removed ([`ManagerShard::peer_removed`]) the manager has the receiver served again
    /// at the same number (should the first reply come after all, the receiver drops it
    /// as a duplicate). An entry goes when a later message shows the reply arrived (the
    /// receiver's revoke acknowledgement, a grant to another client); one left behind
    /// costs at most a reply served twice, dropped by its number.
    pub delegated: BTreeMap<NodeId, (NodeId, u32)>,
    /// Handoffs ordered and not yet known to have arrived, as [`ManagerBlock::delegated`]
    /// (receiver → evicting client, number); one whose evicting client is removed is
    /// called off ([`Msg::Skip`]). They do not keep an otherwise empty block's state
    /// alive: when they did, a full cluster no longer got a refused file's space back
    /// (`tests/cluster.rs`, the full-cluster test); why is not yet understood.
    pub handoffs: BTreeMap<NodeId, (NodeId, u32)>,
}

impl ManagerBlock {
    fn is_empty(&self) -> bool {
        self.cachers.is_empty()
            && self.owner.is_none()
            && self.writing.is_none()
            && self.queue.is_empty()
            && self.recirculated == 0
            && self.delegated.is_empty()
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
            Msg::EvictReq { keep, .. } => self.request(block, from, Request::Evict { keep }, out),
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
                b.delegated.remove(&from);
                b.handoffs.remove(&from);
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
                // The holder has no copy (it restarted, or died and the driver answers for
                // it).
                self.serve_elsewhere(block, from, reader, reader_seq, out);
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
            b.delegated.retain(|to, _| *to != peer);
            b.handoffs.retain(|to, _| *to != peer);
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

    /// Serve `reader` (its reply reserved at `reader_seq`) from a copy other than
    /// `failed`'s. Another cacher's copy is current; storage may not be yet (the block's
    /// last owner may still be writing it back, having forwarded it on), so storage serves
    /// only when no other copy is left.
    fn serve_elsewhere<D: Clone>(
        &mut self,
        block: BlockId,
        failed: NodeId,
        reader: NodeId,
        reader_seq: u32,
        out: &mut Vec<Output<D>>,
    ) {
        let b = self.blocks.entry(block).or_default();
        // `failed` stays a cacher if it was one (a removed node is dropped by `peer_died`):
        // it may be waiting for its own copy, which a later write must revoke.
        if b.last_reader == Some(failed) {
            b.last_reader = None;
        }
        // Not a cacher that is itself waiting for a delegated reply (the chain could close
        // into a cycle through the reader). A cacher waiting for a handoff may serve: the
        // forward follows the handoff (or its `Skip`, then it fails over again).
        let source = b.cachers.iter().copied().find(|c| {
            *c != reader
                && *c != failed
                && !b.delegated.contains_key(c)
                && b.owner.is_none_or(|o| o == *c)
        });
        self.delegate_read(block, source, reader, reader_seq, out);
    }

    /// Have `reader`'s copy (its reply reserved at `reader_seq`) sent by `source`, a client
    /// holding it (a forward, remembered in [`ManagerBlock::delegated`]), or by storage.
    fn delegate_read<D: Clone>(
        &mut self,
        block: BlockId,
        source: Option<NodeId>,
        reader: NodeId,
        reader_seq: u32,
        out: &mut Vec<Output<D>>,
    ) {
        let b = self.blocks.entry(block).or_default();
        match source {
            Some(holder) => {
                b.delegated.insert(reader, (holder, reader_seq));
                self.counters.forwards += 1;
                let seq = self.seq(holder, block);
                out.push(Output::Send {
                    to: holder,
                    msg: Msg::Forward {
                        block,
                        seq,
                        reader,
                        reader_seq,
                    },
                });
            }
            None => {
                b.delegated.remove(&reader);
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
            }
        }
    }

    /// A message of this manager could not reach client `to` (the peer is dead, or the
    /// cluster removed it): answer for it where the protocol would otherwise wait forever.
    /// A revoke counts as acknowledged (the copy died with the peer, or is fenced), a
    /// forward as failed (another copy or storage serves the reader), and a handoff ordered
    /// with an eviction grant is called off ([`Msg::Skip`] at its number; the receiver
    /// stays a cacher, as the handoff may still reach it). Other messages need no
    /// answer.
    pub fn undeliverable<D: Clone>(
        &mut self,
        to: NodeId,
        msg: Msg<D>,
        out: &mut Vec<Output<D>>,
    ) -> Result<(), ProtocolError> {
        // Answered once: a message already answered for `to` (its removal answered every
        // wait for it) is not answered again.
        match msg {
            Msg::Revoke { block, .. } => {
                let waits = self
                    .blocks
                    .get(&block)
                    .is_some_and(|b| b.writing.as_ref().is_some_and(|w| w.waiting.contains(&to)));
                if !waits {
                    return Ok(());
                }
                self.receive(to, Msg::RevokeAck { block }, out)
            }
            Msg::Forward {
                block,
                reader,
                reader_seq,
                ..
            } => {
                let owed = self
                    .blocks
                    .get(&block)
                    .is_some_and(|b| b.delegated.get(&reader) == Some(&(to, reader_seq)));
                if !owed {
                    return Ok(());
                }
                self.receive(
                    to,
                    Msg::ForwardFailed {
                        block,
                        reader,
                        reader_seq,
                    },
                    out,
                )
            }
            Msg::EvictGrant {
                block,
                handoff: Some((peer, seq)),
                ..
            } => {
                let owed = self
                    .blocks
                    .get(&block)
                    .is_some_and(|b| b.handoffs.get(&peer) == Some(&(to, seq)));
                if !owed {
                    return Ok(());
                }
                if let Some(b) = self.blocks.get_mut(&block) {
                    // It stays a cacher: the handoff may reach it yet, and a cacher
                    // without a copy only answers a forward as failed.
                    b.handoffs.remove(&peer);
                }
                out.push(Output::Send {
                    to: peer,
                    msg: Msg::Skip { block, seq },
                });
                self.tidy(block);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The cluster removed client `peer` (a committed membership change; its messages are
    /// fenced from now on, [`Fence`]): every write waiting for its acknowledgement takes it
    /// as given (whatever copy it holds can no longer be written back or served to a
    /// writer), its queued requests are dropped, and it caches nothing any more. The driver
    /// answers the messages still on their way to it as for a dead peer (a revoke as
    /// acknowledged, a forward as failed).
    pub fn peer_removed<D: Clone>(
        &mut self,
        peer: NodeId,
        out: &mut Vec<Output<D>>,
    ) -> Result<(), ProtocolError> {
        let waiting: Vec<BlockId> = self
            .blocks
            .iter()
            .filter(|(_, b)| {
                b.writing
                    .as_ref()
                    .is_some_and(|w| w.waiting.contains(&peer))
            })
            .map(|(block, _)| *block)
            .collect();
        for b in self.blocks.values_mut() {
            b.queue.retain(|(c, _)| *c != peer);
        }
        for block in waiting {
            self.receive(peer, Msg::RevokeAck { block }, out)?;
        }
        self.peer_died(peer);
        // Replies it was asked to send and may never send: served again.
        for (block, to, seq) in self.owed_by(peer, |b| &b.delegated) {
            self.serve_elsewhere(block, peer, to, seq, out);
        }
        // Handoffs it was to send: called off.
        for (block, to, seq) in self.owed_by(peer, |b| &b.handoffs) {
            if let Some(b) = self.blocks.get_mut(&block) {
                // It stays a cacher (see `undeliverable`).
                b.handoffs.remove(&to);
            }
            out.push(Output::Send {
                to,
                msg: Msg::Skip { block, seq },
            });
        }
        for b in self.blocks.values_mut() {
            b.delegated.retain(|to, _| *to != peer);
            b.handoffs.retain(|to, _| *to != peer);
        }
        self.blocks.retain(|_, b| !b.is_empty());
        // No N-chance handoff goes to it any more (until it joins again).
        self.clients.retain(|c| *c != peer);
        Ok(())
    }

    /// What `peer` was to send to others, by the map `which` picks of each block:
    /// (block, receiver, number reserved on the receiver's channel).
    fn owed_by(
        &self,
        peer: NodeId,
        which: impl Fn(&ManagerBlock) -> &BTreeMap<NodeId, (NodeId, u32)>,
    ) -> Vec<(BlockId, NodeId, u32)> {
        self.blocks
            .iter()
            .flat_map(|(block, b)| {
                which(b)
                    .iter()
                    .filter(|(to, (from, _))| *from == peer && **to != peer)
                    .map(|(to, (_, seq))| (*block, *to, *seq))
            })
            .collect()
    }

    /// Client `peer` (a new incarnation) is a member again: N-chance handoffs may go to it.
    pub fn peer_joined(&mut self, peer: NodeId) {
        if !self.clients.contains(&peer) {
            self.clients.push(peer);
            self.clients.sort_unstable();
        }
    }

    /// Forget every block `moved` names (their manager slots moved to another node by a
    /// committed map change: the new manager starts them afresh).
    pub fn forget(&mut self, moved: impl Fn(BlockId) -> bool) {
        self.blocks.retain(|b, _| !moved(*b));
        self.next_seq.retain(|(_, b), _| !moved(*b));
    }

    /// Client `peer` restarted with an empty cache: it holds no copy, its requests are
    /// gone, and its channel starts again at 0. Call it at a quiescent point (no write
    /// waiting for `peer`'s acknowledgement).
    pub fn peer_restarted(&mut self, peer: NodeId) {
        self.next_seq.retain(|(c, _), _| *c != peer);
        for b in self.blocks.values_mut() {
            b.delegated
                .retain(|to, (from, _)| *to != peer && *from != peer);
            b.handoffs
                .retain(|to, (from, _)| *to != peer && *from != peer);
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
        match req {
            Request::Read => self.serve_read(block, from, out),
            Request::Write { has_data, whole } => {
                self.serve_write(block, from, has_data, whole, out)
            }
            Request::Evict { keep } => self.serve_evict(block, from, keep, out),
        }
    }

    /// A read miss: delegated to a client holding a copy (the owner, else the last reader,
    /// else any cacher), or fetched from storage.
    #[inline]
    fn serve_read<D: Clone>(&mut self, block: BlockId, from: NodeId, out: &mut Vec<Output<D>>) {
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
        self.delegate_read(block, source, from, reader_seq, out);
    }

    /// A write: granted at once if nobody else holds the block, else every other holder
    /// is revoked and the grant waits for their acknowledgements.
    #[inline]
    fn serve_write<D: Clone>(
        &mut self,
        block: BlockId,
        from: NodeId,
        has_data: bool,
        whole: bool,
        out: &mut Vec<Output<D>>,
    ) {
        let b = self.blocks.entry(block).or_default();
        b.recirculated = 0;
        let mut holders: BTreeSet<NodeId> =
            b.cachers.iter().copied().filter(|c| *c != from).collect();
        if let Some(o) = b.owner.filter(|o| *o != from) {
            holders.insert(o);
        }
        if holders.is_empty() {
            self.grant(block, from, has_data, whole, out);
            return;
        }
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

    /// An eviction: granted, and the last copy of a block not yet recirculated
    /// `n_chance` times handed to the next client round the ring (N-chance), if the
    /// evicting client says it is worth keeping (`keep`).
    #[inline]
    fn serve_evict<D: Clone>(
        &mut self,
        block: BlockId,
        from: NodeId,
        keep: bool,
        out: &mut Vec<Output<D>>,
    ) {
        let n_chance = self.config.n_chance;
        let b = self.blocks.entry(block).or_default();
        // (A reply delegated to it may still be on its way: its eviction request can
        // cross a handoff to it.)
        let was_cacher = b.cachers.remove(&from);
        if b.owner == Some(from) {
            b.owner = None;
        }
        let mut handoff = None;
        let last = was_cacher && b.cachers.is_empty() && b.owner.is_none();
        if keep && last && b.recirculated < n_chance {
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
            let seq = self.seq(p, block);
            self.blocks
                .entry(block)
                .or_default()
                .handoffs
                .insert(p, (from, seq));
            (p, seq)
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
        // Every other copy's holder acknowledged its revoke, after any reply delegated to
        // it, and the writer's own read finished before it asked to write. (Handoffs stay:
        // one may be on its way to a client that evicted meanwhile; an entry left behind
        // costs at most a `Skip` the receiver drops as a duplicate.)
        b.delegated.clear();
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
            b.delegated = b
                .delegated
                .iter()
                .map(|(to, (from, seq))| (f(*to), (f(*from), *seq)))
                .collect();
            b.handoffs = b
                .handoffs
                .iter()
                .map(|(to, (from, seq))| (f(*to), (f(*from), *seq)))
                .collect();
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
