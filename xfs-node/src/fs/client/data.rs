//! File data and attributes: reads, writes, truncation, setattr, fsync and the periodic
//! write-back of dirty files, statfs.

use super::*;

impl<B: Blocks> FsClient<B> {
    /// `setattr`. A size change holds the inode block (private and pinned) from the
    /// size it starts from to the size it sets, so no other node's write or append
    /// interleaves with the truncation (see [`FsClient::write`]).
    pub fn setattr(&self, ino: u64, a: &SetAttr) -> Result<Inode, Errno> {
        if a.size.is_some() {
            self.holding(&[inode_block(ino)], || self.setattr_now(ino, a))?;
            return self.getattr(ino);
        }
        self.setattr_now(ino, a)?;
        self.getattr(ino)
    }

    fn setattr_now(&self, ino: u64, a: &SetAttr) -> Result<(), Errno> {
        let i = self.getattr(ino)?;
        let now = self.blocks.now();
        let mut ops = Vec::new();
        if let Some(m) = a.mode {
            ops.push(set(field::MODE, ((i.mode & !0o7777) | (m & 0o7777)) as u64));
        }
        if let Some(u) = a.uid {
            ops.push(set(field::UID, u as u64));
        }
        if let Some(g) = a.gid {
            ops.push(set(field::GID, g as u64));
        }
        if let Some(t) = a.atime {
            ops.push(set(field::ATIME, t));
        }
        if let Some(t) = a.mtime {
            ops.push(set(field::MTIME, t));
        }
        if let Some(size) = a.size {
            if i.kind == Some(Kind::Dir) {
                return Err(Errno::EISDIR);
            }
            if i.kind != Some(Kind::File) {
                return Err(Errno::EINVAL);
            }
            if size > MAX_FILE {
                return Err(Errno::EFBIG);
            }
            self.truncate_blocks(&i, size)?;
            if size < i.size {
                // A write on another node between its data and its size starts again.
                ops.push(Op::Add {
                    offset: field::TRUNCATIONS,
                    delta: 1,
                });
            }
            ops.push(set(field::SIZE, size));
            ops.push(Op::Trim {
                from: size.div_ceil(BLOCK as u64),
            });
            if a.mtime.is_none() {
                ops.push(set(field::MTIME, now));
            }
        }
        ops.push(set(field::CTIME, a.ctime.unwrap_or(now)));
        self.update(inode_block(ino), &ops).map(drop)
    }

    /// Zero what lies past `new` up to the old size (bytes past the size are always
    /// zero); only the blocks the inode's extents say may hold data.
    pub(super) fn truncate_blocks(&self, i: &Inode, new: u64) -> Result<(), Errno> {
        self.run_writes(self.truncate_ops(i, new))
    }

    /// The block operations of a truncate of `i` to `new` bytes (see
    /// [`FsClient::truncate_blocks`]).
    pub(super) fn truncate_ops(&self, i: &Inode, new: u64) -> Vec<(BlockId, UserOp<Vec<u8>>)> {
        let (ino, old) = (i.ino, i.size);
        let mut ops: Vec<(BlockId, UserOp<Vec<u8>>)> = Vec::new();
        if new >= old {
            return ops;
        }
        let bs = BLOCK as u64;
        let first_whole = new.div_ceil(bs);
        let end = old.div_ceil(bs);
        let may_hold = |b: u64| i.extents.iter().any(|(s, e)| *s <= b && b < *e);
        if !new.is_multiple_of(bs) && may_hold(new / bs) {
            ops.push((
                block_id(ino, new / bs),
                UserOp::Update(encode_patch(&[Op::Resize {
                    len: (new % bs) as u32,
                }])),
            ));
        }
        for (s, e) in &i.extents {
            for b in (*s).max(first_whole)..(*e).min(end) {
                ops.push((block_id(ino, b), UserOp::Write(Vec::new())));
            }
        }
        ops
    }

    /// Run `ops` (writes and updates, noted dirty) in batches of at most
    /// [`WRITE_BATCH`], in order: each batch completes before the next starts.
    pub(super) fn run_writes(&self, mut ops: Vec<(BlockId, UserOp<Vec<u8>>)>) -> Result<(), Errno> {
        for (b, _) in &ops {
            self.note_dirty(*b);
        }
        while !ops.is_empty() {
            let rest = ops.split_off(ops.len().min(WRITE_BATCH));
            for r in self.blocks.run(ops) {
                r?;
            }
            ops = rest;
        }
        Ok(())
    }

    /// Read-ahead: a read of at least [`READ_AHEAD_TRIGGER`] bytes that starts at the
    /// file's start or where this file's last such read ended (a file read in order; the
    /// last end is kept per file in a small table, [`READ_AHEAD_FILES`] slots, a hint)
    /// asks for the blocks up to [`READ_AHEAD`] past its end that were not asked for yet,
    /// without waiting, in steps of a quarter window at least: their misses run together
    /// while the kernel copies this read. Within the size the inode said. A random read,
    /// however large, asks for nothing.
    fn read_ahead(&self, i: &Inode, offset: u64, len: usize) {
        let w = READ_AHEAD as u64;
        let end = offset + len as u64;
        if len < READ_AHEAD_TRIGGER || i.kind != Some(Kind::File) || end >= i.size {
            return;
        }
        let slot = &self.read_ahead[(i.ino % READ_AHEAD_FILES as u64) as usize];
        let same = slot.ino.swap(i.ino, Ordering::Relaxed) == i.ino;
        let last_end = slot.next.swap(end, Ordering::Relaxed);
        if offset != 0 && !(same && offset == last_end) {
            return;
        }
        // Asked for up to `ahead` already (unless that lies beyond this window: a new pass
        // from the start).
        let ahead = if same {
            slot.ahead.load(Ordering::Relaxed)
        } else {
            0
        };
        let from = if ahead > end + w { end } else { end.max(ahead) };
        let to = (end + w).min(i.size);
        if to <= from || (from > end && to - from < w / 4 && to < i.size) {
            return;
        }
        let bs = BLOCK as u64;
        let first = from.div_ceil(bs);
        let blocks: Vec<BlockId> = (first..to.div_ceil(bs))
            .map(|b| block_id(i.ino, b))
            .collect();
        if blocks.is_empty() {
            return;
        }
        let n = blocks.len();
        let taken = self.blocks.prefetch(blocks);
        self.read_ahead_blocks
            .fetch_add(taken as u64, Ordering::Relaxed);
        // Asked for up to where the node took them (the next read asks for the rest).
        let reached = if taken == n {
            to
        } else {
            (first + taken as u64) * bs
        };
        slot.ahead.store(reached.max(end), Ordering::Relaxed);
    }

    /// `read`: up to `len` bytes at `offset` (short at the end of the file).
    ///
    /// The size and the blocks are read one after the other, not at once: a truncate on
    /// any node in between may have cleared blocks inside the size read first, which
    /// would come back as zeros that were never written (NULs under a stale size). So
    /// the inode is read again after the blocks; if a truncation came in between (its
    /// count moved), the read starts again, from the new size. After [`READ_TRIES`] such
    /// losses it reads holding the inode block (no truncation runs meanwhile). A read
    /// within one block that gave exactly the bytes the size says it holds found nothing
    /// cleared (a cleared block is empty, a cut one short) and nothing rewritten (a block
    /// longer than the size was written again after the size was read: a truncate and a
    /// write in between, whose data the old size would cut) and skips the second look. A
    /// read of
    /// several blocks does not: they are read at once, not atomically, so one could come
    /// from before a truncate and another, full again, from a write after it.
    pub fn read(&self, ino: u64, offset: u64, len: usize) -> Result<Vec<u8>, Errno> {
        for _ in 0..READ_TRIES {
            // A truncate on this node holds the inode without making this read wait (a
            // local hold is not a remote revoke): none may start while the read runs.
            let holds = self.holds_of(inode_block(ino));
            let i = self.getattr(ino)?;
            self.read_ahead(&i, offset, len);
            let (out, whole) = self.read_within(&i, offset, len)?;
            if i.kind != Some(Kind::File) || (whole && one_block(offset, len)) {
                return Ok(out);
            }
            let after = self.getattr(ino)?;
            if after.truncations == i.truncations && self.holds_of(inode_block(ino)) == holds {
                return Ok(out);
            }
            self.read_retries.fetch_add(1, Ordering::Relaxed);
        }
        self.holding(&[inode_block(ino)], || {
            let i = self.getattr(ino)?;
            self.read_within(&i, offset, len).map(|(out, _)| out)
        })
    }

    /// How many local holds of `block`'s slot have started, once no hold of `block` is
    /// active (it waits for one to end).
    fn holds_of(&self, block: BlockId) -> u64 {
        let (m, cv) = &self.held;
        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
        if g.active.contains(&block) {
            self.hold_waits.fetch_add(1, Ordering::Relaxed);
        }
        while g.active.contains(&block) {
            g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.started[Held::slot(block)]
    }

    /// The bytes of `[offset, offset + len)` that lie within `i.size`, and whether every
    /// block gave exactly its bytes in that range as the size has them (none was a hole
    /// or cut short, and the block at the end of the file held nothing past the size).
    fn read_within(&self, i: &Inode, offset: u64, len: usize) -> Result<(Vec<u8>, bool), Errno> {
        let ino = i.ino;
        if i.kind == Some(Kind::Dir) {
            return Err(Errno::EISDIR);
        }
        if offset >= i.size || len == 0 {
            return Ok((Vec::new(), true));
        }
        let end = (offset + len as u64).min(i.size);
        let bs = BLOCK as u64;
        let blocks: Vec<u64> = (offset / bs..end.div_ceil(bs)).collect();
        let ops = blocks
            .iter()
            .map(|b| (block_id(ino, *b), UserOp::Read))
            .collect();
        let mut out = vec![0u8; (end - offset) as usize];
        let mut whole = true;
        for (b, r) in blocks.iter().zip(self.blocks.run(ops)) {
            let Outcome::Read(data) = r? else {
                return Err(Errno::EIO);
            };
            // The block's bytes within [offset, end); a block shorter than that (written
            // short, or a hole) leaves zeros.
            let bstart = b * bs;
            let from = offset.max(bstart);
            let to = end.min(bstart + bs);
            let have = data.len().min((to - bstart) as usize);
            whole &= have == (to - bstart) as usize;
            // Bytes past the size in the file's last block: written after the size was
            // read (a write puts its data before its size).
            whole &= !(to == i.size && data.len() > have);
            let skip = (from - bstart) as usize;
            if have > skip {
                let at = (from - offset) as usize;
                out[at..at + have - skip].copy_from_slice(&data[skip..have]);
            }
        }
        Ok((out, whole))
    }

    /// `write`: all of `data` at `offset`; returns the bytes written.
    ///
    /// Not held across the data and the size (unlike `append` and a truncate): a hold on
    /// the inode block made every read on another node wait for the writer while the
    /// writer's revokes waited for that reader's kernel (late invalidations in
    /// `reads_racing_writes_on_another_mount_never_hang`). Instead the size update is
    /// guarded by the file's truncation count read before the data: a truncation on
    /// another node in between (which may have cut the bytes just written) fails the
    /// guard, and the write starts again, after it, as on one machine. After
    /// [`WRITE_TRIES`] such losses it holds the inode block (always progresses).
    pub fn write(&self, ino: u64, offset: u64, data: &[u8]) -> Result<usize, Errno> {
        let end = offset.checked_add(data.len() as u64).ok_or(Errno::EFBIG)?;
        if end > MAX_FILE {
            return Err(Errno::EFBIG);
        }
        if data.is_empty() {
            return match self.getattr(ino)?.kind {
                Some(Kind::Dir) => Err(Errno::EISDIR),
                _ => Ok(0),
            };
        }
        self.wait_for_room()?;
        for _ in 0..WRITE_TRIES {
            if self.write_guarded(ino, offset, data)? {
                return Ok(data.len());
            }
            self.write_retries.fetch_add(1, Ordering::Relaxed);
        }
        self.holding(&[inode_block(ino)], || {
            if self.write_guarded(ino, offset, data)? {
                Ok(data.len())
            } else {
                Err(Errno::EIO) // never: no truncation runs while the inode is held
            }
        })
    }

    /// One try of [`FsClient::write`]: the data, then the size, the times and the extent
    /// if no truncation came in between. Returns whether the size update applied.
    fn write_guarded(&self, ino: u64, offset: u64, data: &[u8]) -> Result<bool, Errno> {
        let i = self.getattr(ino)?;
        if i.kind == Some(Kind::Dir) {
            return Err(Errno::EISDIR);
        }
        let end = offset + data.len() as u64;
        self.write_blocks(ino, offset, data)?;
        let now = self.blocks.now();
        let bs = BLOCK as u64;
        // Only a regular file counts truncations (the slot is a device's number else).
        let file = i.kind == Some(Kind::File);
        let guard = file.then_some(Op::Guard {
            offset: field::TRUNCATIONS,
            value: i.truncations,
        });
        let ops: Vec<Op> = guard
            .into_iter()
            .chain(sized(
                Op::Max {
                    offset: field::SIZE,
                    value: end,
                },
                now,
                offset / bs..end.div_ceil(bs),
            ))
            .collect();
        let before = self.update(inode_block(ino), &ops)?;
        if !file {
            return Ok(true);
        }
        match Inode::decode(ino, &before) {
            Ok(Some(b)) => Ok(b.truncations == i.truncations),
            // Freed meanwhile (the last name removed and the file closed elsewhere): the
            // update did nothing that matters; as on one machine, the bytes are gone.
            Ok(None) => Ok(true),
            Err(_) => Err(Errno::EIO),
        }
    }

    /// `write` on a file opened with `O_APPEND`: all of `data` at the file's coherent end,
    /// as one unit, whatever size the writing kernel believes the file has; returns the
    /// offset it landed at.
    ///
    /// The inode block is held (private and pinned) while the end is read and moved (one
    /// atomic `Add` to the size), the extent marked and the bytes written into the range:
    /// another node's append, write or truncate comes wholly before or after, and no
    /// reader sees the new size before the bytes.
    pub fn append(&self, ino: u64, data: &[u8]) -> Result<u64, Errno> {
        let len = data.len() as u64;
        if data.is_empty() {
            return self.getattr(ino).map(|i| i.size);
        }
        self.wait_for_room()?;
        self.holding(&[inode_block(ino)], || {
            let i = self.getattr(ino)?;
            if i.kind == Some(Kind::Dir) {
                return Err(Errno::EISDIR);
            }
            if i.size.checked_add(len).is_none_or(|end| end > MAX_FILE) {
                return Err(Errno::EFBIG);
            }
            let now = self.blocks.now();
            let bs = BLOCK as u64;
            let before = self.update(
                inode_block(ino),
                &sized(
                    Op::Add {
                        offset: field::SIZE,
                        delta: len,
                    },
                    now,
                    i.size / bs..(i.size + len).div_ceil(bs),
                ),
            )?;
            let offset = match Inode::decode(ino, &before) {
                Ok(Some(b)) => b.size,
                _ => return Err(Errno::EIO),
            };
            debug_assert_eq!(offset, i.size, "the size moved while the inode was held");
            self.write_blocks(ino, offset, data)?;
            Ok(offset)
        })
    }

    /// The inode of `ino` if it is a regular file; `EISDIR` for a directory, `ENODEV` for
    /// anything else (what `fallocate(2)` answers).
    fn regular_file(&self, ino: u64) -> Result<Inode, Errno> {
        let i = self.getattr(ino)?;
        match i.kind {
            Some(Kind::File) => Ok(i),
            Some(Kind::Dir) => Err(Errno::EISDIR),
            _ => Err(Errno::ENODEV),
        }
    }

    /// `fallocate` without `KEEP_SIZE`: the size becomes at least `end` (blocks are not
    /// reserved ahead: the log allocates at write-back). The larger size wins against any
    /// other node's concurrent change, as one atomic update of the inode block.
    pub fn extend(&self, ino: u64, end: u64) -> Result<(), Errno> {
        let i = self.regular_file(ino)?;
        if end > MAX_FILE {
            return Err(Errno::EFBIG);
        }
        if end <= i.size {
            return Ok(());
        }
        let now = self.blocks.now();
        self.update(
            inode_block(ino),
            &[
                Op::Max {
                    offset: field::SIZE,
                    value: end,
                },
                set(field::MTIME, now),
                set(field::CTIME, now),
            ],
        )
        .map(drop)
    }

    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)`: `[offset, offset + len)` reads as zeros; the
    /// size stays. A whole block in the range becomes a hole (an empty block), a part of
    /// one is zeroed in place; blocks that never held data are left alone.
    pub fn punch_hole(&self, ino: u64, offset: u64, len: u64) -> Result<(), Errno> {
        self.holding(&[inode_block(ino)], || {
            self.punch_hole_held(ino, offset, len)
        })
    }

    fn punch_hole_held(&self, ino: u64, offset: u64, len: u64) -> Result<(), Errno> {
        let i = self.regular_file(ino)?;
        let end = offset.saturating_add(len).min(i.size);
        if offset >= end {
            return Ok(());
        }
        let bs = BLOCK as u64;
        let may_hold = |b: u64| i.extents.iter().any(|(s, e)| *s <= b && b < *e);
        let mut ops: Vec<(BlockId, UserOp<Vec<u8>>)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let b = pos / bs;
            let bstart = b * bs;
            let to = end.min(bstart + bs);
            if may_hold(b) {
                let op = if pos == bstart && to == bstart + bs {
                    UserOp::Write(Vec::new())
                } else {
                    UserOp::Update(encode_patch(&[Op::Splice {
                        offset: (pos - bstart) as u32,
                        bytes: vec![0; (to - pos) as usize],
                    }]))
                };
                ops.push((block_id(ino, b), op));
                if ops.len() >= 1024 {
                    self.run_writes(std::mem::take(&mut ops))?;
                }
            }
            pos = to;
        }
        self.run_writes(ops)?;
        let now = self.blocks.now();
        self.update(
            inode_block(ino),
            &[set(field::MTIME, now), set(field::CTIME, now)],
        )
        .map(drop)
    }

    /// A full cluster refuses new data at once (a write-back that cannot be stored would
    /// only fail at the next fsync, after filling this node's memory). A writer waits for
    /// the cleaner before it gives up.
    fn wait_for_room(&self) -> Result<(), Errno> {
        let mut attempt = 0;
        loop {
            let st = self.blocks.statfs()?;
            if st.blocks == 0 || st.bfree * st.bsize >= FULL_MARGIN.min(st.blocks * st.bsize / 16) {
                return Ok(());
            }
            if !self.blocks.wait_for_space(attempt) {
                return Err(Errno::ENOSPC);
            }
            attempt += 1;
        }
    }

    /// Write `data` at `offset` into the file's blocks: a whole block is replaced, a part
    /// of one is spliced in (atomically, where the block is held private).
    fn write_blocks(&self, ino: u64, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let end = offset + data.len() as u64;
        let bs = BLOCK as u64;
        let mut ops = Vec::new();
        let mut pos = offset;
        while pos < end {
            let b = pos / bs;
            let bstart = b * bs;
            let to = end.min(bstart + bs);
            let chunk = data[(pos - offset) as usize..(to - offset) as usize].to_vec();
            let op = if pos == bstart && to == bstart + bs {
                UserOp::Write(chunk)
            } else {
                UserOp::Update(encode_patch(&[Op::Splice {
                    offset: (pos - bstart) as u32,
                    bytes: chunk,
                }]))
            };
            ops.push((block_id(ino, b), op));
            pos = to;
        }
        self.run_writes(ops)
    }

    /// `fsync`: once it returns, every block this client wrote to `ino` (data and inode)
    /// is durable on the stripe group of the file's manager's log.
    pub fn fsync(&self, ino: u64) -> Result<(), Errno> {
        self.write_back(|i, _| i == ino, true).map(drop)
    }

    /// Make node `node`'s log durable; a full stripe group is given time for its cleaner
    /// (see [`Blocks::wait_for_space`]) before ENOSPC is returned.
    pub(super) fn sync_waiting(&self, node: NodeId) -> Result<(), Errno> {
        let mut attempt = 0;
        loop {
            match self.blocks.sync(node) {
                Err(Errno::ENOSPC) if self.blocks.wait_for_space(attempt) => attempt += 1,
                r => return r,
            }
        }
    }

    /// `fsync` every file this client wrote: every dirty block written back, then one
    /// log sync per manager involved (not one per file: each sync seals a segment).
    pub fn sync_all(&self) -> Result<(), Errno> {
        self.write_back(|_, _| true, true).map(drop)
    }

    /// The periodic write-back: every file whose oldest unsynced block was written at
    /// least `age_ns` ago is made durable as by `fsync` (what the kernel's dirty-page
    /// write-back does for a local file system). Returns how many files it synced.
    pub fn write_back_older_than(&self, age_ns: u64) -> Result<usize, Errno> {
        let cutoff = self.blocks.now().saturating_sub(age_ns);
        self.write_back(|_, since| since <= cutoff, false)
    }

    /// Write back the dirty blocks of the files `pick(ino, since)` selects, then sync each
    /// of their managers' logs once; on failure they stay dirty for the next try.
    ///
    /// With `wait` (an `fsync`, `sync_all`), it also waits for every write-back already in
    /// flight that took blocks of a picked file (`pick(ino, 0)`), and fails with its error:
    /// the blocks that write-back took are not in the dirty set any more, but they are not
    /// durable until it ends. Returns how many files it took blocks of.
    pub(super) fn write_back(
        &self,
        pick: impl Fn(u64, u64) -> bool,
        wait: bool,
    ) -> Result<usize, Errno> {
        let flight = Arc::new(Flight::default());
        let (taken, earlier) = {
            let mut d = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
            let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
            let earlier: Vec<Arc<Flight>> = if wait {
                flights
                    .iter()
                    .filter(|(i, _)| pick(**i, 0))
                    .flat_map(|(_, f)| f.iter().cloned())
                    .collect()
            } else {
                Vec::new()
            };
            let inos: Vec<u64> = d
                .iter()
                .filter(|(i, x)| pick(**i, x.since))
                .map(|(i, _)| *i)
                .collect();
            let taken: BTreeMap<u64, Dirty> = inos
                .into_iter()
                .filter_map(|i| d.remove(&i).map(|x| (i, x)))
                .collect();
            for ino in taken.keys() {
                flights.entry(*ino).or_default().push(flight.clone());
            }
            (taken, earlier)
        };
        let r = self.write_back_taken(&taken);
        {
            let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
            for ino in taken.keys() {
                if let Some(f) = flights.get_mut(ino) {
                    f.retain(|x| !Arc::ptr_eq(x, &flight));
                    if f.is_empty() {
                        flights.remove(ino);
                    }
                }
            }
        }
        flight.end(r);
        r?;
        if !earlier.is_empty() {
            self.write_back_waits.fetch_add(1, Ordering::Relaxed);
        }
        for f in earlier {
            f.wait()?;
        }
        Ok(taken.len())
    }

    /// Flush `taken` and sync the logs they go to; on failure, give the blocks back to the
    /// dirty set (merged with what was written meanwhile).
    fn write_back_taken(&self, taken: &BTreeMap<u64, Dirty>) -> Result<(), Errno> {
        if taken.is_empty() {
            // Nothing of this client's since the last sync: nothing to make durable.
            return Ok(());
        }
        // The logs the blocks go to (a directory's dirty set holds its new names' inodes).
        let managers: BTreeSet<NodeId> = taken
            .values()
            .flat_map(|x| x.blocks.iter())
            .map(|b| self.map.manager(crate::fs::layout::ino_of(*b)))
            .collect();
        let ops = taken
            .values()
            .flat_map(|x| x.blocks.iter())
            .map(|b| (*b, UserOp::Flush))
            .collect();
        let r: Result<Vec<_>, Errno> = self.blocks.run(ops).into_iter().collect();
        let r = r.and_then(|_| managers.into_iter().try_for_each(|m| self.sync_waiting(m)));
        if let Err(e) = r {
            let mut d = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
            for (ino, x) in taken {
                let e = d.entry(*ino).or_insert_with(|| Dirty {
                    since: x.since,
                    blocks: BTreeSet::new(),
                });
                e.since = e.since.min(x.since);
                e.blocks.extend(x.blocks.iter().copied());
            }
            return Err(e);
        }
        Ok(())
    }

    /// `statfs`.
    pub fn statfs(&self) -> Result<StatFs, Errno> {
        self.blocks.statfs()
    }
}

/// The inode steps of a write that lands data in `blocks`: `size` (a max or an add), the
/// modification and change times `now`, and the blocks marked as holding data.
fn sized(size: Op, now: u64, blocks: std::ops::Range<u64>) -> [Op; 4] {
    [
        size,
        set(field::MTIME, now),
        set(field::CTIME, now),
        Op::Extent {
            start: blocks.start,
            end: blocks.end,
        },
    ]
}

/// Whether `[offset, offset + len)` lies within one block.
fn one_block(offset: u64, len: usize) -> bool {
    let bs = BLOCK as u64;
    len > 0 && offset / bs == (offset + len as u64 - 1) / bs
}
