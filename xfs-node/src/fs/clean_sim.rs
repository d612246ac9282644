//! The cleaner in the cluster simulation ([`super::sim`]): a seeded hot/cold workload that
//! writes, overwrites, truncates and deletes several times the devices' capacity through
//! the real file-system clients, shards and logs, while a stripe-group leader (the first
//! live node) cleans; every answer is compared with the reference file system, and at the
//! end every file is read back whole.
//!
//! Crashes: in the middle of the run the leader's node crashes *while it cleans one of its
//! own segments* (half of the segment's live blocks moved and durable, the rest not, the
//! round unfinished); it restarts and recovers its log, the next node in config order
//! leads for a while (a fresh leader, with nothing but the writers' usage tables), and the
//! test asserts that the half-cleaned segment is freed in the end and nothing was lost.
//!
//! The leader reaches the writers' logs directly (in the node it goes over Active
//! Messages, `docs/cleaner.md`); the writer side is the same code ([`cleaner::run`]).

use crate::lock;
use std::collections::BTreeMap;
use std::sync::Mutex;

use super::client::{Errno, FsClient};
use super::layout::BLOCK;
use super::sim::{apply_fs, pattern, Answer, FsOpSim, FsSim, FsSimConfig, Reference, SimStore};
use crate::coherence::NodeId;
use crate::sim::Rng;
use crate::storage::cleaner::{self, CleanerConfig, Command, Group, GroupError, Leader, Reply};
use crate::storage::log::{SegmentReader, SUMMARY_BYTES};

/// What to run.
#[derive(Clone, Debug)]
pub struct CleanSimConfig {
    /// The cluster (nodes, shards, servers, slots per server, network faults).
    pub fs: FsSimConfig,
    /// Files (each `file_blocks` blocks when whole).
    pub files: usize,
    /// Blocks per file.
    pub file_blocks: u64,
    /// The hot files' share of the files, and the share of writes that go to them.
    pub hot_files: f64,
    /// See `hot_files`.
    pub hot_writes: f64,
    /// Stop once the workload has written this many times the devices' capacity.
    pub capacity_multiple: f64,
    /// Crash the leader in the middle of cleaning one of its segments, halfway through.
    pub crash: bool,
    /// The leaders' policy.
    pub cleaner: CleanerConfig,
}

impl Default for CleanSimConfig {
    fn default() -> Self {
        let fs = FsSimConfig {
            server_slots: 96,
            lose_server_at: None,
            crash_at: None,
            ..FsSimConfig::default()
        };
        CleanSimConfig {
            fs,
            files: 12,
            file_blocks: 24,
            hot_files: 0.1,
            hot_writes: 0.9,
            capacity_multiple: 5.0,
            crash: true,
            cleaner: CleanerConfig {
                idle_ms: u64::MAX,
                ..CleanerConfig::default()
            },
        }
    }
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct CleanSimReport {
    /// Operations compared with the reference.
    pub ops: usize,
    /// Bytes the workload wrote (writes and file creations).
    pub written: u64,
    /// Bytes of blocks the devices hold when every segment is full.
    pub capacity: u64,
    /// Live bytes at the end.
    pub live: u64,
    /// Free bytes at the end (free segments x segment payload), after a last compaction.
    pub free: u64,
    /// Segments the leaders cleaned, blocks and bytes they moved.
    pub segments_cleaned: u64,
    /// See `segments_cleaned`.
    pub blocks_moved: u64,
    /// See `segments_cleaned`.
    pub bytes_moved: u64,
    /// Segments freed.
    pub freed: u64,
    /// Bytes the logs wrote in data segments (workload + cleaner), for write amplification.
    pub log_bytes: u64,
    /// The leaders that ran rounds, in order of their first round.
    pub leaders: Vec<NodeId>,
    /// The segment the crash interrupted, and whether it was freed by the end.
    pub crashed_segment: Option<(NodeId, u64, bool)>,
    /// The fewest free segments seen.
    pub min_free_segments: u64,
}

/// The leader's view of the simulated writers.
struct SimGroup<'a> {
    sim: &'a FsSim,
    readers: &'a [Mutex<Option<SegmentReader<SimStore>>>],
}

impl Group for SimGroup<'_> {
    fn call(&mut self, writer: NodeId, cmd: &Command) -> Result<Reply, GroupError> {
        let log = self
            .sim
            .world
            .borrow()
            .logs
            .get(writer as usize - 1)
            .cloned()
            .ok_or(GroupError::NoWriter(writer))?;
        let reader = self
            .readers
            .get(writer as usize - 1)
            .ok_or(GroupError::NoWriter(writer))?;
        Ok(cleaner::run(&log, reader, writer, cmd))
    }
}

fn readers(sim: &FsSim) -> Vec<Mutex<Option<SegmentReader<SimStore>>>> {
    let w = sim.world.borrow();
    (0..w.logs.len())
        .map(|_| Mutex::new(SegmentReader::new(w.group.clone(), w.tier.stores()).ok()))
        .collect()
}

/// Capacity, free and live bytes of the group (segment payload x slots, x free slots).
fn space(sim: &FsSim) -> (u64, u64, u64, u64) {
    let w = sim.world.borrow();
    let data = w.group.data();
    let payload = (data * super::sim::FRAGMENT - SUMMARY_BYTES) as u64;
    let (free, slots) = w.tier.space();
    let (free, slots) = (free as u64, slots as u64);
    let live = w
        .logs
        .iter()
        .filter_map(|l| {
            lock(l)
                .as_ref()
                .map(|l| l.live_bytes().values().sum::<u64>())
        })
        .sum();
    (slots * payload, free * payload, live, free)
}

/// Run one seeded simulation; `Err` names the seed and what went wrong.
pub fn run(seed: u64, cfg: &CleanSimConfig) -> Result<CleanSimReport, String> {
    let fail = |m: String| format!("seed {seed}: {m} (replay: XFS_CLEAN_SIM_SEED={seed})");
    let mut sim = FsSim::new(seed, &cfg.fs);
    let mut readers = readers(&sim);
    let mut reference = Reference::new();
    let mut rng = Rng::new(seed ^ 0xc1ea);
    let mut report = CleanSimReport {
        min_free_segments: u64::MAX,
        ..Default::default()
    };
    let nodes = cfg.fs.nodes as NodeId;
    let all: Vec<NodeId> = (1..=nodes).collect();
    let mut leaders: BTreeMap<NodeId, Leader> = BTreeMap::new();
    let mut down_until: BTreeMap<NodeId, usize> = BTreeMap::new();
    let (capacity, _, _, _) = space(&sim);
    report.capacity = capacity;
    let target = (cfg.capacity_multiple * capacity as f64) as u64;

    sim.client(1)
        .format()
        .map_err(|e| fail(format!("format: {e}")))?;
    let check = |sim: &FsSim, reference: &mut Reference, node: NodeId, op: FsOpSim| {
        let want = reference.apply(&op);
        let got = apply_fs(sim.client(node), &op);
        if want != got {
            return Err(format!(
                "{op:?} on node {node}: the cluster answered {}, the reference {}",
                short(&got),
                short(&want)
            ));
        }
        Ok(())
    };
    check(&sim, &mut reference, 1, FsOpSim::Mkdir("/d".into())).map_err(&fail)?;
    let path = |i: usize| format!("/d/f{i}");
    let whole = cfg.file_blocks * BLOCK as u64;
    for i in 0..cfg.files {
        let node = 1 + (i as NodeId % nodes);
        check(&sim, &mut reference, node, FsOpSim::Create(path(i))).map_err(&fail)?;
        check(
            &sim,
            &mut reference,
            node,
            FsOpSim::Write(path(i), 0, whole as usize, rng.next_u64()),
        )
        .map_err(&fail)?;
        check(&sim, &mut reference, node, FsOpSim::Fsync(path(i))).map_err(&fail)?;
        report.written += whole;
    }
    let hot = ((cfg.files as f64 * cfg.hot_files).ceil() as usize).max(1);
    let crash_at = target / 2;
    let mut crashed = false;
    let mut k = 0usize;
    while report.written < target {
        k += 1;
        sim.world
            .borrow()
            .clock
            .store(k as u64, std::sync::atomic::Ordering::Relaxed);
        let node = 1 + rng.below(nodes as u64) as NodeId;
        let file = if rng.below(1000) < (cfg.hot_writes * 1000.0) as u64 {
            rng.below(hot as u64) as usize
        } else {
            hot + rng.below((cfg.files - hot) as u64) as usize
        };
        let p = path(file);
        let r = rng.below(100);
        let ops: Vec<FsOpSim> = if r < 75 {
            let b = rng.below(cfg.file_blocks);
            let n = (1 + rng.below(4)).min(cfg.file_blocks - b);
            report.written += n * BLOCK as u64;
            vec![FsOpSim::Write(
                p.clone(),
                b * BLOCK as u64,
                (n * BLOCK as u64) as usize,
                rng.next_u64(),
            )]
        } else if r < 83 {
            vec![FsOpSim::Truncate(p.clone(), rng.below(whole))]
        } else if r < 90 {
            // Delete and create again, written whole.
            report.written += whole;
            vec![
                FsOpSim::Unlink(p.clone()),
                FsOpSim::Create(p.clone()),
                FsOpSim::Write(p.clone(), 0, whole as usize, rng.next_u64()),
            ]
        } else {
            let off = rng.below(whole);
            vec![FsOpSim::Read(
                p.clone(),
                off,
                1 + rng.below(3 * BLOCK as u64) as usize,
            )]
        };
        for op in ops {
            check(&sim, &mut reference, node, op).map_err(|e| fail(format!("op {k}: {e}")))?;
            report.ops += 1;
        }
        if rng.below(3) == 0 {
            check(&sim, &mut reference, node, FsOpSim::Fsync(p.clone()))
                .map_err(|e| fail(format!("op {k}: {e}")))?;
        }

        if cfg.crash && !crashed && report.written >= crash_at {
            crashed = true;
            let leader = cleaner::leader_of(&all, |n| down_until.get(&n).is_none_or(|u| k >= *u))
                .unwrap_or(1);
            let seg = crash_mid_clean(&mut sim, &readers, leader).map_err(&fail)?;
            readers = self::readers(&sim);
            leaders.remove(&leader);
            down_until.insert(leader, k + 60);
            report.crashed_segment = Some((leader, seg, false));
            // Nothing was lost: every file as the reference has it.
            verify_all(&sim, &reference, cfg.files, &path, 1 + (leader % nodes))
                .map_err(|e| fail(format!("after the crash of node {leader}: {e}")))?;
        }

        // The leader (the first live node in config order) looks at the group.
        let leader = cleaner::leader_of(&all, |n| down_until.get(&n).is_none_or(|u| k >= *u))
            .ok_or_else(|| fail("no leader".into()))?;
        if !report.leaders.contains(&leader) {
            report.leaders.push(leader);
        }
        let l = leaders
            .entry(leader)
            .or_insert_with(|| Leader::new(cfg.cleaner.clone()));
        let mut group = SimGroup {
            sim: &sim,
            readers: &readers,
        };
        // Writers go on while the round runs: after a segment's blocks are moved (their
        // copies wait for the writer's finish), a block of some file is overwritten and
        // fsynced, the cleaner's copy of it (if any) now older than the writer's version.
        let mut raced: Option<String> = None;
        l.round(&mut group, &all, k as u64, &mut |_| {
            // Not on a nearly full group: a write there may rightly find no room
            // (the reserve is the cleaner's), which the reference cannot tell.
            let room = space(&sim).3 > 4 * cfg.cleaner.batch as u64;
            if raced.is_some() || !room || rng.below(2) == 0 {
                return;
            }
            let node = 1 + rng.below(nodes as u64) as NodeId;
            let p = path(rng.below(cfg.files as u64) as usize);
            let b = rng.below(cfg.file_blocks);
            let ops = [
                FsOpSim::Write(p.clone(), b * BLOCK as u64, BLOCK, rng.next_u64()),
                FsOpSim::Fsync(p),
            ];
            for op in ops {
                if let Err(e) = check(&sim, &mut reference, node, op) {
                    raced = Some(format!("op {k}, inside a cleaning round: {e}"));
                    return;
                }
            }
            report.written += BLOCK as u64;
        });
        if let Some(e) = raced {
            return Err(fail(e));
        }
        if !l.status.last_error.is_empty() {
            return Err(fail(format!(
                "op {k}: the cleaner led by node {leader}: {}",
                l.status.last_error
            )));
        }
        let (_, _, live, free_segs) = space(&sim);
        report.min_free_segments = report.min_free_segments.min(free_segs);
        if std::env::var_os("XFS_CLEAN_SIM_TRACE").is_some() {
            eprintln!(
                "op {k}: written {} free segments {free_segs} live {live} leader {leader}: {:?}",
                report.written, l.status
            );
            if k.is_multiple_of(100) {
                eprintln!("live per index number: {:?}", live_breakdown(&sim));
            }
        }
        if sim.world.borrow().stuck > 0 {
            return Err(fail(format!("op {k}: block operations never finished")));
        }
    }

    // Everything durable, then a last compaction: clean what is less than 90% live until
    // the free space stops growing.
    for n in 1..=nodes {
        sim.client(n)
            .sync_all()
            .map_err(|e| fail(format!("sync_all on node {n}: {e}")))?;
    }
    let mut last = Leader::new(CleanerConfig {
        low_water: 1.0,
        high_water: 1.0,
        max_utilisation: 0.95,
        batch: 32,
        ..cfg.cleaner.clone()
    });
    let mut best = space(&sim).1;
    let mut patience = 3;
    for _ in 0..50 {
        let mut group = SimGroup {
            sim: &sim,
            readers: &readers,
        };
        if last.round(&mut group, &all, k as u64 + 1_000_000, &mut |_| {}) == 0 {
            break;
        }
        let free = space(&sim).1;
        if std::env::var_os("XFS_CLEAN_SIM_TRACE").is_some() {
            eprintln!("compaction: free {free}: {:?}", last.status);
        }
        if free <= best {
            patience -= 1;
            if patience == 0 {
                break;
            }
        } else {
            best = free;
        }
    }
    for l in leaders.values().chain(std::iter::once(&last)) {
        report.segments_cleaned += l.status.segments_cleaned;
        report.blocks_moved += l.status.blocks_moved;
        report.bytes_moved += l.status.bytes_moved;
        report.freed += l.status.freed;
    }
    let (_, free, live, _) = space(&sim);
    if std::env::var_os("XFS_CLEAN_SIM_TRACE").is_some() {
        eprintln!("live per index number: {:?}", live_breakdown(&sim));
        for l in &sim.world.borrow().logs {
            if let Some(l) = lock(l).as_ref() {
                let p = l.segment_payload();
                let u: Vec<u64> = l.usage().iter().map(|u| u.live * 100 / p).collect();
                eprintln!("held {} usage% {u:?}", l.held_segments());
            }
        }
    }
    report.free = free;
    report.live = live;
    {
        let w = sim.world.borrow();
        for l in &w.logs {
            if let Some(l) = lock(l).as_ref() {
                report.log_bytes +=
                    l.counters().segments * (w.group.data() * super::sim::FRAGMENT) as u64;
            }
        }
        if let Some((node, seg, freed)) = report.crashed_segment.as_mut() {
            *freed = lock(&w.logs[*node as usize - 1])
                .as_ref()
                .is_some_and(|l| !l.has_segment(*seg));
        }
    }
    verify_all(
        &sim,
        &reference,
        cfg.files,
        &path,
        1 + rng.below(nodes as u64) as NodeId,
    )
    .map_err(|e| fail(format!("at the end: {e}")))?;
    Ok(report)
}

/// The leader's node crashes while it cleans one of its own segments: everything is made
/// durable first (so the crash loses nothing the workload wrote), then half of the
/// segment's live blocks are moved and made durable, then the node dies (the round never
/// finishes) and restarts. Returns the segment.
fn crash_mid_clean(
    sim: &mut FsSim,
    readers: &[Mutex<Option<SegmentReader<SimStore>>>],
    node: NodeId,
) -> Result<u64, String> {
    for n in 1..=sim.clients.len() as NodeId {
        sim.client(n)
            .sync_all()
            .map_err(|e| format!("sync_all on node {n}: {e}"))?;
    }
    let log = sim.world.borrow().logs[node as usize - 1].clone();
    let (seg, live) = {
        let mut g = lock(&log);
        let l = g.as_mut().ok_or("no log")?;
        let usage = cleaner::writer_usage(l, node, 1000, Default::default());
        usage
            .candidates
            .iter()
            .map(|u| (u.segment, l.live_in(u.segment)))
            .find(|(_, live)| live.len() >= 2)
            .ok_or_else(|| format!("node {node} has no segment with two live blocks to clean"))?
    };
    let data = lock(&readers[node as usize - 1])
        .as_mut()
        .ok_or("no reader")?
        .blocks(seg, &live)
        .map_err(|e| e.to_string())?;
    {
        let mut g = lock(&log);
        let l = g.as_mut().ok_or("no log")?;
        let half = live.len() / 2;
        for ((b, a), d) in live.iter().zip(&data).take(half) {
            if !l.relocate(*b, *a, d).map_err(|e| e.to_string())? {
                return Err(format!("block {b:#x} was not moved"));
            }
        }
        l.flush_copies().map_err(|e| e.to_string())?;
        if l.live_in(seg).len() != live.len() - half {
            return Err("half of the segment should still be live in it".into());
        }
    }
    sim.crash_and_restart(node)?;
    let still = lock(&log)
        .as_ref()
        .map(|l| (l.has_segment(seg), l.live_in(seg).len()))
        .unwrap_or((false, 0));
    if still != (true, live.len() - live.len() / 2) {
        return Err(format!(
            "after recovery segment {seg:#x} should hold the unmoved half ({} blocks): {still:?}",
            live.len() - live.len() / 2
        ));
    }
    Ok(seg)
}

/// Read every file whole (and list the directory) through `node`; compare with the
/// reference.
fn verify_all(
    sim: &FsSim,
    reference: &Reference,
    files: usize,
    path: &dyn Fn(usize) -> String,
    node: NodeId,
) -> Result<(), String> {
    let c: &FsClient<_> = sim.client(node);
    let mut r = reference.clone();
    let ls = FsOpSim::Readdir("/d".into());
    if r.apply(&ls) != apply_fs(c, &ls) {
        return Err("the listing of /d differs from the reference".into());
    }
    for i in 0..files {
        let p = path(i);
        let size = match r.apply(&FsOpSim::Getattr(p.clone())) {
            Ok(Answer::Attr(_, size, _)) => size,
            other => return Err(format!("{p}: the reference says {other:?}")),
        };
        let op = FsOpSim::Read(p.clone(), 0, size as usize + 1);
        let want = r.apply(&op);
        let got = apply_fs(c, &op);
        if want != got {
            return Err(format!(
                "{p}: read back {}, the reference has {}",
                short(&got),
                short(&want)
            ));
        }
    }
    Ok(())
}

fn short(a: &Result<Answer, Errno>) -> String {
    match a {
        Ok(Answer::Data(d)) => format!("{} bytes, crc {:08x}", d.len(), crc32c::crc32c(d)),
        other => format!("{other:?}"),
    }
}

/// When the writer overwrites the block in [`writer_wins`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Race {
    /// After the cleaner has read the block's segment, before it moves the blocks: the
    /// move finds the block changed and discards its copy.
    BeforeMove,
    /// After the cleaner has moved the blocks (its copies wait in memory for the round's
    /// end), before the round ends: the writer's version is durable in a data segment
    /// sealed before the copies', so writing the copy out would put the old version back.
    AfterMove,
}

/// The writer-wins race, forced: a file's block is overwritten (and fsynced) by a client
/// while the cleaner empties the block's segment, at the moment `race` says. Returns
/// (blocks moved, copies discarded, whether the segment was freed); the writer's version
/// is checked here in the manager's log (no cache in between) and through the clients,
/// also after the manager crashed and recovered.
pub fn writer_wins(seed: u64, race: Race) -> Result<(u64, u64, bool), String> {
    let cfg = FsSimConfig {
        server_slots: 4096,
        lose_server_at: None,
        crash_at: None,
        ..FsSimConfig::default()
    };
    let mut sim = FsSim::new(seed, &cfg);
    let readers = readers(&sim);
    let c = sim.client(1);
    c.format().map_err(|e| format!("format: {e}"))?;
    apply_fs(c, &FsOpSim::Create("/race".into())).map_err(|e| e.to_string())?;
    let f = c.resolve("/race").map_err(|e| e.to_string())?;
    let original = pattern(seed, 8 * BLOCK);
    c.write(f.ino, 0, &original).map_err(|e| e.to_string())?;
    c.fsync(f.ino).map_err(|e| e.to_string())?;
    let block0 = super::layout::block_id(f.ino, 0);
    // The file's manager: the node whose log has its blocks.
    let manager = (1..=3)
        .find(|n| {
            lock(&sim.world.borrow().logs[*n as usize - 1])
                .as_ref()
                .is_some_and(|l| l.imap().contains_key(&block0))
        })
        .ok_or("block 0 of /race is in no log")?;
    let log = sim.world.borrow().logs[manager as usize - 1].clone();
    let seg = lock(&log)
        .as_ref()
        .and_then(|l| l.imap().get(&block0).map(|a| a.segment))
        .ok_or("block 0 of /race is not in its manager's log")?;
    let newer = pattern(seed ^ 1, BLOCK);
    let overwrite = |sim: &FsSim| {
        let c = sim.client(2);
        c.write(f.ino, 0, &newer).is_ok() && c.fsync(f.ino).is_ok()
    };
    let mut raced = 0;
    let stats = {
        let mut reader = lock(&readers[manager as usize - 1]);
        let reader = reader.as_mut().ok_or("no reader")?;
        cleaner::clean_segment(&log, reader, seg, &mut |live| {
            if race == Race::BeforeMove && live.iter().any(|(b, _)| *b == block0) {
                raced += usize::from(overwrite(&sim));
            }
        })
        .map_err(|e| e.to_string())?
    };
    if race == Race::AfterMove {
        raced += usize::from(overwrite(&sim));
    }
    if raced != 1 {
        return Err(format!("the writer did not overwrite the block ({race:?})"));
    }
    cleaner::finish(&log).map_err(|e| e.to_string())?;
    let freed = lock(&log).as_ref().is_some_and(|l| !l.has_segment(seg));
    // Copies discarded by the move (BeforeMove) or when the round's copies were written.
    let discarded = lock(&log).as_ref().map_or(0, |l| l.counters().writer_wins);
    let in_log = |what: &str| -> Result<(), String> {
        let got = lock(&log)
            .as_mut()
            .ok_or("no log")?
            .read(block0)
            .map_err(|e| e.to_string())?;
        if got != newer {
            return Err(format!(
                "{what}: the manager's log holds an older block 0 of /race"
            ));
        }
        Ok(())
    };
    in_log("after the round")?;
    let mut want = original.clone();
    want[..BLOCK].copy_from_slice(&newer);
    for node in [1, 3] {
        let got = sim
            .client(node)
            .read(f.ino, 0, 8 * BLOCK)
            .map_err(|e| e.to_string())?;
        if got != want {
            return Err(format!(
                "node {node} reads /race without the writer's block"
            ));
        }
    }
    // The manager crashes: what it recovers holds the writer's version too.
    for n in 1..=3 {
        sim.client(n).sync_all().map_err(|e| e.to_string())?;
    }
    sim.crash_and_restart(manager)?;
    in_log("after the manager's crash")?;
    let got = sim
        .client(1 + manager % 3)
        .read(f.ino, 0, 8 * BLOCK)
        .map_err(|e| e.to_string())?;
    if got != want {
        return Err("after the manager's crash /race lost the writer's block".into());
    }
    Ok((stats.moved, discarded, freed))
}

/// Live blocks per index number and their bytes, over every log (for tracing).
pub fn live_breakdown(sim: &FsSim) -> BTreeMap<u64, (usize, u64)> {
    let mut out: BTreeMap<u64, (usize, u64)> = BTreeMap::new();
    for l in &sim.world.borrow().logs {
        if let Some(l) = lock(l).as_ref() {
            for (b, a) in l.imap() {
                let e = out.entry(b >> super::layout::INDEX_SHIFT).or_default();
                e.0 += 1;
                e.1 += a.len as u64;
            }
        }
    }
    out
}
