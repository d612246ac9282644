//! Checkpoints (the imap and segment usage, written as segments of their own) and recovery:
//! the newest complete checkpoint, then roll-forward over the summaries of the segments
//! written after it; a lost server's fragments rebuilt from parity.

use super::*;

impl<S: FragmentStore + Send> Log<S> {
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
    pub(super) fn write_checkpoint(&mut self) -> Result<(), LogError> {
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
            self.write_part(SegmentKind::Checkpoint, 0, 1, upto, &[])?;
        }
        for (part, chunk) in entries.chunks(per).enumerate() {
            self.write_part(SegmentKind::Checkpoint, part as u32, parts, upto, chunk)?;
        }
        // Only the checkpoint's segments (data still waiting keeps its place in the queue;
        // it is newer than `upto`, so recovery rolls it forward once it is written).
        let from = self
            .queued
            .iter()
            .position(|s| s.kind == SegmentKind::Checkpoint)
            .unwrap_or(self.queued.len());
        self.write_range(from, true)?;
        self.sync_written()?;
        self.checkpoint_segs = (first..first + parts as u64).collect();
        self.checkpoint_upto = upto;
        self.counters.checkpoints += 1;
        self.free_reclaimable();
        Ok(())
    }

    pub(super) fn write_part(
        &mut self,
        kind: SegmentKind,
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

    /// The newest data segment up to which every data segment is durable: a data segment
    /// still waiting (the stores were full) may be older than a durable copy of the
    /// cleaner's. A checkpoint covers up to here, so only segments up to here can be freed.
    pub fn durable_upto(&self) -> u64 {
        let waiting = self
            .queued
            .iter()
            .chain(self.written.iter())
            .filter(|s| s.kind == SegmentKind::Data)
            .map(|s| s.segment)
            .min();
        waiting.map_or(self.last_data_segment, |w| {
            self.last_data_segment.min(w.saturating_sub(1))
        })
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
        let segments = log.listed_segments();
        // Decode every segment's bytes once (recovery reads the whole log of this writer).
        let decoded = log.decode_segments(&segments);
        let best = newest_checkpoint(&decoded);
        let start_after = best.as_ref().map_or(0, |(_, upto)| *upto);
        let times = match &best {
            Some((ids, _)) => log.load_checkpoint(&decoded, ids),
            None => BTreeMap::new(),
        };
        log.note_segments(&segments, &decoded, &times);
        if let Some((ids, upto)) = best {
            log.checkpoint_segs = ids;
            log.checkpoint_upto = upto;
        }
        log.roll_forward(&decoded, start_after);
        if let Some(max) = segments.iter().next_back() {
            log.next_seq = (max & ((1 << 40) - 1)) + 1;
        }
        log.last_data_segment = log.last_data_segment.max(start_after);
        Ok(log)
    }

    /// This writer's segments on the servers that answer.
    fn listed_segments(&mut self) -> BTreeSet<u64> {
        let lo = segment_number(self.writer, 0);
        let hi = segment_number(self.writer, (1 << 40) - 1);
        let mut segments = BTreeSet::new();
        for s in self.stores.iter_mut().flatten() {
            // A server that cannot list is treated as down for recovery; parity covers it.
            if let Ok(list) = s.list() {
                segments.extend(
                    list.into_iter()
                        .map(|f| f.segment)
                        .filter(|s| (lo..=hi).contains(s)),
                );
            }
        }
        segments
    }

    /// Each segment's summary and bytes; one that does not decode is counted and left out.
    fn decode_segments(&mut self, segments: &BTreeSet<u64>) -> BTreeMap<u64, (Summary, Vec<u8>)> {
        let mut decoded = BTreeMap::new();
        for seg in segments {
            match self.reconstruct(*seg, None, 0) {
                Ok(frags) => {
                    let k = self.group.data();
                    let bytes: Vec<u8> = frags[..k].concat();
                    match Summary::decode(&bytes) {
                        Some(s) if s.segment == *seg => {
                            decoded.insert(*seg, (s, bytes));
                        }
                        _ => self.counters.undecodable += 1,
                    }
                }
                Err(_) => self.counters.undecodable += 1,
            }
        }
        decoded
    }

    /// Set the imap from a checkpoint's segments `ids`; returns the seal times its s-file
    /// records, by segment.
    fn load_checkpoint(
        &mut self,
        decoded: &BTreeMap<u64, (Summary, Vec<u8>)>,
        ids: &[u64],
    ) -> BTreeMap<u64, u64> {
        let mut times = BTreeMap::new();
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
                self.set_address(u64_at(at), addr);
            }
        }
        times
    }

    /// Every segment this writer has on the servers, for freeing and the cleaner (an
    /// undecodable one counts as a dead data segment: freed once a checkpoint covers it).
    fn note_segments(
        &mut self,
        segments: &BTreeSet<u64>,
        decoded: &BTreeMap<u64, (Summary, Vec<u8>)>,
        times: &BTreeMap<u64, u64>,
    ) {
        for seg in segments {
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
                    kind: SegmentKind::Data,
                    time: 0,
                },
            };
            self.segs.insert(*seg, info);
        }
    }

    /// Roll forward: the blocks of the data segments after `start_after`, in order.
    fn roll_forward(&mut self, decoded: &BTreeMap<u64, (Summary, Vec<u8>)>, start_after: u64) {
        for (seg, (s, _)) in decoded.range(start_after + 1..) {
            if s.kind == SegmentKind::Data {
                for (b, off, len) in &s.entries {
                    self.set_address(
                        *b,
                        LogAddress {
                            segment: *seg,
                            offset: *off,
                            len: *len,
                        },
                    );
                }
                self.last_data_segment = *seg;
            }
        }
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

    pub(super) fn flush_rebuild(
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

/// The newest checkpoint whose parts are all there: its segments, and the data segment
/// it covers up to.
fn newest_checkpoint(decoded: &BTreeMap<u64, (Summary, Vec<u8>)>) -> Option<(Vec<u64>, u64)> {
    let is_checkpoint = |k: SegmentKind| k == SegmentKind::Checkpoint;
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
            return Some((ids, s.upto));
        }
    }
    None
}
