//! Deterministic cluster simulation: several nodes x several shards, each shard a real
//! [`Shard`] loop on the simulated AM transport (`am_core::sim`, virtual time, delay, jitter,
//! reordering, loss and duplication), a random read/write/evict/flush workload from a seed,
//! and a checker that compares every read with a linearizable reference. A failure names
//! its seed; the same seed replays the same run.

use std::collections::BTreeMap;
use std::time::Duration;

use am_core::sim::{Faults, SimNet, SimTransport};
use am_core::{Config, Endpoint, Tag, Time};

use crate::coherence::BlockStore;
use crate::coherence::{
    BlockId, MemStore, NodeId, OpId, Outcome, Placement, ProtocolConfig, UserOp,
};
use crate::shard::{connect_all, shard_of, BlockData, Shard, ShardConfig};

/// A simulated shard: values are `u64`s (write k stores a value unique to it).
pub type SimShard = Shard<SimTransport, u64, MemStore<u64>>;

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Nodes; each is client, manager and storage server.
    pub nodes: usize,
    /// Shards per node.
    pub shards: usize,
    /// Distinct blocks the workload touches (few, for contention).
    pub blocks: u64,
    /// User operations in all.
    pub ops: usize,
    /// Operations in flight per node at most.
    pub outstanding: usize,
    /// Blocks cached per client shard before a miss evicts one.
    pub capacity: usize,
    /// N-chance forwarding limit.
    pub n_chance: u8,
    /// Network faults.
    pub faults: Faults,
    /// Virtual time after which a run that has not finished counts as stuck.
    pub time_limit: Duration,
    /// Give every node a kernel page cache: reads that hit it complete without the node;
    /// invalidations are external (as under FUSE) and finish after a random delay.
    pub kernel_cache: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            nodes: 3,
            shards: 2,
            blocks: 8,
            ops: 400,
            outstanding: 4,
            capacity: 2,
            n_chance: 2,
            faults: Faults {
                loss: 0.02,
                duplicate: 0.02,
                reorder: 0.2,
                delay: Duration::from_micros(10),
                jitter: Duration::from_micros(60),
                ..Faults::none()
            },
            time_limit: Duration::from_secs(30),
            kernel_cache: true,
        }
    }
}

/// One operation of the history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Operation id (for writes, also the value written).
    pub op: OpId,
    /// Node that ran it.
    pub node: NodeId,
    /// Block.
    pub block: BlockId,
    /// Read (with the value returned, once complete) or write.
    pub kind: EventKind,
    /// Logical time of invocation.
    pub invoked: u64,
    /// Logical time of completion.
    pub completed: Option<u64>,
}

/// What an operation did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A read, and what it returned.
    Read(Option<u64>),
    /// A write of this value.
    Write(u64),
    /// An eviction or flush (no effect on values).
    Other,
}

/// Totals of one run (sums over nodes and shards).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimTotals {
    /// Operations completed.
    pub completed: u64,
    /// Reads answered by a peer's cache.
    pub peer_reads: u64,
    /// Reads answered by storage.
    pub storage_reads: u64,
    /// Revokes handled by clients.
    pub revokes: u64,
    /// Manager messages that overtook an earlier one and were held for order (a revoke
    /// racing a forwarded reply, mostly).
    pub held_for_order: u64,
    /// Held messages that were revokes: a revoke racing a forward.
    pub revokes_racing_forwards: u64,
    /// N-chance handoffs sent.
    pub handoffs: u64,
    /// Evictions chosen by cache capacity.
    pub capacity_evictions: u64,
    /// Datagrams the simulated network delivered out of order.
    pub reordered: u64,
    /// Protocol messages handled.
    pub messages: u64,
    /// Protocol errors (must be 0).
    pub protocol_errors: u64,
    /// Forwards that found no copy at the holder (served from storage instead).
    pub forwards_failed: u64,
    /// Reads served by a node's kernel page cache.
    pub kernel_hits: u64,
    /// Kernel invalidations (revokes and evictions waited for them).
    pub kernel_invalidations: u64,
}

/// A failed run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimFailure {
    /// The seed that replays it.
    pub seed: u64,
    /// What went wrong.
    pub message: String,
}

impl std::fmt::Display for SimFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "seed {}: {}", self.seed, self.message)
    }
}

/// The outcome of a run that finished.
#[derive(Clone, Debug)]
pub struct SimRun {
    /// Totals.
    pub totals: SimTotals,
    /// Every operation.
    pub history: Vec<Event>,
}

/// A small deterministic generator (splitmix64).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded.
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5eed_c0de_1234_5678)
    }
    /// Next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        crate::coherence::mix(self.0)
    }
    /// Uniform below `n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// A simulated cluster.
pub struct Cluster {
    /// The network.
    pub net: SimNet,
    /// `shards[node][shard]`.
    pub shards: Vec<Vec<SimShard>>,
}

impl Cluster {
    /// Nodes `0..nodes`, each with `shards` shards, all connected.
    pub fn new(
        seed: u64,
        nodes: usize,
        shards: usize,
        faults: Faults,
        protocol: ProtocolConfig,
        capacity: usize,
    ) -> Cluster {
        let ids: Vec<NodeId> = (0..nodes as NodeId).collect();
        Self::with_roles(
            seed, &ids, &ids, &ids, &ids, shards, faults, protocol, capacity,
        )
    }

    /// Nodes `ids`, of which `managers` manage, `storages` store and `clients` are the
    /// manager's candidates for N-chance handoffs.
    #[allow(clippy::too_many_arguments)]
    pub fn with_roles(
        seed: u64,
        ids: &[NodeId],
        clients: &[NodeId],
        managers: &[NodeId],
        storages: &[NodeId],
        shards: usize,
        faults: Faults,
        protocol: ProtocolConfig,
        capacity: usize,
    ) -> Cluster {
        let net = SimNet::new(seed, faults);
        let placement = Placement {
            managers: managers.to_vec(),
            storages: storages.to_vec(),
            index_shift: None,
        };
        let mut all: Vec<Vec<SimShard>> = ids
            .iter()
            .map(|id| {
                (0..shards)
                    .map(|s| {
                        let ep = Endpoint::new(
                            net.transport(),
                            Config {
                                tag: Tag(0xc0e0_0000 + ((*id as u64) << 8) + s as u64),
                                ..Config::default()
                            },
                        );
                        let cfg = ShardConfig {
                            node: *id,
                            protocol,
                            placement: placement.clone(),
                            clients: clients.to_vec(),
                            capacity,
                        };
                        // A fresh endpoint has every handler slot free.
                        Shard::new(ep, cfg, MemStore::default())
                            .unwrap_or_else(|e| unreachable!("handler slot 1 is free: {e}"))
                    })
                    .collect()
            })
            .collect();
        connect_all(&mut all)
            .unwrap_or_else(|e| unreachable!("fewer nodes than translations: {e}"));
        Cluster { net, shards: all }
    }

    /// The shard of `node` that owns `block`.
    pub fn shard_mut(&mut self, node: usize, block: BlockId) -> &mut SimShard {
        let n = self.shards[node].len();
        &mut self.shards[node][shard_of(block, n)]
    }

    /// Step every shard once; returns the work done.
    pub fn step(&mut self) -> usize {
        step_shards(&mut self.shards)
    }

    /// Advance virtual time to the next delivery or timer; false if nothing is scheduled.
    pub fn advance(&mut self) -> bool {
        advance_time(&self.net, &self.shards)
    }

    /// Sum of the shards' and the network's counters.
    /// Step and advance time until nothing is left to do (at most `rounds` rounds).
    pub fn settle(&mut self, rounds: usize) {
        for _ in 0..rounds {
            if self.step() == 0 && !self.advance() {
                break;
            }
        }
    }

    /// The cluster's totals.
    pub fn totals(&self) -> SimTotals {
        let mut t = SimTotals::default();
        for node in &self.shards {
            for s in node {
                let c = s.client.counters;
                let sc = s.counters();
                t.completed += sc.ops_completed;
                t.peer_reads += c.peer_reads;
                t.storage_reads += c.storage_reads;
                t.revokes += c.revokes;
                t.held_for_order += c.reordered;
                t.revokes_racing_forwards += c.revokes_held;
                t.handoffs += c.handoffs_sent;
                t.forwards_failed += c.forwards_failed;
                t.capacity_evictions += c.capacity_evictions;
                t.messages += sc.messages;
                t.protocol_errors += sc.protocol_errors;
            }
        }
        t.reordered = self.net.counters().reordered;
        t
    }
}

/// Step every shard of a simulated cluster (`shards[node][shard]`) once; the work done.
pub fn step_shards<D: BlockData, S: BlockStore<D>>(
    shards: &mut [Vec<Shard<SimTransport, D, S>>],
) -> usize {
    let mut work = 0;
    for node in shards.iter_mut() {
        for s in node.iter_mut() {
            // The simulated transport has no failure mode that poll reports.
            work += s.step(256).unwrap_or(0);
        }
    }
    work
}

/// Advance `net`'s virtual time to its next delivery or the shards' next endpoint timer;
/// false if nothing is scheduled.
pub fn advance_time<D: BlockData, S: BlockStore<D>>(
    net: &SimNet,
    shards: &[Vec<Shard<SimTransport, D, S>>],
) -> bool {
    let mut next = net.next_delivery();
    for node in shards {
        for s in node {
            if let Some(t) = s.endpoint().core().poll_timeout() {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        }
    }
    let now = net.now();
    match next {
        Some(t) => {
            net.advance_to(if t > now { t } else { Time(now.0 + 1) });
            true
        }
        None => false,
    }
}

/// Run one seeded simulation and check its history.
pub fn run(seed: u64, cfg: &SimConfig) -> Result<SimRun, SimFailure> {
    let fail = |message: String| SimFailure { seed, message };
    let protocol = ProtocolConfig {
        sequenced: true,
        n_chance: cfg.n_chance,
        // Both handoff policies, by seed.
        hand_off_written: seed.is_multiple_of(2),
    };
    let mut cluster = Cluster::new(
        seed,
        cfg.nodes,
        cfg.shards,
        cfg.faults.clone(),
        protocol,
        cfg.capacity,
    );
    let mut rng = Rng::new(seed);
    let mut history: Vec<Event> = Vec::new();
    let mut index: BTreeMap<OpId, usize> = BTreeMap::new();
    let mut in_flight = vec![0usize; cfg.nodes];
    let mut clock = 0u64;
    // The kernels: per node, cached pages; invalidations due at a later turn.
    let mut kernels: Vec<BTreeMap<BlockId, u64>> = vec![BTreeMap::new(); cfg.nodes];
    let mut invalidations: Vec<(u64, usize, BlockId)> = Vec::new();
    let (mut kernel_hits, mut kernel_invalidations, mut turn) = (0u64, 0u64, 0u64);
    for node in cluster.shards.iter_mut() {
        for s in node.iter_mut() {
            s.external_kernel = cfg.kernel_cache;
        }
    }
    let deadline = Time(cluster.net.now().0 + cfg.time_limit.as_nanos() as u64);
    while history.len() < cfg.ops || in_flight.iter().any(|n| *n > 0) || !invalidations.is_empty() {
        turn += 1;
        // Submit a few operations at random moments.
        if history.len() < cfg.ops && rng.below(3) == 0 {
            let node = rng.below(cfg.nodes as u64) as usize;
            if in_flight[node] < cfg.outstanding {
                let block = rng.below(cfg.blocks);
                let op = history.len() as OpId + 1;
                let (user, kind) = match rng.below(20) {
                    0..=9 => (UserOp::Read, EventKind::Read(None)),
                    10..=15 => (UserOp::Write(op), EventKind::Write(op)),
                    16..=18 => (UserOp::Evict, EventKind::Other),
                    _ => (UserOp::Flush, EventKind::Other),
                };
                clock += 1;
                index.insert(op, history.len());
                let hit = match user {
                    UserOp::Read => kernels[node].get(&block).copied(),
                    _ => None,
                };
                history.push(Event {
                    op,
                    node: node as NodeId,
                    block,
                    kind: if hit.is_some() {
                        EventKind::Read(hit)
                    } else {
                        kind
                    },
                    invoked: clock,
                    completed: hit.map(|_| clock),
                });
                if hit.is_some() {
                    kernel_hits += 1;
                } else {
                    in_flight[node] += 1;
                    cluster.shard_mut(node, block).submit(op, block, user);
                }
            }
        }
        let mut work = cluster.step();
        for (node, shards) in cluster.shards.iter_mut().enumerate() {
            for s in shards.iter_mut() {
                // Completions reach the kernel before the invalidations asked after them.
                for c in s.take_completions() {
                    let Some(i) = index.get(&c.op).copied() else {
                        return Err(fail(format!("completion of unknown op {}", c.op)));
                    };
                    clock += 1;
                    let e = &mut history[i];
                    e.completed = Some(clock);
                    match (&mut e.kind, &c.outcome) {
                        (EventKind::Read(v), Outcome::Read(got)) => {
                            *v = Some(*got);
                            kernels[node].insert(c.block, *got);
                        }
                        (EventKind::Write(v), Outcome::Written) => {
                            kernels[node].insert(c.block, *v);
                        }
                        _ => {}
                    }
                    in_flight[node] -= 1;
                }
                for block in s.take_kernel_requests() {
                    invalidations.push((turn + rng.below(30), node, block));
                }
                if let Some(err) = s.last_error() {
                    return Err(fail(format!("node {node}: protocol error: {err}")));
                }
            }
        }
        let mut i = 0;
        while i < invalidations.len() {
            let (due, node, block) = invalidations[i];
            if due <= turn {
                invalidations.swap_remove(i);
                kernels[node].remove(&block);
                kernel_invalidations += 1;
                cluster.shard_mut(node, block).kernel_done(block);
                work += 1;
            } else {
                i += 1;
            }
        }
        if !invalidations.is_empty() {
            work += 1;
        }
        if work == 0 && !cluster.advance() && history.len() >= cfg.ops {
            let stuck: Vec<_> = history.iter().filter(|e| e.completed.is_none()).collect();
            return Err(fail(format!(
                "nothing scheduled but {} operations wait: {stuck:?}",
                stuck.len()
            )));
        }
        if cluster.net.now() > deadline {
            let stuck = history.iter().filter(|e| e.completed.is_none()).count();
            return Err(fail(format!(
                "{stuck} operations not done after {:?} of virtual time",
                cfg.time_limit
            )));
        }
    }
    check_linearizable(&history).map_err(fail)?;
    let mut totals = cluster.totals();
    totals.kernel_hits = kernel_hits;
    totals.kernel_invalidations = kernel_invalidations;
    totals.completed += kernel_hits;
    Ok(SimRun { totals, history })
}

/// Check a history of single-block registers with unique write values: every read returns
/// the initial value (0) or a written value, from a write that began before the read ended
/// and that no other write had wholly overwritten before the read began; and per block, reads
/// that do not overlap never go back in time. The error names the offending read.
pub fn check_linearizable(history: &[Event]) -> Result<(), String> {
    let mut by_block: BTreeMap<BlockId, Vec<&Event>> = BTreeMap::new();
    for e in history {
        by_block.entry(e.block).or_default().push(e);
    }
    for (block, events) in by_block {
        let writes: Vec<&Event> = events
            .iter()
            .copied()
            .filter(|e| matches!(e.kind, EventKind::Write(_)))
            .collect();
        let write_of = |v: u64| {
            writes
                .iter()
                .find(|w| w.kind == EventKind::Write(v))
                .copied()
        };
        // For monotonic reads: the write each completed read returned, by read time.
        let mut reads: Vec<(u64, u64, Option<&Event>)> = Vec::new();
        for r in &events {
            let (EventKind::Read(Some(v)), Some(r_done)) = (r.kind, r.completed) else {
                continue;
            };
            let source = if v == 0 { None } else { write_of(v) };
            if v != 0 && source.is_none() {
                return Err(format!(
                    "block {block}: read op {} returned {v}, which nobody wrote",
                    r.op
                ));
            }
            if let Some(w) = source {
                if w.invoked > r_done {
                    return Err(format!(
                        "block {block}: read op {} returned write op {} from the future",
                        r.op, w.op
                    ));
                }
            }
            // A write that began after the source finished and finished before the read began
            // overwrote it: the read is stale.
            let source_done = source.map_or(0, |w| w.completed.unwrap_or(u64::MAX));
            if let Some(newer) = writes.iter().find(|w| {
                Some(w.op) != source.map(|s| s.op)
                    && w.invoked > source_done
                    && w.completed.is_some_and(|c| c < r.invoked)
            }) {
                return Err(format!(
                    "block {block}: stale read: op {} (node {}) returned {v} but write op {} (value {}) had completed before it began",
                    r.op,
                    r.node,
                    newer.op,
                    newer.op
                ));
            }
            reads.push((r.invoked, r_done, source));
        }
        // Two reads, one after the other: the later must not return a write that the earlier
        // one's write had wholly overwritten... the simple form: not an older *completed* write
        // than one already observed when the later read began.
        for (i1, d1, s1) in &reads {
            for (i2, _, s2) in &reads {
                if d1 < i2 {
                    let (Some(a), b) = (s1, s2) else { continue };
                    let overwritten = match b {
                        None => true,
                        Some(b) => b.completed.is_some_and(|bc| bc < a.invoked),
                    };
                    if overwritten {
                        return Err(format!(
                            "block {block}: a read at {i2} returned a value older than write op {} that a read finished at {d1} had seen (first read began at {i1})",
                            a.op
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}
