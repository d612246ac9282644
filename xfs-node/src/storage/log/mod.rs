//! A client's log, striped with Reed-Solomon parity over a stripe group (DESIGN.md §4,
//! Storage; the xFS design with more than one parity fragment).
//!
//! Blocks are appended to an open *segment*: a 4 KiB *segment summary* (which blocks at
//! which offsets) and then the blocks, never across a fragment boundary. A full segment (or
//! an `fsync`) *seals* it: the segment's bytes are cut into `data` fragments of
//! `fragment_bytes`, `parity` fragments are computed (`reed-solomon-simd`), and fragment i
//! goes to the stripe group's server i. Sealed segments are queued per server and written in
//! one batch (many requests in flight on each store); [`Log::fsync`] writes the queue,
//! syncs every server, and only then updates the *imap* (block → [`LogAddress`]) and the
//! per-segment live bytes: an acknowledged block is on `data + parity` servers, and any
//! `data` of them rebuild it.
//!
//! Reads find the block through the imap (or the open or queued segments, for a block
//! not yet synced). A missing server or a fragment that fails its checksum is rebuilt from
//! the others (a *degraded read*); a corrupt fragment is then rewritten in place and
//! counted ([`LogCounters::repaired`]). [`Log::rebuild`] restores a replaced server.
//!
//! [`Log::checkpoint`] writes the imap into the log (checkpoint segments); [`Log::recover`]
//! loads the newest complete checkpoint and rolls forward over the summaries of the
//! segments written after it.
//!
//! Segment numbers carry the writer (`writer << 40 | sequence`) so that the logs of many
//! clients share the stripe group's stores.

mod read;
mod recovery;
mod space;
mod write;

use std::collections::{BTreeMap, BTreeSet};

use super::fragment::{FragmentId, FragmentStore, StoreError};
use crate::coherence::{BlockId, NodeId};

/// Bytes reserved for the segment summary at the start of every segment.
pub const SUMMARY_BYTES: usize = 4096;
const SUMMARY_MAGIC_V1: u64 = 0x5846_5353_4547_3031; // "XFSSEG01": no seal time
const SUMMARY_MAGIC: u64 = 0x5846_5353_4547_3032; // "XFSSEG02"
const SUMMARY_HEAD: usize = 56;
const ENTRY_BYTES: usize = 16;
/// Entries one summary holds.
pub const MAX_ENTRIES: usize = (SUMMARY_BYTES - SUMMARY_HEAD) / ENTRY_BYTES;
const IMAP_ENTRY_BYTES: usize = 24;
/// Segments of copies the cleaner may need in one round (kept free for it).
pub const CLEANER_RESERVE: usize = 8;
/// Queued sealed segments before the log writes them out by itself.
pub const MAX_QUEUED_SEGMENTS: usize = 64;

/// A stripe group: the servers a segment's fragments go to, data first, then parity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StripeGroup {
    /// Group id.
    pub id: u32,
    /// Storage servers, one per fragment of a stripe.
    pub servers: Vec<NodeId>,
    /// How many of them hold parity (any `servers.len() - parity` rebuild a segment).
    pub parity: usize,
}

impl StripeGroup {
    /// Data fragments per segment.
    pub fn data(&self) -> usize {
        self.servers.len().saturating_sub(self.parity)
    }
}

/// Which servers form which stripe groups; versioned, the same on every node (the cluster
/// issue loads and replicates it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StripeGroupMap {
    /// Version: a node refuses a map older than the one it has.
    pub version: u64,
    /// The groups.
    pub groups: Vec<StripeGroup>,
}

impl StripeGroupMap {
    /// Check the map: unique group ids, each group with distinct servers, at least one data
    /// and one parity fragment, and at most 255 fragments (Reed-Solomon's limit here).
    pub fn validate(&self) -> Result<(), StripeGroupError> {
        let mut ids = std::collections::BTreeSet::new();
        for g in &self.groups {
            if !ids.insert(g.id) {
                return Err(StripeGroupError::Duplicate(g.id));
            }
            let distinct: std::collections::BTreeSet<_> = g.servers.iter().collect();
            if distinct.len() != g.servers.len() {
                return Err(StripeGroupError::ServerTwice(g.id));
            }
            if g.parity == 0 || g.data() == 0 || g.servers.len() > 255 {
                return Err(StripeGroupError::Shape {
                    group: g.id,
                    servers: g.servers.len(),
                    parity: g.parity,
                });
            }
        }
        Ok(())
    }

    /// The group with this id.
    pub fn group(&self, id: u32) -> Option<&StripeGroup> {
        self.groups.iter().find(|g| g.id == id)
    }
}

/// Why a [`StripeGroupMap`] is not usable ([`StripeGroupMap::validate`]); names what to fix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StripeGroupError {
    /// Two groups have the same id.
    #[error("stripe group {0} appears twice")]
    Duplicate(u32),
    /// A group names one server twice.
    #[error("stripe group {0} names a server twice")]
    ServerTwice(u32),
    /// A group without a data or a parity fragment, or with more than 255 fragments.
    #[error(
        "stripe group {group}: {servers} servers with {parity} parity: need at least 1 data and 1 parity fragment, at most 255 in all"
    )]
    Shape {
        /// The group.
        group: u32,
        /// Its servers.
        servers: usize,
        /// Its parity fragments.
        parity: usize,
    },
}

/// Where a block is in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LogAddress {
    /// Segment number.
    pub segment: u64,
    /// Byte offset in the segment.
    pub offset: u32,
    /// Length.
    pub len: u32,
}

/// Log errors.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// A store failed (including ENOSPC: nothing acknowledged is lost, the data waits).
    #[error("{0}")]
    Store(#[from] StoreError),
    /// Not enough servers to write or read a segment.
    #[error("segment {segment}: only {have} of the {need} fragments needed are available ({why})")]
    Unrecoverable {
        /// The segment.
        segment: u64,
        /// Fragments available.
        have: usize,
        /// Fragments needed.
        need: usize,
        /// Why the others are missing.
        why: String,
    },
    /// The block was never written (or not yet recovered).
    #[error("block {0} is not in the log")]
    NotFound(BlockId),
    /// A block larger than a fragment.
    #[error("block of {len} bytes exceeds the fragment size of {max} bytes")]
    TooLarge {
        /// The block's length in bytes.
        len: usize,
        /// The fragment size in bytes.
        max: usize,
    },
    /// A stripe group that is not usable.
    #[error(transparent)]
    Group(#[from] StripeGroupError),
    /// Bad configuration.
    #[error("{0}")]
    Config(String),
}

/// What the log did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogCounters {
    /// Segments written.
    pub segments: u64,
    /// Reads that rebuilt a fragment from the others.
    pub degraded_reads: u64,
    /// Corrupt fragments rewritten from parity.
    pub repaired: u64,
    /// Fragments restored by [`Log::rebuild`].
    pub rebuilt: u64,
    /// Checkpoints written.
    pub checkpoints: u64,
    /// Segments recovery could not decode (written but never synced, torn by a crash).
    pub undecodable: u64,
    /// Servers marked down after a device or network error.
    pub servers_lost: u64,
    /// Blocks the cleaner moved to new segments.
    pub relocated: u64,
    /// Bytes the cleaner moved.
    pub relocated_bytes: u64,
    /// Cleaner copies discarded because a writer wrote the block meanwhile (writer wins).
    pub writer_wins: u64,
    /// Segments freed (fragments deleted on every server): dead data segments covered by
    /// a checkpoint, and checkpoints older than the newest.
    pub freed: u64,
    /// Block reads served from the fragment cache (no server asked).
    pub fragment_cache_hits: u64,
    /// Fragments fetched from a server (or rebuilt) for a block read.
    pub fragment_fetches: u64,
    /// Block reads that fetched only the block's bytes from its server (the first read
    /// of a fragment not read lately: a random read).
    pub fragment_range_reads: u64,
    /// Queued segments (refused by full stores, never written) dropped because every
    /// block in them was overwritten or deleted since: a refused write keeps no space.
    pub superseded_dropped: u64,
}

/// What the log knows of one of its durable segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SegInfo {
    kind: SegmentKind,
    time: u64,
}

/// A data segment's entry in the writer's segment-usage table (its *s-file*).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SegmentUsage {
    /// Segment number.
    pub segment: u64,
    /// Bytes of blocks in it that are still the newest version.
    pub live: u64,
    /// When it was sealed (the log's clock, milliseconds).
    pub time: u64,
}

/// A segment's kind: byte 16 of its summary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum SegmentKind {
    /// Blocks, listed in the summary's entries.
    Data = 0,
    /// A checkpoint part: imap entries, then entries of the writer's segment-usage table
    /// (its *s-file*), marked by [`USAGE_ENTRY`] in their first word.
    Checkpoint = 1,
}

impl SegmentKind {
    /// The kind a summary's byte names, if any.
    fn from_wire(v: u8) -> Option<SegmentKind> {
        [SegmentKind::Data, SegmentKind::Checkpoint]
            .into_iter()
            .find(|k| *k as u8 == v)
    }
}
/// Marks an s-file entry in a checkpoint (block ids never have the top bit set).
const USAGE_ENTRY: u64 = 1 << 63;

/// A decoded segment summary.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Summary {
    segment: u64,
    kind: SegmentKind,
    /// When the segment was sealed (the log's clock, milliseconds).
    time: u64,
    /// Checkpoints: part index and count, and the last segment the imap covers.
    part: u32,
    parts: u32,
    upto: u64,
    /// Checkpoint payload bytes (after the summary), or data entries.
    payload: u32,
    entries: Vec<(BlockId, u32, u32)>,
}

impl Summary {
    fn encode(&self, out: &mut [u8]) {
        out[..SUMMARY_BYTES].fill(0);
        out[0..8].copy_from_slice(&SUMMARY_MAGIC.to_le_bytes());
        out[8..16].copy_from_slice(&self.segment.to_le_bytes());
        out[16] = self.kind as u8;
        out[20..24].copy_from_slice(&self.part.to_le_bytes());
        out[24..28].copy_from_slice(&self.parts.to_le_bytes());
        out[28..36].copy_from_slice(&self.upto.to_le_bytes());
        out[36..40].copy_from_slice(&self.payload.to_le_bytes());
        out[40..42].copy_from_slice(&(self.entries.len() as u16).to_le_bytes());
        out[48..56].copy_from_slice(&self.time.to_le_bytes());
        for (i, (b, off, len)) in self.entries.iter().enumerate() {
            let at = SUMMARY_HEAD + i * ENTRY_BYTES;
            out[at..at + 8].copy_from_slice(&b.to_le_bytes());
            out[at + 8..at + 12].copy_from_slice(&off.to_le_bytes());
            out[at + 12..at + 16].copy_from_slice(&len.to_le_bytes());
        }
        let crc = crc32c::crc32c(&out[..44]) ^ crc32c::crc32c(&out[48..SUMMARY_BYTES]);
        out[44..48].copy_from_slice(&crc.to_le_bytes());
    }

    fn decode(b: &[u8]) -> Option<Summary> {
        if b.len() < SUMMARY_BYTES {
            return None;
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or([0; 4]));
        // Version 1 (before seal times) is still read: its entries start at byte 48.
        let head = match u64_at(0) {
            SUMMARY_MAGIC => SUMMARY_HEAD,
            SUMMARY_MAGIC_V1 => 48,
            _ => return None,
        };
        let crc = crc32c::crc32c(&b[..44]) ^ crc32c::crc32c(&b[48..SUMMARY_BYTES]);
        if crc != u32_at(44) {
            return None;
        }
        let n = u16::from_le_bytes([b[40], b[41]]) as usize;
        if n > (SUMMARY_BYTES - head) / ENTRY_BYTES {
            return None;
        }
        let entries = (0..n)
            .map(|i| {
                let at = head + i * ENTRY_BYTES;
                (u64_at(at), u32_at(at + 8), u32_at(at + 12))
            })
            .collect();
        Some(Summary {
            segment: u64_at(8),
            kind: SegmentKind::from_wire(b[16])?,
            time: if head == SUMMARY_HEAD { u64_at(48) } else { 0 },
            part: u32_at(20),
            parts: u32_at(24),
            upto: u64_at(28),
            payload: u32_at(36),
            entries,
        })
    }
}

/// A segment sealed and waiting to be written: its bytes, and the addresses of its blocks.
struct Sealed {
    segment: u64,
    kind: SegmentKind,
    time: u64,
    bytes: Vec<u8>,
    blocks: Vec<(BlockId, LogAddress)>,
}

/// One writer's log over one stripe group.
pub struct Log<S: FragmentStore> {
    group: StripeGroup,
    /// Server i's store; `None` while that server is down.
    stores: Vec<Option<S>>,
    fragment_bytes: usize,
    writer: NodeId,
    next_seq: u64,
    // The open segment.
    open: Vec<u8>,
    open_entries: Vec<(BlockId, u32, u32)>,
    /// The cleaner's lane: its own open segment (swapped in while it appends) and its
    /// sealed segments, written ahead of waiting data and from the reserve, so cleaning
    /// goes on when the stripe group is full.
    copy: (Vec<u8>, Vec<(BlockId, u32, u32)>, usize),
    copies: Vec<Sealed>,
    /// Where each block the cleaner copied (in its lane or its sealed copies) was read
    /// from: a copy is written out only if the imap still points there.
    copied_from: BTreeMap<BlockId, LogAddress>,
    cursor: usize,
    // Sealed, not written yet; then written, not synced yet.
    queued: Vec<Sealed>,
    /// The last write of the queue found the stores full: write-behind waits for the next
    /// `fsync` (retrying at every seal would recompute the whole queue's parity each time).
    full: bool,
    written: Vec<Sealed>,
    /// Durable locations.
    imap: BTreeMap<BlockId, LogAddress>,
    /// Live bytes per segment (segments with none are absent).
    live: BTreeMap<u64, u64>,
    /// The newest data segment that is durable (and in the imap).
    last_data_segment: u64,
    counters: LogCounters,
    /// The fragments block reads fetched last ([`FRAGMENT_CACHE`] of them): a sequential
    /// read takes a fragment's blocks from one fetch. A fragment never changes once written
    /// (segment numbers are not reused while the log runs), so nothing invalidates them.
    fragment_cache: std::collections::VecDeque<(FragmentId, Vec<u8>)>,
    /// The fragments that block reads last fetched only a range of ([`RANGED_SEEN`] of
    /// them): the first read of a fragment fetches only its bytes (a random read moves one
    /// block, not the fragment); the second, soon after, fetches the whole fragment into
    /// the cache (a sequential read, even several interleaved, moves each fragment about
    /// once).
    ranged_seen: std::collections::VecDeque<FragmentId>,
    /// Free segments of the stripe group as last seen, less what was written since (the
    /// stores are asked again when it runs low, and every few writes).
    free_hint: usize,
    writes_since_look: u32,
    /// The clock segments are stamped with (milliseconds).
    clock: Box<dyn Fn() -> u64 + Send>,
    /// Every durable segment of this writer (data segments' live bytes are in `live`).
    segs: BTreeMap<u64, SegInfo>,
    /// The newest complete checkpoint: its segments, and the last data segment it covers.
    checkpoint_segs: Vec<u64>,
    checkpoint_upto: u64,
    /// Writers whose logs share this stripe group's stores (each keeps a checkpoint's
    /// room in the shared free space): see [`Log::set_writers`].
    writers: usize,
    /// Where the log publishes the bytes of new data that fit now (see
    /// [`Log::set_room_gauge`]).
    room: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    /// Whether a large batch may take a thread per store ([`parallel`]); off, the stores
    /// are called one after another from this thread (a simulation's, which must replay
    /// exactly).
    store_threads: bool,
}

/// Milliseconds since the Unix epoch.
pub fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Fragments per server a write batch may have to go to the servers all at once from this
/// thread ([`at_once`]); a larger one (the write-behind of many segments) takes a thread
/// per server ([`parallel`]), since a remote store keeps only its window's worth in
/// flight and would otherwise wait for one server before feeding the next. At most a
/// node's storage window (`STORE_DEPTH` slots, also 16).
pub const AT_ONCE_FRAGMENTS: usize = 16;

/// Begin an operation on every store that is up (`begin`), then finish them all together
/// ([`FragmentStore::try_finish`] in rounds, so no store's answers wait unread while
/// another is slow): the stores work at once, with no thread each; one result per store
/// that was up.
fn at_once<S: FragmentStore>(
    stores: &mut [Option<S>],
    begin: impl Fn(usize, &mut S) -> Result<(), StoreError>,
) -> Vec<(usize, Result<(), StoreError>)> {
    let mut results: Vec<(usize, Option<Result<(), StoreError>>)> = stores
        .iter_mut()
        .enumerate()
        .filter_map(|(i, s)| {
            s.as_mut().map(|s| match begin(i, s) {
                Ok(()) => (i, None),
                Err(e) => (i, Some(Err(e))),
            })
        })
        .collect();
    while results.iter().any(|(_, r)| r.is_none()) {
        for (i, r) in results.iter_mut().filter(|(_, r)| r.is_none()) {
            *r = match stores[*i].as_mut() {
                Some(s) => s.try_finish(),
                None => Some(Ok(())),
            };
        }
    }
    results
        .into_iter()
        .map(|(i, r)| (i, r.unwrap_or(Ok(()))))
        .collect()
}

/// Run `f` on every store that is up, in parallel (one scoped thread each when there are
/// several); one result per store that was up.
fn parallel<S: FragmentStore + Send>(
    stores: &mut [Option<S>],
    threads: bool,
    f: impl Fn(usize, &mut S) -> Result<(), StoreError> + Sync,
) -> Vec<(usize, Result<(), StoreError>)> {
    let up: Vec<(usize, &mut S)> = stores
        .iter_mut()
        .enumerate()
        .filter_map(|(i, s)| s.as_mut().map(|s| (i, s)))
        .collect();
    if up.len() <= 1 || !threads {
        return up.into_iter().map(|(i, s)| (i, f(i, s))).collect();
    }
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = up
            .into_iter()
            .map(|(i, s)| (i, scope.spawn(move || f(i, s))))
            .collect();
        handles
            .into_iter()
            .map(|(i, h)| {
                let r = h
                    .join()
                    .unwrap_or_else(|_| Err(StoreError::Config("a store thread panicked".into())));
                (i, r)
            })
            .collect()
    })
}

/// The fragments of `segment` up to `upto` (exclusive): the `data` fragments, plus the
/// parity ones when `upto` reaches past them. Reads servers in order (skipping `skip`,
/// which just failed) only until it has `data` intact fragments, decodes the missing
/// data fragments from parity, and recomputes parity only if asked for.
fn reconstruct<S: FragmentStore>(
    stores: &mut [Option<S>],
    group: &StripeGroup,
    fragment_bytes: usize,
    segment: u64,
    skip: Option<usize>,
    upto: usize,
) -> Result<Vec<Vec<u8>>, LogError> {
    let k = group.data();
    let m = group.parity;
    let mut have: BTreeMap<usize, Vec<u8>> = BTreeMap::new();
    for (j, store) in stores.iter_mut().enumerate() {
        if have.len() == k {
            break;
        }
        if Some(j) == skip {
            continue;
        }
        if let Some(s) = store.as_mut() {
            let id = FragmentId {
                segment,
                index: j as u16,
            };
            if let Ok(d) = s.read(&[id]).remove(0) {
                if d.len() == fragment_bytes {
                    have.insert(j, d);
                }
            }
        }
    }
    if have.len() < k {
        return Err(LogError::Unrecoverable {
            segment,
            have: have.len(),
            need: k,
            why: "too many fragments missing or corrupt".into(),
        });
    }
    if (0..k).any(|j| !have.contains_key(&j)) {
        let original = have
            .iter()
            .filter(|(j, _)| **j < k)
            .map(|(j, d)| (*j, d.as_slice()));
        let recovery = have
            .iter()
            .filter(|(j, _)| **j >= k)
            .map(|(j, d)| (*j - k, d.as_slice()));
        let restored = reed_solomon_simd::decode(k, m, original, recovery)
            .map_err(|e| LogError::Config(format!("segment {segment}: parity decode: {e}")))?;
        have.extend(restored);
    }
    let mut all: Vec<Vec<u8>> = (0..k).filter_map(|j| have.remove(&j)).collect();
    if upto > k {
        let parity = parity(group, &all)?;
        all.extend(parity);
    }
    Ok(all)
}

/// Check there is one store per server of `group`; the fragment size (the smallest of
/// the stores that are up).
fn fragment_bytes_of<S: FragmentStore>(
    group: &StripeGroup,
    stores: &[Option<S>],
) -> Result<usize, LogError> {
    if stores.len() != group.servers.len() {
        return Err(LogError::Config(format!(
            "stripe group {} has {} servers but {} stores were given",
            group.id,
            group.servers.len(),
            stores.len()
        )));
    }
    stores
        .iter()
        .flatten()
        .map(|s| s.fragment_bytes())
        .min()
        .ok_or_else(|| LogError::Config("no store of the stripe group is up".into()))
}

/// What [`Log::check`] looked at.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogCheck {
    /// Imap entries checked.
    pub imap_entries: u64,
    /// Durable segments whose fragments and parity were checked.
    pub segments: u64,
    /// Fragments rewritten.
    pub repaired: u64,
}

/// The parity fragments of a segment's data fragments.
fn parity<T: AsRef<[u8]>>(group: &StripeGroup, data: &[T]) -> Result<Vec<Vec<u8>>, LogError> {
    reed_solomon_simd::encode(group.data(), group.parity, data)
        .map_err(|e| LogError::Config(format!("parity: {e}")))
}

/// Fragments the log keeps for block reads (64 KiB each by default: 4 MiB).
pub const FRAGMENT_CACHE: usize = 64;
/// Fragments remembered as read in part ([`Log::read_at`]).
pub const RANGED_SEEN: usize = 16;

fn segment_number(writer: NodeId, seq: u64) -> u64 {
    ((writer as u64) << 40) | (seq & ((1 << 40) - 1))
}

impl<S: FragmentStore + Send> Log<S> {
    /// An empty log for `writer` over `group`, whose server i keeps `stores[i]`.
    pub fn new(
        writer: NodeId,
        group: StripeGroup,
        stores: Vec<Option<S>>,
    ) -> Result<Log<S>, LogError> {
        StripeGroupMap {
            version: 0,
            groups: vec![group.clone()],
        }
        .validate()?;
        let fragment_bytes = fragment_bytes_of(&group, &stores)?;
        if fragment_bytes < SUMMARY_BYTES || fragment_bytes % 64 != 0 {
            return Err(LogError::Config(format!(
                "fragment size {fragment_bytes} must be a multiple of 64 and at least {SUMMARY_BYTES}"
            )));
        }
        let data = group.data();
        Ok(Log {
            group,
            stores,
            fragment_bytes,
            writer,
            next_seq: 1,
            open: vec![0; data * fragment_bytes],
            open_entries: Vec::new(),
            copy: (vec![0; data * fragment_bytes], Vec::new(), SUMMARY_BYTES),
            copies: Vec::new(),
            copied_from: BTreeMap::new(),
            cursor: SUMMARY_BYTES,
            queued: Vec::new(),
            full: false,
            written: Vec::new(),
            imap: BTreeMap::new(),
            live: BTreeMap::new(),
            last_data_segment: 0,
            counters: LogCounters::default(),
            fragment_cache: std::collections::VecDeque::with_capacity(FRAGMENT_CACHE),
            ranged_seen: std::collections::VecDeque::with_capacity(RANGED_SEEN),
            free_hint: 0,
            writes_since_look: u32::MAX,
            clock: Box::new(wall_clock_ms),
            segs: BTreeMap::new(),
            checkpoint_segs: Vec::new(),
            checkpoint_upto: 0,
            writers: 1,
            room: None,
            store_threads: true,
        })
    }

    /// How many writers' logs share this stripe group's stores (default 1). The free
    /// space is shared, so each writer's data writes stop while what is left is what
    /// `writers` checkpoints of this log's size and the cleaner need.
    pub fn set_writers(&mut self, writers: usize) {
        self.writers = writers.max(1);
    }

    /// Publish into `gauge`, whenever the log looks at the stores, how many bytes of new
    /// data fit: the free segments less the reserve, times a segment's payload. What
    /// `statfs` (`df` on a mount) and `xfs-node status` report as free.
    pub fn set_room_gauge(&mut self, gauge: std::sync::Arc<std::sync::atomic::AtomicU64>) {
        self.room = Some(gauge);
        self.publish_room();
    }

    /// Bytes of new data that fit now (as last seen): see [`Log::set_room_gauge`].
    pub fn data_room(&self) -> u64 {
        self.free_hint.saturating_sub(self.reserve_after(0, 0)) as u64 * self.segment_payload()
    }

    fn publish_room(&self) {
        if let Some(g) = &self.room {
            g.store(self.data_room(), std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Stamp segments with `clock` (milliseconds) instead of the wall clock (a simulation's
    /// virtual time).
    pub fn set_clock(&mut self, clock: Box<dyn Fn() -> u64 + Send>) {
        self.clock = clock;
    }

    /// Whether a large write batch, or a delete, may call the stores from a thread each
    /// (default on). A simulation turns it off: its stores then run one after another on
    /// its own thread, so a run replays exactly from its seed.
    pub fn set_store_threads(&mut self, on: bool) {
        self.store_threads = on;
    }

    /// Whether the last write of sealed segments found the stores full (cleared by a
    /// write that fits).
    pub fn is_full(&self) -> bool {
        self.full
    }

    /// Counters.
    pub fn counters(&self) -> LogCounters {
        self.counters
    }

    /// Number the next segments `n` further on. A member that takes over a failed node's
    /// log does this: the node, if it was only cut off, may have written segments after
    /// the last one the taker recovered (to servers the taker cannot reach, its own at
    /// least); numbered apart, they can never be mistaken for fragments of the taker's
    /// segments (they stay incomplete and are skipped by recovery).
    pub fn skip_segments(&mut self, n: u64) {
        self.next_seq = (self.next_seq + n).min((1 << 40) - 1);
    }

    /// The durable imap.
    pub fn imap(&self) -> &BTreeMap<BlockId, LogAddress> {
        &self.imap
    }

    /// Live bytes per segment (for the cleaner).
    pub fn live_bytes(&self) -> &BTreeMap<u64, u64> {
        &self.live
    }

    /// Server i's store.
    pub fn store_mut(&mut self, i: usize) -> Option<&mut S> {
        self.stores.get_mut(i).and_then(|s| s.as_mut())
    }

    /// The stripe-group positions of the servers marked down.
    pub fn down(&self) -> Vec<usize> {
        (0..self.stores.len())
            .filter(|i| self.stores[*i].is_none())
            .collect()
    }

    /// The stripe group.
    pub fn group(&self) -> &StripeGroup {
        &self.group
    }

    /// Take server i's store out (the server is gone): reads rebuild its fragments.
    pub fn take_store(&mut self, i: usize) -> Option<S> {
        self.stores.get_mut(i).and_then(|s| s.take())
    }

    /// Give the stores back (a restart: open them again with [`Log::recover`]). Blocks not
    /// yet fsynced are dropped with the log.
    pub fn into_stores(self) -> Vec<Option<S>> {
        self.stores
    }

    fn current_segment(&self) -> u64 {
        segment_number(self.writer, self.next_seq)
    }

    /// The current time of the log's clock.
    pub fn now(&self) -> u64 {
        (self.clock)()
    }

    /// Where the log stands (for tracing): durable and checkpointed positions, queues,
    /// free segments as last seen.
    pub fn describe(&self) -> String {
        format!(
            "last data {:#x}, durable upto {:#x}, checkpoint upto {:#x} ({} segs), queued {}, written {}, copies {}, free hint {}, segments {}, full {}, live segments {}",
            self.last_data_segment,
            self.durable_upto(),
            self.checkpoint_upto,
            self.checkpoint_segs.len(),
            self.queued.len(),
            self.written.len(),
            self.copies.len(),
            self.free_hint,
            self.segs.len(),
            self.full,
            self.live.len()
        )
    }
}

/// Reads whole segments of a stripe group over its own stores: the cleaner reads the
/// segments it empties without holding the writer's log, so writers go on meanwhile.
pub struct SegmentReader<S: FragmentStore> {
    group: StripeGroup,
    stores: Vec<Option<S>>,
    fragment_bytes: usize,
}

impl<S: FragmentStore> SegmentReader<S> {
    /// A reader over `stores` (server i's store at i, `None` for a server that is down).
    pub fn new(group: StripeGroup, stores: Vec<Option<S>>) -> Result<SegmentReader<S>, LogError> {
        let fragment_bytes = fragment_bytes_of(&group, &stores)?;
        Ok(SegmentReader {
            group,
            stores,
            fragment_bytes,
        })
    }

    /// Server i's store (to replace one that died).
    pub fn store_slot(&mut self, i: usize) -> Option<&mut Option<S>> {
        self.stores.get_mut(i)
    }

    /// The bytes at each of `wanted` (addresses in `segment`), after checking the
    /// segment's summary lists each of them: one read of the segment (rebuilt from parity
    /// if a server is down or a fragment corrupt).
    pub fn blocks(
        &mut self,
        segment: u64,
        wanted: &[(BlockId, LogAddress)],
    ) -> Result<Vec<Vec<u8>>, LogError> {
        let frags = reconstruct(
            &mut self.stores,
            &self.group,
            self.fragment_bytes,
            segment,
            None,
            0,
        )?;
        let bytes = frags.concat();
        let bad = |why: String| LogError::Unrecoverable {
            segment,
            have: 0,
            need: 1,
            why,
        };
        let summary = Summary::decode(&bytes)
            .filter(|s| s.segment == segment && s.kind == SegmentKind::Data)
            .ok_or_else(|| bad("its summary does not decode".into()))?;
        wanted
            .iter()
            .map(|(b, a)| {
                let listed = summary
                    .entries
                    .iter()
                    .any(|(x, off, len)| x == b && *off == a.offset && *len == a.len);
                let end = (a.offset + a.len) as usize;
                if !listed || end > bytes.len() {
                    return Err(bad(format!("block {b} at {a:?} is not in its summary")));
                }
                Ok(bytes[a.offset as usize..end].to_vec())
            })
            .collect()
    }
}
