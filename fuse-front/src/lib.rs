//! The FUSE front of the file system: every FUSE operation mapped to the `xfs-node` client
//! API of one node (over the node's control socket), and the kernel's caches kept coherent
//! with the cluster's.
//!
//! * **Caching on.** Entries and attributes are cached by the kernel for [`Options::ttl`],
//!   file pages are kept across opens (`FOPEN_KEEP_CACHE`), no `direct_io`.
//! * **Coherence reaches the kernel.** The node's shard loops run with an external kernel:
//!   when this node's client loses a block (a revoke for another node's write, or an
//!   eviction), the node sends it on the mount's invalidation stream ([`Request::Subscribe`])
//!   and acknowledges the revoke only when the front answers. The front's invalidation
//!   thread turns each block into the kernel's terms — an inode block into
//!   `notify_inval_inode(ino, -1)` (attributes), a directory bucket into `notify_inval_entry`
//!   for every name of that bucket the kernel was given, a data block into
//!   `notify_inval_inode(ino, offset, 4096)` — and answers once the kernel returned. It never
//!   runs in a shard loop or a FUSE handler. Because the kernel holds page and directory locks
//!   while it waits for this daemon, an invalidation can wait for an operation of this mount
//!   that itself waits for the revoke: an invalidation that has not returned within
//!   [`Options::inval_wait`] is answered anyway and counted (`inval_late`); it completes when
//!   the kernel lets go (see docs/fuse.md for what that allows).
//! * Permission checks are the kernel's (`default_permissions`), as a local file system.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use xfs_node::fs::client::{RenameMode, SetAttr, XattrMode};
use xfs_node::fs::layout::{bucket_of, ino_of, Entry, Inode, Kind, BLOCK, INODE_BLOCK};
use xfs_node::node::control::{self, Control, FsOp, Request as CtlRequest, Response};

/// Mount settings.
#[derive(Clone, Debug)]
pub struct Options {
    /// The node's control socket.
    pub control: PathBuf,
    /// How long the kernel may cache entries and attributes (invalidations keep them
    /// coherent; the timeout only bounds what a lost invalidation could leave).
    pub ttl: Duration,
    /// How long an invalidation may wait for the kernel before the revoke is answered.
    pub inval_wait: Duration,
    /// Read-only mount.
    pub read_only: bool,
}

/// Counters of the front (written to the state file, read by tests and `status`).
#[derive(Default, Debug)]
pub struct Stats {
    /// FUSE requests of any kind.
    pub requests: AtomicU64,
    /// `read` requests (the kernel's page cache missed).
    pub reads: AtomicU64,
    /// `write` requests.
    pub writes: AtomicU64,
    /// `lookup` requests.
    pub lookups: AtomicU64,
    /// `getattr` requests.
    pub getattrs: AtomicU64,
    /// Blocks the node asked to invalidate.
    pub invalidations: AtomicU64,
    /// Kernel calls made for them (inodes, pages and entries).
    pub kernel_calls: AtomicU64,
    /// Invalidations answered before the kernel returned (it waited for this mount).
    pub inval_late: AtomicU64,
    /// Requests that failed because the node could not be reached.
    pub node_errors: AtomicU64,
}

impl Stats {
    /// `name value` lines.
    pub fn render(&self) -> String {
        let v = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "requests {}\nreads {}\nwrites {}\nlookups {}\ngetattrs {}\ninvalidations {}\n\
             kernel_calls {}\ninval_late {}\nnode_errors {}\n",
            v(&self.requests),
            v(&self.reads),
            v(&self.writes),
            v(&self.lookups),
            v(&self.getattrs),
            v(&self.invalidations),
            v(&self.kernel_calls),
            v(&self.inval_late),
            v(&self.node_errors)
        )
    }
}

/// Names given to the kernel, by (directory, bucket).
type NamesByBucket = HashMap<(u64, u64), HashSet<Vec<u8>>>;

/// What the front and its invalidation thread share.
pub struct Shared {
    /// Counters.
    pub stats: Stats,
    /// The root's index number in the file system (FUSE calls it 1).
    root: u64,
    /// Names handed to the kernel, by (directory, bucket): what an invalidation of that
    /// bucket must drop.
    names: Mutex<NamesByBucket>,
    /// Index numbers handed to the kernel (dropped wholesale when the node's stream breaks).
    inos: Mutex<HashSet<u64>>,
}

impl Shared {
    /// FUSE's number for index number `ino` (the root and 1 trade places).
    fn fuse(&self, ino: u64) -> INodeNo {
        INodeNo(swap(ino, self.root))
    }

    fn ours(&self, ino: INodeNo) -> u64 {
        swap(ino.0, self.root)
    }

    /// The kernel was given `ino` under `name` in `parent`.
    fn hand_out(&self, parent: u64, name: &[u8], ino: u64) {
        lock(&self.inos).insert(ino);
        self.remember(parent, name);
    }

    fn remember(&self, parent: u64, name: &[u8]) {
        lock(&self.names)
            .entry((parent, bucket_of(name)))
            .or_default()
            .insert(name.to_vec());
    }
}

fn swap(ino: u64, root: u64) -> u64 {
    if ino == root {
        1
    } else if ino == 1 {
        root
    } else {
        ino
    }
}

fn lock<X>(m: &Mutex<X>) -> std::sync::MutexGuard<'_, X> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn errno(e: i32) -> Errno {
    Errno::from_i32(e)
}

fn time(ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns)
}

fn ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn now() -> u64 {
    ns(SystemTime::now())
}

fn file_type(i: &Inode) -> FileType {
    match i.mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn kind_type(k: Kind) -> FileType {
    match k {
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::File => FileType::RegularFile,
        // The entry does not say which; readdir's type is a hint (DT_UNKNOWN would do).
        Kind::Special => FileType::RegularFile,
    }
}

/// A directory listing taken at `opendir` (and again at offset 0).
type Listing = Arc<Vec<(u64, FileType, Vec<u8>, Option<Inode>)>>;

/// The FUSE file system: one node's client.
pub struct Front {
    opts: Options,
    shared: Arc<Shared>,
    pool: Mutex<Vec<Control>>,
    dirs: Mutex<HashMap<u64, Listing>>,
    next_fh: AtomicU64,
    /// Open files (our index numbers) and how many times each is open.
    open: Mutex<HashMap<u64, u32>>,
    /// Open files whose last name may have gone while they were open: their blocks are
    /// kept until the last close, which asks the node to reclaim them.
    orphans: Mutex<HashSet<u64>>,
}

impl Front {
    /// Connect to the node at `opts.control`.
    pub fn new(opts: Options) -> Result<Front, String> {
        let mut c = Control::connect(&opts.control)?;
        let root = match c.call_ok(&CtlRequest::Fs(FsOp::Root))? {
            Response::Ino(r) => r,
            other => return Err(format!("unexpected answer {other:?}")),
        };
        Ok(Front {
            opts,
            shared: Arc::new(Shared {
                stats: Stats::default(),
                root,
                names: Mutex::new(HashMap::new()),
                inos: Mutex::new(HashSet::new()),
            }),
            pool: Mutex::new(vec![c]),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            open: Mutex::new(HashMap::new()),
            orphans: Mutex::new(HashSet::new()),
        })
    }

    /// What the invalidation thread needs.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    fn call(&self, op: FsOp) -> Result<Response, Errno> {
        let conn = lock(&self.pool).pop();
        let mut c = match conn {
            Some(c) => c,
            None => Control::connect(&self.opts.control).map_err(|e| {
                self.node_error(&e);
                Errno::EIO
            })?,
        };
        match c.call(&CtlRequest::Fs(op)) {
            Ok(Response::Err { errno: e, .. }) => {
                lock(&self.pool).push(c);
                Err(errno(e))
            }
            Ok(r) => {
                lock(&self.pool).push(c);
                Ok(r)
            }
            Err(e) => {
                self.node_error(&e);
                Err(Errno::EIO)
            }
        }
    }

    fn node_error(&self, e: &str) {
        if self
            .shared
            .stats
            .node_errors
            .fetch_add(1, Ordering::Relaxed)
            < 10
        {
            eprintln!("xfsam-mount: the node does not answer: {e}");
        }
    }

    fn inode(&self, op: FsOp) -> Result<Inode, Errno> {
        match self.call(op)? {
            Response::Attr(i) => Ok(*i),
            _ => Err(Errno::EIO),
        }
    }

    fn attr(&self, i: &Inode) -> FileAttr {
        let blocks: u64 = i
            .extents
            .iter()
            .map(|(s, e)| e - s)
            .sum::<u64>()
            .min(i.size.div_ceil(BLOCK as u64))
            * (BLOCK as u64 / 512);
        FileAttr {
            ino: self.shared.fuse(i.ino),
            size: i.size,
            blocks,
            atime: time(i.atime),
            mtime: time(i.mtime),
            ctime: time(i.ctime),
            crtime: time(i.btime),
            kind: file_type(i),
            perm: (i.mode & 0o7777) as u16,
            nlink: i.nlink,
            uid: i.uid,
            gid: i.gid,
            rdev: i.rdev as u32,
            blksize: BLOCK as u32,
            flags: 0,
        }
    }

    fn entry(&self, parent: u64, name: &[u8], r: Result<Inode, Errno>, reply: ReplyEntry) {
        match r {
            Ok(i) => {
                self.shared.hand_out(parent, name, i.ino);
                reply.entry(&self.opts.ttl, &self.attr(&i), Generation(0));
            }
            Err(e) => reply.error(e),
        }
    }

    fn empty(&self, r: Result<Response, Errno>, reply: ReplyEmpty) {
        match r {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn count(&self) {
        self.shared.stats.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// A change with an empty answer (count it; refused on a read-only mount).
    fn change(&self, op: FsOp, reply: ReplyEmpty) {
        self.count();
        match self.rofs() {
            Ok(()) => self.empty(self.call(op), reply),
            Err(e) => reply.error(e),
        }
    }

    /// The files open on this mount (their blocks outlive their last name).
    fn open_files(&self) -> Vec<u64> {
        lock(&self.open).keys().copied().collect()
    }

    /// The answer to an unlink or rename: the node names the open file whose last name
    /// went (freed at its last close here).
    fn orphaned(&self, r: Result<Response, Errno>) -> Result<Response, Errno> {
        if let Ok(Response::Ino(ino)) = &r {
            lock(&self.orphans).insert(*ino);
        }
        r
    }

    fn opened(&self, ino: u64) {
        *lock(&self.open).entry(ino).or_insert(0) += 1;
    }

    /// A new name for an inode in `parent` (count it; refused on a read-only mount).
    fn made(&self, parent: u64, name: &[u8], op: FsOp, reply: ReplyEntry) {
        self.count();
        match self.rofs() {
            Ok(()) => self.entry(parent, name, self.inode(op), reply),
            Err(e) => reply.error(e),
        }
    }

    /// An answer of bytes.
    fn bytes(&self, op: FsOp, reply: ReplyData) {
        self.count();
        match self.call(op) {
            Ok(Response::Data(d)) => reply.data(&d),
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        }
    }

    fn rofs(&self) -> Result<(), Errno> {
        if self.opts.read_only {
            Err(Errno::EROFS)
        } else {
            Ok(())
        }
    }

    fn listing(&self, ino: u64) -> Result<Listing, Errno> {
        let me = self.inode(FsOp::Getattr { ino })?;
        if me.kind != Some(Kind::Dir) {
            return Err(Errno::ENOTDIR);
        }
        let parent = if me.parent == 0 { ino } else { me.parent };
        let Response::Entries(v) = self.call(FsOp::Readdir { ino })? else {
            return Err(Errno::EIO);
        };
        let mut out = vec![
            (ino, FileType::Directory, b".".to_vec(), None),
            (parent, FileType::Directory, b"..".to_vec(), None),
        ];
        for (Entry { name, ino: e, kind }, i) in v {
            let t = if kind == Kind::Special {
                file_type(&i)
            } else {
                kind_type(kind)
            };
            out.push((e, t, name, Some(i)));
        }
        Ok(Arc::new(out))
    }

    fn dir_listing(&self, ino: u64, fh: FileHandle, offset: u64) -> Result<Listing, Errno> {
        if offset == 0 || !lock(&self.dirs).contains_key(&fh.0) {
            let l = self.listing(ino)?;
            lock(&self.dirs).insert(fh.0, l);
        }
        // Shared, not copied: a large directory is read in many calls.
        Ok(lock(&self.dirs).get(&fh.0).cloned().unwrap_or_default())
    }

    fn set(&self, ino: u64, a: SetAttr) -> Result<Inode, Errno> {
        self.inode(FsOp::Setattr { ino, attr: a })
    }
}

fn time_or_now(t: Option<TimeOrNow>) -> Option<u64> {
    t.map(|t| match t {
        TimeOrNow::SpecificTime(s) => ns(s),
        TimeOrNow::Now => now(),
    })
}

impl Filesystem for Front {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let want = InitFlags::FUSE_ASYNC_READ
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
        let r = self.inode(FsOp::Lookup {
            parent: p,
            name: name.to_vec(),
        });
        self.entry(p, name, r, reply);
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

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.count();
        self.opened(self.shared.ours(ino));
        // The page cache stays valid across opens: invalidations keep it coherent.
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
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
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.count();
        self.shared.stats.writes.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.rofs() {
            return reply.error(e);
        }
        let ino = self.shared.ours(ino);
        if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            if let Ok(i) = self.inode(FsOp::Getattr { ino }) {
                if i.mode & (libc::S_ISUID | libc::S_ISGID) != 0 {
                    let _ = self.set(
                        ino,
                        SetAttr {
                            mode: Some(i.mode & !(libc::S_ISUID | libc::S_ISGID)),
                            ..Default::default()
                        },
                    );
                }
            }
        }
        match self.call(FsOp::Write {
            ino,
            offset,
            data: data.to_vec(),
        }) {
            Ok(Response::Count(n)) => reply.written(n as u32),
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
        match self.listing(self.shared.ours(ino)) {
            Ok(l) => {
                lock(&self.dirs).insert(fh, l);
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
                reply.created(
                    &self.opts.ttl,
                    &self.attr(&i),
                    Generation(0),
                    FileHandle(0),
                    FopenFlags::FOPEN_KEEP_CACHE,
                )
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
        // the size, KEEP_SIZE has nothing to do, the rest is not supported.
        if mode & !libc::FALLOC_FL_KEEP_SIZE != 0 {
            return reply.error(Errno::EOPNOTSUPP);
        }
        let ino = self.shared.ours(ino);
        let i = match self.inode(FsOp::Getattr { ino }) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        let end = offset.saturating_add(length);
        if mode == 0 && end > i.size {
            let r = self
                .set(
                    ino,
                    SetAttr {
                        size: Some(end),
                        ..Default::default()
                    },
                )
                .map(|_| Response::Ok);
            return self.empty(r, reply);
        }
        reply.ok()
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

fn xattr_reply(v: &[u8], size: u32, reply: ReplyXattr) {
    if size == 0 {
        reply.size(v.len() as u32)
    } else if v.len() > size as usize {
        reply.error(Errno::ERANGE)
    } else {
        reply.data(v)
    }
}

/// Whether `uid`/`gid` may access `i` for `mask` (R=4, W=2, X=1), as `access(2)`.
pub fn may_access(i: &Inode, uid: u32, gid: u32, mask: u32) -> bool {
    if uid == 0 {
        // Root may do anything but execute a file without any execute bit.
        return mask & 1 == 0 || i.mode & libc::S_IFMT == libc::S_IFDIR || i.mode & 0o111 != 0;
    }
    let bits = if uid == i.uid {
        (i.mode >> 6) & 7
    } else if gid == i.gid {
        (i.mode >> 3) & 7
    } else {
        i.mode & 7
    };
    bits & mask == mask
}

/// `SEEK_DATA` / `SEEK_HOLE` from the inode's extents (a superset of the written blocks:
/// a hole may read as data, never the reverse).
pub fn seek(i: &Inode, offset: i64, whence: i32) -> Result<i64, Errno> {
    if offset < 0 {
        return Err(Errno::EINVAL);
    }
    let off = offset as u64;
    let bs = BLOCK as u64;
    match whence {
        libc::SEEK_DATA | libc::SEEK_HOLE if off >= i.size => Err(Errno::ENXIO),
        libc::SEEK_DATA => {
            for (s, e) in &i.extents {
                if e * bs > off {
                    let at = (s * bs).max(off);
                    return if at < i.size {
                        Ok(at as i64)
                    } else {
                        Err(Errno::ENXIO)
                    };
                }
            }
            Err(Errno::ENXIO)
        }
        libc::SEEK_HOLE => {
            let mut at = off;
            for (s, e) in &i.extents {
                if s * bs <= at && at < e * bs {
                    at = e * bs;
                }
            }
            Ok(at.min(i.size) as i64)
        }
        libc::SEEK_SET => Ok(offset),
        _ => Err(Errno::EINVAL),
    }
}

/// The invalidation thread: subscribe to the node's invalidations and carry each to the
/// kernel (see the module docs). Returns when `stop` is set; reconnects when the node
/// goes away and comes back.
pub fn invalidations(
    control: &Path,
    first: Control,
    notifier: KernelChannel,
    shared: Arc<Shared>,
    wait: Duration,
    stop: Arc<AtomicBool>,
) {
    let mut warned = false;
    let mut first = Some(first);
    while !stop.load(Ordering::Relaxed) {
        if let Some(c) = first.take() {
            if let (Ok(r), Ok(w)) = (c.stream().try_clone(), c.stream().try_clone()) {
                serve_stream(r, w, &notifier, &shared, wait, &stop);
            }
            continue;
        }
        let mut c = match Control::connect(control) {
            Ok(c) => c,
            Err(e) => {
                if !warned {
                    eprintln!("xfsam-mount: invalidation stream: {e} (retrying)");
                    warned = true;
                }
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
        };
        match c.call(&CtlRequest::Subscribe) {
            Ok(Response::Ok) => warned = false,
            other => {
                eprintln!("xfsam-mount: subscribing to invalidations: {other:?}");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        }
        // The stream broke (the node restarted, or was unreachable): its client may have
        // lost blocks without telling us. Drop everything the kernel caches.
        forget_everything(&notifier, &shared);
        let (Ok(r), Ok(w)) = (c.stream().try_clone(), c.stream().try_clone()) else {
            continue;
        };
        serve_stream(r, w, &notifier, &shared, wait, &stop);
    }
}

/// Subscribe to node's invalidations on a new connection (before mounting: a node takes
/// one mount, and a mount without invalidations would not be coherent).
pub fn subscribe(control: &Path) -> Result<Control, String> {
    let mut c = Control::connect(control)?;
    match c.call(&CtlRequest::Subscribe)? {
        Response::Ok => Ok(c),
        Response::Err { message, .. } => Err(message),
        other => Err(format!("unexpected answer {other:?}")),
    }
}

/// Drop the pages and attributes of every inode and expire every name handed to the
/// kernel.
fn forget_everything(n: &KernelChannel, sh: &Shared) {
    let inos: Vec<u64> = lock(&sh.inos).iter().copied().collect();
    for ino in inos {
        let _ = n.inval_inode(sh.fuse(ino).0, 0, 0);
    }
    let names = std::mem::take(&mut *lock(&sh.names));
    for ((dir, _), set) in names {
        for name in set {
            let _ = n.expire_entry(sh.fuse(dir).0, &name);
        }
    }
}

/// Batches given to the kernel and not answered yet: id -> (deadline, blocks).
type Pending = Mutex<HashMap<u64, (std::time::Instant, Vec<u64>)>>;

/// One subscription: batches go to workers (a kernel call that blocks — the kernel waits
/// for this mount — holds up neither the stream nor other batches); a worker answers its
/// batch when the kernel returned, a watchdog answers it at its deadline, whichever is
/// first (once).
fn serve_stream(
    mut r: std::os::unix::net::UnixStream,
    w: std::os::unix::net::UnixStream,
    notifier: &KernelChannel,
    shared: &Arc<Shared>,
    wait: Duration,
    stop: &Arc<AtomicBool>,
) {
    let w = Arc::new(Mutex::new(w));
    let pending: Arc<Pending> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let answer = {
        let (w, pending) = (w.clone(), pending.clone());
        move |id: u64| {
            let Some((_, blocks)) = lock(&pending).remove(&id) else {
                return false;
            };
            let _ = control::send(&mut *lock(&w), &CtlRequest::KernelDone(blocks));
            true
        }
    };
    let (jobs_tx, jobs_rx) = mpsc::channel::<(u64, Vec<u64>)>();
    let jobs_rx = Arc::new(Mutex::new(jobs_rx));
    let mut threads = Vec::new();
    for _ in 0..4 {
        let (rx, n, sh, answer) = (
            jobs_rx.clone(),
            notifier.clone(),
            shared.clone(),
            answer.clone(),
        );
        threads.push(std::thread::spawn(move || loop {
            let job = lock(&rx).recv();
            let Ok((id, blocks)) = job else {
                return;
            };
            for b in blocks {
                invalidate(&n, &sh, b);
            }
            answer(id);
        }));
    }
    {
        let (pending, done, sh, answer) = (
            pending.clone(),
            done.clone(),
            shared.clone(),
            answer.clone(),
        );
        threads.push(std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(2));
                let now = std::time::Instant::now();
                let late: Vec<u64> = lock(&pending)
                    .iter()
                    .filter(|(_, (d, _))| *d <= now)
                    .map(|(id, _)| *id)
                    .collect();
                for id in late {
                    if answer(id) {
                        sh.stats.inval_late.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    r.set_read_timeout(Some(Duration::from_millis(200))).ok();
    let mut next = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let blocks = match control::recv::<Response>(&mut r) {
            Ok(Some(Response::Invalidate(b))) => b,
            Ok(Some(_)) => continue,
            Ok(None) => break,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                continue
            }
            Err(_) => break,
        };
        shared
            .stats
            .invalidations
            .fetch_add(blocks.len() as u64, Ordering::Relaxed);
        next += 1;
        lock(&pending).insert(next, (std::time::Instant::now() + wait, blocks.clone()));
        if jobs_tx.send((next, blocks)).is_err() {
            break;
        }
    }
    drop(jobs_tx);
    done.store(true, Ordering::Relaxed);
    let _ = lock(&w).shutdown(std::net::Shutdown::Both);
    // Workers blocked in the kernel finish when it lets go; do not wait for them.
    drop(threads);
}

/// Drop what the kernel caches of `block`.
fn invalidate(n: &KernelChannel, sh: &Shared, block: u64) {
    let advisory = block & control::ADVISORY != 0;
    let block = block & !control::ADVISORY;
    let ino = ino_of(block);
    let bn = block & INODE_BLOCK;
    let fi = sh.fuse(ino);
    let calls = &sh.stats.kernel_calls;
    if bn == INODE_BLOCK {
        // Attributes only (a negative offset leaves the pages).
        let _ = n.inval_inode(fi.0, -1, 0);
        calls.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let names = lock(&sh.names).remove(&(ino, bn));
    for name in names.into_iter().flatten() {
        let _ = n.expire_entry(fi.0, &name);
        calls.fetch_add(1, Ordering::Relaxed);
    }
    // An advisory block (the node's CLI changed the file) stands for all its pages.
    let (off, len) = if advisory {
        (0, 0)
    } else {
        ((bn * BLOCK as u64) as i64, BLOCK as i64)
    };
    let _ = n.inval_inode(fi.0, off, len);
    calls.fetch_add(1, Ordering::Relaxed);
}

/// The FUSE device, for notifications to the kernel (a duplicate of the session's fd).
///
/// Written by hand rather than through `fuser::Notifier` for one flag: entries are
/// invalidated with `FUSE_EXPIRE_ONLY` (Linux 6.2), which makes the kernel look the name
/// up again before it next uses it, where a full invalidation would also detach whatever
/// is mounted on the entry (`d_invalidate`) and fail the lookup in progress.
#[derive(Clone)]
pub struct KernelChannel {
    fd: Arc<OwnedFd>,
}

const FUSE_NOTIFY_INVAL_INODE: i32 = 2;
const FUSE_NOTIFY_INVAL_ENTRY: i32 = 3;
const FUSE_EXPIRE_ONLY: u32 = 1;

impl KernelChannel {
    /// Notifications on `fd` (a `/dev/fuse` descriptor of the mount).
    pub fn new(fd: OwnedFd) -> KernelChannel {
        KernelChannel { fd: Arc::new(fd) }
    }

    /// One notification: the out header, then `parts`, in one `writev` (no copy).
    fn send(&self, code: i32, parts: &[&[u8]]) -> std::io::Result<()> {
        let len = 16 + parts.iter().map(|p| p.len()).sum::<usize>();
        let mut head = [0u8; 16];
        head[..4].copy_from_slice(&(len as u32).to_le_bytes());
        head[4..8].copy_from_slice(&code.to_le_bytes());
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; 4];
        for (v, p) in iov
            .iter_mut()
            .zip(std::iter::once(&head[..]).chain(parts.iter().copied()))
        {
            v.iov_base = p.as_ptr() as *mut libc::c_void;
            v.iov_len = p.len();
        }
        let n = (parts.len() + 1).min(iov.len());
        // SAFETY: `n` iovecs point into live buffers of the lengths given; the kernel only
        // reads them.
        let r = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), n as libc::c_int) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            // ENOENT: the kernel does not cache it (any more).
            if e.raw_os_error() == Some(libc::ENOENT) {
                return Ok(());
            }
            return Err(e);
        }
        Ok(())
    }

    /// Drop the attributes of `ino` and, for `offset >= 0`, its pages in
    /// `[offset, offset + len)` (`len <= 0`: to the end).
    pub fn inval_inode(&self, ino: u64, offset: i64, len: i64) -> std::io::Result<()> {
        let mut b = [0u8; 24];
        b[..8].copy_from_slice(&ino.to_le_bytes());
        b[8..16].copy_from_slice(&offset.to_le_bytes());
        b[16..].copy_from_slice(&len.to_le_bytes());
        self.send(FUSE_NOTIFY_INVAL_INODE, &[&b])
    }

    /// Make the kernel look `name` in directory `parent` up again before it uses it.
    pub fn expire_entry(&self, parent: u64, name: &[u8]) -> std::io::Result<()> {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&parent.to_le_bytes());
        b[8..12].copy_from_slice(&(name.len() as u32).to_le_bytes());
        b[12..].copy_from_slice(&FUSE_EXPIRE_ONLY.to_le_bytes());
        self.send(FUSE_NOTIFY_INVAL_ENTRY, &[&b, name, &[0]])
    }
}

/// Mount a FUSE file system at `mountpoint` (root only): returns the `/dev/fuse` descriptor
/// to serve it on. The mount shows as type `fuse.xfsam` with source `fsname`.
pub fn mount_fuse(
    mountpoint: &Path,
    fsname: &str,
    allow_other: bool,
    read_only: bool,
) -> Result<OwnedFd, String> {
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| format!("cannot open /dev/fuse: {e} (load the fuse module: modprobe fuse)"))?;
    let fd: OwnedFd = dev.into();
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut data = format!(
        "fd={},rootmode=40000,user_id={uid},group_id={gid},default_permissions",
        fd.as_raw_fd()
    );
    if allow_other {
        data.push_str(",allow_other");
    }
    let c = |s: &[u8]| std::ffi::CString::new(s).map_err(|_| "a NUL byte in a mount argument");
    let src = c(fsname.as_bytes())?;
    let target = c(mountpoint.as_os_str().as_bytes())?;
    let fstype = c(b"fuse.xfsam")?;
    let data = c(data.as_bytes())?;
    let flags = if read_only { libc::MS_RDONLY } else { 0 };
    // SAFETY: every pointer is a live NUL-terminated string.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        let hint = match e.raw_os_error() {
            Some(libc::EPERM) => " (mounting needs root)",
            Some(libc::EBUSY) => " (something is mounted there already)",
            _ => "",
        };
        return Err(format!(
            "cannot mount at {}: {e}{hint}",
            mountpoint.display()
        ));
    }
    Ok(fd)
}

/// Where a mount of the node with control socket `control` keeps its state (pid, mount
/// point, counters): beside the socket.
pub fn state_path(control: &Path) -> PathBuf {
    let mut s = control.as_os_str().to_owned();
    s.push(".mount");
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(size: u64, extents: Vec<(u64, u64)>) -> Inode {
        Inode {
            ino: 9,
            kind: Some(Kind::File),
            mode: libc::S_IFREG | 0o640,
            uid: 10,
            gid: 20,
            nlink: 1,
            size,
            extents,
            ..Inode::default()
        }
    }

    #[test]
    fn seek_finds_data_and_holes_from_extents() {
        let bs = BLOCK as i64;
        // Data in blocks 2..4 and 10..11 of a 12-block file.
        let i = file(12 * BLOCK as u64, vec![(2, 4), (10, 11)]);
        assert_eq!(seek(&i, 0, libc::SEEK_DATA), Ok(2 * bs));
        assert_eq!(seek(&i, 3 * bs + 5, libc::SEEK_DATA), Ok(3 * bs + 5));
        assert_eq!(seek(&i, 4 * bs, libc::SEEK_DATA), Ok(10 * bs));
        assert_eq!(seek(&i, 11 * bs, libc::SEEK_DATA), Err(Errno::ENXIO));
        assert_eq!(seek(&i, 0, libc::SEEK_HOLE), Ok(0));
        assert_eq!(seek(&i, 2 * bs, libc::SEEK_HOLE), Ok(4 * bs));
        assert_eq!(seek(&i, 10 * bs, libc::SEEK_HOLE), Ok(11 * bs));
        assert_eq!(seek(&i, 12 * bs, libc::SEEK_HOLE), Err(Errno::ENXIO));
        // The end of the file is a hole even inside an extent.
        let j = file(100, vec![(0, 1)]);
        assert_eq!(seek(&j, 0, libc::SEEK_HOLE), Ok(100));
        assert_eq!(seek(&j, -1, libc::SEEK_DATA), Err(Errno::EINVAL));
    }

    #[test]
    fn access_follows_owner_group_other_bits() {
        let i = file(0, vec![]);
        assert!(may_access(&i, 10, 99, 4 | 2));
        assert!(!may_access(&i, 10, 99, 1));
        assert!(may_access(&i, 11, 20, 4));
        assert!(!may_access(&i, 11, 20, 2));
        assert!(!may_access(&i, 11, 21, 4));
        // Root: anything but executing a file with no execute bit.
        assert!(may_access(&i, 0, 0, 4 | 2));
        assert!(!may_access(&i, 0, 0, 1));
    }

    #[test]
    fn the_root_and_ino_1_trade_places() {
        for root in [3u64, 7, 1] {
            for ino in [1u64, 2, 3, 7, 1 << 30] {
                assert_eq!(swap(swap(ino, root), root), ino);
            }
            assert_eq!(swap(root, root), 1);
        }
    }
}
