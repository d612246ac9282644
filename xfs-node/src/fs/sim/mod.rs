//! Deterministic simulation of a whole cluster running the file system (DESIGN.md §5,
//! layer 3): N nodes x S shards, each shard a real [`Shard`] on the simulated AM transport
//! (loss, duplication, reordering, jitter), each node's storage work done by its real
//! [`LogActor`] on a real [`Log`], striped through the node's real store clients
//! (`RemoteStore`) over a simulated storage network to the real storage-server code
//! (`StorageServer`, over in-memory stores): [`StorageTier`]. Every node is a real
//! [`FsClient`].
//!
//! A seeded workload runs namespace and data operations, one at a time, from random nodes;
//! every result (value or errno) is compared with [`Reference`], an independent in-memory
//! model of one POSIX file system. Faults: the network's, one storage server lost for good
//! in the middle of the run, and a node crashed and restarted (its cache, manager state
//! and unsynced log are gone; it recovers its log from the servers; the other nodes forget
//! what they knew of it). After the crash the checker verifies that every fsynced byte is
//! there and that what the crashed node had not fsynced is either there or gone, block by
//! block, never anything else; then the reference adopts what survived.
//!
//! A failure names its seed: `XFS_FS_SIM_SEED=<seed> cargo test -p xfs-node --test fs_sim`.

mod crash_check;
mod mount;
mod reference;
mod run;
mod storage;

use crash_check::*;
pub use mount::*;
pub use reference::*;
pub use run::*;
pub use storage::*;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use am_core::sim::{Faults, SimNet, SimTransport};
use am_core::{Config, Endpoint, Tag};

use super::client::{Blocks, Errno, FsClient, ManagerMap, RenameMode, SetAttr, StatFs, XattrMode};
use super::layout::{Inode, Kind, BLOCK, INDEX_SHIFT};
use crate::coherence::{
    ActorStore, BlockId, NodeId, OpId, Outcome, Placement, ProtocolConfig, UserOp,
};
use crate::shard::run::StoreLink;
use crate::shard::{connect_all, shard_of, Shard, ShardConfig, StoreWork};
use crate::sim::Rng;
use crate::storage::fragment::{FragmentId, FragmentStore, MemFragmentStore, StoreError};
use crate::storage::log::{Log, StripeGroup};
use crate::storage::log_actor::{serve_batch, LogActor, ShardInbox, ACTOR_DONE_QUEUE};
use std::sync::mpsc::{self, Receiver};

/// An in-memory fragment store that can be switched off, for simulations of one log
/// (the whole-cluster simulation runs real storage servers: [`StorageTier`]).
pub struct SimServer {
    /// The store.
    pub store: MemFragmentStore,
    /// False once the server is lost: every call fails as a dead server's would.
    pub up: bool,
}

/// A handle on a [`SimServer`], as a log holds it.
#[derive(Clone)]
pub struct SimFrag(pub Arc<Mutex<SimServer>>);

impl SimFrag {
    fn with<R>(
        &self,
        f: impl FnOnce(&mut MemFragmentStore) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !s.up {
            return Err(lost());
        }
        f(&mut s.store)
    }
}

/// What a lost server's calls fail with (as a dead remote server's do).
fn lost() -> StoreError {
    StoreError::Io {
        path: "simulated storage server".into(),
        source: std::io::Error::new(std::io::ErrorKind::TimedOut, "lost"),
    }
}

impl FragmentStore for SimFrag {
    fn fragment_bytes(&self) -> usize {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .store
            .fragment_bytes()
    }
    fn free_slots(&mut self) -> Result<usize, StoreError> {
        self.with(|s| s.free_slots())
    }
    fn write(&mut self, fragments: &[(FragmentId, &[u8])]) -> Result<(), StoreError> {
        self.with(|s| s.write(fragments))
    }
    fn sync(&mut self) -> Result<(), StoreError> {
        self.with(|s| s.sync())
    }
    fn read(&mut self, ids: &[FragmentId]) -> Vec<Result<Vec<u8>, StoreError>> {
        match self.with(|s| Ok(s.read(ids))) {
            Ok(r) => r,
            Err(_) => ids.iter().map(|_| Err(lost())).collect(),
        }
    }
    fn delete(&mut self, ids: &[FragmentId]) -> Result<(), StoreError> {
        self.with(|s| s.delete(ids))
    }
    fn list(&mut self) -> Result<Vec<FragmentId>, StoreError> {
        self.with(|s| s.list())
    }
}

/// A simulated shard of the file system: its storage work goes to its node's log actor.
pub type FsShard = Shard<SimTransport, Vec<u8>, ActorStore>;
type SharedLog = Arc<Mutex<Option<Log<SimStore>>>>;

/// What to simulate.
#[derive(Clone, Debug)]
pub struct FsSimConfig {
    /// Nodes (every node client, manager and log writer).
    pub nodes: usize,
    /// Shards per node.
    pub shards: usize,
    /// Storage servers (the stripe group: all but one hold data, one parity).
    pub servers: usize,
    /// Operations.
    pub ops: usize,
    /// Blocks each client shard caches.
    pub capacity: usize,
    /// Network faults.
    pub faults: Faults,
    /// Lose a storage server at this operation (None: never).
    pub lose_server_at: Option<usize>,
    /// Crash and restart a node at this operation (None: never).
    pub crash_at: Option<usize>,
    /// Fragment slots per storage server (the device's size).
    pub server_slots: usize,
    /// A planted fault, to show the crash checker catches it: at the crash, one fsynced
    /// block at or past this byte offset of a file the victim did not touch (the first
    /// such, by path, of a file with one name) is overwritten with zeros through node 1's
    /// client before the check, as if the cluster had lost it. None: nothing planted.
    pub plant_lost_block_past: Option<u64>,
}

impl Default for FsSimConfig {
    fn default() -> Self {
        FsSimConfig {
            nodes: 3,
            shards: 2,
            servers: 4,
            ops: 120,
            capacity: 64,
            faults: Faults {
                loss: 0.02,
                duplicate: 0.01,
                reorder: 0.2,
                delay: Duration::from_micros(10),
                jitter: Duration::from_micros(50),
                ..Faults::none()
            },
            lose_server_at: Some(60),
            crash_at: Some(90),
            server_slots: 100_000,
            plant_lost_block_past: None,
        }
    }
}

/// The simulated cluster.
pub struct World {
    /// The network.
    pub net: SimNet,
    /// `shards[node - 1][shard]`.
    pub shards: Vec<Vec<FsShard>>,
    /// The storage servers and their network.
    pub tier: StorageTier,
    /// `mounts[node - 1]`: each node's mount, its kernel's copies and invalidations.
    pub mounts: Vec<SimMount>,
    /// Chooses how late the kernels answer.
    kernel_rng: Rng,
    /// Steps taken (the kernels' clock).
    steps: u64,
    /// Each node's log.
    pub logs: Vec<SharedLog>,
    /// Each node's log actor (the node's own code), run from [`World::step`].
    pub actors: Vec<LogActor<SimStore>>,
    /// Each node's links between its shards and its actor, as a started node's shard
    /// loops and actor thread hold them: `links[node - 1][shard]` (the shard loop's
    /// [`StoreLink`]), the actor's work queue (bounded at [`SIM_ACTOR_QUEUE`] batches) and
    /// the shards' answer queues.
    links: Vec<ActorLinks>,
    /// Chooses which steps the actors take a turn on (a seeded share: their answers come
    /// late and in batches, as from a node's thread).
    actor_rng: Rng,
    /// Pieces of store work queued for an actor at a step it did not take a turn
    /// (answered later), summed over steps.
    pub actor_deferred: u64,
    /// The stripe group.
    pub group: StripeGroup,
    /// The logs' clock (milliseconds of the workload's choosing; segments' ages).
    pub clock: Arc<std::sync::atomic::AtomicU64>,
    configs: Vec<ShardConfig>,
    next_op: OpId,
    /// Virtual time limit per block-operation batch (then EIO: a stuck protocol).
    pub op_time_limit: Duration,
    /// Operations that hit the time limit.
    pub stuck: u64,
    /// Armed failpoints ([`Blocks::failpoint`]): the node dies when it reaches one.
    pub failpoints: BTreeSet<(NodeId, String)>,
    /// Nodes that died at a failpoint: every block operation of theirs fails until
    /// [`FsSim::crash_and_restart`].
    pub dead: BTreeSet<NodeId>,
}

impl World {
    fn step(&mut self) -> usize {
        self.steps += 1;
        let mut work = 0;
        for (m, node) in self.mounts.iter_mut().zip(self.shards.iter_mut()) {
            work += m.kernel_turn(node, &mut self.kernel_rng, self.steps);
        }
        work += crate::sim::step_shards(&mut self.shards) + self.run_actors();
        for (m, node) in self.mounts.iter_mut().zip(self.shards.iter_mut()) {
            work += m.send(node);
        }
        work
    }

    /// Each node's shards hand their new store work to the actor's queue (the shard loop's
    /// own `StoreLink`), the actor takes a turn on a seeded share of the steps (the actor
    /// thread's own `serve_batch`), and the shards take its answers. Returns the work done
    /// or still queued.
    fn run_actors(&mut self) -> usize {
        let mut work = 0;
        for (i, node) in self.shards.iter_mut().enumerate() {
            let l = &mut self.links[i];
            for (link, shard) in l.shards.iter_mut().zip(node.iter_mut()) {
                let (n, held) = link.hand_over(shard);
                work += n + held as usize;
                l.queued += n;
            }
            if l.queued > 0 {
                if self.actor_rng.below(3) == 0 {
                    self.actor_deferred += l.queued as u64;
                } else if let Ok(first) = l.work.try_recv() {
                    let done = serve_batch(&mut self.actors[i], first, &l.work, &l.inboxes, None);
                    l.queued = l.queued.saturating_sub(done);
                }
                // Queued work keeps the simulation stepping.
                work += l.queued.min(1);
            }
            for (link, shard) in l.shards.iter_mut().zip(node.iter_mut()) {
                work += link.take_answers(shard);
            }
        }
        work
    }

    fn advance(&mut self) -> bool {
        crate::sim::advance_time(&self.net, &self.shards)
    }

    /// Run until nothing is queued or in flight.
    pub fn settle(&mut self) {
        let limit = self.net.now().0 + self.op_time_limit.as_nanos() as u64;
        loop {
            while self.step() > 0 {}
            if !self.advance() || self.net.now().0 > limit {
                return;
            }
        }
    }

    fn protocol_errors(&self) -> Vec<String> {
        let mut v = Vec::new();
        for node in &self.shards {
            for s in node {
                if s.counters().protocol_errors > 0 {
                    v.push(format!(
                        "node {}: {} protocol errors, last: {:?}",
                        s.node(),
                        s.counters().protocol_errors,
                        s.last_error()
                    ));
                }
            }
        }
        v
    }
}

/// Batches of store work an actor's queue holds in the simulation (a started node's holds
/// `log_actor::ACTOR_QUEUE`): small, so that shards hold work back while it is full.
pub const SIM_ACTOR_QUEUE: usize = 2;

/// One node's shard-actor links (see [`World`]).
struct ActorLinks {
    shards: Vec<StoreLink>,
    work: Receiver<(usize, Vec<StoreWork<Vec<u8>>>)>,
    inboxes: Vec<ShardInbox>,
    /// Pieces handed to the actor's queue and not yet done.
    queued: usize,
}

impl ActorLinks {
    fn new(shards: &[FsShard]) -> ActorLinks {
        let (work_tx, work) = mpsc::sync_channel(SIM_ACTOR_QUEUE);
        let mut links = Vec::new();
        let mut inboxes = Vec::new();
        for (s, shard) in shards.iter().enumerate() {
            let (done_tx, done_rx) = mpsc::sync_channel(ACTOR_DONE_QUEUE);
            inboxes.push(ShardInbox {
                done: done_tx,
                wake: am_core::Transport::notifier(shard.endpoint().transport()),
            });
            links.push(StoreLink::new(work_tx.clone(), done_rx, s));
        }
        ActorLinks {
            shards: links,
            work,
            inboxes,
            queued: 0,
        }
    }
}

/// A node's [`Blocks`] in the simulation: runs the world until its operations finish.
#[derive(Clone)]
pub struct SimBlocks {
    world: Rc<RefCell<World>>,
    node: NodeId,
}

impl Blocks for SimBlocks {
    fn run(&self, ops: Vec<(BlockId, UserOp<Vec<u8>>)>) -> Vec<Result<Outcome<Vec<u8>>, Errno>> {
        let mut w = self.world.borrow_mut();
        let n = ops.len();
        if w.dead.contains(&self.node) {
            return vec![Err(Errno::EIO); n];
        }
        let mut out: Vec<Option<Result<Outcome<Vec<u8>>, Errno>>> = vec![None; n];
        let mut ids = BTreeMap::new();
        let me = self.node as usize - 1;
        let shards = w.shards[0].len();
        let mut left = n;
        // A read's answer goes into the kernel's cache unless the same batch changes that
        // block (its answer may be from before the change).
        let changed: BTreeSet<BlockId> = ops
            .iter()
            .filter(|(_, u)| !matches!(u, UserOp::Read | UserOp::Prefetch))
            .map(|(b, _)| *b)
            .collect();
        for (i, (block, user)) in ops.into_iter().enumerate() {
            // The kernel serves a read of a block it holds; a change leaves its cache.
            let mount = &mut w.mounts[me];
            let read = matches!(user, UserOp::Read) && !changed.contains(&block);
            if matches!(user, UserOp::Read) {
                if let Some(d) = mount.cache.get(&block).filter(|_| read) {
                    out[i] = Some(Ok(Outcome::Read(d.clone())));
                    mount.hits += 1;
                    left -= 1;
                    continue;
                }
            } else if !matches!(user, UserOp::Prefetch) {
                mount.cache.remove(&block);
            }
            let op = w.next_op;
            w.next_op += 1;
            ids.insert(op, (i, block, read));
            w.shards[me][shard_of(block, shards)].submit(op, block, user);
        }
        let limit = w.net.now().0 + w.op_time_limit.as_nanos() as u64;
        while left > 0 {
            let work = w.step();
            let w = &mut *w;
            for s in w.shards[me].iter_mut() {
                for c in s.take_completions() {
                    if let Some((i, block, read)) = ids.remove(&c.op) {
                        match &c.outcome {
                            Outcome::Read(d) if read => {
                                w.mounts[me].cache.insert(block, d.clone());
                            }
                            _ => {}
                        }
                        out[i] = Some(Ok(c.outcome));
                        left -= 1;
                    }
                }
            }
            if left == 0 {
                break;
            }
            if work == 0 && (!w.advance() || w.net.now().0 > limit) {
                w.stuck += 1;
                break;
            }
        }
        out.into_iter()
            .map(|r| r.unwrap_or(Err(Errno::EIO)))
            .collect()
    }

    fn sync(&self, node: NodeId) -> Result<(), Errno> {
        let mut w = self.world.borrow_mut();
        if w.dead.contains(&self.node) {
            return Err(Errno::EIO);
        }
        let op = w.next_op;
        w.next_op += 1;
        let me = self.node as usize - 1;
        w.shards[me][0].sync(op, node);
        let limit = w.net.now().0 + w.op_time_limit.as_nanos() as u64;
        loop {
            let work = w.step();
            for (o, r) in w.shards[me][0].take_sync_done() {
                if o == op {
                    return r.map_err(|e| Errno(e.errno));
                }
            }
            if work == 0 && (!w.advance() || w.net.now().0 > limit) {
                w.stuck += 1;
                return Err(Errno::EIO);
            }
        }
    }

    fn statfs(&self) -> Result<StatFs, Errno> {
        // A segment per free slot of the fullest server, `data` fragments of payload each.
        let w = self.world.borrow();
        let data = w.group.data();
        let (free, total) = w.tier.space();
        let bytes = |slots: usize| (slots.min(1 << 40) * data * FRAGMENT) as u64;
        Ok(StatFs {
            bsize: BLOCK as u64,
            blocks: bytes(total) / BLOCK as u64,
            bfree: bytes(free) / BLOCK as u64,
            namelen: 255,
        })
    }

    fn now(&self) -> u64 {
        self.world.borrow().net.now().0
    }

    fn me(&self) -> NodeId {
        self.node
    }

    fn failpoint(&self, name: &str) -> Result<(), Errno> {
        let mut w = self.world.borrow_mut();
        if w.failpoints.remove(&(self.node, name.to_string())) {
            w.dead.insert(self.node);
            return Err(Errno::EIO);
        }
        Ok(())
    }
}

/// The simulated cluster with one file-system client per node.
pub struct FsSim {
    /// The world.
    pub world: Rc<RefCell<World>>,
    /// `clients[node - 1]`.
    pub clients: Vec<FsClient<SimBlocks>>,
    map: ManagerMap,
}

/// Fragment size of the simulated servers.
pub const FRAGMENT: usize = 16 * 1024;

fn sim_clock(c: &Arc<std::sync::atomic::AtomicU64>) -> Box<dyn Fn() -> u64 + Send> {
    let c = c.clone();
    Box::new(move || c.load(std::sync::atomic::Ordering::Relaxed))
}

impl FsSim {
    /// A fresh cluster.
    pub fn new(seed: u64, cfg: &FsSimConfig) -> FsSim {
        let net = SimNet::new(seed, cfg.faults.clone());
        let ids: Vec<NodeId> = (1..=cfg.nodes as NodeId).collect();
        let map = ManagerMap::even(&ids, 4);
        let placement = Placement {
            managers: map.entries.clone(),
            storages: map.entries.clone(),
            index_shift: Some(INDEX_SHIFT),
        };
        let tier = StorageTier::new(
            seed ^ 0x5707_a6e0,
            cfg.faults.clone(),
            cfg.servers,
            cfg.server_slots,
            FRAGMENT,
        );
        let group = StripeGroup {
            id: 0,
            servers: (100..100 + cfg.servers as NodeId).collect(),
            parity: 1,
        };
        let clock = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let logs: Vec<SharedLog> = ids
            .iter()
            .map(|id| {
                let mut log = Log::new(*id, group.clone(), tier.stores())
                    .unwrap_or_else(|e| unreachable!("a valid stripe group: {e}"));
                log.set_clock(sim_clock(&clock));
                log.set_store_threads(false);
                Arc::new(Mutex::new(Some(log)))
            })
            .collect();
        let configs: Vec<ShardConfig> = ids
            .iter()
            .map(|id| ShardConfig {
                node: *id,
                protocol: ProtocolConfig {
                    sequenced: true,
                    n_chance: 2,
                    // Both handoff policies, by seed.
                    hand_off_written: seed.is_multiple_of(2),
                },
                placement: placement.clone(),
                clients: ids.clone(),
                capacity: cfg.capacity,
            })
            .collect();
        let mut shards: Vec<Vec<FsShard>> = ids
            .iter()
            .map(|id| {
                (0..cfg.shards)
                    .map(|s| {
                        let ep = Endpoint::new(
                            net.transport(),
                            Config {
                                tag: Tag(0xf5_0000 + ((*id as u64) << 8) + s as u64),
                                ..Config::default()
                            },
                        );
                        let mut shard =
                            Shard::new(ep, configs[*id as usize - 1].clone(), ActorStore)
                                .unwrap_or_else(|e| unreachable!("handler slots are free: {e}"));
                        shard.external_store = true;
                        shard
                    })
                    .collect()
            })
            .collect();
        for s in shards.iter_mut().flatten() {
            // Invalidations go to the node's mount and complete when its kernel answers.
            s.external_kernel = true;
        }
        connect_all(&mut shards).unwrap_or_else(|e| unreachable!("few nodes: {e}"));
        let actors = logs
            .iter()
            .map(|l| LogActor::new(l.clone(), Default::default()))
            .collect();
        let links = shards.iter().map(|n| ActorLinks::new(n)).collect();
        let world = Rc::new(RefCell::new(World {
            net,
            mounts: ids.iter().map(|_| SimMount::new(cfg.shards)).collect(),
            kernel_rng: Rng::new(seed ^ 0x6e_7e1),
            steps: 0,
            shards,
            tier,
            actors,
            links,
            actor_rng: Rng::new(seed ^ 0x000a_c704),
            actor_deferred: 0,
            logs,
            group,
            clock,
            configs,
            next_op: 1,
            op_time_limit: Duration::from_secs(20),
            stuck: 0,
            failpoints: BTreeSet::new(),
            dead: BTreeSet::new(),
        }));
        let clients = ids
            .iter()
            .map(|id| {
                FsClient::new(
                    SimBlocks {
                        world: world.clone(),
                        node: *id,
                    },
                    map.clone(),
                )
            })
            .collect();
        FsSim {
            world,
            clients,
            map,
        }
    }

    /// Arm failpoint `name` (e.g. [`super::client::FAILPOINT_RENAME_BETWEEN_BUCKETS`]) on
    /// `node`: when its client reaches it, the node dies there (every later block operation
    /// of its fails with EIO) until [`FsSim::crash_and_restart`]. Whether it fired:
    /// [`World::dead`].
    pub fn arm_failpoint(&self, node: NodeId, name: &str) {
        self.world
            .borrow_mut()
            .failpoints
            .insert((node, name.to_string()));
    }

    /// Node `node`'s client.
    pub fn client(&self, node: NodeId) -> &FsClient<SimBlocks> {
        &self.clients[node as usize - 1]
    }

    /// Crash node `node` and restart it: its client cache, dirty blocks, manager state and
    /// unsynced log are lost; its log is recovered from the storage servers. Done at a
    /// quiescent point (the network is drained first); the other nodes forget it.
    pub fn crash_and_restart(&mut self, node: NodeId) -> Result<(), String> {
        let mut w = self.world.borrow_mut();
        w.dead.remove(&node);
        w.settle();
        let i = node as usize - 1;
        // The log, with what it had not synced, dies with the process.
        *w.logs[i].lock().unwrap_or_else(|e| e.into_inner()) = None;
        let mut log = Log::recover(node, w.group.clone(), w.tier.stores())
            .map_err(|e| format!("node {node} cannot recover its log: {e}"))?;
        log.set_clock(sim_clock(&w.clock));
        log.set_store_threads(false);
        *w.logs[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(log);
        let cfg = w.configs[i].clone();
        // Work the dead process had queued for its actor dies with it, and its mount with
        // its kernel's copies.
        let links = ActorLinks::new(&w.shards[i]);
        w.links[i] = links;
        let shards = w.shards[i].len();
        w.mounts[i] = SimMount::new(shards);
        for s in w.shards[i].iter_mut() {
            s.restart(cfg.clone(), ActorStore);
        }
        let mut dirty = 0;
        for (j, n) in w.shards.iter_mut().enumerate() {
            if j != i {
                for s in n.iter_mut() {
                    dirty += s.peer_restarted(node);
                }
            }
        }
        // The copies the others forgot (those of blocks the restarted node manages) leave
        // their kernels too: no invalidation would reach them any more.
        let placement = cfg.placement.clone();
        for (j, m) in w.mounts.iter_mut().enumerate() {
            if j != i {
                m.cache.retain(|b, _| placement.manager(*b) != node);
            }
        }
        drop(w);
        if dirty > 0 {
            return Err(format!(
                "{dirty} dirty blocks of node {node}'s files were still cached elsewhere"
            ));
        }
        self.clients[i] = FsClient::new(
            SimBlocks {
                world: self.world.clone(),
                node,
            },
            self.map.clone(),
        );
        Ok(())
    }
}
