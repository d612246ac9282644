//! The whole cluster simulated (xfs_node::fs::sim): namespace and data operations from
//! random nodes over a lossy, reordering network, a storage server lost and a node crashed
//! and restarted mid-run, every answer compared with a reference POSIX model.
//!
//! `XFS_FS_SIM_SEEDS=N` runs N seeds (default 200); `XFS_FS_SIM_SEED=S` replays one.

use xfs_node::fs::sim::{run, FsSimConfig, FsSimReport};

fn seeds() -> Vec<u64> {
    if let Some(s) = std::env::var("XFS_FS_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return vec![s];
    }
    let n = std::env::var("XFS_FS_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    (1..=n).collect()
}

#[test]
fn every_answer_matches_a_single_posix_file_system() {
    let cfg = FsSimConfig::default();
    let mut total = FsSimReport::default();
    let mut failures = Vec::new();
    for seed in seeds() {
        match run(seed, &cfg) {
            Ok(r) => {
                total.ops += r.ops;
                total.errors_matched += r.errors_matched;
                total.peer_reads += r.peer_reads;
                total.lost += r.lost;
                total.degraded_reads += r.degraded_reads;
                total.crashed |= r.crashed;
                total.unsynced_survived += r.unsynced_survived;
                total.unsynced_lost += r.unsynced_lost;
            }
            Err(e) => {
                eprintln!("FAILED {e}");
                failures.push(e);
                if failures.len() >= 3 {
                    break;
                }
            }
        }
    }
    eprintln!("{total:?}");
    assert!(
        failures.is_empty(),
        "{} seeds failed; first: {}",
        failures.len(),
        failures[0]
    );
    // The faults happened.
    assert!(total.crashed);
    assert!(total.lost > 0, "the network lost nothing");
    assert!(total.degraded_reads > 0, "no read was rebuilt from parity");
    assert!(total.peer_reads > 0, "no read was served by a peer's cache");
    assert!(total.errors_matched > 0, "no errno was compared");
    assert!(total.unsynced_lost + total.unsynced_survived > 0);
}

/// The crash check reads whole files: one fsynced block past 4 GiB lost at the crash (the
/// planted fault, `FsSimConfig::plant_lost_block_past`) fails the run, and the error names
/// the file and the block. The run stops one operation after the crash, so nothing but the
/// crash check can see the loss.
#[test]
fn a_lost_fsynced_block_past_4_gib_is_caught_by_the_crash_check() {
    let cfg = FsSimConfig {
        ops: 91,
        crash_at: Some(90),
        plant_lost_block_past: Some(4 << 30),
        ..FsSimConfig::default()
    };
    let mut planted = 0;
    for seed in 1..=100u64 {
        match run(seed, &cfg) {
            Err(e) if e.contains("nothing to plant") => continue,
            Ok(r) => panic!(
                "seed {seed}: the planted loss {:?} went unnoticed by the crash check",
                r.planted
            ),
            Err(e) => {
                // The plant's note: "[planted: <path> lost block <b>]".
                let note = e
                    .split("[planted: ")
                    .nth(1)
                    .and_then(|s| s.split(']').next())
                    .unwrap_or_else(|| panic!("seed {seed} failed with no loss planted: {e}"));
                let (path, block) = note
                    .split_once(" lost block ")
                    .unwrap_or_else(|| panic!("seed {seed}: a bad plant note {note:?}"));
                let block: u64 = block.parse().expect("the planted block's number");
                assert!(
                    block * 4096 >= 4 << 30,
                    "seed {seed}: planted below 4 GiB: {e}"
                );
                assert!(
                    e.contains("crashed: ") && e.contains(&format!("{path}: block {block} ")),
                    "seed {seed}: the crash check did not name {path} block {block}: {e}"
                );
                eprintln!("seed {seed}: caught: {e}");
                planted += 1;
                if planted == 2 {
                    return;
                }
            }
        }
    }
    panic!("only {planted} of seeds 1..=100 had an fsynced block past 4 GiB to lose (want 2)");
}
