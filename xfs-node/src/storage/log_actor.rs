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

use std::collections::{BTreeMap, BTreeSet};

use crate::coherence::{BlockId, NodeId, SyncError};
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

/// A log of another home that this node took over (manager failover: the home's slots
/// moved here by a committed map change, and with them the home's log).
pub enum Adopted<S: FragmentStore> {
    /// Asked for in the given membership epoch (the generation the log's storage clients
    /// connect in, fencing the home's own, older connections); being recovered. Work for
    /// its blocks waits.
    Wanted(u64),
    /// Recovered: the storage role of the home's blocks runs on it.
    Ready(Box<Log<S>>),
    /// Could not be recovered (retried): work for its blocks fails.
    Failed(u64, String),
}

/// The adopted logs, by home node.
pub type AdoptedLogs<S> = Arc<Mutex<BTreeMap<NodeId, Adopted<S>>>>;

/// Which log a block lives in: its slot's home's (`homes[(block >> shift) % len]`), this
/// node's own when the home is `me`.
#[derive(Clone, Debug)]
pub struct HomeRoute {
    /// This node.
    pub me: NodeId,
    /// Per manager slot, its home (the configured manager map).
    pub homes: Vec<NodeId>,
    /// The shift that takes a block to its index number's slot bits.
    pub shift: u32,
}

impl HomeRoute {
    /// The home of `block`'s slot.
    pub fn home(&self, block: BlockId) -> NodeId {
        self.homes[((block >> self.shift) % self.homes.len() as u64) as usize]
    }
}

/// Longest the actor waits for an adopted log to be recovered before it fails the work
/// that needs it.
const ADOPT_WAIT: Duration = Duration::from_secs(60);

/// The node's log actor (see the module docs).
pub struct LogActor<S: FragmentStore> {
    log: Arc<Mutex<Option<Log<S>>>>,
    full: Arc<AtomicBool>,
    counters: LogActorCounters,
    /// Logs taken over from failed homes, and how blocks find theirs (`None`: one log).
    adopted: Option<(AdoptedLogs<S>, HomeRoute)>,
    /// Whether this node has a log of its own to wait for (it is recovered after the node
    /// joins, and again after a rejoin).
    own_expected: bool,
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
            adopted: None,
            own_expected: false,
        }
    }

    /// Wait (up to [`ADOPT_WAIT`]) for this node's own log when it is not recovered yet,
    /// rather than failing the work for it.
    pub fn expecting_own_log(mut self) -> Self {
        self.own_expected = true;
        self
    }

    /// Route the blocks of other homes' slots to `adopted` (see [`Adopted`]).
    pub fn with_adopted(mut self, adopted: AdoptedLogs<S>, route: HomeRoute) -> Self {
        self.adopted = Some((adopted, route));
        self
    }

    /// The other homes this batch's blocks live in.
    fn homes_of<K>(&self, work: &[(K, StoreWork<Vec<u8>>)]) -> BTreeSet<NodeId> {
        let Some((_, route)) = &self.adopted else {
            return BTreeSet::new();
        };
        work.iter()
            .filter_map(|(_, w)| match w {
                StoreWork::Block(r) => Some(route.home(r.block)),
                StoreWork::Sync(_) => None,
            })
            .filter(|h| *h != route.me)
            .collect()
    }

    /// Wait (up to [`ADOPT_WAIT`]) until none of `homes`' logs is still being recovered.
    fn wait_adopted(&self, homes: &BTreeSet<NodeId>) {
        let Some((adopted, _)) = &self.adopted else {
            return;
        };
        let deadline = std::time::Instant::now() + ADOPT_WAIT;
        while std::time::Instant::now() < deadline {
            let g = lock(adopted);
            if !homes
                .iter()
                .any(|h| matches!(g.get(h), Some(Adopted::Wanted(_))))
            {
                return;
            }
            drop(g);
            std::thread::sleep(Duration::from_millis(10));
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
        let homes = self.homes_of(&work);
        if !homes.is_empty() {
            self.wait_adopted(&homes);
        }
        if self.own_expected {
            let deadline = std::time::Instant::now() + ADOPT_WAIT;
            while lock(&self.log).is_none() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let mut done = Vec::with_capacity(work.len());
        let mut syncs = Vec::new();
        let mut g = lock(&self.log);
        let mut others = self.adopted.as_ref().map(|(a, _)| lock(a));
        let route = self.adopted.as_ref().map(|(_, r)| r);
        for (k, w) in work {
            match w {
                StoreWork::Block(req) => {
                    self.counters.blocks += 1;
                    let home = route.map(|r| (r.home(req.block), r.me));
                    let log = match (home, others.as_mut()) {
                        (Some((home, me)), Some(o)) if home != me => match o.get_mut(&home) {
                            Some(Adopted::Ready(l)) => Ok(&mut **l),
                            Some(Adopted::Failed(_, why)) => Err(format!(
                                "the log of node {home}, taken over here, is not available: {why}"
                            )),
                            _ => Err(format!(
                                "the log of node {home} is not taken over by this node"
                            )),
                        },
                        _ => g
                            .as_mut()
                            .ok_or_else(|| "this node has no log (no manager role)".to_string()),
                    };
                    let result = match (log, req.write) {
                        (Err(e), _) => Err(e),
                        (Ok(log), None) => read(log, req.block).map(Some),
                        (Ok(log), Some(data)) => log
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
            let mut result = match g.as_mut() {
                None => Ok(()),
                Some(log) => {
                    self.counters.fsyncs += 1;
                    log.fsync().map_err(sync_error)
                }
            };
            // The logs taken over are this node's storage role too.
            for a in others.iter_mut().flat_map(|o| o.values_mut()) {
                if let Adopted::Ready(log) = a {
                    self.counters.fsyncs += 1;
                    let r = log.fsync().map_err(sync_error);
                    if result.is_ok() {
                        result = r;
                    }
                }
            }
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
