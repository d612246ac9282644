//! Space: what segments are live, the cleaner's side (live blocks of a segment, copies that
//! lose to newer writes, relocation), freeing reclaimable segments, and the log's self-
//! check.

use super::*;

impl<S: FragmentStore + Send> Log<S> {
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
                if i.kind == SegmentKind::Data {
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
        let _ = parallel(&mut self.stores, self.store_threads, |_, st| {
            st.delete(&ids).and_then(|_| st.sync())
        });
        for s in &dead {
            self.segs.remove(s);
        }
        self.free_hint += dead.len();
        self.counters.freed += dead.len() as u64;
        dead.len() as u64
    }

    /// The segment-usage table (s-file): every durable data segment of this writer.
    pub fn usage(&self) -> Vec<SegmentUsage> {
        self.segs
            .iter()
            .filter(|(_, i)| i.kind == SegmentKind::Data)
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
        let mut k = LogCheck::default();
        self.check_imap(&mut k, &mut problems);
        let n = self.group.servers.len();
        let segments: Vec<u64> = self.segs.keys().copied().collect();
        for segment in segments {
            k.segments += 1;
            let frags = self.read_fragments(segment);
            for j in self.bad_fragments(&frags) {
                if self.stores[j].is_none() {
                    continue; // a server that is down: the log's own rebuild's business
                }
                let what = if frags[j].is_none() {
                    "unreadable or missing"
                } else {
                    "not the parity of the data fragments"
                };
                let fixed = repair && self.rewrite_fragment(segment, j, n);
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

    /// The imap half of [`Log::check`]: every entry lies in a segment the log holds.
    fn check_imap(&self, k: &mut LogCheck, problems: &mut Vec<String>) {
        let mut held: BTreeSet<u64> = self.segs.keys().copied().collect();
        held.extend(self.queued.iter().map(|s| s.segment));
        held.extend(self.written.iter().map(|s| s.segment));
        held.insert(self.current_segment());
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
    }

    /// Every fragment of `segment`, by server: `None` where it cannot be read (or the
    /// server is down).
    fn read_fragments(&mut self, segment: u64) -> Vec<Option<Vec<u8>>> {
        let mut frags: Vec<Option<Vec<u8>>> = Vec::with_capacity(self.group.servers.len());
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
        frags
    }

    /// The fragments of a segment (`frags`, by server) that are wrong: the parity
    /// fragments that do not match the data, when all data fragments are there (all of
    /// them if parity cannot be computed), else the missing ones.
    fn bad_fragments(&self, frags: &[Option<Vec<u8>>]) -> Vec<usize> {
        let n = self.group.servers.len();
        let data = self.group.data();
        if frags[..data].iter().all(|f| f.is_some()) {
            let d: Vec<&Vec<u8>> = frags[..data].iter().flatten().collect();
            match parity(&self.group, &d) {
                Ok(p) => (data..n)
                    .filter(|j| frags[*j].as_ref() != Some(&p[*j - data]))
                    .collect(),
                Err(_) => (0..n).collect(),
            }
        } else {
            (0..n).filter(|j| frags[*j].is_none()).collect()
        }
    }

    /// Rewrite fragment `j` of `segment` from the others (reconstructing `n` fragments):
    /// whether it was written and synced.
    fn rewrite_fragment(&mut self, segment: u64, j: usize, n: usize) -> bool {
        let id = FragmentId {
            segment,
            index: j as u16,
        };
        self.reconstruct(segment, Some(j), n)
            .ok()
            .and_then(|all| {
                let st = self.stores[j].as_mut()?;
                st.write(&[(id, &all[j])]).ok()?;
                st.sync().ok()
            })
            .is_some()
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
    pub(super) fn pending(&self, block: BlockId) -> bool {
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
    pub(super) fn in_copy_lane<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
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
    pub(super) fn checkpoint_cost_after(&self, entries: usize, segments: usize) -> usize {
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
            .filter(|(_, i)| i.kind == SegmentKind::Data);
        let (mut all, mut dead) = (0, 0);
        for (s, _) in data {
            all += 1;
            dead += usize::from(!self.live.contains_key(s));
        }
        (all, dead)
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
        self.in_copy_lane(|l| l.seal(SegmentKind::Data, 0, 0, 0))?;
        self.drop_superseded_copies();
        if self.copies.is_empty() {
            self.copied_from.clear();
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
        self.copied_from.clear();
        self.sync_written()
    }

    /// Take out of the cleaner's sealed copies every block a writer wrote or deleted after
    /// the cleaner copied it: the imap no longer points where the copy was read from, or a
    /// newer version is on its way. Such a copy, written out, would put the old version
    /// back: at once (the imap follows each segment made durable) and at recovery (the
    /// copy's segment, sealed later, rolls forward after the writer's). A segment left
    /// with no block is not written at all. Returns how many copies were dropped (counted
    /// as writer wins).
    fn drop_superseded_copies(&mut self) -> u64 {
        let mut copies = std::mem::take(&mut self.copies);
        let mut dropped = 0;
        for sealed in &mut copies {
            let before = sealed.blocks.len();
            sealed.blocks.retain(|(b, _)| {
                self.copied_from
                    .get(b)
                    .is_some_and(|from| self.imap.get(b) == Some(from))
                    && !self.written_since(*b)
            });
            if sealed.blocks.len() == before {
                continue;
            }
            dropped += (before - sealed.blocks.len()) as u64;
            // The summary names only the copies kept (the bytes of the others stay, dead).
            match Summary::decode(&sealed.bytes) {
                Some(mut summary) => {
                    summary.entries = sealed
                        .blocks
                        .iter()
                        .map(|(b, a)| (*b, a.offset, a.len))
                        .collect();
                    summary.encode(&mut sealed.bytes[..SUMMARY_BYTES]);
                }
                // Never (it was encoded at the seal); not writing the copies is safe.
                None => {
                    dropped += sealed.blocks.len() as u64;
                    sealed.blocks.clear();
                }
            }
        }
        copies.retain(|s| !s.blocks.is_empty());
        self.copies = copies;
        self.counters.writer_wins += dropped;
        dropped
    }

    /// Whether a writer has a version of `block` that is not durable yet (appended, sealed
    /// or written, not synced): the writers' lane only, not the cleaner's.
    fn written_since(&self, block: BlockId) -> bool {
        self.open_entries.iter().any(|(b, _, _)| *b == block)
            || self
                .queued
                .iter()
                .chain(self.written.iter())
                .any(|s| s.blocks.iter().any(|(b, _)| *b == block))
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
        self.copied_from.insert(block, from);
        self.counters.relocated += 1;
        self.counters.relocated_bytes += data.len() as u64;
        Ok(true)
    }
}
