//! Races inside one node's file-system client, forced at gates of an in-memory block
//! store (so each race happens every run, not by chance):
//! * `fsync` means durable for every caller: a second `fsync` of a file whose dirty blocks
//!   a first one has taken (and not yet made durable) waits for the first, and gets its
//!   error (the log sync held at a gate: the first `fsync` stops exactly between taking
//!   the blocks and their durability);
//! * a read never returns a size with bytes a truncate cleared (the data-block reads held
//!   at a gate while another caller truncates and rewrites the file).
//!
//! And how many round trips to the shards (batches of block operations) a lookup and a
//! create take.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use xfs_node::coherence::{BlockId, NodeId, Outcome, Patch, UserOp};
use xfs_node::fs::client::{Blocks, Errno, FsClient, ManagerMap, SetAttr, StatFs};
use xfs_node::fs::layout::{inode_block, Inode, DIR_BUCKETS, INODE_BLOCK};

/// Blocks in memory on one node; `sync` waits while the gate is shut and fails while
/// `fail_sync` is set.
#[derive(Default)]
struct GatedBlocks {
    blocks: Mutex<BTreeMap<BlockId, Vec<u8>>>,
    clock: AtomicU64,
    gate: (Mutex<bool>, Condvar),
    /// Syncs that reached the gate.
    at_gate: AtomicU64,
    /// Syncs that passed it (the log is durable up to then).
    synced: AtomicU64,
    fail_sync: AtomicBool,
    /// While shut, reads of data blocks (not inode blocks) wait here.
    read_gate: (Mutex<bool>, Condvar),
    /// Data-block reads that reached the read gate while it was shut.
    at_read_gate: AtomicU64,
    /// While shut, a block emptied (a truncate clearing it) waits here, after the clear.
    clear_gate: (Mutex<bool>, Condvar),
    /// Clears that reached the clear gate while it was shut.
    at_clear_gate: AtomicU64,
    /// Batches of block operations (`run` calls): each a round trip to the shards.
    runs: AtomicU64,
    /// Block operations, all batches together.
    ops: AtomicU64,
    /// Blocks asked for ahead (`prefetch`), in order.
    prefetched: Mutex<Vec<BlockId>>,
}

/// What the client holds: the shared blocks (the test keeps another handle).
#[derive(Clone)]
struct Gated(Arc<GatedBlocks>);

impl std::ops::Deref for Gated {
    type Target = GatedBlocks;
    fn deref(&self) -> &GatedBlocks {
        &self.0
    }
}

impl GatedBlocks {
    /// Shut the gate and count from zero.
    fn shut(&self) {
        *self.gate.0.lock().unwrap() = true;
        self.at_gate.store(0, Ordering::SeqCst);
        self.synced.store(0, Ordering::SeqCst);
    }

    fn open(&self) {
        *self.gate.0.lock().unwrap() = false;
        self.gate.1.notify_all();
    }
}

impl Blocks for Gated {
    fn run(&self, ops: Vec<(BlockId, UserOp<Vec<u8>>)>) -> Vec<Result<Outcome<Vec<u8>>, Errno>> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        self.ops.fetch_add(ops.len() as u64, Ordering::SeqCst);
        ops.into_iter()
            .map(|(b, op)| {
                if matches!(op, UserOp::Read) && b & INODE_BLOCK != INODE_BLOCK {
                    let mut shut = self.read_gate.0.lock().unwrap();
                    if *shut {
                        self.at_read_gate.fetch_add(1, Ordering::SeqCst);
                    }
                    while *shut {
                        shut = self.read_gate.1.wait(shut).unwrap();
                    }
                }
                let clear = matches!(&op, UserOp::Write(d) if d.is_empty());
                let mut m = self.blocks.lock().unwrap();
                let cur = m.get(&b).cloned().unwrap_or_default();
                Ok(match op {
                    UserOp::Read | UserOp::Prefetch => Outcome::Read(cur),
                    UserOp::Write(d) => {
                        m.insert(b, d);
                        Outcome::Written
                    }
                    UserOp::Update(p) => {
                        m.insert(b, cur.patched(&p));
                        Outcome::Updated(cur)
                    }
                    UserOp::Acquire => Outcome::Acquired(cur),
                    UserOp::Release => Outcome::Released,
                    UserOp::Evict => Outcome::Evicted,
                    UserOp::Flush => Outcome::Flushed,
                })
                .inspect(|_| {
                    drop(m);
                    if clear {
                        let mut shut = self.clear_gate.0.lock().unwrap();
                        if *shut {
                            self.at_clear_gate.fetch_add(1, Ordering::SeqCst);
                        }
                        while *shut {
                            shut = self.clear_gate.1.wait(shut).unwrap();
                        }
                    }
                })
            })
            .collect()
    }

    fn prefetch(&self, blocks: Vec<BlockId>) -> usize {
        let n = blocks.len();
        self.prefetched.lock().unwrap().extend(blocks);
        n
    }

    fn sync(&self, _node: NodeId) -> Result<(), Errno> {
        self.at_gate.fetch_add(1, Ordering::SeqCst);
        let mut shut = self.gate.0.lock().unwrap();
        while *shut {
            shut = self.gate.1.wait(shut).unwrap();
        }
        if self.fail_sync.load(Ordering::SeqCst) {
            return Err(Errno::EIO);
        }
        self.synced.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn statfs(&self) -> Result<StatFs, Errno> {
        Ok(StatFs {
            bsize: 4096,
            blocks: 1 << 20,
            bfree: 1 << 20,
            namelen: 255,
        })
    }

    fn now(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }

    fn me(&self) -> NodeId {
        1
    }
}

/// A client over fresh gated blocks (gates open) with one file `/f` holding `data`, its
/// name durable and its blocks the only dirty ones.
fn client_with_file(data: &[u8]) -> (Arc<FsClient<Gated>>, Arc<GatedBlocks>, u64) {
    let blocks = Arc::new(GatedBlocks::default());
    let c = Arc::new(FsClient::new(
        Gated(blocks.clone()),
        ManagerMap::even(&[1], 4),
    ));
    c.format().expect("format");
    let root = c.resolve("/").expect("root").ino;
    let f = c.create(root, b"f", 0o644, 0, 0).expect("create").ino;
    c.sync_all().expect("sync the name");
    c.write(f, 0, data).expect("write");
    (c, blocks, f)
}

/// [`client_with_file`], and the log sync's gate shut.
fn client_with_a_dirty_file() -> (Arc<FsClient<Gated>>, Arc<GatedBlocks>, u64) {
    let (c, blocks, f) = client_with_file(&[7u8; 10_000]);
    blocks.shut();
    (c, blocks, f)
}

/// The result of a call on another thread, with the syncs that had passed the gate
/// when it returned; and a flag set when it returned.
type Call = (
    Arc<AtomicBool>,
    std::thread::JoinHandle<(Result<(), Errno>, u64)>,
);

fn spawn(
    c: &Arc<FsClient<Gated>>,
    blocks: &Arc<GatedBlocks>,
    f: impl FnOnce(&FsClient<Gated>) -> Result<(), Errno> + Send + 'static,
) -> Call {
    let done = Arc::new(AtomicBool::new(false));
    let (d, c, b) = (done.clone(), c.clone(), blocks.clone());
    let h = std::thread::spawn(move || {
        let r = f(&c);
        let synced = b.synced.load(Ordering::SeqCst);
        d.store(true, Ordering::SeqCst);
        (r, synced)
    });
    (done, h)
}

/// Wait until `cond` holds (no time bound: the events are counted; polled each
/// millisecond, so a wait that never ends shows as a hung test, not a busy core).
fn until(cond: impl Fn() -> bool) {
    while !cond() {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

#[test]
fn fsync_and_sync_all_wait_for_the_write_back_that_took_the_blocks() {
    let (c, blocks, f) = client_with_a_dirty_file();
    let first = spawn(&c, &blocks, move |c| c.fsync(f));
    // The first fsync has taken the file's blocks and waits at the log sync.
    until(|| blocks.at_gate.load(Ordering::SeqCst) == 1);
    let second = spawn(&c, &blocks, move |c| c.fsync(f));
    let all = spawn(&c, &blocks, |c| c.sync_all());
    // Each either waits for the first (counted) or returns at once, wrongly "durable".
    until(|| {
        second.0.load(Ordering::SeqCst) || all.0.load(Ordering::SeqCst) || c.write_back_waits() == 2
    });
    assert!(
        !second.0.load(Ordering::SeqCst),
        "a second fsync returned while the first had not made the data durable"
    );
    assert!(
        !all.0.load(Ordering::SeqCst),
        "sync_all returned while an fsync had not made the data durable"
    );
    // Neither took anything: only the first reached the log sync.
    assert_eq!(blocks.at_gate.load(Ordering::SeqCst), 1);
    blocks.open();
    for (what, call) in [("first", first), ("second", second), ("sync_all", all)] {
        let (r, synced) = call.1.join().unwrap();
        assert_eq!(r, Ok(()), "{what}");
        assert!(synced >= 1, "{what} returned before the log sync");
    }
    assert_eq!(c.write_back_waits(), 2);
}

#[test]
fn a_waiting_fsync_gets_the_error_of_the_write_back_it_waited_for() {
    let (c, blocks, f) = client_with_a_dirty_file();
    blocks.fail_sync.store(true, Ordering::SeqCst);
    let first = spawn(&c, &blocks, move |c| c.fsync(f));
    until(|| blocks.at_gate.load(Ordering::SeqCst) == 1);
    let second = spawn(&c, &blocks, move |c| c.fsync(f));
    until(|| second.0.load(Ordering::SeqCst) || c.write_back_waits() == 1);
    assert!(
        !second.0.load(Ordering::SeqCst),
        "the second fsync did not wait"
    );
    blocks.open();
    assert_eq!(first.1.join().unwrap().0, Err(Errno::EIO));
    assert_eq!(
        second.1.join().unwrap().0,
        Err(Errno::EIO),
        "the second fsync said durable after the write-back it waited for failed"
    );
    // The failed write-back gave the blocks back: the next fsync writes them.
    blocks.fail_sync.store(false, Ordering::SeqCst);
    assert_eq!(c.fsync(f), Ok(()));
    assert_eq!(blocks.at_gate.load(Ordering::SeqCst), 2);
    assert_eq!(blocks.synced.load(Ordering::SeqCst), 1);
    // Nothing is left: the next fsync takes nothing and syncs nothing.
    assert_eq!(c.fsync(f), Ok(()));
    assert_eq!(blocks.at_gate.load(Ordering::SeqCst), 2);
}

#[test]
fn a_read_overtaken_by_a_truncate_never_returns_cleared_bytes_under_the_old_size() {
    let old = vec![7u8; 3 * 4096];
    let (c, blocks, f) = client_with_file(&old);
    // The reader has read the size (3 blocks) and waits to read the blocks.
    *blocks.read_gate.0.lock().unwrap() = true;
    let reader = {
        let c = c.clone();
        std::thread::spawn(move || c.read(f, 0, 3 * 4096))
    };
    until(|| blocks.at_read_gate.load(Ordering::SeqCst) >= 1);
    // Meanwhile the file is cut to nothing and one short line written (O_TRUNC, write).
    let cut = SetAttr {
        size: Some(0),
        ..SetAttr::default()
    };
    c.setattr(f, &cut).expect("truncate");
    let new = vec![9u8; 100];
    c.write(f, 0, &new).expect("rewrite");
    *blocks.read_gate.0.lock().unwrap() = false;
    blocks.read_gate.1.notify_all();
    let got = reader.join().unwrap().expect("read");
    // As on one machine: the old bytes (the read first) or the new ones (the truncate
    // and the write first); never the old size over cleared blocks.
    assert!(
        got == old || got == new,
        "the read returned {} bytes ({} zero): neither what was there before nor after",
        got.len(),
        got.iter().filter(|b| **b == 0).count()
    );
    assert_eq!(
        got, new,
        "the blocks were read after the truncate and the write"
    );
    assert!(c.read_retries() >= 1, "the read did not start again");
}

/// A read within one block that read the size of the old line, then a block rewritten by
/// a truncate and a longer line meanwhile: never the new line cut to the old size (found
/// by the mount's rewrite test: 61 bytes of a 62-byte line, the newline missing).
#[test]
fn a_one_block_read_overtaken_by_a_rewrite_never_cuts_the_new_line_to_the_old_size() {
    let old = b"line 1331 short\n".to_vec();
    let (c, blocks, f) = client_with_file(&old);
    *blocks.read_gate.0.lock().unwrap() = true;
    let reader = {
        let c = c.clone();
        std::thread::spawn(move || c.read(f, 0, 4096))
    };
    until(|| blocks.at_read_gate.load(Ordering::SeqCst) >= 1);
    let cut = SetAttr {
        size: Some(0),
        ..SetAttr::default()
    };
    c.setattr(f, &cut).expect("truncate");
    let new = b"line 1332 a longer one\n".to_vec();
    c.write(f, 0, &new).expect("rewrite");
    *blocks.read_gate.0.lock().unwrap() = false;
    blocks.read_gate.1.notify_all();
    let got = reader.join().unwrap().expect("read");
    assert!(
        got == old || got == new,
        "the read returned {:?}: neither the line before nor the line after",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(
        got, new,
        "the block was read after the truncate and the write"
    );
    assert!(c.read_retries() >= 1, "the read did not look again");
}

#[test]
fn a_read_waits_for_a_truncate_on_the_same_node_that_holds_the_inode() {
    let (c, blocks, f) = client_with_file(&[7u8; 3 * 4096]);
    // The truncate holds the inode, has cleared its first block, and waits there (its
    // size update not done yet).
    *blocks.clear_gate.0.lock().unwrap() = true;
    let truncate = {
        let c = c.clone();
        let cut = SetAttr {
            size: Some(0),
            ..SetAttr::default()
        };
        std::thread::spawn(move || c.setattr(f, &cut).map(drop))
    };
    until(|| blocks.at_clear_gate.load(Ordering::SeqCst) >= 1);
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (c, done) = (c.clone(), done.clone());
        std::thread::spawn(move || {
            let r = c.read(f, 0, 3 * 4096);
            done.store(true, Ordering::SeqCst);
            r
        })
    };
    // The read waits for the hold (counted), or returns the old size over a cleared block.
    until(|| done.load(Ordering::SeqCst) || c.hold_waits() >= 1);
    assert!(
        !done.load(Ordering::SeqCst),
        "a read returned while a truncate on its node was half done: {:?}",
        reader
            .join()
            .unwrap()
            .map(|d| (d.len(), d.iter().filter(|b| **b == 0).count()))
    );
    *blocks.clear_gate.0.lock().unwrap() = false;
    blocks.clear_gate.1.notify_all();
    truncate.join().unwrap().expect("truncate");
    assert_eq!(
        reader.join().unwrap(),
        Ok(Vec::new()),
        "the read came after the cut"
    );
}

/// A lookup reads the directory's inode and the name's bucket in one batch (a missing name:
/// one round trip; a found one: and its inode); a create is that batch, the new inode
/// (alone: a name must never be seen before its inode), then the bucket insert with the
/// parent's mark and times: three. A read in one block: two (three across blocks or a
/// hole). An unlink: six.
#[test]
fn a_lookup_and_a_create_take_one_batch_for_the_directory_and_the_bucket() {
    let (c, blocks, _) = client_with_file(b"x");
    let root = c.resolve("/").expect("root").ino;
    let runs = || blocks.runs.load(Ordering::SeqCst);
    let r0 = runs();
    assert_eq!(
        c.lookup(root, b"missing").map(|i| i.ino),
        Err(Errno::ENOENT)
    );
    let negative = runs() - r0;
    let r0 = runs();
    c.lookup(root, b"f").expect("lookup /f");
    let positive = runs() - r0;
    let r0 = runs();
    let g = c.create(root, b"g", 0o644, 0, 0).expect("create /g");
    let create = runs() - r0;
    eprintln!("batches: negative lookup {negative}, lookup {positive}, create {create}");
    assert_eq!(negative, 1, "a lookup of a missing name");
    assert_eq!(positive, 2, "a lookup of an existing name");
    assert!(create <= 3, "a create took {create} batches");
    assert_eq!(c.lookup(root, b"g").expect("lookup /g").ino, g.ino);
    assert_eq!(
        c.create(root, b"g", 0o644, 0, 0).map(|i| i.ino),
        Err(Errno::EEXIST)
    );
    assert_eq!(c.lookup(g.ino, b"x").map(|i| i.ino), Err(Errno::ENOTDIR));
    // A read within one written block: the inode, then the block. One across blocks, or
    // one that meets a hole (or a block cut short), looks at the inode again (a truncate
    // may have cleared a block, and blocks are not read atomically together).
    let data = vec![5u8; 8192];
    assert_eq!(c.write(g.ino, 0, &data), Ok(8192));
    assert_eq!(c.write(g.ino, 16384, &data[..10]), Ok(10));
    let count = |offset: u64, len: usize, want: &[u8]| {
        let r0 = runs();
        assert_eq!(
            c.read(g.ino, offset, len).expect("read /g"),
            want,
            "{offset}+{len}"
        );
        runs() - r0
    };
    let read = count(4096, 4096, &data[..4096]);
    let two = count(0, 8192, &data);
    let holey = count(4096, 8192, &[&data[..4096], &[0u8; 4096][..]].concat());
    eprintln!("batches: read {read}, of two blocks {two}, across a hole {holey}");
    assert_eq!((read, two, holey), (2, 3, 3), "batches of a read");
    // An unlink: the directory and the name (one batch), the file's inode, the name out
    // with the directory's times, the link count, the file's blocks with its inode, their
    // write-back.
    let r0 = runs();
    c.unlink(root, b"g").expect("unlink /g");
    let unlink = runs() - r0;
    eprintln!("batches: unlink {unlink}");
    assert!(unlink <= 6, "an unlink took {unlink} batches");
    assert_eq!(c.lookup(root, b"g").map(|i| i.ino), Err(Errno::ENOENT));
}

/// A directory marks the buckets that hold names (`Inode::dir_buckets`), so a listing
/// reads its inode, those buckets and the names' inodes, not all 64 buckets. A directory
/// without the mark (made before directories kept it) is listed by reading every bucket.
/// A bucket that holds a name its directory does not mark (a crash wrote the bucket back
/// but not the inode) is what `fsck` reports and repairs.
#[test]
fn a_listing_reads_only_the_buckets_that_hold_names() {
    let (c, blocks, _) = client_with_file(b"x");
    let root = c.resolve("/").expect("root").ino;
    let d = c.mkdir(root, b"d", 0o755, 0, 0).expect("mkdir /d").ino;
    let names: Vec<Vec<u8>> = (0..3).map(|k| format!("n{k}").into_bytes()).collect();
    for n in &names {
        c.create(d, n, 0o644, 0, 0).expect("create");
    }
    let ops = || blocks.ops.load(Ordering::SeqCst);
    let listed = |what: &str| {
        let o0 = ops();
        let mut got: Vec<Vec<u8>> = c
            .readdir(d)
            .expect(what)
            .into_iter()
            .map(|e| e.name)
            .collect();
        got.sort();
        (got, ops() - o0)
    };
    let (got, tracked) = listed("readdir /d");
    assert_eq!(got, names);
    let buckets = c.getattr(d).expect("getattr /d").dir_buckets().len() as u64;
    assert!(buckets <= 3, "{buckets} buckets marked for 3 names");
    // The directory's inode, its marked buckets, the three names' inodes.
    assert_eq!(tracked, 1 + buckets + 3, "block operations of the listing");
    assert_eq!(
        c.readdir(c.mkdir(root, b"e", 0o755, 0, 0).unwrap().ino),
        Ok(vec![])
    );

    // The same directory as an older node made it: no mark, every bucket read.
    let set_extents = |x: Vec<(u64, u64)>| {
        let mut m = blocks.blocks.lock().unwrap();
        let b = m.get_mut(&inode_block(d)).unwrap();
        let mut i = Inode::decode(d, b).unwrap().unwrap();
        i.extents = x;
        *b = i.encode();
    };
    set_extents(Vec::new());
    let (got, untracked) = listed("readdir /d, unmarked");
    assert_eq!(got, names);
    assert_eq!(untracked, 1 + DIR_BUCKETS + 3);

    // Marked, but not its buckets (as a crash can leave it): the listing misses the names,
    // yet rmdir reads every bucket and refuses; fsck finds and marks them.
    set_extents(Inode::new_dir_extents());
    assert_eq!(
        listed("readdir /d, buckets unmarked").0,
        Vec::<Vec<u8>>::new()
    );
    assert_eq!(c.rmdir(root, b"d"), Err(Errno::ENOTEMPTY));
    let report = xfs_node::fs::fsck::fsck(&c, true).expect("fsck --repair");
    let found = report
        .problems
        .iter()
        .filter(|p| p.contains("holds names its directory does not mark"))
        .count() as u64;
    assert_eq!(found, buckets, "{report:?}");
    assert!(report.remaining.is_empty(), "{report:?}");
    assert_eq!(listed("readdir /d, repaired").0, names);
}

/// Read-ahead: a file read in order in the kernel's 128 KiB reads has each block past the
/// first read asked for ahead exactly once, in order, at least three quarters of a window
/// (1 MiB) before it is read; random reads (small or large) and a read that reaches the
/// end of the file ask for nothing; a new pass from the start asks for its first window
/// once.
#[test]
fn a_sequential_read_asks_for_the_next_window_ahead_once_and_a_random_one_never() {
    use xfs_node::fs::client::{READ_AHEAD, READ_AHEAD_TRIGGER};
    let size = 3 * READ_AHEAD + 5000;
    let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let (c, blocks, f) = client_with_file(&data);
    let ahead = || blocks.prefetched.lock().unwrap().clone();
    let block = |n: usize| xfs_node::fs::layout::block_id(f, n as u64);
    // Random 4 KiB reads (two of them at a window's start), random large reads, then a
    // large read that reaches the end of the file.
    for off in [12_288usize, 1_048_576, 8_192, 2_097_152, 1_040_384] {
        assert_eq!(c.read(f, off as u64, 4096).unwrap(), data[off..off + 4096]);
    }
    for off in [1_060_864usize, 204_800, 2_105_344] {
        let want = &data[off..off + (256 << 10)];
        assert_eq!(c.read(f, off as u64, 256 << 10).unwrap(), want);
    }
    let tail = size - READ_AHEAD_TRIGGER;
    assert_eq!(c.read(f, tail as u64, 1 << 20).unwrap(), data[tail..]);
    assert_eq!(
        ahead(),
        Vec::<BlockId>::new(),
        "random reads asked for blocks ahead"
    );
    // In order, 128 KiB at a time.
    let step = 128 << 10;
    let mut got = Vec::new();
    for off in (0..size).step_by(step) {
        got.extend(c.read(f, off as u64, step).unwrap());
        let asked = ahead();
        assert!(
            asked.iter().all(|b| *b < block(size.div_ceil(4096))),
            "{asked:?}"
        );
        let end = off + step;
        if end + READ_AHEAD < size {
            // At least three quarters of a window ahead of the reader.
            let want = block((end + READ_AHEAD * 3 / 4) / 4096 - 1);
            assert!(
                asked.contains(&want),
                "at {off}: block {want} not asked ahead"
            );
        }
    }
    assert_eq!(got, data);
    let asked = ahead();
    let want: Vec<BlockId> = (32..size.div_ceil(4096)).map(block).collect();
    assert_eq!(
        asked, want,
        "each block past the first read asked for once, in order"
    );
    assert_eq!(c.read_ahead_blocks(), want.len() as u64);
    // A new pass from the start asks for its first window again, once: reading the
    // start again and again asks for nothing more.
    for _ in 0..3 {
        assert_eq!(c.read(f, 0, step).unwrap(), data[..step]);
    }
    let again: Vec<BlockId> = ahead()[want.len()..].to_vec();
    assert_eq!(again, (32..288).map(block).collect::<Vec<_>>());
}
