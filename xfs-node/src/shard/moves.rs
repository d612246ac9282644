//! Manager failover in a shard: a committed map change moves manager slots (a failed
//! node's to a survivor, or back to a home that rejoined), and with them the storage role
//! of their blocks (the home's log goes with its slots: `node::start`'s log thread takes
//! it over).
//!
//! No manager hands its state over (the old one may be dead). Instead, on applying the
//! change, every node:
//! * forgets its manager state for the moved blocks;
//! * drops its cached copies of them (and the kernel's pages): the new manager knows of no
//!   copy, so it could not invalidate one. A dirty copy (an un-fsynced write) is written
//!   back to the block's new storage node first; an operation in progress on a moved
//!   block runs again under the new manager;
//! * once those write-backs are acknowledged and the kernel dropped the pages, tells every
//!   peer so ([`MOVED_HANDLER`], with the epoch of the map change).
//!
//! A node that gains slots holds the requests for their blocks ([`MoveBarrier`]) until
//! every other member has said so for that epoch (or was removed): then no member holds a
//! copy the new manager does not know of, and every surviving write is in its log.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::*;

/// The AM handler of "this node dropped its copies of the moved blocks" (`[epoch]`): see
/// the module docs.
pub const MOVED_HANDLER: u16 = 6;

/// Turns of [`Shard::tick_moves`] (about 2 s each in a node) after which a move's
/// write-back that was never acknowledged is given up (the operations waiting for the
/// block fail with EIO), and a barrier whose members never answered is lifted.
const MOVE_TICKS: u32 = 15;

/// What peers said on [`MOVED_HANDLER`]: (their endpoint's address and virtual network,
/// epoch).
pub(super) type MovedInbox = Arc<Mutex<VecDeque<((std::net::SocketAddr, u32), Epoch)>>>;

/// The requests a node that gained slots holds until every member dropped its copies.
#[derive(Clone, Debug, Default)]
pub struct MoveBarrier {
    /// The epoch of the map change.
    pub epoch: Epoch,
    /// The slots gained.
    pub slots: BTreeSet<usize>,
    /// Members that have not yet said they dropped their copies.
    pub waiting: BTreeSet<NodeId>,
    /// Turns of [`Shard::tick_moves`] since it was set.
    pub age: u32,
}

/// A shard's failover state.
#[derive(Debug)]
pub struct Moves<D> {
    /// The requests held, and for which slots.
    pub barrier: Option<MoveBarrier>,
    /// Requests for the barrier's slots, in arrival order.
    pub held: VecDeque<Delivery<D>>,
    /// Per peer, the newest epoch it said it dropped its copies in.
    pub done_seen: BTreeMap<NodeId, Epoch>,
    /// Moved blocks whose dirty copy was written back to the new storage node, with the
    /// turns waited for the acknowledgement.
    pub migrating: BTreeMap<BlockId, u32>,
    /// Moved blocks whose kernel pages are being dropped, with the copy this node had: it
    /// serves reads until the kernel let go (the copy is still valid: the new manager
    /// grants nothing until this node said it let go).
    pub kernel: BTreeMap<BlockId, D>,
    /// The epoch to tell peers about once `migrating` and `kernel` are empty.
    pub announce: Option<Epoch>,
    /// What peers said (`(their endpoint, epoch)`), from the AM handler.
    pub inbox: MovedInbox,
    /// Per slot, its home (the configured manager map): a sync asked of a home goes to
    /// the node that manages its slots now.
    pub homes: Vec<NodeId>,
    /// Per slot, the epoch it last moved in: a message about one of its blocks stamped
    /// before that was meant for the old manager's state, and is dropped.
    pub moved_at: Vec<Epoch>,
    /// No map applied yet (a starting node): the slots it manages when it first applies
    /// one may have moved to it while it was away, so they are held like gained ones.
    pub fresh: bool,
    /// Write-backs acknowledged and syncs, shared by the node's shards.
    pub ledger: Arc<SyncLedger>,
    /// Syncs asked: the node and its acknowledgement count when asked.
    pub syncs: BTreeMap<OpId, (NodeId, u64)>,
}

/// What a node's shards share about write-backs acknowledged and not yet covered by a
/// sync (a sync goes through one shard; write-backs through all). When a home's slots
/// move while their old writer had acknowledged write-backs that no sync covered, those
/// may be lost with it: the next sync of that home fails (EIO) once, as Linux reports a
/// lost write-back at the next fsync.
#[derive(Debug, Default)]
pub struct SyncLedger {
    /// Per node: write-backs it acknowledged to this node.
    acked: Vec<AtomicU64>,
    /// Per node: the acknowledgements a successful sync to it covered.
    synced: Vec<AtomicU64>,
    /// Per home: its next sync fails.
    lost: Vec<AtomicBool>,
}

impl SyncLedger {
    /// A ledger for node ids below `nodes`.
    pub fn new(nodes: usize) -> Self {
        SyncLedger {
            acked: (0..nodes).map(|_| AtomicU64::new(0)).collect(),
            synced: (0..nodes).map(|_| AtomicU64::new(0)).collect(),
            lost: (0..nodes).map(|_| AtomicBool::new(false)).collect(),
        }
    }
    fn acked(&self, node: NodeId) -> u64 {
        self.acked
            .get(node as usize)
            .map_or(0, |a| a.load(Ordering::Relaxed))
    }
    fn ack(&self, node: NodeId) {
        if let Some(a) = self.acked.get(node as usize) {
            a.fetch_add(1, Ordering::Relaxed);
        }
    }
    fn synced(&self, node: NodeId, upto: u64) {
        if let Some(s) = self.synced.get(node as usize) {
            s.fetch_max(upto, Ordering::Relaxed);
        }
    }
    fn unsynced(&self, node: NodeId) -> bool {
        let s = self
            .synced
            .get(node as usize)
            .map_or(0, |s| s.load(Ordering::Relaxed));
        self.acked(node) > s
    }
    fn mark_lost(&self, home: NodeId) {
        if let Some(l) = self.lost.get(home as usize) {
            l.store(true, Ordering::Relaxed);
        }
    }
    fn take_lost(&self, home: NodeId) -> bool {
        self.lost
            .get(home as usize)
            .is_some_and(|l| l.swap(false, Ordering::Relaxed))
    }
}

impl<D> Moves<D> {
    /// No move yet; `homes` as configured.
    pub fn new(homes: Vec<NodeId>) -> Self {
        Moves {
            barrier: None,
            held: VecDeque::new(),
            done_seen: BTreeMap::new(),
            migrating: BTreeMap::new(),
            kernel: BTreeMap::new(),
            announce: None,
            inbox: Default::default(),
            moved_at: vec![0; homes.len()],
            homes,
            fresh: true,
            ledger: Default::default(),
            syncs: BTreeMap::new(),
        }
    }

    /// Start afresh (the node restarted or was removed), keeping what outlives that: the
    /// handler's inbox, the homes, the shared ledger, when slots last moved.
    pub fn reset(&mut self) {
        let mut m = Moves::new(std::mem::take(&mut self.homes));
        m.inbox = self.inbox.clone();
        m.ledger = self.ledger.clone();
        m.moved_at = std::mem::take(&mut self.moved_at);
        *self = m;
    }
}

impl<T: Transport, D: BlockData, S: BlockStore<D>> Shard<T, D, S> {
    /// The node that manages home `home`'s slots now (itself while it is a member).
    pub fn current_of_home(&self, home: NodeId) -> NodeId {
        self.moves
            .homes
            .iter()
            .position(|h| *h == home)
            .and_then(|i| self.client.placement.managers.get(i).copied())
            .unwrap_or(home)
    }

    /// Apply the manager map `managers` of epoch `epoch` (see the module docs).
    pub(super) fn move_slots(&mut self, managers: &[NodeId], epoch: Epoch) {
        let old = self.client.placement.managers.clone();
        let fresh = std::mem::take(&mut self.moves.fresh);
        if managers.is_empty() || managers.len() != old.len() {
            return;
        }
        if managers == old.as_slice() {
            if fresh && epoch > 0 && Some(epoch) == self.joined_since {
                // Its slots came back to it with its join: the members may still hold
                // copies the member that held them granted.
                let mine = (0..managers.len()).filter(|i| managers[*i] == self.node);
                self.hold_gained(mine.collect(), epoch);
            }
            return;
        }
        let moved: BTreeSet<usize> = (0..managers.len())
            .filter(|i| old[*i] != managers[*i])
            .collect();
        let placement = self.client.placement.clone();
        let in_moved = |b: BlockId| moved.contains(&placement.slot(b));
        for i in &moved {
            self.moves.moved_at[*i] = epoch;
            // Write-backs the old writer acknowledged that no sync covered may be lost
            // with it: the home's next sync fails.
            if self.moves.ledger.unsynced(old[*i]) {
                self.moves.ledger.mark_lost(self.moves.homes[*i]);
            }
        }
        self.manager.forget(in_moved);
        self.client.channels.retain(|(_, b), _| !in_moved(*b));
        // Messages about moved blocks not yet handled or sent belong to the old map (their
        // senders run their operations again under the new one).
        self.pending.retain(|d| !in_moved(d.msg.block()));
        self.outgoing.retain(|(_, m)| !in_moved(m.block()));
        self.suspended.retain(|(_, m)| !in_moved(m.block()));
        self.client.placement.managers = managers.to_vec();
        self.client.placement.storages = managers.to_vec();
        self.manager.placement = self.client.placement.clone();
        let blocks: Vec<BlockId> = self
            .client
            .blocks
            .keys()
            .copied()
            .filter(|b| in_moved(*b))
            .collect();
        for b in blocks {
            let t = self.client.take_for_move(b);
            self.counters.blocks_moved += 1;
            if let Some((op, user)) = t.again {
                self.waiting.entry(b).or_default().push_front((op, user));
                self.counters.ops_run_again += 1;
            }
            if let (Some(data), true) = (&t.data, t.dirty) {
                let to = self.client.placement.storage(b);
                self.moves.migrating.insert(b, 0);
                self.counters.moved_write_backs += 1;
                self.out.push(Output::Send {
                    to,
                    msg: Msg::WriteBack {
                        block: b,
                        data: data.clone(),
                    },
                });
            }
            if let Some(data) = t.data {
                self.forgotten.insert(b);
                self.kernel.push_back(b);
                self.moves.kernel.insert(b, data);
            }
        }
        // Requests held for slots that moved on from here: their senders ask again.
        let me = self.node;
        let still_mine =
            |b: BlockId| placement.slot(b) < managers.len() && managers[placement.slot(b)] == me;
        let held = std::mem::take(&mut self.moves.held);
        for d in held {
            if still_mine(d.msg.block()) {
                self.moves.held.push_back(d);
            } else {
                self.counters.not_managed_here += 1;
            }
        }
        let gained: BTreeSet<usize> = moved
            .iter()
            .copied()
            .filter(|i| managers[*i] == me)
            .collect();
        self.hold_gained(gained, epoch);
        self.moves.announce = Some(epoch);
        self.execute();
        self.release_moved();
    }

    /// Hold the requests for `gained` (and the slots a barrier already holds that are
    /// still this node's) until every other member said it let go of its copies in
    /// `epoch` or later.
    fn hold_gained(&mut self, gained: BTreeSet<usize>, epoch: Epoch) {
        let me = self.node;
        let managers = self.client.placement.managers.clone();
        let mut slots: BTreeSet<usize> = self
            .moves
            .barrier
            .take()
            .map(|b| b.slots)
            .unwrap_or_default()
            .into_iter()
            .filter(|i| managers.get(*i) == Some(&me))
            .collect();
        slots.extend(gained);
        if !slots.is_empty() {
            let waiting = self
                .fence
                .nodes
                .iter()
                .filter(|(n, m)| m.member && **n != me)
                .map(|(n, _)| *n)
                .filter(|n| self.moves.done_seen.get(n).is_none_or(|e| *e < epoch))
                .collect();
            self.moves.barrier = Some(MoveBarrier {
                epoch,
                slots,
                waiting,
                age: 0,
            });
        }
    }

    /// Whether delivery `d` waits for a barrier (held) or is not for this node any more
    /// (dropped: its sender asks again under the new map); `false`: handle it.
    pub(super) fn held_for_move(&mut self, d: Delivery<D>) -> Option<Delivery<D>> {
        let block = d.msg.block();
        match d.msg.role() {
            Role::Client => {
                if matches!(d.msg, Msg::WriteBackAck { .. }) {
                    self.moves.ledger.ack(d.from);
                    if d.from == self.client.placement.storage(block)
                        && self.moves.migrating.remove(&block).is_some()
                    {
                        // A moved dirty copy is in the new storage node's log.
                        return None;
                    }
                }
                Some(d)
            }
            Role::Manager | Role::Storage
                if self.manager.placement.index_shift.is_some()
                    && self.manager.placement.manager(block) != self.node =>
            {
                self.counters.not_managed_here += 1;
                None
            }
            Role::Manager
                if self
                    .moves
                    .barrier
                    .as_ref()
                    .is_some_and(|b| b.slots.contains(&self.manager.placement.slot(block))) =>
            {
                self.counters.held_for_move += 1;
                self.moves.held.push_back(d);
                None
            }
            _ => Some(d),
        }
    }

    /// Take what peers said (their copies of moved blocks are gone); lift the barrier
    /// once every member has; tell peers this node's copies are gone once its moved
    /// write-backs are acknowledged and the kernel dropped the pages.
    pub(super) fn step_moves(&mut self) -> usize {
        let said: Vec<_> = lock(&self.moves.inbox).drain(..).collect();
        let n = said.len();
        for (name, epoch) in said {
            let Some(from) = self.names.get(&name).copied() else {
                continue;
            };
            let e = self.moves.done_seen.entry(from).or_default();
            *e = (*e).max(epoch);
            if let Some(b) = &mut self.moves.barrier {
                if epoch >= b.epoch {
                    b.waiting.remove(&from);
                }
            }
        }
        self.release_moved();
        if let Some(epoch) = self.moves.announce {
            if self.moves.migrating.is_empty() && self.moves.kernel.is_empty() {
                let peers: Vec<u16> = self.peers.values().copied().collect();
                let args = [epoch];
                for index in peers {
                    let m = AmMsg::small(MOVED_HANDLER, &args);
                    if let Err(AmError::WouldBlock) = self.endpoint.send(index, m) {
                        // No room: all again next turn (a repeat is harmless).
                        return n;
                    }
                }
                self.moves.announce = None;
                self.counters.moves_announced += 1;
            }
        }
        n
    }

    /// A removed or rejoined peer no longer holds up a barrier, and the syncs it was asked
    /// for and never answered fail (EIO) rather than wait for their timeout: a sync of the
    /// home it managed asked now goes to the node that took its log over.
    pub(super) fn moves_peer_gone(&mut self, peer: NodeId) {
        let unanswered: Vec<OpId> = self
            .moves
            .syncs
            .iter()
            .filter(|(_, (n, _))| *n == peer)
            .map(|(op, _)| *op)
            .collect();
        for op in unanswered {
            self.moves.syncs.remove(&op);
            self.sync_done.push((
                op,
                Err(SyncError::io(format!(
                    "node {peer} was removed from the cluster before it answered the sync"
                ))),
            ));
        }
        if let Some(b) = &mut self.moves.barrier {
            b.waiting.remove(&peer);
        }
        self.moves.done_seen.remove(&peer);
        self.release_moved();
    }

    /// Lift the barrier once no member is waited for: its held requests are handled.
    fn release_moved(&mut self) {
        // This node's own moved write-backs go first (its own kernel's invalidations are
        // not waited for: a request of its own may hold the page one waits for).
        let own = self.moves.migrating.is_empty();
        if own
            && self
                .moves
                .barrier
                .as_ref()
                .is_some_and(|b| b.waiting.is_empty())
        {
            self.moves.barrier = None;
            let held = std::mem::take(&mut self.moves.held);
            self.pending.extend(held);
        }
    }

    /// One turn of the failover clock (about every 2 s in a node): a move's write-back
    /// unacknowledged for [`MOVE_TICKS`] turns is given up (operations waiting for the
    /// block fail with EIO), and a barrier held that long is lifted (counted).
    pub fn tick_moves(&mut self) {
        let mut lost = Vec::new();
        for (b, age) in self.moves.migrating.iter_mut() {
            *age += 1;
            if *age >= MOVE_TICKS {
                lost.push(*b);
            }
        }
        for b in lost {
            self.moves.migrating.remove(&b);
            self.counters.moves_expired += 1;
            if let Some(q) = self.waiting.remove(&b) {
                self.failed_ops.extend(q.into_iter().map(|(op, _)| op));
            }
        }
        if let Some(b) = &mut self.moves.barrier {
            b.age += 1;
            if b.age >= MOVE_TICKS {
                self.counters.moves_expired += 1;
                b.waiting.clear();
                self.moves.kernel.clear();
            }
        }
        self.release_moved();
    }

    /// Whether a moved block's write-back or kernel invalidation is still waited for (its
    /// operations wait too; reads are served from the copy meanwhile).
    pub(super) fn is_moving(&self, block: BlockId) -> bool {
        self.moves.migrating.contains_key(&block) || self.moves.kernel.contains_key(&block)
    }

    /// Serve read `op` of a moved block from the copy this node had, while the kernel
    /// drops its pages (the invalidation then goes round once more); `false` if there is
    /// none.
    pub(super) fn read_moved_copy(&mut self, op: OpId, block: BlockId) -> bool {
        let Some(d) = self.moves.kernel.get(&block) else {
            return false;
        };
        self.out.push(Output::Complete {
            op,
            block,
            outcome: Outcome::Read(d.clone()),
        });
        true
    }

    /// The kernel dropped a moved block's pages: `true` if it was one (done with it, or
    /// asked to drop them again because a read was served from the copy meanwhile).
    pub(super) fn moved_kernel_done(&mut self, block: BlockId) -> bool {
        if !self.moves.kernel.contains_key(&block) {
            return false;
        }
        if self.reread.remove(&block) {
            self.kernel.push_back(block);
            return true;
        }
        self.moves.kernel.remove(&block);
        self.forgotten.remove(&block);
        true
    }

    /// A sync of home `home` is about to go to `node`: `Err` if it must fail once (the
    /// home's log changed hands with write-backs its old writer acknowledged unsynced).
    pub(super) fn sync_asked(
        &mut self,
        op: OpId,
        home: NodeId,
        node: NodeId,
    ) -> Result<(), SyncError> {
        if self.moves.ledger.take_lost(home) {
            return Err(SyncError::io(format!(
                "the log of node {home} changed hands (manager failover) after write-backs \
                 its writer acknowledged and did not sync: they may be lost"
            )));
        }
        let upto = self.moves.ledger.acked(node);
        self.moves.syncs.insert(op, (node, upto));
        Ok(())
    }

    /// Syncs done: a successful one covers the acknowledgements counted when it was asked.
    pub(super) fn syncs_done(&mut self, done: &[(OpId, Result<(), SyncError>)]) {
        for (op, r) in done {
            if let Some((node, upto)) = self.moves.syncs.remove(op) {
                if r.is_ok() {
                    self.moves.ledger.synced(node, upto);
                }
            }
        }
    }

    /// Share `ledger` with the node's other shards.
    pub fn share_ledger(&mut self, ledger: Arc<SyncLedger>) {
        self.moves.ledger = ledger;
    }

    /// Whether a message stamped `epoch` about `block` predates its slot's last move.
    pub(super) fn before_move(&self, block: BlockId, epoch: Epoch) -> bool {
        self.manager.placement.index_shift.is_some()
            && self
                .moves
                .moved_at
                .get(self.manager.placement.slot(block))
                .is_some_and(|m| epoch < *m)
    }

    /// The failover state in numbers, for `status --counters`: members a barrier waits
    /// for, requests it holds, moved write-backs and kernel invalidations pending, and
    /// whether this node's announcement waits.
    pub fn move_gauges(&self) -> [u64; 5] {
        [
            self.moves
                .barrier
                .as_ref()
                .map_or(0, |b| b.waiting.len() as u64),
            self.moves.held.len() as u64,
            self.moves.migrating.len() as u64,
            self.moves.kernel.len() as u64,
            self.moves.announce.is_some() as u64,
        ]
    }
}
