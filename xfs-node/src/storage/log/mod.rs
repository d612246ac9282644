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
    pub fn validate(&self) -> Result<(), String> {
        let mut ids = std::collections::BTreeSet::new();
        for g in &self.groups {
            if !ids.insert(g.id) {
                return Err(format!("stripe group {} appears twice", g.id));
            }
            let distinct: std::collections::BTreeSet<_> = g.servers.iter().collect();
            if distinct.len() != g.servers.len() {
                return Err(format!("stripe group {} names a server twice", g.id));
            }
            if g.parity == 0 || g.data() == 0 || g.servers.len() > 255 {
                return Err(format!(
                    "stripe group {}: {} servers with {} parity: need at least 1 data and 1 parity fragment, at most 255 in all",
                    g.id,
                    g.servers.len(),
                    g.parity
                ));
            }
        }
        Ok(())
    }

    /// The group with this id.
    pub fn group(&self, id: u32) -> Option<&StripeGroup> {
        self.groups.iter().find(|g| g.id == id)
    }
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
        segment: u64,
        have: usize,
        need: usize,
        why: String,
    },
    /// The block was never written (or not yet recovered).
    #[error("block {0} is not in the log")]
    NotFound(BlockId),
    /// A block larger than a fragment.
    #[error("block of {len} bytes exceeds the fragment size of {max} bytes")]
    TooLarge { len: usize, max: usize },
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
    /// Queued segments (refused by full stores, never written) dropped because every
    /// block in them was overwritten or deleted since: a refused write keeps no space.
    pub superseded_dropped: u64,
}

/// What the log knows of one of its durable segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SegInfo {
    kind: u8,
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

/// Segment kinds (in the summary).
const DATA: u8 = 0;
/// A checkpoint part: imap entries, then entries of the writer's segment-usage table (its
/// *s-file*), marked by [`USAGE_ENTRY`] in their first word.
const CHECKPOINT: u8 = 1;
/// Marks an s-file entry in a checkpoint (block ids never have the top bit set).
const USAGE_ENTRY: u64 = 1 << 63;

/// A decoded segment summary.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Summary {
    segment: u64,
    /// [`DATA`] or [`CHECKPOINT`].
    kind: u8,
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
        out[16] = self.kind;
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
            kind: b[16],
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
    kind: u8,
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
}

/// Milliseconds since the Unix epoch.
pub fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Run `f` on every store that is up, in parallel (one scoped thread each when there are
/// several); one result per store that was up.
fn parallel<S: FragmentStore + Send>(
    stores: &mut [Option<S>],
    f: impl Fn(usize, &mut S) -> Result<(), StoreError> + Sync,
) -> Vec<(usize, Result<(), StoreError>)> {
    let up: Vec<(usize, &mut S)> = stores
        .iter_mut()
        .enumerate()
        .filter_map(|(i, s)| s.as_mut().map(|s| (i, s)))
        .collect();
    if up.len() <= 1 {
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
        .validate()
        .map_err(LogError::Config)?;
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
            cursor: SUMMARY_BYTES,
            queued: Vec::new(),
            full: false,
            written: Vec::new(),
            imap: BTreeMap::new(),
            live: BTreeMap::new(),
            last_data_segment: 0,
            counters: LogCounters::default(),
            free_hint: 0,
            writes_since_look: u32::MAX,
            clock: Box::new(wall_clock_ms),
            segs: BTreeMap::new(),
            checkpoint_segs: Vec::new(),
            checkpoint_upto: 0,
            writers: 1,
            room: None,
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

    /// Whether the last write of sealed segments found the stores full (cleared by a
    /// write that fits).
    pub fn is_full(&self) -> bool {
        self.full
    }

    /// Counters.
    pub fn counters(&self) -> LogCounters {
        self.counters
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

    /// Append a block (not durable until [`Log::fsync`]).
    pub fn write(&mut self, block: BlockId, data: &[u8]) -> Result<(), LogError> {
        let f = self.fragment_bytes;
        if data.len() > f - SUMMARY_BYTES {
            return Err(LogError::TooLarge {
                len: data.len(),
                max: f - SUMMARY_BYTES,
            });
        }
        let mut at = self.cursor;
        // Never across a fragment boundary.
        if at / f != (at + data.len().max(1) - 1) / f {
            at = at.div_ceil(f) * f;
        }
        if at + data.len() > self.open.len() || self.open_entries.len() == MAX_ENTRIES {
            self.seal(0, 0, 0, 0)?;
            at = SUMMARY_BYTES;
        }
        self.open[at..at + data.len()].copy_from_slice(data);
        self.open_entries
            .push((block, at as u32, data.len() as u32));
        self.cursor = at + data.len();
        Ok(())
    }

    /// Seal the open segment (if it has anything) and queue its fragments.
    fn seal(&mut self, kind: u8, part: u32, parts: u32, upto: u64) -> Result<(), LogError> {
        if kind == DATA && self.open_entries.is_empty() {
            return Ok(());
        }
        let segment = self.current_segment();
        self.next_seq += 1;
        let time = (self.clock)();
        let entries = std::mem::take(&mut self.open_entries);
        let summary = Summary {
            segment,
            kind,
            time,
            part,
            parts,
            upto,
            payload: (self.cursor - SUMMARY_BYTES) as u32,
            entries: if kind == 0 {
                entries.clone()
            } else {
                Vec::new()
            },
        };
        summary.encode(&mut self.open[..SUMMARY_BYTES]);
        let bytes = std::mem::replace(
            &mut self.open,
            vec![0; self.group.data() * self.fragment_bytes],
        );
        self.cursor = SUMMARY_BYTES;
        let blocks = entries
            .iter()
            .map(|(b, off, len)| {
                (
                    *b,
                    LogAddress {
                        segment,
                        offset: *off,
                        len: *len,
                    },
                )
            })
            .collect();
        self.queued.push(Sealed {
            segment,
            kind,
            time,
            bytes,
            blocks,
        });
        if self.queued.len() >= MAX_QUEUED_SEGMENTS && !self.full {
            // Write-behind: a failure here (a full device, servers down) keeps the segments
            // queued and is reported by the next `fsync`, where a writer waits for it; the
            // append itself has succeeded.
            let _ = self.write_queued();
        }
        Ok(())
    }

    /// Every fragment of a segment's bytes: data, then parity.
    fn fragments(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>, LogError> {
        let data: Vec<&[u8]> = bytes.chunks(self.fragment_bytes).collect();
        let mut all: Vec<Vec<u8>> = data.iter().map(|d| d.to_vec()).collect();
        all.extend(self.parity(&data)?);
        Ok(all)
    }

    /// The parity fragments of a segment's data fragments.
    fn parity<T: AsRef<[u8]>>(&self, data: &[T]) -> Result<Vec<Vec<u8>>, LogError> {
        parity(&self.group, data)
    }

    /// Write the queued segments: one batch per server, all in flight together.
    fn write_queued(&mut self) -> Result<(), LogError> {
        self.write_range(0, false)
    }

    /// Free segments kept for the cleaner (its copies of a round's live blocks and the
    /// checkpoint through which it frees space), once `segments` more segments holding `entries` more blocks are
    /// durable: their imap entries and usage-table rows grow the next checkpoint. One
    /// checkpoint (and two segments of slack) per writer sharing the stores, and the
    /// cleaner's copies.
    fn reserve_after(&self, entries: usize, segments: usize) -> usize {
        self.writers * (self.checkpoint_cost_after(entries, segments) + 2) + CLEANER_RESERVE
    }

    /// Room a batch that frees more than it adds may not go below: every writer's
    /// checkpoint (through which its deletions free space), without the cleaner's copies.
    fn freeing_floor(&self, entries: usize, segments: usize) -> usize {
        self.writers * (self.checkpoint_cost_after(entries, segments) + 2)
    }

    /// Imap entries `queued[from..]` adds once durable: blocks it writes that the imap
    /// does not hold yet (a deletion or an overwrite adds none).
    fn imap_growth(&self, from: usize) -> usize {
        let mut last = std::collections::BTreeMap::new();
        for s in &self.queued[from..] {
            for (b, a) in &s.blocks {
                last.insert(*b, a.len);
            }
        }
        last.iter()
            .filter(|(b, len)| **len > 0 && !self.imap.contains_key(b))
            .count()
    }

    /// Bytes that `queued[from..]` would make dead (the durable versions it overwrites or
    /// deletes) less the bytes it adds: positive for a batch of deletions.
    fn net_freed(&self, from: usize) -> i64 {
        let mut freed = 0i64;
        let mut seen = std::collections::BTreeSet::new();
        for s in self.queued[from..].iter().rev() {
            for (b, a) in s.blocks.iter().rev() {
                if !seen.insert(*b) {
                    continue; // a later version in the batch counts instead
                }
                freed -= a.len as i64;
                freed += self.imap.get(b).map_or(0, |o| o.len as i64);
            }
        }
        freed
    }

    /// Drop queued data segments (refused by full stores, never written) all of whose
    /// blocks have a newer version queued or appended since: what a deleted or rewritten
    /// file had waiting keeps no space. Returns how many were dropped.
    fn drop_superseded(&mut self) -> usize {
        let mut newer: std::collections::BTreeSet<BlockId> =
            self.open_entries.iter().map(|(b, _, _)| *b).collect();
        let mut keep = vec![true; self.queued.len()];
        for (i, s) in self.queued.iter().enumerate().rev() {
            if s.kind == DATA
                && !s.blocks.is_empty()
                && s.blocks.iter().all(|(b, _)| newer.contains(b))
            {
                keep[i] = false;
                continue;
            }
            newer.extend(s.blocks.iter().map(|(b, _)| *b));
        }
        let before = self.queued.len();
        let mut k = keep.into_iter();
        self.queued.retain(|_| k.next().unwrap_or(true));
        let dropped = before - self.queued.len();
        self.counters.superseded_dropped += dropped as u64;
        dropped
    }

    /// Write `queued[from..]`. Data writes (`use_reserve` false) fail with ENOSPC rather
    /// than take the last free segments kept by [`Log::reserve_after`].
    fn write_range(&mut self, from: usize, use_reserve: bool) -> Result<(), LogError> {
        if self.queued.len() <= from {
            return Ok(());
        }
        if !use_reserve
            && self.full
            && from == 0
            && self.drop_superseded() > 0
            && self.queued.is_empty()
        {
            return Ok(());
        }
        let batch = self.queued.len() - from;
        if !use_reserve {
            // An upper bound first (every entry a new imap entry; O(segments)); only near
            // full is the exact need worked out from the blocks.
            let all: usize = self.queued[from..].iter().map(|s| s.blocks.len()).sum();
            let upper = self.reserve_after(all, batch) + batch;
            if self.free_hint < upper + 64 || self.writes_since_look >= 16 {
                self.free_segments();
            }
            self.writes_since_look = self.writes_since_look.saturating_add(1);
            let need = if self.free_hint >= upper {
                upper
            } else {
                let entries = self.imap_growth(from);
                // A batch that frees more than it adds (deletions: `rm` on a full
                // cluster) may use the cleaner's share; data never takes the checkpoints'
                // room.
                let floor = if self.net_freed(from) > 0 {
                    self.freeing_floor(entries, batch)
                } else {
                    self.reserve_after(entries, batch)
                };
                floor + batch
            };
            if self.free_hint < need {
                self.full = true;
                return Err(LogError::Store(StoreError::NoSpace {
                    free: self.free_hint,
                    needed: need,
                }));
            }
        }
        let n = self.group.servers.len();
        let up = self.stores.iter().filter(|s| s.is_some()).count();
        if up < self.group.data() {
            return Err(LogError::Unrecoverable {
                segment: self.queued[0].segment,
                have: up,
                need: self.group.data(),
                why: "too many servers of the stripe group are down to write".into(),
            });
        }
        let mut per_server: Vec<Vec<(FragmentId, Vec<u8>)>> = vec![Vec::new(); n];
        for s in &self.queued[from..] {
            for (i, frag) in self.fragments(&s.bytes)?.into_iter().enumerate() {
                per_server[i].push((
                    FragmentId {
                        segment: s.segment,
                        index: i as u16,
                    },
                    frag,
                ));
            }
        }
        // Every server at once, one thread each (a remote server's round trips, a local
        // device's queue): the segment is as slow as its slowest server, not their sum.
        let results = parallel(&mut self.stores, |i, store| {
            let refs: Vec<(FragmentId, &[u8])> = per_server[i]
                .iter()
                .map(|(id, d)| (*id, d.as_slice()))
                .collect();
            store.write(&refs)
        });
        let r = self.settle(results, self.queued[from].segment);
        if !use_reserve {
            self.full = matches!(r, Err(LogError::Store(StoreError::NoSpace { .. })));
        }
        r?;
        self.counters.segments += batch as u64;
        self.free_hint = self.free_hint.saturating_sub(batch);
        let q = self.queued.split_off(from);
        self.written.extend(q);
        Ok(())
    }

    /// Sync every server, then apply what was written: the imap, live bytes, the table
    /// of segments.
    fn sync_written(&mut self) -> Result<(), LogError> {
        let segment = self.written.first().map_or(0, |w| w.segment);
        let results = parallel(&mut self.stores, |_, s| s.sync());
        self.settle(results, segment)?;
        for sealed in std::mem::take(&mut self.written) {
            self.segs.insert(
                sealed.segment,
                SegInfo {
                    kind: sealed.kind,
                    time: sealed.time,
                },
            );
            if sealed.kind == DATA {
                self.last_data_segment = self.last_data_segment.max(sealed.segment);
            }
            for (block, addr) in sealed.blocks {
                self.set_address(block, addr);
            }
        }
        Ok(())
    }

    /// Start writing everything appended so far (seal the open segment, write the queue)
    /// without waiting for durability: write-behind, ahead of an `fsync`.
    pub fn write_behind(&mut self) -> Result<(), LogError> {
        self.seal(0, 0, 0, 0)?;
        self.write_queued()
    }

    /// Make every block written so far durable on the stripe group: seal, write, sync every
    /// server, then update the imap. On an error nothing is acknowledged and the blocks
    /// stay queued, to be retried.
    pub fn fsync(&mut self) -> Result<(), LogError> {
        self.seal(0, 0, 0, 0)?;
        match self.write_queued() {
            Err(LogError::Store(StoreError::NoSpace { .. })) if self.net_freed(0) > 0 => {
                self.drain_freeing()?
            }
            r => r?,
        }
        self.sync_written()
    }

    /// Write a batch that frees more than it adds (the deletions of a large file on a full
    /// stripe group need a summary entry a block: more segments than are free) in rounds:
    /// as many of its oldest segments as fit above this writer's checkpoint room, made
    /// durable, then a checkpoint, which frees the data segments they emptied; until the
    /// batch is written or a round frees nothing.
    fn drain_freeing(&mut self) -> Result<(), LogError> {
        loop {
            let floor = self.checkpoint_cost_after(self.imap_growth(0), self.queued.len())
                + 2 * self.writers;
            let room = (self.free_segments() as usize).saturating_sub(floor);
            let n = room.min(self.queued.len());
            if n == 0 {
                return Err(LogError::Store(StoreError::NoSpace {
                    free: self.free_hint,
                    needed: floor + 1,
                }));
            }
            let rest = self.queued.split_off(n);
            let r = self.write_range(0, true);
            self.queued.extend(rest);
            r?;
            self.sync_written()?;
            let freed = self.counters.freed;
            self.write_checkpoint()?;
            if self.queued.is_empty() {
                self.full = false;
                return Ok(());
            }
            if self.counters.freed == freed {
                return Err(LogError::Store(StoreError::NoSpace {
                    free: self.free_hint,
                    needed: floor + self.queued.len(),
                }));
            }
        }
    }

    /// Judge a round of store calls: a server that failed with a device or network error
    /// is marked down (its fragments are rebuilt from parity until a `rebuild`), and the
    /// round succeeds while at least `data` servers did; any other error (ENOSPC, a
    /// refused request) fails the round, with nothing acknowledged.
    fn settle(
        &mut self,
        results: Vec<(usize, Result<(), StoreError>)>,
        segment: u64,
    ) -> Result<(), LogError> {
        let mut ok = 0;
        let mut first: Option<StoreError> = None;
        for (i, r) in results {
            match r {
                Ok(()) => ok += 1,
                Err(StoreError::Io { .. }) => {
                    self.stores[i] = None;
                    self.counters.servers_lost += 1;
                }
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first {
            return Err(e.into());
        }
        if ok < self.group.data() {
            return Err(LogError::Unrecoverable {
                segment,
                have: ok,
                need: self.group.data(),
                why: "too many servers of the stripe group failed".into(),
            });
        }
        Ok(())
    }

    /// The block's newest durable address is `addr`; a zero length is a deletion (a
    /// truncated or removed block: it leaves the imap, and reads find it absent).
    fn set_address(&mut self, block: BlockId, addr: LogAddress) {
        let old = if addr.len == 0 {
            self.imap.remove(&block)
        } else {
            self.imap.insert(block, addr)
        };
        if let Some(old) = old {
            if let Some(l) = self.live.get_mut(&old.segment) {
                *l = l.saturating_sub(old.len as u64);
                if *l == 0 {
                    self.live.remove(&old.segment);
                }
            }
        }
        if addr.len > 0 {
            *self.live.entry(addr.segment).or_insert(0) += addr.len as u64;
        }
    }

    /// Read a block: the newest version written by this log (synced or not).
    pub fn read(&mut self, block: BlockId) -> Result<Vec<u8>, LogError> {
        if let Some((_, off, len)) = self.open_entries.iter().rev().find(|(b, _, _)| *b == block) {
            return Ok(self.open[*off as usize..(*off + *len) as usize].to_vec());
        }
        // Sealed but not written yet: from memory.
        for s in self.queued.iter().rev() {
            if let Some((_, a)) = s.blocks.iter().rev().find(|(b, _)| *b == block) {
                return Ok(s.bytes[a.offset as usize..(a.offset + a.len) as usize].to_vec());
            }
        }
        // Written, not synced yet: from the servers.
        let unsynced = self.written.iter().rev().find_map(|s| {
            s.blocks
                .iter()
                .rev()
                .find(|(b, _)| *b == block)
                .map(|(_, a)| *a)
        });
        if let Some(a) = unsynced {
            return self.read_at(a);
        }
        let a = *self.imap.get(&block).ok_or(LogError::NotFound(block))?;
        self.read_at(a)
    }

    /// Read bytes at a log address, rebuilding the fragment from the others if needed.
    pub fn read_at(&mut self, a: LogAddress) -> Result<Vec<u8>, LogError> {
        let f = self.fragment_bytes;
        let i = a.offset as usize / f;
        let inner = a.offset as usize % f;
        let frag = self.fragment(a.segment, i)?;
        let end = inner + a.len as usize;
        if end > frag.len() {
            return Err(LogError::Unrecoverable {
                segment: a.segment,
                have: 0,
                need: 1,
                why: format!("address {a:?} lies outside its fragment"),
            });
        }
        Ok(frag[inner..end].to_vec())
    }

    /// Fragment `i` of `segment`: from its server, else rebuilt from the others (and
    /// rewritten if the server has it corrupt).
    fn fragment(&mut self, segment: u64, i: usize) -> Result<Vec<u8>, LogError> {
        let id = FragmentId {
            segment,
            index: i as u16,
        };
        let own = self.stores[i].as_mut().map(|s| s.read(&[id]).remove(0));
        let corrupt = match own {
            Some(Ok(d)) => return Ok(d),
            Some(Err(StoreError::Corrupt { .. })) => true,
            _ => false,
        };
        self.counters.degraded_reads += 1;
        let all = self.reconstruct(segment, Some(i), i + 1)?;
        let data = all[i].clone();
        if corrupt {
            if let Some(s) = self.stores[i].as_mut() {
                s.write(&[(id, &data)])?;
                s.sync()?;
                self.counters.repaired += 1;
            }
        }
        Ok(data)
    }

    /// The fragments of `segment` up to `upto` (exclusive): see [`reconstruct`].
    fn reconstruct(
        &mut self,
        segment: u64,
        skip: Option<usize>,
        upto: usize,
    ) -> Result<Vec<Vec<u8>>, LogError> {
        reconstruct(
            &mut self.stores,
            &self.group,
            self.fragment_bytes,
            segment,
            skip,
            upto,
        )
    }

    /// Write a checkpoint (after an fsync): the imap, then the segment-usage table (the
    /// writer's *s-file*: live bytes and seal time of each data segment), as consecutive
    /// checkpoint segments. Recovery starts from the newest complete checkpoint. Then free
    /// what the checkpoint made unnecessary (see [`Log::free_reclaimable`]).
    ///
    /// When the stores are too full for the data waiting to be written, the checkpoint is
    /// still written (from the reserve) with what is durable, ahead of that data: this is
    /// how the cleaner frees space on a full stripe group.
    pub fn checkpoint(&mut self) -> Result<(), LogError> {
        match self.fsync() {
            Ok(()) | Err(LogError::Store(StoreError::NoSpace { .. })) => {}
            Err(e) => return Err(e),
        }
        self.write_checkpoint()
    }

    /// The checkpoint itself, of what is durable now (see [`Log::checkpoint`]).
    fn write_checkpoint(&mut self) -> Result<(), LogError> {
        self.flush_copies()?;
        let upto = self.durable_upto();
        let per = ((self.open.len() - SUMMARY_BYTES) / IMAP_ENTRY_BYTES).max(1);
        let entry = |a: u64, b: u64, c: u32, d: u32| {
            let mut e = [0u8; IMAP_ENTRY_BYTES];
            e[..8].copy_from_slice(&a.to_le_bytes());
            e[8..16].copy_from_slice(&b.to_le_bytes());
            e[16..20].copy_from_slice(&c.to_le_bytes());
            e[20..24].copy_from_slice(&d.to_le_bytes());
            e
        };
        let imap: Vec<[u8; IMAP_ENTRY_BYTES]> = self
            .imap
            .iter()
            .map(|(b, a)| entry(*b, a.segment, a.offset, a.len))
            .collect();
        // Then the s-file: segment (marked), live bytes, seal time (as two u32 halves).
        let mut entries = imap;
        entries.extend(self.usage().into_iter().map(|u| {
            entry(
                u.segment | USAGE_ENTRY,
                u.live,
                u.time as u32,
                (u.time >> 32) as u32,
            )
        }));
        let parts = entries.len().div_ceil(per).max(1) as u32;
        let first = self.current_segment();
        if entries.is_empty() {
            self.write_part(CHECKPOINT, 0, 1, upto, &[])?;
        }
        for (part, chunk) in entries.chunks(per).enumerate() {
            self.write_part(CHECKPOINT, part as u32, parts, upto, chunk)?;
        }
        // Only the checkpoint's segments (data still waiting keeps its place in the queue;
        // it is newer than `upto`, so recovery rolls it forward once it is written).
        let from = self
            .queued
            .iter()
            .position(|s| s.kind == CHECKPOINT)
            .unwrap_or(self.queued.len());
        self.write_range(from, true)?;
        self.sync_written()?;
        self.checkpoint_segs = (first..first + parts as u64).collect();
        self.checkpoint_upto = upto;
        self.counters.checkpoints += 1;
        self.free_reclaimable();
        Ok(())
    }

    fn write_part(
        &mut self,
        kind: u8,
        part: u32,
        parts: u32,
        upto: u64,
        chunk: &[[u8; IMAP_ENTRY_BYTES]],
    ) -> Result<(), LogError> {
        let mut at = SUMMARY_BYTES;
        for e in chunk {
            self.open[at..at + IMAP_ENTRY_BYTES].copy_from_slice(e);
            at += IMAP_ENTRY_BYTES;
        }
        self.cursor = at;
        self.seal(kind, part, parts, upto)
    }

    /// Free (delete on every server that is up) the segments recovery will never read:
    /// data segments the newest checkpoint covers that hold no live block, and older
    /// checkpoints. A dead data segment newer than the checkpoint is kept: roll-forward
    /// may need a deletion it records. Returns how many were freed.
    pub fn free_reclaimable(&mut self) -> u64 {
        let Some(newest) = self.checkpoint_segs.first().copied() else {
            return 0;
        };
        let upto = self.checkpoint_upto;
        let dead: Vec<u64> = self
            .segs
            .iter()
            .filter(|(s, i)| {
                if i.kind == DATA {
                    **s <= upto && !self.live.contains_key(*s)
                } else {
                    **s < newest
                }
            })
            .map(|(s, _)| *s)
            .collect();
        if dead.is_empty() {
            return 0;
        }
        let n = self.group.servers.len();
        let ids: Vec<FragmentId> = dead
            .iter()
            .flat_map(|s| {
                (0..n).map(move |i| FragmentId {
                    segment: *s,
                    index: i as u16,
                })
            })
            .collect();
        // A server that fails here keeps the fragments; they are found again (and freed)
        // after a restart, since recovery lists what the servers hold.
        // (A store reuses a freed slot after its next sync.)
        let _ = parallel(&mut self.stores, |_, st| {
            st.delete(&ids).and_then(|_| st.sync())
        });
        for s in &dead {
            self.segs.remove(s);
        }
        self.free_hint += dead.len();
        self.counters.freed += dead.len() as u64;
        dead.len() as u64
    }

    /// The newest data segment up to which every data segment is durable: a data segment
    /// still waiting (the stores were full) may be older than a durable copy of the
    /// cleaner's. A checkpoint covers up to here, so only segments up to here can be freed.
    pub fn durable_upto(&self) -> u64 {
        let waiting = self
            .queued
            .iter()
            .chain(self.written.iter())
            .filter(|s| s.kind == DATA)
            .map(|s| s.segment)
            .min();
        waiting.map_or(self.last_data_segment, |w| {
            self.last_data_segment.min(w.saturating_sub(1))
        })
    }

    /// The segment-usage table (s-file): every durable data segment of this writer.
    pub fn usage(&self) -> Vec<SegmentUsage> {
        self.segs
            .iter()
            .filter(|(_, i)| i.kind == DATA)
            .map(|(s, i)| SegmentUsage {
                segment: *s,
                live: self.live.get(s).copied().unwrap_or(0),
                time: i.time,
            })
            .collect()
    }

    /// `fsck` of this log: every imap entry lies in a segment the log holds (durable,
    /// written, queued or open), and every durable segment's fragments read back intact
    /// (their checksums) with parity equal to what its data fragments give. With
    /// `repair`, a corrupt, missing or wrong fragment is rewritten from the others (the
    /// segment must still decode); an imap entry outside every segment cannot be repaired
    /// (its block is lost) and is reported. Returns the problems found, each one ending in
    /// what was done.
    pub fn check(&mut self, repair: bool) -> (LogCheck, Vec<String>) {
        let mut problems = Vec::new();
        let mut held: BTreeSet<u64> = self.segs.keys().copied().collect();
        held.extend(self.queued.iter().map(|s| s.segment));
        held.extend(self.written.iter().map(|s| s.segment));
        held.insert(self.current_segment());
        let mut k = LogCheck::default();
        for (block, a) in &self.imap {
            k.imap_entries += 1;
            if !held.contains(&a.segment) {
                problems.push(format!(
                    "log of node {}: {} is mapped to segment {:x}, which the log does not hold (the block is lost)",
                    self.writer,
                    crate::fs::layout::block_name(*block),
                    a.segment
                ));
            }
        }
        let n = self.group.servers.len();
        let segments: Vec<u64> = self.segs.keys().copied().collect();
        for segment in segments {
            k.segments += 1;
            let mut frags: Vec<Option<Vec<u8>>> = Vec::with_capacity(n);
            for (i, store) in self.stores.iter_mut().enumerate() {
                let id = FragmentId {
                    segment,
                    index: i as u16,
                };
                frags.push(match store.as_mut() {
                    None => None,
                    Some(st) => st.read(&[id]).remove(0).ok(),
                });
            }
            let data = self.group.data();
            let bad: Vec<usize> = if frags[..data].iter().all(|f| f.is_some()) {
                let d: Vec<&Vec<u8>> = frags[..data].iter().flatten().collect();
                match parity(&self.group, &d) {
                    Ok(p) => (data..n)
                        .filter(|j| frags[*j].as_ref() != Some(&p[*j - data]))
                        .collect(),
                    Err(_) => (0..n).collect(),
                }
            } else {
                (0..n).filter(|j| frags[*j].is_none()).collect()
            };
            for j in bad {
                if self.stores[j].is_none() {
                    continue; // a server that is down: the log's own rebuild's business
                }
                let what = if frags[j].is_none() {
                    "unreadable or missing"
                } else {
                    "not the parity of the data fragments"
                };
                let id = FragmentId {
                    segment,
                    index: j as u16,
                };
                let fixed = repair
                    && self
                        .reconstruct(segment, Some(j), n)
                        .ok()
                        .and_then(|all| {
                            let st = self.stores[j].as_mut()?;
                            st.write(&[(id, &all[j])]).ok()?;
                            st.sync().ok()
                        })
                        .is_some();
                if fixed {
                    k.repaired += 1;
                }
                problems.push(format!(
                    "log of node {}: segment {segment:x} fragment {j} (server {}) is {what}{}",
                    self.writer,
                    self.group.servers[j],
                    match (repair, fixed) {
                        (false, _) => "",
                        (true, true) => " (repaired: rewritten from the others)",
                        (true, false) => " (NOT repaired: the segment does not decode)",
                    }
                ));
            }
        }
        (k, problems)
    }

    /// Whether `segment` is one of this writer's durable segments (not freed).
    pub fn has_segment(&self, segment: u64) -> bool {
        self.segs.contains_key(&segment)
    }

    /// Segments this writer holds on the servers (durable, written, queued).
    pub fn held_segments(&self) -> usize {
        self.segs.len() + self.written.len() + self.queued.len()
    }

    /// Bytes of blocks a data segment holds at most.
    pub fn segment_payload(&self) -> u64 {
        (self.open.len() - SUMMARY_BYTES) as u64
    }

    /// The current time of the log's clock.
    pub fn now(&self) -> u64 {
        (self.clock)()
    }

    /// Free segments of the stripe group: the fewest free slots of any server that is up.
    pub fn free_segments(&mut self) -> u64 {
        let free = self
            .stores
            .iter_mut()
            .flatten()
            .filter_map(|s| s.free_slots().ok())
            .min()
            .unwrap_or(0);
        self.free_hint = free;
        self.writes_since_look = 0;
        self.publish_room();
        free as u64
    }

    /// The blocks whose newest durable version lies in `segment` (what the cleaner must
    /// move to empty it).
    pub fn live_in(&self, segment: u64) -> Vec<(BlockId, LogAddress)> {
        if !self.live.contains_key(&segment) {
            return Vec::new();
        }
        self.imap
            .iter()
            .filter(|(_, a)| a.segment == segment)
            .map(|(b, a)| (*b, *a))
            .collect()
    }

    /// Whether a version of `block` newer than the durable one is on its way (appended,
    /// not yet synced; a writer's or a cleaner's copy).
    fn pending(&self, block: BlockId) -> bool {
        self.open_entries
            .iter()
            .chain(self.copy.1.iter())
            .any(|(b, _, _)| *b == block)
            || self
                .queued
                .iter()
                .chain(self.written.iter())
                .chain(self.copies.iter())
                .any(|s| s.blocks.iter().any(|(b, _)| *b == block))
    }

    /// Run `f` with the cleaner's open segment in place of the writers'; what it seals
    /// goes to the cleaner's queue.
    fn in_copy_lane<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        let lane = |l: &mut Self| {
            std::mem::swap(&mut l.open, &mut l.copy.0);
            std::mem::swap(&mut l.open_entries, &mut l.copy.1);
            std::mem::swap(&mut l.cursor, &mut l.copy.2);
        };
        lane(self);
        let n = self.queued.len();
        // No write-behind of the writers' queue from in here.
        let full = std::mem::replace(&mut self.full, true);
        let r = f(self);
        self.full = full;
        let sealed = self.queued.split_off(n);
        self.copies.extend(sealed);
        lane(self);
        r
    }

    /// Write data that waits because the stores were full, from the reserve if what is
    /// left still holds a checkpoint: the cleaner calls this when it has nothing left it
    /// can free before that data is durable.
    pub fn flush_waiting(&mut self) -> Result<(), LogError> {
        if self.queued.is_empty() {
            return Ok(());
        }
        // As many of the oldest as fit (deletions among them free space once durable).
        let floor = self.freeing_floor(self.imap_growth(0), self.queued.len());
        let room = (self.free_segments() as usize).saturating_sub(floor);
        let n = room.min(self.queued.len());
        if n == 0 {
            return Ok(());
        }
        let rest = self.queued.split_off(n);
        let r = self.write_range(0, true);
        self.queued.extend(rest);
        r?;
        self.full = !self.queued.is_empty();
        self.sync_written()
    }

    /// Segments a checkpoint would cost now.
    pub fn checkpoint_cost(&self) -> usize {
        self.checkpoint_cost_after(0, 0)
    }

    /// Segments a checkpoint would cost with `entries` more imap entries and `segments`
    /// more data segments: the imap and the usage table, `per` entries a segment (an upper
    /// bound: the table holds data segments only, and an entry may replace one).
    fn checkpoint_cost_after(&self, entries: usize, segments: usize) -> usize {
        let per = (self.open.len() - SUMMARY_BYTES) / IMAP_ENTRY_BYTES;
        (self.imap.len() + entries + self.segs.len() + segments)
            .div_ceil(per.max(1))
            .max(1)
    }

    /// Data segments a new checkpoint would cover that the newest does not: all of them,
    /// and the dead ones ([`Log::free_reclaimable`] would free those).
    pub fn beyond_checkpoint(&self) -> (usize, usize) {
        let upto = self.durable_upto();
        if upto <= self.checkpoint_upto {
            return (0, 0);
        }
        let data = self
            .segs
            .range(self.checkpoint_upto + 1..=upto)
            .filter(|(_, i)| i.kind == DATA);
        let (mut all, mut dead) = (0, 0);
        for (s, _) in data {
            all += 1;
            dead += usize::from(!self.live.contains_key(s));
        }
        (all, dead)
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

    /// Whether the stripe group has room for `bytes` more of the cleaner's copies of
    /// `segment`'s blocks, and for the checkpoint needed to free it unless the newest
    /// checkpoint covers it already (the stores are asked).
    pub fn room_for_copies(&mut self, segment: u64, bytes: u64) -> bool {
        let payload = self.segment_payload();
        let pending: u64 = self.copies.len() as u64 * payload + self.copy.2 as u64;
        let copies = (pending + bytes).div_ceil(payload) as usize + 1;
        let checkpoint = if segment <= self.checkpoint_upto {
            0
        } else {
            self.checkpoint_cost() + 1
        };
        self.free_segments() as usize >= copies + checkpoint
    }

    /// Write the cleaner's copies (ahead of waiting data, from the reserve) and sync:
    /// the imap then points at them.
    pub fn flush_copies(&mut self) -> Result<(), LogError> {
        self.in_copy_lane(|l| l.seal(DATA, 0, 0, 0))?;
        if self.copies.is_empty() {
            return Ok(());
        }
        let from = self.queued.len();
        let copies = std::mem::take(&mut self.copies);
        self.queued.extend(copies);
        if let Err(e) = self.write_range(from, true) {
            let back = self.queued.split_off(from);
            self.copies = back;
            return Err(e);
        }
        self.sync_written()
    }

    /// The cleaner's copy of `block`, read from `from`: appended (durable at the next
    /// fsync, which moves the imap) only if `from` is still the block's newest version.
    /// If a writer wrote the block since the cleaner read it, the writer wins: the copy is
    /// discarded (counted in [`LogCounters::writer_wins`]). Returns whether it was moved.
    pub fn relocate(
        &mut self,
        block: BlockId,
        from: LogAddress,
        data: &[u8],
    ) -> Result<bool, LogError> {
        if self.pending(block) || self.imap.get(&block) != Some(&from) {
            self.counters.writer_wins += 1;
            return Ok(false);
        }
        self.in_copy_lane(|l| l.write(block, data))?;
        self.counters.relocated += 1;
        self.counters.relocated_bytes += data.len() as u64;
        Ok(true)
    }

    /// A reader of this log's segments over its own stores (the cleaner reads without
    /// holding the log).
    pub fn reader(&self, stores: Vec<Option<S>>) -> Result<SegmentReader<S>, LogError> {
        SegmentReader::new(self.group.clone(), stores)
    }

    /// Rebuild this writer's state from the stores: the newest complete checkpoint, then the
    /// summaries of the data segments written after it, in order. Segments that cannot be
    /// decoded (written but torn by a crash before their sync) are skipped and counted.
    pub fn recover(
        writer: NodeId,
        group: StripeGroup,
        stores: Vec<Option<S>>,
    ) -> Result<Log<S>, LogError> {
        let mut log = Log::new(writer, group, stores)?;
        let lo = segment_number(writer, 0);
        let hi = segment_number(writer, (1 << 40) - 1);
        let mut segments: std::collections::BTreeSet<u64> = Default::default();
        for s in log.stores.iter_mut().flatten() {
            // A server that cannot list is treated as down for recovery; parity covers it.
            if let Ok(list) = s.list() {
                segments.extend(
                    list.into_iter()
                        .map(|f| f.segment)
                        .filter(|s| (lo..=hi).contains(s)),
                );
            }
        }
        // Decode every segment's bytes once (recovery reads the whole log of this writer).
        let mut decoded: BTreeMap<u64, (Summary, Vec<u8>)> = BTreeMap::new();
        for seg in &segments {
            match log.reconstruct(*seg, None, 0) {
                Ok(frags) => {
                    let k = log.group.data();
                    let bytes: Vec<u8> = frags[..k].concat();
                    match Summary::decode(&bytes) {
                        Some(s) if s.segment == *seg => {
                            decoded.insert(*seg, (s, bytes));
                        }
                        _ => log.counters.undecodable += 1,
                    }
                }
                Err(_) => log.counters.undecodable += 1,
            }
        }
        // The newest checkpoint whose parts are all there.
        let mut start_after = 0u64;
        let mut best: Option<(u64, Vec<u64>)> = None;
        let is_checkpoint = |k: u8| k == CHECKPOINT;
        for (seg, (s, _)) in decoded.iter().rev() {
            if !is_checkpoint(s.kind) || s.part + 1 != s.parts {
                continue;
            }
            // Its parts are the `parts` checkpoint segments ending here.
            let first = seg - (s.parts as u64 - 1);
            let ids: Vec<u64> = (first..=*seg).collect();
            let complete = ids.iter().enumerate().all(|(p, id)| {
                decoded.get(id).is_some_and(|(x, _)| {
                    is_checkpoint(x.kind) && x.part == p as u32 && x.parts == s.parts
                })
            });
            if complete {
                start_after = s.upto;
                best = Some((*seg, ids));
                break;
            }
        }
        let mut times: BTreeMap<u64, u64> = BTreeMap::new();
        if let Some((_, ids)) = &best {
            for id in ids {
                let (s, bytes) = &decoded[id];
                let n = s.payload as usize / IMAP_ENTRY_BYTES;
                for e in 0..n {
                    let at = SUMMARY_BYTES + e * IMAP_ENTRY_BYTES;
                    let u64_at =
                        |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap_or([0; 8]));
                    let u32_at =
                        |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap_or([0; 4]));
                    if u64_at(at) & USAGE_ENTRY != 0 {
                        // The s-file: seal times of the segments it covers (live bytes
                        // are recomputed from the imap).
                        times.insert(u64_at(at) & !USAGE_ENTRY, u64_at(at + 16));
                        continue;
                    }
                    let addr = LogAddress {
                        segment: u64_at(at + 8),
                        offset: u32_at(at + 16),
                        len: u32_at(at + 20),
                    };
                    log.set_address(u64_at(at), addr);
                }
            }
        }
        // Every segment this writer has on the servers, for freeing and the cleaner (an
        // undecodable one counts as a dead data segment: freed once a checkpoint covers it).
        for seg in &segments {
            let info = match decoded.get(seg) {
                Some((s, _)) => SegInfo {
                    kind: s.kind,
                    time: if s.time == 0 {
                        times.get(seg).copied().unwrap_or(0)
                    } else {
                        s.time
                    },
                },
                None => SegInfo {
                    kind: DATA,
                    time: 0,
                },
            };
            log.segs.insert(*seg, info);
        }
        if let Some((_, ids)) = best {
            log.checkpoint_segs = ids;
            log.checkpoint_upto = start_after;
        }
        // Roll forward.
        for (seg, (s, _)) in decoded.range(start_after + 1..) {
            if s.kind == DATA {
                for (b, off, len) in &s.entries {
                    log.set_address(
                        *b,
                        LogAddress {
                            segment: *seg,
                            offset: *off,
                            len: *len,
                        },
                    );
                }
                log.last_data_segment = *seg;
            }
        }
        if let Some(max) = segments.iter().next_back() {
            log.next_seq = (max & ((1 << 40) - 1)) + 1;
        }
        log.last_data_segment = log.last_data_segment.max(start_after);
        Ok(log)
    }

    /// Put `store` in place of server i (a replacement) and rebuild every fragment it should
    /// hold, for every segment any other server of the group has (all writers).
    pub fn rebuild(&mut self, i: usize, mut store: S) -> Result<u64, LogError> {
        if i >= self.stores.len() {
            return Err(LogError::Config(format!(
                "no server {i} in stripe group {}",
                self.group.id
            )));
        }
        // This writer's segments (other writers rebuild their own); the fragments the
        // server still has (a restarted server keeps what it had) are not written again.
        let lo = segment_number(self.writer, 0);
        let hi = segment_number(self.writer, (1 << 40) - 1);
        let have: std::collections::BTreeSet<FragmentId> = store.list()?.into_iter().collect();
        self.stores[i] = Some(store);
        let mut segments: std::collections::BTreeSet<u64> = Default::default();
        for (j, s) in self.stores.iter_mut().enumerate() {
            if j != i {
                if let Some(s) = s {
                    segments.extend(
                        s.list()?
                            .into_iter()
                            .map(|f| f.segment)
                            .filter(|seg| (lo..=hi).contains(seg)),
                    );
                }
            }
        }
        segments.retain(|seg| {
            !have.contains(&FragmentId {
                segment: *seg,
                index: i as u16,
            })
        });
        let mut batch: Vec<(FragmentId, Vec<u8>)> = Vec::new();
        let mut done = 0;
        for seg in segments {
            let frags = self.reconstruct(seg, Some(i), i + 1)?;
            batch.push((
                FragmentId {
                    segment: seg,
                    index: i as u16,
                },
                frags[i].clone(),
            ));
            if batch.len() == MAX_QUEUED_SEGMENTS {
                done += self.flush_rebuild(i, &mut batch)?;
            }
        }
        done += self.flush_rebuild(i, &mut batch)?;
        if let Some(s) = self.stores[i].as_mut() {
            s.sync()?;
        }
        self.counters.rebuilt += done;
        Ok(done)
    }

    fn flush_rebuild(
        &mut self,
        i: usize,
        batch: &mut Vec<(FragmentId, Vec<u8>)>,
    ) -> Result<u64, LogError> {
        let n = batch.len() as u64;
        if let Some(s) = self.stores[i].as_mut() {
            let refs: Vec<(FragmentId, &[u8])> =
                batch.iter().map(|(id, d)| (*id, d.as_slice())).collect();
            s.write(&refs)?;
        }
        batch.clear();
        Ok(n)
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
            .filter(|s| s.segment == segment && s.kind == DATA)
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
