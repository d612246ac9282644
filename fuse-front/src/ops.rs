//! Every FUSE operation, translated to the node's client API ([`FsOp`] over the control
//! socket).

use super::*;
use crate::front::{open_mode, FH_DIRECT};

impl Filesystem for Front {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // FUSE_AUTO_INVAL_DATA: a read first refreshes attributes an invalidation made
        // stale. Without it the kernel trusts the size it cached for any read inside that
        // size, so after another node shrank the file a read here returned zeros past the
        // new end (found by fsx-mounts). The price: a refresh that finds a new mtime (after
        // a write, here or elsewhere) drops the file's cached pages.
        // FUSE_DIRECT_IO_ALLOW_MMAP: an O_APPEND descriptor (direct I/O, see `open_mode`)
        // can still be mapped shared; the kernel keeps the mapping coherent with its
        // direct writes.
        let want = InitFlags::FUSE_AUTO_INVAL_DATA
            | InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP
            | InitFlags::FUSE_ASYNC_READ
            | InitFlags::FUSE_BIG_WRITES
            | InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_MAX_PAGES;
        let _ = config.add_capabilities(want & config.capabilities());
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.count();
        self.shared.stats.lookups.fetch_add(1, Ordering::Relaxed);
        let p = self.shared.ours(parent);
        let name = name.as_bytes();
        let generation = self.shared.bucket_generation(p, name);
        let r = self.inode(FsOp::Lookup {
            parent: p,
            name: name.to_vec(),
        });
        self.entry(p, name, r, true, generation, reply);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.count();
        self.shared.stats.getattrs.fetch_add(1, Ordering::Relaxed);
        match self.inode(FsOp::Getattr {
            ino: self.shared.ours(ino),
        }) {
            Ok(i) => reply.attr(&self.opts.ttl, &self.attr(&i)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.count();
        if let Err(e) = self.rofs() {
            return reply.error(e);
        }
        let a = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: time_or_now(atime),
            mtime: time_or_now(mtime),
            ctime: ctime.map(ns),
        };
        match self.set(self.shared.ours(ino), a) {
            Ok(i) => reply.attr(&self.opts.ttl, &self.attr(&i)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.bytes(
            FsOp::Readlink {
                ino: self.shared.ours(ino),
            },
            reply,
        );
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let p = self.shared.ours(parent);
        let op = FsOp::Mknod {
            parent: p,
            name: name.as_bytes().to_vec(),
            mode,
            uid: req.uid(),
            gid: req.gid(),
            rdev: rdev as u64,
        };
        self.made(p, name.as_bytes(), op, reply);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let p = self.shared.ours(parent);
        let op = FsOp::Mkdir {
            parent: p,
            name: name.as_bytes().to_vec(),
            mode,
            uid: req.uid(),
            gid: req.gid(),
        };
        self.made(p, name.as_bytes(), op, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let op = FsOp::Unlink {
            parent: self.shared.ours(parent),
            name: name.as_bytes().to_vec(),
            open: self.open_files(),
        };
        self.count();
        match self.rofs() {
            Ok(()) => self.empty(self.orphaned(self.call(op)), reply),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let op = FsOp::Rmdir {
            parent: self.shared.ours(parent),
            name: name.as_bytes().to_vec(),
        };
        self.change(op, reply);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let p = self.shared.ours(parent);
        let op = FsOp::Symlink {
            parent: p,
            name: link_name.as_bytes().to_vec(),
            target: target.as_os_str().as_bytes().to_vec(),
            uid: req.uid(),
            gid: req.gid(),
        };
        self.made(p, link_name.as_bytes(), op, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.count();
        if let Err(e) = self.rofs() {
            return reply.error(e);
        }
        let mode = if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            RenameMode::Exchange
        } else if flags.contains(RenameFlags::RENAME_NOREPLACE) {
            RenameMode::NoReplace
        } else if flags.is_empty() {
            RenameMode::Replace
        } else {
            return reply.error(Errno::EINVAL);
        };
        let dp = self.shared.ours(newparent);
        let r = self.call(FsOp::Rename {
            sp: self.shared.ours(parent),
            sn: name.as_bytes().to_vec(),
            dp,
            dn: newname.as_bytes().to_vec(),
            mode,
            open: self.open_files(),
        });
        let r = self.orphaned(r);
        if r.is_ok() {
            self.shared.remember(dp, newname.as_bytes());
        }
        self.empty(r, reply);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let p = self.shared.ours(newparent);
        let op = FsOp::Link {
            ino: self.shared.ours(ino),
            parent: p,
            name: newname.as_bytes().to_vec(),
        };
        self.made(p, newname.as_bytes(), op, reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.count();
        let ino = self.shared.ours(ino);
        self.opened(ino);
        // The page cache stays valid across opens (invalidations keep it coherent), except
        // for the descriptors `open_mode` sends around it.
        let (fh, fopen) = open_mode(flags.0, self.shared.truncated_lately(ino));
        reply.opened(fh, fopen);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.count();
        self.shared.stats.reads.fetch_add(1, Ordering::Relaxed);
        match self.call(FsOp::Read {
            ino: self.shared.ours(ino),
            offset,
            len: size as usize,
        }) {
            Ok(Response::Data(d)) => reply.data(&d),
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.count();
        self.shared.stats.writes.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.rofs() {
            return reply.error(e);
        }
        let fuse_ino = ino;
        let ino = self.shared.ours(ino);
        if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            self.kill_suid_sgid(ino);
        }
        // A page the kernel writes back (`FUSE_WRITE_CACHE`: from a shared mapping) goes
        // where the page is, whatever the descriptor it picked; its page is the source,
        // so nothing here is dropped (the kernel waits for this write with the page under
        // writeback: dropping it here would never return).
        let writeback = write_flags.contains(WriteFlags::FUSE_WRITE_CACHE);
        let direct = fh == FH_DIRECT && !writeback;
        if flags.0 & libc::O_APPEND != 0 && !writeback {
            // At the coherent end, not at the offset this kernel chose from the size it
            // cached (another node may have appended since).
            self.shared.stats.appends.fetch_add(1, Ordering::Relaxed);
            let n = data.len();
            return match self.call(FsOp::Append {
                ino,
                data: data.to_vec(),
            }) {
                Ok(Response::Appended(at)) => {
                    self.drop_cached(fuse_ino, at, n, direct);
                    reply.written(n as u32)
                }
                Ok(_) => reply.error(Errno::EIO),
                Err(e) => reply.error(e),
            };
        }
        match self.call(FsOp::Write {
            ino,
            offset,
            data: data.to_vec(),
        }) {
            Ok(Response::Count(n)) => {
                if direct {
                    // A direct write left the pages other descriptors cached as they were.
                    self.drop_cached(fuse_ino, offset, n as usize, true);
                }
                reply.written(n as u32)
            }
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.count();
        // Writes reach the node before they return: nothing is buffered here.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.count();
        let r = self.call(FsOp::Fsync {
            ino: self.shared.ours(ino),
        });
        self.empty(r, reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.count();
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let epoch = self.shared.inval_epoch();
        match self.listing(self.shared.ours(ino)) {
            Ok(l) => {
                lock(&self.dirs).insert(fh, (l, Some(epoch)));
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.count();
        let l = match self.dir_listing(self.shared.ours(ino), fh, offset) {
            Ok(l) => l,
            Err(e) => return reply.error(e),
        };
        for (k, (e, t, name, _)) in l.iter().enumerate().skip(offset as usize) {
            if reply.add(
                self.shared.fuse(*e),
                k as u64 + 1,
                *t,
                OsStr::from_bytes(name),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        self.count();
        let dir = self.shared.ours(ino);
        let l = match self.dir_listing(dir, fh, offset) {
            Ok(l) => l,
            Err(e) => return reply.error(e),
        };
        for (k, (e, t, name, i)) in l.iter().enumerate().skip(offset as usize) {
            let attr = match i {
                Some(i) => self.attr(i),
                // `.` and `..`: the kernel makes no entry of them.
                None => FileAttr {
                    ino: self.shared.fuse(*e),
                    kind: *t,
                    ..self.attr(&Inode {
                        ino: *e,
                        mode: libc::S_IFDIR,
                        ..Inode::default()
                    })
                },
            };
            if i.is_some() {
                self.shared.hand_out(dir, name, *e);
            }
            if reply.add(
                self.shared.fuse(*e),
                k as u64 + 1,
                OsStr::from_bytes(name),
                &self.opts.ttl,
                &attr,
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.count();
        let ino = self.shared.ours(ino);
        let last = {
            let mut open = lock(&self.open);
            match open.get_mut(&ino) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                Some(_) => {
                    open.remove(&ino);
                    true
                }
                None => false,
            }
        };
        if last && lock(&self.orphans).remove(&ino) {
            // Its last name went while it was open: the node frees it now (unless a
            // name was added since).
            let _ = self.call(FsOp::Reclaim { ino });
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.count();
        lock(&self.dirs).remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.count();
        let r = self.call(FsOp::Fsync {
            ino: self.shared.ours(ino),
        });
        self.empty(r, reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.count();
        match self.call(FsOp::Statfs) {
            Ok(Response::StatFs(s)) => reply.statfs(
                s.blocks,
                s.bfree,
                s.bfree,
                1 << 40,
                1 << 40,
                s.bsize as u32,
                s.namelen as u32,
                s.bsize as u32,
            ),
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        self.count();
        if let Err(e) = self.rofs() {
            return reply.error(e);
        }
        let mode = if flags & libc::XATTR_CREATE != 0 {
            XattrMode::Create
        } else if flags & libc::XATTR_REPLACE != 0 {
            XattrMode::Replace
        } else {
            XattrMode::Any
        };
        let r = self.call(FsOp::Setxattr {
            ino: self.shared.ours(ino),
            name: name.as_bytes().to_vec(),
            value: value.to_vec(),
            mode,
        });
        self.empty(r, reply);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.count();
        match self.call(FsOp::Getxattr {
            ino: self.shared.ours(ino),
            name: name.as_bytes().to_vec(),
        }) {
            Ok(Response::Data(v)) => xattr_reply(&v, size, reply),
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.count();
        match self.call(FsOp::Listxattr {
            ino: self.shared.ours(ino),
        }) {
            Ok(Response::Names(names)) => {
                let mut v = Vec::new();
                for n in names {
                    v.extend_from_slice(&n);
                    v.push(0);
                }
                xattr_reply(&v, size, reply)
            }
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let op = FsOp::Removexattr {
            ino: self.shared.ours(ino),
            name: name.as_bytes().to_vec(),
        };
        self.change(op, reply);
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        self.count();
        let i = match self.inode(FsOp::Getattr {
            ino: self.shared.ours(ino),
        }) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        let mask = mask.bits() as u32 & 7;
        if mask & 2 != 0 && self.opts.read_only {
            return reply.error(Errno::EROFS);
        }
        if may_access(&i, req.uid(), req.gid(), mask) {
            reply.ok()
        } else {
            reply.error(Errno::EACCES)
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        self.count();
        if let Err(e) = self.rofs() {
            return reply.error(e);
        }
        let p = self.shared.ours(parent);
        let name = name.as_bytes();
        let generation = self.shared.bucket_generation(p, name);
        let mut r = self.inode(FsOp::Create {
            parent: p,
            name: name.to_vec(),
            mode,
            uid: req.uid(),
            gid: req.gid(),
        });
        if r == Err(Errno::EEXIST) && flags & libc::O_EXCL == 0 {
            // Created meanwhile (by another node): open it.
            r = self.inode(FsOp::Lookup {
                parent: p,
                name: name.to_vec(),
            });
            if let (Ok(i), true) = (&r, flags & libc::O_TRUNC != 0) {
                let ino = i.ino;
                r = self.set(
                    ino,
                    SetAttr {
                        size: Some(0),
                        ..Default::default()
                    },
                );
            }
        }
        match r {
            Ok(i) => {
                self.shared.hand_out(p, name, i.ino);
                self.opened(i.ino);
                let (fh, fopen) = open_mode(flags, self.shared.truncated_lately(i.ino));
                // A file made here counts as truncated lately for the other descriptors
                // opened on it here soon (direct I/O): its first truncation may come
                // before this mount sees its count move, and a page-cache read racing it
                // can be zero-filled by the kernel under the old size (the rewrite test).
                self.shared.saw_truncations(i.ino, i.truncations);
                let ttl = self.name_ttl(p, name, generation);
                reply.created(&ttl, &self.attr(&i), Generation(0), fh, fopen)
            }
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.count();
        if let Err(e) = self.rofs() {
            return reply.error(e);
        }
        // Blocks are not reserved ahead (a log allocates at write-back): mode 0 extends
        // the size, KEEP_SIZE alone has nothing to do, PUNCH_HOLE (with KEEP_SIZE, as
        // Linux requires) zeroes the range; the other modes are not supported.
        let ino = self.shared.ours(ino);
        let end = offset.saturating_add(length);
        let op = match mode {
            0 => FsOp::Extend { ino, end },
            libc::FALLOC_FL_KEEP_SIZE => FsOp::Getattr { ino },
            m if m == libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE => FsOp::PunchHole {
                ino,
                offset,
                len: length,
            },
            _ => return reply.error(Errno::EOPNOTSUPP),
        };
        let r = self.call(op).map(|_| Response::Ok);
        self.empty(r, reply)
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        self.count();
        let i = match self.inode(FsOp::Getattr {
            ino: self.shared.ours(ino),
        }) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        match seek(&i, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(e),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        _fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        _fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        self.count();
        if let Err(e) = self.rofs() {
            return reply.error(e);
        }
        // Cheap here: the bytes go node -> front -> node without the kernel's copies.
        let len = len.min(1 << 24) as usize;
        let data = match self.call(FsOp::Read {
            ino: self.shared.ours(ino_in),
            offset: offset_in,
            len,
        }) {
            Ok(Response::Data(d)) => d,
            Ok(_) => return reply.error(Errno::EIO),
            Err(e) => return reply.error(e),
        };
        if data.is_empty() {
            return reply.written(0);
        }
        match self.call(FsOp::Write {
            ino: self.shared.ours(ino_out),
            offset: offset_out,
            data,
        }) {
            Ok(Response::Count(n)) => reply.written(n as u32),
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        }
    }
}
