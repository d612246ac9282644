//! The write path: blocks appended to the open segment, segments sealed with their summary,
//! striped as fragments with parity and written to the stripe group; fsync; the reserve
//! that keeps room for checkpoints and the cleaner on a full group.

use super::*;

/// One server's fragments of a batch of segments.
type ServerBatch = Vec<(FragmentId, Vec<u8>)>;

impl<S: FragmentStore + Send> Log<S> {
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
            self.seal(SegmentKind::Data, 0, 0, 0)?;
            at = SUMMARY_BYTES;
        }
        self.open[at..at + data.len()].copy_from_slice(data);
        self.open_entries
            .push((block, at as u32, data.len() as u32));
        self.cursor = at + data.len();
        Ok(())
    }

    /// Seal the open segment (if it has anything) and queue its fragments.
    pub(super) fn seal(
        &mut self,
        kind: SegmentKind,
        part: u32,
        parts: u32,
        upto: u64,
    ) -> Result<(), LogError> {
        if kind == SegmentKind::Data && self.open_entries.is_empty() {
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
            entries: if kind == SegmentKind::Data {
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
    pub(super) fn fragments(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>, LogError> {
        let data: Vec<&[u8]> = bytes.chunks(self.fragment_bytes).collect();
        let mut all: Vec<Vec<u8>> = data.iter().map(|d| d.to_vec()).collect();
        all.extend(self.parity(&data)?);
        Ok(all)
    }

    /// The parity fragments of a segment's data fragments.
    pub(super) fn parity<T: AsRef<[u8]>>(&self, data: &[T]) -> Result<Vec<Vec<u8>>, LogError> {
        parity(&self.group, data)
    }

    /// Write the queued segments: one batch per server, all in flight together.
    pub(super) fn write_queued(&mut self) -> Result<(), LogError> {
        self.write_range(0, false)
    }

    /// Free segments kept for the cleaner (its copies of a round's live blocks and the
    /// checkpoint through which it frees space), once `segments` more segments holding `entries` more blocks are
    /// durable: their imap entries and usage-table rows grow the next checkpoint. One
    /// checkpoint (and two segments of slack) per writer sharing the stores, and the
    /// cleaner's copies.
    pub(super) fn reserve_after(&self, entries: usize, segments: usize) -> usize {
        self.writers * (self.checkpoint_cost_after(entries, segments) + 2) + CLEANER_RESERVE
    }

    /// Room a batch that frees more than it adds may not go below: every writer's
    /// checkpoint (through which its deletions free space), without the cleaner's copies.
    pub(super) fn freeing_floor(&self, entries: usize, segments: usize) -> usize {
        self.writers * (self.checkpoint_cost_after(entries, segments) + 2)
    }

    /// Imap entries `queued[from..]` adds once durable: blocks it writes that the imap
    /// does not hold yet (a deletion or an overwrite adds none).
    pub(super) fn imap_growth(&self, from: usize) -> usize {
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
    pub(super) fn net_freed(&self, from: usize) -> i64 {
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
    pub(super) fn drop_superseded(&mut self) -> usize {
        let mut newer: std::collections::BTreeSet<BlockId> =
            self.open_entries.iter().map(|(b, _, _)| *b).collect();
        let mut keep = vec![true; self.queued.len()];
        for (i, s) in self.queued.iter().enumerate().rev() {
            if s.kind == SegmentKind::Data
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
    pub(super) fn write_range(&mut self, from: usize, use_reserve: bool) -> Result<(), LogError> {
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
            self.check_room(from, batch)?;
        }
        let up = self.stores.iter().filter(|s| s.is_some()).count();
        if up < self.group.data() {
            return Err(LogError::Unrecoverable {
                segment: self.queued[0].segment,
                have: up,
                need: self.group.data(),
                why: "too many servers of the stripe group are down to write".into(),
            });
        }
        let per_server = self.stripe(from)?;
        // Every server at once (a remote server's round trips, a local device's queue):
        // the segment is as slow as its slowest server, not their sum. A small batch (an
        // fsync's) from this thread; a large one with a thread per server.
        let refs = |i: usize| -> Vec<(FragmentId, &[u8])> {
            per_server[i]
                .iter()
                .map(|(id, d)| (*id, d.as_slice()))
                .collect()
        };
        let results = if per_server.iter().all(|b| b.len() <= AT_ONCE_FRAGMENTS) {
            at_once(&mut self.stores, |i, store| store.write_begin(&refs(i)))
        } else {
            parallel(&mut self.stores, self.store_threads, |i, store| {
                store.write(&refs(i))
            })
        };
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

    /// ENOSPC (and the log marked full) unless the stores have room for the `batch` data
    /// segments `queued[from..]` beyond the reserve (less, for a batch that frees more
    /// than it adds).
    fn check_room(&mut self, from: usize, batch: usize) -> Result<(), LogError> {
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
        Ok(())
    }

    /// The fragments of `queued[from..]` (data, then parity), by server.
    fn stripe(&self, from: usize) -> Result<Vec<ServerBatch>, LogError> {
        let mut per_server: Vec<ServerBatch> = vec![Vec::new(); self.group.servers.len()];
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
        Ok(per_server)
    }

    /// Sync every server, then apply what was written: the imap, live bytes, the table
    /// of segments.
    pub(super) fn sync_written(&mut self) -> Result<(), LogError> {
        let segment = self.written.first().map_or(0, |w| w.segment);
        let results = at_once(&mut self.stores, |_, s| s.sync_begin());
        self.settle(results, segment)?;
        for sealed in std::mem::take(&mut self.written) {
            self.segs.insert(
                sealed.segment,
                SegInfo {
                    kind: sealed.kind,
                    time: sealed.time,
                },
            );
            if sealed.kind == SegmentKind::Data {
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
        self.seal(SegmentKind::Data, 0, 0, 0)?;
        self.write_queued()
    }

    /// Make every block written so far durable on the stripe group: seal, write, sync every
    /// server, then update the imap. On an error nothing is acknowledged and the blocks
    /// stay queued, to be retried.
    pub fn fsync(&mut self) -> Result<(), LogError> {
        self.seal(SegmentKind::Data, 0, 0, 0)?;
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
    pub(super) fn drain_freeing(&mut self) -> Result<(), LogError> {
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
    pub(super) fn settle(
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
    pub(super) fn set_address(&mut self, block: BlockId, addr: LogAddress) {
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
}
