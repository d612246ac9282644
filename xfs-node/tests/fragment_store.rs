//! The fragment-store suite, on the io_uring store (a plain file, and a loop device opened
//! with O_DIRECT) and on the in-memory store; plus power cuts on the in-memory store.

use std::path::PathBuf;

mod common;
use common::LoopDevice;
use xfs_node::sim::Rng;
use xfs_node::storage::fragment::{FragmentId, FragmentStore, MemFragmentStore, StoreError};
use xfs_node::storage::uring::{UringOptions, UringStore};

const FRAG: usize = 64 * 1024;

fn id(segment: u64, index: u16) -> FragmentId {
    FragmentId { segment, index }
}

fn payload(rng: &mut Rng, max: usize) -> Vec<u8> {
    let len = 1 + rng.below(max as u64) as usize;
    (0..len).map(|_| rng.next_u64() as u8).collect()
}

/// The checks every store passes. `reopen` closes and opens the store again (what a
/// restart does); `flip` flips a bit of a fragment on the medium.
fn suite<S: FragmentStore>(
    mut s: S,
    reopen: &mut dyn FnMut(S) -> S,
    flip: &mut dyn FnMut(&mut S, FragmentId) -> bool,
) -> S {
    let mut rng = Rng::new(1);
    // Round trip: 100 fragments of random sizes in one call.
    let frags: Vec<(FragmentId, Vec<u8>)> = (0..100)
        .map(|i| (id(i / 4, (i % 4) as u16), payload(&mut rng, FRAG)))
        .collect();
    let refs: Vec<(FragmentId, &[u8])> = frags.iter().map(|(i, d)| (*i, d.as_slice())).collect();
    let free0 = s.free_slots().unwrap();
    s.write(&refs).unwrap();
    s.sync().unwrap();
    assert_eq!(s.free_slots().unwrap(), free0 - 100);
    let ids: Vec<FragmentId> = frags.iter().map(|(i, _)| *i).collect();
    for (r, (_, d)) in s.read(&ids).into_iter().zip(&frags) {
        assert_eq!(&r.unwrap(), d);
    }
    assert_eq!(s.list().unwrap(), ids);

    // Rewrite ten, delete ten, restart: the new data, nothing deleted, the rest intact.
    let new: Vec<(FragmentId, Vec<u8>)> = ids[..10]
        .iter()
        .map(|i| (*i, payload(&mut rng, FRAG)))
        .collect();
    let refs: Vec<(FragmentId, &[u8])> = new.iter().map(|(i, d)| (*i, d.as_slice())).collect();
    s.write(&refs).unwrap();
    s.delete(&ids[10..20]).unwrap();
    s.sync().unwrap();
    let mut s = reopen(s);
    assert_eq!(
        s.free_slots().unwrap(),
        free0 - 90,
        "rewritten and deleted slots are free again"
    );
    let got = s.read(&ids);
    for (i, r) in got.into_iter().enumerate() {
        match i {
            0..=9 => assert_eq!(r.unwrap(), new[i].1),
            10..=19 => assert!(matches!(r, Err(StoreError::NotFound(_))), "{r:?}"),
            _ => assert_eq!(r.unwrap(), frags[i].1),
        }
    }

    // A flipped bit is detected, never returned.
    assert!(flip(&mut s, ids[30]));
    let r = s.read(&[ids[30], ids[31]]);
    assert!(
        matches!(r[0], Err(StoreError::Corrupt { .. })),
        "{:?}",
        r[0]
    );
    assert_eq!(r[1].as_ref().unwrap(), &frags[31].1);

    // Full: a batch that does not fit fails as a whole with ENOSPC and writes nothing.
    let big = vec![7u8; FRAG];
    let free = s.free_slots().unwrap();
    let too_many: Vec<(FragmentId, &[u8])> = (0..free as u64 + 1)
        .map(|i| (id(1_000 + i, 0), big.as_slice()))
        .collect();
    let e = s.write(&too_many).unwrap_err();
    assert!(matches!(e, StoreError::NoSpace { .. }), "{e}");
    assert!(e.to_string().contains("ENOSPC"));
    assert_eq!(s.free_slots().unwrap(), free);
    // Filling exactly works; one more fails; freeing (durably) makes room.
    s.write(&too_many[..free]).unwrap();
    s.sync().unwrap();
    assert_eq!(s.free_slots().unwrap(), 0);
    assert!(matches!(
        s.write(&too_many[free..]),
        Err(StoreError::NoSpace { .. })
    ));
    s.delete(&[too_many[0].0]).unwrap();
    s.sync().unwrap();
    s.write(&too_many[free..]).unwrap();
    s.sync().unwrap();
    let r = s.read(&[too_many[free].0]);
    assert_eq!(r[0].as_ref().unwrap(), &big);
    // Too large a fragment is refused.
    let huge = vec![0u8; FRAG + 1];
    assert!(matches!(
        s.write(&[(id(9, 9), &huge)]),
        Err(StoreError::TooLarge { .. })
    ));
    s
}

fn scratch(name: &str) -> PathBuf {
    // Not /tmp: it may be tmpfs, which refuses O_DIRECT.
    let dir = PathBuf::from("/var/tmp");
    dir.join(format!("xfs-node-{name}-{}.img", std::process::id()))
}

#[test]
fn the_suite_on_the_in_memory_store() {
    suite(
        MemFragmentStore::new(300, FRAG),
        &mut |mut s| {
            s.reopen();
            s
        },
        &mut |s, id| s.flip_bit(id, 12_345),
    );
}

fn run_on_uring(path: &PathBuf, create: Option<u64>) {
    let opts = UringOptions {
        fragment_bytes: FRAG,
        depth: 64,
        create_bytes: create,
    };
    let o = opts.clone();
    let p = path.clone();
    let s =
        UringStore::open(path, opts).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let mut max_in_flight = 0;
    let s = suite(
        s,
        &mut |s| {
            max_in_flight = max_in_flight.max(s.stats().max_in_flight);
            drop(s);
            UringStore::open(&p, o.clone()).expect("reopen")
        },
        &mut |s, id| s.flip_bit(id, 12_345).expect("flip"),
    );
    let stats = s.stats();
    max_in_flight = max_in_flight.max(stats.max_in_flight);
    assert!(
        max_in_flight >= 32,
        "at most {max_in_flight} requests were in flight"
    );
    assert!(stats.syncs > 0);
    eprintln!(
        "{}: {} slots, {stats:?}, max in flight {max_in_flight}",
        path.display(),
        s.slots()
    );
}

#[test]
fn the_suite_on_io_uring_over_a_plain_file() {
    let path = scratch("file");
    let _ = std::fs::remove_file(&path);
    run_on_uring(&path, Some(48 << 20));
    std::fs::remove_file(&path).ok();
}

#[test]
fn the_suite_on_io_uring_over_a_loop_device_with_o_direct() {
    let dev = LoopDevice::new("store", 48 << 20);
    run_on_uring(&PathBuf::from(&dev.dev), None);
}

#[test]
fn power_cuts_lose_only_unsynced_writes_and_never_return_garbage() {
    let (mut dropped, mut torn) = (0, 0);
    for seed in 0..200u64 {
        let mut rng = Rng::new(seed);
        let mut s = MemFragmentStore::new(64, 4096);
        // What is durable: fragment -> data.
        let mut durable: std::collections::BTreeMap<FragmentId, Vec<u8>> = Default::default();
        let mut unsynced: std::collections::BTreeMap<FragmentId, Vec<u8>> = Default::default();
        for _ in 0..40 {
            let f = id(rng.below(12), 0);
            match rng.below(4) {
                0 => {
                    s.sync().unwrap();
                    durable.append(&mut unsynced);
                }
                _ => {
                    let d = payload(&mut rng, 4096);
                    if s.write(&[(f, &d)]).is_ok() {
                        unsynced.insert(f, d);
                    }
                }
            }
        }
        let mut r = || rng.next_u64();
        s.power_cut(&mut r);
        for (f, d) in &durable {
            let got = s.read(&[*f]).remove(0);
            match unsynced.get(f) {
                // Rewritten after the last sync: the old durable copy, or (never here) the
                // new one whole; garbage is never returned.
                Some(newer) => {
                    let g = got.expect("a durable fragment survives a lost rewrite");
                    assert!(g == *d || g == *newer, "seed {seed}: garbage for {f:?}");
                }
                None => assert_eq!(got.unwrap(), *d, "seed {seed}: synced data lost"),
            }
        }
        for f in unsynced.keys().filter(|f| !durable.contains_key(f)) {
            match s.read(&[*f]).remove(0) {
                Err(StoreError::NotFound(_)) | Err(StoreError::Corrupt { .. }) => {}
                Ok(g) => assert_eq!(Some(&g), unsynced.get(f), "seed {seed}: garbage"),
                Err(e) => panic!("seed {seed}: {e}"),
            }
        }
        dropped += s.faults.dropped;
        torn += s.faults.torn;
    }
    assert!(
        dropped > 0 && torn > 0,
        "faults injected: {dropped} dropped, {torn} torn"
    );
}
