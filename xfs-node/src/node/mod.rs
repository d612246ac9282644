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

mod cli_ops;
pub mod config;
pub mod control;
mod control_server;
mod error;
mod mount_link;
mod start;
mod transport;

pub use error::{ServeError, StartError};
pub use mount_link::{MountAnswers, MountAttachment, MountBusy};
pub use transport::{MakeTransport, Rdma, Udp};

/// Starts a thread named `name` (at most 15 bytes show in `top -H`, `perf` and
/// `/proc/PID/task/TID/comm`), as [`std::thread::spawn`] does otherwise (it panics only
/// where that would: the OS refused a thread).
pub fn spawn_named<F, T>(name: &str, f: F) -> std::thread::JoinHandle<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .expect("the OS refused to start a thread")
}

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use am_core::{Endpoint, EndpointName, Tag, Transport};

use crate::coherence::{ActorStore, BlockId, NodeId, OpId, Placement, ProtocolConfig};
use crate::fs::client::{Errno, FsClient, StatFs};
use crate::fs::layout::{Entry, Inode, Kind, BLOCK, INDEX_SHIFT};
use crate::lock;
pub use crate::shard::queue::NodeBlocks;
use crate::shard::queue::{Cmd, MountLink};
use crate::shard::run::{shard_loop, StoreLink};
use crate::shard::{Shard, ShardConfig};
use crate::storage::cleaner::{self, CleanerStatus};
use crate::storage::fragment::FragmentStore;
use crate::storage::log::{Log, LogCheck, LogError, SegmentReader, SUMMARY_BYTES};
use crate::storage::log_actor::{
    self, LogActor, LogActorCounters, ShardInbox, ACTOR_DONE_QUEUE, ACTOR_QUEUE,
};
use crate::storage::remote::{RemoteStore, ServerOptions, StorageServer};
use crate::storage::uring::{UringOptions, UringStore};
use config::Config;
use control::{FsOp, NodeStatus, Request, Response};

/// How long a block operation may take before the client gives up with EIO.
pub const OP_TIMEOUT: Duration = Duration::from_secs(30);
const STORE_DEPTH: usize = 16;

type SharedLog<T> = Arc<Mutex<Option<Log<RemoteStore<T>>>>>;
type SharedReader<T> = Arc<Mutex<Option<SegmentReader<RemoteStore<T>>>>>;
type LogControl = Box<dyn Fn(&str) -> Result<Vec<(String, u64)>, LogError> + Send + Sync>;
/// The log's fsck ([`Log::check`]; `None`: this node keeps no log).
type LogCheckFn = Box<dyn Fn(bool) -> Option<(LogCheck, Vec<String>)> + Send + Sync>;
/// Per stripe group this node may lead: the leader it sees and, if it leads, the state.
type Cleaners = Arc<Mutex<BTreeMap<u32, (Option<NodeId>, Option<CleanerStatus>)>>>;
/// Invalidations a mount may have outstanding before the shards hold the rest back.
const MOUNT_QUEUE: usize = 1024;

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
    /// File-system requests that came over the control socket (a mount in another
    /// process, the CLI); a mount served in this process adds none.
    socket_fs_requests: AtomicU64,
    log_check: LogCheckFn,
    /// What mounts the file system in this process ([`Request::Mount`]), when the process
    /// can ([`Node::set_mounter`]).
    mounter: std::sync::OnceLock<Mounter>,
    /// The membership loop's handles (`None`: `[cluster] membership = false`).
    membership: Option<MembershipHandle>,
}

/// What the node keeps of its membership loop.
pub(crate) struct MembershipHandle {
    /// Changes asked for on the control socket.
    pub(crate) requests: mpsc::SyncSender<crate::membership::run::ChangeRequest>,
    /// Its status, published each turn.
    pub(crate) status: Arc<Mutex<crate::membership::MembershipStatus>>,
    /// Whether this node's incarnation is a member.
    pub(crate) joined: Arc<AtomicBool>,
}

/// Mounts the file system at a directory in the node's process and returns once mounted,
/// or the errno and why it could not (EBUSY: the node is mounted already): set by the
/// process that hosts the node and a FUSE front.
pub type Mounter =
    Box<dyn Fn(&std::path::Path, MountFlags) -> Result<(), (i32, String)> + Send + Sync>;

/// How a [`Request::Mount`] asks to mount.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MountFlags {
    /// Let other users than the mounting one in.
    pub allow_other: bool,
    /// Read-only.
    pub read_only: bool,
}

impl Node {
    /// Let this node take [`Request::Mount`]: `mounter` mounts in this process. Set once
    /// (false if it was set already).
    pub fn set_mounter(&self, mounter: Mounter) -> bool {
        self.mounter.set(mounter).is_ok()
    }

    /// Whether the log is recovered (and, on the root's manager, the root exists), and,
    /// with a membership log, this node's incarnation is a member.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
            && self
                .membership
                .as_ref()
                .is_none_or(|m| m.joined.load(Ordering::Relaxed))
    }

    /// Whether this node left the cluster (`xfs-node leave`) and waits for `join`.
    pub fn has_left(&self) -> bool {
        let m = self.membership();
        m.members
            .iter()
            .any(|(n, _, state, _)| *n == self.id && state == "left")
    }

    /// The membership as this node applied it (`enabled: false` without a membership log).
    pub fn membership(&self) -> crate::membership::MembershipStatus {
        self.membership
            .as_ref()
            .map(|m| lock(&m.status).clone())
            .unwrap_or_default()
    }

    /// Propose a membership change (`xfs-node join`, `leave`); it takes effect once the
    /// cluster commits it.
    pub fn propose(&self, change: crate::membership::Change) -> Result<(), String> {
        let m = self
            .membership
            .as_ref()
            .ok_or("this cluster keeps no membership log ([cluster] membership = false)")?;
        let (tx, rx) = mpsc::channel();
        m.requests
            .try_send((change, tx))
            .map_err(|_| "the membership loop is busy or stopped: try again".to_string())?;
        rx.recv_timeout(Duration::from_secs(5))
            .map_err(|_| "the membership loop did not answer within 5 s".to_string())?
    }

    /// Wait for the log, then create the root if this node manages it and it is missing.
    pub fn wait_ready(&self, timeout: Duration) -> Result<(), StartError> {
        let deadline = Instant::now() + timeout;
        // A node that left (`xfs-node leave`) waits for `join` on its control socket (its
        // log is recovered once it joins: the join's epoch is its log's generation).
        let out_by_leave = || self.has_left();
        while !(self.is_ready() || out_by_leave()) {
            if Instant::now() > deadline {
                return Err(StartError::NotReady {
                    node: self.id,
                    timeout,
                    cluster: self.config.cluster.name.clone(),
                    version: self.config.cluster.version,
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let map = self.client.map();
        if self.is_ready() && map.manager(map.root()) == self.id {
            self.client.format().map_err(|source| StartError::Root {
                node: self.id,
                source,
            })?;
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
        counters.push((
            "socket_fs_requests".into(),
            self.socket_fs_requests.load(Ordering::Relaxed),
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
            membership: self.membership(),
            counters,
            cleaners: lock(&self.cleaners)
                .iter()
                .map(|(g, (l, s))| (*g, *l, s.clone()))
                .collect(),
        }
    }

    /// Make the log durable (`checkpoint`: and write a checkpoint).
    pub fn sync_log(&self, checkpoint: bool) -> Result<(), LogError> {
        (self.log)(if checkpoint { "checkpoint" } else { "fsync" }).map(|_| ())
    }

    /// Stop every thread.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
