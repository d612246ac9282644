//! Fragments and the store a storage server keeps them in (DESIGN.md §4, Storage).
//!
//! A *fragment* is one piece of a striped log segment: data or parity, named by
//! [`FragmentId`] (segment, index in the stripe). A [`FragmentStore`] keeps fragments in
//! fixed-size *slots*: a 4 KiB header (magic, id, length, generation, crc32c of the data,
//! crc32c of the header) followed by the data. Every read checks both checksums, so a torn
//! or flipped fragment is reported as [`StoreError::Corrupt`], never returned.
//!
//! Durability is explicit: [`FragmentStore::write`] puts fragments on the device and
//! [`FragmentStore::sync`] makes everything written before it durable; a writer
//! acknowledges only after `sync`. Rewriting a fragment id goes to a new slot with a higher
//! generation (the old one is freed after the new one is written), so a crash in between
//! leaves one or the other, whole. Opening a store scans the headers and rebuilds the
//! index.
//!
//! Two stores: the io_uring one on a file or a raw block device
//! ([`crate::storage::uring::UringStore`]), and [`MemFragmentStore`], in memory, with fault
//! injection (torn writes and lost unsynced writes at a power cut, bit flips, a small
//! capacity for ENOSPC) for the simulation.

use std::collections::BTreeMap;

/// Header bytes before each fragment's data (one 4 KiB sector, for O_DIRECT alignment).
pub const HEADER_BYTES: usize = 4096;
/// The header's magic.
pub const MAGIC: u64 = 0x5846_5346_5241_4731; // "XFSFRAG1"
/// Bytes of the header that are used (the rest is zero).
const HEADER_USED: usize = 48;

/// A fragment's name: its segment and its index in the segment's stripe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragmentId {
    /// Segment number (unique per stripe group).
    pub segment: u64,
    /// Index of the fragment in the stripe (data first, then parity).
    pub index: u16,
}

/// Store errors. Every one names what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No free slot: the device is full (clean or add space).
    #[error("no space left for fragments (ENOSPC): {free} free slots, {needed} needed")]
    NoSpace {
        /// Free slots.
        free: usize,
        /// Slots needed.
        needed: usize,
    },
    /// A fragment larger than a slot.
    #[error("fragment of {len} bytes exceeds the store's fragment size of {max} bytes")]
    TooLarge {
        /// The fragment's length in bytes.
        len: usize,
        /// The store's fragment size in bytes.
        max: usize,
    },
    /// The fragment is not in the store.
    #[error("fragment {0:?} not found")]
    NotFound(FragmentId),
    /// The fragment failed its checksum (torn write or flipped bits): rebuild it from parity.
    #[error("fragment {id:?} is corrupt: {why}")]
    Corrupt {
        /// The fragment.
        id: FragmentId,
        /// What failed.
        why: &'static str,
    },
    /// The device failed.
    #[error("device error on {path}: {source}")]
    Io {
        /// The device or file.
        path: String,
        #[source]
        /// The OS error.
        source: std::io::Error,
    },
    /// The device is not usable as configured.
    #[error("{0}")]
    Config(String),
}

/// `TooLarge` for the first fragment longer than `max`.
pub fn check_sizes(fragments: &[(FragmentId, &[u8])], max: usize) -> Result<(), StoreError> {
    match fragments.iter().find(|(_, d)| d.len() > max) {
        Some((_, d)) => Err(StoreError::TooLarge { len: d.len(), max }),
        None => Ok(()),
    }
}

/// A fragment store.
pub trait FragmentStore {
    /// Largest fragment, in bytes.
    fn fragment_bytes(&self) -> usize;
    /// Slots not in use (a remote store asks its server).
    fn free_slots(&mut self) -> Result<usize, StoreError>;
    /// Put fragments on the device (many at once: the io_uring store keeps them all in
    /// flight). Not durable until [`FragmentStore::sync`]. Fails as a whole with
    /// [`StoreError::NoSpace`] before writing anything if there are not enough free slots.
    fn write(&mut self, fragments: &[(FragmentId, &[u8])]) -> Result<(), StoreError>;
    /// Make everything written so far durable.
    fn sync(&mut self) -> Result<(), StoreError>;
    /// Begin a [`FragmentStore::write`] that [`FragmentStore::finish`] completes, so that
    /// one caller keeps several stores busy at once with no thread each (a remote store
    /// sends its puts and returns). The default writes now.
    fn write_begin(&mut self, fragments: &[(FragmentId, &[u8])]) -> Result<(), StoreError> {
        self.write(fragments)
    }
    /// Begin a [`FragmentStore::sync`] that [`FragmentStore::finish`] completes. The
    /// default syncs now.
    fn sync_begin(&mut self) -> Result<(), StoreError> {
        self.sync()
    }
    /// Wait for what `write_begin` or `sync_begin` started; its outcome.
    fn finish(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Take what arrived for `write_begin` or `sync_begin`, waiting a moment at most:
    /// `Some(outcome)` once it is done, `None` while answers are still due. A caller that
    /// began on several stores turns this over them in rounds until all are done, so
    /// that no store's answers wait unread while another store is slow (a remote server
    /// that is not acknowledged for long writes its client off). The default waits
    /// ([`FragmentStore::finish`]).
    fn try_finish(&mut self) -> Option<Result<(), StoreError>> {
        Some(self.finish())
    }
    /// Read fragments, each checked; one result per id.
    fn read(&mut self, ids: &[FragmentId]) -> Vec<Result<Vec<u8>, StoreError>>;
    /// Read `len` bytes at `offset` of fragment `id`, the whole fragment checked (a remote
    /// store's server checks it and sends only the range). Past the fragment's end: a
    /// [`StoreError::Config`].
    fn read_range(
        &mut self,
        id: FragmentId,
        offset: usize,
        len: usize,
    ) -> Result<Vec<u8>, StoreError> {
        let whole = self
            .read(&[id])
            .pop()
            .unwrap_or(Err(StoreError::NotFound(id)))?;
        fragment_range(&whole, id, offset, len)
    }
    /// Free fragments (durable after the next `sync`). Unknown ids are ignored.
    fn delete(&mut self, ids: &[FragmentId]) -> Result<(), StoreError>;
    /// The fragments held, in id order (a remote store asks its server).
    fn list(&mut self) -> Result<Vec<FragmentId>, StoreError>;
}

/// Bytes `[offset, offset + len)` of fragment `id`'s `data`; a [`StoreError::Config`] if
/// the range lies outside it.
pub fn fragment_range(
    data: &[u8],
    id: FragmentId,
    offset: usize,
    len: usize,
) -> Result<Vec<u8>, StoreError> {
    data.get(offset..offset.saturating_add(len))
        .map(<[u8]>::to_vec)
        .ok_or_else(|| StoreError::Config(format!("range {offset}+{len} outside {id:?}")))
}

/// A decoded slot header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Which fragment.
    pub id: FragmentId,
    /// Data length.
    pub len: u32,
    /// Higher wins when two slots hold the same id (a rewrite interrupted by a crash).
    pub generation: u64,
    /// crc32c of the data.
    pub data_crc: u32,
}

impl Header {
    /// The header of `data` as fragment `id`, generation `generation`.
    pub fn new(id: FragmentId, data: &[u8], generation: u64) -> Header {
        Header {
            id,
            len: data.len() as u32,
            generation,
            data_crc: crc32c::crc32c(data),
        }
    }

    /// Encode into the first bytes of `out` (which must be at least [`HEADER_BYTES`]).
    pub fn encode(&self, out: &mut [u8]) {
        out[..HEADER_BYTES].fill(0);
        out[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        out[8..16].copy_from_slice(&self.id.segment.to_le_bytes());
        out[16..18].copy_from_slice(&self.id.index.to_le_bytes());
        out[20..24].copy_from_slice(&self.len.to_le_bytes());
        out[24..32].copy_from_slice(&self.generation.to_le_bytes());
        out[32..36].copy_from_slice(&self.data_crc.to_le_bytes());
        let crc = crc32c::crc32c(&out[..40]);
        out[40..44].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decode a header sector: `Ok(None)` for an empty (never written or deleted) slot,
    /// `Err` for a damaged header.
    pub fn decode(b: &[u8]) -> Result<Option<Header>, &'static str> {
        if b.len() < HEADER_USED {
            return Err("short header");
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or([0; 4]));
        if u64_at(0) != MAGIC {
            return if b[..HEADER_USED].iter().all(|x| *x == 0) {
                Ok(None)
            } else {
                Err("bad magic")
            };
        }
        if crc32c::crc32c(&b[..40]) != u32_at(40) {
            return Err("header checksum mismatch");
        }
        Ok(Some(Header {
            id: FragmentId {
                segment: u64_at(8),
                index: u16::from_le_bytes([b[16], b[17]]),
            },
            len: u32_at(20),
            generation: u64_at(24),
            data_crc: u32_at(32),
        }))
    }

    /// Check `data` against this header.
    pub fn check(&self, id: FragmentId, data: &[u8]) -> Result<(), StoreError> {
        if self.id != id {
            return Err(StoreError::Corrupt {
                id,
                why: "slot holds another fragment",
            });
        }
        if data.len() != self.len as usize || crc32c::crc32c(data) != self.data_crc {
            return Err(StoreError::Corrupt {
                id,
                why: "data checksum mismatch",
            });
        }
        Ok(())
    }
}

/// Which slot holds each fragment, and which slots are free: the in-memory index both
/// stores keep, rebuilt from the headers when a store opens.
#[derive(Clone, Debug, Default)]
pub struct SlotIndex {
    /// Fragment → (slot, generation).
    pub map: BTreeMap<FragmentId, (usize, u64)>,
    /// Free slots, lowest first.
    pub free: std::collections::BTreeSet<usize>,
    /// The next generation to write.
    pub next_generation: u64,
    /// Slots given up (a fragment rewritten elsewhere, or deleted) that may be reused only
    /// once that is durable: until the next sync a power cut may bring them back.
    pub retired: Vec<usize>,
}

impl SlotIndex {
    /// All `slots` free.
    pub fn empty(slots: usize) -> SlotIndex {
        SlotIndex {
            map: BTreeMap::new(),
            free: (0..slots).collect(),
            next_generation: 1,
            retired: Vec::new(),
        }
    }

    /// The write of everything before is durable: retired slots become free.
    pub fn synced(&mut self) {
        self.free.extend(self.retired.drain(..));
    }

    /// Rebuild from each slot's header (`None`: empty or unreadable). When two slots hold
    /// the same fragment (a rewrite cut short by a crash) the higher generation wins if
    /// `intact(slot)` says its data checks out, else the older one does. Returns the slots
    /// given up.
    pub fn rebuild(
        headers: impl Iterator<Item = (usize, Option<Header>)>,
        mut intact: impl FnMut(usize) -> bool,
    ) -> (SlotIndex, Vec<usize>) {
        let mut idx = SlotIndex {
            next_generation: 1,
            ..SlotIndex::default()
        };
        let mut stale = Vec::new();
        for (slot, h) in headers {
            let Some(h) = h else {
                idx.free.insert(slot);
                continue;
            };
            idx.next_generation = idx.next_generation.max(h.generation + 1);
            let keep_new = match idx.map.get(&h.id) {
                None => true,
                Some((old, g)) => {
                    let (newer, older) = if h.generation > *g {
                        (slot, *old)
                    } else {
                        (*old, slot)
                    };
                    let winner = if intact(newer) { newer } else { older };
                    let loser = if winner == slot { *old } else { slot };
                    stale.push(loser);
                    idx.free.insert(loser);
                    winner == slot
                }
            };
            if keep_new {
                idx.map.insert(h.id, (slot, h.generation));
            }
        }
        (idx, stale)
    }

    /// Take `n` free slots (lowest first), or `NoSpace`.
    pub fn take(&mut self, n: usize) -> Result<Vec<usize>, StoreError> {
        if self.free.len() < n {
            return Err(StoreError::NoSpace {
                free: self.free.len(),
                needed: n,
            });
        }
        let v: Vec<usize> = self.free.iter().take(n).copied().collect();
        for s in &v {
            self.free.remove(s);
        }
        Ok(v)
    }

    /// Slots and generations for `n` new fragment writes, or `NoSpace` (nothing taken).
    pub fn reserve(&mut self, n: usize) -> Result<Vec<(usize, u64)>, StoreError> {
        let slots = self.take(n)?;
        let first = self.next_generation;
        self.next_generation += n as u64;
        Ok(slots.into_iter().zip(first..).collect())
    }

    /// Fragment `id` is written in `slot`: an older copy's slot is retired (reused after the
    /// next sync; until then a reboot prefers the higher generation).
    pub fn place(&mut self, id: FragmentId, slot: usize, generation: u64) {
        if let Some((old, _)) = self.map.insert(id, (slot, generation)) {
            self.retired.push(old);
        }
    }

    /// Forget fragment `id`; its slot is retired. Returns the slot.
    pub fn remove(&mut self, id: FragmentId) -> Option<usize> {
        let (slot, _) = self.map.remove(&id)?;
        self.retired.push(slot);
        Some(slot)
    }
}

/// Faults the in-memory store injects, and counts.
#[derive(Clone, Debug, Default)]
pub struct FaultCounters {
    /// Unsynced writes dropped at a power cut.
    pub dropped: u64,
    /// Unsynced writes torn (partly written) at a power cut.
    pub torn: u64,
    /// Bits flipped on request.
    pub flipped: u64,
}

/// One slot of the in-memory store: header and data bytes as they would be on a device.
#[derive(Clone, Debug)]
struct MemSlot {
    header: Vec<u8>,
    data: Vec<u8>,
}

/// An in-memory [`FragmentStore`] with fault injection, for the simulation and the
/// crash-consistency tests. Slots written since the last `sync` are *volatile*: a
/// [`MemFragmentStore::power_cut`] drops or tears them.
#[derive(Clone, Debug)]
pub struct MemFragmentStore {
    fragment_bytes: usize,
    durable: Vec<Option<MemSlot>>,
    volatile: BTreeMap<usize, Option<MemSlot>>,
    index: SlotIndex,
    /// Faults injected so far.
    pub faults: FaultCounters,
}

impl MemFragmentStore {
    /// `slots` slots of `fragment_bytes` each.
    pub fn new(slots: usize, fragment_bytes: usize) -> MemFragmentStore {
        MemFragmentStore {
            fragment_bytes,
            durable: vec![None; slots],
            volatile: BTreeMap::new(),
            index: SlotIndex::empty(slots),
            faults: FaultCounters::default(),
        }
    }

    /// Slots in all (the device's size in fragments).
    pub fn slots(&self) -> usize {
        self.durable.len()
    }

    fn slot(&self, s: usize) -> Option<&MemSlot> {
        match self.volatile.get(&s) {
            Some(v) => v.as_ref(),
            None => self.durable.get(s).and_then(|x| x.as_ref()),
        }
    }

    /// Power cut: every unsynced slot write is lost, or (chosen by `rng`, 1 in 3) torn: its
    /// header lands and only part of its data. Then the store "reboots": the index is
    /// rebuilt from what is durable, as opening a device would.
    pub fn power_cut(&mut self, rng: &mut impl FnMut() -> u64) {
        let pending = std::mem::take(&mut self.volatile);
        for (s, w) in pending {
            match w {
                Some(mut slot) if rng().is_multiple_of(3) => {
                    let keep = (rng() as usize) % slot.data.len().max(1);
                    // The old bytes past the tear: whatever the slot held before.
                    let old = self.durable[s].take().map(|o| o.data).unwrap_or_default();
                    for (i, b) in slot.data.iter_mut().enumerate().skip(keep) {
                        *b = old.get(i).copied().unwrap_or(0) ^ 0x5a;
                    }
                    self.faults.torn += 1;
                    self.durable[s] = Some(slot);
                }
                _ => self.faults.dropped += 1,
            }
        }
        self.reopen();
    }

    /// Rebuild the index from the durable slots (what opening the store does).
    pub fn reopen(&mut self) {
        let headers: Vec<(usize, Option<Header>)> = self
            .durable
            .iter()
            .enumerate()
            .map(|(i, s)| {
                (
                    i,
                    s.as_ref()
                        .and_then(|s| Header::decode(&s.header).ok().flatten()),
                )
            })
            .collect();
        let durable = &self.durable;
        let intact = |s: usize| {
            durable[s].as_ref().is_some_and(|slot| {
                Header::decode(&slot.header)
                    .ok()
                    .flatten()
                    .is_some_and(|h| h.check(h.id, &slot.data).is_ok())
            })
        };
        let (idx, stale) = SlotIndex::rebuild(headers.into_iter(), intact);
        for s in stale {
            self.durable[s] = None;
        }
        self.index = idx;
    }

    /// Flip one bit of a fragment's data (a latent media error). False if not present.
    pub fn flip_bit(&mut self, id: FragmentId, bit: usize) -> bool {
        let Some((s, _)) = self.index.map.get(&id).copied() else {
            return false;
        };
        let slot = match self.volatile.get_mut(&s) {
            Some(Some(v)) => v,
            _ => match self.durable.get_mut(s) {
                Some(Some(v)) => v,
                _ => return false,
            },
        };
        if slot.data.is_empty() {
            return false;
        }
        let bit = bit % (slot.data.len() * 8);
        slot.data[bit / 8] ^= 1 << (bit % 8);
        self.faults.flipped += 1;
        true
    }
}

impl FragmentStore for MemFragmentStore {
    fn fragment_bytes(&self) -> usize {
        self.fragment_bytes
    }

    fn free_slots(&mut self) -> Result<usize, StoreError> {
        Ok(self.index.free.len())
    }

    fn write(&mut self, fragments: &[(FragmentId, &[u8])]) -> Result<(), StoreError> {
        check_sizes(fragments, self.fragment_bytes)?;
        let reserved = self.index.reserve(fragments.len())?;
        for ((id, data), (s, generation)) in fragments.iter().zip(reserved) {
            let mut header = vec![0u8; HEADER_BYTES];
            Header::new(*id, data, generation).encode(&mut header);
            self.volatile.insert(
                s,
                Some(MemSlot {
                    header,
                    data: data.to_vec(),
                }),
            );
            self.index.place(*id, s, generation);
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        for (s, w) in std::mem::take(&mut self.volatile) {
            self.durable[s] = w;
        }
        self.index.synced();
        Ok(())
    }

    fn read(&mut self, ids: &[FragmentId]) -> Vec<Result<Vec<u8>, StoreError>> {
        ids.iter()
            .map(|id| {
                let (s, _) = self
                    .index
                    .map
                    .get(id)
                    .copied()
                    .ok_or(StoreError::NotFound(*id))?;
                let slot = self.slot(s).ok_or(StoreError::NotFound(*id))?;
                let h = Header::decode(&slot.header)
                    .map_err(|why| StoreError::Corrupt { id: *id, why })?
                    .ok_or(StoreError::NotFound(*id))?;
                h.check(*id, &slot.data)?;
                Ok(slot.data.clone())
            })
            .collect()
    }

    fn delete(&mut self, ids: &[FragmentId]) -> Result<(), StoreError> {
        for id in ids {
            if let Some(s) = self.index.remove(*id) {
                self.volatile.insert(s, None);
            }
        }
        Ok(())
    }

    fn list(&mut self) -> Result<Vec<FragmentId>, StoreError> {
        Ok(self.index.map.keys().copied().collect())
    }
}

/// One store shared by several users (a log and the cleaner's segment reader in one
/// process): every call takes the lock.
pub struct SharedStore<S>(pub std::sync::Arc<std::sync::Mutex<S>>);

impl<S> Clone for SharedStore<S> {
    fn clone(&self) -> Self {
        SharedStore(self.0.clone())
    }
}

impl<S: FragmentStore> SharedStore<S> {
    fn with<R>(&self, f: impl FnOnce(&mut S) -> R) -> R {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl<S: FragmentStore> FragmentStore for SharedStore<S> {
    fn fragment_bytes(&self) -> usize {
        self.with(|s| s.fragment_bytes())
    }
    fn free_slots(&mut self) -> Result<usize, StoreError> {
        self.with(|s| s.free_slots())
    }
    fn write(&mut self, fragments: &[(FragmentId, &[u8])]) -> Result<(), StoreError> {
        self.with(|s| s.write(fragments))
    }
    fn sync(&mut self) -> Result<(), StoreError> {
        self.with(|s| s.sync())
    }
    fn write_begin(&mut self, fragments: &[(FragmentId, &[u8])]) -> Result<(), StoreError> {
        self.with(|s| s.write_begin(fragments))
    }
    fn sync_begin(&mut self) -> Result<(), StoreError> {
        self.with(|s| s.sync_begin())
    }
    fn finish(&mut self) -> Result<(), StoreError> {
        self.with(|s| s.finish())
    }
    fn try_finish(&mut self) -> Option<Result<(), StoreError>> {
        self.with(|s| s.try_finish())
    }
    fn read(&mut self, ids: &[FragmentId]) -> Vec<Result<Vec<u8>, StoreError>> {
        self.with(|s| s.read(ids))
    }
    fn read_range(
        &mut self,
        id: FragmentId,
        offset: usize,
        len: usize,
    ) -> Result<Vec<u8>, StoreError> {
        self.with(|s| s.read_range(id, offset, len))
    }
    fn delete(&mut self, ids: &[FragmentId]) -> Result<(), StoreError> {
        self.with(|s| s.delete(ids))
    }
    fn list(&mut self) -> Result<Vec<FragmentId>, StoreError> {
        self.with(|s| s.list())
    }
}
