//! The mounts in the simulation: each node's kernel invalidations go the way a started
//! node sends them, through the shard loop's own [`KernelQueue`] into a bounded
//! [`MountLink`] queue (as `Node::attach_mount` makes it), and a simulated kernel per node
//! takes them late (a seeded number of steps), drops its copies and answers the shard (as
//! the mount's `MountAnswers::kernel_done` does). The shards wait for those answers before
//! they give a block up, as a started node's do.
//!
//! The kernel keeps a copy of every block its node read and serves later reads of it
//! without asking the node, as a mount's page, attribute and entry caches serve reads,
//! stats and lookups (the mount's caches last as long as coherence lets them). A block its
//! own node changes leaves its cache at once (a kernel updates its pages on a write
//! through it). Completions reach the kernel before the invalidations asked after them
//! (the kernel takes an invalidation at the earliest one step after the shard asked), but
//! a read served while an invalidation is under way would land after the kernel dropped
//! its copy and before it answers, as with a real mount. (With the workload's operations
//! one at a time no read overlaps an invalidation; the coherence simulation's do.)

use std::collections::{BTreeMap, VecDeque};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};

use super::FsShard;
use crate::coherence::BlockId;
use crate::shard::queue::MountLink;
use crate::shard::run::KernelQueue;
use crate::shard::shard_of;
use crate::sim::Rng;

/// Batches of invalidations the queue to a simulated mount holds (a started node's holds
/// 1,024): small, so that a shard's batches wait for room and go on a later turn.
pub const SIM_MOUNT_QUEUE: usize = 2;
/// The most steps a simulated kernel takes to answer an invalidation.
pub const SIM_KERNEL_DELAY_STEPS: u64 = 4;

/// One node's mount.
pub struct SimMount {
    link: MountLink,
    rx: Receiver<Vec<BlockId>>,
    /// One per shard, as each shard loop has its own.
    queues: Vec<KernelQueue>,
    /// Invalidations the kernel took, each done at the step given.
    taken: VecDeque<(u64, BlockId)>,
    /// The kernel's copies.
    pub cache: BTreeMap<BlockId, Vec<u8>>,
    /// Reads the kernel served from its copies.
    pub hits: u64,
    /// Invalidations the kernel answered.
    pub invalidations: u64,
}

impl SimMount {
    /// A fresh mount of a node with `shards` shards (its kernel caches nothing yet).
    pub fn new(shards: usize) -> SimMount {
        let (tx, rx) = mpsc::sync_channel(SIM_MOUNT_QUEUE);
        SimMount {
            link: Arc::new(Mutex::new(Some(tx))),
            rx,
            queues: (0..shards).map(|_| KernelQueue::default()).collect(),
            taken: VecDeque::new(),
            cache: BTreeMap::new(),
            hits: 0,
            invalidations: 0,
        }
    }

    /// The kernel's turn at the start of step `now`: it answers the invalidations due,
    /// then takes what the shards queued before this step, each due a seeded number of
    /// steps on. Returns the work done or still pending (so the simulation runs on while
    /// an answer is due).
    pub fn kernel_turn(&mut self, shards: &mut [FsShard], rng: &mut Rng, now: u64) -> usize {
        let mut work = 0;
        while self.taken.front().is_some_and(|(due, _)| *due <= now) {
            let Some((_, block)) = self.taken.pop_front() else {
                break;
            };
            self.invalidations += 1;
            let n = shards.len();
            shards[shard_of(block, n)].kernel_done(block);
            work += 1;
        }
        while let Ok(batch) = self.rx.try_recv() {
            // One batch at a time, in order, as the mount's invalidation thread takes them.
            let due = self.taken.back().map_or(now, |(d, _)| *d).max(now)
                + 1
                + rng.below(SIM_KERNEL_DELAY_STEPS);
            work += batch.len();
            // The kernel drops its copies now and answers at `due`: a read the shard
            // serves meanwhile may put a copy back in between, as a FUSE reply can land
            // after the mount's notification (the shard drops it again: `Shard::kernel_done`).
            for b in &batch {
                self.cache.remove(b);
            }
            self.taken.extend(batch.into_iter().map(|b| (due, b)));
        }
        work + self.taken.len()
    }

    /// The shards' turn after they stepped: their invalidations into the mount's queue
    /// (held back while it is full). Returns how many were asked for or are held back.
    pub fn send(&mut self, shards: &mut [FsShard]) -> usize {
        let mut work = 0;
        for (q, s) in self.queues.iter_mut().zip(shards.iter_mut()) {
            work += q.send(s, &self.link) + q.held();
        }
        work
    }
}
