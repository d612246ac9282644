//! Deterministic simulation of a whole cluster running the file system (DESIGN.md §5,
//! layer 3): N nodes x S shards, each shard a real [`Shard`] on the simulated AM transport
//! (loss, duplication, reordering, jitter), each node's log a real [`Log`] striped over
//! simulated storage servers ([`MemFragmentStore`]s), and every node a real [`FsClient`].
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

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use am_core::sim::{Faults, SimNet, SimTransport};
use am_core::{Config, Endpoint, Tag};

use super::client::{Blocks, Errno, FsClient, ManagerMap, RenameMode, SetAttr, StatFs, XattrMode};
use super::layout::{Inode, Kind, BLOCK, INDEX_SHIFT};
use crate::coherence::{BlockId, NodeId, OpId, Outcome, Placement, ProtocolConfig, UserOp};
use crate::shard::{connect_all, shard_of, Shard, ShardConfig};
use crate::sim::Rng;
use crate::storage::block_store::LogStore;
use crate::storage::fragment::{FragmentId, FragmentStore, MemFragmentStore, StoreError};
use crate::storage::log::{Log, StripeGroup};

/// A simulated storage server: a fragment store that can be switched off.
pub struct SimServer {
    /// The store.
    pub store: MemFragmentStore,
    /// False once the server is lost: every call fails as a dead server's would.
    pub up: bool,
}

/// A handle on a [`SimServer`], as a node's log holds it.
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

/// A simulated shard of the file system.
pub type FsShard = Shard<SimTransport, Vec<u8>, LogStore<SimFrag>>;
type SharedLog = Arc<Mutex<Option<Log<SimFrag>>>>;

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
    /// Storage servers.
    pub servers: Vec<Arc<Mutex<SimServer>>>,
    /// Each node's log.
    pub logs: Vec<SharedLog>,
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
        crate::sim::step_shards(&mut self.shards)
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
        let shards = w.shards[0].len();
        for (i, (block, user)) in ops.into_iter().enumerate() {
            let op = w.next_op;
            w.next_op += 1;
            ids.insert(op, i);
            w.shards[self.node as usize - 1][shard_of(block, shards)].submit(op, block, user);
        }
        let limit = w.net.now().0 + w.op_time_limit.as_nanos() as u64;
        let mut left = n;
        while left > 0 {
            let work = w.step();
            for s in w.shards[self.node as usize - 1].iter_mut() {
                for c in s.take_completions() {
                    if let Some(i) = ids.remove(&c.op) {
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
        let mut free = usize::MAX;
        let mut total = 0;
        for s in &w.servers {
            let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
            if s.up {
                free = free.min(s.store.free_slots().unwrap_or(0));
                total = total.max(s.store.slots());
            }
        }
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
        let servers: Vec<Arc<Mutex<SimServer>>> = (0..cfg.servers)
            .map(|_| {
                Arc::new(Mutex::new(SimServer {
                    store: MemFragmentStore::new(cfg.server_slots, FRAGMENT),
                    up: true,
                }))
            })
            .collect();
        let group = StripeGroup {
            id: 0,
            servers: (100..100 + cfg.servers as NodeId).collect(),
            parity: 1,
        };
        let clock = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let logs: Vec<SharedLog> = ids
            .iter()
            .map(|id| {
                let stores = servers.iter().map(|s| Some(SimFrag(s.clone()))).collect();
                let mut log = Log::new(*id, group.clone(), stores)
                    .unwrap_or_else(|e| unreachable!("a valid stripe group: {e}"));
                log.set_clock(sim_clock(&clock));
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
                        Shard::new(
                            ep,
                            configs[*id as usize - 1].clone(),
                            LogStore {
                                log: logs[*id as usize - 1].clone(),
                                full: Default::default(),
                            },
                        )
                        .unwrap_or_else(|e| unreachable!("handler slots are free: {e}"))
                    })
                    .collect()
            })
            .collect();
        connect_all(&mut shards).unwrap_or_else(|e| unreachable!("few nodes: {e}"));
        let world = Rc::new(RefCell::new(World {
            net,
            shards,
            servers,
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
        let stores = w.servers.iter().map(|s| Some(SimFrag(s.clone()))).collect();
        let mut log = Log::recover(node, w.group.clone(), stores)
            .map_err(|e| format!("node {node} cannot recover its log: {e}"))?;
        log.set_clock(sim_clock(&w.clock));
        *w.logs[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(log);
        let cfg = w.configs[i].clone();
        let log = w.logs[i].clone();
        for s in w.shards[i].iter_mut() {
            s.restart(
                cfg.clone(),
                LogStore {
                    log: log.clone(),
                    full: Default::default(),
                },
            );
        }
        let mut dirty = 0;
        for (j, n) in w.shards.iter_mut().enumerate() {
            if j != i {
                for s in n.iter_mut() {
                    dirty += s.peer_restarted(node);
                }
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

/// One inode of the reference file system.
#[derive(Clone, Debug, PartialEq, Eq)]
enum RNode {
    File {
        blocks: BTreeMap<u64, Vec<u8>>,
        size: u64,
    },
    Dir {
        entries: BTreeMap<Vec<u8>, usize>,
    },
    Symlink {
        target: Vec<u8>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct RInode {
    node: RNode,
    nlink: u32,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// An in-memory model of one POSIX file system (by path), the checker's reference.
#[derive(Clone, Debug)]
pub struct Reference {
    inodes: Vec<RInode>,
    /// Inode → every block any version of it ever held (the crash check reads these
    /// back: where the file has a hole now, it must read as zeros).
    held: BTreeMap<usize, BTreeSet<u64>>,
}

impl Default for Reference {
    fn default() -> Self {
        Reference::new()
    }
}

type R<T> = Result<T, Errno>;

fn split(path: &str) -> Vec<&[u8]> {
    path.split('/')
        .filter(|p| !p.is_empty())
        .map(|p| p.as_bytes())
        .collect()
}

impl Reference {
    /// An empty file system (the root).
    pub fn new() -> Reference {
        Reference {
            inodes: vec![RInode {
                node: RNode::Dir {
                    entries: BTreeMap::new(),
                },
                nlink: 2,
                xattrs: BTreeMap::new(),
            }],
            held: BTreeMap::new(),
        }
    }

    fn resolve(&self, path: &str) -> R<usize> {
        let mut cur = 0;
        for part in split(path) {
            match &self.inodes[cur].node {
                RNode::Dir { entries } => cur = *entries.get(part).ok_or(Errno::ENOENT)?,
                _ => return Err(Errno::ENOTDIR),
            }
        }
        Ok(cur)
    }

    fn parent<'p>(&self, path: &'p str) -> R<(usize, &'p [u8])> {
        let parts = split(path);
        let (name, dir) = parts.split_last().ok_or(Errno::EINVAL)?;
        let mut cur = 0;
        for part in dir {
            match &self.inodes[cur].node {
                RNode::Dir { entries } => cur = *entries.get(*part).ok_or(Errno::ENOENT)?,
                _ => return Err(Errno::ENOTDIR),
            }
        }
        if !matches!(self.inodes[cur].node, RNode::Dir { .. }) {
            return Err(Errno::ENOTDIR);
        }
        Ok((cur, name))
    }

    fn entries(&mut self, dir: usize) -> &mut BTreeMap<Vec<u8>, usize> {
        match &mut self.inodes[dir].node {
            RNode::Dir { entries } => entries,
            _ => unreachable!("checked to be a directory"),
        }
    }

    fn lookup(&self, dir: usize, name: &[u8]) -> Option<usize> {
        match &self.inodes[dir].node {
            RNode::Dir { entries } => entries.get(name).copied(),
            _ => None,
        }
    }

    fn make(&mut self, path: &str, node: RNode) -> R<()> {
        let (p, name) = self.parent(path)?;
        if self.lookup(p, name).is_some() {
            return Err(Errno::EEXIST);
        }
        let dir = matches!(node, RNode::Dir { .. });
        self.inodes.push(RInode {
            node,
            nlink: if dir { 2 } else { 1 },
            xattrs: BTreeMap::new(),
        });
        let ino = self.inodes.len() - 1;
        self.entries(p).insert(name.to_vec(), ino);
        if dir {
            self.inodes[p].nlink += 1;
        }
        Ok(())
    }

    fn is_dir(&self, i: usize) -> bool {
        matches!(self.inodes[i].node, RNode::Dir { .. })
    }

    fn is_empty_dir(&self, i: usize) -> bool {
        matches!(&self.inodes[i].node, RNode::Dir { entries } if entries.is_empty())
    }

    fn under(&self, mut dir: usize, ancestor: usize) -> bool {
        // Walk up by searching parents (small trees).
        loop {
            if dir == ancestor {
                return true;
            }
            if dir == 0 {
                return false;
            }
            let parent = (0..self.inodes.len()).find(|p| {
                matches!(&self.inodes[*p].node, RNode::Dir { entries } if entries.values().any(|v| *v == dir))
            });
            match parent {
                Some(p) => dir = p,
                None => return false,
            }
        }
    }

    fn file_read(&self, i: usize, off: u64, len: usize) -> R<Vec<u8>> {
        match &self.inodes[i].node {
            RNode::File { blocks, size } => {
                if off >= *size {
                    return Ok(Vec::new());
                }
                let end = (off + len as u64).min(*size);
                let mut out = vec![0u8; (end - off) as usize];
                for pos in off..end {
                    let b = pos / BLOCK as u64;
                    if let Some(d) = blocks.get(&b) {
                        out[(pos - off) as usize] = d[(pos % BLOCK as u64) as usize];
                    }
                }
                Ok(out)
            }
            RNode::Dir { .. } => Err(Errno::EISDIR),
            RNode::Symlink { .. } => Err(Errno::EINVAL),
        }
    }

    fn file_write(&mut self, i: usize, off: u64, data: &[u8]) -> R<usize> {
        if let (RNode::File { .. }, false) = (&self.inodes[i].node, data.is_empty()) {
            let bs = BLOCK as u64;
            let last = (off + data.len() as u64 - 1) / bs;
            self.held.entry(i).or_default().extend(off / bs..=last);
        }
        match &mut self.inodes[i].node {
            RNode::File { blocks, size } => {
                for (k, byte) in data.iter().enumerate() {
                    let pos = off + k as u64;
                    let b = blocks
                        .entry(pos / BLOCK as u64)
                        .or_insert_with(|| vec![0; BLOCK]);
                    b[(pos % BLOCK as u64) as usize] = *byte;
                }
                *size = (*size).max(off + data.len() as u64);
                Ok(data.len())
            }
            RNode::Dir { .. } => Err(Errno::EISDIR),
            RNode::Symlink { .. } => Err(Errno::EINVAL),
        }
    }

    fn truncate(&mut self, i: usize, new: u64) -> R<()> {
        match &mut self.inodes[i].node {
            RNode::File { blocks, size } => {
                let bs = BLOCK as u64;
                blocks.retain(|b, _| b * bs < new);
                if let Some(last) = blocks.get_mut(&(new / bs)) {
                    for x in last[(new % bs) as usize..].iter_mut() {
                        *x = 0;
                    }
                }
                *size = new;
                Ok(())
            }
            RNode::Dir { .. } => Err(Errno::EISDIR),
            RNode::Symlink { .. } => Err(Errno::EINVAL),
        }
    }
}

/// The crash victim's unsynced files: path → (the reference before its first unsynced
/// operation on it, those operations).
type Unsynced = BTreeMap<String, (Reference, Vec<FsOpSim>)>;

/// One workload operation (paths in the file system).
#[derive(Clone, Debug)]
pub enum FsOpSim {
    /// Create a file.
    Create(String),
    /// Create a directory.
    Mkdir(String),
    /// Write `len` bytes from `seed` at `off`.
    Write(String, u64, usize, u64),
    /// Read.
    Read(String, u64, usize),
    /// Set the size.
    Truncate(String, u64),
    /// Remove a file.
    Unlink(String),
    /// Remove a directory.
    Rmdir(String),
    /// Rename.
    Rename(String, String),
    /// Hard link.
    Link(String, String),
    /// Symbolic link, then read it back.
    Symlink(String, String),
    /// Kind, size and link count.
    Getattr(String),
    /// Names in a directory.
    Readdir(String),
    /// fsync a file or directory.
    Fsync(String),
    /// Set an extended attribute, then read it back.
    Xattr(String, String, Vec<u8>),
}

/// What an operation answered (compared between the cluster and the reference).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Done.
    Ok,
    /// Bytes.
    Data(Vec<u8>),
    /// Kind, size, links.
    Attr(Kind, u64, u32),
    /// Sorted names.
    Names(Vec<Vec<u8>>),
}

/// `len` pseudo-random bytes from `seed` (the workloads' and tests' file contents).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x = crate::coherence::mix(x);
            x as u8
        })
        .collect()
}

impl Reference {
    /// Apply `op`; its answer.
    pub fn apply(&mut self, op: &FsOpSim) -> R<Answer> {
        match op {
            FsOpSim::Create(p) => self
                .make(
                    p,
                    RNode::File {
                        blocks: BTreeMap::new(),
                        size: 0,
                    },
                )
                .map(|_| Answer::Ok),
            FsOpSim::Mkdir(p) => self
                .make(
                    p,
                    RNode::Dir {
                        entries: BTreeMap::new(),
                    },
                )
                .map(|_| Answer::Ok),
            FsOpSim::Write(p, off, len, seed) => {
                let i = self.resolve(p)?;
                self.file_write(i, *off, &pattern(*seed, *len))
                    .map(|_| Answer::Ok)
            }
            FsOpSim::Read(p, off, len) => {
                let i = self.resolve(p)?;
                self.file_read(i, *off, *len).map(Answer::Data)
            }
            FsOpSim::Truncate(p, size) => {
                let i = self.resolve(p)?;
                self.truncate(i, *size).map(|_| Answer::Ok)
            }
            FsOpSim::Unlink(p) => {
                let (d, name) = self.parent(p)?;
                let i = self.lookup(d, name).ok_or(Errno::ENOENT)?;
                if self.is_dir(i) {
                    return Err(Errno::EISDIR);
                }
                self.entries(d).remove(name);
                self.inodes[i].nlink -= 1;
                Ok(Answer::Ok)
            }
            FsOpSim::Rmdir(p) => {
                let (d, name) = self.parent(p)?;
                let i = self.lookup(d, name).ok_or(Errno::ENOENT)?;
                if !self.is_dir(i) {
                    return Err(Errno::ENOTDIR);
                }
                if !self.is_empty_dir(i) {
                    return Err(Errno::ENOTEMPTY);
                }
                self.entries(d).remove(name);
                self.inodes[d].nlink -= 1;
                Ok(Answer::Ok)
            }
            FsOpSim::Rename(a, b) => {
                let (sd, sn) = self.parent(a)?;
                let (dd, dn) = self.parent(b)?;
                let src = self.lookup(sd, sn).ok_or(Errno::ENOENT)?;
                let dst = self.lookup(dd, dn);
                if sd == dd && sn == dn {
                    return Ok(Answer::Ok);
                }
                if self.is_dir(src) && self.under(dd, src) {
                    return Err(Errno::EINVAL);
                }
                if let Some(t) = dst {
                    if t == src {
                        return Ok(Answer::Ok);
                    }
                    match (self.is_dir(src), self.is_dir(t)) {
                        (true, false) => return Err(Errno::ENOTDIR),
                        (false, true) => return Err(Errno::EISDIR),
                        (true, true) if !self.is_empty_dir(t) => return Err(Errno::ENOTEMPTY),
                        _ => {}
                    }
                    self.inodes[t].nlink -= if self.is_dir(t) { 2 } else { 1 };
                    if self.is_dir(t) {
                        self.inodes[dd].nlink -= 1;
                    }
                }
                self.entries(sd).remove(sn);
                self.entries(dd).insert(dn.to_vec(), src);
                if self.is_dir(src) && sd != dd {
                    self.inodes[sd].nlink -= 1;
                    self.inodes[dd].nlink += 1;
                }
                Ok(Answer::Ok)
            }
            FsOpSim::Link(a, b) => {
                let i = self.resolve(a)?;
                let (dd, dn) = self.parent(b)?;
                if self.is_dir(i) {
                    return Err(Errno::EPERM);
                }
                if self.lookup(dd, dn).is_some() {
                    return Err(Errno::EEXIST);
                }
                self.entries(dd).insert(dn.to_vec(), i);
                self.inodes[i].nlink += 1;
                Ok(Answer::Ok)
            }
            FsOpSim::Symlink(p, target) => {
                self.make(
                    p,
                    RNode::Symlink {
                        target: target.as_bytes().to_vec(),
                    },
                )?;
                Ok(Answer::Data(target.as_bytes().to_vec()))
            }
            FsOpSim::Getattr(p) => {
                let i = self.resolve(p)?;
                let n = &self.inodes[i];
                Ok(match &n.node {
                    RNode::File { size, .. } => Answer::Attr(Kind::File, *size, n.nlink),
                    RNode::Dir { .. } => Answer::Attr(Kind::Dir, 0, n.nlink),
                    RNode::Symlink { target } => {
                        Answer::Attr(Kind::Symlink, target.len() as u64, n.nlink)
                    }
                })
            }
            FsOpSim::Readdir(p) => {
                let i = self.resolve(p)?;
                match &self.inodes[i].node {
                    RNode::Dir { entries } => Ok(Answer::Names(entries.keys().cloned().collect())),
                    _ => Err(Errno::ENOTDIR),
                }
            }
            FsOpSim::Fsync(p) => self.resolve(p).map(|_| Answer::Ok),
            FsOpSim::Xattr(p, name, value) => {
                let i = self.resolve(p)?;
                self.inodes[i]
                    .xattrs
                    .insert(name.as_bytes().to_vec(), value.clone());
                Ok(Answer::Data(value.clone()))
            }
        }
    }
}

/// Run `op` on the cluster through `c`; its answer.
pub fn apply_fs<B: Blocks>(c: &FsClient<B>, op: &FsOpSim) -> R<Answer> {
    let parent = |p: &str| -> R<(u64, Vec<u8>)> {
        let (d, name) = c.resolve_parent(p)?;
        if d.kind != Some(Kind::Dir) {
            return Err(Errno::ENOTDIR);
        }
        Ok((d.ino, name.as_bytes().to_vec()))
    };
    match op {
        FsOpSim::Create(p) => {
            let (d, n) = parent(p)?;
            c.create(d, &n, 0o644, 0, 0).map(|_| Answer::Ok)
        }
        FsOpSim::Mkdir(p) => {
            let (d, n) = parent(p)?;
            c.mkdir(d, &n, 0o755, 0, 0).map(|_| Answer::Ok)
        }
        FsOpSim::Write(p, off, len, seed) => {
            let i = c.resolve(p)?;
            if i.kind == Some(Kind::Symlink) {
                return Err(Errno::EINVAL);
            }
            c.write(i.ino, *off, &pattern(*seed, *len))
                .map(|_| Answer::Ok)
        }
        FsOpSim::Read(p, off, len) => {
            let i = c.resolve(p)?;
            if i.kind == Some(Kind::Symlink) {
                return Err(Errno::EINVAL);
            }
            c.read(i.ino, *off, *len).map(Answer::Data)
        }
        FsOpSim::Truncate(p, size) => {
            let i = c.resolve(p)?;
            c.setattr(
                i.ino,
                &SetAttr {
                    size: Some(*size),
                    ..Default::default()
                },
            )
            .map(|_| Answer::Ok)
        }
        FsOpSim::Unlink(p) => {
            let (d, n) = parent(p)?;
            c.unlink(d, &n).map(|_| Answer::Ok)
        }
        FsOpSim::Rmdir(p) => {
            let (d, n) = parent(p)?;
            c.rmdir(d, &n).map(|_| Answer::Ok)
        }
        FsOpSim::Rename(a, b) => {
            let (sd, sn) = parent(a)?;
            let (dd, dn) = parent(b)?;
            c.rename(sd, &sn, dd, &dn, RenameMode::Replace)
                .map(|_| Answer::Ok)
        }
        FsOpSim::Link(a, b) => {
            let i = c.resolve(a)?;
            let (dd, dn) = parent(b)?;
            c.link(i.ino, dd, &dn).map(|_| Answer::Ok)
        }
        FsOpSim::Symlink(p, target) => {
            let (d, n) = parent(p)?;
            let i = c.symlink(d, &n, target.as_bytes(), 0, 0)?;
            c.readlink(i.ino).map(Answer::Data)
        }
        FsOpSim::Getattr(p) => {
            let i = c.resolve(p)?;
            let kind = i.kind.unwrap_or(Kind::File);
            let size = if kind == Kind::Dir { 0 } else { i.size };
            Ok(Answer::Attr(kind, size, i.nlink))
        }
        FsOpSim::Readdir(p) => {
            let i = c.resolve(p)?;
            let mut names: Vec<Vec<u8>> = c.readdir(i.ino)?.into_iter().map(|e| e.name).collect();
            names.sort();
            Ok(Answer::Names(names))
        }
        FsOpSim::Fsync(p) => {
            let i = c.resolve(p)?;
            c.fsync(i.ino).map(|_| Answer::Ok)
        }
        FsOpSim::Xattr(p, name, value) => {
            let i = c.resolve(p)?;
            c.setxattr(i.ino, name.as_bytes(), value, XattrMode::Any)?;
            c.getxattr(i.ino, name.as_bytes()).map(Answer::Data)
        }
    }
}

/// A random operation over a small namespace (so names collide).
pub fn random_op(rng: &mut Rng, data_only: bool, files: &[String]) -> FsOpSim {
    let dirs = ["", "/d0", "/d1", "/d0/e"];
    let path = |rng: &mut Rng| {
        // Mostly a file that exists (so data operations do something), else any name.
        if !files.is_empty() && rng.below(10) < 6 {
            return files[rng.below(files.len() as u64) as usize].clone();
        }
        let d = dirs[rng.below(dirs.len() as u64) as usize];
        format!("{d}/f{}", rng.below(5))
    };
    let dir = |rng: &mut Rng| {
        let d = ["/d0", "/d1", "/d0/e", "/d1/g"];
        d[rng.below(d.len() as u64) as usize].to_string()
    };
    let off = |rng: &mut Rng| match rng.below(10) {
        0 => (5 << 30) + rng.below(10_000), // past 4 GiB: sparse and large
        1..=3 => rng.below(3 * BLOCK as u64),
        _ => rng.below(20_000),
    };
    if data_only {
        return match rng.below(3) {
            0 => FsOpSim::Create(path(rng)),
            1 => FsOpSim::Truncate(path(rng), rng.below(12_000)),
            _ => FsOpSim::Write(
                path(rng),
                off(rng),
                1 + rng.below(9000) as usize,
                rng.next_u64(),
            ),
        };
    }
    match rng.below(100) {
        0..=9 => FsOpSim::Create(path(rng)),
        10..=14 => FsOpSim::Mkdir(dir(rng)),
        15..=32 => FsOpSim::Write(
            path(rng),
            off(rng),
            1 + rng.below(9000) as usize,
            rng.next_u64(),
        ),
        33..=50 => FsOpSim::Read(path(rng), off(rng), 1 + rng.below(12_000) as usize),
        51..=55 => FsOpSim::Truncate(path(rng), rng.below(12_000)),
        56..=61 => FsOpSim::Unlink(path(rng)),
        62..=64 => FsOpSim::Rmdir(dir(rng)),
        65..=71 => {
            if rng.below(3) == 0 {
                FsOpSim::Rename(dir(rng), dir(rng))
            } else {
                FsOpSim::Rename(path(rng), path(rng))
            }
        }
        72..=75 => FsOpSim::Link(path(rng), path(rng)),
        76..=78 => FsOpSim::Symlink(path(rng), format!("target-{}", rng.below(100))),
        79..=86 => FsOpSim::Getattr(path(rng)),
        87..=92 => FsOpSim::Readdir(if rng.below(3) == 0 {
            "/".into()
        } else {
            dir(rng)
        }),
        93..=96 => FsOpSim::Fsync(path(rng)),
        _ => FsOpSim::Xattr(
            path(rng),
            format!("user.k{}", rng.below(3)),
            pattern(rng.next_u64(), 1 + rng.below(40) as usize),
        ),
    }
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct FsSimReport {
    /// Operations compared.
    pub ops: usize,
    /// Of which failed with the same errno on both sides.
    pub errors_matched: usize,
    /// Reads served from peers' caches.
    pub peer_reads: u64,
    /// Datagrams lost by the network.
    pub lost: u64,
    /// Log reads rebuilt from parity.
    pub degraded_reads: u64,
    /// Whether a node crashed and restarted.
    pub crashed: bool,
    /// Blocks of the crashed node's unsynced writes that survived / were lost.
    pub unsynced_survived: usize,
    /// Unsynced blocks lost.
    pub unsynced_lost: usize,
    /// The loss planted by [`FsSimConfig::plant_lost_block_past`]: the path and block.
    pub planted: Option<(String, u64)>,
}

/// Read the whole tree through `c` (for the crash check): path → (kind, content).
fn walk<B: Blocks>(c: &FsClient<B>) -> R<BTreeMap<String, (Kind, Vec<u8>)>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(String::new(), c.root())];
    while let Some((path, ino)) = stack.pop() {
        // A name whose inode died with the crashed node is not listed.
        for (e, i) in c.readdir_plus(ino)? {
            let p = format!("{path}/{}", String::from_utf8_lossy(&e.name));
            match e.kind {
                Kind::Dir => {
                    out.insert(p.clone(), (Kind::Dir, Vec::new()));
                    stack.push((p, e.ino));
                }
                Kind::Symlink => {
                    out.insert(p, (Kind::Symlink, i.target.clone()));
                }
                _ => {
                    // Sparse files past 4 GiB: keep only the blocks written (checked by
                    // reading the non-hole ranges the reference knows).
                    out.insert(p, (Kind::File, i.size.to_le_bytes().to_vec()));
                }
            }
        }
    }
    Ok(out)
}

/// A short description of an answer (data as length and checksum).
fn brief(a: &R<Answer>) -> String {
    match a {
        Ok(Answer::Data(d)) => {
            let nz = d.iter().position(|x| *x != 0);
            format!(
                "Data({} bytes, crc {:08x}, first non-zero at {nz:?})",
                d.len(),
                crc32c::crc32c(d)
            )
        }
        other => format!("{other:?}"),
    }
}

fn trace() -> bool {
    std::env::var_os("XFS_FS_SIM_TRACE").is_some()
}

/// Run one seeded simulation; `Err` names the seed and the first difference.
pub fn run(seed: u64, cfg: &FsSimConfig) -> Result<FsSimReport, String> {
    let fail = |m: String| format!("seed {seed}: {m} (replay: XFS_FS_SIM_SEED={seed})");
    let mut sim = FsSim::new(seed, cfg);
    let mut reference = Reference::new();
    let mut rng = Rng::new(seed);
    let mut report = FsSimReport::default();
    let nodes = cfg.nodes as NodeId;
    sim.client(1)
        .format()
        .map_err(|e| fail(format!("format: {e}")))?;
    for (i, d) in ["/d0", "/d1", "/d0/e"].iter().enumerate() {
        let op = FsOpSim::Mkdir(d.to_string());
        let want = reference.apply(&op);
        let got = apply_fs(sim.client(1 + (i as NodeId) % nodes), &op);
        if want != got {
            return Err(fail(format!("setup {op:?}: {got:?}, want {want:?}")));
        }
    }
    // The crash victim's unsynced window: from `crash_at - 8`, the victim writes without
    // fsync while the others fsync; then it crashes.
    let victim = 1 + (rng.below(nodes as u64) as NodeId);
    let window = cfg.crash_at.map(|c| c.saturating_sub(8));
    let mut unsynced: Unsynced = BTreeMap::new();
    for k in 0..cfg.ops {
        if cfg.lose_server_at == Some(k) {
            let s = rng.below(cfg.servers as u64) as usize;
            let w = sim.world.borrow();
            w.servers[s].lock().unwrap_or_else(|e| e.into_inner()).up = false;
        }
        if window == Some(k) {
            // Everything durable, then the window opens.
            for n in 1..=nodes {
                sim.client(n)
                    .sync_all()
                    .map_err(|e| fail(format!("sync_all on node {n}: {e}")))?;
            }
        }
        if cfg.crash_at == Some(k) {
            for n in (1..=nodes).filter(|n| *n != victim) {
                sim.client(n)
                    .sync_all()
                    .map_err(|e| fail(format!("sync_all on node {n}: {e}")))?;
            }
            sim.crash_and_restart(victim).map_err(&fail)?;
            report.crashed = true;
            if let Some(past) = cfg.plant_lost_block_past {
                report.planted =
                    Some(plant_lost_block(&sim, &reference, &unsynced, past).map_err(&fail)?);
            }
            let planted = report.planted.as_ref().map_or(String::new(), |(p, b)| {
                format!(" [planted: {p} lost block {b}]")
            });
            let checked = check_after_crash(&sim, &reference, &unsynced, &mut report)
                .map_err(|e| fail(format!("after node {victim} crashed: {e}{planted}")))?;
            // What survived (and was checked) is the new truth.
            reference = adopt(&reference, &checked).map_err(&fail)?;
            unsynced.clear();
        }
        let in_window = window.is_some_and(|w| k >= w) && cfg.crash_at.is_some_and(|c| k < c);
        let (node, op) = if in_window && rng.below(2) == 0 {
            (victim, random_op(&mut rng, true, &reference.files()))
        } else {
            let mut n = 1 + rng.below(nodes as u64) as NodeId;
            if in_window {
                while n == victim {
                    n = 1 + rng.below(nodes as u64) as NodeId;
                }
            }
            (n, random_op(&mut rng, false, &reference.files()))
        };
        if in_window && node != victim {
            // Others must not touch what the victim has not synced (their reads would
            // make it durable through coherence, which the crash check allows but the
            // reference cannot predict).
            let touches = |p: &String| {
                unsynced
                    .keys()
                    .any(|u| u == p || p.starts_with(&format!("{u}/")))
            };
            let paths: Vec<&String> = match &op {
                FsOpSim::Rename(a, b) | FsOpSim::Link(a, b) => vec![a, b],
                FsOpSim::Create(p)
                | FsOpSim::Mkdir(p)
                | FsOpSim::Write(p, ..)
                | FsOpSim::Read(p, ..)
                | FsOpSim::Truncate(p, _)
                | FsOpSim::Unlink(p)
                | FsOpSim::Rmdir(p)
                | FsOpSim::Symlink(p, _)
                | FsOpSim::Getattr(p)
                | FsOpSim::Readdir(p)
                | FsOpSim::Fsync(p)
                | FsOpSim::Xattr(p, ..) => vec![p],
            };
            if paths.iter().any(|p| touches(p))
                || matches!(
                    op,
                    FsOpSim::Rename(..) | FsOpSim::Rmdir(_) | FsOpSim::Readdir(_)
                )
            {
                continue;
            }
        }
        if trace() {
            eprintln!("op {k} node {node}: {op:?}");
        }
        let pre = (in_window && node == victim).then(|| reference.clone());
        let want = reference.apply(&op);
        let got = apply_fs(sim.client(node), &op);
        report.ops += 1;
        if want != got {
            let errs = sim.world.borrow().protocol_errors();
            return Err(fail(format!(
                "op {k} on node {node}: {op:?}\n  cluster answered   {}\n  reference answered {}\n  protocol errors: {errs:?}",
                brief(&got),
                brief(&want)
            )));
        }
        if want.is_err() {
            report.errors_matched += 1;
        } else if in_window && node == victim {
            if let FsOpSim::Create(p) | FsOpSim::Write(p, ..) | FsOpSim::Truncate(p, _) = &op {
                // Every name of the inode (hard links) is affected.
                for alias in reference.aliases(p) {
                    unsynced
                        .entry(alias)
                        .or_insert_with(|| (pre.clone().unwrap_or_default(), Vec::new()))
                        .1
                        .push(op.clone());
                }
            }
        } else if node != victim || !in_window {
            // Others fsync as they go while the window is open.
            if in_window {
                let _ = sim.client(node).sync_all();
            }
        }
    }
    let w = sim.world.borrow();
    if w.stuck > 0 {
        return Err(fail(format!("{} block operations never finished", w.stuck)));
    }
    let errs = w.protocol_errors();
    if !errs.is_empty() {
        return Err(fail(format!("protocol errors: {errs:?}")));
    }
    for node in &w.shards {
        for s in node {
            report.peer_reads += s.client.counters.peer_reads;
        }
    }
    for l in &w.logs {
        if let Some(l) = l.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            report.degraded_reads += l.counters().degraded_reads;
        }
    }
    report.lost = w.net.counters().dropped;
    Ok(report)
}

/// The crash check's verdict on each of the victim's unsynced paths, all [`adopt`] takes:
/// None (the file is gone), or its size and the blocks the check read and accepted (those
/// not all zeros, zero-padded to a block).
type Checked = BTreeMap<String, Option<(u64, BTreeMap<u64, Vec<u8>>)>>;

/// Most blocks of one file the crash check reads (this workload's files have a few dozen
/// worth reading; a file past it is an error, not a partial check).
const MAX_CHECKED_BLOCKS: u64 = 1 << 16;

/// A file's blocks in the reference: block number → its bytes (a whole block).
type RBlocks = BTreeMap<u64, Vec<u8>>;

/// `v`'s regular file at `p`: its inode, size and blocks.
fn ref_file<'a>(v: &'a Reference, p: &str) -> Option<(usize, u64, &'a RBlocks)> {
    let i = v.resolve(p).ok()?;
    match &v.inodes[i].node {
        RNode::File { blocks, size } => Some((i, *size, blocks)),
        _ => None,
    }
}

/// What a reader sees of block `b` of a file of `size` bytes holding `blocks` (a block
/// absent is zeros).
fn visible(blocks: &BTreeMap<u64, Vec<u8>>, size: u64, b: u64) -> Vec<u8> {
    let bs = BLOCK as u64;
    let len = size.saturating_sub(b * bs).min(bs) as usize;
    blocks
        .get(&b)
        .map_or_else(|| vec![0; len], |d| d[..len].to_vec())
}

/// Add the blocks of `v`'s file at `p` the crash check reads: every block it holds and
/// their neighbours (holes there read as zeros), every block it ever held, its first and
/// its last.
fn blocks_worth_reading(v: &Reference, p: &str, out: &mut BTreeSet<u64>) {
    if let Some((i, size, blocks)) = ref_file(v, p) {
        for b in blocks.keys() {
            out.extend([b.saturating_sub(1), *b, b + 1]);
        }
        out.extend(v.held.get(&i).into_iter().flatten().copied());
        out.insert(0);
        out.insert(size.saturating_sub(1) / BLOCK as u64);
    }
}

/// `which`, with every block the cluster's inode says may hold data (its extents), less
/// the blocks past its size (a reader sees nothing there).
fn with_extents(p: &str, mut which: BTreeSet<u64>, i: &Inode) -> Result<BTreeSet<u64>, String> {
    let end = i.size.div_ceil(BLOCK as u64);
    let mut n = 0;
    for (s, e) in &i.extents {
        let e = (*e).min(end);
        n += e.saturating_sub(*s);
        if n > MAX_CHECKED_BLOCKS {
            return Err(format!(
                "{p}: its extents {:?} cover more than {MAX_CHECKED_BLOCKS} blocks below its \
                 size {}: too many for the crash check to read (raise MAX_CHECKED_BLOCKS)",
                i.extents, i.size
            ));
        }
        which.extend(*s..e);
    }
    which.retain(|b| *b < end);
    Ok(which)
}

/// Read blocks `which` of file `ino` through `c`, one read per run of consecutive blocks:
/// block → the bytes read (short at the end of the file).
fn read_blocks<B: Blocks>(
    c: &FsClient<B>,
    ino: u64,
    which: &BTreeSet<u64>,
) -> R<BTreeMap<u64, Vec<u8>>> {
    let bs = BLOCK as u64;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for b in which {
        match runs.last_mut() {
            Some(r) if r.1 == *b && r.1 - r.0 < 256 => r.1 += 1,
            _ => runs.push((*b, b + 1)),
        }
    }
    let mut out = BTreeMap::new();
    for (s, e) in runs {
        let d = c.read(ino, s * bs, ((e - s) * bs) as usize)?;
        for b in s..e {
            let from = ((b - s) * bs) as usize;
            let to = d.len().min(from + BLOCK);
            out.insert(b, d.get(from..to).unwrap_or_default().to_vec());
        }
    }
    Ok(out)
}

/// A block's bytes, briefly.
fn brief_block(d: &[u8]) -> String {
    brief(&Ok(Answer::Data(d.to_vec())))
}

/// After the crash: every path the victim did not touch since the snapshot is exactly as
/// the reference says (kind, size, and every block worth reading: see
/// [`blocks_worth_reading`] and [`with_extents`]); every path it touched is a file of one
/// of the sizes its versions had (the snapshot's, or one of the victim's unsynced
/// operations'), each block read equal to that block in one of the versions, or gone if a
/// version had no such file. Returns what it checked of the touched paths, for [`adopt`].
fn check_after_crash(
    sim: &FsSim,
    now: &Reference,
    unsynced: &Unsynced,
    report: &mut FsSimReport,
) -> Result<Checked, String> {
    let bs = BLOCK as u64;
    let c = sim.client(1);
    let tree = walk(c).map_err(|e| format!("walking the tree: {e}"))?;
    let listed: BTreeSet<&String> = tree.keys().collect();
    let expected: BTreeSet<String> = now.paths().into_iter().map(|(p, _)| p).collect();
    for p in &expected {
        if unsynced.contains_key(p) {
            continue;
        }
        let Some((kind, content)) = tree.get(p) else {
            return Err(format!("{p} is gone"));
        };
        let i = now
            .resolve(p)
            .map_err(|e| format!("{p}: the reference lists it and cannot resolve it: {e}"))?;
        match &now.inodes[i].node {
            RNode::Dir { .. } => {
                if *kind != Kind::Dir {
                    return Err(format!("{p} is a {kind:?}, want a directory"));
                }
            }
            RNode::Symlink { target } => {
                if *kind != Kind::Symlink || content != target {
                    return Err(format!(
                        "{p} is a {kind:?} ({:?}), want a symlink to {:?}",
                        String::from_utf8_lossy(content),
                        String::from_utf8_lossy(target)
                    ));
                }
            }
            RNode::File { blocks, size } => {
                if *kind != Kind::File {
                    return Err(format!("{p} is a {kind:?}, want a file"));
                }
                let got = c.resolve(p).map_err(|e| format!("{p}: {e}"))?;
                if got.size != *size {
                    return Err(format!("{p}: size {}, want {size}", got.size));
                }
                let mut which = BTreeSet::new();
                blocks_worth_reading(now, p, &mut which);
                let which = with_extents(p, which, &got)?;
                let data =
                    read_blocks(c, got.ino, &which).map_err(|e| format!("{p}: reading: {e}"))?;
                for (b, d) in &data {
                    let want = visible(blocks, *size, *b);
                    if *d != want {
                        return Err(format!(
                            "{p}: block {b} (bytes {}..) reads {}, want {}",
                            b * bs,
                            brief_block(d),
                            brief_block(&want)
                        ));
                    }
                }
            }
        }
    }
    for p in listed {
        if !expected.contains(p) && !unsynced.contains_key(p) {
            return Err(format!("{p} appeared"));
        }
    }
    // Unsynced files: the size one of the versions', each block one of the versions'.
    let mut checked = Checked::new();
    for (p, (start, ops)) in unsynced {
        let mut versions: Vec<Reference> = vec![start.clone()];
        let mut r = start.clone();
        for op in ops {
            let _ = r.apply(op);
            versions.push(r.clone());
        }
        let files: Vec<(u64, &BTreeMap<u64, Vec<u8>>)> = versions
            .iter()
            .filter_map(|v| ref_file(v, p).map(|(_, s, b)| (s, b)))
            .collect();
        let got = match c.resolve(p) {
            Ok(i) => i,
            Err(Errno::ENOENT) if files.len() < versions.len() => {
                report.unsynced_lost += 1;
                checked.insert(p.clone(), None);
                continue;
            }
            Err(Errno::ENOENT) => {
                return Err(format!(
                    "{p} is gone, though every version of it (the fsynced one too) is a file"
                ))
            }
            Err(e) => return Err(format!("{p}: {e}")),
        };
        if got.kind != Some(Kind::File) {
            return Err(format!("{p} is a {:?}, want a file", got.kind));
        }
        let sizes: Vec<u64> = files.iter().map(|(s, _)| *s).collect();
        if !sizes.contains(&got.size) {
            return Err(format!(
                "{p}: size {}, none of its versions' sizes {sizes:?}",
                got.size
            ));
        }
        let mut which = BTreeSet::new();
        for v in &versions {
            blocks_worth_reading(v, p, &mut which);
        }
        which.insert(got.size.saturating_sub(1) / bs);
        let which = with_extents(p, which, &got)?;
        let data = read_blocks(c, got.ino, &which).map_err(|e| format!("{p}: reading: {e}"))?;
        let zero = vec![0u8; BLOCK];
        let last = files.last().filter(|_| ref_file(&r, p).is_some());
        let mut as_last = last.is_some_and(|(s, _)| *s == got.size);
        let mut kept = BTreeMap::new();
        for (b, d) in &data {
            // Each block is written back whole, the inode block on its own: each block
            // is that block of one of the versions (its tail past the size unseen).
            let ok = files
                .iter()
                .any(|(_, blocks)| blocks.get(b).unwrap_or(&zero)[..d.len()] == **d);
            if !ok {
                return Err(format!(
                    "{p}: block {b} (bytes {}..) reads {}, which is none of the {} versions \
                     written (the last: {})",
                    b * bs,
                    brief_block(d),
                    files.len(),
                    last.map_or("none".into(), |(s, blocks)| brief_block(&visible(
                        blocks, *s, *b
                    )))
                ));
            }
            as_last &=
                last.is_some_and(|(_, blocks)| blocks.get(b).unwrap_or(&zero)[..d.len()] == **d);
            if d.iter().any(|x| *x != 0) {
                let mut full = d.clone();
                full.resize(BLOCK, 0);
                kept.insert(*b, full);
            }
        }
        checked.insert(p.clone(), Some((got.size, kept)));
        if as_last {
            report.unsynced_survived += 1;
        } else {
            report.unsynced_lost += 1;
        }
    }
    Ok(checked)
}

/// Plant the loss [`FsSimConfig::plant_lost_block_past`] asks for: through node 1's client,
/// zero the first block (by path, then block) at or past byte `past` that holds data, in a
/// file of one name that `now` has and the victim did not touch (fsynced); its path and
/// block.
fn plant_lost_block(
    sim: &FsSim,
    now: &Reference,
    unsynced: &Unsynced,
    past: u64,
) -> Result<(String, u64), String> {
    let bs = BLOCK as u64;
    for p in now.files() {
        if unsynced.contains_key(&p) {
            continue;
        }
        let Some((i, size, blocks)) = ref_file(now, &p) else {
            continue;
        };
        if now.inodes[i].nlink != 1 {
            continue;
        }
        for (b, d) in blocks.range(past.div_ceil(bs)..) {
            let len = size.saturating_sub(b * bs).min(bs) as usize;
            if d[..len].iter().all(|x| *x == 0) {
                continue;
            }
            let c = sim.client(1);
            let lose = |e: Errno| format!("planting the loss of block {b} of {p}: {e}");
            let ino = c.resolve(&p).map_err(lose)?.ino;
            c.write(ino, b * bs, &vec![0; len]).map_err(lose)?;
            return Ok((p, *b));
        }
    }
    Err(format!(
        "nothing to plant: no fsynced block at or past byte {past} in a file of one name \
         the victim did not touch (choose another seed)"
    ))
}

impl Reference {
    /// Every path in the tree and the inode it names, sorted by path.
    fn paths(&self) -> Vec<(String, usize)> {
        let mut out = Vec::new();
        let mut stack = vec![(String::new(), 0usize)];
        while let Some((path, i)) = stack.pop() {
            if let RNode::Dir { entries } = &self.inodes[i].node {
                for (name, j) in entries {
                    let q = format!("{path}/{}", String::from_utf8_lossy(name));
                    out.push((q.clone(), *j));
                    stack.push((q, *j));
                }
            }
        }
        out.sort();
        out
    }

    /// Every regular file's path.
    fn files(&self) -> Vec<String> {
        self.paths()
            .into_iter()
            .filter(|(_, i)| matches!(self.inodes[*i].node, RNode::File { .. }))
            .map(|(p, _)| p)
            .collect()
    }

    /// Every path naming the same inode as `p` (itself included).
    fn aliases(&self, p: &str) -> Vec<String> {
        let Ok(target) = self.resolve(p) else {
            return vec![p.to_string()];
        };
        self.paths()
            .into_iter()
            .filter(|(_, i)| *i == target)
            .map(|(p, _)| p)
            .collect()
    }
}

/// The reference after the crash: the one before it, with the victim's unsynced files
/// replaced by what the crash check read of them and accepted (`checked`), nothing else.
fn adopt(now: &Reference, checked: &Checked) -> Result<Reference, String> {
    let mut r = now.clone();
    for (p, what) in checked {
        let exists_ref = r.resolve(p).is_ok();
        match what {
            Some((size, blocks)) => {
                if !exists_ref {
                    r.make(
                        p,
                        RNode::File {
                            blocks: BTreeMap::new(),
                            size: 0,
                        },
                    )
                    .map_err(|e| format!("adopting {p}: {e}"))?;
                }
                let ri = r.resolve(p).map_err(|e| format!("adopting {p}: {e}"))?;
                r.held.entry(ri).or_default().extend(blocks.keys());
                r.inodes[ri].node = RNode::File {
                    blocks: blocks.clone(),
                    size: *size,
                };
            }
            None => {
                if exists_ref {
                    let (d, name) = r.parent(p).map_err(|e| format!("adopting {p}: {e}"))?;
                    if let Some(i) = r.entries(d).remove(name) {
                        r.inodes[i].nlink -= 1;
                    }
                }
            }
        }
    }
    Ok(r)
}
