//! The distributed log cleaner (DESIGN.md §4, Storage; Sprite LFS's cost-benefit policy,
//! xFS's distributed cleaner with s-files and optimistic moves).
//!
//! Two sides. Neither does network IO itself: the writer side works on a [`Log`] it is
//! handed, the leader calls the writers through a [`Group`]. They are not sans-IO in the
//! strict sense: the leader reads the clock (`Instant::now`) to pace itself, and the writer
//! side reads segments through the log's stores:
//!
//! * the **writer** side runs where a log is (the blocks' manager, which owns that log's
//!   imap): it reports its segment-usage table ([`Command::Usage`]), empties a segment
//!   ([`Command::Clean`]: the live blocks are found from the imap, read from the stripe
//!   group *without holding the log*, then appended again, each only if it is still the
//!   newest version: a writer that wrote the block meanwhile wins and the cleaner's copy is
//!   discarded), and finishes a round ([`Command::Finish`]: a checkpoint, after which the
//!   emptied segments are freed on every server);
//! * the **leader** of a stripe group ([`Leader`]) asks every writer of the group for its
//!   usage, decides whether to clean (free segments below the low-water mark, until the
//!   high-water mark; or the group has been idle), chooses segments by cost-benefit
//!   (`(1 - u) * age / (1 + u)`), sends the cleans, and paces itself so that cleaning takes
//!   at most its share of the time. The leader keeps no state that matters: a new leader
//!   (after a crash) starts from the writers' usage tables, where a half-cleaned segment is
//!   simply a segment with fewer live bytes.

use crate::lock;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::fragment::FragmentStore;
use super::log::{Log, LogAddress, LogError, SegmentReader, SegmentUsage};
use crate::coherence::{BlockId, NodeId};
use crate::shard::CommandError;

/// How the leader picks segments.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Sprite LFS's cost-benefit: `(1 - u) * age / (1 + u)`.
    #[default]
    CostBenefit,
    /// The least utilised first (the baseline Sprite compared against).
    Greedy,
}

/// When and how hard to clean.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CleanerConfig {
    /// Start cleaning when free segments fall below this fraction of the group's segments.
    pub low_water: f64,
    /// Stop cleaning once free segments reach this fraction.
    pub high_water: f64,
    /// The share of time the cleaner may take (it sleeps the rest): foreground IO keeps
    /// the remaining `1 - share` of the stripe group's bandwidth.
    pub share: f64,
    /// Segments per round (then every writer touched checkpoints and frees).
    pub batch: usize,
    /// Never clean a segment with more than this fraction live (moving it frees little).
    pub max_utilisation: f64,
    /// A group with no new segment for this long (milliseconds) is idle: the cleaner then
    /// cleans segments at most `idle_utilisation` live even above the low-water mark.
    pub idle_ms: u64,
    /// See `idle_ms`.
    pub idle_utilisation: f64,
    /// `cost-benefit` (default) or `greedy`.
    pub policy: Policy,
}

impl Default for CleanerConfig {
    fn default() -> Self {
        CleanerConfig {
            low_water: 0.25,
            high_water: 0.4,
            share: 0.3,
            batch: 8,
            max_utilisation: 0.95,
            idle_ms: 10_000,
            idle_utilisation: 0.5,
            policy: Policy::CostBenefit,
        }
    }
}

impl CleanerConfig {
    /// Check the values; the error names the field.
    pub fn validate(&self) -> Result<(), CleanerConfigError> {
        let frac = |field: &'static str, value: f64| {
            if (0.0..=1.0).contains(&value) {
                Ok(())
            } else {
                Err(CleanerConfigError::NotAFraction { field, value })
            }
        };
        frac("low_water", self.low_water)?;
        frac("high_water", self.high_water)?;
        frac("max_utilisation", self.max_utilisation)?;
        frac("idle_utilisation", self.idle_utilisation)?;
        if self.high_water < self.low_water {
            return Err(CleanerConfigError::HighBelowLow {
                high: self.high_water,
                low: self.low_water,
            });
        }
        if !(self.share > 0.0 && self.share <= 1.0) {
            return Err(CleanerConfigError::Share(self.share));
        }
        if self.batch == 0 {
            return Err(CleanerConfigError::NoBatch);
        }
        Ok(())
    }

    /// How long to rest after cleaning work that took `work`.
    pub fn pause(&self, work: Duration) -> Duration {
        work.mul_f64((1.0 - self.share) / self.share)
    }
}

/// A `[cleaner]` value out of range ([`CleanerConfig::validate`]); names the field.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum CleanerConfigError {
    /// A fraction outside 0..=1.
    #[error("cleaner.{field} = {value}: must be between 0 and 1")]
    NotAFraction {
        /// The field.
        field: &'static str,
        /// Its value.
        value: f64,
    },
    /// `high_water` below `low_water`.
    #[error("cleaner.high_water = {high} is below low_water = {low}: it must be at least as high")]
    HighBelowLow {
        /// `high_water`.
        high: f64,
        /// `low_water`.
        low: f64,
    },
    /// `share` not in (0, 1].
    #[error("cleaner.share = {0}: must be above 0 and at most 1")]
    Share(f64),
    /// `batch = 0`.
    #[error("cleaner.batch = 0: must be at least 1")]
    NoBatch,
}

/// Why a writer could not run a cleaner command ([`clean_segment`], [`finish`], [`run`]);
/// the leader reports it ([`CleanerStatus::last_error`]).
#[derive(Debug, thiserror::Error)]
pub enum CleanError {
    /// The node keeps no log (no manager role).
    #[error("this node has no log")]
    NoLog,
    /// The node's log is not recovered yet (or it keeps none).
    #[error("this node has no log (yet)")]
    NoLogYet,
    /// The node's segment reader has not connected to the stripe group yet.
    #[error("this node's segment reader is not connected (yet)")]
    NoReader,
    /// The log cannot take the copies of the segment now.
    #[error("no room for the copies of segment {segment:#x} now: free space first")]
    NoRoom {
        /// The segment.
        segment: u64,
    },
    /// Reading the segment's live blocks failed.
    #[error("reading segment {segment:#x}: {source}")]
    Read {
        /// The segment.
        segment: u64,
        /// What failed.
        #[source]
        source: LogError,
    },
    /// Appending a block's copy failed.
    #[error("moving block {block:#x}: {source}")]
    Move {
        /// The block.
        block: BlockId,
        /// What failed.
        #[source]
        source: LogError,
    },
    /// Writing the copies out failed.
    #[error("writing the copies: {0}")]
    WriteCopies(#[source] LogError),
    /// Writing the data that waited for space failed.
    #[error("writing waiting data: {0}")]
    WriteWaiting(#[source] LogError),
    /// The checkpoint after the moves failed.
    #[error("checkpoint: {0}")]
    Checkpoint(#[source] LogError),
}

/// Why the leader's call to a writer ([`Group::call`]) failed.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// The command could not be encoded.
    #[error("{0}")]
    Encode(#[source] bincode::Error),
    /// The command did not reach the writer, or its answer did not come back.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// The writer's answer does not decode.
    #[error("node {writer}: bad answer: {source}")]
    BadAnswer {
        /// The writer.
        writer: NodeId,
        /// Why it does not decode.
        #[source]
        source: bincode::Error,
    },
    /// No such writer in the group.
    #[error("no node {0}")]
    NoWriter(NodeId),
}

/// Sprite LFS's cost-benefit score of a segment `u` live and `age` old: the space it frees
/// times how long that space is likely to stay free, over the cost of reading it and
/// writing its live part.
pub fn cost_benefit(u: f64, age: u64) -> f64 {
    (1.0 - u) * (age as f64 + 1.0) / (1.0 + u)
}

/// A segment's score under `policy` (higher: clean first).
pub fn score(policy: Policy, u: f64, age: u64) -> f64 {
    match policy {
        Policy::CostBenefit => cost_benefit(u, age),
        Policy::Greedy => 1.0 - u,
    }
}

/// A writer's report to the leader.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WriterUsage {
    /// The writer.
    pub writer: NodeId,
    /// Bytes of blocks a segment holds at most.
    pub payload: u64,
    /// Free segments of the group as this writer's stores see them.
    pub free_segments: u64,
    /// Segments this writer holds.
    pub held: u64,
    /// Segments this writer has written since it started (activity).
    pub written: u64,
    /// Live bytes in its data segments.
    pub live: u64,
    /// Bytes its data segments hold that are dead (what cleaning can free).
    pub dead: u64,
    /// The writer's clock (milliseconds).
    pub now: u64,
    /// Its best cleaning candidates (by cost-benefit), at most the limit asked for.
    pub candidates: Vec<SegmentUsage>,
}

/// What cleaning one segment did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CleanStats {
    /// Blocks moved.
    pub moved: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Blocks a writer wrote meanwhile (the cleaner's copy was discarded).
    pub discarded: u64,
}

/// The leader's requests to a writer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// The usage table's summary and up to `limit` candidates.
    Usage {
        /// Candidates wanted.
        limit: u32,
        /// Ranked by this policy.
        policy: Policy,
    },
    /// Move the live blocks of `segment` to new segments.
    Clean {
        /// The segment.
        segment: u64,
    },
    /// Checkpoint, then free the segments that are dead.
    Finish,
    /// Are you there? (The leader's candidates ask the ones before them.)
    Ping,
}

/// A writer's answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// To `Usage`.
    Usage(WriterUsage),
    /// To `Clean`.
    Cleaned(CleanStats),
    /// To `Finish`: segments freed.
    Finished(u64),
    /// To `Ping`.
    Here,
    /// Something failed (names what).
    Error(String),
}

/// Writer side: the usage summary of `log` with its `limit` best candidates.
pub fn writer_usage<S: FragmentStore + Send>(
    log: &mut Log<S>,
    writer: NodeId,
    limit: usize,
    policy: Policy,
) -> WriterUsage {
    let now = log.now();
    let payload = log.segment_payload();
    // Only segments a checkpoint can cover now can be freed by cleaning them.
    let upto = log.durable_upto();
    let usage: Vec<SegmentUsage> = log
        .usage()
        .into_iter()
        .filter(|u| u.segment <= upto)
        .collect();
    let live: u64 = usage.iter().map(|u| u.live).sum();
    let dead = usage.len() as u64 * payload - live.min(usage.len() as u64 * payload);
    let mut scored: Vec<(f64, SegmentUsage)> = usage
        .into_iter()
        .map(|u| {
            let util = u.live as f64 / payload.max(1) as f64;
            (score(policy, util, now.saturating_sub(u.time)), u)
        })
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.segment.cmp(&b.1.segment)));
    WriterUsage {
        writer,
        payload,
        free_segments: log.free_segments(),
        held: log.held_segments() as u64,
        written: log.counters().segments,
        live,
        dead,
        now,
        candidates: scored.into_iter().take(limit).map(|(_, u)| u).collect(),
    }
}

/// Called between the cleaner's read of a segment and its moves, with the blocks read.
pub type Between<'a> = dyn FnMut(&[(BlockId, LogAddress)]) + 'a;

/// Writer side: empty `segment`. The live blocks are taken from the imap (under the log's
/// lock), read through `reader` (without it: writers go on), `between` is called (a test
/// forces a writer in here), and each block is appended again only if it is still the
/// newest version.
pub fn clean_segment<S: FragmentStore + Send>(
    log: &Mutex<Option<Log<S>>>,
    reader: &mut SegmentReader<S>,
    segment: u64,
    between: &mut Between<'_>,
) -> Result<CleanStats, CleanError> {
    let live = lock(log)
        .as_ref()
        .ok_or(CleanError::NoLog)?
        .live_in(segment);
    let mut stats = CleanStats::default();
    if live.is_empty() {
        return Ok(stats);
    }
    let bytes: u64 = live.iter().map(|(_, a)| a.len as u64).sum();
    if !lock(log)
        .as_mut()
        .ok_or(CleanError::NoLog)?
        .room_for_copies(segment, bytes)
    {
        return Err(CleanError::NoRoom { segment });
    }
    let data = reader
        .blocks(segment, &live)
        .map_err(|source| CleanError::Read { segment, source })?;
    between(&live);
    let mut g = lock(log);
    let l = g.as_mut().ok_or(CleanError::NoLog)?;
    for ((block, from), bytes) in live.iter().zip(data) {
        if l.relocate(*block, *from, &bytes)
            .map_err(|source| CleanError::Move {
                block: *block,
                source,
            })?
        {
            stats.moved += 1;
            stats.bytes += bytes.len() as u64;
        } else {
            stats.discarded += 1;
        }
    }
    Ok(stats)
}

/// Writer side: make the moves durable, free the emptied segments the newest checkpoint
/// covers (recovery rolls forward to the copies), and write a new checkpoint when the
/// dead segments it would let free outnumber what it costs.
pub fn finish<S: FragmentStore + Send>(log: &Mutex<Option<Log<S>>>) -> Result<u64, CleanError> {
    let mut g = lock(log);
    let l = g.as_mut().ok_or(CleanError::NoLog)?;
    let before = l.counters().freed;
    let r = l.flush_copies().map_err(CleanError::WriteCopies);
    l.free_reclaimable();
    r?;
    // Data the writers could not write (the stores were full) holds back what a
    // checkpoint covers: it goes out now if the reserve allows.
    l.flush_waiting().map_err(CleanError::WriteWaiting)?;
    // A checkpoint pays when it frees more than it costs, or when so many segments lie
    // beyond the newest one that cleaning them would need one each time.
    let (beyond, dead) = l.beyond_checkpoint();
    if dead >= l.checkpoint_cost() || beyond >= 4 * l.checkpoint_cost() {
        let r = l.checkpoint();
        // What the last good checkpoint covers can be freed even if this one failed.
        l.free_reclaimable();
        r.map_err(CleanError::Checkpoint)?;
    }
    Ok(l.counters().freed - before)
}

/// Writer side: run one encoded [`Command`] and encode the [`Reply`].
pub fn serve<S: FragmentStore + Send>(
    log: &Mutex<Option<Log<S>>>,
    reader: &Mutex<Option<SegmentReader<S>>>,
    writer: NodeId,
    request: &[u8],
) -> Vec<u8> {
    let reply = match bincode::deserialize::<Command>(request) {
        Err(e) => Reply::Error(format!("bad cleaner command: {e}")),
        Ok(cmd) => run(log, reader, writer, &cmd),
    };
    bincode::serialize(&reply).unwrap_or_default()
}

/// Writer side: run one [`Command`].
pub fn run<S: FragmentStore + Send>(
    log: &Mutex<Option<Log<S>>>,
    reader: &Mutex<Option<SegmentReader<S>>>,
    writer: NodeId,
    cmd: &Command,
) -> Reply {
    let r = match cmd {
        Command::Usage { limit, policy } => match lock(log).as_mut() {
            Some(l) => Ok(Reply::Usage(writer_usage(
                l,
                writer,
                *limit as usize,
                *policy,
            ))),
            None => Err(CleanError::NoLogYet),
        },
        Command::Clean { segment } => match lock(reader).as_mut() {
            Some(r) => clean_segment(log, r, *segment, &mut |_| {}).map(Reply::Cleaned),
            None => Err(CleanError::NoReader),
        },
        Command::Finish => finish(log).map(Reply::Finished),
        Command::Ping => Ok(Reply::Here),
    };
    r.unwrap_or_else(|e| Reply::Error(e.to_string()))
}

/// The first of `candidates` (config order) that is alive: the stripe group's leader.
pub fn leader_of(candidates: &[NodeId], mut alive: impl FnMut(NodeId) -> bool) -> Option<NodeId> {
    candidates.iter().copied().find(|c| alive(*c))
}

/// How the leader reaches the writers of its group.
pub trait Group {
    /// Run `cmd` on `writer`.
    fn call(&mut self, writer: NodeId, cmd: &Command) -> Result<Reply, GroupError>;
}

/// What the leader is doing and has done (for `xfs-node status`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CleanerStatus {
    /// `idle`, `cleaning (low on space)`, `cleaning (group idle)`.
    pub state: String,
    /// Free segments of the group at the last look.
    pub free_segments: u64,
    /// Segments of the group (free + held by its writers).
    pub total_segments: u64,
    /// Bytes a segment holds.
    pub segment_payload: u64,
    /// Live bytes of the group's writers.
    pub live_bytes: u64,
    /// Dead bytes in their data segments (what cleaning can free).
    pub cleanable_bytes: u64,
    /// Writers that answered at the last look.
    pub writers: u64,
    /// Rounds that cleaned something.
    pub rounds: u64,
    /// Segments cleaned.
    pub segments_cleaned: u64,
    /// Blocks moved.
    pub blocks_moved: u64,
    /// Bytes moved.
    pub bytes_moved: u64,
    /// Copies discarded because a writer won.
    pub discarded: u64,
    /// Segments freed.
    pub freed: u64,
    /// The current round: segments done of chosen.
    pub progress: (u64, u64),
    /// The last error (a writer that did not answer, a failed move).
    pub last_error: String,
}

/// A stripe group's cleaner leader.
pub struct Leader {
    cfg: CleanerConfig,
    /// Segments cleaned in the last rounds (not chosen again until the round noted: one
    /// that is still there waits for a checkpoint or for newer versions to land).
    skip: std::collections::BTreeMap<(NodeId, u64), u64>,
    cleaning: bool,
    last_written: u64,
    last_activity: u64,
    /// What it is doing.
    pub status: CleanerStatus,
}

impl Leader {
    /// A leader with `cfg` (validated by the caller).
    pub fn new(cfg: CleanerConfig) -> Leader {
        Leader {
            cfg,
            skip: Default::default(),
            cleaning: false,
            last_written: 0,
            last_activity: 0,
            status: CleanerStatus {
                state: "idle".into(),
                ..Default::default()
            },
        }
    }

    /// The configuration.
    pub fn config(&self) -> &CleanerConfig {
        &self.cfg
    }

    /// Look at the group and clean one batch if needed: `now` in milliseconds, `pace` is
    /// called after each segment and each writer's finish with the time it took (the
    /// driver sleeps, a simulation does not), but not while writers wait for space (free
    /// segments below half the low-water mark). Returns the segments cleaned (0: nothing
    /// to do).
    pub fn round(
        &mut self,
        group: &mut dyn Group,
        writers: &[NodeId],
        now: u64,
        pace: &mut dyn FnMut(Duration),
    ) -> u64 {
        let usages = self.gather_usage(group, writers);
        if usages.is_empty() {
            self.status.state = "idle (no writer answers)".into();
            return 0;
        }
        let frac = self.note_usage(&usages, now);
        let Some(limit) = self.utilisation_limit(frac, now) else {
            self.status.state = "idle".into();
            return 0;
        };
        let round = self.status.rounds;
        self.skip.retain(|_, until| *until > round);
        let scored = self.choose(&usages, limit);
        if scored.is_empty() {
            self.nothing_cleanable(group, &usages);
            return 0;
        }
        self.status.state = if self.cleaning {
            "cleaning (low on space)".into()
        } else {
            "cleaning (group idle)".into()
        };
        self.status.progress = (0, scored.len() as u64);
        // Below half the low-water mark writers are waiting for space: no pacing.
        let urgent = frac < self.cfg.low_water / 2.0;
        let mut pace = |d: Duration| {
            if !urgent {
                pace(d)
            }
        };
        let (cleaned, touched) = self.clean(group, &scored, round, &mut pace);
        self.finish_writers(group, touched, &mut pace);
        self.status.rounds += 1;
        cleaned
    }

    /// Ask every writer for its usage; the errors of those that do not answer are noted.
    fn gather_usage(&mut self, group: &mut dyn Group, writers: &[NodeId]) -> Vec<WriterUsage> {
        let mut usages = Vec::new();
        for w in writers {
            let cmd = Command::Usage {
                limit: 64,
                policy: self.cfg.policy,
            };
            match group.call(*w, &cmd) {
                Ok(Reply::Usage(u)) => usages.push(u),
                Ok(Reply::Error(e)) => self.status.last_error = format!("node {w}: {e}"),
                Err(e) => self.status.last_error = format!("node {w}: {e}"),
                Ok(other) => self.status.last_error = format!("node {w}: answered {other:?}"),
            }
        }
        usages
    }

    /// Note the group's space and activity from the writers' usage (`usages` not empty);
    /// returns the fraction of its segments that are free.
    fn note_usage(&mut self, usages: &[WriterUsage], now: u64) -> f64 {
        let free = usages.iter().map(|u| u.free_segments).min().unwrap_or(0);
        let total = free + usages.iter().map(|u| u.held).sum::<u64>();
        let written: u64 = usages.iter().map(|u| u.written).sum();
        if written != self.last_written || self.last_activity == 0 {
            self.last_written = written;
            self.last_activity = now.max(1);
        }
        self.status.free_segments = free;
        self.status.total_segments = total;
        self.status.segment_payload = usages[0].payload;
        self.status.live_bytes = usages.iter().map(|u| u.live).sum();
        self.status.cleanable_bytes = usages.iter().map(|u| u.dead).sum();
        self.status.writers = usages.len() as u64;
        free as f64 / total.max(1) as f64
    }

    /// Whether to clean with `frac` of the segments free (low on space, between the
    /// water marks, or the group idle): the most live a segment may be to be cleaned, or
    /// `None` for no cleaning now.
    fn utilisation_limit(&mut self, frac: f64, now: u64) -> Option<f64> {
        if frac < self.cfg.low_water {
            self.cleaning = true;
        } else if frac >= self.cfg.high_water {
            self.cleaning = false;
        }
        let idle = now.saturating_sub(self.last_activity) >= self.cfg.idle_ms;
        if self.cleaning {
            Some(self.cfg.max_utilisation)
        } else if idle {
            Some(self.cfg.idle_utilisation)
        } else {
            None
        }
    }

    /// The segments to clean this round, best first: (score, writer, segment), at most
    /// `batch`, none more than `limit` live and none cleaned in the last rounds.
    fn choose(&self, usages: &[WriterUsage], limit: f64) -> Vec<(f64, NodeId, u64)> {
        let mut scored: Vec<(f64, NodeId, u64)> = Vec::new();
        for u in usages {
            for c in &u.candidates {
                if self.skip.contains_key(&(u.writer, c.segment)) {
                    continue;
                }
                let util = c.live as f64 / u.payload.max(1) as f64;
                if util <= limit {
                    let age = u.now.saturating_sub(c.time);
                    scored.push((score(self.cfg.policy, util, age), u.writer, c.segment));
                }
            }
        }
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.2.cmp(&b.2)));
        scored.truncate(self.cfg.batch);
        scored
    }

    /// No segment is worth cleaning: say so, and when low on space have every writer
    /// finish a round anyway.
    fn nothing_cleanable(&mut self, group: &mut dyn Group, usages: &[WriterUsage]) {
        if self.cleaning {
            // Nothing to move: the writers' waiting data may be what holds space.
            for u in usages {
                if let Ok(Reply::Finished(n)) = group.call(u.writer, &Command::Finish) {
                    self.status.freed += n;
                }
            }
            self.status.state = "cleaning (nothing cleanable: waiting for writes)".into();
        } else {
            self.status.state = "idle (nothing cleanable)".into();
        }
    }

    /// Clean the `scored` segments one by one, pacing after each. Returns the segments
    /// cleaned and the writers asked (each once, in the order first asked).
    fn clean(
        &mut self,
        group: &mut dyn Group,
        scored: &[(f64, NodeId, u64)],
        round: u64,
        pace: &mut dyn FnMut(Duration),
    ) -> (u64, Vec<NodeId>) {
        let mut touched: Vec<NodeId> = Vec::new();
        let mut cleaned = 0;
        for (_, w, segment) in scored {
            let t = Instant::now();
            match group.call(*w, &Command::Clean { segment: *segment }) {
                Ok(Reply::Cleaned(s)) => {
                    // A cleaned segment is freed by the finish (or soon after, once a
                    // checkpoint covers it); one that shows up again meanwhile had live
                    // blocks with newer versions still waiting: not chosen again soon.
                    self.skip.insert((*w, *segment), round + 20);
                    cleaned += 1;
                    self.status.segments_cleaned += 1;
                    self.status.blocks_moved += s.moved;
                    self.status.bytes_moved += s.bytes;
                    self.status.discarded += s.discarded;
                }
                Ok(Reply::Error(e)) => {
                    self.status.last_error = format!("node {w}, segment {segment:#x}: {e}")
                }
                Err(e) => self.status.last_error = format!("node {w}, segment {segment:#x}: {e}"),
                Ok(other) => self.status.last_error = format!("node {w}: answered {other:?}"),
            }
            if !touched.contains(w) {
                touched.push(*w);
            }
            self.status.progress.0 += 1;
            pace(t.elapsed());
        }
        (cleaned, touched)
    }

    /// Have each writer that cleaned finish the round (checkpoint, free), pacing after each.
    fn finish_writers(
        &mut self,
        group: &mut dyn Group,
        touched: Vec<NodeId>,
        pace: &mut dyn FnMut(Duration),
    ) {
        for w in touched {
            let t = Instant::now();
            match group.call(w, &Command::Finish) {
                Ok(Reply::Finished(n)) => self.status.freed += n,
                Ok(Reply::Error(e)) => self.status.last_error = format!("node {w}: {e}"),
                Err(e) => self.status.last_error = format!("node {w}: {e}"),
                Ok(other) => self.status.last_error = format!("node {w}: answered {other:?}"),
            }
            pace(t.elapsed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_benefit_prefers_emptier_and_older_segments() {
        assert!(cost_benefit(0.2, 1000) > cost_benefit(0.5, 1000));
        assert!(cost_benefit(0.5, 10_000) > cost_benefit(0.5, 100));
        // An old segment three quarters live beats a fresh one half live (Sprite's point:
        // cold segments are worth cleaning at a higher utilisation).
        assert!(cost_benefit(0.75, 100_000) > cost_benefit(0.5, 1_000));
        assert_eq!(cost_benefit(1.0, 5), 0.0);
    }

    #[test]
    fn config_errors_name_the_field() {
        let mut c = CleanerConfig::default();
        assert!(c.validate().is_ok());
        c.high_water = 0.1;
        assert!(c.validate().unwrap_err().to_string().contains("high_water"));
        let c = CleanerConfig {
            share: 0.0,
            ..CleanerConfig::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("share"));
        let pause = CleanerConfig {
            share: 0.25,
            ..CleanerConfig::default()
        }
        .pause(Duration::from_millis(10));
        assert_eq!(pause, Duration::from_millis(30));
    }

    /// Writers that answer from tables; records the commands.
    struct Fake {
        usage: Vec<WriterUsage>,
        dead: Vec<NodeId>,
        log: Vec<(NodeId, Command)>,
    }

    impl Group for Fake {
        fn call(&mut self, w: NodeId, cmd: &Command) -> Result<Reply, GroupError> {
            if self.dead.contains(&w) {
                return Err(CommandError::Timeout {
                    node: w,
                    timeout: Duration::from_secs(3),
                }
                .into());
            }
            self.log.push((w, cmd.clone()));
            Ok(match cmd {
                Command::Usage { .. } => Reply::Usage(
                    self.usage
                        .iter()
                        .find(|u| u.writer == w)
                        .cloned()
                        .unwrap_or_default(),
                ),
                Command::Clean { .. } => Reply::Cleaned(CleanStats {
                    moved: 1,
                    bytes: 4096,
                    discarded: 0,
                }),
                Command::Finish => Reply::Finished(1),
                Command::Ping => Reply::Here,
            })
        }
    }

    fn writer(w: NodeId, free: u64, held: u64, segs: &[(u64, u64, u64)]) -> WriterUsage {
        WriterUsage {
            writer: w,
            payload: 1000,
            free_segments: free,
            held,
            written: 1,
            now: 100,
            candidates: segs
                .iter()
                .map(|(s, live, time)| SegmentUsage {
                    segment: *s,
                    live: *live,
                    time: *time,
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn the_leader_cleans_below_low_water_best_first_and_paces() {
        let mut g = Fake {
            // 20 free of 110: below the low-water mark (25%), not below half of it.
            usage: vec![
                writer(1, 20, 50, &[(11, 900, 90), (12, 100, 90), (13, 960, 0)]),
                writer(2, 25, 40, &[(21, 500, 0)]),
            ],
            dead: vec![3],
            log: Vec::new(),
        };
        let mut leader = Leader::new(CleanerConfig {
            batch: 2,
            ..CleanerConfig::default()
        });
        let mut paced = 0;
        let n = leader.round(&mut g, &[1, 2, 3], 100, &mut |_| paced += 1);
        assert_eq!(n, 2);
        let cleans: Vec<(NodeId, u64)> = g
            .log
            .iter()
            .filter_map(|(w, c)| match c {
                Command::Clean { segment } => Some((*w, *segment)),
                _ => None,
            })
            .collect();
        // Cost-benefit: 21 (half live but old) before 12 (10% live, young), and both
        // before 11 (90% live); 13 is over max_utilisation.
        assert_eq!(cleans, vec![(2, 21), (1, 12)]);
        let finishes = g.log.iter().filter(|(_, c)| *c == Command::Finish).count();
        assert_eq!(finishes, 2, "each writer touched finishes");
        assert_eq!(paced, 4, "paced after every command");
        assert!(leader.status.last_error.contains("node 3"));
        assert_eq!(
            (leader.status.free_segments, leader.status.total_segments),
            (20, 110)
        );
        // A segment just cleaned is not chosen again at once.
        g.log.clear();
        leader.round(&mut g, &[1, 2], 101, &mut |_| {});
        assert!(!g.log.contains(&(1, Command::Clean { segment: 12 })));
    }

    #[test]
    fn no_cleaning_above_high_water_and_no_pacing_when_urgent() {
        let mut g = Fake {
            usage: vec![writer(1, 50, 50, &[(11, 100, 0)])],
            dead: vec![],
            log: Vec::new(),
        };
        let mut leader = Leader::new(CleanerConfig::default());
        assert_eq!(leader.round(&mut g, &[1], 100, &mut |_| {}), 0);
        assert_eq!(leader.status.state, "idle");
        // 5 free of 100: below half the low-water mark; writers wait, no pacing.
        g.usage = vec![writer(1, 5, 95, &[(11, 100, 0)])];
        let mut paced = 0;
        assert_eq!(leader.round(&mut g, &[1], 100, &mut |_| paced += 1), 1);
        assert_eq!(paced, 0);
    }

    #[test]
    fn the_first_live_candidate_leads() {
        assert_eq!(leader_of(&[3, 1, 2], |_| true), Some(3));
        assert_eq!(leader_of(&[3, 1, 2], |n| n != 3), Some(1));
        assert_eq!(leader_of(&[3], |_| false), None);
    }
}
