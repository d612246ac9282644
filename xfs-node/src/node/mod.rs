//! A node process (DESIGN.md §4): any subset of the client, manager and storage roles over
//! Active Messages, configured by [`config::Config`].
//!
//! Threads of a node:
//! * one **shard loop** per configured shard, each owning a [`Shard`] (one AM endpoint, the
//!   coherence state of its blocks); other threads reach it only through a bounded queue;
//! * the **storage server** (storage role): the fragment store on a file or block device
//!   (io_uring, O_DIRECT) served over its own AM endpoint;
//! * the **log** (manager role): this node's log striped over its stripe group with parity
//!   ([`Log`] over [`RemoteStore`]s), shared by the shards' storage roles: the write-backs of
//!   the blocks this node manages are appended to it; an fsync makes it durable; it is
//!   checkpointed on a clean stop and periodically, and recovered (checkpoint +
//!   roll-forward) at start;
//! * the **control socket** (one thread per connection) running the client API.

pub mod config;
pub mod control;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use am_core::{Endpoint, EndpointName, Tag, Transport};

use crate::coherence::{
    BlockId, BlockStore, NodeId, OpId, Outcome, Placement, ProtocolConfig, SyncError, UserOp,
};
use crate::fs::client::{Blocks, Errno, FsClient, StatFs};
use crate::fs::layout::{Entry, Inode, Kind, BLOCK, INDEX_SHIFT};
use crate::shard::{shard_of, Shard, ShardConfig};
use crate::storage::cleaner::{self, CleanerStatus};
use crate::storage::fragment::{FragmentStore, StoreError};
use crate::storage::log::{Log, LogCheck, LogError, SegmentReader, SUMMARY_BYTES};
use crate::storage::remote::{RemoteStore, ServerOptions, StorageServer};
use crate::storage::uring::{UringOptions, UringStore};
use config::Config;
use control::{FsOp, NodeStatus, Request, Response};

/// How long a block operation may take before the client gives up with EIO.
pub const OP_TIMEOUT: Duration = Duration::from_secs(30);
const STORE_DEPTH: usize = 16;

type SharedLog<T> = Arc<Mutex<Option<Log<RemoteStore<T>>>>>;
type CallReply = Sender<Result<Vec<u8>, String>>;
type SharedReader<T> = Arc<Mutex<Option<SegmentReader<RemoteStore<T>>>>>;
type OpReply = (usize, Sender<(usize, Result<Outcome<Vec<u8>>, Errno>)>);
type LogControl = Box<dyn Fn(&str) -> Result<Vec<(String, u64)>, String> + Send + Sync>;
/// The log's fsck ([`Log::check`]; `None`: this node keeps no log).
type LogCheckFn = Box<dyn Fn(bool) -> Option<(LogCheck, Vec<String>)> + Send + Sync>;
/// The attached mount's queue of kernel invalidations (`None`: no mount; they complete at
/// once).
type MountLink = Arc<Mutex<Option<SyncSender<Vec<BlockId>>>>>;
/// Invalidations a mount may have outstanding before the shards hold the rest back.
const MOUNT_QUEUE: usize = 1024;

fn lock<X>(m: &Mutex<X>) -> std::sync::MutexGuard<'_, X> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a block is, for an error message: the inode and the byte range of the file (or the
/// directory bucket) it holds, or the inode's own block.
pub fn block_name(block: BlockId) -> String {
    let ino = crate::fs::layout::ino_of(block);
    let n = block & crate::fs::layout::INODE_BLOCK;
    if n == crate::fs::layout::INODE_BLOCK {
        format!("inode {ino} (its inode block)")
    } else {
        let at = n * BLOCK as u64;
        format!(
            "inode {ino}, bytes {at}..{} (block {n}; a directory's bucket {n})",
            at + BLOCK as u64
        )
    }
}

/// The shards' storage role: the node's log (absent on a node without the manager role),
/// shared by the node's shards.
pub struct LogStore<S: FragmentStore> {
    /// The log.
    pub log: Arc<Mutex<Option<Log<S>>>>,
    /// Set while the log cannot write what it holds (its stores are full): the node's
    /// `statfs` reports no free space, so writes fail with ENOSPC at once.
    pub full: Arc<AtomicBool>,
}

impl<S: FragmentStore + Send> BlockStore<Vec<u8>> for LogStore<S> {
    fn read(&mut self, block: BlockId) -> Result<Vec<u8>, String> {
        let mut g = lock(&self.log);
        let log = g.as_mut().ok_or("this node has no log (no manager role)")?;
        match log.read(block) {
            Ok(d) => Ok(d),
            Err(LogError::NotFound(_)) => Ok(Vec::new()),
            Err(e) => {
                // Named, so that an operator knows which file lost what (the read that
                // needs it fails with EIO; the file's other blocks still read).
                let m = format!("{}: {e}", block_name(block));
                eprintln!("xfs-node: cannot read {m}");
                Err(m)
            }
        }
    }
    fn write(&mut self, block: BlockId, data: Vec<u8>) -> Result<(), String> {
        let mut g = lock(&self.log);
        let log = g.as_mut().ok_or("this node has no log (no manager role)")?;
        let r = log.write(block, &data).map_err(|e| e.to_string());
        self.full.store(log.is_full(), Ordering::Relaxed);
        r
    }
    fn sync(&mut self) -> Result<(), SyncError> {
        let mut g = lock(&self.log);
        let Some(log) = g.as_mut() else {
            return Ok(());
        };
        let r = log.fsync();
        self.full.store(log.is_full(), Ordering::Relaxed);
        r.map_err(|e| SyncError {
            errno: match e {
                LogError::Store(StoreError::NoSpace { .. }) => libc::ENOSPC,
                _ => libc::EIO,
            },
            message: e.to_string(),
        })
    }
}

enum Cmd {
    Op {
        op: OpId,
        block: BlockId,
        user: UserOp<Vec<u8>>,
        reply: OpReply,
    },
    Sync {
        op: OpId,
        node: NodeId,
        reply: Sender<Result<(), SyncError>>,
    },
    /// A store command to node `node` (the cleaner's).
    Call {
        op: OpId,
        node: NodeId,
        request: Vec<u8>,
        reply: Sender<Result<Vec<u8>, String>>,
    },
    /// A store command from `from` ran (on the node's command thread).
    CommandDone {
        from: NodeId,
        op: OpId,
        result: Result<Vec<u8>, String>,
    },
    Stats(Sender<Vec<(String, u64)>>),
    /// The kernel dropped these blocks (the mount's answer to an invalidation).
    KernelDone(Vec<BlockId>),
}

/// The node's [`Blocks`]: block operations queued to the shard loops.
pub struct NodeBlocks {
    me: NodeId,
    shards: Vec<SyncSender<Cmd>>,
    /// Wake each shard loop from its `wait` when a command is queued.
    wake: Vec<Arc<dyn am_core::Notify>>,
    next: AtomicU64,
    statfs: Box<dyn Fn() -> Result<StatFs, Errno> + Send + Sync>,
}

impl NodeBlocks {
    fn op_id(&self) -> OpId {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Report kernel invalidations done to the blocks' shards.
    pub fn kernel_done(&self, blocks: Vec<BlockId>) {
        let mut by: BTreeMap<usize, Vec<BlockId>> = BTreeMap::new();
        for b in blocks {
            by.entry(shard_of(b, self.shards.len()))
                .or_default()
                .push(b);
        }
        for (s, v) in by {
            if self.shards[s].send(Cmd::KernelDone(v)).is_ok() {
                self.wake[s].notify();
            }
        }
    }

    /// Run a store command on node `node` (through shard 0), waiting up to `timeout`.
    pub fn call(
        &self,
        node: NodeId,
        request: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, String> {
        let (tx, rx) = mpsc::channel();
        let cmd = Cmd::Call {
            op: self.op_id(),
            node,
            request,
            reply: tx,
        };
        self.shards[0]
            .send(cmd)
            .map_err(|_| "the shard loop has stopped".to_string())?;
        self.wake[0].notify();
        rx.recv_timeout(timeout)
            .map_err(|_| format!("node {node} did not answer within {timeout:?}"))?
    }

    /// Sum the shards' counters.
    pub fn counters(&self) -> Vec<(String, u64)> {
        let mut sum: BTreeMap<String, u64> = BTreeMap::new();
        for (s, w) in self.shards.iter().zip(&self.wake) {
            let (tx, rx) = mpsc::channel();
            if s.send(Cmd::Stats(tx)).is_ok() {
                w.notify();
                if let Ok(c) = rx.recv_timeout(Duration::from_secs(5)) {
                    for (k, v) in c {
                        *sum.entry(k).or_default() += v;
                    }
                }
            }
        }
        sum.into_iter().collect()
    }
}

impl Blocks for NodeBlocks {
    fn run(&self, ops: Vec<(BlockId, UserOp<Vec<u8>>)>) -> Vec<Result<Outcome<Vec<u8>>, Errno>> {
        let n = ops.len();
        let (tx, rx) = mpsc::channel();
        let mut out: Vec<Option<Result<Outcome<Vec<u8>>, Errno>>> = vec![None; n];
        let mut sent = 0;
        for (i, (block, user)) in ops.into_iter().enumerate() {
            let s = shard_of(block, self.shards.len());
            let cmd = Cmd::Op {
                op: self.op_id(),
                block,
                user,
                reply: (i, tx.clone()),
            };
            if self.shards[s].send(cmd).is_ok() {
                self.wake[s].notify();
                sent += 1;
            } else {
                out[i] = Some(Err(Errno::EIO));
            }
        }
        let deadline = Instant::now() + OP_TIMEOUT;
        for _ in 0..sent {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((i, r)) => out[i] = Some(r),
                Err(_) => break,
            }
        }
        out.into_iter()
            .map(|r| r.unwrap_or(Err(Errno::EIO)))
            .collect()
    }

    fn sync(&self, node: NodeId) -> Result<(), Errno> {
        let (tx, rx) = mpsc::channel();
        let cmd = Cmd::Sync {
            op: self.op_id(),
            node,
            reply: tx,
        };
        self.shards[0].send(cmd).map_err(|_| Errno::EIO)?;
        self.wake[0].notify();
        match rx.recv_timeout(OP_TIMEOUT) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                eprintln!("xfs-node: fsync on node {node} failed: {e}");
                Err(Errno(e.errno))
            }
            Err(_) => Err(Errno::EIO),
        }
    }

    fn statfs(&self) -> Result<StatFs, Errno> {
        (self.statfs)()
    }

    fn now(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    }

    fn me(&self) -> NodeId {
        self.me
    }

    fn wait_for_space(&self, attempt: u32) -> bool {
        // The cleaner's leader looks at the group every 200 ms; a writer waits for it up
        // to 10 s in all (then ENOSPC: the space is live, or the cleaner cannot run).
        if attempt >= 200 {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
        true
    }

    fn failpoint(&self, name: &str) -> Result<(), Errno> {
        // `XFS_FAILPOINTS=a,b`: the node dies (abort, as a power cut would stop it) at
        // each named point; read once. For the crash tests and `xfs-node fsck`'s demo.
        static POINTS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
        let points = POINTS.get_or_init(|| {
            std::env::var("XFS_FAILPOINTS")
                .map(|v| v.split(',').map(|p| p.trim().to_string()).collect())
                .unwrap_or_default()
        });
        if points.iter().any(|p| p == name) {
            eprintln!("xfs-node: failpoint {name} (XFS_FAILPOINTS): dying here");
            std::process::abort();
        }
        Ok(())
    }
}

fn shard_loop<T: Transport + Send>(
    mut shard: Shard<T, Vec<u8>, LogStore<RemoteStore<T>>>,
    rx: Receiver<Cmd>,
    stop: Arc<AtomicBool>,
    mount: MountLink,
    commands: Option<SyncSender<(NodeId, OpId, Vec<u8>)>>,
) {
    // Kernel invalidations go to the attached mount (if any) and complete when it answers.
    shard.external_kernel = true;
    shard.external_commands = commands.is_some();
    let mut unsent: Vec<BlockId> = Vec::new();
    let mut invalidations = 0u64;
    let mut ops: BTreeMap<OpId, OpReply> = BTreeMap::new();
    let mut syncs: BTreeMap<OpId, Sender<Result<(), SyncError>>> = BTreeMap::new();
    // Store commands in flight (dropped unanswered after two minutes: a dead peer).
    let mut calls: BTreeMap<OpId, (Instant, CallReply)> = BTreeMap::new();
    let mut idle = 0u32;
    let mut last_error: Option<String> = None;
    while !stop.load(Ordering::Relaxed) {
        let mut work = 0;
        while let Ok(cmd) = rx.try_recv() {
            work += 1;
            match cmd {
                Cmd::Op {
                    op,
                    block,
                    user,
                    reply,
                } => {
                    ops.insert(op, reply);
                    shard.submit(op, block, user);
                }
                Cmd::Sync { op, node, reply } => {
                    syncs.insert(op, reply);
                    shard.sync(op, node);
                }
                Cmd::Call {
                    op,
                    node,
                    request,
                    reply,
                } => {
                    calls.retain(|_, (t, _)| t.elapsed() < Duration::from_secs(120));
                    calls.insert(op, (Instant::now(), reply));
                    shard.call(op, node, request);
                }
                Cmd::CommandDone { from, op, result } => shard.command_done(from, op, result),
                Cmd::KernelDone(blocks) => {
                    for b in blocks {
                        shard.kernel_done(b);
                    }
                }
                Cmd::Stats(tx) => {
                    let c = shard.counters();
                    let cc = shard.client.counters;
                    let mc = shard.manager.counters;
                    let _ = tx.send(vec![
                        ("messages".into(), c.messages),
                        ("remote_sends".into(), c.remote_sends),
                        ("local_sends".into(), c.local_sends),
                        ("ops_completed".into(), c.ops_completed),
                        ("bad_messages".into(), c.bad_messages),
                        ("protocol_errors".into(), c.protocol_errors),
                        ("undeliverable".into(), c.undeliverable),
                        ("bounced".into(), c.bounced),
                        (
                            "reads_during_invalidation".into(),
                            c.reads_during_invalidation,
                        ),
                        ("peer_reads".into(), cc.peer_reads),
                        ("storage_reads".into(), cc.storage_reads),
                        ("forwards_served".into(), cc.forwards_served),
                        ("revokes".into(), cc.revokes),
                        ("handoffs_sent".into(), cc.handoffs_sent),
                        ("handoffs_taken".into(), cc.handoffs_taken),
                        ("capacity_evictions".into(), cc.capacity_evictions),
                        ("cached_blocks".into(), shard.client.cached() as u64),
                        ("manager_forwards".into(), mc.forwards),
                        ("manager_fetches".into(), mc.fetches),
                        ("kernel_invalidations".into(), invalidations),
                    ]);
                }
            }
        }
        work += shard.step(256).unwrap_or(0);
        if let Some(tx) = &commands {
            for (from, op, request) in shard.take_commands() {
                work += 1;
                if let Err(e) = tx.try_send((from, op, request)) {
                    let why = match e {
                        mpsc::TrySendError::Full(_) => "busy: too many commands queued",
                        mpsc::TrySendError::Disconnected(_) => "the command thread has stopped",
                    };
                    shard.command_done(from, op, Err(why.into()));
                }
            }
        }
        let asked = shard.take_kernel_requests();
        if !asked.is_empty() || !unsent.is_empty() {
            work += asked.len();
            unsent.extend(asked);
            // Sent under the lock: once the mount's stream clears the link, no batch can
            // still be on its way into the old queue.
            let link = lock(&mount);
            let done = match link.as_ref() {
                Some(tx) => match tx.try_send(std::mem::take(&mut unsent)) {
                    Ok(()) => Vec::new(),
                    // The mount is behind: hold them back for the next turn.
                    Err(mpsc::TrySendError::Full(v)) => {
                        unsent = v;
                        Vec::new()
                    }
                    Err(mpsc::TrySendError::Disconnected(v)) => v,
                },
                None => std::mem::take(&mut unsent),
            };
            drop(link);
            invalidations += done.len() as u64;
            for b in done {
                shard.kernel_done(b);
            }
        }
        for c in shard.take_completions() {
            if let Some((i, tx)) = ops.remove(&c.op) {
                let _ = tx.send((i, Ok(c.outcome)));
            }
        }
        for (op, r) in shard.take_sync_done() {
            if let Some(tx) = syncs.remove(&op) {
                let _ = tx.send(r);
            }
        }
        for (op, r) in shard.take_call_done() {
            if let Some((_, tx)) = calls.remove(&op) {
                let _ = tx.send(r);
            }
        }
        if let Some(e) = shard.last_error() {
            let e = e.to_string();
            if last_error.as_ref() != Some(&e) {
                eprintln!("xfs-node: shard: {e}");
                last_error = Some(e);
            }
        }
        if work == 0 {
            idle += 1;
            if idle > 64 {
                // A message, a timer of the endpoint, or a queued command (the transport's
                // notifier) wakes it.
                let _ = shard.wait(Duration::from_millis(50));
            } else {
                std::thread::yield_now();
            }
        } else {
            idle = 0;
        }
    }
}

/// A running node.
pub struct Node {
    /// The configuration.
    pub config: Config,
    /// This node.
    pub id: NodeId,
    /// The client API (every node has one; a node without the client role serves only
    /// the control socket's status).
    pub client: Arc<FsClient<NodeBlocks>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    log: LogControl,
    ready: Arc<AtomicBool>,
    mount: MountLink,
    cleaners: Cleaners,
    /// Files the periodic write-back made durable.
    periodic: Arc<AtomicU64>,
    log_check: LogCheckFn,
}

/// The answer to an unlink or rename: the open file whose last name went, if any.
fn kept(ino: Option<u64>) -> Response {
    ino.map_or(Response::Ok, Response::Ino)
}

/// Per stripe group this node may lead: the leader it sees and, if it leads, the state.
type Cleaners = Arc<Mutex<BTreeMap<u32, (Option<NodeId>, Option<CleanerStatus>)>>>;

/// The leader's link to the writers of its group: cleaner commands over the shards.
struct NodeGroup<'a> {
    blocks: &'a NodeBlocks,
}

impl cleaner::Group for NodeGroup<'_> {
    fn call(&mut self, writer: NodeId, cmd: &cleaner::Command) -> Result<cleaner::Reply, String> {
        let request = bincode::serialize(cmd).map_err(|e| e.to_string())?;
        // A usage query is quick (a dead writer is skipped after 3 s); cleaning and
        // checkpointing take their time.
        let timeout = match cmd {
            cleaner::Command::Usage { .. } | cleaner::Command::Ping => Duration::from_secs(3),
            _ => Duration::from_secs(120),
        };
        let answer = self.blocks.call(writer, request, timeout)?;
        bincode::deserialize(&answer).map_err(|e| format!("node {writer}: bad answer: {e}"))
    }
}

/// The cleaner of stripe group `group` on a node that may lead it: the first of
/// `candidates` (the group's servers, in config order) that answers leads; it looks at
/// the group every second and cleans when its policy says so.
/// Every tenth of `age`, make durable the files whose oldest unsynced write is `age`
/// old; `synced` counts the files so written back (`periodic_write_backs` in the status).
fn write_back_loop(
    client: Arc<FsClient<NodeBlocks>>,
    age: Duration,
    ready: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    synced: Arc<AtomicU64>,
) {
    let tick = (age / 10).max(Duration::from_millis(100));
    let mut next = Instant::now() + tick;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        if Instant::now() < next || !ready.load(Ordering::Relaxed) {
            continue;
        }
        next = Instant::now() + tick;
        match client.write_back_older_than(age.as_nanos() as u64) {
            Ok(n) => {
                synced.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) => {
                eprintln!("xfs-node: periodic write-back: {e} (the blocks stay dirty; retried)")
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn cleaner_loop(
    id: NodeId,
    group: u32,
    candidates: Vec<NodeId>,
    writers: Vec<NodeId>,
    cfg: cleaner::CleanerConfig,
    client: Arc<FsClient<NodeBlocks>>,
    ready: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    cleaners: Cleaners,
) {
    let mut leader: Option<cleaner::Leader> = None;
    let ping = bincode::serialize(&cleaner::Command::Ping).unwrap_or_default();
    let nap = |stop: &AtomicBool, d: Duration| {
        let end = Instant::now() + d;
        while Instant::now() < end && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50).min(d));
        }
    };
    while !stop.load(Ordering::Relaxed) {
        if !ready.load(Ordering::Relaxed) {
            nap(&stop, Duration::from_millis(200));
            continue;
        }
        let lead = cleaner::leader_of(&candidates, |n| {
            n == id
                || client
                    .blocks
                    .call(n, ping.clone(), Duration::from_secs(3))
                    .is_ok()
        });
        if lead != Some(id) {
            leader = None;
            lock(&cleaners).insert(group, (lead, None));
            nap(&stop, Duration::from_secs(1));
            continue;
        }
        let l = leader.get_or_insert_with(|| {
            eprintln!("xfs-node {id}: leading the cleaner of stripe group {group}");
            let l = cleaner::Leader::new(cfg.clone());
            lock(&cleaners).insert(group, (Some(id), Some(l.status.clone())));
            l
        });
        let before = l.status.clone();
        let cleaned = l.round(
            &mut NodeGroup {
                blocks: &client.blocks,
            },
            &writers,
            crate::storage::log::wall_clock_ms(),
            &mut |work| nap(&stop, cfg.pause(work)),
        );
        let s = &l.status;
        if cleaned > 0 {
            eprintln!(
                "xfs-node {id}: cleaner of stripe group {group}: {} segments cleaned ({} blocks, \
                 {} KiB moved, {} discarded), {} freed; {}/{} segments free",
                s.segments_cleaned - before.segments_cleaned,
                s.blocks_moved - before.blocks_moved,
                (s.bytes_moved - before.bytes_moved) >> 10,
                s.discarded - before.discarded,
                s.freed - before.freed,
                s.free_segments,
                s.total_segments
            );
        }
        if !s.last_error.is_empty() && s.last_error != before.last_error {
            eprintln!(
                "xfs-node {id}: cleaner of stripe group {group}: {}",
                s.last_error
            );
        }
        lock(&cleaners).insert(group, (Some(id), Some(s.clone())));
        if cleaned == 0 {
            nap(&stop, Duration::from_millis(200));
        }
    }
}

fn bind_err(what: &str, addr: SocketAddr, e: impl std::fmt::Display) -> String {
    format!("cannot bind the {what} at {addr}: {e} (is another node running on that port?)")
}

/// Make the transport of the configured kind.
pub trait MakeTransport: Send + Sync + 'static {
    /// The transport type.
    type T: Transport + Send + 'static;
    /// Bind one at `addr` (port 0: any).
    fn bind(&self, addr: SocketAddr) -> Result<Self::T, String>;
}

/// UDP.
pub struct Udp;
impl MakeTransport for Udp {
    type T = am_udp::UdpTransport;
    fn bind(&self, addr: SocketAddr) -> Result<Self::T, String> {
        am_udp::UdpTransport::bind(addr, am_udp::UdpConfig::default()).map_err(|e| e.to_string())
    }
}

/// RDMA verbs (RoCE).
pub struct Rdma;
impl MakeTransport for Rdma {
    type T = am_rdma::RdmaTransport;
    fn bind(&self, addr: SocketAddr) -> Result<Self::T, String> {
        am_rdma::RdmaTransport::bind(addr, am_rdma::RdmaConfig::default())
            .map_err(|e| e.to_string())
    }
}

fn endpoint<M: MakeTransport>(
    mk: &M,
    addr: SocketAddr,
    tag: u64,
    segment_bytes: usize,
    what: &str,
) -> Result<Endpoint<M::T>, String> {
    let t = mk.bind(addr).map_err(|e| bind_err(what, addr, e))?;
    Ok(Endpoint::new(
        t,
        am_core::Config {
            tag: Tag(tag),
            segment_bytes,
            ..am_core::Config::default()
        },
    ))
}

impl Node {
    /// Start node `id` of `config` with transport `mk`; returns once every part runs (the
    /// log may still wait for storage servers: see [`Node::is_ready`]).
    pub fn start<M: MakeTransport>(config: Config, id: NodeId, mk: M) -> Result<Node, String> {
        let me = config
            .node(id)
            .ok_or_else(|| format!("node {id} is not in the config's [[nodes]]"))?
            .clone();
        let c = &config.cluster;
        let tag = config.tag();
        let stop = Arc::new(AtomicBool::new(false));
        let ready = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let frag = c.fragment_bytes;
        // Each node's log and its cleaner's reader are clients of every storage server.
        let servers = 2 * config.nodes.len().max(1);

        // Storage server.
        let storage_total = Arc::new(AtomicU64::new(0));
        let storage_free = Arc::new(AtomicU64::new(0));
        if me.has("storage") {
            let path = me.storage.clone().ok_or("no storage path")?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).ok();
            }
            let store = UringStore::open(
                &path,
                UringOptions {
                    fragment_bytes: frag,
                    depth: 64,
                    create_bytes: me.storage_bytes,
                },
            )
            .map_err(|e| format!("storage {}: {e}", path.display()))?;
            storage_total.store((store.slots() * frag) as u64, Ordering::Relaxed);
            let addr = me.storage_addr(c.shards);
            let ep = endpoint(
                &mk,
                addr,
                tag,
                servers * STORE_DEPTH * frag,
                "storage server",
            )?;
            let mut server = StorageServer::new(
                ep,
                store,
                ServerOptions {
                    windows: servers,
                    depth: STORE_DEPTH,
                },
            )
            .map_err(|e| format!("storage server: {e}"))?;
            let s = stop.clone();
            let free = storage_free.clone();
            threads.push(std::thread::spawn(move || {
                let mut last = Instant::now() - Duration::from_secs(10);
                while !s.load(Ordering::Relaxed) {
                    if last.elapsed() > Duration::from_millis(200) {
                        if let Ok(f) = server.store().free_slots() {
                            free.store((f * frag) as u64, Ordering::Relaxed);
                        }
                        last = Instant::now();
                    }
                    if server.step().unwrap_or(0) == 0 {
                        // Woken by a request or a timer of the endpoint.
                        let _ = server.wait(Duration::from_millis(50));
                    }
                }
                let _ = server.store().sync();
            }));
        }

        // Shards.
        let placement = Placement {
            managers: config.manager_map.entries.clone(),
            storages: config.manager_map.entries.clone(),
            index_shift: Some(INDEX_SHIFT),
        };
        let clients: Vec<NodeId> = config
            .nodes
            .iter()
            .filter(|n| n.has("client"))
            .map(|n| n.id)
            .collect();
        let log: SharedLog<M::T> = Arc::new(Mutex::new(None));
        let reader: SharedReader<M::T> = Arc::new(Mutex::new(None));
        let (command_tx, command_rx) = mpsc::sync_channel::<(NodeId, OpId, Vec<u8>)>(64);
        let log_full = Arc::new(AtomicBool::new(false));
        // Bytes of new data this node's log can take now (u64::MAX: no log yet).
        let log_room = Arc::new(AtomicU64::new(u64::MAX));
        let mount: MountLink = Arc::new(Mutex::new(None));
        let mut senders = Vec::new();
        let mut wake = Vec::new();
        for s in 0..c.shards {
            let addr = me.shard_addr(s);
            let ep = endpoint(&mk, addr, tag, 1 << 16, "shard endpoint")?;
            let mut shard = Shard::new(
                ep,
                ShardConfig {
                    node: id,
                    protocol: ProtocolConfig {
                        sequenced: true,
                        n_chance: c.n_chance,
                    },
                    placement: placement.clone(),
                    clients: clients.clone(),
                    capacity: c.cache_blocks,
                },
                LogStore {
                    log: log.clone(),
                    full: log_full.clone(),
                },
            )
            .map_err(|e| format!("shard {s}: {e}"))?;
            for n in &config.nodes {
                if n.id != id {
                    shard
                        .connect(
                            n.id,
                            EndpointName {
                                addr: n.shard_addr(s),
                                vnet: 0,
                            },
                            Tag(tag),
                        )
                        .map_err(|e| format!("shard {s}: {e}"))?;
                }
            }
            let (tx, rx) = mpsc::sync_channel(4096);
            senders.push(tx);
            wake.push(shard.endpoint().transport().notifier());
            let st = stop.clone();
            let ml = mount.clone();
            // Shard 0 hands store commands (the cleaner's) to the command thread.
            let cmds = (s == 0).then(|| command_tx.clone());
            threads.push(std::thread::spawn(move || {
                shard_loop(shard, rx, st, ml, cmds)
            }));
        }
        // The command thread: the cleaner's moves and checkpoints, off the shard loops.
        {
            let (tx0, wake0, log, reader, full, st) = (
                senders[0].clone(),
                wake[0].clone(),
                log.clone(),
                reader.clone(),
                log_full.clone(),
                stop.clone(),
            );
            threads.push(std::thread::spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    let Ok((from, op, request)) =
                        command_rx.recv_timeout(Duration::from_millis(200))
                    else {
                        continue;
                    };
                    let reply = cleaner::serve(&log, &reader, id, &request);
                    if let Some(l) = lock(&log).as_ref() {
                        full.store(l.is_full(), Ordering::Relaxed);
                    }
                    let done = Cmd::CommandDone {
                        from,
                        op,
                        result: Ok(reply),
                    };
                    if tx0.send(done).is_err() {
                        return;
                    }
                    wake0.notify();
                }
            }));
        }

        // The log, once the stripe group's servers answer (they may start after us).
        if me.has("manager") {
            let groups = config.stripe_group_map();
            let gi = (id as usize - 1) % groups.groups.len();
            let g = groups.groups[gi].clone();
            // The managers whose logs share this group's stores (as the cleaner counts them).
            let writers = config
                .nodes
                .iter()
                .filter(|x| x.has("manager") && (x.id as usize - 1) % groups.groups.len() == gi)
                .count();
            let addrs: Vec<(NodeId, SocketAddr)> = g
                .servers
                .iter()
                .filter_map(|s| config.node(*s).map(|n| (*s, n.storage_addr(c.shards))))
                .collect();
            let host = me.host;
            let log2 = log.clone();
            let room2 = log_room.clone();
            let reader2 = reader.clone();
            let ready2 = ready.clone();
            let stop2 = stop.clone();
            let mk = Arc::new(mk);
            threads.push(std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(30);
                // A store client of the server at `addr`, on its own endpoint.
                let connect = |addr: SocketAddr| -> Result<RemoteStore<M::T>, String> {
                    let ep = endpoint(
                        &*mk,
                        SocketAddr::new(host, 0),
                        tag,
                        2 * STORE_DEPTH * frag,
                        "log endpoint",
                    )?;
                    let name = EndpointName { addr, vnet: 0 };
                    let mut rs =
                        RemoteStore::connect(ep, name, Tag(tag), STORE_DEPTH, Box::new(|| {}))
                            .map_err(|e| e.to_string())?;
                    rs.set_timeout(Duration::from_secs(3));
                    Ok(rs)
                };
                let mut stores: Vec<Option<RemoteStore<M::T>>> =
                    addrs.iter().map(|_| None).collect();
                loop {
                    for (i, (node, addr)) in addrs.iter().enumerate() {
                        if stores[i].is_some() {
                            continue;
                        }
                        match connect(*addr) {
                            Ok(rs) => stores[i] = Some(rs),
                            Err(e) if Instant::now() > deadline => {
                                eprintln!(
                                    "xfs-node {id}: storage server of node {node} at {addr}: {e}"
                                )
                            }
                            Err(_) => {}
                        }
                    }
                    let up = stores.iter().filter(|s| s.is_some()).count();
                    if up == stores.len() || (Instant::now() > deadline && up >= g.data()) {
                        break;
                    }
                    if stop2.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                let group = g.clone();
                match Log::recover(id, g, stores) {
                    Ok(mut l) => {
                        l.set_writers(writers);
                        l.set_room_gauge(room2);
                        *lock(&log2) = Some(l);
                        // The cleaner reads segments over connections of its own.
                        let rs = addrs.iter().map(|(_, a)| connect(*a).ok()).collect();
                        *lock(&reader2) = SegmentReader::new(group, rs).ok();
                        ready2.store(true, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("xfs-node {id}: cannot recover the log: {e}");
                        return;
                    }
                }
                // A server marked down (or down at start) that answers again is attached
                // and rebuilt: this log's fragments it misses are recomputed from the others.
                while !stop2.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_secs(2));
                    // The cleaner's connections too (a reader store that died, or was
                    // never connected, is replaced once its server answers).
                    for (i, (_, addr)) in addrs.iter().enumerate() {
                        let dead = lock(&reader2)
                            .as_mut()
                            .and_then(|r| {
                                r.store_slot(i)
                                    .map(|s| s.as_ref().is_none_or(|s| s.is_dead()))
                            })
                            .unwrap_or(false);
                        if dead {
                            if let Ok(rs) = connect(*addr) {
                                if let Some(slot) =
                                    lock(&reader2).as_mut().and_then(|r| r.store_slot(i))
                                {
                                    *slot = Some(rs);
                                }
                            }
                        }
                    }
                    let down = lock(&log2).as_ref().map(|l| l.down()).unwrap_or_default();
                    for i in down {
                        let Some((node, addr)) = addrs.get(i).copied() else {
                            continue;
                        };
                        let Ok(rs) = connect(addr) else {
                            continue;
                        };
                        let mut g = lock(&log2);
                        if let Some(l) = g.as_mut() {
                            match l.rebuild(i, rs) {
                                Ok(n) => eprintln!(
                                    "xfs-node {id}: storage server of node {node} is back: \
                                     rebuilt {n} fragments of this node's log on it"
                                ),
                                Err(e) => {
                                    eprintln!("xfs-node {id}: rebuilding on node {node}: {e}");
                                    l.take_store(i);
                                }
                            }
                        }
                    }
                }
            }));
        } else {
            ready.store(true, Ordering::Relaxed);
        }

        let free = storage_free.clone();
        let room = log_room.clone();
        let data_frags = {
            let groups = config.stripe_group_map();
            groups.groups[(id as usize - 1) % groups.groups.len()].data()
        };
        let blocks = NodeBlocks {
            me: id,
            shards: senders,
            wake,
            next: AtomicU64::new(1),
            statfs: Box::new(move || {
                // In bytes of file data: a segment takes a slot on every server of the
                // group and carries `data` fragments less its summary. Free is what new
                // data may take: the log's room (free segments less the checkpoints' and
                // the cleaner's reserve), which `xfs-node status` shows too.
                let bs = BLOCK as u64;
                let slot_data = (data_frags * frag).saturating_sub(SUMMARY_BYTES) as u64;
                let total = storage_total.load(Ordering::Relaxed) / frag as u64 * slot_data;
                let raw_free = free.load(Ordering::Relaxed) / frag as u64 * slot_data;
                let free = if log_full.load(Ordering::Relaxed) {
                    0
                } else {
                    match room.load(Ordering::Relaxed) {
                        u64::MAX => raw_free,
                        r => r.min(raw_free),
                    }
                };
                Ok(StatFs {
                    bsize: bs,
                    blocks: total / bs,
                    bfree: free / bs,
                    namelen: 255,
                })
            }),
        };
        let client = Arc::new(FsClient::new(blocks, config.manager_map()));
        // A cleaner for each stripe group this node serves (its leader is the first
        // server of the group that answers).
        let cleaners: Cleaners = Default::default();
        {
            let groups = config.stripe_group_map();
            let n = groups.groups.len();
            for (gi, g) in groups.groups.iter().enumerate() {
                if !g.servers.contains(&id) {
                    continue;
                }
                let writers: Vec<NodeId> = config
                    .nodes
                    .iter()
                    .filter(|x| x.has("manager") && (x.id as usize - 1) % n == gi)
                    .map(|x| x.id)
                    .collect();
                let (gid, servers) = (g.id, g.servers.clone());
                let (cfg, c, r, s, cl) = (
                    config.cleaner.clone(),
                    client.clone(),
                    ready.clone(),
                    stop.clone(),
                    cleaners.clone(),
                );
                threads.push(std::thread::spawn(move || {
                    cleaner_loop(id, gid, servers, writers, cfg, c, r, s, cl)
                }));
            }
        }
        // The periodic write-back: what was written and not fsynced is durable within
        // `write_back_secs` and a tenth (checked ten times per period).
        let periodic = Arc::new(AtomicU64::new(0));
        {
            let (c, r, st, n) = (
                client.clone(),
                ready.clone(),
                stop.clone(),
                periodic.clone(),
            );
            let age = Duration::from_secs(config.cluster.write_back_secs);
            threads.push(std::thread::spawn(move || {
                write_back_loop(c, age, r, st, n)
            }));
        }
        let log4 = log.clone();
        let log_check: LogCheckFn =
            Box::new(move |repair| lock(&log4).as_mut().map(|l| l.check(repair)));
        let log3 = log.clone();
        let log_status: LogControl = Box::new(move |what: &str| {
            let mut g = lock(&log3);
            let Some(l) = g.as_mut() else {
                return Ok(Vec::new());
            };
            match what {
                "checkpoint" => l.checkpoint().map_err(|e| e.to_string())?,
                "fsync" => l.fsync().map_err(|e| e.to_string())?,
                _ => {}
            }
            let k = l.counters();
            let live: u64 = l.live_bytes().values().sum();
            Ok(vec![
                ("log_segments".into(), k.segments),
                ("log_degraded_reads".into(), k.degraded_reads),
                ("log_checkpoints".into(), k.checkpoints),
                ("log_servers_lost".into(), k.servers_lost),
                ("log_rebuilt".into(), k.rebuilt),
                ("log_servers_down".into(), l.down().len() as u64),
                ("log_live_bytes".into(), live),
                ("log_blocks".into(), l.imap().len() as u64),
            ])
        });
        let node = Node {
            config,
            id,
            client,
            stop,
            threads,
            log: log_status,
            ready,
            mount,
            cleaners,
            periodic,
            log_check,
        };
        Ok(node)
    }

    /// Whether the log is recovered (and, on the root's manager, the root exists).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Wait for the log, then create the root if this node manages it and it is missing.
    pub fn wait_ready(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while !self.is_ready() {
            if Instant::now() > deadline {
                return Err(format!(
                    "node {}: too few storage servers of its stripe group answered within {:?} \
                     to recover its log: check that they run and that every node uses the same \
                     cluster config (name {:?}, version {})",
                    self.id, timeout, self.config.cluster.name, self.config.cluster.version
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let map = self.client.map();
        if map.manager(map.root()) == self.id {
            self.client
                .format()
                .map_err(|e| format!("node {}: cannot create the root directory: {e}", self.id))?;
        }
        Ok(())
    }

    /// The node's state.
    pub fn status(&self) -> NodeStatus {
        let me = self.config.node(self.id);
        let mut counters = self.client.blocks.counters();
        counters.extend((self.log)("").unwrap_or_default());
        counters.push((
            "periodic_write_backs".into(),
            self.periodic.load(Ordering::Relaxed),
        ));
        let st = self.client.statfs().unwrap_or_default();
        NodeStatus {
            node: self.id,
            roles: me.map(|n| n.roles.clone()).unwrap_or_default(),
            pid: std::process::id(),
            ready: self.is_ready(),
            config_version: self.config.cluster.version,
            map_version: self.config.manager_map.version,
            shards: self.config.cluster.shards,
            servers_down: Vec::new(),
            storage_used_bytes: (st.blocks - st.bfree.min(st.blocks)) * st.bsize,
            storage_total_bytes: st.blocks * st.bsize,
            last_error: None,
            counters,
            cleaners: lock(&self.cleaners)
                .iter()
                .map(|(g, (l, s))| (*g, *l, s.clone()))
                .collect(),
        }
    }

    /// Make the log durable (`checkpoint`: and write a checkpoint).
    pub fn sync_log(&self, checkpoint: bool) -> Result<(), String> {
        (self.log)(if checkpoint { "checkpoint" } else { "fsync" }).map(|_| ())
    }

    /// Serve the control socket at the configured path until a `Shutdown` request or
    /// `stop` is set; a background thread makes the log durable every few seconds.
    pub fn serve(self: Arc<Self>) -> Result<(), String> {
        let path = self
            .config
            .node(self.id)
            .map(|n| n.control.clone())
            .ok_or("no control path")?;
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).ok();
        }
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .map_err(|e| format!("cannot create the control socket {}: {e}", path.display()))?;
        listener.set_nonblocking(true).ok();
        let bg = self.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !bg.stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(1));
                n += 1;
                if n.is_multiple_of(5) {
                    if let Err(e) = bg.sync_log(n.is_multiple_of(60)) {
                        eprintln!("xfs-node {}: background log sync: {e}", bg.id);
                    }
                }
            }
        });
        while !self.stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).ok();
                    let node = self.clone();
                    std::thread::spawn(move || node.connection(stream));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(format!("control socket: {e}")),
            }
        }
        let _ = std::fs::remove_file(&path);
        Ok(())
    }

    fn connection(&self, mut stream: std::os::unix::net::UnixStream) {
        loop {
            let req: Request = match control::recv(&mut stream) {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(e) => {
                    let _ = control::send(
                        &mut stream,
                        &Response::Err {
                            errno: libc::EINVAL,
                            message: format!("bad request: {e}"),
                        },
                    );
                    return;
                }
            };
            if matches!(req, Request::Subscribe) {
                return self.mount_stream(stream);
            }
            let shutdown = matches!(req, Request::Shutdown);
            let resp = self.handle(req);
            let _ = control::send(&mut stream, &resp);
            if shutdown {
                self.stop.store(true, Ordering::Relaxed);
                return;
            }
        }
    }

    /// A mount attached: send it the shards' kernel invalidations on `stream` and route its
    /// answers back; when it goes away, whatever it had not answered completes (its kernel
    /// cache went with it).
    fn mount_stream(&self, mut stream: std::os::unix::net::UnixStream) {
        let (tx, rx) = mpsc::sync_channel::<Vec<BlockId>>(MOUNT_QUEUE);
        {
            let mut g = lock(&self.mount);
            if g.is_some() {
                let _ = control::send(
                    &mut stream,
                    &Response::Err {
                        errno: libc::EBUSY,
                        message: format!("node {} already has a mount attached", self.id),
                    },
                );
                return;
            }
            *g = Some(tx);
        }
        let _ = control::send(&mut stream, &Response::Ok);
        let outstanding: Arc<Mutex<std::collections::BTreeSet<BlockId>>> = Arc::default();
        let gone = Arc::new(AtomicBool::new(false));
        let reader = stream.try_clone().ok().map(|mut r| {
            let out = outstanding.clone();
            let gone = gone.clone();
            let client = self.client.clone();
            std::thread::spawn(move || {
                while let Ok(Some(Request::KernelDone(mut blocks))) = control::recv(&mut r) {
                    blocks.retain(|b| b & control::ADVISORY == 0);
                    {
                        let mut o = lock(&out);
                        for b in &blocks {
                            o.remove(b);
                        }
                    }
                    client.blocks.kernel_done(blocks);
                }
                gone.store(true, Ordering::Relaxed);
            })
        });
        while reader.is_some()
            && !gone.load(Ordering::Relaxed)
            && !self.stop.load(Ordering::Relaxed)
        {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(blocks) => {
                    lock(&outstanding).extend(
                        blocks
                            .iter()
                            .copied()
                            .filter(|b| b & control::ADVISORY == 0),
                    );
                    if control::send(&mut stream, &Response::Invalidate(blocks)).is_err() {
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        *lock(&self.mount) = None;
        let _ = stream.shutdown(std::net::Shutdown::Both);
        if let Some(r) = reader {
            let _ = r.join();
        }
        // Queued and unanswered invalidations complete: no kernel caches them now.
        let mut left: Vec<BlockId> = std::mem::take(&mut *lock(&outstanding))
            .into_iter()
            .collect();
        while let Ok(v) = rx.try_recv() {
            left.extend(v.into_iter().filter(|b| b & control::ADVISORY == 0));
        }
        if !left.is_empty() {
            self.client.blocks.kernel_done(left);
        }
    }

    /// Tell the attached mount (if any) that this node's client changed these blocks for
    /// the CLI: its kernel did not see the change and no revoke will tell it.
    fn advise(&self, blocks: &[BlockId]) {
        if let Some(tx) = lock(&self.mount).as_ref() {
            let _ = tx.try_send(blocks.iter().map(|b| b | control::ADVISORY).collect());
        }
    }

    /// The blocks a CLI change of `name` in `parent` touched: the entry's bucket and the
    /// parent's inode, and (`ino`) the file's inode and data.
    fn advise_path(&self, parent: u64, name: &str, ino: Option<u64>) {
        use crate::fs::layout::{block_id, bucket_of, inode_block};
        let mut v = vec![
            block_id(parent, bucket_of(name.as_bytes())),
            inode_block(parent),
        ];
        if let Some(i) = ino {
            v.push(inode_block(i));
            v.push(block_id(i, 0));
        }
        self.advise(&v);
    }

    fn handle(&self, req: Request) -> Response {
        let c = &self.client;
        let err = |e: Errno, what: &str| Response::Err {
            errno: e.0,
            message: format!("{what}: {e}"),
        };
        match req {
            Request::Status => Response::Status(Box::new(self.status())),
            Request::Put { path, data } => match self.put(&path, &data) {
                Ok(()) => Response::Ok,
                Err(e) => err(e, &path),
            },
            Request::Get { path } => match c.resolve(&path).and_then(|i| {
                if i.kind == Some(Kind::Dir) {
                    return Err(Errno::EISDIR);
                }
                c.read(i.ino, 0, i.size as usize)
            }) {
                Ok(d) => Response::Data(d),
                Err(e) => err(e, &path),
            },
            Request::Ls { path } => match self.ls(&path) {
                Ok(v) => Response::Entries(v),
                Err(e) => err(e, &path),
            },
            Request::Rm { path } => match c.resolve_parent(&path).and_then(|(p, name)| {
                let victim = c.lookup(p.ino, name.as_bytes())?;
                match victim.kind {
                    Some(Kind::Dir) => c.rmdir(p.ino, name.as_bytes())?,
                    _ => c.unlink(p.ino, name.as_bytes())?,
                }
                self.advise_path(p.ino, name, Some(victim.ino));
                c.fsync(p.ino)
            }) {
                Ok(()) => Response::Ok,
                Err(e) => err(e, &path),
            },
            Request::Mkdir { path } => match c
                .resolve_parent(&path)
                .and_then(|(p, name)| {
                    c.mkdir(p.ino, name.as_bytes(), 0o755, 0, 0)?;
                    self.advise_path(p.ino, name, None);
                    Ok(p)
                })
                .and_then(|p| c.fsync(p.ino))
            {
                Ok(()) => Response::Ok,
                Err(e) => err(e, &path),
            },
            Request::Rename { from, to } => match c.resolve_parent(&from).and_then(|(sp, sn)| {
                let (dp, dn) = c.resolve_parent(&to)?;
                let moved = c.lookup(sp.ino, sn.as_bytes())?.ino;
                c.rename(
                    sp.ino,
                    sn.as_bytes(),
                    dp.ino,
                    dn.as_bytes(),
                    crate::fs::client::RenameMode::Replace,
                )?;
                self.advise_path(sp.ino, sn, Some(moved));
                self.advise_path(dp.ino, dn, Some(moved));
                c.fsync(moved)?;
                c.fsync(sp.ino)?;
                c.fsync(dp.ino)
            }) {
                Ok(()) => Response::Ok,
                Err(e) => err(e, &format!("{from} -> {to}")),
            },
            Request::Fsck { repair, namespace } => {
                let ns = if namespace {
                    match crate::fs::fsck::fsck(c, repair) {
                        Ok(r) => Some(r),
                        Err(e) => return err(e, "fsck of the name space"),
                    }
                } else {
                    None
                };
                let (log, log_problems) = match (self.log_check)(repair) {
                    Some((k, p)) => (Some(k), p),
                    None => (None, Vec::new()),
                };
                Response::Fsck(Box::new(control::FsckResult {
                    node: self.id,
                    namespace: ns,
                    log,
                    log_problems,
                }))
            }
            Request::Fs(op) => self.fs(op),
            Request::Flush => match c.sync_all() {
                Ok(()) => Response::Ok,
                Err(e) => err(e, "flush"),
            },
            Request::Checkpoint => {
                // What the cache cannot write (the stores are full) is not acknowledged;
                // what is durable is checkpointed all the same (the log keeps room for it).
                let flushed = c.sync_all();
                match (self.sync_log(true), flushed) {
                    (Ok(()), Ok(())) => Response::Ok,
                    (Ok(()), Err(e)) => err(e, "flush (checkpoint written)"),
                    (Err(e), _) => Response::Err {
                        errno: libc::EIO,
                        message: format!("checkpoint: {e}"),
                    },
                }
            }
            Request::Shutdown => Response::Ok,
            Request::Subscribe | Request::KernelDone(_) => Response::Err {
                errno: libc::EINVAL,
                message: "Subscribe opens a connection of its own; KernelDone answers on it".into(),
            },
        }
    }

    fn put(&self, path: &str, data: &[u8]) -> Result<(), Errno> {
        let c = &self.client;
        let (parent, name) = c.resolve_parent(path)?;
        let ino = match c.lookup(parent.ino, name.as_bytes()) {
            Ok(i) if i.kind == Some(Kind::Dir) => return Err(Errno::EISDIR),
            Ok(i) => {
                c.setattr(
                    i.ino,
                    &crate::fs::client::SetAttr {
                        size: Some(0),
                        ..Default::default()
                    },
                )?;
                i.ino
            }
            Err(Errno::ENOENT) => c.create(parent.ino, name.as_bytes(), 0o644, 0, 0)?.ino,
            Err(e) => return Err(e),
        };
        let written = data
            .chunks(1 << 20)
            .enumerate()
            .try_for_each(|(k, chunk)| c.write(ino, (k << 20) as u64, chunk).map(drop))
            .and_then(|_| {
                self.advise_path(parent.ino, name, Some(ino));
                c.fsync(ino)
            });
        if let Err(e) = written {
            // A put that failed (a full cluster) leaves no partial file behind: its blocks
            // become deletions, its waiting data is dropped, and its space is the cleaner's.
            if c.unlink(parent.ino, name.as_bytes()).is_ok() {
                let _ = c.fsync(ino).and_then(|_| c.fsync(parent.ino));
            }
            return Err(e);
        }
        c.fsync(parent.ino)
    }

    fn ls(&self, path: &str) -> Result<Vec<(Entry, Inode)>, Errno> {
        let c = &self.client;
        let i = c.resolve(path)?;
        if i.kind != Some(Kind::Dir) {
            let name = path.rsplit('/').next().unwrap_or(path).as_bytes().to_vec();
            return Ok(vec![(
                Entry {
                    name,
                    ino: i.ino,
                    kind: i.kind.unwrap_or(Kind::File),
                },
                i,
            )]);
        }
        let mut out = c.readdir_plus(i.ino)?;
        out.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        Ok(out)
    }

    fn fs(&self, op: FsOp) -> Response {
        let c = &self.client;
        let r: Result<Response, Errno> = (|| {
            Ok(match op {
                FsOp::Root => Response::Ino(c.root()),
                FsOp::Mknod {
                    parent,
                    name,
                    mode,
                    uid,
                    gid,
                    rdev,
                } => Response::Attr(Box::new(c.make(
                    parent,
                    &name,
                    if mode & libc::S_IFMT == libc::S_IFREG || mode & libc::S_IFMT == 0 {
                        Kind::File
                    } else {
                        Kind::Special
                    },
                    mode,
                    uid,
                    gid,
                    rdev,
                    &[],
                )?)),
                FsOp::Lookup { parent, name } => Response::Attr(Box::new(c.lookup(parent, &name)?)),
                FsOp::Getattr { ino } => Response::Attr(Box::new(c.getattr(ino)?)),
                FsOp::Create {
                    parent,
                    name,
                    mode,
                    uid,
                    gid,
                } => Response::Attr(Box::new(c.create(parent, &name, mode, uid, gid)?)),
                FsOp::Mkdir {
                    parent,
                    name,
                    mode,
                    uid,
                    gid,
                } => Response::Attr(Box::new(c.mkdir(parent, &name, mode, uid, gid)?)),
                FsOp::Unlink { parent, name, open } => {
                    kept(c.unlink_keeping(parent, &name, &open)?)
                }
                FsOp::Reclaim { ino } => {
                    c.reclaim(ino)?;
                    Response::Ok
                }
                FsOp::Rmdir { parent, name } => {
                    c.rmdir(parent, &name)?;
                    Response::Ok
                }
                FsOp::Rename {
                    sp,
                    sn,
                    dp,
                    dn,
                    mode,
                    open,
                } => kept(c.rename_keeping(sp, &sn, dp, &dn, mode, &open)?),
                FsOp::Link { ino, parent, name } => {
                    Response::Attr(Box::new(c.link(ino, parent, &name)?))
                }
                FsOp::Symlink {
                    parent,
                    name,
                    target,
                    uid,
                    gid,
                } => Response::Attr(Box::new(c.symlink(parent, &name, &target, uid, gid)?)),
                FsOp::Readlink { ino } => Response::Data(c.readlink(ino)?),
                FsOp::Read { ino, offset, len } => Response::Data(c.read(ino, offset, len)?),
                FsOp::Write { ino, offset, data } => {
                    Response::Count(c.write(ino, offset, &data)? as u64)
                }
                FsOp::Fsync { ino } => {
                    c.fsync(ino)?;
                    Response::Ok
                }
                FsOp::Readdir { ino } => Response::Entries(c.readdir_plus(ino)?),
                FsOp::Setattr { ino, attr } => Response::Attr(Box::new(c.setattr(ino, &attr)?)),
                FsOp::Statfs => Response::StatFs(c.statfs()?),
                FsOp::Getxattr { ino, name } => Response::Data(c.getxattr(ino, &name)?),
                FsOp::Setxattr {
                    ino,
                    name,
                    value,
                    mode,
                } => {
                    c.setxattr(ino, &name, &value, mode)?;
                    Response::Ok
                }
                FsOp::Listxattr { ino } => Response::Names(c.listxattr(ino)?),
                FsOp::Removexattr { ino, name } => {
                    c.removexattr(ino, &name)?;
                    Response::Ok
                }
            })
        })();
        r.unwrap_or_else(|e| Response::Err {
            errno: e.0,
            message: e.to_string(),
        })
    }

    /// Stop every thread.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
