//! On-block layout of the file system (DESIGN.md §4, "Names"): block ids, inodes,
//! directory buckets, and the patch language that [`crate::coherence::UserOp::Update`]
//! applies atomically to a block held private.
//!
//! * A block id is `index number << 24 | block number`: 4 KiB data blocks give a file up to
//!   64 GiB; block number [`INODE_BLOCK`] holds the inode.
//! * A directory is a file whose blocks `0..DIR_BUCKETS` hold its entries, hashed by name,
//!   so lookups read one block and directories get the same coherence as data.
//! * Every metadata change is one patch on one block (insert-if-absent into a bucket, add
//!   to the link count, set a field), applied by the block's private holder: two clients
//!   creating the same name race through the coherence protocol and exactly one wins.
//!
//! Bytes from the network or the log are never trusted: a patch or a block that does not
//! parse leaves the content unchanged (patches) or reads as an I/O error (blocks).

use crate::coherence::{BlockId, Patch};

/// Bytes per data block.
pub const BLOCK: usize = 4096;
/// Bits of the block number in a block id.
pub const INDEX_SHIFT: u32 = 24;
/// The block number of a file's inode.
pub const INODE_BLOCK: u64 = (1 << INDEX_SHIFT) - 1;
/// Largest file size.
pub const MAX_FILE: u64 = INODE_BLOCK * BLOCK as u64;
/// Buckets (blocks) of a directory.
pub const DIR_BUCKETS: u64 = 64;
/// A directory's extents that reach block [`DIR_BUCKETS`] (past its last bucket) mark it
/// as tracking its buckets: its other extents then cover every bucket that may hold an
/// entry (a superset), and a listing reads only those. A directory without the mark (made
/// before directories tracked their buckets) is listed by reading all of them.
pub const DIR_TRACKED: (u64, u64) = (DIR_BUCKETS, DIR_BUCKETS + 1);
/// Largest directory bucket (it travels as one AM medium message).
pub const MAX_BUCKET: usize = 7 * 1024;
/// Longest name.
pub const MAX_NAME: usize = 255;
/// Largest inode block (symlink target and extended attributes live in it).
pub const MAX_INODE: usize = 7 * 1024;

/// The block id of (index number, block number).
pub fn block_id(ino: u64, n: u64) -> BlockId {
    (ino << INDEX_SHIFT) | (n & INODE_BLOCK)
}

/// The inode block of `ino`.
pub fn inode_block(ino: u64) -> BlockId {
    block_id(ino, INODE_BLOCK)
}

/// The index number a block belongs to.
pub fn ino_of(block: BlockId) -> u64 {
    block >> INDEX_SHIFT
}

/// The bucket a name hashes to.
pub fn bucket_of(name: &[u8]) -> u64 {
    name_hash(name) % DIR_BUCKETS
}

/// File types, as stored.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Kind {
    /// A regular file.
    File = 1,
    /// A directory.
    Dir = 2,
    /// A symbolic link.
    Symlink = 3,
    /// A device, FIFO or socket node (`rdev` says which).
    Special = 4,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        match v {
            1 => Some(Kind::File),
            2 => Some(Kind::Dir),
            3 => Some(Kind::Symlink),
            4 => Some(Kind::Special),
            _ => None,
        }
    }
}

/// Field offsets in the inode block (each a little-endian u64).
pub mod field {
    /// Magic and kind.
    pub const KIND: u32 = 0;
    /// Permission and type bits (`st_mode`).
    pub const MODE: u32 = 8;
    /// Owner.
    pub const UID: u32 = 16;
    /// Group.
    pub const GID: u32 = 24;
    /// Link count.
    pub const NLINK: u32 = 32;
    /// Size in bytes.
    pub const SIZE: u32 = 40;
    /// Access time, ns since the epoch.
    pub const ATIME: u32 = 48;
    /// Modification time.
    pub const MTIME: u32 = 56;
    /// Change time.
    pub const CTIME: u32 = 64;
    /// Device number (special files).
    pub const RDEV: u32 = 72;
    /// Regular files: how many truncations cut the file (the slot of [`RDEV`], which a
    /// regular file has no use for). A write's size update is guarded by it
    /// ([`super::Op::Guard`]): a truncation on another node between a write's data and its
    /// size makes the write start again.
    pub const TRUNCATIONS: u32 = RDEV;
    /// Parent directory (directories).
    pub const PARENT: u32 = 80;
    /// Birth time.
    pub const BTIME: u32 = 88;
    /// A rename in flight ([`super::RenameIntent`]): the source directory plus one (0: none).
    pub const RENAME_FROM: u32 = 96;
    /// Its source name's [`super::name_hash`].
    pub const RENAME_FROM_NAME: u32 = 104;
    /// Its target directory.
    pub const RENAME_TO: u32 = 112;
    /// Its target name's hash.
    pub const RENAME_TO_NAME: u32 = 120;
}

/// A rename in flight, recorded in the renamed inode (durable) before either directory
/// bucket changes and cleared once both are durable: after a crash between the two, the
/// inode says which of its names is the stale one (`xfs-node fsck` removes it), and its
/// link count was raised by one for the duration, so unlinking either name cannot free
/// the inode the other still names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RenameIntent {
    /// The source directory.
    pub from_dir: u64,
    /// [`name_hash`] of the source name.
    pub from_name: u64,
    /// The target directory.
    pub to_dir: u64,
    /// [`name_hash`] of the target name.
    pub to_name: u64,
}

impl RenameIntent {
    /// The patch that records it (`Some`) or clears it (`None`) in an inode block.
    pub fn patch(intent: Option<&RenameIntent>) -> Vec<Op> {
        let v = intent.map_or([0; 4], |r| {
            [r.from_dir + 1, r.from_name, r.to_dir, r.to_name]
        });
        [
            field::RENAME_FROM,
            field::RENAME_FROM_NAME,
            field::RENAME_TO,
            field::RENAME_TO_NAME,
        ]
        .iter()
        .zip(v)
        .map(|(f, v)| Op::Splice {
            offset: *f,
            bytes: v.to_le_bytes().to_vec(),
        })
        .collect()
    }
}

/// A 64-bit hash of a directory entry's name (FNV-1a, stable across nodes and versions).
pub fn name_hash(name: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

const INODE_MAGIC: u64 = 0x584e_4f44_0000_0000; // "XNOD" << 32
const INODE_HEAD: usize = 128;

/// A decoded inode.
#[derive(Clone, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Inode {
    /// Index number.
    pub ino: u64,
    /// File type.
    pub kind: Option<Kind>,
    /// `st_mode` (type and permission bits).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Link count.
    pub nlink: u32,
    /// Size in bytes.
    pub size: u64,
    /// Access, modification, change and birth times (ns since the epoch).
    pub atime: u64,
    /// Modification time.
    pub mtime: u64,
    /// Change time.
    pub ctime: u64,
    /// Birth time.
    pub btime: u64,
    /// Device number (special files; 0 for regular files).
    pub rdev: u64,
    /// Regular files: truncations that cut the file ([`field::TRUNCATIONS`]).
    #[serde(default)]
    pub truncations: u64,
    /// Parent (directories).
    pub parent: u64,
    /// Symlink target.
    pub target: Vec<u8>,
    /// Extended attributes, sorted by name.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Block ranges `[start, end)` that may hold data (a superset, merged, at most
    /// [`MAX_EXTENTS`]): a truncate clears only these, and holes are found without reads.
    pub extents: Vec<(u64, u64)>,
    /// A rename of this inode that was in flight (see [`RenameIntent`]).
    #[serde(default)]
    pub rename: Option<RenameIntent>,
}

/// Most extents an inode keeps (beyond, the closest two merge: still a superset).
pub const MAX_EXTENTS: usize = 64;

/// Add `[start, end)` to a sorted extent list, merging.
pub fn add_extent(x: &mut Vec<(u64, u64)>, start: u64, end: u64) {
    x.push((start, end));
    x.sort();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(x.len());
    for (s, e) in x.drain(..) {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    while out.len() > MAX_EXTENTS {
        let i = (0..out.len() - 1)
            .min_by_key(|i| out[i + 1].0 - out[*i].1)
            .unwrap_or(0);
        out[i].1 = out[i + 1].1;
        out.remove(i + 1);
    }
    *x = out;
}

/// Cut a sorted extent list at block `from` (everything from it on is gone).
pub fn trim_extents(x: &mut Vec<(u64, u64)>, from: u64) {
    x.retain(|(s, _)| *s < from);
    if let Some(last) = x.last_mut() {
        last.1 = last.1.min(from);
    }
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    b.get(off..off + 8)
        .map_or(0, |s| u64::from_le_bytes(s.try_into().unwrap_or([0; 8])))
}

impl Inode {
    /// A directory's extents when it is made: no bucket holds an entry yet, and the mark
    /// that it tracks them ([`DIR_TRACKED`]).
    pub fn new_dir_extents() -> Vec<(u64, u64)> {
        vec![DIR_TRACKED]
    }

    /// Whether this directory tracks which of its buckets may hold entries
    /// ([`DIR_TRACKED`]).
    pub fn tracks_buckets(&self) -> bool {
        self.extents
            .iter()
            .any(|(s, e)| *s <= DIR_TRACKED.0 && DIR_TRACKED.0 < *e)
    }

    /// The buckets of this directory that may hold entries: those its extents cover if it
    /// tracks them, else all [`DIR_BUCKETS`].
    pub fn dir_buckets(&self) -> Vec<u64> {
        if !self.tracks_buckets() {
            return (0..DIR_BUCKETS).collect();
        }
        (0..DIR_BUCKETS)
            .filter(|b| self.extents.iter().any(|(s, e)| s <= b && b < e))
            .collect()
    }

    /// Encode into an inode block.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; INODE_HEAD];
        let kind = self.kind.map_or(0, |k| k as u64);
        let put = |b: &mut Vec<u8>, off: u32, v: u64| {
            b[off as usize..off as usize + 8].copy_from_slice(&v.to_le_bytes())
        };
        put(&mut b, field::KIND, INODE_MAGIC | kind);
        put(&mut b, field::MODE, self.mode as u64);
        put(&mut b, field::UID, self.uid as u64);
        put(&mut b, field::GID, self.gid as u64);
        put(&mut b, field::NLINK, self.nlink as u64);
        put(&mut b, field::SIZE, self.size);
        put(&mut b, field::ATIME, self.atime);
        put(&mut b, field::MTIME, self.mtime);
        put(&mut b, field::CTIME, self.ctime);
        // One slot, two uses: a regular file's truncation count, a device's number.
        if self.kind == Some(Kind::File) {
            put(&mut b, field::TRUNCATIONS, self.truncations);
        } else {
            put(&mut b, field::RDEV, self.rdev);
        }
        put(&mut b, field::PARENT, self.parent);
        put(&mut b, field::BTIME, self.btime);
        if let Some(r) = &self.rename {
            put(&mut b, field::RENAME_FROM, r.from_dir + 1);
            put(&mut b, field::RENAME_FROM_NAME, r.from_name);
            put(&mut b, field::RENAME_TO, r.to_dir);
            put(&mut b, field::RENAME_TO_NAME, r.to_name);
        }
        b.extend_from_slice(&(self.target.len() as u32).to_le_bytes());
        b.extend_from_slice(&self.target);
        encode_xattrs(&self.xattrs, &mut b);
        b.extend_from_slice(&(self.extents.len() as u32).to_le_bytes());
        for (s, e) in &self.extents {
            b.extend_from_slice(&s.to_le_bytes());
            b.extend_from_slice(&e.to_le_bytes());
        }
        b
    }

    /// Decode an inode block; `None` if the block holds no inode (never written or freed).
    pub fn decode(ino: u64, b: &[u8]) -> Result<Option<Inode>, &'static str> {
        if b.len() < INODE_HEAD {
            return if b.iter().all(|x| *x == 0) {
                Ok(None)
            } else {
                Err("inode block too short")
            };
        }
        let k = u64_at(b, field::KIND as usize);
        if k == 0 {
            return Ok(None);
        }
        if k & !0xff != INODE_MAGIC {
            return Err("inode block has a bad magic number");
        }
        let kind = Kind::from_u8(k as u8).ok_or("inode block has an unknown kind")?;
        let g = |f: u32| u64_at(b, f as usize);
        let mut at = INODE_HEAD;
        let tlen = b
            .get(at..at + 4)
            .map(|s| u32::from_le_bytes(s.try_into().unwrap_or([0; 4])) as usize)
            .ok_or("inode block truncated")?;
        at += 4;
        let target = b
            .get(at..at + tlen)
            .ok_or("inode block truncated")?
            .to_vec();
        at += tlen;
        let mut r = Reader(&b[at..]);
        let xattrs = decode_xattrs(&mut r).ok_or("inode block has bad xattrs")?;
        let mut extents = Vec::new();
        if let Some(n) = r.u32() {
            for _ in 0..n.min(MAX_EXTENTS as u32 * 2) {
                let s = r.u64().ok_or("inode block has bad extents")?;
                let e = r.u64().ok_or("inode block has bad extents")?;
                extents.push((s, e));
            }
        }
        Ok(Some(Inode {
            ino,
            kind: Some(kind),
            mode: g(field::MODE) as u32,
            uid: g(field::UID) as u32,
            gid: g(field::GID) as u32,
            nlink: g(field::NLINK) as u32,
            size: g(field::SIZE),
            atime: g(field::ATIME),
            mtime: g(field::MTIME),
            ctime: g(field::CTIME),
            rdev: if kind == Kind::File {
                0
            } else {
                g(field::RDEV)
            },
            truncations: if kind == Kind::File {
                g(field::TRUNCATIONS)
            } else {
                0
            },
            parent: g(field::PARENT),
            btime: g(field::BTIME),
            target,
            xattrs,
            extents,
            rename: (g(field::RENAME_FROM) != 0).then(|| RenameIntent {
                from_dir: g(field::RENAME_FROM) - 1,
                from_name: g(field::RENAME_FROM_NAME),
                to_dir: g(field::RENAME_TO),
                to_name: g(field::RENAME_TO_NAME),
            }),
        }))
    }
}

fn encode_xattrs(x: &[(Vec<u8>, Vec<u8>)], b: &mut Vec<u8>) {
    b.extend_from_slice(&(x.len() as u32).to_le_bytes());
    for (k, v) in x {
        b.extend_from_slice(&(k.len() as u16).to_le_bytes());
        b.extend_from_slice(&(v.len() as u32).to_le_bytes());
        b.extend_from_slice(k);
        b.extend_from_slice(v);
    }
}

fn decode_xattrs(r: &mut Reader<'_>) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    let n = r.u32()?;
    let mut out = Vec::new();
    for _ in 0..n {
        let kl = r.u16()? as usize;
        let vl = r.u32()? as usize;
        let k = r.bytes(kl)?.to_vec();
        let v = r.bytes(vl)?.to_vec();
        out.push((k, v));
    }
    Some(out)
}

/// One directory entry.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    /// Name.
    pub name: Vec<u8>,
    /// Index number.
    pub ino: u64,
    /// File type.
    pub kind: Kind,
}

/// Decode a directory bucket (an empty block is an empty bucket).
pub fn decode_bucket(b: &[u8]) -> Option<Vec<Entry>> {
    let mut r = Reader(b);
    let mut out = Vec::new();
    while !r.0.is_empty() {
        let ino = r.u64()?;
        let kind = Kind::from_u8(r.u8()?)?;
        let n = r.u8()? as usize;
        let name = r.bytes(n)?.to_vec();
        out.push(Entry { name, ino, kind });
    }
    Some(out)
}

fn encode_bucket(entries: &[Entry]) -> Vec<u8> {
    let mut b = Vec::new();
    for e in entries {
        b.extend_from_slice(&e.ino.to_le_bytes());
        b.push(e.kind as u8);
        b.push(e.name.len() as u8);
        b.extend_from_slice(&e.name);
    }
    b
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.bytes(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.bytes(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or([0; 4])))
    }
    fn u64(&mut self) -> Option<u64> {
        self.bytes(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    }
}

/// One step of a patch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Write `bytes` at `offset`, growing the block with zeros if needed.
    Splice {
        /// Byte offset in the block.
        offset: u32,
        /// The bytes to write.
        bytes: Vec<u8>,
    },
    /// Cut or zero-extend the block to `len` bytes.
    Resize {
        /// The block's new length in bytes.
        len: u32,
    },
    /// The u64 field at `offset` becomes the larger of itself and `value`.
    Max {
        /// Byte offset of the u64 field.
        offset: u32,
        /// The value to compare with.
        value: u64,
    },
    /// Add `delta` (wrapping) to the u64 field at `offset`.
    Add {
        /// Byte offset of the u64 field.
        offset: u32,
        /// What to add.
        delta: u64,
    },
    /// Directory bucket: add an entry; if the name exists, replace it only if `replace`.
    /// A full bucket is left unchanged.
    Insert {
        /// The entry.
        entry: Entry,
        /// Whether an entry of the same name is replaced.
        replace: bool,
    },
    /// Directory bucket: remove the entry `name` if it names `ino` (any, if 0).
    Remove {
        /// The entry's name.
        name: Vec<u8>,
        /// The inode it must name (0: any).
        ino: u64,
    },
    /// Inode block: set (`Some`) or remove (`None`) an extended attribute.
    Xattr {
        /// The attribute's name.
        name: Vec<u8>,
        /// Its value (`None`: remove it).
        value: Option<Vec<u8>>,
    },
    /// Inode block: blocks `[start, end)` may now hold data.
    Extent {
        /// First block.
        start: u64,
        /// One past the last block.
        end: u64,
    },
    /// Inode block: blocks from `from` on hold no data (a truncate).
    Trim {
        /// First block that holds no data.
        from: u64,
    },
    /// The steps after this one apply only if the u64 field at `offset` equals `value`
    /// (a compare-and-set: the caller reads the old block back to see which happened).
    Guard {
        /// Byte offset of the u64 field.
        offset: u32,
        /// The value it must have.
        value: u64,
    },
}

/// Encode a patch (a list of steps applied in order) as block content for
/// [`crate::coherence::UserOp::Update`].
pub fn encode_patch(ops: &[Op]) -> Vec<u8> {
    let mut b = Vec::new();
    for op in ops {
        match op {
            Op::Splice { offset, bytes } => {
                b.push(1);
                b.extend_from_slice(&offset.to_le_bytes());
                b.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                b.extend_from_slice(bytes);
            }
            Op::Resize { len } => {
                b.push(2);
                b.extend_from_slice(&len.to_le_bytes());
            }
            Op::Max { offset, value } => {
                b.push(3);
                b.extend_from_slice(&offset.to_le_bytes());
                b.extend_from_slice(&value.to_le_bytes());
            }
            Op::Add { offset, delta } => {
                b.push(4);
                b.extend_from_slice(&offset.to_le_bytes());
                b.extend_from_slice(&delta.to_le_bytes());
            }
            Op::Insert { entry, replace } => {
                b.push(5);
                b.push(*replace as u8);
                b.extend_from_slice(&encode_bucket(std::slice::from_ref(entry)));
            }
            Op::Remove { name, ino } => {
                b.push(6);
                b.extend_from_slice(&ino.to_le_bytes());
                b.push(name.len() as u8);
                b.extend_from_slice(name);
            }
            Op::Xattr { name, value } => {
                b.push(7);
                b.extend_from_slice(&(name.len() as u16).to_le_bytes());
                match value {
                    Some(v) => {
                        b.push(1);
                        b.extend_from_slice(&(v.len() as u32).to_le_bytes());
                        b.extend_from_slice(v);
                    }
                    None => b.push(0),
                }
                b.extend_from_slice(name);
            }
            Op::Extent { start, end } => {
                b.push(8);
                b.extend_from_slice(&start.to_le_bytes());
                b.extend_from_slice(&end.to_le_bytes());
            }
            Op::Trim { from } => {
                b.push(9);
                b.extend_from_slice(&from.to_le_bytes());
            }
            Op::Guard { offset, value } => {
                b.push(10);
                b.extend_from_slice(&offset.to_le_bytes());
                b.extend_from_slice(&value.to_le_bytes());
            }
        }
    }
    b
}

/// Decode a patch; `None` if it does not parse.
pub fn decode_patch(b: &[u8]) -> Option<Vec<Op>> {
    let mut r = Reader(b);
    let mut ops = Vec::new();
    while !r.0.is_empty() {
        let op = match r.u8()? {
            1 => {
                let offset = r.u32()?;
                let n = r.u32()? as usize;
                Op::Splice {
                    offset,
                    bytes: r.bytes(n)?.to_vec(),
                }
            }
            2 => Op::Resize { len: r.u32()? },
            3 => Op::Max {
                offset: r.u32()?,
                value: r.u64()?,
            },
            4 => Op::Add {
                offset: r.u32()?,
                delta: r.u64()?,
            },
            5 => {
                let replace = r.u8()? != 0;
                let ino = r.u64()?;
                let kind = Kind::from_u8(r.u8()?)?;
                let n = r.u8()? as usize;
                let name = r.bytes(n)?.to_vec();
                Op::Insert {
                    entry: Entry { name, ino, kind },
                    replace,
                }
            }
            6 => {
                let ino = r.u64()?;
                let n = r.u8()? as usize;
                Op::Remove {
                    name: r.bytes(n)?.to_vec(),
                    ino,
                }
            }
            7 => {
                let n = r.u16()? as usize;
                let value = match r.u8()? {
                    1 => {
                        let vl = r.u32()? as usize;
                        Some(r.bytes(vl)?.to_vec())
                    }
                    _ => None,
                };
                Op::Xattr {
                    name: r.bytes(n)?.to_vec(),
                    value,
                }
            }
            8 => Op::Extent {
                start: r.u64()?,
                end: r.u64()?,
            },
            9 => Op::Trim { from: r.u64()? },
            10 => Op::Guard {
                offset: r.u32()?,
                value: r.u64()?,
            },
            _ => return None,
        };
        ops.push(op);
    }
    Some(ops)
}

/// Apply decoded steps to `block`; a step that does not fit the block (a splice past the
/// largest block, a resize past [`BLOCK`], a field outside the inode's fixed head, an entry
/// in a bucket that would overflow, an xattr in an inode that would outgrow
/// [`MAX_INODE`]) or does not apply to it (an entry step on a block that is not a bucket,
/// an extent or xattr step on one that is not an inode) leaves it unchanged.
pub fn apply(block: &[u8], ops: &[Op]) -> Vec<u8> {
    let mut b = block.to_vec();
    for op in ops {
        match op {
            Op::Splice { offset, bytes } => splice(&mut b, *offset as usize, bytes),
            Op::Resize { len } => {
                if (*len as usize) <= BLOCK {
                    b.resize(*len as usize, 0);
                }
            }
            Op::Max { offset, value } => {
                update_field(&mut b, *offset as usize, |cur| cur.max(*value))
            }
            Op::Add { offset, delta } => {
                update_field(&mut b, *offset as usize, |cur| cur.wrapping_add(*delta))
            }
            Op::Insert { entry, replace } => insert_entry(&mut b, entry, *replace),
            Op::Remove { name, ino } => remove_entry(&mut b, name, *ino),
            Op::Extent { start, end } => {
                patch_inode(&mut b, |i| add_extent(&mut i.extents, *start, *end))
            }
            Op::Trim { from } => patch_inode(&mut b, |i| trim_extents(&mut i.extents, *from)),
            Op::Xattr { name, value } => set_xattr(&mut b, name, value.as_deref()),
            Op::Guard { offset, value } => {
                if field_value(&b, *offset as usize) != Some(*value) {
                    break;
                }
            }
        }
    }
    b
}

/// The u64 field at `o` of an inode head; a block shorter than the head reads as zeros
/// (as [`update_field`] grows it); `None` for a field outside the head.
fn field_value(b: &[u8], o: usize) -> Option<u64> {
    if o + 8 > INODE_HEAD {
        return None;
    }
    Some(
        b.get(o..o + 8)
            .map_or(0, |s| u64::from_le_bytes(s.try_into().unwrap_or([0; 8]))),
    )
}

/// [`Op::Splice`]: `bytes` at `offset`, the block grown with zeros to hold them.
fn splice(b: &mut Vec<u8>, offset: usize, bytes: &[u8]) {
    let end = offset + bytes.len();
    if end > MAX_INODE.max(BLOCK) {
        return;
    }
    if b.len() < end {
        b.resize(end, 0);
    }
    b[offset..end].copy_from_slice(bytes);
}

/// [`Op::Max`], [`Op::Add`]: the u64 field at `o` of the inode head becomes `f` of its
/// value (a shorter block is grown to the head first).
fn update_field(b: &mut Vec<u8>, o: usize, f: impl FnOnce(u64) -> u64) {
    if o + 8 > INODE_HEAD {
        return;
    }
    if b.len() < INODE_HEAD {
        b.resize(INODE_HEAD, 0);
    }
    let new = f(u64_at(b, o));
    b[o..o + 8].copy_from_slice(&new.to_le_bytes());
}

/// [`Op::Insert`]: add `entry` to the bucket (or, with `replace`, put it in place of the
/// entry of its name).
fn insert_entry(b: &mut Vec<u8>, entry: &Entry, replace: bool) {
    let Some(mut entries) = decode_bucket(b) else {
        return;
    };
    match entries.iter().position(|e| e.name == entry.name) {
        Some(i) if replace => entries[i] = entry.clone(),
        Some(_) => return,
        None => entries.push(entry.clone()),
    }
    let nb = encode_bucket(&entries);
    if nb.len() <= MAX_BUCKET {
        *b = nb;
    }
}

/// [`Op::Remove`]: take the entry `name` out of the bucket if it names `ino` (0: any).
fn remove_entry(b: &mut Vec<u8>, name: &[u8], ino: u64) {
    let Some(mut entries) = decode_bucket(b) else {
        return;
    };
    let before = entries.len();
    entries.retain(|e| !(e.name == name && (ino == 0 || e.ino == ino)));
    if entries.len() != before {
        *b = encode_bucket(&entries);
    }
}

/// [`Op::Extent`], [`Op::Trim`]: change the decoded inode with `f`.
fn patch_inode(b: &mut Vec<u8>, f: impl FnOnce(&mut Inode)) {
    let Ok(Some(mut inode)) = Inode::decode(0, b) else {
        return;
    };
    f(&mut inode);
    *b = inode.encode();
}

/// [`Op::Xattr`]: set the inode's attribute `name` to `value` (`None`: remove it).
fn set_xattr(b: &mut Vec<u8>, name: &[u8], value: Option<&[u8]>) {
    let Ok(Some(mut inode)) = Inode::decode(0, b) else {
        return;
    };
    match value {
        Some(v) => match inode
            .xattrs
            .binary_search_by(|(k, _)| k.as_slice().cmp(name))
        {
            Ok(i) => inode.xattrs[i].1 = v.to_vec(),
            Err(i) => inode.xattrs.insert(i, (name.to_vec(), v.to_vec())),
        },
        None => inode.xattrs.retain(|(k, _)| k != name),
    }
    let nb = inode.encode();
    if nb.len() <= MAX_INODE {
        *b = nb;
    }
}

/// Block content patches itself with the patch language above; a patch that does not
/// parse changes nothing.
impl Patch for Vec<u8> {
    fn patched(&self, patch: &Vec<u8>) -> Vec<u8> {
        match decode_patch(patch) {
            Some(ops) => apply(self, &ops),
            None => self.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, ino: u64) -> Entry {
        Entry {
            name: name.as_bytes().to_vec(),
            ino,
            kind: Kind::File,
        }
    }

    #[test]
    fn patches_round_trip_and_apply() {
        let ops = vec![
            Op::Splice {
                offset: 3,
                bytes: vec![7, 8],
            },
            Op::Resize { len: 10 },
            Op::Max {
                offset: field::SIZE,
                value: 5,
            },
            Op::Add {
                offset: field::NLINK,
                delta: u64::MAX,
            },
            Op::Insert {
                entry: entry("a", 9),
                replace: false,
            },
            Op::Remove {
                name: b"a".to_vec(),
                ino: 9,
            },
            Op::Xattr {
                name: b"user.x".to_vec(),
                value: Some(b"v".to_vec()),
            },
            Op::Extent { start: 1, end: 5 },
            Op::Trim { from: 3 },
            Op::Guard {
                offset: field::TRUNCATIONS,
                value: 2,
            },
        ];
        assert_eq!(decode_patch(&encode_patch(&ops)), Some(ops));
        let b = apply(
            &[],
            &[Op::Splice {
                offset: 2,
                bytes: vec![1, 2],
            }],
        );
        assert_eq!(b, vec![0, 0, 1, 2]);
        assert_eq!(apply(&b, &[Op::Resize { len: 1 }]), vec![0]);
    }

    #[test]
    fn a_guard_applies_the_steps_after_it_only_if_its_field_matches() {
        let file = Inode {
            ino: 3,
            kind: Some(Kind::File),
            mode: 0o100644,
            nlink: 1,
            size: 10,
            truncations: 4,
            ..Inode::default()
        };
        let b = file.encode();
        let grow = |seen: u64| {
            encode_patch(&[
                Op::Guard {
                    offset: field::TRUNCATIONS,
                    value: seen,
                },
                Op::Max {
                    offset: field::SIZE,
                    value: 20,
                },
                Op::Extent { start: 0, end: 5 },
            ])
        };
        let stale = b.patched(&grow(3));
        assert_eq!(stale, b, "a stale guard changed the inode");
        let j = Inode::decode(3, &b.patched(&grow(4))).unwrap().unwrap();
        assert_eq!((j.size, j.extents.clone()), (20, vec![(0, 5)]));
        // The extent step re-encodes the inode: the count survives it.
        assert_eq!(j.truncations, 4);
        // A truncation counts in the file's slot; a device keeps its number there.
        let cut = b.patched(&encode_patch(&[Op::Add {
            offset: field::TRUNCATIONS,
            delta: 1,
        }]));
        assert_eq!(Inode::decode(3, &cut).unwrap().unwrap().truncations, 5);
        let dev = Inode {
            kind: Some(Kind::Special),
            rdev: 0x0801,
            truncations: 9,
            ..file.clone()
        };
        let d = Inode::decode(3, &dev.encode()).unwrap().unwrap();
        assert_eq!((d.rdev, d.truncations), (0x0801, 0));
        let f = Inode::decode(3, &Inode { rdev: 7, ..file }.encode())
            .unwrap()
            .unwrap();
        assert_eq!((f.rdev, f.truncations), (0, 4));
    }

    #[test]
    fn buckets_insert_only_if_absent_unless_replacing() {
        let p = |ops: &[Op]| encode_patch(ops);
        let b = Vec::new().patched(&p(&[Op::Insert {
            entry: entry("x", 1),
            replace: false,
        }]));
        let b2 = b.patched(&p(&[Op::Insert {
            entry: entry("x", 2),
            replace: false,
        }]));
        assert_eq!(decode_bucket(&b2).unwrap(), vec![entry("x", 1)]);
        let b3 = b.patched(&p(&[Op::Insert {
            entry: entry("x", 2),
            replace: true,
        }]));
        assert_eq!(decode_bucket(&b3).unwrap(), vec![entry("x", 2)]);
        // Remove only the named inode.
        let b4 = b3.patched(&p(&[Op::Remove {
            name: b"x".to_vec(),
            ino: 1,
        }]));
        assert_eq!(b4, b3);
        let b5 = b3.patched(&p(&[Op::Remove {
            name: b"x".to_vec(),
            ino: 2,
        }]));
        assert!(decode_bucket(&b5).unwrap().is_empty());
    }

    #[test]
    fn inodes_round_trip_with_fields_patched() {
        let i = Inode {
            ino: 7,
            kind: Some(Kind::Symlink),
            mode: 0o120777,
            uid: 1,
            gid: 2,
            nlink: 1,
            size: 3,
            target: b"abc".to_vec(),
            xattrs: vec![(b"user.a".to_vec(), b"1".to_vec())],
            extents: vec![(0, 2), (1 << 20, (1 << 20) + 1)],
            ..Inode::default()
        };
        let b = i.encode();
        assert_eq!(Inode::decode(7, &b).unwrap(), Some(i.clone()));
        // A rename intent round-trips, and its patch records and clears it.
        let r = RenameIntent {
            from_dir: 0,
            from_name: name_hash(b"a"),
            to_dir: 5,
            to_name: name_hash(b"b"),
        };
        let with = b.patched(&encode_patch(&RenameIntent::patch(Some(&r))));
        assert_eq!(Inode::decode(7, &with).unwrap().unwrap().rename, Some(r));
        let without = with.patched(&encode_patch(&RenameIntent::patch(None)));
        assert_eq!(Inode::decode(7, &without).unwrap(), Some(i.clone()));
        let b = b.patched(&encode_patch(&[
            Op::Add {
                offset: field::NLINK,
                delta: 1,
            },
            Op::Max {
                offset: field::SIZE,
                value: 1 << 33,
            },
            Op::Xattr {
                name: b"user.a".to_vec(),
                value: None,
            },
        ]));
        let j = Inode::decode(7, &b).unwrap().unwrap();
        assert_eq!((j.nlink, j.size, j.xattrs.len()), (2, 1 << 33, 0));
        assert_eq!(Inode::decode(7, &[]).unwrap(), None);
        assert!(Inode::decode(7, &[1; 200]).is_err());
    }

    #[test]
    fn garbage_patches_and_blocks_do_not_panic() {
        let mut seed = 1u64;
        for _ in 0..2000 {
            seed = am_core::engine::splitmix(seed);
            let n = (seed % 40) as usize;
            let junk: Vec<u8> = (0..n)
                .map(|i| am_core::engine::splitmix(seed + i as u64) as u8)
                .collect();
            let base = vec![1u8, 2, 3];
            let _ = base.patched(&junk);
            let _ = decode_bucket(&junk);
            let _ = Inode::decode(1, &junk);
        }
    }
}

#[cfg(test)]
mod extent_tests {
    use super::*;

    #[test]
    fn extents_merge_stay_a_superset_and_trim() {
        let mut x = Vec::new();
        add_extent(&mut x, 10, 12);
        add_extent(&mut x, 0, 1);
        add_extent(&mut x, 12, 15);
        add_extent(&mut x, 1, 2);
        assert_eq!(x, vec![(0, 2), (10, 15)]);
        for i in 0..200u64 {
            add_extent(&mut x, 100 + i * 10, 101 + i * 10);
        }
        assert!(x.len() <= MAX_EXTENTS);
        for i in 0..200u64 {
            let b = 100 + i * 10;
            assert!(x.iter().any(|(s, e)| *s <= b && b < *e), "block {b} lost");
        }
        trim_extents(&mut x, 11);
        assert!(x.iter().all(|(s, e)| *s < 11 && *e <= 11), "{x:?}");
        assert!([0, 1, 10]
            .iter()
            .all(|b| x.iter().any(|(s, e)| s <= b && b < e)));
        let mut y = vec![(0, 2), (10, 15)];
        trim_extents(&mut y, 11);
        assert_eq!(y, vec![(0, 2), (10, 11)]);
    }
}

/// What a block is, for an error message: the inode and the byte range of the file (or the
/// directory bucket) it holds, or the inode's own block.
pub fn block_name(block: BlockId) -> String {
    let ino = ino_of(block);
    let n = block & INODE_BLOCK;
    if n == INODE_BLOCK {
        format!("inode {ino} (its inode block)")
    } else {
        let at = n * BLOCK as u64;
        format!(
            "inode {ino}, bytes {at}..{} (block {n}; a directory's bucket {n})",
            at + BLOCK as u64
        )
    }
}
