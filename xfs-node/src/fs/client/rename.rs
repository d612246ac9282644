//! Rename, crash-safe across two directory buckets: an intent and one extra link made
//! durable first, the target bucket durable before the source's (fsck finishes an
//! interrupted one).

use super::*;

impl<B: Blocks> FsClient<B> {
    /// `rename`, with the `RENAME_NOREPLACE` / `RENAME_EXCHANGE` variants.
    ///
    /// Not atomic against a crash when the two names are in two buckets (each written
    /// back on its own): a crash can leave both names. A plain rename records a
    /// [`RenameIntent`] first, which `xfs-node fsck` resolves (see
    /// [`FsClient::rename_two_buckets`]); an exchange records none.
    pub fn rename(
        &self,
        sp: u64,
        sn: &[u8],
        dp: u64,
        dn: &[u8],
        mode: RenameMode,
    ) -> Result<(), Errno> {
        self.rename_keeping(sp, sn, dp, dn, mode, &[]).map(drop)
    }

    /// `rename`; a replaced file that is one of `open` keeps its blocks (see
    /// [`FsClient::reclaim`]) and is returned.
    pub fn rename_keeping(
        &self,
        sp: u64,
        sn: &[u8],
        dp: u64,
        dn: &[u8],
        mode: RenameMode,
        open: &[u64],
    ) -> Result<Option<u64>, Errno> {
        check_name(sn)?;
        check_name(dn)?;
        self.dir(sp)?;
        self.dir(dp)?;
        let src = self.find_live(sp, sn)?.ok_or(Errno::ENOENT)?;
        let dst = self.find_live(dp, dn)?;
        if sp == dp && sn == dn {
            return Ok(None);
        }
        if src.kind == Kind::Dir && self.is_under(dp, src.ino)? {
            return Err(Errno::EINVAL);
        }
        let now = self.blocks.now();
        match mode {
            RenameMode::NoReplace if dst.is_some() => return Err(Errno::EEXIST),
            RenameMode::Exchange => {
                let dst = dst.ok_or(Errno::ENOENT)?;
                self.exchange(sp, sn, &src, dp, dn, &dst, now)?;
                return Ok(None);
            }
            _ => {}
        }
        if let Some(d) = &dst {
            if d.ino == src.ino {
                // Two names of one file: POSIX says do nothing.
                return Ok(None);
            }
            self.check_replace(&src, d)?;
        }
        let entry = Entry {
            name: dn.to_vec(),
            ..src.clone()
        };
        if sp == dp && bucket_of(sn) == bucket_of(dn) {
            self.rename_in_bucket(&src, sp, sn, entry)?;
        } else {
            self.rename_two_buckets(&src, sp, sn, dp, dn, entry)?;
        }
        self.after_move(&src, sp, dp, dst.as_ref(), now, open)
    }

    /// `RENAME_EXCHANGE`: `src` (named `sn` in `sp`) and `dst` (named `dn` in `dp`) swap
    /// names, both buckets changed while held together.
    #[allow(clippy::too_many_arguments)]
    fn exchange(
        &self,
        sp: u64,
        sn: &[u8],
        src: &Entry,
        dp: u64,
        dn: &[u8],
        dst: &Entry,
        now: u64,
    ) -> Result<(), Errno> {
        if dst.kind == Kind::Dir && self.is_under(sp, dst.ino)? {
            return Err(Errno::EINVAL);
        }
        let (a, b) = (block_id(dp, bucket_of(dn)), block_id(sp, bucket_of(sn)));
        self.holding(&[a, b], || {
            self.insert(
                dp,
                Entry {
                    name: dn.to_vec(),
                    ..src.clone()
                },
                true,
            )?;
            self.insert(
                sp,
                Entry {
                    name: sn.to_vec(),
                    ..dst.clone()
                },
                true,
            )
        })?;
        for (e, newp) in [(src, dp), (dst, sp)] {
            let mut ops = vec![set(field::CTIME, now)];
            if e.kind == Kind::Dir {
                ops.push(set(field::PARENT, newp));
            }
            self.update(inode_block(e.ino), &ops)?;
        }
        if sp != dp {
            let d = |k: Kind| if k == Kind::Dir { 1i64 } else { 0 };
            let delta = d(dst.kind) - d(src.kind);
            self.touch_dir(sp, delta)?;
            self.touch_dir(dp, -delta)?;
        } else {
            self.touch_dir(sp, 0)?;
        }
        Ok(())
    }

    /// Whether `src` may replace `dst`: a directory only an empty directory, a
    /// non-directory only a non-directory.
    fn check_replace(&self, src: &Entry, dst: &Entry) -> Result<(), Errno> {
        match (src.kind == Kind::Dir, dst.kind == Kind::Dir) {
            (true, false) => Err(Errno::ENOTDIR),
            (false, true) => Err(Errno::EISDIR),
            (true, true) if !self.dir_is_empty(dst.ino)? => Err(Errno::ENOTEMPTY),
            _ => Ok(()),
        }
    }

    /// A rename whose two names are in one bucket of directory `dir`: one atomic update
    /// puts `entry` in and takes `src`'s name `sn` out.
    fn rename_in_bucket(
        &self,
        src: &Entry,
        dir: u64,
        sn: &[u8],
        entry: Entry,
    ) -> Result<(), Errno> {
        let old = self.update(
            block_id(dir, bucket_of(sn)),
            &[
                Op::Insert {
                    entry,
                    replace: true,
                },
                Op::Remove {
                    name: sn.to_vec(),
                    ino: src.ino,
                },
            ],
        )?;
        let before = decode_bucket(&old).ok_or(Errno::EIO)?;
        if !before.iter().any(|e| e.name == sn && e.ino == src.ino) {
            return Err(Errno::ENOENT);
        }
        Ok(())
    }

    /// After `src` moved from directory `sp` to `dp`: its inode's change time (and a
    /// directory's parent field), the replaced `dst`'s link dropped, the directories' times
    /// and link counts. Returns the replaced file if it is one of `open` and kept.
    fn after_move(
        &self,
        src: &Entry,
        sp: u64,
        dp: u64,
        dst: Option<&Entry>,
        now: u64,
        open: &[u64],
    ) -> Result<Option<u64>, Errno> {
        let mut ops = vec![set(field::CTIME, now)];
        if src.kind == Kind::Dir {
            ops.push(set(field::PARENT, dp));
        }
        self.update(inode_block(src.ino), &ops)?;
        let replaced_dir = dst.is_some_and(|d| d.kind == Kind::Dir);
        let mut kept = None;
        if let Some(d) = dst {
            kept = self.drop_link(d.ino, if d.kind == Kind::Dir { 2 } else { 1 }, open)?;
        }
        if sp != dp {
            let moved = (src.kind == Kind::Dir) as i64;
            self.touch_dir(sp, -moved)?;
            self.touch_dir(dp, moved - replaced_dir as i64)?;
        } else {
            self.touch_dir(sp, -(replaced_dir as i64))?;
        }
        Ok(kept)
    }

    /// A rename whose two names are in two buckets, perhaps managed by two nodes, made
    /// crash-safe (each bucket is written back on its own, so a crash can leave either
    /// one's change durable without the other's):
    /// 1. the inode records the rename ([`RenameIntent`]) and, for a non-directory, one
    ///    link more (a directory's parent field is set to the target instead), and is made
    ///    durable before either bucket changes;
    /// 2. the buckets change held together (acquired in block order, so two renames cannot
    ///    deadlock): no other node sees the name in both directories or in neither;
    /// 3. the target's bucket (and its directory's inode, which marks the bucket) is made
    ///    durable, then the source's: a crash between leaves
    ///    two names of a file that counts two links (unlinking either keeps the other), or
    ///    of a directory whose parent field names the real one; never no name;
    /// 4. the intent and the extra link go (not waited for: until durable, a crash leaves
    ///    one link too many, which `xfs-node fsck` corrects).
    pub(super) fn rename_two_buckets(
        &self,
        src: &Entry,
        sp: u64,
        sn: &[u8],
        dp: u64,
        dn: &[u8],
        entry: Entry,
    ) -> Result<(), Errno> {
        let node = inode_block(src.ino);
        let is_dir = src.kind == Kind::Dir;
        let intent = RenameIntent {
            from_dir: sp,
            from_name: name_hash(sn),
            to_dir: dp,
            to_name: name_hash(dn),
        };
        let mut ops = RenameIntent::patch(Some(&intent));
        if is_dir {
            ops.push(set(field::PARENT, dp));
        } else {
            ops.push(Op::Add {
                offset: field::NLINK,
                delta: 1,
            });
        }
        let undo = |ops: &mut Vec<Op>| {
            if is_dir {
                ops.push(set(field::PARENT, sp));
            } else {
                ops.push(Op::Add {
                    offset: field::NLINK,
                    delta: u64::MAX, // -1
                });
            }
        };
        self.update(node, &ops)?;
        if let Err(e) = self.durable(&[node], self.map.manager(src.ino)) {
            let mut ops = RenameIntent::patch(None);
            undo(&mut ops);
            let _ = self.update(node, &ops);
            return Err(e);
        }
        let (a, b) = (block_id(dp, bucket_of(dn)), block_id(sp, bucket_of(sn)));
        let moved = self.holding(&[a, b], || {
            if !self.remove(sp, sn, src.ino)? {
                return Err(Errno::ENOENT);
            }
            self.insert(dp, entry, true).map(|_| ())
        });
        if let Err(e) = moved {
            // Nothing moved (the source went meanwhile, or the target bucket is full).
            let mut ops = RenameIntent::patch(None);
            undo(&mut ops);
            let _ = self.update(node, &ops);
            return Err(e);
        }
        let durable = self
            // With the target directory's inode, which marks the bucket (a listing after
            // a crash must find the name a lookup finds).
            .durable(&[a, inode_block(dp)], self.map.manager(dp))
            .and_then(|_| self.blocks.failpoint(FAILPOINT_RENAME_BETWEEN_BUCKETS))
            .and_then(|_| self.durable(&[b], self.map.manager(sp)));
        match durable {
            Ok(()) => {
                let mut ops = RenameIntent::patch(None);
                if !is_dir {
                    undo(&mut ops);
                }
                self.update(node, &ops)?;
            }
            // The rename is done (both buckets changed, and in the cache); not durable yet,
            // so the intent and the extra link stay, for fsck: a safe state.
            Err(e) => eprintln!(
                "xfs-node: rename of inode {}: directory write-back failed ({e}); its \
                 rename intent stays until `xfs-node fsck --repair`",
                src.ino
            ),
        }
        Ok(())
    }

    /// Write `blocks` back and make `manager`'s log durable.
    pub(super) fn durable(&self, blocks: &[BlockId], manager: NodeId) -> Result<(), Errno> {
        let ops = blocks.iter().map(|b| (*b, UserOp::Flush)).collect();
        for r in self.blocks.run(ops) {
            r?;
        }
        self.sync_waiting(manager)
    }

    /// Run `f` with `blocks` acquired (private and pinned: other nodes' revokes and
    /// forwarded reads for them wait), acquired in increasing block order, and released
    /// afterwards whatever `f` returned. The coherence model checks that this is atomic and
    /// deadlock-free (`two_block_transactions_are_atomic_and_deadlock_free`).
    pub(super) fn holding<R>(
        &self,
        blocks: &[BlockId],
        f: impl FnOnce() -> Result<R, Errno>,
    ) -> Result<R, Errno> {
        let mut sorted = blocks.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        {
            let (m, cv) = &self.held;
            let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
            while sorted.iter().any(|b| g.active.contains(b)) {
                g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            for b in &sorted {
                g.active.insert(*b);
                g.started[Held::slot(*b)] += 1;
            }
        }
        let out = self.holding_inner(&sorted, f);
        let (m, cv) = &self.held;
        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
        for b in &sorted {
            g.active.remove(b);
        }
        cv.notify_all();
        out
    }

    pub(super) fn holding_inner<R>(
        &self,
        sorted: &[BlockId],
        f: impl FnOnce() -> Result<R, Errno>,
    ) -> Result<R, Errno> {
        let mut held = Vec::new();
        let mut r = Ok(());
        for b in sorted {
            match one(self.blocks.run(vec![(*b, UserOp::Acquire)])) {
                Ok(Outcome::Acquired(_)) => {
                    self.note_dirty(*b);
                    held.push(*b);
                }
                Ok(_) => r = Err(Errno::EIO),
                Err(e) => r = Err(e),
            }
            if r.is_err() {
                break;
            }
        }
        let out = r.and_then(|_| f());
        let release = held.iter().map(|b| (*b, UserOp::Release)).collect();
        let released: Result<Vec<_>, Errno> = self.blocks.run(release).into_iter().collect();
        let out = out?;
        released?;
        Ok(out)
    }
}
