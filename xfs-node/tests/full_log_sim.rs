//! Full devices, simulated: one to three writers' logs share a small stripe group (2 data + 1
//! parity servers, in memory) and write objects (runs of blocks) until the stores refuse
//! (ENOSPC), delete objects, checkpoint, and are cut off at random points, while full: a
//! power cut of every server (unsynced writes dropped or torn) or a clean `down` (every
//! writer checkpoints). Checked at every point:
//! - a checkpoint never fails for want of space, however full the group (the reserve);
//! - after every restart every acknowledged block (a write or a deletion whose fsync
//!   returned) reads back as acknowledged, and an unacknowledged one reads as its
//!   acknowledged state or as one of the versions written since, never anything else;
//! - a refused object deleted again frees its space: the run gets back below full.
//!
//! `XFS_FULL_SIM_SEEDS=N` runs N seeds (default 200); a failure names its seed
//! (`XFS_FULL_SIM_SEED=<seed>` replays one).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use xfs_node::fs::sim::{SimFrag, SimServer};
use xfs_node::sim::Rng;
use xfs_node::storage::fragment::{MemFragmentStore, StoreError};
use xfs_node::storage::log::{Log, LogError, StripeGroup};

const FRAG: usize = 16 * 1024;
const SLOTS: usize = 160;

/// A block's content for `(block, version)`; version 0 is "absent" (deleted).
fn content(block: u64, version: u64, len: usize) -> Vec<u8> {
    let mut r = Rng::new(block.wrapping_mul(0x9e37_79b9) ^ version);
    (0..len).map(|_| r.next_u64() as u8).collect()
}

#[derive(Clone, Debug, Default)]
struct BlockState {
    /// The acknowledged version (0: absent) and its length.
    acked: (u64, usize),
    /// Versions written since (not acknowledged): any of them may have survived.
    since: Vec<(u64, usize)>,
}

struct Writer {
    id: u16,
    log: Option<Log<SimFrag>>,
    /// Objects: first block and length in blocks.
    objects: Vec<(u64, u64)>,
    next_object: u64,
}

#[derive(Default, Debug)]
struct Report {
    refused: u64,
    checkpoints_when_full: u64,
    crashes: u64,
    downs: u64,
    freed_after_full: u64,
}

fn is_no_space(e: &LogError) -> bool {
    matches!(e, LogError::Store(StoreError::NoSpace { .. }))
}

fn check(seed: u64, when: &str, log: &mut Log<SimFrag>, blocks: &BTreeMap<u64, BlockState>) {
    for (b, st) in blocks {
        let got = match log.read(*b) {
            Ok(d) => Some(d),
            Err(LogError::NotFound(_)) => None,
            Err(e) => panic!("seed {seed} {when}: block {b:#x} unreadable: {e}"),
        };
        let matches = |(v, len): (u64, usize)| match (&got, v) {
            (None, 0) => true,
            (Some(d), v) if v > 0 => *d == content(*b, v, len),
            _ => false,
        };
        assert!(
            matches(st.acked) || st.since.iter().any(|s| matches(*s)),
            "seed {seed} {when}: block {b:#x} reads {} (acknowledged version {}, {} written since) \
             (replay: XFS_FULL_SIM_SEED={seed})",
            got.as_ref().map_or("absent".to_string(), |d| format!("{} bytes of something else", d.len())),
            st.acked.0,
            st.since.len()
        );
    }
}

fn run(seed: u64) -> Report {
    let mut rng = Rng::new(seed);
    let nwriters = 1 + (seed % 3) as u16;
    let group = StripeGroup {
        id: 1,
        servers: vec![1, 2, 3],
        parity: 1,
    };
    let servers: Vec<Arc<Mutex<SimServer>>> = (0..3)
        .map(|_| {
            Arc::new(Mutex::new(SimServer {
                store: MemFragmentStore::new(SLOTS, FRAG),
                up: true,
            }))
        })
        .collect();
    let stores =
        || -> Vec<Option<SimFrag>> { servers.iter().map(|s| Some(SimFrag(s.clone()))).collect() };
    let open = |id: u16, fresh: bool| -> Log<SimFrag> {
        let mut l = if fresh {
            Log::new(id, group.clone(), stores()).unwrap()
        } else {
            Log::recover(id, group.clone(), stores())
                .unwrap_or_else(|e| panic!("seed {seed}: writer {id} cannot recover: {e}"))
        };
        l.set_writers(nwriters as usize);
        l
    };
    let mut writers: Vec<Writer> = (1..=nwriters)
        .map(|id| Writer {
            id,
            log: Some(open(id, true)),
            objects: Vec::new(),
            next_object: 0,
        })
        .collect();
    let mut blocks: BTreeMap<u64, BlockState> = BTreeMap::new();
    let mut version = 0u64;
    let mut report = Report::default();
    let mut was_full = false;
    let ops = 150 + rng.below(150);
    for k in 0..ops {
        let w = rng.below(nwriters as u64) as usize;
        let wr = &mut writers[w];
        let log = wr.log.as_mut().unwrap();
        match rng.below(100) {
            // Write an object of 1-24 blocks (sizes 1 byte to 4 KiB) and fsync it.
            0..=59 => {
                let first = ((wr.id as u64) << 32) | (wr.next_object << 8);
                wr.next_object += 1;
                let n = 1 + rng.below(24);
                for i in 0..n {
                    let b = first + i;
                    version += 1;
                    let len = if rng.below(4) == 0 {
                        1 + rng.below(4096) as usize
                    } else {
                        4096
                    };
                    log.write(b, &content(b, version, len)).unwrap();
                    blocks.entry(b).or_default().since.push((version, len));
                }
                match log.fsync() {
                    Ok(()) => {
                        for i in 0..n {
                            let st = blocks.get_mut(&(first + i)).unwrap();
                            st.acked = *st.since.last().unwrap();
                            st.since.clear();
                        }
                        wr.objects.push((first, n));
                    }
                    Err(e) if is_no_space(&e) => {
                        report.refused += 1;
                        was_full = true;
                        // Refused: the writer deletes what it wrote (a failed put unlinks
                        // its file), and the deletions must get through.
                        for i in 0..n {
                            log.write(first + i, &[]).unwrap();
                            blocks.get_mut(&(first + i)).unwrap().since.push((0, 0));
                        }
                        if log.fsync().is_ok() {
                            for i in 0..n {
                                let st = blocks.get_mut(&(first + i)).unwrap();
                                st.acked = (0, 0);
                                st.since.clear();
                            }
                        }
                    }
                    Err(e) => panic!("seed {seed} op {k}: fsync: {e}"),
                }
            }
            // Delete an object and fsync.
            60..=84 => {
                if wr.objects.is_empty() {
                    continue;
                }
                let (first, n) = wr
                    .objects
                    .remove(rng.below(wr.objects.len() as u64) as usize);
                for i in 0..n {
                    log.write(first + i, &[]).unwrap();
                    blocks.get_mut(&(first + i)).unwrap().since.push((0, 0));
                }
                match log.fsync() {
                    Ok(()) => {
                        if was_full {
                            report.freed_after_full += 1;
                        }
                        for i in 0..n {
                            let st = blocks.get_mut(&(first + i)).unwrap();
                            st.acked = (0, 0);
                            st.since.clear();
                        }
                    }
                    Err(e) if is_no_space(&e) => {
                        // The deletion waits; the object stays listed as gone-or-not.
                    }
                    Err(e) => panic!("seed {seed} op {k}: fsync of a deletion: {e}"),
                }
            }
            // The periodic checkpoint: never refused for space.
            85..=96 => {
                if let Err(e) = log.checkpoint() {
                    panic!(
                        "seed {seed} op {k}: writer {} checkpoint failed ({}full): {e} (replay: XFS_FULL_SIM_SEED={seed})",
                        wr.id,
                        if was_full { "" } else { "not " }
                    );
                }
                if was_full {
                    report.checkpoints_when_full += 1;
                }
            }
            // A power cut of every server, or a clean down of every writer, then restart.
            _ => {
                let clean = rng.below(2) == 0;
                for wr in &mut writers {
                    let mut log = wr.log.take().unwrap();
                    if clean {
                        if let Err(e) = log.checkpoint() {
                            panic!(
                                "seed {seed} op {k}: down: writer {} checkpoint failed ({}full): {e} (replay: XFS_FULL_SIM_SEED={seed})",
                                wr.id,
                                if was_full { "" } else { "not " }
                            );
                        }
                    }
                    drop(log);
                }
                if clean {
                    report.downs += 1;
                } else {
                    report.crashes += 1;
                    let mut r = || rng.next_u64();
                    for s in &servers {
                        s.lock().unwrap().store.power_cut(&mut r);
                    }
                }
                for wr in &mut writers {
                    wr.log = Some(open(wr.id, false));
                }
                // Check every block through its writer's log.
                for wr in &mut writers {
                    let mine: BTreeMap<u64, BlockState> = blocks
                        .iter()
                        .filter(|(b, _)| (**b >> 32) as u16 == wr.id)
                        .map(|(b, s)| (*b, s.clone()))
                        .collect();
                    let what = if clean {
                        "after down"
                    } else {
                        "after a power cut"
                    };
                    check(seed, what, wr.log.as_mut().unwrap(), &mine);
                }
                // What survived is now the acknowledged state.
                for wr in &mut writers {
                    let log = wr.log.as_mut().unwrap();
                    for (b, st) in blocks
                        .iter_mut()
                        .filter(|(b, _)| (**b >> 32) as u16 == wr.id)
                    {
                        let got = log.read(*b).ok();
                        let all: Vec<(u64, usize)> = std::iter::once(st.acked)
                            .chain(st.since.iter().copied())
                            .collect();
                        st.acked = all
                            .into_iter()
                            .find(|&(v, len)| match &got {
                                None => v == 0,
                                Some(d) => v > 0 && *d == content(*b, v, len),
                            })
                            .unwrap_or((0, 0));
                        st.since.clear();
                    }
                    wr.objects.retain(|(first, n)| {
                        (0..*n).all(|i| blocks.get(&(first + i)).is_some_and(|s| s.acked.0 > 0))
                    });
                }
            }
        }
    }
    // The end: a clean down must succeed, and everything acknowledged is there.
    for wr in &mut writers {
        let log = wr.log.as_mut().unwrap();
        if let Err(e) = log.checkpoint() {
            panic!(
                "seed {seed}: final down: writer {} checkpoint failed: {e}",
                wr.id
            );
        }
    }
    for wr in &mut writers {
        wr.log = None;
    }
    for wr in &mut writers {
        let mut log = open(wr.id, false);
        let mine: BTreeMap<u64, BlockState> = blocks
            .iter()
            .filter(|(b, _)| (**b >> 32) as u16 == wr.id)
            .map(|(b, s)| (*b, s.clone()))
            .collect();
        check(seed, "after the final down", &mut log, &mine);
    }
    report
}

#[test]
fn full_devices_keep_every_acknowledged_block_and_always_checkpoint() {
    if let Ok(s) = std::env::var("XFS_FULL_SIM_SEED") {
        let seed = s.parse().expect("XFS_FULL_SIM_SEED: a number");
        println!("{:?}", run(seed));
        return;
    }
    let seeds: u64 = std::env::var("XFS_FULL_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let mut total = Report::default();
    for seed in 0..seeds {
        let r = run(seed);
        total.refused += r.refused;
        total.checkpoints_when_full += r.checkpoints_when_full;
        total.crashes += r.crashes;
        total.downs += r.downs;
        total.freed_after_full += r.freed_after_full;
    }
    println!("{seeds} seeds: {total:?}");
    // The runs must really have been full, crashed and stopped there.
    assert!(
        total.refused >= seeds,
        "only {} writes refused in {seeds} seeds",
        total.refused
    );
    assert!(
        total.checkpoints_when_full > 0 && total.crashes > 0 && total.downs > 0,
        "{total:?}"
    );
    assert!(
        total.freed_after_full > 0,
        "no deletion got through on a full group: {total:?}"
    );
}
