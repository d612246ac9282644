//! The file system's client API: the operations a POSIX front needs, on index numbers,
//! built from block operations of the coherence protocol ([`Blocks`]). Errors are errno
//! values ([`Errno`]).
//!
//! Every namespace change is a sequence of single-block atomic updates (see
//! [`super::layout`]): a create writes the new inode, then inserts the name into the
//! parent's bucket only if absent (one of two racing creators wins, the other gets
//! `EEXIST`), then bumps the parent's times. Permission checks are the front's job (it knows
//! the caller); this layer checks types, names and emptiness.
//!
//! First-writer: a new index number is drawn from the creating node's own entries of the
//! manager map, so the file's manager (and the log that stores it) is on the creating node.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use super::layout::{
    apply, block_id, bucket_of, decode_bucket, encode_patch, field, inode_block, name_hash, Entry,
    Inode, Kind, Op, RenameIntent, BLOCK, DIR_BUCKETS, MAX_FILE, MAX_NAME,
};
use crate::coherence::{BlockId, NodeId, Outcome, UserOp};

/// An errno value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (errno {})",
            std::io::Error::from_raw_os_error(self.0),
            self.0
        )
    }
}

impl std::error::Error for Errno {}

#[allow(missing_docs)]
impl Errno {
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    pub const EEXIST: Errno = Errno(libc::EEXIST);
    pub const ENOTDIR: Errno = Errno(libc::ENOTDIR);
    pub const EISDIR: Errno = Errno(libc::EISDIR);
    pub const ENOTEMPTY: Errno = Errno(libc::ENOTEMPTY);
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    pub const EIO: Errno = Errno(libc::EIO);
    pub const ENAMETOOLONG: Errno = Errno(libc::ENAMETOOLONG);
    pub const EFBIG: Errno = Errno(libc::EFBIG);
    pub const ENOSPC: Errno = Errno(libc::ENOSPC);
    pub const EPERM: Errno = Errno(libc::EPERM);
    pub const EMLINK: Errno = Errno(libc::EMLINK);
    pub const ENODATA: Errno = Errno(libc::ENODATA);
    pub const ERANGE: Errno = Errno(libc::ERANGE);
    pub const EXDEV: Errno = Errno(libc::EXDEV);
    pub const EBUSY: Errno = Errno(libc::EBUSY);
}

/// The versioned manager map: bits of the index number → manager node (DESIGN.md §4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManagerMap {
    /// Version (bumped when entries move).
    pub version: u64,
    /// Entry e manages the index numbers `ino % entries.len() == e`.
    pub entries: Vec<NodeId>,
}

impl ManagerMap {
    /// An even map of `per_node` entries per node over `nodes`.
    pub fn even(nodes: &[NodeId], per_node: usize) -> ManagerMap {
        let entries = (0..nodes.len() * per_node)
            .map(|i| nodes[i % nodes.len()])
            .collect();
        ManagerMap {
            version: 1,
            entries,
        }
    }
    /// The manager of `ino`.
    pub fn manager(&self, ino: u64) -> NodeId {
        self.entries[(ino % self.entries.len() as u64) as usize]
    }
    /// The entries `node` manages.
    pub fn entries_of(&self, node: NodeId) -> Vec<u64> {
        (0..self.entries.len() as u64)
            .filter(|e| self.entries[*e as usize] == node)
            .collect()
    }
    /// The root directory's index number (index numbers below it are the nodes' allocators).
    pub fn root(&self) -> u64 {
        self.entries.len() as u64
    }
    /// Check the map: not empty, every node named is in `nodes`.
    pub fn validate(&self, nodes: &[NodeId]) -> Result<(), String> {
        if self.entries.is_empty() {
            return Err("the manager map has no entries: give [manager_map] entries".into());
        }
        if let Some(n) = self.entries.iter().find(|n| !nodes.contains(n)) {
            return Err(format!(
                "the manager map names node {n}, which is not in [[nodes]]"
            ));
        }
        Ok(())
    }
}

/// File-system totals, as `statfs` reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StatFs {
    /// Block size.
    pub bsize: u64,
    /// Total blocks.
    pub blocks: u64,
    /// Free blocks.
    pub bfree: u64,
    /// Longest name.
    pub namelen: u64,
}

/// Block operations, as the node (or the simulation) runs them.
pub trait Blocks {
    /// Run operations, concurrently where they touch different blocks; one result per
    /// operation, in order. Operations on the same block run in the order given.
    fn run(&self, ops: Vec<(BlockId, UserOp<Vec<u8>>)>) -> Vec<Result<Outcome<Vec<u8>>, Errno>>;
    /// Make everything node `node`'s log has received durable.
    fn sync(&self, node: NodeId) -> Result<(), Errno>;
    /// Space on the storage servers.
    fn statfs(&self) -> Result<StatFs, Errno>;
    /// Now, in ns since the epoch (the simulation passes its own clock).
    fn now(&self) -> u64;
    /// This node.
    fn me(&self) -> NodeId;
    /// The cluster is (nearly) full: wait a while for the log cleaner to free space.
    /// `attempt` counts the waits of this write so far. Returns whether to look again
    /// (the default: no waiting, fail at once).
    fn wait_for_space(&self, _attempt: u32) -> bool {
        false
    }
    /// A named point in an operation where a test may stop this node dead (the crash
    /// tests: the simulation's blocks fail from there on; a node started with
    /// `XFS_FAILPOINTS=name` aborts there). `Err` ends the operation. Default: pass.
    fn failpoint(&self, _name: &str) -> Result<(), Errno> {
        Ok(())
    }
}

/// The failpoint between the two directory-bucket write-backs of a two-bucket rename.
pub const FAILPOINT_RENAME_BETWEEN_BUCKETS: &str = "rename-between-buckets";

/// Attribute changes (`None`: unchanged).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SetAttr {
    /// Permission bits (the type bits are kept).
    pub mode: Option<u32>,
    /// Owner.
    pub uid: Option<u32>,
    /// Group.
    pub gid: Option<u32>,
    /// Size (truncate or extend with zeros).
    pub size: Option<u64>,
    /// Access time, ns.
    pub atime: Option<u64>,
    /// Modification time, ns.
    pub mtime: Option<u64>,
    /// Change time, ns (default: now, whenever anything changes).
    pub ctime: Option<u64>,
}

/// How `rename` treats an existing target.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RenameMode {
    /// Replace it (POSIX rename).
    #[default]
    Replace,
    /// Fail with `EEXIST` (`RENAME_NOREPLACE`).
    NoReplace,
    /// Swap the two names (`RENAME_EXCHANGE`).
    Exchange,
}

/// `setxattr` flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum XattrMode {
    /// Create or replace.
    #[default]
    Any,
    /// Fail with `EEXIST` if it exists.
    Create,
    /// Fail with `ENODATA` if it does not.
    Replace,
}

/// One file's blocks written since its last fsync.
#[derive(Default)]
struct Dirty {
    /// When the first of them was written (ns).
    since: u64,
    blocks: BTreeSet<BlockId>,
}

/// A file system client over `B`.
pub struct FsClient<B: Blocks> {
    /// The block operations.
    pub blocks: B,
    map: ManagerMap,
    /// Blocks this client wrote since their file's last fsync, per file, with the time
    /// (ns, [`Blocks::now`]) the oldest of them was first written: the periodic
    /// write-back ([`FsClient::write_back_older_than`]) goes by it.
    dirty: Mutex<BTreeMap<u64, Dirty>>,
    /// Index numbers reserved (durably) and not handed out yet: `next..end`.
    alloc: Mutex<(u64, u64)>,
    /// Blocks a transaction of this client holds (a pin is per node: two local
    /// transactions on one block wait for each other here).
    held: (Mutex<BTreeSet<BlockId>>, std::sync::Condvar),
}

/// Free space below which writes fail with `ENOSPC` (room for what is in flight; on a
/// small cluster a sixteenth of its size, if that is less).
pub const FULL_MARGIN: u64 = 2 << 20;

/// Index numbers reserved per durable update of a node's allocator block.
pub const INO_BATCH: u64 = 1024;

fn one(r: Vec<Result<Outcome<Vec<u8>>, Errno>>) -> Result<Outcome<Vec<u8>>, Errno> {
    r.into_iter().next().unwrap_or(Err(Errno::EIO))
}

/// The inode in an inode block, if it is in use (`ENOENT` if never written, freed, or a
/// file with no link left).
fn live_inode(ino: u64, block: &[u8]) -> Result<Inode, Errno> {
    match Inode::decode(ino, block) {
        Ok(Some(i)) if i.nlink > 0 || i.kind == Some(Kind::Dir) => Ok(i),
        Ok(_) => Err(Errno::ENOENT),
        Err(_) => Err(Errno::EIO),
    }
}

fn check_name(name: &[u8]) -> Result<(), Errno> {
    if name.len() > MAX_NAME {
        return Err(Errno::ENAMETOOLONG);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(Errno::EINVAL);
    }
    Ok(())
}

fn type_bits(kind: Kind) -> u32 {
    match kind {
        Kind::File => libc::S_IFREG,
        Kind::Dir => libc::S_IFDIR,
        Kind::Symlink => libc::S_IFLNK,
        Kind::Special => 0,
    }
}

fn set(offset: u32, v: u64) -> Op {
    Op::Splice {
        offset,
        bytes: v.to_le_bytes().to_vec(),
    }
}

impl<B: Blocks> FsClient<B> {
    /// A client over `blocks` with the cluster's manager map.
    pub fn new(blocks: B, map: ManagerMap) -> FsClient<B> {
        FsClient {
            blocks,
            map,
            dirty: Mutex::new(BTreeMap::new()),
            alloc: Mutex::new((0, 0)),
            held: (Mutex::new(BTreeSet::new()), std::sync::Condvar::new()),
        }
    }

    /// The manager map.
    pub fn map(&self) -> &ManagerMap {
        &self.map
    }

    /// The root directory.
    pub fn root(&self) -> u64 {
        self.map.root()
    }

    pub(super) fn read_block(&self, block: BlockId) -> Result<Vec<u8>, Errno> {
        match one(self.blocks.run(vec![(block, UserOp::Read)]))? {
            Outcome::Read(d) => Ok(d),
            _ => Err(Errno::EIO),
        }
    }

    pub(super) fn update(&self, block: BlockId, ops: &[Op]) -> Result<Vec<u8>, Errno> {
        self.note_dirty(block);
        match one(self
            .blocks
            .run(vec![(block, UserOp::Update(encode_patch(ops)))]))?
        {
            Outcome::Updated(old) => Ok(old),
            _ => Err(Errno::EIO),
        }
    }

    fn note_dirty(&self, block: BlockId) {
        self.note_dirty_under(super::layout::ino_of(block), block);
    }

    /// Count `block` among `owner`'s dirty blocks (an fsync of `owner` writes it back): a
    /// new name's inode goes with its directory's fsync, so a durable name never names an
    /// inode a crash lost.
    fn note_dirty_under(&self, ino: u64, block: BlockId) {
        let mut d = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        d.entry(ino)
            .or_insert_with(|| Dirty {
                since: self.blocks.now(),
                blocks: BTreeSet::new(),
            })
            .blocks
            .insert(block);
    }

    /// Create the root directory if it does not exist (the root's manager does this when
    /// the cluster starts).
    pub fn format(&self) -> Result<bool, Errno> {
        let root = self.root();
        if self.inode(root).is_ok() {
            return Ok(false);
        }
        let now = self.blocks.now();
        let inode = Inode {
            ino: root,
            kind: Some(Kind::Dir),
            mode: libc::S_IFDIR | 0o755,
            nlink: 2,
            atime: now,
            mtime: now,
            ctime: now,
            btime: now,
            parent: root,
            ..Inode::default()
        };
        self.write_inode(&inode)?;
        self.fsync(root)?;
        Ok(true)
    }

    fn write_inode(&self, inode: &Inode) -> Result<(), Errno> {
        let b = inode_block(inode.ino);
        self.note_dirty(b);
        match one(self.blocks.run(vec![(b, UserOp::Write(inode.encode()))]))? {
            Outcome::Written => Ok(()),
            _ => Err(Errno::EIO),
        }
    }

    /// The inode of `ino` (`ENOENT` if there is none).
    pub fn inode(&self, ino: u64) -> Result<Inode, Errno> {
        live_inode(ino, &self.read_block(inode_block(ino))?)
    }

    /// `getattr`. Works on a file whose last name is gone (an open file the mount still
    /// reads and writes), as do `setattr`, `read`, `write` and the xattr calls.
    pub fn getattr(&self, ino: u64) -> Result<Inode, Errno> {
        match Inode::decode(ino, &self.read_block(inode_block(ino))?) {
            Ok(Some(i)) if i.kind.is_some() && (i.nlink > 0 || i.kind != Some(Kind::Dir)) => Ok(i),
            Ok(_) => Err(Errno::ENOENT),
            Err(_) => Err(Errno::EIO),
        }
    }

    fn dir(&self, ino: u64) -> Result<Inode, Errno> {
        let i = self.inode(ino)?;
        if i.kind != Some(Kind::Dir) {
            return Err(Errno::ENOTDIR);
        }
        Ok(i)
    }

    fn find(&self, parent: u64, name: &[u8]) -> Result<Option<Entry>, Errno> {
        let b = self.read_block(block_id(parent, bucket_of(name)))?;
        let entries = decode_bucket(&b).ok_or(Errno::EIO)?;
        Ok(entries.into_iter().find(|e| e.name == name))
    }

    /// `lookup`: the inode `name` names in directory `parent`.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Inode, Errno> {
        if name.len() > MAX_NAME {
            return Err(Errno::ENAMETOOLONG);
        }
        self.dir(parent)?;
        if name == b"." {
            return self.inode(parent);
        }
        if name == b".." {
            let p = self.inode(parent)?.parent;
            return self.inode(p);
        }
        match self.find(parent, name)? {
            Some(e) => self.inode(e.ino),
            None => Err(Errno::ENOENT),
        }
    }

    /// Draw a new index number managed by this node (first-writer). Numbers are reserved
    /// in batches whose reservation is durable before any is used, so a crash never hands
    /// out a number twice (a name whose inode died in a crash is then just dangling, and
    /// treated as absent).
    fn alloc_ino(&self) -> Result<u64, Errno> {
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
    fn find_live(&self, parent: u64, name: &[u8]) -> Result<Option<Entry>, Errno> {
        match self.find(parent, name)? {
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
        let p = self.dir(parent)?;
        // A set-group-ID directory hands its group down (and, to directories, the bit).
        let (mode, gid) = if p.mode & libc::S_ISGID != 0 {
            let m = if kind == Kind::Dir {
                mode | libc::S_ISGID
            } else {
                mode
            };
            (m, p.gid)
        } else {
            (mode, gid)
        };
        if self.find_live(parent, name)?.is_some() {
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
            parent,
            target: target.to_vec(),
            xattrs: Vec::new(),
            extents: Vec::new(),
            rename: None,
        };
        if inode.encode().len() > super::layout::MAX_INODE {
            return Err(Errno::ENAMETOOLONG);
        }
        self.write_inode(&inode)?;
        let entry = Entry {
            name: name.to_vec(),
            ino,
            kind,
        };
        self.insert(parent, entry, false)?.map_or(Ok(()), |_| {
            // Lost a race for the name: free the inode.
            self.write_inode(&Inode {
                ino,
                ..Inode::default()
            })?;
            Err(Errno::EEXIST)
        })?;
        self.note_dirty_under(parent, inode_block(ino));
        let mut ops = vec![set(field::MTIME, now), set(field::CTIME, now)];
        if kind == Kind::Dir {
            ops.push(Op::Add {
                offset: field::NLINK,
                delta: 1,
            });
        }
        self.update(inode_block(parent), &ops)?;
        Ok(inode)
    }

    /// Insert `entry` into `parent`; returns the entry it found under that name (and
    /// replaced, if `replace`), `ENOSPC` if the bucket is full.
    pub(super) fn insert(
        &self,
        parent: u64,
        entry: Entry,
        replace: bool,
    ) -> Result<Option<Entry>, Errno> {
        let ops = [Op::Insert {
            entry: entry.clone(),
            replace,
        }];
        let old = self.update(block_id(parent, bucket_of(&entry.name)), &ops)?;
        let before = decode_bucket(&old).ok_or(Errno::EIO)?;
        let found = before.into_iter().find(|e| e.name == entry.name);
        // The patch is a pure function of the old content: whether the entry went in (or
        // the bucket was full) follows from it, with no second read.
        if found.is_none() && !decode_bucket(&apply(&old, &ops)).is_some_and(|b| b.contains(&entry))
        {
            return Err(Errno::ENOSPC);
        }
        Ok(found)
    }

    pub(super) fn remove(&self, parent: u64, name: &[u8], ino: u64) -> Result<bool, Errno> {
        let old = self.update(
            block_id(parent, bucket_of(name)),
            &[Op::Remove {
                name: name.to_vec(),
                ino,
            }],
        )?;
        let before = decode_bucket(&old).ok_or(Errno::EIO)?;
        Ok(before.iter().any(|e| e.name == name && e.ino == ino))
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
    fn drop_link(&self, ino: u64, by: u64, open: &[u64]) -> Result<Option<u64>, Errno> {
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
    fn free_inode(&self, i: &Inode) -> Result<(), Errno> {
        if i.kind == Some(Kind::Dir) {
            let ops = (0..DIR_BUCKETS)
                .map(|b| (block_id(i.ino, b), UserOp::Write(Vec::new())))
                .collect();
            self.run_writes(ops)?;
        } else {
            self.truncate_blocks(i, 0)?;
        }
        self.run_writes(vec![(inode_block(i.ino), UserOp::Write(Vec::new()))])?;
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

    fn touch_dir(&self, dir: u64, nlink_delta: i64) -> Result<(), Errno> {
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
        self.dir(parent)?;
        let e = self.find_live(parent, name)?.ok_or(Errno::ENOENT)?;
        if e.kind == Kind::Dir {
            return Err(Errno::EISDIR);
        }
        if !self.remove(parent, name, e.ino)? {
            return Err(Errno::ENOENT);
        }
        let kept = self.drop_link(e.ino, 1, open)?;
        self.touch_dir(parent, 0)?;
        Ok(kept)
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
        self.dir(parent)?;
        let e = self.find_live(parent, name)?.ok_or(Errno::ENOENT)?;
        if e.kind != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        if !self.readdir(e.ino)?.is_empty() {
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
    fn is_under(&self, mut dir: u64, ancestor: u64) -> Result<bool, Errno> {
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

    /// `rename`, with the `RENAME_NOREPLACE` / `RENAME_EXCHANGE` variants.
    ///
    /// Not atomic against a crash between its steps (insert at the target, then remove at
    /// the source): a crash can leave both names; see docs/cluster.md.
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
                for (e, newp) in [(&src, dp), (&dst, sp)] {
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
                return Ok(None);
            }
            _ => {}
        }
        if let Some(d) = &dst {
            if d.ino == src.ino {
                // Two names of one file: POSIX says do nothing.
                return Ok(None);
            }
            match (src.kind == Kind::Dir, d.kind == Kind::Dir) {
                (true, false) => return Err(Errno::ENOTDIR),
                (false, true) => return Err(Errno::EISDIR),
                (true, true) if !self.readdir(d.ino)?.is_empty() => return Err(Errno::ENOTEMPTY),
                _ => {}
            }
        }
        let entry = Entry {
            name: dn.to_vec(),
            ..src.clone()
        };
        if sp == dp && bucket_of(sn) == bucket_of(dn) {
            // One bucket: one atomic update.
            let old = self.update(
                block_id(sp, bucket_of(sn)),
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
        } else {
            self.rename_two_buckets(&src, sp, sn, dp, dn, entry)?;
        }
        let mut ops = vec![set(field::CTIME, now)];
        if src.kind == Kind::Dir {
            ops.push(set(field::PARENT, dp));
        }
        self.update(inode_block(src.ino), &ops)?;
        let replaced_dir = dst.as_ref().is_some_and(|d| d.kind == Kind::Dir);
        let mut kept = None;
        if let Some(d) = &dst {
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
    /// 3. the target's bucket is made durable, then the source's: a crash between leaves
    ///    two names of a file that counts two links (unlinking either keeps the other), or
    ///    of a directory whose parent field names the real one; never no name;
    /// 4. the intent and the extra link go (not waited for: until durable, a crash leaves
    ///    one link too many, which `xfs-node fsck` corrects).
    fn rename_two_buckets(
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
            .durable(&[a], self.map.manager(dp))
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
    fn durable(&self, blocks: &[BlockId], manager: NodeId) -> Result<(), Errno> {
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
    fn holding<R>(
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
            while sorted.iter().any(|b| g.contains(b)) {
                g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            g.extend(sorted.iter().copied());
        }
        let out = self.holding_inner(&sorted, f);
        let (m, cv) = &self.held;
        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
        for b in &sorted {
            g.remove(b);
        }
        cv.notify_all();
        out
    }

    fn holding_inner<R>(
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
        self.dir(ino)?;
        let ops = (0..DIR_BUCKETS)
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

    /// `setattr`.
    pub fn setattr(&self, ino: u64, a: &SetAttr) -> Result<Inode, Errno> {
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
            ops.push(set(field::SIZE, size));
            ops.push(Op::Trim {
                from: size.div_ceil(BLOCK as u64),
            });
            if a.mtime.is_none() {
                ops.push(set(field::MTIME, now));
            }
        }
        ops.push(set(field::CTIME, a.ctime.unwrap_or(now)));
        self.update(inode_block(ino), &ops)?;
        self.getattr(ino)
    }

    /// Zero what lies past `new` up to the old size (bytes past the size are always
    /// zero); only the blocks the inode's extents say may hold data.
    fn truncate_blocks(&self, i: &Inode, new: u64) -> Result<(), Errno> {
        let (ino, old) = (i.ino, i.size);
        if new >= old {
            return Ok(());
        }
        let bs = BLOCK as u64;
        let first_whole = new.div_ceil(bs);
        let end = old.div_ceil(bs);
        let may_hold = |b: u64| i.extents.iter().any(|(s, e)| *s <= b && b < *e);
        let mut ops: Vec<(BlockId, UserOp<Vec<u8>>)> = Vec::new();
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
                if ops.len() >= 1024 {
                    self.run_writes(std::mem::take(&mut ops))?;
                }
            }
        }
        self.run_writes(ops)
    }

    fn run_writes(&self, ops: Vec<(BlockId, UserOp<Vec<u8>>)>) -> Result<(), Errno> {
        for (b, _) in &ops {
            self.note_dirty(*b);
        }
        for r in self.blocks.run(ops) {
            r?;
        }
        Ok(())
    }

    /// `read`: up to `len` bytes at `offset` (short at the end of the file).
    pub fn read(&self, ino: u64, offset: u64, len: usize) -> Result<Vec<u8>, Errno> {
        let i = self.getattr(ino)?;
        if i.kind == Some(Kind::Dir) {
            return Err(Errno::EISDIR);
        }
        if offset >= i.size || len == 0 {
            return Ok(Vec::new());
        }
        let end = (offset + len as u64).min(i.size);
        let bs = BLOCK as u64;
        let blocks: Vec<u64> = (offset / bs..end.div_ceil(bs)).collect();
        let ops = blocks
            .iter()
            .map(|b| (block_id(ino, *b), UserOp::Read))
            .collect();
        let mut out = vec![0u8; (end - offset) as usize];
        for (b, r) in blocks.iter().zip(self.blocks.run(ops)) {
            let Outcome::Read(data) = r? else {
                return Err(Errno::EIO);
            };
            let bstart = b * bs;
            let from = offset.max(bstart);
            let to = end.min(bstart + bs);
            for pos in from..to {
                if let Some(v) = data.get((pos - bstart) as usize) {
                    out[(pos - offset) as usize] = *v;
                }
            }
        }
        Ok(out)
    }

    /// `write`: all of `data` at `offset`; returns the bytes written.
    pub fn write(&self, ino: u64, offset: u64, data: &[u8]) -> Result<usize, Errno> {
        let i = self.getattr(ino)?;
        if i.kind == Some(Kind::Dir) {
            return Err(Errno::EISDIR);
        }
        let end = offset.checked_add(data.len() as u64).ok_or(Errno::EFBIG)?;
        if end > MAX_FILE {
            return Err(Errno::EFBIG);
        }
        if data.is_empty() {
            return Ok(0);
        }
        // A full cluster refuses new data at once (a write-back that cannot be stored
        // would only fail at the next fsync, after filling this node's memory).
        // A writer waits for the cleaner before it gives up.
        let mut attempt = 0;
        loop {
            let st = self.blocks.statfs()?;
            if st.blocks == 0 || st.bfree * st.bsize >= FULL_MARGIN.min(st.blocks * st.bsize / 16) {
                break;
            }
            if !self.blocks.wait_for_space(attempt) {
                return Err(Errno::ENOSPC);
            }
            attempt += 1;
        }
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
        self.run_writes(ops)?;
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
                Op::Extent {
                    start: offset / bs,
                    end: end.div_ceil(bs),
                },
            ],
        )?;
        Ok(data.len())
    }

    /// `fsync`: once it returns, every block this client wrote to `ino` (data and inode)
    /// is durable on the stripe group of the file's manager's log.
    pub fn fsync(&self, ino: u64) -> Result<(), Errno> {
        self.write_back(|i, _| i == ino).map(drop)
    }

    /// Make node `node`'s log durable; a full stripe group is given time for its cleaner
    /// (see [`Blocks::wait_for_space`]) before ENOSPC is returned.
    fn sync_waiting(&self, node: NodeId) -> Result<(), Errno> {
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
        self.write_back(|_, _| true).map(drop)
    }

    /// The periodic write-back: every file whose oldest unsynced block was written at
    /// least `age_ns` ago is made durable as by `fsync` (what the kernel's dirty-page
    /// write-back does for a local file system). Returns how many files it synced.
    pub fn write_back_older_than(&self, age_ns: u64) -> Result<usize, Errno> {
        let cutoff = self.blocks.now().saturating_sub(age_ns);
        self.write_back(|_, since| since <= cutoff)
    }

    /// Write back the dirty blocks of the files `pick(ino, since)` selects, then sync each
    /// of their managers' logs once; on failure they stay dirty for the next try.
    fn write_back(&self, pick: impl Fn(u64, u64) -> bool) -> Result<usize, Errno> {
        let taken: BTreeMap<u64, Dirty> = {
            let mut d = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
            let inos: Vec<u64> = d
                .iter()
                .filter(|(i, x)| pick(**i, x.since))
                .map(|(i, _)| *i)
                .collect();
            inos.into_iter()
                .filter_map(|i| d.remove(&i).map(|x| (i, x)))
                .collect()
        };
        if taken.is_empty() {
            // Nothing of this client's since the last sync: nothing to make durable.
            return Ok(0);
        }
        // The logs the blocks go to (a directory's dirty set holds its new names' inodes).
        let managers: BTreeSet<NodeId> = taken
            .values()
            .flat_map(|x| x.blocks.iter())
            .map(|b| self.map.manager(super::layout::ino_of(*b)))
            .collect();
        let ops = taken
            .values()
            .flat_map(|x| x.blocks.iter())
            .map(|b| (*b, UserOp::Flush))
            .collect();
        let r: Result<Vec<_>, Errno> = self.blocks.run(ops).into_iter().collect();
        let r = r.and_then(|_| managers.into_iter().try_for_each(|m| self.sync_waiting(m)));
        if let Err(e) = r {
            // Keep them for the next try (merged with what was written meanwhile).
            let mut d = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
            for (ino, x) in taken {
                let e = d.entry(ino).or_insert_with(|| Dirty {
                    since: x.since,
                    blocks: BTreeSet::new(),
                });
                e.since = e.since.min(x.since);
                e.blocks.extend(x.blocks);
            }
            return Err(e);
        }
        Ok(taken.len())
    }

    /// `statfs`.
    pub fn statfs(&self) -> Result<StatFs, Errno> {
        self.blocks.statfs()
    }

    /// `getxattr`.
    pub fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>, Errno> {
        let i = self.getattr(ino)?;
        i.xattrs
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
            .ok_or(Errno::ENODATA)
    }

    /// `listxattr`.
    pub fn listxattr(&self, ino: u64) -> Result<Vec<Vec<u8>>, Errno> {
        Ok(self
            .getattr(ino)?
            .xattrs
            .into_iter()
            .map(|(k, _)| k)
            .collect())
    }

    /// `setxattr`.
    pub fn setxattr(
        &self,
        ino: u64,
        name: &[u8],
        value: &[u8],
        mode: XattrMode,
    ) -> Result<(), Errno> {
        if name.is_empty() || name.len() > 255 {
            return Err(Errno::ERANGE);
        }
        let i = self.getattr(ino)?;
        let exists = i.xattrs.iter().any(|(k, _)| k == name);
        match mode {
            XattrMode::Create if exists => return Err(Errno::EEXIST),
            XattrMode::Replace if !exists => return Err(Errno::ENODATA),
            _ => {}
        }
        let mut probe = i.clone();
        probe.xattrs.push((name.to_vec(), value.to_vec()));
        if probe.encode().len() > super::layout::MAX_INODE {
            return Err(Errno::ENOSPC);
        }
        let now = self.blocks.now();
        self.update(
            inode_block(ino),
            &[
                Op::Xattr {
                    name: name.to_vec(),
                    value: Some(value.to_vec()),
                },
                set(field::CTIME, now),
            ],
        )?;
        Ok(())
    }

    /// `removexattr`.
    pub fn removexattr(&self, ino: u64, name: &[u8]) -> Result<(), Errno> {
        let i = self.getattr(ino)?;
        if !i.xattrs.iter().any(|(k, _)| k == name) {
            return Err(Errno::ENODATA);
        }
        let now = self.blocks.now();
        self.update(
            inode_block(ino),
            &[
                Op::Xattr {
                    name: name.to_vec(),
                    value: None,
                },
                set(field::CTIME, now),
            ],
        )?;
        Ok(())
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
