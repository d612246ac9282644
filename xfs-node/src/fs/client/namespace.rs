//! The name space: lookups, creating and removing names (files, directories, symbolic
//! links, hard links), allocating and freeing inodes, directory listings, path resolution.

use super::*;

impl<B: Blocks> FsClient<B> {
    /// `lookup`: the inode `name` names in directory `parent`.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Inode, Errno> {
        if name.len() > MAX_NAME {
            return Err(Errno::ENAMETOOLONG);
        }
        if name == b"." {
            return self.dir(parent);
        }
        if name == b".." {
            let p = self.dir(parent)?.parent;
            return self.inode(p);
        }
        match self.dir_and_find(parent, name)?.1 {
            Some(e) => self.inode(e.ino),
            None => Err(Errno::ENOENT),
        }
    }

    /// Draw a new index number managed by this node (first-writer). Numbers are reserved
    /// in batches whose reservation is durable before any is used, so a crash never hands
    /// out a number twice (a name whose inode died in a crash is then just dangling, and
    /// treated as absent).
    pub(super) fn alloc_ino(&self) -> Result<u64, Errno> {
        let me = self.blocks.me();
        let entries = self.map.entries_of(me);
        let Some(first) = entries.first().copied() else {
            // A node without the manager role has no index numbers of its own.
            return Err(Errno::EPERM);
        };
        let mut a = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
        if a.0 == a.1 {
            let counter = block_id(first, 0);
            let old = self.update(
                counter,
                &[Op::Add {
                    offset: 0,
                    delta: INO_BATCH,
                }],
            )?;
            let c = old
                .get(..8)
                .map_or(0, |s| u64::from_le_bytes(s.try_into().unwrap_or([0; 8])));
            one(self.blocks.run(vec![(counter, UserOp::Flush)]))?;
            self.blocks.sync(me)?;
            *a = (c, c + INO_BATCH);
        }
        let c = a.0;
        a.0 += 1;
        let m = self.map.entries.len() as u64;
        Ok((c + 2) * m + entries[(c % entries.len() as u64) as usize])
    }

    /// The entry `name` of `parent` if its inode exists (a name whose inode was lost in a
    /// crash is removed on the way).
    pub(super) fn find_live(&self, parent: u64, name: &[u8]) -> Result<Option<Entry>, Errno> {
        let found = self.find(parent, name)?;
        self.live_entry(parent, name, found)
    }

    /// `found` (the entry `name` of `parent`) if its inode exists; a name whose inode was
    /// lost in a crash is removed.
    fn live_entry(
        &self,
        parent: u64,
        name: &[u8],
        found: Option<Entry>,
    ) -> Result<Option<Entry>, Errno> {
        match found {
            Some(e) => match self.inode(e.ino) {
                Ok(_) => Ok(Some(e)),
                Err(Errno::ENOENT) => {
                    self.remove(parent, name, e.ino)?;
                    Ok(None)
                }
                Err(err) => Err(err),
            },
            None => Ok(None),
        }
    }

    /// Create a node of any kind in `parent` (`mknod`, `create`, `mkdir`, `symlink`).
    #[allow(clippy::too_many_arguments)]
    pub fn make(
        &self,
        parent: u64,
        name: &[u8],
        kind: Kind,
        mode: u32,
        uid: u32,
        gid: u32,
        rdev: u64,
        target: &[u8],
    ) -> Result<Inode, Errno> {
        check_name(name)?;
        let (p, found) = self.dir_and_find(parent, name)?;
        let (mode, gid) = inherit_set_group_id(&p, kind, mode, gid);
        if self.live_entry(parent, name, found)?.is_some() {
            return Err(Errno::EEXIST);
        }
        let ino = self.alloc_ino()?;
        let now = self.blocks.now();
        let inode = Inode {
            ino,
            kind: Some(kind),
            mode: if kind == Kind::Special {
                mode
            } else {
                type_bits(kind) | (mode & 0o7777)
            },
            uid,
            gid,
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            size: if kind == Kind::Symlink {
                target.len() as u64
            } else {
                0
            },
            atime: now,
            mtime: now,
            ctime: now,
            btime: now,
            rdev,
            truncations: 0,
            parent,
            target: target.to_vec(),
            xattrs: Vec::new(),
            extents: if kind == Kind::Dir {
                Inode::new_dir_extents()
            } else {
                Vec::new()
            },
            rename: None,
        };
        if inode.encode().len() > crate::fs::layout::MAX_INODE {
            return Err(Errno::ENAMETOOLONG);
        }
        self.name_new_inode(parent, name, &inode, now)?;
        Ok(inode)
    }

    /// Write the new inode, then give it its name in `parent` and update the parent's
    /// times (and, for a directory, its link count) in one batch. The inode goes first, on
    /// its own: a name whose inode is missing reads as a crash's leftover, which a lookup
    /// removes (`live_entry`), so no name may be seen before its inode. If another took
    /// the name meanwhile (EEXIST) or its bucket is full (ENOSPC), the inode is freed and
    /// the parent's link count put back (its times stay changed).
    fn name_new_inode(
        &self,
        parent: u64,
        name: &[u8],
        inode: &Inode,
        now: u64,
    ) -> Result<(), Errno> {
        let (ino, kind) = (inode.ino, inode.kind.unwrap_or(Kind::File));
        let entry = Entry {
            name: name.to_vec(),
            ino,
            kind,
        };
        let mut ops = vec![set(field::MTIME, now), set(field::CTIME, now)];
        if kind == Kind::Dir {
            ops.push(Op::Add {
                offset: field::NLINK,
                delta: 1,
            });
        }
        self.write_inode(inode)?;
        self.note_dirty_under(parent, inode_block(ino));
        let lost = match self.insert_batch(parent, entry, false, &ops) {
            Ok(None) => return Ok(()),
            // Another took the name meanwhile.
            Ok(Some(_)) => Errno::EEXIST,
            // The bucket is full.
            Err(Errno::ENOSPC) => Errno::ENOSPC,
            Err(e) => return Err(e),
        };
        self.write_inode(&Inode {
            ino,
            ..Inode::default()
        })?;
        if kind == Kind::Dir {
            self.touch_dir(parent, -1)?;
        }
        Err(lost)
    }

    /// `create` a regular file.
    pub fn create(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<Inode, Errno> {
        self.make(parent, name, Kind::File, mode, uid, gid, 0, &[])
    }

    /// `mkdir`.
    pub fn mkdir(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<Inode, Errno> {
        self.make(parent, name, Kind::Dir, mode, uid, gid, 0, &[])
    }

    /// `symlink`.
    pub fn symlink(
        &self,
        parent: u64,
        name: &[u8],
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> Result<Inode, Errno> {
        if target.is_empty() {
            return Err(Errno::ENOENT);
        }
        if target.len() > 4095 {
            return Err(Errno::ENAMETOOLONG);
        }
        self.make(parent, name, Kind::Symlink, 0o777, uid, gid, 0, target)
    }

    /// `readlink`.
    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        let i = self.inode(ino)?;
        if i.kind != Some(Kind::Symlink) {
            return Err(Errno::EINVAL);
        }
        Ok(i.target)
    }

    /// Take `by` links from `ino`; when none is left, free its blocks, unless it is in
    /// `open` (a mount still has it open: it frees it with [`FsClient::reclaim`] at the
    /// last close).
    /// Returns `ino` if it was kept that way.
    pub(super) fn drop_link(&self, ino: u64, by: u64, open: &[u64]) -> Result<Option<u64>, Errno> {
        let now = self.blocks.now();
        let old = self.update(
            inode_block(ino),
            &[
                Op::Add {
                    offset: field::NLINK,
                    delta: by.wrapping_neg(),
                },
                set(field::CTIME, now),
            ],
        )?;
        if let Ok(Some(i)) = Inode::decode(ino, &old) {
            if i.nlink <= by as u32 {
                if open.contains(&ino) {
                    return Ok(Some(ino));
                }
                self.free_inode(&i)?;
            }
        }
        Ok(None)
    }

    /// Free a file whose last name is gone and that is no longer open: its blocks become
    /// deletions in its manager's log (the cleaner reclaims their space). Returns whether
    /// it was freed (false: it still has a name, or it is gone already).
    pub fn reclaim(&self, ino: u64) -> Result<bool, Errno> {
        match Inode::decode(ino, &self.read_block(inode_block(ino))?) {
            Ok(Some(i)) if i.kind.is_some() && i.nlink == 0 => {
                self.free_inode(&i)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Write every block `i` may hold (data or directory buckets) and its inode block
    /// empty.
    pub(super) fn free_inode(&self, i: &Inode) -> Result<(), Errno> {
        // The blocks and the inode together (a reader that finds the inode gone stops
        // there; `run_writes` goes in batches, the inode in the last). Every bucket of
        // a directory, marked or not (a crash or a racing create can leave a name in an
        // unmarked one).
        let mut ops = if i.kind == Some(Kind::Dir) {
            (0..DIR_BUCKETS)
                .map(|b| (block_id(i.ino, b), UserOp::Write(Vec::new())))
                .collect()
        } else {
            self.truncate_ops(i, 0)
        };
        ops.push((inode_block(i.ino), UserOp::Write(Vec::new())));
        self.run_writes(ops)?;
        // Write the deletions back now (durable with the manager's next log sync), so the
        // space is the cleaner's at once rather than when the cache evicts them.
        let blocks: Vec<BlockId> = self
            .dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&i.ino)
            .map(|d| d.blocks.iter().copied().collect())
            .unwrap_or_default();
        let ops = blocks.into_iter().map(|b| (b, UserOp::Flush)).collect();
        for r in self.blocks.run(ops) {
            r?;
        }
        Ok(())
    }

    pub(super) fn touch_dir(&self, dir: u64, nlink_delta: i64) -> Result<(), Errno> {
        let now = self.blocks.now();
        let mut ops = vec![set(field::MTIME, now), set(field::CTIME, now)];
        if nlink_delta != 0 {
            ops.push(Op::Add {
                offset: field::NLINK,
                delta: nlink_delta as u64,
            });
        }
        self.update(inode_block(dir), &ops)?;
        Ok(())
    }

    /// `unlink` a non-directory (freed if that was its last name).
    pub fn unlink(&self, parent: u64, name: &[u8]) -> Result<(), Errno> {
        self.unlink_keeping(parent, name, &[]).map(drop)
    }

    /// `unlink`, keeping the file's blocks if it is one of `open` (see
    /// [`FsClient::reclaim`]); returns the file if it was kept without a name.
    pub fn unlink_keeping(
        &self,
        parent: u64,
        name: &[u8],
        open: &[u64],
    ) -> Result<Option<u64>, Errno> {
        check_name(name)?;
        let (_, found) = self.dir_and_find(parent, name)?;
        let e = self.live_entry(parent, name, found)?.ok_or(Errno::ENOENT)?;
        if e.kind == Kind::Dir {
            return Err(Errno::EISDIR);
        }
        // The name and the directory's times in one batch (if another node removed the
        // name first, the times still moved).
        let now = self.blocks.now();
        let times = [set(field::MTIME, now), set(field::CTIME, now)];
        if !self.remove_batch(parent, name, e.ino, &times)? {
            return Err(Errno::ENOENT);
        }
        self.drop_link(e.ino, 1, open)
    }

    /// `rmdir`.
    pub fn rmdir(&self, parent: u64, name: &[u8]) -> Result<(), Errno> {
        if name == b"." {
            return Err(Errno::EINVAL);
        }
        if name == b".." {
            return Err(Errno::ENOTEMPTY);
        }
        check_name(name)?;
        let (_, found) = self.dir_and_find(parent, name)?;
        let e = self.live_entry(parent, name, found)?.ok_or(Errno::ENOENT)?;
        if e.kind != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        if !self.dir_is_empty(e.ino)? {
            return Err(Errno::ENOTEMPTY);
        }
        // A stale name left by a rename that a crash interrupted (the directory's parent
        // field names the other directory): only the name goes.
        let stale = self.inode(e.ino)?.parent != parent;
        if !self.remove(parent, name, e.ino)? {
            return Err(Errno::ENOENT);
        }
        if !stale {
            self.drop_link(e.ino, 2, &[])?;
        }
        self.touch_dir(parent, -1)
    }

    /// `link`: a new name for `ino`.
    pub fn link(&self, ino: u64, parent: u64, name: &[u8]) -> Result<Inode, Errno> {
        check_name(name)?;
        let i = self.inode(ino)?;
        if i.kind == Some(Kind::Dir) {
            return Err(Errno::EPERM);
        }
        if i.nlink >= 65000 {
            return Err(Errno::EMLINK);
        }
        self.dir(parent)?;
        if self.find_live(parent, name)?.is_some() {
            return Err(Errno::EEXIST);
        }
        let now = self.blocks.now();
        self.update(
            inode_block(ino),
            &[
                Op::Add {
                    offset: field::NLINK,
                    delta: 1,
                },
                set(field::CTIME, now),
            ],
        )?;
        let entry = Entry {
            name: name.to_vec(),
            ino,
            kind: i.kind.unwrap_or(Kind::File),
        };
        if self.insert(parent, entry, false)?.is_some() {
            self.drop_link(ino, 1, &[])?;
            return Err(Errno::EEXIST);
        }
        self.note_dirty_under(parent, inode_block(ino));
        self.touch_dir(parent, 0)?;
        self.inode(ino)
    }

    /// Whether `dir` is `ancestor` or lies below it.
    pub(super) fn is_under(&self, mut dir: u64, ancestor: u64) -> Result<bool, Errno> {
        let root = self.root();
        for _ in 0..4096 {
            if dir == ancestor {
                return Ok(true);
            }
            if dir == root {
                return Ok(false);
            }
            dir = self.inode(dir)?.parent;
        }
        Err(Errno::EIO)
    }

    /// `readdir`: every entry (without `.` and `..`), in a stable order.
    pub fn readdir(&self, ino: u64) -> Result<Vec<Entry>, Errno> {
        Ok(self
            .readdir_plus(ino)?
            .into_iter()
            .map(|(e, _)| e)
            .collect())
    }

    /// `readdir` with every entry's inode (read anyway to leave out names whose inode died
    /// in a crash: see `alloc_ino`).
    pub fn readdir_plus(&self, ino: u64) -> Result<Vec<(Entry, Inode)>, Errno> {
        let buckets = self.dir(ino)?.dir_buckets();
        self.entries_in(ino, buckets)
    }

    /// Whether directory `ino` holds no name (of a live inode) in any of its buckets,
    /// marked or not: a crash can leave a bucket durable without its mark, and a rmdir or
    /// a rename over the directory must not take it for empty then.
    pub(super) fn dir_is_empty(&self, ino: u64) -> Result<bool, Errno> {
        self.dir(ino)?;
        Ok(self.entries_in(ino, (0..DIR_BUCKETS).collect())?.is_empty())
    }

    /// The names in `buckets` of directory `ino` whose inodes are live, with the inodes.
    fn entries_in(&self, ino: u64, buckets: Vec<u64>) -> Result<Vec<(Entry, Inode)>, Errno> {
        let ops = buckets
            .into_iter()
            .map(|b| (block_id(ino, b), UserOp::Read))
            .collect();
        let mut all = Vec::new();
        for r in self.blocks.run(ops) {
            match r? {
                Outcome::Read(b) => all.extend(decode_bucket(&b).ok_or(Errno::EIO)?),
                _ => return Err(Errno::EIO),
            }
        }
        let inodes = all
            .iter()
            .map(|e| (inode_block(e.ino), UserOp::Read))
            .collect();
        let mut out = Vec::new();
        for (e, r) in all.into_iter().zip(self.blocks.run(inodes)) {
            let Outcome::Read(b) = r? else {
                return Err(Errno::EIO);
            };
            match live_inode(e.ino, &b) {
                Ok(i) => out.push((e, i)),
                Err(Errno::ENOENT) => {}
                Err(err) => return Err(err),
            }
        }
        Ok(out)
    }

    /// Resolve an absolute path (`/a/b`), following no symlinks.
    pub fn resolve(&self, path: &str) -> Result<Inode, Errno> {
        let mut cur = self.inode(self.root())?;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            cur = self.lookup(cur.ino, part.as_bytes())?;
        }
        Ok(cur)
    }

    /// The parent directory and last name of an absolute path.
    pub fn resolve_parent<'p>(&self, path: &'p str) -> Result<(Inode, &'p str), Errno> {
        let path = path.trim_end_matches('/');
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        if name.is_empty() {
            return Err(Errno::EINVAL);
        }
        Ok((self.resolve(dir)?, name))
    }
}

/// The mode and group of a new `kind` node in directory `p`: a set-group-ID directory
/// hands its group down (and, to directories, the bit).
fn inherit_set_group_id(p: &Inode, kind: Kind, mode: u32, gid: u32) -> (u32, u32) {
    if p.mode & libc::S_ISGID != 0 {
        let m = if kind == Kind::Dir {
            mode | libc::S_ISGID
        } else {
            mode
        };
        (m, p.gid)
    } else {
        (mode, gid)
    }
}
