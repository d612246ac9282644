//! The log cleaner in the cluster simulation (seeded, with a crash in mid-segment and a
//! change of leader), the forced writer-wins race, and a control run without a cleaner.
//!
//! Replay a failure: `XFS_CLEAN_SIM_SEED=<seed> cargo test -p xfs-node --test cleaner`.

use xfs_node::fs::clean_sim::{self, CleanSimConfig, Race};
use xfs_node::storage::cleaner::CleanerConfig;

fn seeds(default: &[u64]) -> Vec<u64> {
    match std::env::var("XFS_CLEAN_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("XFS_CLEAN_SIM_SEED must be a number")],
        Err(_) => default.to_vec(),
    }
}

#[test]
fn five_times_the_capacity_with_a_crashed_cleaner_and_a_new_leader() {
    for seed in seeds(&[1, 2]) {
        let cfg = CleanSimConfig::default();
        let r = clean_sim::run(seed, &cfg).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("seed {seed}: {r:?}");
        assert!(
            r.written >= 5 * r.capacity,
            "seed {seed}: wrote {} bytes, capacity {}",
            r.written,
            r.capacity
        );
        // Free space within 10% of capacity minus live bytes.
        let want = r.capacity - r.live - r.capacity / 10;
        assert!(
            r.free >= want,
            "seed {seed}: {} bytes free, want at least {want} (capacity {}, live {})",
            r.free,
            r.capacity,
            r.live
        );
        assert!(r.segments_cleaned > 0 && r.blocks_moved > 0 && r.freed > 0);
        let (node, seg, freed) = r.crashed_segment.expect("the crash ran");
        assert!(
            freed,
            "seed {seed}: segment {seg:#x} of node {node}, half cleaned when node {node} crashed, was never freed"
        );
        assert!(
            r.leaders.len() >= 2 && r.leaders[0] == 1,
            "seed {seed}: node 1 leads first, another while it is down: {:?}",
            r.leaders
        );
        assert!(r.min_free_segments > 0);
    }
}

#[test]
fn the_writer_wins_a_race_with_the_cleaner() {
    for (seed, race) in seeds(&[7])
        .into_iter()
        .flat_map(|s| [(s, Race::BeforeMove), (s, Race::AfterMove)])
    {
        let (moved, discarded, freed) = clean_sim::writer_wins(seed, race)
            .unwrap_or_else(|e| panic!("seed {seed}, {race:?}: {e}"));
        assert!(
            discarded >= 1,
            "the cleaner's copy of the raced block was kept"
        );
        assert!(moved >= 1, "the other blocks of the segment were not moved");
        assert!(freed, "the cleaned segment was not freed");
    }
}

#[test]
fn without_a_cleaner_the_same_workload_runs_out_of_space() {
    // The control: the same workload with a cleaner that never starts fails with ENOSPC,
    // so the run above passes because of the cleaner.
    let cfg = CleanSimConfig {
        crash: false,
        cleaner: CleanerConfig {
            low_water: 0.0,
            high_water: 0.0,
            idle_ms: u64::MAX,
            ..CleanerConfig::default()
        },
        ..CleanSimConfig::default()
    };
    let e = clean_sim::run(1, &cfg).expect_err("the log should fill without a cleaner");
    assert!(e.contains("Errno(28)"), "not ENOSPC: {e}");
}

#[test]
fn a_deleted_file_leaves_no_live_block() {
    use xfs_node::fs::sim::{apply_fs, FsOpSim, FsSim, FsSimConfig};
    let sim = FsSim::new(
        3,
        &FsSimConfig {
            lose_server_at: None,
            crash_at: None,
            ..FsSimConfig::default()
        },
    );
    let c = sim.client(1);
    c.format().unwrap();
    for op in [
        FsOpSim::Create("/a".into()),
        FsOpSim::Write("/a".into(), 0, 40_000, 9),
        FsOpSim::Fsync("/a".into()),
    ] {
        apply_fs(c, &op).unwrap();
    }
    let ino = c.resolve("/a").unwrap().ino;
    let live = |sim: &FsSim| {
        clean_sim::live_breakdown(sim)
            .get(&ino)
            .copied()
            .unwrap_or_default()
    };
    assert_eq!(live(&sim).0, 11, "10 data blocks and the inode");
    apply_fs(sim.client(2), &FsOpSim::Unlink("/a".into())).unwrap();
    for n in 1..=3 {
        sim.client(n).sync_all().unwrap();
    }
    assert_eq!(
        live(&sim),
        (0, 0),
        "the deleted file's blocks are still live"
    );
}
