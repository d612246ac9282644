//! The log actor: the one place the shards' storage work reaches the node's log. Each shard
//! loop hands its storage role's block reads and writes and its log syncs
//! ([`StoreWork`]) to the actor over a bounded queue and takes the answers
//! ([`StoreDone`]) back over its own, without ever waiting (`Shard::external_store`): a
//! slow or dead storage server stalls the actor, never a shard loop, so coherence
//! traffic, cached reads and revokes go on.
//!
//! [`LogActor::run`] does one batch of work, from any shards, in the order each shard asked
//! (a read sees every write asked before it); the syncs of a batch share one fsync of the
//! log, done after all of the batch's writes (group commit). It is a plain function of its
//! input and the log: the node runs it on its own thread ([`serve`]), the whole-cluster
//! simulation (`fs::sim`) calls it from its seeded loop, with the answers delayed and
//! batched as the seed says.
//!
//! Off the data path the log is still reached through its mutex (the cleaner's commands,
//! the control socket's status, fsck and checkpoint, rebuilding a server that came back):
//! they share the log with the actor, which holds the lock for one batch at a time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::coherence::{BlockId, SyncError};
use crate::fs::layout::block_name;
use crate::lock;
use crate::shard::{StoreDone, StoreWork};
use crate::storage::fragment::{FragmentStore, StoreError};
use crate::storage::log::{Log, LogError};

/// Most pieces of work one batch takes (then the answers go out and the next batch
/// starts): bounds the time a shard waits for an answer behind other shards' work.
pub const ACTOR_BATCH: usize = 4096;

/// Batches of work the actor's queue holds (one a shard loop turn at most); a shard whose
/// batch does not fit keeps it for its next turn.
pub const ACTOR_QUEUE: usize = 1024;

/// Answer batches each shard's queue from the actor holds (the actor waits for room).
pub const ACTOR_DONE_QUEUE: usize = 1024;

/// What the actor did, for `xfs-node status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogActorCounters {
    /// Batches run.
    pub batches: u64,
    /// Block reads and writes.
    pub blocks: u64,
    /// Syncs answered.
    pub syncs: u64,
    /// Fsyncs of the log those syncs took (fewer: a batch's syncs share one).
    pub fsyncs: u64,
}

/// The node's log actor (see the module docs).
pub struct LogActor<S: FragmentStore> {
    log: Arc<Mutex<Option<Log<S>>>>,
    full: Arc<AtomicBool>,
    counters: LogActorCounters,
}

impl<S: FragmentStore + Send> LogActor<S> {
    /// The actor of `log` (absent on a node without the manager role, or until it is
    /// recovered: then every piece of work fails, and a sync succeeds with nothing to
    /// sync). `full` is set while the log cannot write what it holds (its stores are full):
    /// the node's `statfs` then reports no free space.
    pub fn new(log: Arc<Mutex<Option<Log<S>>>>, full: Arc<AtomicBool>) -> LogActor<S> {
        LogActor {
            log,
            full,
            counters: LogActorCounters::default(),
        }
    }

    /// What it did so far.
    pub fn counters(&self) -> LogActorCounters {
        self.counters
    }

    /// Do a batch of work, each piece tagged by the caller with where its answer goes
    /// (`K`: the shard), in order; returns the answers, tagged the same way.
    pub fn run<K: Copy>(
        &mut self,
        work: Vec<(K, StoreWork<Vec<u8>>)>,
    ) -> Vec<(K, StoreDone<Vec<u8>>)> {
        self.counters.batches += 1;
        let mut done = Vec::with_capacity(work.len());
        let mut syncs = Vec::new();
        let mut g = lock(&self.log);
        for (k, w) in work {
            match w {
                StoreWork::Block(req) => {
                    self.counters.blocks += 1;
                    let result = match (g.as_mut(), req.write) {
                        (None, _) => Err("this node has no log (no manager role)".to_string()),
                        (Some(log), None) => read(log, req.block).map(Some),
                        (Some(log), Some(data)) => log
                            .write(req.block, &data)
                            .map(|()| None)
                            .map_err(|e| e.to_string()),
                    };
                    done.push((
                        k,
                        StoreDone::Block {
                            block: req.block,
                            reply: req.reply,
                            result,
                        },
                    ));
                }
                StoreWork::Sync(asked) => syncs.push((k, asked)),
            }
        }
        if !syncs.is_empty() {
            // One fsync, after every write of the batch, answers all of its syncs: each
            // covers at least the writes asked for before it.
            let result = match g.as_mut() {
                None => Ok(()),
                Some(log) => {
                    self.counters.fsyncs += 1;
                    log.fsync().map_err(sync_error)
                }
            };
            self.counters.syncs += syncs.len() as u64;
            for (k, asked) in syncs {
                let result = result.clone();
                done.push((k, StoreDone::Sync { asked, result }));
            }
        }
        if let Some(log) = g.as_ref() {
            self.full.store(log.is_full(), Ordering::Relaxed);
        }
        done
    }
}

/// Read `block` from `log`: a block never written reads empty; a failure is named by file
/// and byte range ([`block_name`]), so that an operator knows which file lost what (the
/// read that needs it fails with EIO; the file's other blocks still read).
fn read<S: FragmentStore + Send>(log: &mut Log<S>, block: BlockId) -> Result<Vec<u8>, String> {
    match log.read(block) {
        Ok(d) => Ok(d),
        Err(LogError::NotFound(_)) => Ok(Vec::new()),
        Err(e) => {
            let e = format!("{}: {e}", block_name(block));
            eprintln!("xfs-node: cannot read {e}");
            Err(e)
        }
    }
}

/// What a failed log fsync tells the caller: ENOSPC for full stores, EIO otherwise.
fn sync_error(e: LogError) -> SyncError {
    SyncError {
        errno: match e {
            LogError::Store(StoreError::NoSpace { .. }) => libc::ENOSPC,
            _ => libc::EIO,
        },
        message: e.to_string(),
    }
}

/// A shard's side of the actor: where its answers go, and what wakes its loop.
pub struct ShardInbox {
    /// The shard loop's answer queue.
    pub done: SyncSender<Vec<StoreDone<Vec<u8>>>>,
    /// Wakes the shard loop from its wait.
    pub wake: Arc<dyn am_core::Notify>,
}

/// The actor's thread: take the shards' work (`(shard, work)` batches) from `work` (queued
/// batches until it holds [`ACTOR_BATCH`] pieces or more), run it, and send each shard its
/// answers. Returns when `stop` is set or every shard loop has gone; its counters go to
/// `counters`.
pub fn serve<S: FragmentStore + Send>(
    mut actor: LogActor<S>,
    work: Receiver<(usize, Vec<StoreWork<Vec<u8>>>)>,
    shards: Vec<ShardInbox>,
    stop: Arc<AtomicBool>,
    counters: Arc<Mutex<LogActorCounters>>,
) {
    while !stop.load(Ordering::Relaxed) {
        let first = match work.recv_timeout(Duration::from_millis(200)) {
            Ok(w) => w,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        serve_batch(&mut actor, first, &work, &shards, Some(&counters));
    }
}

/// One turn of the actor's thread ([`serve`]; the whole-cluster simulation takes the same
/// turns): `first` and the batches queued behind it, until the batch holds
/// [`ACTOR_BATCH`] pieces or more, run in order, the actor's counters published to
/// `counters`, then each shard's answers sent to its inbox (and its loop woken). Returns
/// the pieces done.
pub fn serve_batch<S: FragmentStore + Send>(
    actor: &mut LogActor<S>,
    first: (usize, Vec<StoreWork<Vec<u8>>>),
    work: &Receiver<(usize, Vec<StoreWork<Vec<u8>>>)>,
    shards: &[ShardInbox],
    counters: Option<&Mutex<LogActorCounters>>,
) -> usize {
    let mut batch: Vec<(usize, StoreWork<Vec<u8>>)> = Vec::new();
    let mut next = Some(first);
    while let Some((s, v)) = next.take() {
        batch.extend(v.into_iter().map(|w| (s, w)));
        if batch.len() < ACTOR_BATCH {
            next = work.try_recv().ok();
        }
    }
    let n = batch.len();
    let mut by_shard: Vec<Vec<StoreDone<Vec<u8>>>> = shards.iter().map(|_| Vec::new()).collect();
    for (s, d) in actor.run(batch) {
        if let Some(v) = by_shard.get_mut(s) {
            v.push(d);
        }
    }
    if let Some(c) = counters {
        *lock(c) = actor.counters();
    }
    for (inbox, done) in shards.iter().zip(by_shard) {
        // A shard loop drains its queue every turn; one that has stopped is gone.
        if !done.is_empty() && inbox.done.send(done).is_ok() {
            inbox.wake.notify();
        }
    }
    n
}
