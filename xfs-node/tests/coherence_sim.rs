//! The deterministic cluster simulation: 1,000 seeds of random workloads over the shard
//! loops on the simulated AM network, every read checked against a linearizable reference.

use xfs_node::sim::{check_linearizable, run, Cluster, EventKind, SimConfig, SimTotals};

#[test]
fn a_thousand_seeds_without_a_violation() {
    let seeds: u64 = std::env::var("XFS_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    // XFS_SIM_SEED=S replays just seed S.
    let only: Option<u64> = std::env::var("XFS_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok());
    let range = match only {
        Some(s) => s..s + 1,
        None => 0..seeds,
    };
    let cfg = SimConfig::default();
    let mut sum = SimTotals::default();
    let t = std::time::Instant::now();
    let runs = range.end - range.start;
    for seed in range {
        let r = run(seed, &cfg).unwrap_or_else(|f| panic!("{f}\nreplay: XFS_SIM_SEED={seed}"));
        let t = r.totals;
        assert_eq!(t.completed, cfg.ops as u64, "seed {seed}");
        sum.completed += t.completed;
        sum.peer_reads += t.peer_reads;
        sum.storage_reads += t.storage_reads;
        sum.revokes += t.revokes;
        sum.held_for_order += t.held_for_order;
        sum.revokes_racing_forwards += t.revokes_racing_forwards;
        sum.handoffs += t.handoffs;
        sum.capacity_evictions += t.capacity_evictions;
        sum.reordered += t.reordered;
        sum.messages += t.messages;
        sum.protocol_errors += t.protocol_errors;
        sum.kernel_hits += t.kernel_hits;
        sum.forwards_failed += t.forwards_failed;
        sum.kernel_invalidations += t.kernel_invalidations;
    }
    eprintln!(
        "{runs} seed(s) in {:.1} s: {sum:?}",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(sum.protocol_errors, 0);
    if only.is_some() {
        return;
    }
    assert!(sum.peer_reads > 0, "no read was served by a peer: {sum:?}");
    assert!(sum.revokes > 0, "no revoke: {sum:?}");
    assert!(
        sum.revokes_racing_forwards > 0,
        "no revoke raced a forward: {sum:?}"
    );
    assert!(sum.handoffs > 0, "no N-chance forward: {sum:?}");
    assert!(sum.capacity_evictions > 0, "no capacity eviction: {sum:?}");
    assert!(sum.reordered > 0, "the network reordered nothing: {sum:?}");
    assert!(sum.kernel_hits > 0, "no read hit a kernel cache: {sum:?}");
    assert!(
        sum.kernel_invalidations > 0,
        "no kernel invalidation: {sum:?}"
    );
}

#[test]
fn the_checker_rejects_a_planted_stale_read() {
    // A real run's history, then one read made to return the value its block had before a
    // write that completed before the read began.
    let r = run(7, &SimConfig::default()).expect("seed 7 passes");
    let mut h = r.history;
    check_linearizable(&h).expect("the real history is linearizable");
    let planted = (0..h.len()).find_map(|i| {
        let EventKind::Read(Some(v)) = h[i].kind else {
            return None;
        };
        // An earlier completed write to the same block whose value is not v, followed by
        // another completed write before this read began.
        let writes: Vec<_> = h
            .iter()
            .filter(|w| w.block == h[i].block && matches!(w.kind, EventKind::Write(_)))
            .filter(|w| w.completed.is_some_and(|c| c < h[i].invoked))
            .collect();
        let [.., old, newer] = writes.as_slice() else {
            return None;
        };
        (old.completed < Some(newer.invoked) && old.op != v).then_some((i, old.op))
    });
    let (i, stale) = planted.expect("the history has a read after two writes to its block");
    h[i].kind = EventKind::Read(Some(stale));
    let err = check_linearizable(&h).expect_err("a stale read must be rejected");
    assert!(err.contains("stale read"), "{err}");
}

/// Two nodes of one shard each; node 0's kernel is "external" (the FUSE front's
/// invalidation thread answers for it).
fn external_kernel_pair() -> Cluster {
    use am_core::sim::Faults;
    use xfs_node::coherence::ProtocolConfig;
    let mut c = Cluster::new(3, 2, 1, Faults::none(), ProtocolConfig::default(), 0);
    c.shards[0][0].external_kernel = true;
    c
}

#[test]
fn a_revoke_waits_for_an_external_kernel_invalidation() {
    use xfs_node::coherence::{BlockState, UserOp};

    // Two nodes, one shard each; node 0 reads block 5, its kernel is "external" (the FUSE
    // front's notifier thread); node 1 then writes the block.
    let mut c = external_kernel_pair();
    c.shards[0][0].submit(1, 5, UserOp::Read);
    c.settle(10_000);
    assert_eq!(c.shards[0][0].take_completions().len(), 1);
    c.shards[1][0].submit(2, 5, UserOp::Write(42));
    c.settle(10_000);
    // The write waits: node 0 was revoked but its kernel has not dropped the pages.
    assert!(
        c.shards[1][0].take_completions().is_empty(),
        "a write completed before the reader's kernel let go"
    );
    let asked = c.shards[0][0].take_kernel_requests();
    assert_eq!(asked, vec![5]);
    assert_eq!(c.shards[0][0].client.state(5), BlockState::ReadShared);
    c.shards[0][0].kernel_done(5);
    c.settle(10_000);
    let done = c.shards[1][0].take_completions();
    assert_eq!(done.len(), 1, "the write completes once the kernel let go");
    assert_eq!(c.shards[0][0].client.state(5), BlockState::Invalid);
    assert_eq!(c.shards[1][0].client.state(5), BlockState::PrivateDirty);
}

/// A read of a block whose kernel invalidation is in progress is served from the copy
/// (waiting would deadlock the FUSE front, whose kernel holds the page lock for that read),
/// and the kernel is then asked to drop the block once more before the revoke is answered:
/// the kernel may have cached that read after its first invalidation.
#[test]
fn a_read_during_a_kernel_invalidation_is_served_and_invalidated_again() {
    use xfs_node::coherence::{BlockState, Outcome, UserOp};

    let mut c = external_kernel_pair();
    c.shards[1][0].submit(1, 5, UserOp::Write(7));
    c.settle(10_000);
    assert_eq!(c.shards[1][0].take_completions().len(), 1);
    c.shards[0][0].submit(2, 5, UserOp::Read);
    c.settle(10_000);
    let r = c.shards[0][0].take_completions();
    assert!(matches!(r[0].outcome, Outcome::Read(7)));
    c.shards[1][0].submit(3, 5, UserOp::Write(8));
    c.settle(10_000);
    assert_eq!(c.shards[0][0].take_kernel_requests(), vec![5]);
    // A read meanwhile: served at once, from the copy the revoke has not taken yet.
    c.shards[0][0].submit(4, 5, UserOp::Read);
    c.settle(10_000);
    let r = c.shards[0][0].take_completions();
    assert_eq!(r.len(), 1, "the read waited for the invalidation");
    assert!(matches!(r[0].outcome, Outcome::Read(7)));
    assert_eq!(c.shards[0][0].counters().reads_during_invalidation, 1);
    // The first round's answer asks the kernel again; the write still waits.
    c.shards[0][0].kernel_done(5);
    c.settle(10_000);
    assert!(c.shards[1][0].take_completions().is_empty());
    assert_eq!(
        c.shards[0][0].take_kernel_requests(),
        vec![5],
        "no second round after a read served during the first"
    );
    c.shards[0][0].kernel_done(5);
    c.settle(10_000);
    assert_eq!(c.shards[1][0].take_completions().len(), 1);
    assert_eq!(c.shards[0][0].client.state(5), BlockState::Invalid);
    // And the next read sees the new value.
    c.shards[0][0].submit(5, 5, UserOp::Read);
    c.settle(10_000);
    let r = c.shards[0][0].take_completions();
    assert!(
        matches!(r[0].outcome, Outcome::Read(8)),
        "{:?}",
        r[0].outcome
    );
}

#[test]
fn garbage_and_strangers_are_counted_and_dropped() {
    use am_core::sim::Faults;
    use am_core::{Config, Endpoint, Msg as AmMsg, Tag};
    use xfs_node::coherence::{Msg, ProtocolConfig, UserOp};
    use xfs_node::shard::{encode, COHERENCE_HANDLER};
    let mut c = Cluster::new(5, 2, 1, Faults::none(), ProtocolConfig::default(), 0);
    // A stranger that knows the shard's tag: garbage arguments, a bad payload, and a
    // well-formed message from an endpoint that is not a node of the cluster.
    let mut stranger = Endpoint::new(
        c.net.transport(),
        Config {
            tag: Tag(77),
            ..Config::default()
        },
    );
    let (name, tag) = (c.shards[0][0].name(), c.shards[0][0].tag());
    stranger.map(0, name, tag).unwrap();
    stranger
        .send(0, AmMsg::small(COHERENCE_HANDLER, &[99, 1, 2, 3]))
        .unwrap();
    stranger
        .send(
            0,
            AmMsg::medium(COHERENCE_HANDLER, &[11, 5, 0, 0], &[&[1, 2, 3]]),
        )
        .unwrap();
    let mut payload = Vec::new();
    let args = encode(&Msg::<u64>::Revoke { block: 5, seq: 0 }, &mut payload);
    stranger
        .send(0, AmMsg::small(COHERENCE_HANDLER, &args))
        .unwrap();
    for _ in 0..10_000 {
        let w = c.step() + stranger.poll(64).unwrap_or(0);
        if w == 0 && !c.advance() {
            break;
        }
        if c.shards[0][0].counters().bad_messages == 3 {
            break;
        }
    }
    let counters = c.shards[0][0].counters();
    assert_eq!(counters.bad_messages, 3, "{counters:?}");
    assert_eq!(counters.protocol_errors, 0);
    // The shard still works.
    c.shards[0][0].submit(1, 5, UserOp::Write(9));
    c.shards[1][0].submit(2, 5, UserOp::Read);
    c.settle(10_000);
    assert_eq!(c.shards[0][0].take_completions().len(), 1);
    let read = c.shards[1][0].take_completions();
    assert_eq!(read.len(), 1);
}
