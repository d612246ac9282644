//! The whole cluster simulated (xfs_node::fs::sim): namespace and data operations from
//! random nodes over a lossy, reordering network, a storage server lost and a node crashed
//! and restarted mid-run, every answer compared with a reference POSIX model. The nodes'
//! log actors, store clients and the storage servers are the node's own code, and each
//! node's kernel invalidations go through the shard loop's queue to a simulated mount whose
//! kernel serves reads from its copies.
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
                total.actor_deferred += r.actor_deferred;
                total.storage_served += r.storage_served;
                total.storage_lost += r.storage_lost;
                total.storage_bad_requests += r.storage_bad_requests;
                total.kernel_hits += r.kernel_hits;
                total.kernel_invalidations += r.kernel_invalidations;
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
    // The storage servers' own code served the logs over a lossy network, and every
    // request was inside its sender's window.
    assert!(
        total.storage_served > 0,
        "no storage server served a request"
    );
    assert!(total.storage_lost > 0, "the storage network lost nothing");
    assert_eq!(total.storage_bad_requests, 0, "requests refused");
    // The kernels served reads from their copies, and the shards' invalidations reached
    // them through the mount queue.
    assert!(total.kernel_hits > 0, "no read was served by a kernel");
    assert!(
        total.kernel_invalidations > 0,
        "no kernel invalidation was answered"
    );
    // The nodes' log actors ran in the loop, their answers late.
    assert!(total.actor_deferred > 0, "no store work was answered late");
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

/// A node that dies between the two directory write-backs of a cross-directory rename (the
/// failpoint `rename-between-buckets`, armed in the simulation) leaves both names of the
/// file after its restart, counting two links; removing one name keeps the other readable,
/// and `fsck` reports the interrupted rename, repairs it and then checks clean. The
/// directories and the file are managed by three different nodes, over the lossy network.
#[test]
fn a_rename_cut_between_its_two_buckets_keeps_the_file_and_fsck_repairs_it() {
    use xfs_node::fs::client::{RenameMode, FAILPOINT_RENAME_BETWEEN_BUCKETS};
    use xfs_node::fs::fsck::fsck;
    use xfs_node::fs::sim::{pattern, FsSim};

    let mut sim = FsSim::new(21, &FsSimConfig::default());
    let root = sim.client(1).root();
    sim.client(1).format().expect("format");
    let a = sim
        .client(2)
        .mkdir(root, b"a", 0o755, 0, 0)
        .expect("mkdir /a");
    let b = sim
        .client(3)
        .mkdir(root, b"b", 0o755, 0, 0)
        .expect("mkdir /b");
    let f = sim
        .client(1)
        .create(a.ino, b"f", 0o644, 0, 0)
        .expect("create /a/f");
    let content = pattern(77, 10_000);
    assert_eq!(sim.client(1).write(f.ino, 0, &content), Ok(content.len()));
    for n in 1..=3 {
        sim.client(n).sync_all().expect("sync_all");
    }

    sim.arm_failpoint(1, FAILPOINT_RENAME_BETWEEN_BUCKETS);
    // The target bucket is durable when node 1 dies; the source bucket is not.
    let _ = sim
        .client(1)
        .rename(a.ino, b"f", b.ino, b"g", RenameMode::Replace);
    assert!(
        sim.world.borrow().dead.contains(&1),
        "the rename never reached the failpoint between its two buckets"
    );
    sim.crash_and_restart(1).expect("restart node 1");

    let (c2, c3) = (sim.client(2), sim.client(3));
    let src = c2
        .lookup(a.ino, b"f")
        .expect("the source name after the crash");
    let dst = c3
        .lookup(b.ino, b"g")
        .expect("the target name after the crash");
    assert_eq!(src.ino, f.ino);
    assert_eq!(dst.ino, f.ino);
    assert_eq!(
        c2.getattr(f.ino).expect("getattr").nlink,
        2,
        "two names must count two links"
    );
    assert_eq!(c3.read(f.ino, 0, 20_000).expect("read"), content);

    // Removing one name keeps the other (with the link count one low, this freed the file).
    c2.unlink(a.ino, b"f").expect("unlink /a/f");
    let dst = c3
        .lookup(b.ino, b"g")
        .expect("/b/g after the other name went");
    assert_eq!(dst.nlink, 1);
    assert_eq!(c3.read(dst.ino, 0, 20_000).expect("read /b/g"), content);

    let found = fsck(c2, false).expect("fsck");
    assert!(
        found.problems.iter().any(|p| p.contains("interrupted")),
        "fsck did not report the interrupted rename: {found:?}"
    );
    let repaired = fsck(c2, true).expect("fsck --repair");
    assert!(
        !repaired.problems.is_empty() && repaired.remaining.is_empty(),
        "{repaired:?}"
    );
    let clean = fsck(sim.client(1), false).expect("fsck after the repair");
    assert!(clean.problems.is_empty(), "{clean:?}");
    assert_eq!(
        sim.client(1)
            .read(dst.ino, 0, 20_000)
            .expect("read /b/g from node 1"),
        content
    );
}
