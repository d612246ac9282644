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

mod data;
mod namespace;
mod rename;
mod xattr;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

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
    pub const ENODEV: Errno = Errno(libc::ENODEV);
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
    pub fn validate(&self, nodes: &[NodeId]) -> Result<(), ManagerMapError> {
        if self.entries.is_empty() {
            return Err(ManagerMapError::Empty);
        }
        if let Some(n) = self.entries.iter().find(|n| !nodes.contains(n)) {
            return Err(ManagerMapError::UnknownNode(*n));
        }
        Ok(())
    }
}

/// Why a [`ManagerMap`] is not usable ([`ManagerMap::validate`]); names what to fix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ManagerMapError {
    /// The map has no entries.
    #[error("the manager map has no entries: give [manager_map] entries")]
    Empty,
    /// The map names a node that is not in the cluster.
    #[error("the manager map names node {0}, which is not in [[nodes]]")]
    UnknownNode(NodeId),
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
    /// Start reading `blocks` into this node's cache without waiting for them (read-ahead:
    /// a later read of them finds them there or in flight); returns how many of the first
    /// it took (the rest are dropped: too many in flight). No error is reported; a block
    /// that fails is read again, and its error reported, by the read that needs it.
    /// Default: none (the simulation reads only what is asked).
    fn prefetch(&self, _blocks: Vec<BlockId>) -> usize {
        0
    }
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

/// The blocks local transactions hold ([`FsClient::holding`]), and how many holds started
/// per slot of [`HOLD_SLOTS`] (blocks hashed): a read on this node checks that no hold of
/// its inode started while it read (a local truncate does not make it wait otherwise).
#[derive(Default)]
pub(super) struct Held {
    pub(super) active: BTreeSet<BlockId>,
    pub(super) started: [u64; HOLD_SLOTS],
}

/// Slots of [`Held::started`] (a bound: two blocks may share one; a read then starts
/// again for nothing, no more).
pub(super) const HOLD_SLOTS: usize = 32;

impl Held {
    pub(super) fn slot(b: BlockId) -> usize {
        (b.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 59) as usize % HOLD_SLOTS
    }
}

/// One write-back in flight: the dirty blocks it took are on their way to durability,
/// and its result is set when it ends (an `fsync` that finds the blocks taken waits for
/// it: an empty dirty set does not mean durable).
#[derive(Default)]
struct Flight {
    result: Mutex<Option<Result<(), Errno>>>,
    ended: std::sync::Condvar,
}

impl Flight {
    fn end(&self, r: Result<(), Errno>) {
        *self.result.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        self.ended.notify_all();
    }

    fn wait(&self) -> Result<(), Errno> {
        let mut g = self.result.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = *g {
                return r;
            }
            g = self.ended.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }
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
    /// Write-backs in flight, by the files whose blocks they took (locked after `dirty`,
    /// never before it).
    flights: Mutex<BTreeMap<u64, Vec<Arc<Flight>>>>,
    /// Write-backs that waited for an earlier one of the same file to end.
    write_back_waits: AtomicU64,
    /// Index numbers reserved (durably) and not handed out yet: `next..end`.
    alloc: Mutex<(u64, u64)>,
    /// Blocks a transaction of this client holds (a pin is per node: two local
    /// transactions on one block wait for each other here).
    held: (Mutex<Held>, std::sync::Condvar),
    /// Writes that started again because a truncation came between their data and their
    /// size ([`FsClient::write`]).
    write_retries: AtomicU64,
    /// Reads that started again because a truncation came between the size they read
    /// and their blocks ([`FsClient::read`]).
    read_retries: AtomicU64,
    /// Reads that waited for a local hold of their inode (a truncate on this node) to end.
    hold_waits: AtomicU64,
    /// Blocks asked for ahead of sequential reads and taken ([`READ_AHEAD`]).
    read_ahead_blocks: AtomicU64,
    /// Where each file read in order last ended and how far ahead it was asked for, in
    /// [`READ_AHEAD_FILES`] slots by file number (a hint, no lock: two files in one slot
    /// only lose read-ahead now and then).
    read_ahead: Box<[ReadAheadSlot]>,
}

/// One file's read-ahead state ([`FsClient`]'s `read_ahead` table).
#[derive(Default)]
struct ReadAheadSlot {
    ino: AtomicU64,
    /// Where its last read of [`READ_AHEAD_TRIGGER`] bytes or more ended.
    next: AtomicU64,
    /// Asked for ahead up to here.
    ahead: AtomicU64,
}

/// Tries of a write whose size update a truncation on another node defeated, before it
/// holds the inode block ([`FsClient::write`]).
pub const WRITE_TRIES: usize = 8;
/// Block writes the client sends in one batch at most (a truncate or a free of a large
/// file goes in several, one after the other).
pub const WRITE_BATCH: usize = 1024;

/// Tries of a read that a truncation on another node overtook, before it holds the
/// inode block ([`FsClient::read`]).
pub const READ_TRIES: usize = 8;

/// Read-ahead window, bytes: a file read in order has the blocks up to this far past its
/// reader asked for (256 blocks; the node asks for at most `PREFETCH_MAX` at once).
pub const READ_AHEAD: usize = 1 << 20;

/// Smallest read that counts for read-ahead, bytes (the kernel's reads of a file read in
/// order are 128 KiB to 1 MiB: the mount raises its read-ahead; a 4 KiB read is random).
pub const READ_AHEAD_TRIGGER: usize = 64 << 10;

/// Files whose read-ahead state a client keeps (slots by file number).
pub const READ_AHEAD_FILES: usize = 256;

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
            flights: Mutex::new(BTreeMap::new()),
            write_back_waits: Default::default(),
            alloc: Mutex::new((0, 0)),
            held: (Mutex::new(Held::default()), std::sync::Condvar::new()),
            write_retries: Default::default(),
            read_retries: Default::default(),
            hold_waits: Default::default(),
            read_ahead_blocks: Default::default(),
            read_ahead: (0..READ_AHEAD_FILES)
                .map(|_| ReadAheadSlot::default())
                .collect(),
        }
    }

    /// Writes that started again because a truncation on another node came between their
    /// data and their size.
    pub fn write_retries(&self) -> u64 {
        self.write_retries.load(Ordering::Relaxed)
    }

    /// Reads that started again because a truncation came between the size they read
    /// and their blocks.
    pub fn read_retries(&self) -> u64 {
        self.read_retries.load(Ordering::Relaxed)
    }

    /// Reads that waited for a local hold of their inode (a truncate, an append on this
    /// node) to end.
    pub fn hold_waits(&self) -> u64 {
        self.hold_waits.load(Ordering::Relaxed)
    }

    /// Blocks asked for ahead of sequential reads (read-ahead, [`READ_AHEAD`]).
    pub fn read_ahead_blocks(&self) -> u64 {
        self.read_ahead_blocks.load(Ordering::Relaxed)
    }

    /// `fsync`s (and `sync_all`s) that waited for an earlier write-back of the same file,
    /// which had taken its dirty blocks, to end.
    pub fn write_back_waits(&self) -> u64 {
        self.write_back_waits.load(Ordering::Relaxed)
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
            extents: Inode::new_dir_extents(),
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

    /// The directory `parent` and its entry `name` (if any), read together: one batch
    /// for the parent's inode block and the name's bucket, not one after the other.
    pub(super) fn dir_and_find(
        &self,
        parent: u64,
        name: &[u8],
    ) -> Result<(Inode, Option<Entry>), Errno> {
        let mut r = self
            .blocks
            .run(vec![
                (inode_block(parent), UserOp::Read),
                (block_id(parent, bucket_of(name)), UserOp::Read),
            ])
            .into_iter();
        let (Some(i), Some(b)) = (r.next(), r.next()) else {
            return Err(Errno::EIO);
        };
        let Outcome::Read(i) = i? else {
            return Err(Errno::EIO);
        };
        let dir = live_inode(parent, &i)?;
        if dir.kind != Some(Kind::Dir) {
            return Err(Errno::ENOTDIR);
        }
        let Outcome::Read(b) = b? else {
            return Err(Errno::EIO);
        };
        let entries = decode_bucket(&b).ok_or(Errno::EIO)?;
        Ok((dir, entries.into_iter().find(|e| e.name == name)))
    }

    fn find(&self, parent: u64, name: &[u8]) -> Result<Option<Entry>, Errno> {
        let b = self.read_block(block_id(parent, bucket_of(name)))?;
        let entries = decode_bucket(&b).ok_or(Errno::EIO)?;
        Ok(entries.into_iter().find(|e| e.name == name))
    }

    /// Insert `entry` into `parent`; returns the entry it found under that name (and
    /// replaced, if `replace`), `ENOSPC` if the bucket is full.
    pub(super) fn insert(
        &self,
        parent: u64,
        entry: Entry,
        replace: bool,
    ) -> Result<Option<Entry>, Errno> {
        self.insert_batch(parent, entry, replace, &[])
    }

    /// [`FsClient::insert`], in one batch with `parent_ops` on the directory's inode.
    pub(super) fn insert_batch(
        &self,
        parent: u64,
        entry: Entry,
        replace: bool,
        parent_ops: &[Op],
    ) -> Result<Option<Entry>, Errno> {
        let ops = [Op::Insert {
            entry: entry.clone(),
            replace,
        }];
        // The directory's inode marks the bucket as one that may hold entries (listings
        // read only those: `Inode::dir_buckets`).
        let bucket = bucket_of(&entry.name);
        let mut dir_ops = vec![Op::Extent {
            start: bucket,
            end: bucket + 1,
        }];
        dir_ops.extend_from_slice(parent_ops);
        let (dir, block) = (inode_block(parent), block_id(parent, bucket));
        self.note_dirty(dir);
        self.note_dirty(block);
        let batch = vec![
            (block, UserOp::Update(encode_patch(&ops))),
            (dir, UserOp::Update(encode_patch(&dir_ops))),
        ];
        let mut r = self.blocks.run(batch).into_iter();
        let Some(Outcome::Updated(old)) = r.next().transpose()? else {
            return Err(Errno::EIO);
        };
        if !matches!(r.next().transpose()?, Some(Outcome::Updated(_))) {
            return Err(Errno::EIO);
        }
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
        self.remove_batch(parent, name, ino, &[])
    }

    /// Remove the entry `name` of `parent` if it names `ino`, in one batch with
    /// `parent_ops` on the directory's inode (if any); returns whether it was there.
    pub(super) fn remove_batch(
        &self,
        parent: u64,
        name: &[u8],
        ino: u64,
        parent_ops: &[Op],
    ) -> Result<bool, Errno> {
        let block = block_id(parent, bucket_of(name));
        let patch = [Op::Remove {
            name: name.to_vec(),
            ino,
        }];
        self.note_dirty(block);
        let mut batch = vec![(block, UserOp::Update(encode_patch(&patch)))];
        if !parent_ops.is_empty() {
            self.note_dirty(inode_block(parent));
            batch.push((
                inode_block(parent),
                UserOp::Update(encode_patch(parent_ops)),
            ));
        }
        let mut r = self.blocks.run(batch).into_iter();
        let Some(Outcome::Updated(old)) = r.next().transpose()? else {
            return Err(Errno::EIO);
        };
        for o in r {
            if !matches!(o?, Outcome::Updated(_)) {
                return Err(Errno::EIO);
            }
        }
        let before = decode_bucket(&old).ok_or(Errno::EIO)?;
        Ok(before.iter().any(|e| e.name == name && e.ino == ino))
    }
}
