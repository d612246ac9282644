//! The mount's handle on its node: [`Front`], its pooled control-socket connections and the
//! helpers the FUSE operations share (errors, counters, directory listings).

use super::*;

/// A directory listing taken at `opendir` (and again at offset 0).
pub(crate) type Listing = Arc<Vec<(u64, FileType, Vec<u8>, Option<Inode>)>>;

/// The file handle of a descriptor whose reads and writes bypass the kernel's page cache
/// (`FOPEN_DIRECT_IO`): one opened with `O_APPEND`, because its writes land where the node
/// says, not where the kernel would have put them; one opened on a file truncated lately
/// ([`open_mode`]). Every other descriptor is handle 0.
pub(crate) const FH_DIRECT: FileHandle = FileHandle(1);

/// How long after a truncation of a file this mount saw its descriptors go around the
/// page cache ([`open_mode`]).
pub(crate) const TRUNCATED_DIRECT: Duration = Duration::from_secs(2);

/// The handle and open flags for a descriptor opened with `flags`: the page cache stays
/// valid across opens (invalidations keep it coherent); a descriptor goes around it
/// ([`FH_DIRECT`]) if opened with `O_APPEND`, or if this mount saw the file truncated
/// lately (`truncated_lately`, within [`TRUNCATED_DIRECT`]; an `open(O_TRUNC)` truncates
/// before it opens).
///
/// The latter closes a race in the kernel's page cache that no answer of ours can: a read
/// that finds no page asks for it; the file is truncated before the answer, which comes
/// back short (the kernel fills the rest of the page with zeros); the file is written
/// again before the reader looks at the size; the reader copies the new size's worth of
/// that zero page: NULs that were never written. A direct read takes its bytes and its
/// length from one answer of the node, which never pairs a new size with data that is
/// not there yet.
pub(crate) fn open_mode(flags: i32, truncated_lately: bool) -> (FileHandle, FopenFlags) {
    if flags & libc::O_APPEND != 0 || truncated_lately {
        (
            FH_DIRECT,
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_KEEP_CACHE,
        )
    } else {
        (FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE)
    }
}

/// The kernel's page size, for invalidation ranges.
const PAGE_BYTES: u64 = 4096;

/// How the mount reaches its node's client.
pub enum NodeLink {
    /// The node runs in this process (`xfsam-mount --serve`): each FUSE request is a call
    /// into its client API, no socket, no encoding.
    Hosted(Arc<Node>),
    /// The node is another process: requests go over its control socket (a pool of
    /// connections, one per FUSE thread at most).
    Socket {
        /// The node's control socket.
        control: PathBuf,
        /// Idle connections.
        pool: Mutex<Vec<Control>>,
    },
}

impl NodeLink {
    /// The node at control socket `control` (connected on first use).
    pub fn socket(control: PathBuf) -> NodeLink {
        NodeLink::Socket {
            control,
            pool: Mutex::new(Vec::new()),
        }
    }

    /// Which link, for the mount's state file (`link hosted` or `link socket`).
    pub fn kind(&self) -> &'static str {
        match self {
            NodeLink::Hosted(_) => "hosted",
            NodeLink::Socket { .. } => "socket",
        }
    }

    /// Run `op` on the node's client: its answer, or why the node could not be asked.
    fn call(&self, op: FsOp) -> Result<Response, ControlError> {
        match self {
            NodeLink::Hosted(node) => Ok(node.request(CtlRequest::Fs(op))),
            NodeLink::Socket { control, pool } => {
                let conn = lock(pool).pop();
                let mut c = match conn {
                    Some(c) => c,
                    None => Control::connect(control)?,
                };
                let r = c.call(&CtlRequest::Fs(op))?;
                lock(pool).push(c);
                Ok(r)
            }
        }
    }
}

/// The FUSE file system: one node's client.
pub struct Front {
    pub(crate) opts: Options,
    pub(crate) shared: Arc<Shared>,
    pub(crate) link: NodeLink,
    /// Open directory handles: the listing, and, while no readdir has used it, the
    /// invalidation count when `opendir` began to take it: the first readdir at offset 0
    /// takes that listing if no invalidation came since; a later one (a rewind) lists
    /// again.
    pub(crate) dirs: Mutex<HashMap<u64, (Listing, Option<u64>)>>,
    pub(crate) next_fh: AtomicU64,
    /// Open files (our index numbers) and how many times each is open.
    pub(crate) open: Mutex<HashMap<u64, u32>>,
    /// Open files whose last name may have gone while they were open: their blocks are
    /// kept until the last close, which asks the node to reclaim them.
    pub(crate) orphans: Mutex<HashSet<u64>>,
}

impl Front {
    /// The front of the node reached by `link`.
    pub fn new(opts: Options, link: NodeLink) -> Result<Front, FrontError> {
        let root = match link.call(FsOp::Root).map_err(FrontError::node)? {
            Response::Ino(r) => r,
            Response::Err { message, .. } => return Err(FrontError::Node(message)),
            other => return Err(FrontError::Unexpected(Box::new(other))),
        };
        Ok(Front {
            opts,
            shared: Arc::new(Shared {
                stats: Stats::default(),
                root,
                names: Mutex::new(HashMap::new()),
                inos: Mutex::new(HashSet::new()),
                truncations: Mutex::new(HashMap::new()),
                inval_epoch: AtomicU64::new(0),
                bucket_generations: crate::names::bucket_generations(),
                kernel: std::sync::OnceLock::new(),
            }),
            link,
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

    /// Which link the front uses (`hosted`, `socket`).
    pub fn link_kind(&self) -> &'static str {
        self.link.kind()
    }

    pub(crate) fn call(&self, op: FsOp) -> Result<Response, Errno> {
        match self.link.call(op) {
            Ok(Response::Err { errno: e, .. }) => Err(errno(e)),
            Ok(r) => Ok(r),
            Err(e) => {
                self.node_error(&e);
                Err(Errno::EIO)
            }
        }
    }

    pub(crate) fn node_error(&self, e: &dyn std::fmt::Display) {
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

    pub(crate) fn inode(&self, op: FsOp) -> Result<Inode, Errno> {
        match self.call(op)? {
            Response::Attr(i) => Ok(*i),
            _ => Err(Errno::EIO),
        }
    }

    pub(crate) fn attr(&self, i: &Inode) -> FileAttr {
        if i.kind == Some(Kind::File) && i.truncations > 0 {
            self.shared.saw_truncations(i.ino, i.truncations);
        }
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

    /// Answer a request for an entry (`negative`: a lookup, whose ENOENT becomes a negative
    /// entry; a mkdir or symlink that fails with ENOENT is an error). `generation`: the
    /// bucket's invalidation count read before the node was asked.
    pub(crate) fn entry(
        &self,
        parent: u64,
        name: &[u8],
        r: Result<Inode, Errno>,
        negative: bool,
        generation: u64,
        reply: ReplyEntry,
    ) {
        match r {
            Ok(i) => {
                self.shared.hand_out(parent, name, i.ino);
                let ttl = self.name_ttl(parent, name, generation);
                reply.entry(&ttl, &self.attr(&i), Generation(0));
            }
            Err(e) if e == Errno::ENOENT && negative && !self.opts.ttl.is_zero() => {
                // A negative entry: the kernel remembers for the TTL that the name is
                // absent. Remembered under its bucket before the answer, as a positive
                // name is, so that the bucket's invalidation (another node created the
                // name) expires it; the kernel runs that expiry only after this lookup
                // is done (it takes the directory's lock the lookup holds). If the
                // bucket was invalidated since the node answered, plain ENOENT.
                self.shared.remember(parent, name);
                if self.name_ttl(parent, name, generation).is_zero() {
                    return reply.error(e);
                }
                reply.entry_with_ttls(
                    &Duration::ZERO,
                    &self.opts.ttl,
                    &negative_attr(),
                    Generation(0),
                );
            }
            Err(e) => reply.error(e),
        }
    }

    /// How long the kernel may keep a name just remembered: the TTL, or nothing if its
    /// bucket was invalidated since `generation` was read (that invalidation may have
    /// come before the name was remembered, and then did not expire it).
    pub(crate) fn name_ttl(&self, parent: u64, name: &[u8], generation: u64) -> Duration {
        if self.shared.bucket_generation(parent, name) == generation {
            self.opts.ttl
        } else {
            self.shared
                .stats
                .names_uncached
                .fetch_add(1, Ordering::Relaxed);
            Duration::ZERO
        }
    }

    pub(crate) fn empty(&self, r: Result<Response, Errno>, reply: ReplyEmpty) {
        match r {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    pub(crate) fn count(&self) {
        self.shared.stats.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// A change with an empty answer (count it; refused on a read-only mount).
    pub(crate) fn change(&self, op: FsOp, reply: ReplyEmpty) {
        self.count();
        match self.rofs() {
            Ok(()) => self.empty(self.call(op), reply),
            Err(e) => reply.error(e),
        }
    }

    /// The files open on this mount (their blocks outlive their last name).
    pub(crate) fn open_files(&self) -> Vec<u64> {
        lock(&self.open).keys().copied().collect()
    }

    /// The answer to an unlink or rename: the node names the open file whose last name
    /// went (freed at its last close here).
    pub(crate) fn orphaned(&self, r: Result<Response, Errno>) -> Result<Response, Errno> {
        if let Ok(Response::Ino(ino)) = &r {
            lock(&self.orphans).insert(*ino);
        }
        r
    }

    /// A write that must clear the file's set-user-ID and set-group-ID bits.
    pub(crate) fn kill_suid_sgid(&self, ino: u64) {
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

    /// Drop this kernel's attributes of `ino` and the pages it caches where `len` bytes
    /// just landed at `at`: an append lands where the kernel did not put it, and a direct
    /// write goes around the pages other descriptors cached. On a direct descriptor the
    /// kernel holds no page lock while it waits for the write, so this happens before the
    /// reply (the writer's next operation sees it). A cached descriptor (given `O_APPEND`
    /// later, by `fcntl`) keeps its last page locked until the reply and also put the
    /// bytes in its pages at its own offset: the whole file's pages are dropped from
    /// another thread, once the write has returned.
    pub(crate) fn drop_cached(&self, ino: INodeNo, at: u64, len: usize, direct: bool) {
        let Some(k) = self.shared.kernel.get().cloned() else {
            return;
        };
        self.shared
            .stats
            .kernel_calls
            .fetch_add(1, Ordering::Relaxed);
        if direct {
            let start = at & !(PAGE_BYTES - 1);
            let _ = k.inval_inode(ino.0, start as i64, (at + len as u64 - start) as i64);
        } else {
            std::thread::spawn(move || {
                let _ = k.inval_inode(ino.0, 0, 0);
            });
        }
    }

    pub(crate) fn opened(&self, ino: u64) {
        *lock(&self.open).entry(ino).or_insert(0) += 1;
    }

    /// A new name for an inode in `parent` (count it; refused on a read-only mount).
    pub(crate) fn made(&self, parent: u64, name: &[u8], op: FsOp, reply: ReplyEntry) {
        self.count();
        match self.rofs() {
            Ok(()) => {
                let generation = self.shared.bucket_generation(parent, name);
                self.entry(parent, name, self.inode(op), false, generation, reply)
            }
            Err(e) => reply.error(e),
        }
    }

    /// An answer of bytes.
    pub(crate) fn bytes(&self, op: FsOp, reply: ReplyData) {
        self.count();
        match self.call(op) {
            Ok(Response::Data(d)) => reply.data(&d),
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        }
    }

    pub(crate) fn rofs(&self) -> Result<(), Errno> {
        if self.opts.read_only {
            Err(Errno::EROFS)
        } else {
            Ok(())
        }
    }

    pub(crate) fn listing(&self, ino: u64) -> Result<Listing, Errno> {
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

    pub(crate) fn dir_listing(
        &self,
        ino: u64,
        fh: FileHandle,
        offset: u64,
    ) -> Result<Listing, Errno> {
        {
            let mut dirs = lock(&self.dirs);
            if let Some((l, fresh)) = dirs.get_mut(&fh.0) {
                let unchanged = fresh.take() == Some(self.shared.inval_epoch());
                if offset > 0 || unchanged {
                    // Shared, not copied: a large directory is read in many calls.
                    return Ok(l.clone());
                }
            }
        }
        let l = self.listing(ino)?;
        lock(&self.dirs).insert(fh.0, (l.clone(), None));
        Ok(l)
    }

    pub(crate) fn set(&self, ino: u64, a: SetAttr) -> Result<Inode, Errno> {
        self.inode(FsOp::Setattr { ino, attr: a })
    }
}

/// The attributes of a negative entry: node id 0 tells the kernel the name is absent.
fn negative_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: BLOCK as u32,
        flags: 0,
    }
}
