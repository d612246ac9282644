//! The read path: a block read from its log address, a fragment from its server or rebuilt
//! from the others and parity (degraded reads); segment readers.

use super::*;

impl<S: FragmentStore + Send> Log<S> {
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

    /// Read bytes at a log address: from the fragment cache; else, if no read took a
    /// range of its fragment lately ([`RANGED_SEEN`]), only those bytes from the
    /// fragment's server; else (or if that fails) the whole fragment from its server
    /// (rebuilt from the others if needed), kept in the cache.
    pub fn read_at(&mut self, a: LogAddress) -> Result<Vec<u8>, LogError> {
        let f = self.fragment_bytes;
        let id = FragmentId {
            segment: a.segment,
            index: (a.offset as usize / f) as u16,
        };
        let inner = a.offset as usize % f;
        let end = inner + a.len as usize;
        let slice = |frag: &[u8]| {
            frag.get(inner..end)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| LogError::Unrecoverable {
                    segment: a.segment,
                    have: 0,
                    need: 1,
                    why: format!("address {a:?} lies outside its fragment"),
                })
        };
        if let Some((_, frag)) = self.fragment_cache.iter().find(|(k, _)| *k == id) {
            self.counters.fragment_cache_hits += 1;
            return slice(frag);
        }
        match self.ranged_seen.iter().position(|k| *k == id) {
            Some(at) => {
                self.ranged_seen.remove(at);
            }
            None => {
                let ranged = self.stores[id.index as usize]
                    .as_mut()
                    .map(|s| s.read_range(id, inner, a.len as usize));
                if let Some(Ok(d)) = ranged {
                    self.counters.fragment_range_reads += 1;
                    if self.ranged_seen.len() >= RANGED_SEEN {
                        self.ranged_seen.pop_front();
                    }
                    self.ranged_seen.push_back(id);
                    return Ok(d);
                }
            }
        }
        let frag = self.fragment(a.segment, id.index as usize)?;
        self.counters.fragment_fetches += 1;
        let out = slice(&frag);
        if self.fragment_cache.len() >= FRAGMENT_CACHE {
            self.fragment_cache.pop_front();
        }
        self.fragment_cache.push_back((id, frag));
        out
    }

    /// Drop the fragments kept for block reads: the next read of each asks its server
    /// again (and so finds a fragment damaged on its server since it was cached).
    pub fn clear_fragment_cache(&mut self) {
        self.fragment_cache.clear();
    }

    /// Fragment `i` of `segment`: from its server, else rebuilt from the others (and
    /// rewritten if the server has it corrupt).
    pub(super) fn fragment(&mut self, segment: u64, i: usize) -> Result<Vec<u8>, LogError> {
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
    pub(super) fn reconstruct(
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

    /// A reader of this log's segments over its own stores (the cleaner reads without
    /// holding the log).
    pub fn reader(&self, stores: Vec<Option<S>>) -> Result<SegmentReader<S>, LogError> {
        SegmentReader::new(self.group.clone(), stores)
    }
}
