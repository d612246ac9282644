//! The `stateright` model of the coherence protocol: the state machines of
//! `xfs_node::coherence` (the same code the shard loops run), one manager, one storage
//! server, N clients each with a kernel-cache actor, over an unordered or an ordered network.
//!
//! Values are versions: write number k stores the value k, so "every completed read returns
//! the value of the last completed write" is an equality check at the moment a read
//! completes. Kernel-cache hits complete reads without the client (the kernel is a node of
//! the protocol), which is why a revoke may be acknowledged only after the kernel dropped
//! its pages.
#![allow(dead_code)]

use std::collections::BTreeMap;

use stateright::{Model, Property};
use xfs_node::coherence::{
    Admit, BlockId, ClientShard, Epoch, Fence, ManagerShard, MemStore, Mode, Msg, NodeId, Outcome,
    Output, Placement, ProtocolConfig, Role, StorageShard, UserOp,
};

/// The manager's node id in the model.
pub(crate) const MANAGER: NodeId = 100;
/// The storage server's node id in the model.
pub(crate) const STORAGE: NodeId = 101;

/// An address on the model's network: a protocol role or a client's kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Addr {
    /// Client i's cache.
    Client(NodeId),
    /// Client i's kernel page cache.
    Kernel(NodeId),
    /// The manager.
    Manager,
    /// The storage server.
    Storage,
}

/// What travels.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Payload {
    /// A protocol message.
    Proto(Msg<u8>),
    /// Client → its kernel: drop the block's pages.
    Invalidate(BlockId),
    /// Kernel → client: done.
    Invalidated(BlockId),
}

/// A message in flight.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Envelope {
    pub(crate) from: Addr,
    pub(crate) to: Addr,
    pub(crate) payload: Payload,
    /// The sender's membership epoch (what the manager and storage roles fence by).
    pub(crate) epoch: Epoch,
}

/// What went wrong (kept in the state; a property checks it stays `None`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Violation {
    /// A read returned something other than the last completed write.
    StaleRead {
        client: NodeId,
        block: BlockId,
        got: u8,
        want: u8,
    },
    /// A state machine had no rule for an input.
    Protocol(String),
    /// A transaction holding both blocks saw them differ: another transaction's update
    /// of the two was seen half done.
    Torn {
        client: NodeId,
        first: u8,
        second: u8,
    },
    /// Storage took a write-back from a client the cluster had removed: a fenced node's
    /// stale copy overwrote the block.
    FencedWriteTaken {
        client: NodeId,
        block: BlockId,
        value: u8,
    },
}

/// The whole system.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct World {
    pub(crate) manager: ManagerShard,
    pub(crate) storage: StorageShard<MemStore<u8>>,
    pub(crate) clients: Vec<ClientShard<u8>>,
    /// Client i's kernel page cache.
    pub(crate) kernels: Vec<BTreeMap<BlockId, u8>>,
    /// Operations each client may still start.
    pub(crate) budget: Vec<u8>,
    /// Messages in flight (kept sorted; in the ordered network, stably by (from, to)).
    pub(crate) net: Vec<Envelope>,
    /// Per block, the value of the last completed write.
    pub(crate) last_write: Vec<u8>,
    /// The value the next write stores.
    pub(crate) next_value: u8,
    pub(crate) violation: Option<Violation>,
    /// The network keeps per (from, to) order.
    pub(crate) ordered: bool,
    /// Per client, its transaction's progress: 0 none, 1 acquiring its first block, 2
    /// holding it (the second is acquired once that block is idle here), 3 acquiring its
    /// second.
    pub(crate) txn: Vec<u8>,
    /// The manager's and storage's view of the membership (both learn a removal at once).
    pub(crate) fence: Fence,
    /// Per client: whether the cluster removed it (it is not told: a stalled node).
    pub(crate) removed: Vec<bool>,
}

/// A step of the model.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Action {
    /// Deliver the message at this index of `net`.
    Deliver(usize),
    /// A user operation at a client.
    Op(NodeId, BlockId, UserOp<u8>),
    /// A read served by the kernel's page cache.
    KernelRead(NodeId, BlockId),
    /// A two-block transaction starts: acquire both blocks, add one to each, release.
    Txn(NodeId),
    /// The transaction goes on to acquire its second block.
    TxnNext(NodeId),
    /// The cluster removes the client (a committed membership change: a new epoch). The
    /// manager and storage learn it at once; the client does not (it stalled, or is cut
    /// off) and goes on with what it holds.
    Remove(NodeId),
}

/// The model's bounds and variant.
#[derive(Clone, Debug)]
pub(crate) struct CoherenceModel {
    pub(crate) clients: usize,
    pub(crate) blocks: usize,
    pub(crate) ops_per_client: u8,
    /// Per (from, to) FIFO delivery instead of any order.
    pub(crate) ordered: bool,
    pub(crate) config: ProtocolConfig,
    /// Blocks a client caches before a miss evicts one (0: unbounded).
    pub(crate) capacity: usize,
    /// Clients also do atomic updates (`UserOp::Update(1)`: add one to the block): the
    /// content before each update must be the last completed write or update.
    pub(crate) updates: bool,
    /// Two-block transactions instead of plain writes (blocks 0 and 1): 0 none, 1 every
    /// client acquires in block order, 2 client 0 acquires in the reverse order.
    pub(crate) txns: u8,
    /// How many clients the cluster may remove (0: membership never changes).
    pub(crate) removals: u8,
    /// Whether storage fences write-backs by epoch (`false`: the mutant without the check).
    pub(crate) storage_fenced: bool,
}

impl CoherenceModel {
    pub(crate) fn placement() -> Placement {
        Placement {
            managers: vec![MANAGER],
            storages: vec![STORAGE],
            index_shift: None,
        }
    }

    fn client_ids(&self) -> Vec<NodeId> {
        (0..self.clients as NodeId).collect()
    }

    /// Put a freshly sent envelope on the network.
    fn send(&self, w: &mut World, e: Envelope) {
        w.net.push(e);
        self.canonical_net(&mut w.net);
    }

    fn canonical_net(&self, net: &mut [Envelope]) {
        if self.ordered {
            net.sort_by_key(|e| (e.from, e.to));
        } else {
            net.sort();
        }
    }

    fn deliverable(&self, w: &World, i: usize) -> bool {
        !self.ordered
            || !w.net[..i]
                .iter()
                .any(|e| e.from == w.net[i].from && e.to == w.net[i].to)
    }

    /// The epoch `from` stamps its messages with: clients are never told of a change (a
    /// removed one is stalled or cut off; the others need not know to be served).
    fn epoch_of(w: &World, from: Addr) -> Epoch {
        match from {
            Addr::Manager | Addr::Storage => w.fence.epoch,
            Addr::Client(_) | Addr::Kernel(_) => 0,
        }
    }

    /// The manager's message to a removed client is not sent: it answers for it as for a
    /// dead peer (`ManagerShard::undeliverable`).
    fn bounce(&self, w: &mut World, to: NodeId, msg: Msg<u8>) {
        let mut outs = Vec::new();
        let r = w.manager.undeliverable(to, msg, &mut outs);
        self.apply(w, Addr::Manager, outs);
        note(w, r);
    }

    /// Execute a state machine's outputs from `from`.
    fn apply(&self, w: &mut World, from: Addr, outs: Vec<Output<u8>>) {
        for o in outs {
            match o {
                Output::Send { to, msg } => {
                    if from == Addr::Manager && msg.role() == Role::Client && w.removed[to as usize]
                    {
                        self.bounce(w, to, msg);
                        continue;
                    }
                    let to = match msg.role() {
                        Role::Manager => Addr::Manager,
                        Role::Storage => Addr::Storage,
                        Role::Client => Addr::Client(to),
                    };
                    let epoch = Self::epoch_of(w, from);
                    self.send(
                        w,
                        Envelope {
                            from,
                            to,
                            payload: Payload::Proto(msg),
                            epoch,
                        },
                    );
                }
                Output::InvalidateKernel { block } => {
                    let Addr::Client(c) = from else {
                        unreachable!("only clients invalidate")
                    };
                    self.send(
                        w,
                        Envelope {
                            from,
                            to: Addr::Kernel(c),
                            payload: Payload::Invalidate(block),
                            epoch: 0,
                        },
                    );
                }
                Output::Complete { op, block, outcome } => {
                    let Addr::Client(c) = from else {
                        unreachable!("only clients complete")
                    };
                    self.complete(w, c, op, block, outcome);
                }
            }
        }
    }

    /// The cluster removes client `c` in a new epoch: the manager and storage fence it, the
    /// manager answers for it what it would have waited for (`peer_removed`, and the
    /// bounce of its messages still on the way), and what `c` alone held dirty is lost:
    /// the last write of those blocks is what storage holds (an un-fsynced write of a
    /// removed node is lost, as a crashed node's; an fsynced one is in storage).
    fn remove(&self, w: &mut World, c: NodeId) {
        w.removed[c as usize] = true;
        let epoch = w.fence.epoch + 1;
        w.fence.removed(c, epoch);
        for block in 0..w.last_write.len() as BlockId {
            let held = w.clients[c as usize].blocks.get(&block).is_some_and(|b| {
                (b.data.is_some() && matches!(b.mode, Mode::Private { .. })) || b.step.is_some()
            });
            if held {
                w.last_write[block as usize] =
                    w.storage.store.blocks.get(&block).copied().unwrap_or(0);
            }
        }
        let mut to_c = Vec::new();
        w.net.retain(|e| {
            let bounced = e.from == Addr::Manager && e.to == Addr::Client(c);
            if bounced {
                to_c.push(e.payload.clone());
            }
            !bounced
        });
        for p in to_c {
            if let Payload::Proto(m) = p {
                self.bounce(w, c, m);
            }
        }
        let mut outs = Vec::new();
        let r = w.manager.peer_removed(c, &mut outs);
        self.apply(w, Addr::Manager, outs);
        note(w, r);
    }

    /// The order client `c`'s transactions acquire blocks 0 and 1 in.
    fn txn_order(&self, c: NodeId) -> (BlockId, BlockId) {
        if self.txns == 2 && c == 0 {
            (1, 0)
        } else {
            (0, 1)
        }
    }

    fn complete(&self, w: &mut World, c: NodeId, op: u64, block: BlockId, outcome: Outcome<u8>) {
        if w.removed[c as usize] {
            // A removed client's results are its own (it is fenced: what it writes is lost,
            // as a crashed node's), and its transaction is over.
            w.txn[c as usize] = 0;
            return;
        }
        match outcome {
            Outcome::Read(v) => {
                check_read(w, c, block, v);
                w.kernels[c as usize].insert(block, v);
            }
            Outcome::Written => {
                let v = op as u8;
                w.last_write[block as usize] = v;
                w.kernels[c as usize].insert(block, v);
            }
            Outcome::Updated(old) => {
                check_read(w, c, block, old);
                let v = old.wrapping_add(1);
                w.last_write[block as usize] = v;
                w.kernels[c as usize].insert(block, v);
            }
            Outcome::Acquired(v) => {
                check_read(w, c, block, v);
                let (first, second) = self.txn_order(c);
                let mut outs = Vec::new();
                let mut r = Ok(());
                if w.txn[c as usize] == 1 {
                    w.txn[c as usize] = 2;
                } else {
                    // Both held: they must agree, then both move on together.
                    let cl = &w.clients[c as usize];
                    let val = |b: BlockId| cl.blocks.get(&b).and_then(|x| x.data).unwrap_or(0);
                    let (a, b) = (val(first), val(second));
                    if a != b && w.violation.is_none() {
                        w.violation = Some(Violation::Torn {
                            client: c,
                            first: a,
                            second: b,
                        });
                    }
                    w.txn[c as usize] = 0;
                    for (blk, op) in [
                        (first, UserOp::Update(1)),
                        (second, UserOp::Update(1)),
                        (first, UserOp::Release),
                        (second, UserOp::Release),
                    ] {
                        if r.is_ok() {
                            r = w.clients[c as usize].start(0, blk, op, &mut outs);
                        }
                    }
                }
                self.apply(w, Addr::Client(c), outs);
                note(w, r);
            }
            Outcome::Released => {}
            Outcome::Evicted | Outcome::Flushed => {}
        }
    }

    /// Forget the counters: they are for drivers, not part of the protocol's state.
    fn normalise(w: &mut World) {
        for c in &mut w.clients {
            c.counters = Default::default();
        }
        w.manager.counters = Default::default();
    }

    /// Whether anything is waiting: a user operation, a local step, a deferred or held
    /// message, a write at the manager or a queued request.
    /// A removed client's waits are not counted: it is fenced.
    pub(crate) fn pending(w: &World) -> bool {
        let live = |i: usize| !w.removed[i];
        w.clients.iter().enumerate().any(|(i, c)| {
            live(i)
                && (c
                    .blocks
                    .values()
                    .any(|b| b.op.is_some() || b.step.is_some() || !b.deferred.is_empty())
                    || c.channels.values().any(|ch| !ch.held.is_empty()))
        }) || w.txn.iter().enumerate().any(|(i, t)| live(i) && *t != 0)
            || w.manager
                .blocks
                .values()
                .any(|b| b.writing.is_some() || !b.queue.is_empty())
    }

    /// The canonical member of the state's symmetry class: the least renaming of clients.
    pub(crate) fn representative(w: &World) -> World {
        let n = w.clients.len();
        let mut best: Option<World> = None;
        let mut perm: Vec<usize> = (0..n).collect();
        permutations(&mut perm, 0, &mut |p| {
            let r = rename(w, p);
            if best.as_ref().is_none_or(|b| r < *b) {
                best = Some(r);
            }
        });
        best.unwrap_or_else(|| w.clone())
    }
}

/// A state machine's refusal of an input is a violation (the first one is kept).
fn note(w: &mut World, r: Result<(), xfs_node::coherence::ProtocolError>) {
    if let Err(e) = r {
        w.violation
            .get_or_insert(Violation::Protocol(e.to_string()));
    }
}

fn check_read(w: &mut World, c: NodeId, block: BlockId, v: u8) {
    let want = w.last_write[block as usize];
    if v != want && w.violation.is_none() {
        w.violation = Some(Violation::StaleRead {
            client: c,
            block,
            got: v,
            want,
        });
    }
}

fn permutations(p: &mut Vec<usize>, k: usize, f: &mut impl FnMut(&[usize])) {
    if k == p.len() {
        f(p);
        return;
    }
    for i in k..p.len() {
        p.swap(k, i);
        permutations(p, k + 1, f);
        p.swap(k, i);
    }
}

/// `w` with client i renamed `p[i]`.
fn rename(w: &World, p: &[usize]) -> World {
    let f = |id: NodeId| -> NodeId {
        if (id as usize) < p.len() {
            p[id as usize] as NodeId
        } else {
            id
        }
    };
    let fa = |a: Addr| match a {
        Addr::Client(c) => Addr::Client(f(c)),
        Addr::Kernel(c) => Addr::Kernel(f(c)),
        other => other,
    };
    let n = w.clients.len();
    let mut clients = w.clients.clone();
    let mut kernels = w.kernels.clone();
    let mut budget = w.budget.clone();
    let mut txn = w.txn.clone();
    let mut removed = w.removed.clone();
    for i in 0..n {
        removed[p[i]] = w.removed[i];
        clients[p[i]] = w.clients[i].renamed(&f);
        kernels[p[i]] = w.kernels[i].clone();
        budget[p[i]] = w.budget[i];
        txn[p[i]] = w.txn[i];
    }
    let mut net: Vec<Envelope> = w
        .net
        .iter()
        .map(|e| Envelope {
            from: fa(e.from),
            to: fa(e.to),
            payload: match &e.payload {
                Payload::Proto(m) => Payload::Proto(m.renamed(&f)),
                other => other.clone(),
            },
            epoch: e.epoch,
        })
        .collect();
    // Same canonical order as `canonical_net` (ordered nets: stable within a pair).
    if w.ordered {
        net.sort_by_key(|e| (e.from, e.to));
    } else {
        net.sort();
    }
    World {
        manager: w.manager.renamed(&f),
        storage: w.storage.clone(),
        clients,
        kernels,
        budget,
        net,
        last_write: w.last_write.clone(),
        next_value: w.next_value,
        violation: w.violation.clone(),
        ordered: w.ordered,
        txn,
        fence: Fence {
            epoch: w.fence.epoch,
            nodes: w.fence.nodes.iter().map(|(n, m)| (f(*n), *m)).collect(),
        },
        removed,
    }
}

impl Model for CoherenceModel {
    type State = World;
    type Action = Action;

    fn init_states(&self) -> Vec<World> {
        let ids = self.client_ids();
        vec![World {
            manager: ManagerShard::new(MANAGER, self.config, Self::placement(), ids.clone()),
            storage: StorageShard::default(),
            clients: ids
                .iter()
                .map(|c| ClientShard::new(*c, self.config, Self::placement(), self.capacity))
                .collect(),
            kernels: vec![BTreeMap::new(); self.clients],
            budget: vec![self.ops_per_client; self.clients],
            net: Vec::new(),
            last_write: vec![0; self.blocks],
            next_value: 1,
            violation: None,
            ordered: self.ordered,
            txn: vec![0; self.clients],
            fence: Fence::default(),
            removed: vec![false; self.clients],
        }]
    }

    fn actions(&self, w: &World, actions: &mut Vec<Action>) {
        if w.violation.is_some() {
            return;
        }
        for i in 0..w.net.len() {
            if self.deliverable(w, i) {
                actions.push(Action::Deliver(i));
            }
        }
        let removed = w.removed.iter().filter(|r| **r).count();
        if removed < self.removals as usize && removed + 1 < self.clients {
            for c in 0..self.clients {
                if !w.removed[c] {
                    actions.push(Action::Remove(c as NodeId));
                }
            }
        }
        for c in 0..self.clients {
            // A transaction under way goes on whatever the budget.
            if w.txn[c] == 2 && w.clients[c].is_idle(self.txn_order(c as NodeId).1) {
                actions.push(Action::TxnNext(c as NodeId));
            }
            if w.budget[c] == 0 {
                continue;
            }
            let client = &w.clients[c];
            if self.txns > 0 && w.txn[c] == 0 && client.is_idle(0) && client.is_idle(1) {
                actions.push(Action::Txn(c as NodeId));
            }
            if w.txn[c] != 0 {
                // A transaction is one thread of the client: nothing else starts meanwhile
                // (a real driver queues operations per block; the model starts them).
                continue;
            }
            for block in 0..self.blocks as BlockId {
                if w.kernels[c].contains_key(&block) {
                    actions.push(Action::KernelRead(c as NodeId, block));
                }
                if !client.is_idle(block) {
                    continue;
                }
                let b = client.blocks.get(&block);
                let cached = b.is_some_and(|b| b.data.is_some());
                let dirty =
                    b.is_some_and(|b| b.data.is_some() && b.mode == Mode::Private { dirty: true });
                if !w.kernels[c].contains_key(&block) {
                    actions.push(Action::Op(c as NodeId, block, UserOp::Read));
                }
                if self.txns == 0 {
                    actions.push(Action::Op(c as NodeId, block, UserOp::Write(w.next_value)));
                }
                if self.updates {
                    actions.push(Action::Op(c as NodeId, block, UserOp::Update(1)));
                }
                let pinned = b.is_some_and(|b| b.pinned);
                if cached && !pinned {
                    actions.push(Action::Op(c as NodeId, block, UserOp::Evict));
                }
                if dirty {
                    actions.push(Action::Op(c as NodeId, block, UserOp::Flush));
                }
            }
        }
    }

    fn next_state(&self, last: &World, action: Action) -> Option<World> {
        let mut w = last.clone();
        let mut outs = Vec::new();
        match action {
            Action::Deliver(i) => {
                let e = w.net.remove(i);
                let result = match (e.to, e.payload) {
                    (Addr::Manager, Payload::Proto(m)) => {
                        let Addr::Client(from) = e.from else {
                            unreachable!("clients ask")
                        };
                        if w.fence.admit(from, e.epoch) != Admit::Yes {
                            // Fenced: dropped (a node counts it).
                            Self::normalise(&mut w);
                            return Some(w);
                        }
                        let r = w.manager.receive(from, m, &mut outs);
                        self.apply(&mut w, Addr::Manager, std::mem::take(&mut outs));
                        r
                    }
                    (Addr::Storage, Payload::Proto(m)) => {
                        let from = match e.from {
                            Addr::Client(c) => c,
                            _ => MANAGER,
                        };
                        if self.storage_fenced && w.fence.admit(from, e.epoch) != Admit::Yes {
                            Self::normalise(&mut w);
                            return Some(w);
                        }
                        if let (Addr::Client(c), Msg::WriteBack { block, data }) = (e.from, &m) {
                            if w.removed[c as usize] && w.violation.is_none() {
                                w.violation = Some(Violation::FencedWriteTaken {
                                    client: c,
                                    block: *block,
                                    value: *data,
                                });
                            }
                        }
                        let r = w.storage.receive(from, m, &mut outs);
                        self.apply(&mut w, Addr::Storage, std::mem::take(&mut outs));
                        r
                    }
                    (Addr::Client(c), Payload::Proto(m)) => {
                        let from = match e.from {
                            Addr::Client(p) => p,
                            Addr::Storage => STORAGE,
                            _ => MANAGER,
                        };
                        let r = w.clients[c as usize].receive(from, m, &mut outs);
                        self.apply(&mut w, Addr::Client(c), std::mem::take(&mut outs));
                        r
                    }
                    (Addr::Kernel(c), Payload::Invalidate(block)) => {
                        w.kernels[c as usize].remove(&block);
                        self.send(
                            &mut w,
                            Envelope {
                                from: Addr::Kernel(c),
                                to: Addr::Client(c),
                                payload: Payload::Invalidated(block),
                                epoch: 0,
                            },
                        );
                        Ok(())
                    }
                    (Addr::Client(c), Payload::Invalidated(block)) => {
                        let r = w.clients[c as usize].kernel_invalidated(block, &mut outs);
                        self.apply(&mut w, Addr::Client(c), std::mem::take(&mut outs));
                        r
                    }
                    (to, p) => unreachable!("{p:?} to {to:?}"),
                };
                note(&mut w, result);
            }
            Action::Op(c, block, op) => {
                w.budget[c as usize] -= 1;
                let id = match &op {
                    UserOp::Write(v) => {
                        w.next_value += 1;
                        *v as u64
                    }
                    _ => 0,
                };
                let r = w.clients[c as usize].start(id, block, op, &mut outs);
                self.apply(&mut w, Addr::Client(c), outs);
                note(&mut w, r);
            }
            Action::Txn(c) => {
                w.budget[c as usize] -= 1;
                w.txn[c as usize] = 1;
                let (first, _) = self.txn_order(c);
                let r = w.clients[c as usize].start(0, first, UserOp::Acquire, &mut outs);
                self.apply(&mut w, Addr::Client(c), outs);
                note(&mut w, r);
            }
            Action::TxnNext(c) => {
                w.txn[c as usize] = 3;
                let (_, second) = self.txn_order(c);
                let r = w.clients[c as usize].start(0, second, UserOp::Acquire, &mut outs);
                self.apply(&mut w, Addr::Client(c), outs);
                note(&mut w, r);
            }
            Action::KernelRead(c, block) => {
                w.budget[c as usize] -= 1;
                let v = w.kernels[c as usize][&block];
                if !w.removed[c as usize] {
                    check_read(&mut w, c, block, v);
                }
            }
            Action::Remove(c) => self.remove(&mut w, c),
        }
        Self::normalise(&mut w);
        Some(w)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        properties()
    }
}

/// What a model of the protocol is built on: [`CoherenceModel`] itself, or it with other
/// bounds ([`Budgeted`]).
pub(crate) trait Base {
    fn base(&self) -> &CoherenceModel;
}

impl Base for CoherenceModel {
    fn base(&self) -> &CoherenceModel {
        self
    }
}

/// [`CoherenceModel`] with an operation budget of its own per client (`budgets[i]` for
/// client i, instead of `ops_per_client` each): the bounds between one and two operations
/// each (three clients with two each can be far too many states to exhaust).
#[derive(Clone, Debug)]
pub(crate) struct Budgeted {
    pub(crate) model: CoherenceModel,
    pub(crate) budgets: Vec<u8>,
}

impl Base for Budgeted {
    fn base(&self) -> &CoherenceModel {
        &self.model
    }
}

impl Model for Budgeted {
    type State = World;
    type Action = Action;

    fn init_states(&self) -> Vec<World> {
        assert_eq!(
            self.budgets.len(),
            self.model.clients,
            "one budget per client"
        );
        let mut states = self.model.init_states();
        for w in &mut states {
            w.budget = self.budgets.clone();
        }
        states
    }

    fn actions(&self, w: &World, actions: &mut Vec<Action>) {
        self.model.actions(w, actions)
    }

    fn next_state(&self, last: &World, action: Action) -> Option<World> {
        self.model.next_state(last, action)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        properties()
    }
}

/// The properties every model of the protocol is checked for.
fn properties<M: Model<State = World, Action = Action> + Base>() -> Vec<Property<M>> {
    vec![
        Property::always("no violation", |_, w: &World| w.violation.is_none()),
        Property::always("one writer or many readers", |_, w: &World| {
            one_writer_or_readers(w)
        }),
        Property::always("no deadlock", |m: &M, w: &World| {
            let mut a = Vec::new();
            m.base().actions(w, &mut a);
            !a.is_empty() || !CoherenceModel::pending(w) || w.violation.is_some()
        }),
        Property::sometimes("a read served by a peer", |_, w: &World| {
            w.net.iter().any(|e| {
                matches!(e.from, Addr::Client(_))
                    && matches!(e.payload, Payload::Proto(Msg::Data { .. }))
            })
        }),
        Property::sometimes("txn: a revoke waits for a release", |_, w: &World| {
            w.clients.iter().any(|c| {
                c.blocks
                    .values()
                    .any(|b| b.pinned && b.deferred.iter().any(|m| matches!(m, Msg::Revoke { .. })))
            })
        }),
        Property::sometimes(
            "fence: a removed client's write-back on its way",
            |_, w: &World| {
                w.net.iter().any(|e| {
                    matches!(e.from, Addr::Client(c) if w.removed[c as usize])
                        && matches!(e.payload, Payload::Proto(Msg::WriteBack { .. }))
                })
            },
        ),
        Property::sometimes("fence: a survivor reads after a removal", |_, w: &World| {
            w.removed.iter().any(|r| *r)
                && w.net.iter().any(|e| {
                    matches!(e.to, Addr::Client(c) if !w.removed[c as usize])
                        && matches!(e.payload, Payload::Proto(Msg::Data { .. }))
                })
        }),
        Property::sometimes("a revoke", |_, w: &World| {
            w.net
                .iter()
                .any(|e| matches!(e.payload, Payload::Proto(Msg::Revoke { .. })))
        }),
        Property::sometimes("an eviction forwarded", |_, w: &World| {
            w.net
                .iter()
                .any(|e| matches!(e.payload, Payload::Proto(Msg::Handoff { .. })))
        }),
        Property::sometimes("a write-back before a forward", |_, w: &World| {
            w.clients.iter().any(|c| {
                c.blocks.values().any(|b| {
                    matches!(
                        b.step,
                        Some(xfs_node::coherence::Step::WriteBack(
                            xfs_node::coherence::AfterWriteBack::Forward(..)
                        ))
                    )
                })
            })
        }),
        Property::sometimes("a revoke overtakes a forward", |_, w: &World| {
            revoke_overtook_forward(w)
        }),
        Property::sometimes("a peer-served read races a revoke", |_, w: &World| {
            peer_read_races_revoke(w)
        }),
    ]
}

/// Some client holds an early revoke while a message to it that `earlier` matches is still
/// in flight.
fn revoke_held_while(w: &World, earlier: impl Fn(&Envelope) -> bool) -> bool {
    w.clients.iter().any(|c| {
        c.channels
            .values()
            .any(|ch| ch.held.values().any(|m| matches!(m, Msg::Revoke { .. })))
            && w.net
                .iter()
                .any(|e| e.to == Addr::Client(c.me) && earlier(e))
    })
}

/// A client holds an early revoke while the forward before it is still in flight (the
/// race of the xFS paper's Figure 2, handled by the sequence numbers).
pub(crate) fn revoke_overtook_forward(w: &World) -> bool {
    revoke_held_while(w, |e| {
        matches!(e.payload, Payload::Proto(Msg::Forward { .. }))
    })
}

/// A client holds an early revoke while the data a peer is sending it (the reply its read
/// was forwarded for) is still in flight.
pub(crate) fn peer_read_races_revoke(w: &World) -> bool {
    revoke_held_while(w, |e| {
        matches!(e.from, Addr::Client(_)) && matches!(e.payload, Payload::Proto(Msg::Data { .. }))
    })
}

/// At most one client holds a block private, and then nobody else (client or kernel) holds
/// a copy of it. A copy kept by a client whose eviction request is sent is not a reader: user
/// operations wait for the eviction, and the manager forwards nothing to it any more (it only
/// serves the forwards the manager sent before it took the request).
pub(crate) fn one_writer_or_readers(w: &World) -> bool {
    // A copy whose eviction was asked for (`EvictReq` sent: written back, the kernel's
    // pages dropped, the block busy with the eviction) is dead: the client serves nothing
    // from it and the manager no longer counts it, whatever its mode until `EvictGrant`.
    // A removed client is fenced: whatever it holds, the cluster no longer counts it.
    let live = |i: usize, block: &BlockId, private: bool| {
        !w.removed[i]
            && w.clients[i].blocks.get(block).is_some_and(|b| {
                b.data.is_some()
                    && (!private || matches!(b.mode, Mode::Private { .. }))
                    && !matches!(
                        b.op,
                        Some(xfs_node::coherence::PendingOp::Evict { asked: true, .. })
                    )
            })
    };
    let reader = |i: usize, block: &BlockId| live(i, block, false);
    let blocks: Vec<BlockId> = (0..w.last_write.len() as BlockId).collect();
    blocks.iter().all(|block| {
        let private: Vec<usize> = (0..w.clients.len())
            .filter(|i| live(*i, block, true))
            .collect();
        match private.as_slice() {
            [] => true,
            [p] => (0..w.clients.len())
                .filter(|i| i != p)
                .all(|i| w.removed[i] || (!reader(i, block) && !w.kernels[i].contains_key(block))),
            _ => false,
        }
    })
}
