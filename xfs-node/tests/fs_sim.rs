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
