//! The shard loop: the thread that drives one [`Shard`] (its AM endpoint and the
//! coherence state of its blocks), taking the node's commands ([`Cmd`]) from its queue,
//! handing its storage work to the node's log actor and taking the answers back
//! ([`StoreLink`]), sending kernel invalidations to the attached mount, and sleeping in the
//! endpoint's `wait` when idle. It never waits for the store, the mount or a peer.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use am_core::Transport;

use super::queue::{CallReply, Cmd, MountLink, OpReply};
use super::{CommandError, Shard, StoreDone, StoreWork};
use crate::coherence::{ActorStore, BlockId, Epoch, NodeId, OpId, SyncError};
use crate::lock;

/// The shard a node runs: block data as bytes, its storage work done by the log actor.
type NodeShard<T> = Shard<T, Vec<u8>, ActorStore>;

/// A shard loop's link to the node's log actor (`storage::log_actor::serve`; the
/// whole-cluster simulation links its shards to their actors with it too).
pub(crate) struct StoreLink {
    /// The actor's queue of work: (this shard, its work in order).
    pub(crate) work: SyncSender<(usize, Vec<StoreWork<Vec<u8>>>)>,
    /// This shard's answers.
    pub(crate) done: Receiver<Vec<StoreDone<Vec<u8>>>>,
    /// This shard's index.
    pub(crate) shard: usize,
    /// Work the actor's queue had no room for, in order, for the next turn.
    held: Vec<StoreWork<Vec<u8>>>,
}

impl StoreLink {
    pub(crate) fn new(
        work: SyncSender<(usize, Vec<StoreWork<Vec<u8>>>)>,
        done: Receiver<Vec<StoreDone<Vec<u8>>>>,
        shard: usize,
    ) -> StoreLink {
        StoreLink {
            work,
            done,
            shard,
            held: Vec::new(),
        }
    }

    /// Give the shard the actor's answers; returns how many.
    #[inline]
    pub(crate) fn take_answers<T: Transport + Send>(&mut self, shard: &mut NodeShard<T>) -> usize {
        let mut n = 0;
        loop {
            match self.done.try_recv() {
                Ok(v) => {
                    n += v.len();
                    shard.store_done(v);
                }
                Err(TryRecvError::Empty) => return n,
                // The actor is gone (the node is stopping): nothing more will come.
                Err(TryRecvError::Disconnected) => return n,
            }
        }
    }

    /// Hand the shard's new store work to the actor (never waiting: what does not fit
    /// waits here, in order). Returns how many pieces were new, at least 1 while work is
    /// held back (the loop turns again soon rather than sleep: the actor wakes only the
    /// shards it answers).
    #[inline]
    pub(crate) fn send<T: Transport + Send>(&mut self, shard: &mut NodeShard<T>) -> usize {
        let (n, held) = self.hand_over(shard);
        if held {
            n.max(1)
        } else {
            n
        }
    }

    /// [`StoreLink::send`]'s work: how many pieces were new, and whether work is held
    /// back because the actor's queue is full.
    #[inline]
    pub(crate) fn hand_over<T: Transport + Send>(
        &mut self,
        shard: &mut NodeShard<T>,
    ) -> (usize, bool) {
        let new = shard.take_store_work();
        let n = new.len();
        self.held.extend(new);
        if self.held.is_empty() {
            return (n, false);
        }
        match self
            .work
            .try_send((self.shard, std::mem::take(&mut self.held)))
        {
            Ok(()) => {}
            // Kept for the next turn.
            Err(mpsc::TrySendError::Full((_, v))) => {
                self.held = v;
                return (n, true);
            }
            Err(mpsc::TrySendError::Disconnected((_, v))) => {
                // No actor: every piece fails, as a store that cannot be reached would.
                let gone = "the node's log actor has stopped".to_string();
                shard.store_done(v.into_iter().map(|w| match w {
                    StoreWork::Block(r) => StoreDone::Block {
                        block: r.block,
                        reply: r.reply,
                        result: Err(gone.clone()),
                    },
                    StoreWork::Sync(asked) => StoreDone::Sync {
                        asked,
                        result: Err(SyncError::io(gone.clone())),
                    },
                }));
            }
        }
        (n, false)
    }
}

/// The callers waiting for an answer of the shard, by operation.
#[derive(Default)]
struct Waiting {
    ops: BTreeMap<OpId, OpReply>,
    syncs: BTreeMap<OpId, Sender<Result<(), SyncError>>>,
    /// Store commands in flight (those older than two minutes are dropped unanswered when
    /// the next one comes: a dead peer).
    calls: BTreeMap<OpId, (Instant, CallReply)>,
    /// Batches of block operations taken ([`Cmd::Ops`]: one per caller's batch that
    /// touches this shard).
    batches: u64,
}

/// Kernel invalidations on their way to the attached mount (the whole-cluster simulation
/// runs it too, `fs::sim`).
#[derive(Default)]
pub(crate) struct KernelQueue {
    /// Asked for, not yet taken by the mount (it was behind).
    unsent: Vec<BlockId>,
    /// Invalidations done so far (the `kernel_invalidations` counter).
    pub(crate) done: u64,
}

pub(crate) fn shard_loop<T: Transport + Send>(
    mut shard: NodeShard<T>,
    rx: Receiver<Cmd>,
    stop: Arc<AtomicBool>,
    mount: MountLink,
    commands: Option<SyncSender<(NodeId, OpId, Vec<u8>)>>,
    mut store: StoreLink,
    suspects: Option<SyncSender<(NodeId, Epoch)>>,
) {
    // Kernel invalidations go to the attached mount (if any) and complete when it answers;
    // storage work goes to the log actor.
    shard.external_kernel = true;
    shard.external_store = true;
    shard.external_commands = commands.is_some();
    // With a membership loop, a peer found unreachable is the cluster's to remove.
    shard.fenced_failures = suspects.is_some();
    if suspects.is_some() {
        // Nothing is taken or served until this incarnation's join commits.
        shard.await_join();
    }
    shard.announce();
    let mut suspects_again = Instant::now();
    let mut waiting = Waiting::default();
    let mut kernel = KernelQueue::default();
    let mut idle = 0u32;
    let mut last_error: Option<String> = None;
    while !stop.load(Ordering::Relaxed) {
        let mut work = 0;
        while let Ok(cmd) = rx.try_recv() {
            work += 1;
            take_cmd(&mut shard, cmd, &mut waiting, kernel.done);
        }
        work += store.take_answers(&mut shard);
        work += shard.step(256).unwrap_or(0);
        work += store.send(&mut shard);
        if let Some(tx) = &commands {
            work += pass_commands(&mut shard, tx);
        }
        work += kernel.send(&mut shard, &mount);
        if let Some(tx) = &suspects {
            let mut report = shard.take_suspects();
            if suspects_again.elapsed() >= SUSPECTS_AGAIN {
                // Until the cluster removes them: a proposal can be lost with a leader.
                suspects_again = Instant::now();
                report.extend(shard.suspects_waiting());
                shard.tick_moves();
            }
            for s in report {
                // Full: reported again later.
                let _ = tx.try_send(s);
            }
        }
        for op in shard.take_failed_ops() {
            waiting.fail_op(op);
        }
        waiting.answer(&mut shard);
        report_error(&shard, &mut last_error);
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

/// Hand one command from the node to the shard, noting where its answer goes.
#[inline]
fn take_cmd<T: Transport + Send>(
    shard: &mut NodeShard<T>,
    cmd: Cmd,
    waiting: &mut Waiting,
    invalidations: u64,
) {
    match cmd {
        Cmd::Ops(ops) => {
            waiting.batches += 1;
            for o in ops {
                if !shard.is_joined() {
                    // Removed, or not joined yet: no peer would take its messages.
                    let (i, tx) = o.reply;
                    let _ = tx.send((i, Err(crate::fs::client::Errno::EIO)));
                    continue;
                }
                waiting.ops.insert(o.op, o.reply);
                shard.submit(o.op, o.block, o.user);
            }
        }
        Cmd::Sync { reply, .. } if !shard.is_joined() => {
            let _ = reply.send(Err(SyncError::io(
                "this node is not a member of the cluster (starting, or removed): try again",
            )));
        }
        Cmd::Sync { op, node, reply } => {
            waiting.syncs.insert(op, reply);
            shard.sync(op, node);
        }
        Cmd::Call {
            op,
            node,
            request,
            reply,
        } => {
            let calls = &mut waiting.calls;
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
        Cmd::Membership(u) => {
            if u.me_removed {
                let dropped = shard.fenced_self();
                let n = waiting.fail_all();
                eprintln!(
                    "xfs-node: shard: removed by the cluster: {dropped} cached blocks dropped, \
                     {n} operations failed with EIO"
                );
            }
            shard.set_membership(
                u.fence,
                &u.removed,
                &u.rejoined,
                u.joined_since,
                (&u.managers, u.managers_epoch),
            );
        }
        Cmd::Stats(tx) => {
            let mut v = stats(shard, invalidations);
            v.push(("op_batches".into(), waiting.batches));
            let _ = tx.send(v);
        }
    }
}

/// The shard's counters, named, for `xfs-node status`.
fn stats<T: Transport + Send>(shard: &NodeShard<T>, invalidations: u64) -> Vec<(String, u64)> {
    let c = shard.counters();
    let cc = shard.client.counters;
    let mc = shard.manager.counters;
    vec![
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
        ("fenced".into(), c.fenced),
        ("held_for_epoch".into(), c.held_for_epoch),
        ("fenced_self".into(), c.fenced_self),
        ("answered_for_removed".into(), c.answered_for_removed),
        ("blocks_moved".into(), c.blocks_moved),
        ("moved_write_backs".into(), c.moved_write_backs),
        ("ops_run_again".into(), c.ops_run_again),
        ("held_for_move".into(), c.held_for_move),
        ("not_managed_here".into(), c.not_managed_here),
        ("moves_expired".into(), c.moves_expired),
        ("moves_announced".into(), c.moves_announced),
        ("move_barrier_waiting".into(), shard.move_gauges()[0]),
        ("move_held_now".into(), shard.move_gauges()[1]),
        ("move_write_backs_now".into(), shard.move_gauges()[2]),
        ("move_kernel_now".into(), shard.move_gauges()[3]),
        ("move_announce_waits".into(), shard.move_gauges()[4]),
    ]
}

/// Pass the store commands peers sent to the command thread; one it cannot take is
/// answered at once with the reason. Returns how many there were.
#[inline]
fn pass_commands<T: Transport + Send>(
    shard: &mut NodeShard<T>,
    tx: &SyncSender<(NodeId, OpId, Vec<u8>)>,
) -> usize {
    let mut work = 0;
    for (from, op, request) in shard.take_commands() {
        work += 1;
        if let Err(e) = tx.try_send((from, op, request)) {
            let why = match e {
                mpsc::TrySendError::Full(_) => CommandError::Busy,
                mpsc::TrySendError::Disconnected(_) => CommandError::CommandThreadStopped,
            };
            shard.command_done(from, op, Err(why));
        }
    }
    work
}

impl KernelQueue {
    /// Invalidations held back for the next turn (the mount was behind).
    #[cfg(feature = "sim")]
    pub(crate) fn held(&self) -> usize {
        self.unsent.len()
    }

    /// Send the invalidations the shard asked for (and those held back) to the mount;
    /// with no mount attached, or a mount gone, they are done at once. Returns how many
    /// were asked for.
    #[inline]
    pub(crate) fn send<T: Transport + Send>(
        &mut self,
        shard: &mut NodeShard<T>,
        mount: &MountLink,
    ) -> usize {
        let asked = shard.take_kernel_requests();
        if asked.is_empty() && self.unsent.is_empty() {
            return 0;
        }
        let work = asked.len();
        self.unsent.extend(asked);
        // Sent under the lock: once the mount's stream clears the link, no batch can
        // still be on its way into the old queue.
        let link = lock(mount);
        let done = match link.as_ref() {
            Some(tx) => match tx.try_send(std::mem::take(&mut self.unsent)) {
                Ok(()) => Vec::new(),
                // The mount is behind: hold them back for the next turn.
                Err(mpsc::TrySendError::Full(v)) => {
                    self.unsent = v;
                    Vec::new()
                }
                Err(mpsc::TrySendError::Disconnected(v)) => v,
            },
            None => std::mem::take(&mut self.unsent),
        };
        drop(link);
        self.done += done.len() as u64;
        for b in done {
            shard.kernel_done(b);
        }
        work
    }
}

/// How often a shard reports again the suspects whose messages still wait.
const SUSPECTS_AGAIN: Duration = Duration::from_secs(2);

impl Waiting {
    /// Fail one operation with EIO (given up: see `Shard::take_failed_ops`).
    fn fail_op(&mut self, op: OpId) {
        if let Some((i, tx)) = self.ops.remove(&op) {
            let _ = tx.send((i, Err(crate::fs::client::Errno::EIO)));
        }
    }
    /// Fail every operation, sync and store command waiting here with EIO (this node was
    /// removed: its state machines started afresh). Returns how many.
    fn fail_all(&mut self) -> usize {
        let n = self.ops.len() + self.syncs.len() + self.calls.len();
        for (_, (i, tx)) in std::mem::take(&mut self.ops) {
            let _ = tx.send((i, Err(crate::fs::client::Errno::EIO)));
        }
        for (_, tx) in std::mem::take(&mut self.syncs) {
            let _ = tx.send(Err(SyncError::io(
                "this node was removed from the cluster (fenced) before its log synced",
            )));
        }
        for (_, (_, tx)) in std::mem::take(&mut self.calls) {
            let _ = tx.send(Err(CommandError::Fenced));
        }
        n
    }

    /// Answer the callers whose operations, syncs and store commands the shard finished.
    #[inline]
    fn answer<T: Transport + Send>(&mut self, shard: &mut NodeShard<T>) {
        for c in shard.take_completions() {
            if let Some((i, tx)) = self.ops.remove(&c.op) {
                let _ = tx.send((i, Ok(c.outcome)));
            }
        }
        for (op, r) in shard.take_sync_done() {
            if let Some(tx) = self.syncs.remove(&op) {
                let _ = tx.send(r);
            }
        }
        for (op, r) in shard.take_call_done() {
            if let Some((_, tx)) = self.calls.remove(&op) {
                let _ = tx.send(r);
            }
        }
    }
}

/// Print the shard's last protocol error once (again only when it changes).
#[inline]
fn report_error<T: Transport + Send>(shard: &NodeShard<T>, last_error: &mut Option<String>) {
    if let Some(e) = shard.last_error() {
        let e = e.to_string();
        if last_error.as_ref() != Some(&e) {
            eprintln!("xfs-node: shard: {e}");
            *last_error = Some(e);
        }
    }
}
