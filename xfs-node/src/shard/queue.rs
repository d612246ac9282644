//! The shard loops' queues: the commands other threads of the node send a shard loop
//! ([`Cmd`], over a bounded `sync_channel`, with a wake-up of the loop's `wait`), and the
//! client's [`Blocks`] over them ([`NodeBlocks`]: each block operation goes to the shard
//! that owns the block). The loop that takes them: [`super::run::shard_loop`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::coherence::{BlockId, NodeId, OpId, Outcome, SyncError, UserOp};
use crate::fs::client::{Blocks, Errno, StatFs};
use crate::node::OP_TIMEOUT;
use crate::shard::{shard_of, CommandError};

/// Where a store command's answer goes.
pub(crate) type CallReply = Sender<Result<Vec<u8>, CommandError>>;
/// Where a block operation's outcome goes: its index in the caller's batch, and the
/// batch's channel.
pub(crate) type OpReply = (usize, Sender<(usize, OpResult)>);
/// One block operation's outcome.
pub(crate) type OpResult = Result<Outcome<Vec<u8>>, Errno>;
/// The attached mount's queue of kernel invalidations (`None`: no mount; they complete at
/// once).
pub(crate) type MountLink = Arc<Mutex<Option<SyncSender<Vec<BlockId>>>>>;

/// One block operation of a caller's batch.
pub(crate) struct BlockOp {
    pub(crate) op: OpId,
    pub(crate) block: BlockId,
    pub(crate) user: UserOp<Vec<u8>>,
    pub(crate) reply: OpReply,
}

pub(crate) enum Cmd {
    /// The operations of one caller's batch that fall to this shard: one command and one
    /// wake-up per shard, however many blocks (a 1 MiB FUSE write is 256).
    Ops(Vec<BlockOp>),
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
        reply: CallReply,
    },
    /// A store command from `from` ran (on the node's command thread).
    CommandDone {
        from: NodeId,
        op: OpId,
        result: Result<Vec<u8>, CommandError>,
    },
    Stats(Sender<Vec<(String, u64)>>),
    /// The kernel dropped these blocks (the mount's answer to an invalidation).
    KernelDone(Vec<BlockId>),
    /// The cluster committed a membership change (`membership::run`).
    Membership(crate::membership::MembershipUpdate),
}

/// The node's [`Blocks`]: block operations queued to the shard loops.
pub struct NodeBlocks {
    pub(crate) me: NodeId,
    pub(crate) shards: Vec<SyncSender<Cmd>>,
    /// Wake each shard loop from its `wait` when a command is queued.
    pub(crate) wake: Vec<Arc<dyn am_core::Notify>>,
    pub(crate) next: AtomicU64,
    pub(crate) statfs: Box<dyn Fn() -> Result<StatFs, Errno> + Send + Sync>,
    /// Read-ahead in flight ([`Blocks::prefetch`]): its answers come back here (drained,
    /// unread, at the next prefetch) so that at most [`PREFETCH_MAX`] blocks are asked
    /// for ahead at once, node-wide.
    pub(crate) prefetch: Mutex<Prefetch>,
}

/// Blocks a node asks for ahead of its readers at most at once (4 MiB: four read-ahead
/// windows); what is asked beyond is dropped.
pub const PREFETCH_MAX: usize = 1024;

/// A node's read-ahead in flight (see [`NodeBlocks::prefetch`]).
pub(crate) struct Prefetch {
    tx: Sender<(usize, OpResult)>,
    rx: mpsc::Receiver<(usize, OpResult)>,
    in_flight: usize,
}

impl Default for Prefetch {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel();
        Prefetch {
            tx,
            rx,
            in_flight: 0,
        }
    }
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
    ) -> Result<Vec<u8>, CommandError> {
        let (tx, rx) = mpsc::channel();
        let cmd = Cmd::Call {
            op: self.op_id(),
            node,
            request,
            reply: tx,
        };
        self.shards[0]
            .send(cmd)
            .map_err(|_| CommandError::Stopped)?;
        self.wake[0].notify();
        rx.recv_timeout(timeout)
            .map_err(|_| CommandError::Timeout { node, timeout })?
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

impl NodeBlocks {
    /// Send `ops` to their shards, one command and one wake-up per shard, each answering
    /// on `tx` with its index in `ops`; returns how many were sent, and marks in `out`
    /// those whose shard loop is gone as failed. `optional` operations (read-ahead) are
    /// dropped where a shard's queue is full rather than waiting for room.
    fn send_ops(
        &self,
        ops: Vec<(BlockId, UserOp<Vec<u8>>)>,
        tx: &mpsc::Sender<(usize, OpResult)>,
        out: &mut [Option<OpResult>],
        optional: bool,
    ) -> usize {
        let mut by_shard: Vec<Vec<BlockOp>> = (0..self.shards.len()).map(|_| Vec::new()).collect();
        for (i, (block, user)) in ops.into_iter().enumerate() {
            by_shard[shard_of(block, self.shards.len())].push(BlockOp {
                op: self.op_id(),
                block,
                user,
                reply: (i, tx.clone()),
            });
        }
        let mut sent = 0;
        for (s, batch) in by_shard.into_iter().enumerate() {
            if batch.is_empty() {
                continue;
            }
            let k = batch.len();
            let result = if optional {
                match self.shards[s].try_send(Cmd::Ops(batch)) {
                    Err(mpsc::TrySendError::Full(_)) => continue,
                    Err(mpsc::TrySendError::Disconnected(cmd)) => Err(mpsc::SendError(cmd)),
                    Ok(()) => Ok(()),
                }
            } else {
                self.shards[s].send(Cmd::Ops(batch))
            };
            match result {
                Ok(()) => {
                    self.wake[s].notify();
                    sent += k;
                }
                // The shard loop is gone: its operations fail.
                Err(mpsc::SendError(cmd)) => {
                    if let Cmd::Ops(batch) = cmd {
                        for o in batch {
                            if let Some(slot) = out.get_mut(o.reply.0) {
                                *slot = Some(Err(Errno::EIO));
                            }
                        }
                    }
                }
            }
        }
        sent
    }
}

impl Blocks for NodeBlocks {
    fn run(&self, ops: Vec<(BlockId, UserOp<Vec<u8>>)>) -> Vec<Result<Outcome<Vec<u8>>, Errno>> {
        let n = ops.len();
        let (tx, rx) = mpsc::channel();
        let mut out: Vec<Option<Result<Outcome<Vec<u8>>, Errno>>> = vec![None; n];
        let sent = self.send_ops(ops, &tx, &mut out, false);
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

    fn prefetch(&self, mut blocks: Vec<BlockId>) -> usize {
        // One caller at a time; another one meanwhile skips its read-ahead (a hint).
        let Ok(mut p) = self.prefetch.try_lock() else {
            return 0;
        };
        // Nobody waits for the answers: what came back is only counted.
        while p.rx.try_recv().is_ok() {
            p.in_flight = p.in_flight.saturating_sub(1);
        }
        blocks.truncate(PREFETCH_MAX.saturating_sub(p.in_flight));
        let n = blocks.len();
        let ops = blocks.into_iter().map(|b| (b, UserOp::Prefetch)).collect();
        let tx = p.tx.clone();
        let sent = self.send_ops(ops, &tx, &mut [], true);
        p.in_flight += sent;
        // A shard whose queue was full dropped its part (not necessarily the last blocks):
        // then report none taken past the first, so the reader asks again.
        if sent == n {
            n
        } else {
            0
        }
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
