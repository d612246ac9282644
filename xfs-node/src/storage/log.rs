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

use std::collections::BTreeMap;

use super::fragment::{FragmentId, FragmentStore, StoreError};
use crate::coherence::{BlockId, NodeId};

/// Bytes reserved for the segment summary at the start of every segment.
pub const SUMMARY_BYTES: usize = 4096;
const SUMMARY_MAGIC: u64 = 0x5846_5353_4547_3031; // "XFSSEG01"
const SUMMARY_HEAD: usize = 48;
const ENTRY_BYTES: usize = 16;
/// Entries one summary holds.
pub const MAX_ENTRIES: usize = (SUMMARY_BYTES - SUMMARY_HEAD) / ENTRY_BYTES;
const IMAP_ENTRY_BYTES: usize = 24;
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
}

/// A decoded segment summary.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Summary {
    segment: u64,
    /// 0: data, 1: checkpoint.
    kind: u8,
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
        for (i, (b, off, len)) in self.entries.iter().enumerate() {
            let at = SUMMARY_HEAD + i * ENTRY_BYTES;
            out[at..at + 8].copy_from_slice(&b.to_le_bytes());
            out[at + 8..at + 12].copy_from_slice(&off.to_le_bytes());
            out[at + 12..at + 16].copy_from_slice(&len.to_le_bytes());
        }
        let crc = crc32c::crc32c(&out[..44]) ^ crc32c::crc32c(&out[SUMMARY_HEAD..SUMMARY_BYTES]);
        out[44..48].copy_from_slice(&crc.to_le_bytes());
    }

    fn decode(b: &[u8]) -> Option<Summary> {
        if b.len() < SUMMARY_BYTES {
            return None;
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or([0; 4]));
        if u64_at(0) != SUMMARY_MAGIC {
            return None;
        }
        let crc = crc32c::crc32c(&b[..44]) ^ crc32c::crc32c(&b[SUMMARY_HEAD..SUMMARY_BYTES]);
        if crc != u32_at(44) {
            return None;
        }
        let n = u16::from_le_bytes([b[40], b[41]]) as usize;
        if n > MAX_ENTRIES {
            return None;
        }
        let entries = (0..n)
            .map(|i| {
                let at = SUMMARY_HEAD + i * ENTRY_BYTES;
                (u64_at(at), u32_at(at + 8), u32_at(at + 12))
            })
            .collect();
        Some(Summary {
            segment: u64_at(8),
            kind: b[16],
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
    last_data_segment: u64,
    counters: LogCounters,
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
        if stores.len() != group.servers.len() {
            return Err(LogError::Config(format!(
                "stripe group {} has {} servers but {} stores were given",
                group.id,
                group.servers.len(),
                stores.len()
            )));
        }
        let fragment_bytes = stores
            .iter()
            .flatten()
            .map(|s| s.fragment_bytes())
            .min()
            .ok_or_else(|| LogError::Config("no store of the stripe group is up".into()))?;
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
            cursor: SUMMARY_BYTES,
            queued: Vec::new(),
            full: false,
            written: Vec::new(),
            imap: BTreeMap::new(),
            live: BTreeMap::new(),
            last_data_segment: 0,
            counters: LogCounters::default(),
        })
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
        if kind == 0 && self.open_entries.is_empty() {
            return Ok(());
        }
        let segment = self.current_segment();
        self.next_seq += 1;
        let entries = std::mem::take(&mut self.open_entries);
        let summary = Summary {
            segment,
            kind,
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
        if kind == 0 {
            self.last_data_segment = segment;
        }
        self.queued.push(Sealed {
            segment,
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
        reed_solomon_simd::encode(self.group.data(), self.group.parity, data)
            .map_err(|e| LogError::Config(format!("parity: {e}")))
    }

    /// Write the queued segments: one batch per server, all in flight together.
    fn write_queued(&mut self) -> Result<(), LogError> {
        if self.queued.is_empty() {
            return Ok(());
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
        for s in &self.queued {
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
        let r = self.settle(results, self.queued[0].segment);
        self.full = matches!(r, Err(LogError::Store(StoreError::NoSpace { .. })));
        r?;
        self.counters.segments += self.queued.len() as u64;
        let q = std::mem::take(&mut self.queued);
        self.written.extend(q);
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
        self.write_queued()?;
        let segment = self.written.first().map_or(0, |w| w.segment);
        let results = parallel(&mut self.stores, |_, s| s.sync());
        self.settle(results, segment)?;
        for sealed in std::mem::take(&mut self.written) {
            for (block, addr) in sealed.blocks {
                self.set_address(block, addr);
            }
        }
        Ok(())
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

    fn set_address(&mut self, block: BlockId, addr: LogAddress) {
        if let Some(old) = self.imap.insert(block, addr) {
            if let Some(l) = self.live.get_mut(&old.segment) {
                *l = l.saturating_sub(old.len as u64);
                if *l == 0 {
                    self.live.remove(&old.segment);
                }
            }
        }
        *self.live.entry(addr.segment).or_insert(0) += addr.len as u64;
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

    /// The fragments of `segment` up to `upto` (exclusive): the `data` fragments, plus the
    /// parity ones when `upto` reaches past them. Reads servers in order (skipping `skip`,
    /// which just failed) only until it has `data` intact fragments, decodes the missing
    /// data fragments from parity, and recomputes parity only if asked for.
    fn reconstruct(
        &mut self,
        segment: u64,
        skip: Option<usize>,
        upto: usize,
    ) -> Result<Vec<Vec<u8>>, LogError> {
        let n = self.group.servers.len();
        let k = self.group.data();
        let m = self.group.parity;
        let mut have: BTreeMap<usize, Vec<u8>> = BTreeMap::new();
        for j in 0..n {
            if have.len() == k {
                break;
            }
            if Some(j) == skip {
                continue;
            }
            if let Some(s) = self.stores[j].as_mut() {
                let id = FragmentId {
                    segment,
                    index: j as u16,
                };
                if let Ok(d) = s.read(&[id]).remove(0) {
                    if d.len() == self.fragment_bytes {
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
            let parity = self.parity(&all)?;
            all.extend(parity);
        }
        Ok(all)
    }

    /// Write the imap into the log (after an fsync): recovery starts from the newest
    /// complete checkpoint.
    pub fn checkpoint(&mut self) -> Result<(), LogError> {
        self.fsync()?;
        let upto = self.last_data_segment;
        let per_segment = (self.open.len() - SUMMARY_BYTES) / IMAP_ENTRY_BYTES;
        let entries: Vec<(BlockId, LogAddress)> = self.imap.iter().map(|(b, a)| (*b, *a)).collect();
        let parts = entries.len().div_ceil(per_segment).max(1) as u32;
        for (p, chunk) in entries.chunks(per_segment.max(1)).enumerate() {
            self.write_imap_part(p as u32, parts, upto, chunk)?;
        }
        if entries.is_empty() {
            self.write_imap_part(0, 1, upto, &[])?;
        }
        self.fsync()?;
        self.counters.checkpoints += 1;
        Ok(())
    }

    fn write_imap_part(
        &mut self,
        part: u32,
        parts: u32,
        upto: u64,
        chunk: &[(BlockId, LogAddress)],
    ) -> Result<(), LogError> {
        let mut at = SUMMARY_BYTES;
        for (b, a) in chunk {
            self.open[at..at + 8].copy_from_slice(&b.to_le_bytes());
            self.open[at + 8..at + 16].copy_from_slice(&a.segment.to_le_bytes());
            self.open[at + 16..at + 20].copy_from_slice(&a.offset.to_le_bytes());
            self.open[at + 20..at + 24].copy_from_slice(&a.len.to_le_bytes());
            at += IMAP_ENTRY_BYTES;
        }
        self.cursor = at;
        self.seal(1, part, parts, upto)
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
        for (seg, (s, _)) in decoded.iter().rev() {
            if s.kind != 1 || s.part + 1 != s.parts {
                continue;
            }
            // Its parts are the `parts` checkpoint segments ending here.
            let first = seg - (s.parts as u64 - 1);
            let ids: Vec<u64> = (first..=*seg).collect();
            let complete = ids.iter().enumerate().all(|(p, id)| {
                decoded
                    .get(id)
                    .is_some_and(|(x, _)| x.kind == 1 && x.part == p as u32 && x.parts == s.parts)
            });
            if complete {
                start_after = s.upto;
                best = Some((*seg, ids));
                break;
            }
        }
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
                    let addr = LogAddress {
                        segment: u64_at(at + 8),
                        offset: u32_at(at + 16),
                        len: u32_at(at + 20),
                    };
                    log.set_address(u64_at(at), addr);
                }
            }
        }
        // Roll forward.
        for (seg, (s, _)) in decoded.range(start_after + 1..) {
            if s.kind == 0 {
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
