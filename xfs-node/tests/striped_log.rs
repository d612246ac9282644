//! The striped log: round trip, a flipped bit repaired from parity, degraded reads with one
//! (or, with two parity fragments, two) servers gone, a rebuild that restores full
//! redundancy, ENOSPC, recovery from checkpoint plus roll-forward, and power cuts. On the
//! in-memory store and on io_uring over loop devices opened with O_DIRECT.

mod common;
use common::LoopDevice;
use std::sync::{Arc, Mutex};
use xfs_node::coherence::{StoreReply, StoreRequest};
use xfs_node::shard::{StoreDone, StoreWork, SyncFor};
use xfs_node::sim::Rng;
use xfs_node::storage::fragment::{FragmentId, FragmentStore, MemFragmentStore, StoreError};
use xfs_node::storage::log::{Log, LogError, StripeGroup, StripeGroupMap};
use xfs_node::storage::log_actor::LogActor;
use xfs_node::storage::uring::{UringOptions, UringStore};

const FRAG: usize = 64 * 1024;
const BLOCK: usize = 4096;

fn group(servers: usize, parity: usize) -> StripeGroup {
    StripeGroup {
        id: 1,
        servers: (0..servers as u16).collect(),
        parity,
    }
}

fn block_data(block: u64, version: u64) -> Vec<u8> {
    let mut rng = Rng::new(block * 1_000_003 + version);
    (0..BLOCK).map(|_| rng.next_u64() as u8).collect()
}

/// The suite. `make` makes an empty store; `flip` flips a bit of a fragment on a store.
fn suite<S: FragmentStore + Send>(
    servers: usize,
    parity: usize,
    blocks: u64,
    make: &mut dyn FnMut(usize) -> S,
    flip: &mut dyn FnMut(&mut S, FragmentId) -> bool,
) -> Log<S> {
    let g = group(servers, parity);
    let stores = (0..servers).map(|i| Some(make(i))).collect();
    let mut log = Log::new(7, g.clone(), stores).unwrap();
    // Round trip: everything queued, then one fsync writes all segments at once.
    for b in 0..blocks {
        log.write(b, &block_data(b, 0)).unwrap();
    }
    log.fsync().unwrap();
    for b in (0..blocks).step_by(13) {
        assert_eq!(log.read(b).unwrap(), block_data(b, 0), "block {b}");
    }
    // Overwrite some: the new data; live bytes account for the overwrite.
    for b in 0..50 {
        log.write(b, &block_data(b, 1)).unwrap();
    }
    assert_eq!(
        log.read(3).unwrap(),
        block_data(3, 1),
        "unsynced writes read back"
    );
    log.fsync().unwrap();
    let live: u64 = log.live_bytes().values().sum();
    assert_eq!(live, blocks * BLOCK as u64);
    assert_eq!(log.read(3).unwrap(), block_data(3, 1));

    // A flipped bit: detected, repaired from parity, reported.
    let a = log.imap()[&100];
    let frag = FragmentId {
        segment: a.segment,
        index: (a.offset as usize / FRAG) as u16,
    };
    let server = frag.index as usize;
    assert!(flip(log.store_mut(server).unwrap(), frag));
    // The fragment may be in the read cache from the reads above (good data): ask the
    // server.
    log.clear_fragment_cache();
    assert_eq!(log.read(100).unwrap(), block_data(100, 0));
    assert_eq!(log.counters().repaired, 1);
    let degraded = log.counters().degraded_reads;
    log.clear_fragment_cache();
    assert_eq!(log.read(100).unwrap(), block_data(100, 0));
    assert_eq!(
        log.counters().degraded_reads,
        degraded,
        "the fragment was rewritten"
    );

    // Checkpoint, more writes, restart: checkpoint + roll-forward give everything back.
    log.checkpoint().unwrap();
    for b in 50..80 {
        log.write(b, &block_data(b, 2)).unwrap();
    }
    log.fsync().unwrap();
    let stores = log.into_stores();
    let mut log = Log::recover(7, g.clone(), stores).unwrap();
    let want = |b: u64| {
        block_data(
            b,
            if b < 50 {
                1
            } else if b < 80 {
                2
            } else {
                0
            },
        )
    };
    for b in (0..blocks).step_by(7) {
        assert_eq!(log.read(b).unwrap(), want(b), "block {b} after recovery");
    }

    // `parity` servers gone: every block still reads back, rebuilt from parity.
    let mut gone = Vec::new();
    for i in 0..parity {
        gone.push(log.take_store(i).unwrap());
    }
    // Not from the read cache: from the servers left.
    log.clear_fragment_cache();
    for b in 0..blocks {
        assert_eq!(log.read(b).unwrap(), want(b), "degraded read of block {b}");
    }
    assert!(log.counters().degraded_reads > 0);
    // Writes still succeed with the servers down.
    log.write(blocks + 1, &block_data(blocks + 1, 0)).unwrap();
    log.fsync().unwrap();
    // Rebuild on replacements: full redundancy is back (lose other servers, read all).
    for i in 0..parity {
        let n = log.rebuild(i, make(100 + i)).unwrap();
        assert!(n > 0);
    }
    drop(gone);
    let mut others = Vec::new();
    for i in parity..2 * parity {
        others.push(log.take_store(i).unwrap());
    }
    log.clear_fragment_cache();
    for b in 0..blocks {
        assert_eq!(log.read(b).unwrap(), want(b), "block {b} after the rebuild");
    }
    assert_eq!(log.read(blocks + 1).unwrap(), block_data(blocks + 1, 0));
    for (k, s) in others.into_iter().enumerate() {
        log.rebuild(parity + k, s).unwrap();
    }
    log
}

/// Fill the log until the stores are full: a clean ENOSPC, and nothing acknowledged lost.
fn fill_until_enospc<S: FragmentStore + Send>(mut log: Log<S>, first: u64) {
    let mut b = first;
    let err = loop {
        for _ in 0..200 {
            log.write(b, &block_data(b, 9)).unwrap();
            b += 1;
        }
        if let Err(e) = log.fsync() {
            break e;
        }
        assert!(b < first + 10_000_000, "never ran out of space");
    };
    assert!(
        matches!(err, LogError::Store(StoreError::NoSpace { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("ENOSPC"), "{err}");
    assert_eq!(
        log.read(first).unwrap(),
        block_data(first, 9),
        "acknowledged data survives ENOSPC"
    );
}

fn mem(_: usize) -> MemFragmentStore {
    MemFragmentStore::new(400, FRAG)
}

#[test]
fn the_log_suite_on_memory_stores_single_and_double_parity() {
    for (servers, parity) in [(4, 1), (6, 2)] {
        let log = suite(servers, parity, 600, &mut mem, &mut |s, id| {
            s.flip_bit(id, 77_777)
        });
        fill_until_enospc(log, 1_000_000);
    }
}

#[test]
fn the_stripe_group_map_is_validated() {
    let ok = StripeGroupMap {
        version: 1,
        groups: vec![
            group(4, 1),
            StripeGroup {
                id: 2,
                ..group(6, 2)
            },
        ],
    };
    assert!(ok.validate().is_ok());
    let dup = StripeGroupMap {
        version: 1,
        groups: vec![group(4, 1), group(3, 1)],
    };
    assert!(dup.validate().unwrap_err().to_string().contains("twice"));
    let no_parity = StripeGroupMap {
        version: 1,
        groups: vec![group(4, 0)],
    };
    assert!(no_parity
        .validate()
        .unwrap_err()
        .to_string()
        .contains("parity"));
    assert!(
        Log::new(1, group(4, 1), vec![Some(mem(0))]).is_err(),
        "store count must match"
    );
}

#[test]
fn power_cuts_keep_every_fsynced_block_and_return_no_garbage() {
    let (mut dropped, mut torn, mut undecodable) = (0, 0, 0);
    for seed in 0..60u64 {
        let mut rng = Rng::new(seed);
        let g = group(4, 1);
        let stores = (0..4)
            .map(|_| Some(MemFragmentStore::new(200, 16 * 1024)))
            .collect();
        let mut log = Log::new(3, g.clone(), stores).unwrap();
        // Per block: every value written (version numbers), and the last fsynced one.
        let mut written: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
        let mut synced: std::collections::BTreeMap<u64, u64> = Default::default();
        let mut pending: std::collections::BTreeMap<u64, u64> = Default::default();
        let mut version = 0;
        for _ in 0..rng.below(300) + 50 {
            match rng.below(20) {
                0 => {
                    log.fsync().unwrap();
                    synced.append(&mut pending);
                }
                1 => {
                    log.checkpoint().unwrap();
                    synced.append(&mut pending);
                }
                2 | 3 => log.write_behind().unwrap(),
                _ => {
                    let b = rng.below(40);
                    version += 1;
                    log.write(b, &block_data(b, version)[..1024]).unwrap();
                    written.entry(b).or_default().push(version);
                    pending.insert(b, version);
                }
            }
        }
        // The cut comes in the middle of an fsync: everything written, some servers synced.
        log.write_behind().unwrap();
        for i in 0..4 {
            if rng.below(2) == 0 {
                log.store_mut(i).unwrap().sync().unwrap();
            }
        }
        let mut stores = log.into_stores();
        let mut r = || rng.next_u64();
        for s in stores.iter_mut().flatten() {
            s.power_cut(&mut r);
            dropped += s.faults.dropped;
            torn += s.faults.torn;
        }
        let mut log = Log::recover(3, g, stores).unwrap();
        undecodable += log.counters().undecodable;
        for (b, versions) in &written {
            match log.read(*b) {
                Ok(got) => {
                    let v = versions
                        .iter()
                        .find(|v| block_data(*b, **v)[..1024] == got[..])
                        .unwrap_or_else(|| panic!("seed {seed}: block {b} reads back garbage"));
                    if let Some(s) = synced.get(b) {
                        assert!(v >= s, "seed {seed}: block {b} went back to version {v} before the fsynced {s}");
                    }
                }
                Err(LogError::NotFound(_)) => {
                    assert!(
                        !synced.contains_key(b),
                        "seed {seed}: fsynced block {b} lost"
                    );
                }
                Err(e) => panic!("seed {seed}: block {b}: {e}"),
            }
        }
    }
    assert!(
        dropped > 0 && torn > 0,
        "faults injected: {dropped} dropped, {torn} torn"
    );
    eprintln!(
        "power cuts: {dropped} writes dropped, {torn} torn, {undecodable} segments undecodable"
    );
}

#[test]
fn the_log_suite_on_io_uring_over_loop_devices() {
    // Four servers (3 data + 1 parity) and one replacement, each a 24 MiB loop device.
    let devs: Vec<LoopDevice> = (0..6)
        .map(|i| LoopDevice::new(&i.to_string(), 24 << 20))
        .collect();
    let paths: Vec<String> = devs.iter().map(|d| d.dev.clone()).collect();
    let opts = UringOptions {
        fragment_bytes: FRAG,
        depth: 64,
        create_bytes: None,
    };
    let mut next = 0;
    let mut make = |i: usize| {
        let p = if i >= 100 {
            &paths[4 + (i - 100)]
        } else {
            &paths[i]
        };
        next += 1;
        UringStore::open(p, opts.clone()).unwrap_or_else(|e| panic!("{p}: {e}"))
    };
    // 2,000 blocks before the first fsync: 43 segments, written to each server in one batch.
    let log = suite(4, 1, 2000, &mut make, &mut |s, id| {
        s.flip_bit(id, 77_777).unwrap()
    });
    let mut max_in_flight = 0;
    let mut log = log;
    for i in 0..4 {
        max_in_flight = max_in_flight.max(log.store_mut(i).map_or(0, |s| s.stats().max_in_flight));
    }
    assert!(
        max_in_flight >= 32,
        "at most {max_in_flight} requests were in flight on a server"
    );
    eprintln!(
        "loop devices {paths:?}: max in flight {max_in_flight}, {:?}",
        log.counters()
    );
    fill_until_enospc(log, 1_000_000);
}

/// Deleting everything on a full log whose blocks are tiny: the deletions need a summary
/// entry each, as many segments as the data took, far more than are free. They go in
/// rounds (each durable and checkpointed, freeing the segments it emptied), the fsync
/// succeeds, and the space comes back; every block then reads as deleted, also after
/// recovery.
#[test]
fn deleting_everything_on_a_full_log_of_tiny_blocks_frees_the_space() {
    let g = group(3, 1);
    let stores = (0..3)
        .map(|_| Some(MemFragmentStore::new(120, 16 * 1024)))
        .collect();
    let mut log = Log::new(1, g.clone(), stores).unwrap();
    let total = log.free_segments();
    let mut acked = 0u64;
    let mut b = 0u64;
    loop {
        for _ in 0..300 {
            log.write(b, &[b as u8]).unwrap();
            b += 1;
        }
        match log.fsync() {
            Ok(()) => acked = b,
            Err(LogError::Store(StoreError::NoSpace { .. })) => break,
            Err(e) => panic!("{e}"),
        }
        assert!(b < 1_000_000, "never ran out of space");
    }
    let full = log.free_segments();
    assert!(acked > 10_000, "only {acked} blocks fit");
    for x in 0..b {
        log.write(x, &[]).unwrap();
    }
    log.fsync().unwrap_or_else(|e| {
        panic!("deleting {b} blocks on a full log ({full} of {total} free): {e}")
    });
    log.checkpoint().unwrap();
    let after = log.free_segments();
    assert!(
        after > total * 8 / 10,
        "{after} of {total} segments free after deleting everything ({full} when full)"
    );
    for x in (0..b).step_by(97) {
        assert!(
            matches!(log.read(x), Err(LogError::NotFound(_))),
            "block {x} still reads"
        );
    }
    let mut log = Log::recover(1, g, log.into_stores()).unwrap();
    for x in (0..acked).step_by(97) {
        assert!(
            matches!(log.read(x), Err(LogError::NotFound(_))),
            "block {x} back after recovery"
        );
    }
}

/// A block the log cannot rebuild (two of the three fragments of its segment lost) is
/// reported by name: the inode and the byte range of the file it holds; the read fails,
/// nothing panics, and the file's block in another segment still reads.
#[test]
fn an_unreadable_block_is_named_by_inode_and_offset() {
    use xfs_node::fs::layout::block_id;
    let stores = (0..3)
        .map(|_| Some(MemFragmentStore::new(64, 16 * 1024)))
        .collect();
    let mut log = Log::new(1, group(3, 1), stores).unwrap();
    let (lost, kept) = (block_id(77, 3), block_id(77, 4));
    log.write(lost, &block_data(lost, 1)).unwrap();
    log.fsync().unwrap();
    log.write(kept, &block_data(kept, 1)).unwrap();
    log.fsync().unwrap();
    let seg = log.imap()[&lost].segment;
    assert_ne!(
        seg,
        log.imap()[&kept].segment,
        "the two blocks must be in two segments"
    );
    for i in 0..2 {
        let s = log.store_mut(i).unwrap();
        s.delete(&[FragmentId {
            segment: seg,
            index: i as u16,
        }])
        .unwrap();
        s.sync().unwrap();
    }
    let (mut actor, _) = actor_of(log);
    let done = actor.run(vec![(0, read_of(lost)), (1, read_of(kept))]);
    assert_eq!(done.len(), 2, "one answer per request: {done:?}");
    let StoreDone::Block { result: Err(e), .. } = &done[0].1 else {
        panic!("a block read back with two of its three fragments gone: {done:?}");
    };
    assert!(e.contains("inode 77, bytes 12288..16384"), "{e}");
    let StoreDone::Block {
        result: Ok(Some(d)),
        ..
    } = &done[1].1
    else {
        panic!("the file's other block: {:?}", done[1]);
    };
    assert_eq!(*d, block_data(kept, 1), "the file's other block");
}

/// The log actor around `log`, and the log's handle.
#[allow(clippy::type_complexity)]
fn actor_of(
    log: Log<MemFragmentStore>,
) -> (
    LogActor<MemFragmentStore>,
    Arc<Mutex<Option<Log<MemFragmentStore>>>>,
) {
    let log = Arc::new(Mutex::new(Some(log)));
    (LogActor::new(log.clone(), Default::default()), log)
}

/// A storage-role read of `block` (its answer goes to node 9).
fn read_of(block: u64) -> StoreWork<Vec<u8>> {
    StoreWork::Block(StoreRequest {
        block,
        write: None,
        reply: StoreReply::Data {
            to: 9,
            seq: 0,
            exclusive: false,
        },
    })
}

/// A write-back of `data` to `block` (acknowledged to node 9).
fn write_of(block: u64, data: Vec<u8>) -> StoreWork<Vec<u8>> {
    StoreWork::Block(StoreRequest {
        block,
        write: Some(data),
        reply: StoreReply::WriteBackAck { to: 9 },
    })
}

/// The log actor does a batch in the order asked (a read sees the writes before it, not
/// those after), answers every piece, and answers all of the batch's syncs with one fsync
/// that covers every write of the batch: after a power cut of every server the log
/// recovers with the last write.
#[test]
fn the_log_actor_keeps_order_and_one_fsync_answers_a_batchs_syncs() {
    let (b, other) = (5u64, 6u64);
    let stores = (0..3).map(|i| Some(mem(i))).collect();
    let (mut actor, log) = actor_of(Log::new(1, group(3, 1), stores).unwrap());
    let work = vec![
        (0usize, write_of(b, block_data(b, 1))),
        (0, StoreWork::Sync(SyncFor::Local(41))),
        (1, read_of(b)),
        (0, write_of(b, block_data(b, 2))),
        (1, StoreWork::Sync(SyncFor::Peer { from: 3, op: 42 })),
        (1, read_of(b)),
        (0, read_of(other)),
    ];
    let done = actor.run(work);
    let reads: Vec<Option<Vec<u8>>> = done
        .iter()
        .filter_map(|(_, d)| match d {
            StoreDone::Block {
                reply: StoreReply::Data { .. },
                result,
                ..
            } => Some(result.clone().expect("a read")),
            _ => None,
        })
        .collect();
    assert_eq!(
        reads,
        vec![
            Some(block_data(b, 1)),
            Some(block_data(b, 2)),
            Some(Vec::new())
        ],
        "each read sees the writes asked before it; a block never written reads empty"
    );
    let syncs: Vec<(usize, SyncFor, bool)> = done
        .iter()
        .filter_map(|(k, d)| match d {
            StoreDone::Sync { asked, result } => Some((*k, *asked, result.is_ok())),
            _ => None,
        })
        .collect();
    assert_eq!(
        syncs,
        vec![
            (0, SyncFor::Local(41), true),
            (1, SyncFor::Peer { from: 3, op: 42 }, true)
        ],
        "both syncs answered, to the shards that asked"
    );
    let acks = done
        .iter()
        .filter(|(_, d)| {
            matches!(
                d,
                StoreDone::Block {
                    reply: StoreReply::WriteBackAck { .. },
                    result: Ok(None),
                    ..
                }
            )
        })
        .count();
    assert_eq!(acks, 2, "both writes acknowledged: {done:?}");
    let k = actor.counters();
    assert_eq!((k.batches, k.blocks, k.syncs, k.fsyncs), (1, 5, 2, 1));
    // Every server loses what it had not synced: the fsync covered both writes.
    let log = log.lock().unwrap().take().unwrap();
    let mut rng = Rng::new(7);
    let stores: Vec<Option<MemFragmentStore>> = log
        .into_stores()
        .into_iter()
        .map(|s| {
            let mut s = s.unwrap();
            s.power_cut(&mut || rng.next_u64());
            Some(s)
        })
        .collect();
    let mut back = Log::recover(1, group(3, 1), stores).unwrap();
    assert_eq!(back.read(b).unwrap(), block_data(b, 2), "the synced write");
}

/// Log `id` over three memory stores (one parity) with blocks `0..blocks` written at
/// `version` and fsynced.
fn written_log(id: u16, blocks: u64, version: u64) -> Log<MemFragmentStore> {
    let stores = (0..3).map(|i| Some(mem(i))).collect();
    let mut log = Log::new(id, group(3, 1), stores).unwrap();
    for b in 0..blocks {
        log.write(b, &block_data(b, version)).unwrap();
    }
    log.fsync().unwrap();
    log
}

/// A sequential read of fsynced blocks fetches each fragment once (the log keeps the last
/// fragments it fetched); overwritten blocks read their new version, from new segments.
#[test]
fn a_sequential_read_fetches_each_fragment_once() {
    let blocks = 200u64;
    let mut log = written_log(7, blocks, 0);
    let before = log.counters();
    for b in 0..blocks {
        assert_eq!(log.read(b).unwrap(), block_data(b, 0), "block {b}");
    }
    let k = log.counters();
    let fetches = k.fragment_fetches - before.fragment_fetches;
    let hits = k.fragment_cache_hits - before.fragment_cache_hits;
    // Each fragment holds FRAG / BLOCK blocks (less the segment summary in the first).
    let most = blocks.div_ceil((FRAG / BLOCK) as u64 - 1) + 1;
    assert!(
        fetches <= most,
        "{fetches} fragment fetches for {blocks} blocks in order (at most {most})"
    );
    // The first block read of each fragment fetched only its bytes; the second, the rest.
    let ranged = k.fragment_range_reads - before.fragment_range_reads;
    assert!(ranged <= most, "{ranged} ranged reads in a sequential read");
    assert_eq!(fetches + hits + ranged, blocks);
    // New versions land in new segments: read back new, never a cached old one.
    for b in (0..blocks).step_by(3) {
        log.write(b, &block_data(b, 1)).unwrap();
    }
    log.fsync().unwrap();
    for b in 0..blocks {
        let v = if b % 3 == 0 { 1 } else { 0 };
        assert_eq!(
            log.read(b).unwrap(),
            block_data(b, v),
            "block {b} after the rewrite"
        );
    }
}

/// A random read fetches only its block's bytes from the fragment's server, not the whole
/// fragment; one on a server that lost its copy still reads right, from the others and
/// parity.
#[test]
fn a_random_read_fetches_only_its_block() {
    // More fragments than the log remembers as read in part (`RANGED_SEEN`), and a stride
    // longer than a fragment: no fragment is read twice within that memory.
    let blocks = 2000u64;
    let mut log = written_log(7, blocks, 0);
    let before = log.counters();
    // Every block once, never the one after the last read.
    let order: Vec<u64> = (0..blocks).map(|i| i * 67 % blocks).collect();
    for b in &order {
        assert_eq!(log.read(*b).unwrap(), block_data(*b, 0), "block {b}");
    }
    let k = log.counters();
    let ranged = k.fragment_range_reads - before.fragment_range_reads;
    let fetches = k.fragment_fetches - before.fragment_fetches;
    assert_eq!((ranged, fetches), (blocks, 0), "{k:?}");
    // The first data fragment's server loses it: its blocks come back rebuilt.
    let mut log = written_log(8, blocks, 2);
    let s = log.store_mut(0).unwrap();
    let frags = s.list().unwrap();
    s.delete(&frags).unwrap();
    s.sync().unwrap();
    let before = log.counters();
    for b in &order {
        assert_eq!(
            log.read(*b).unwrap(),
            block_data(*b, 2),
            "block {b}, degraded"
        );
    }
    assert!(log.counters().degraded_reads > before.degraded_reads);
}
