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
            homes,
        }
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
        if managers.is_empty() || managers == old.as_slice() || managers.len() != old.len() {
            return;
        }
        let moved: BTreeSet<usize> = (0..managers.len())
            .filter(|i| old[*i] != managers[*i])
            .collect();
        let placement = self.client.placement.clone();
        let in_moved = |b: BlockId| moved.contains(&placement.slot(b));
        self.manager.forget(in_moved);
        self.client.channels.retain(|(_, b), _| !in_moved(*b));
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
        self.moves.announce = Some(epoch);
        self.execute();
        self.release_moved();
    }

    /// Whether delivery `d` waits for a barrier (held) or is not for this node any more
    /// (dropped: its sender asks again under the new map); `false`: handle it.
    pub(super) fn held_for_move(&mut self, d: Delivery<D>) -> Option<Delivery<D>> {
        let block = d.msg.block();
        match d.msg.role() {
            Role::Client => {
                if matches!(d.msg, Msg::WriteBackAck { .. })
                    && self.moves.migrating.remove(&block).is_some()
                {
                    // A moved dirty copy is in the new storage node's log.
                    return None;
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
            }
        }
        n
    }

    /// A removed or rejoined peer no longer holds up a barrier.
    pub(super) fn moves_peer_gone(&mut self, peer: NodeId) {
        if let Some(b) = &mut self.moves.barrier {
            b.waiting.remove(&peer);
        }
        self.moves.done_seen.remove(&peer);
        self.release_moved();
    }

    /// Lift the barrier once no member is waited for: its held requests are handled.
    fn release_moved(&mut self) {
        if self
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
}
