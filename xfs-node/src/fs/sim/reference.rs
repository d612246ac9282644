//! The reference: an in-memory model of one POSIX file system (by path) that every answer
//! of the simulated cluster is compared with, the operations both run, and random operations.

use super::*;

/// One inode of the reference file system.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum RNode {
    File {
        blocks: BTreeMap<u64, Vec<u8>>,
        size: u64,
    },
    Dir {
        entries: BTreeMap<Vec<u8>, usize>,
    },
    Symlink {
        target: Vec<u8>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct RInode {
    pub(super) node: RNode,
    pub(super) nlink: u32,
    pub(super) xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// An in-memory model of one POSIX file system (by path), the checker's reference.
#[derive(Clone, Debug)]
pub struct Reference {
    pub(super) inodes: Vec<RInode>,
    /// Inode → every block any version of it ever held (the crash check reads these
    /// back: where the file has a hole now, it must read as zeros).
    pub(super) held: BTreeMap<usize, BTreeSet<u64>>,
}

impl Default for Reference {
    fn default() -> Self {
        Reference::new()
    }
}

pub(super) type R<T> = Result<T, Errno>;

pub(super) fn split(path: &str) -> Vec<&[u8]> {
    path.split('/')
        .filter(|p| !p.is_empty())
        .map(|p| p.as_bytes())
        .collect()
}

impl Reference {
    /// An empty file system (the root).
    pub fn new() -> Reference {
        Reference {
            inodes: vec![RInode {
                node: RNode::Dir {
                    entries: BTreeMap::new(),
                },
                nlink: 2,
                xattrs: BTreeMap::new(),
            }],
            held: BTreeMap::new(),
        }
    }

    pub(super) fn resolve(&self, path: &str) -> R<usize> {
        let mut cur = 0;
        for part in split(path) {
            match &self.inodes[cur].node {
                RNode::Dir { entries } => cur = *entries.get(part).ok_or(Errno::ENOENT)?,
                _ => return Err(Errno::ENOTDIR),
            }
        }
        Ok(cur)
    }

    pub(super) fn parent<'p>(&self, path: &'p str) -> R<(usize, &'p [u8])> {
        let parts = split(path);
        let (name, dir) = parts.split_last().ok_or(Errno::EINVAL)?;
        let mut cur = 0;
        for part in dir {
            match &self.inodes[cur].node {
                RNode::Dir { entries } => cur = *entries.get(*part).ok_or(Errno::ENOENT)?,
                _ => return Err(Errno::ENOTDIR),
            }
        }
        if !matches!(self.inodes[cur].node, RNode::Dir { .. }) {
            return Err(Errno::ENOTDIR);
        }
        Ok((cur, name))
    }

    pub(super) fn entries(&mut self, dir: usize) -> &mut BTreeMap<Vec<u8>, usize> {
        match &mut self.inodes[dir].node {
            RNode::Dir { entries } => entries,
            _ => unreachable!("checked to be a directory"),
        }
    }

    pub(super) fn lookup(&self, dir: usize, name: &[u8]) -> Option<usize> {
        match &self.inodes[dir].node {
            RNode::Dir { entries } => entries.get(name).copied(),
            _ => None,
        }
    }

    pub(super) fn make(&mut self, path: &str, node: RNode) -> R<()> {
        let (p, name) = self.parent(path)?;
        if self.lookup(p, name).is_some() {
            return Err(Errno::EEXIST);
        }
        let dir = matches!(node, RNode::Dir { .. });
        self.inodes.push(RInode {
            node,
            nlink: if dir { 2 } else { 1 },
            xattrs: BTreeMap::new(),
        });
        let ino = self.inodes.len() - 1;
        self.entries(p).insert(name.to_vec(), ino);
        if dir {
            self.inodes[p].nlink += 1;
        }
        Ok(())
    }

    pub(super) fn is_dir(&self, i: usize) -> bool {
        matches!(self.inodes[i].node, RNode::Dir { .. })
    }

    pub(super) fn is_empty_dir(&self, i: usize) -> bool {
        matches!(&self.inodes[i].node, RNode::Dir { entries } if entries.is_empty())
    }

    pub(super) fn under(&self, mut dir: usize, ancestor: usize) -> bool {
        // Walk up by searching parents (small trees).
        loop {
            if dir == ancestor {
                return true;
            }
            if dir == 0 {
                return false;
            }
            let parent = (0..self.inodes.len()).find(|p| {
                matches!(&self.inodes[*p].node, RNode::Dir { entries } if entries.values().any(|v| *v == dir))
            });
            match parent {
                Some(p) => dir = p,
                None => return false,
            }
        }
    }

    pub(super) fn file_read(&self, i: usize, off: u64, len: usize) -> R<Vec<u8>> {
        match &self.inodes[i].node {
            RNode::File { blocks, size } => {
                if off >= *size {
                    return Ok(Vec::new());
                }
                let end = (off + len as u64).min(*size);
                let mut out = vec![0u8; (end - off) as usize];
                for pos in off..end {
                    let b = pos / BLOCK as u64;
                    if let Some(d) = blocks.get(&b) {
                        out[(pos - off) as usize] = d[(pos % BLOCK as u64) as usize];
                    }
                }
                Ok(out)
            }
            RNode::Dir { .. } => Err(Errno::EISDIR),
            RNode::Symlink { .. } => Err(Errno::EINVAL),
        }
    }

    pub(super) fn file_write(&mut self, i: usize, off: u64, data: &[u8]) -> R<usize> {
        if let (RNode::File { .. }, false) = (&self.inodes[i].node, data.is_empty()) {
            let bs = BLOCK as u64;
            let last = (off + data.len() as u64 - 1) / bs;
            self.held.entry(i).or_default().extend(off / bs..=last);
        }
        match &mut self.inodes[i].node {
            RNode::File { blocks, size } => {
                for (k, byte) in data.iter().enumerate() {
                    let pos = off + k as u64;
                    let b = blocks
                        .entry(pos / BLOCK as u64)
                        .or_insert_with(|| vec![0; BLOCK]);
                    b[(pos % BLOCK as u64) as usize] = *byte;
                }
                *size = (*size).max(off + data.len() as u64);
                Ok(data.len())
            }
            RNode::Dir { .. } => Err(Errno::EISDIR),
            RNode::Symlink { .. } => Err(Errno::EINVAL),
        }
    }

    pub(super) fn truncate(&mut self, i: usize, new: u64) -> R<()> {
        match &mut self.inodes[i].node {
            RNode::File { blocks, size } => {
                let bs = BLOCK as u64;
                blocks.retain(|b, _| b * bs < new);
                if let Some(last) = blocks.get_mut(&(new / bs)) {
                    for x in last[(new % bs) as usize..].iter_mut() {
                        *x = 0;
                    }
                }
                *size = new;
                Ok(())
            }
            RNode::Dir { .. } => Err(Errno::EISDIR),
            RNode::Symlink { .. } => Err(Errno::EINVAL),
        }
    }
}

/// The crash victim's unsynced files: path → (the reference before its first unsynced
/// operation on it, those operations).
pub(super) type Unsynced = BTreeMap<String, (Reference, Vec<FsOpSim>)>;

/// One workload operation (paths in the file system).
#[derive(Clone, Debug)]
pub enum FsOpSim {
    /// Create a file.
    Create(String),
    /// Create a directory.
    Mkdir(String),
    /// Write `len` bytes from `seed` at `off`.
    Write(String, u64, usize, u64),
    /// Append `len` bytes from `seed` (a write with `O_APPEND`): at the file's end.
    Append(String, usize, u64),
    /// Read.
    Read(String, u64, usize),
    /// Set the size.
    Truncate(String, u64),
    /// Remove a file.
    Unlink(String),
    /// Remove a directory.
    Rmdir(String),
    /// Rename.
    Rename(String, String),
    /// Hard link.
    Link(String, String),
    /// Symbolic link, then read it back.
    Symlink(String, String),
    /// Kind, size and link count.
    Getattr(String),
    /// Names in a directory.
    Readdir(String),
    /// fsync a file or directory.
    Fsync(String),
    /// Set an extended attribute, then read it back.
    Xattr(String, String, Vec<u8>),
}

/// What an operation answered (compared between the cluster and the reference).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Done.
    Ok,
    /// Bytes.
    Data(Vec<u8>),
    /// Kind, size, links.
    Attr(Kind, u64, u32),
    /// Sorted names.
    Names(Vec<Vec<u8>>),
    /// Where an append landed.
    At(u64),
}

/// `len` pseudo-random bytes from `seed` (the workloads' and tests' file contents).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x = crate::coherence::mix(x);
            x as u8
        })
        .collect()
}

impl Reference {
    /// Apply `op`; its answer.
    pub fn apply(&mut self, op: &FsOpSim) -> R<Answer> {
        match op {
            FsOpSim::Create(p) => self
                .make(
                    p,
                    RNode::File {
                        blocks: BTreeMap::new(),
                        size: 0,
                    },
                )
                .map(|_| Answer::Ok),
            FsOpSim::Mkdir(p) => self
                .make(
                    p,
                    RNode::Dir {
                        entries: BTreeMap::new(),
                    },
                )
                .map(|_| Answer::Ok),
            FsOpSim::Write(p, off, len, seed) => {
                let i = self.resolve(p)?;
                self.file_write(i, *off, &pattern(*seed, *len))
                    .map(|_| Answer::Ok)
            }
            FsOpSim::Append(p, len, seed) => {
                let i = self.resolve(p)?;
                let at = match &self.inodes[i].node {
                    RNode::File { size, .. } => *size,
                    RNode::Dir { .. } => return Err(Errno::EISDIR),
                    RNode::Symlink { .. } => return Err(Errno::EINVAL),
                };
                self.file_write(i, at, &pattern(*seed, *len))
                    .map(|_| Answer::At(at))
            }
            FsOpSim::Read(p, off, len) => {
                let i = self.resolve(p)?;
                self.file_read(i, *off, *len).map(Answer::Data)
            }
            FsOpSim::Truncate(p, size) => {
                let i = self.resolve(p)?;
                self.truncate(i, *size).map(|_| Answer::Ok)
            }
            FsOpSim::Unlink(p) => {
                let (d, name) = self.parent(p)?;
                let i = self.lookup(d, name).ok_or(Errno::ENOENT)?;
                if self.is_dir(i) {
                    return Err(Errno::EISDIR);
                }
                self.entries(d).remove(name);
                self.inodes[i].nlink -= 1;
                Ok(Answer::Ok)
            }
            FsOpSim::Rmdir(p) => {
                let (d, name) = self.parent(p)?;
                let i = self.lookup(d, name).ok_or(Errno::ENOENT)?;
                if !self.is_dir(i) {
                    return Err(Errno::ENOTDIR);
                }
                if !self.is_empty_dir(i) {
                    return Err(Errno::ENOTEMPTY);
                }
                self.entries(d).remove(name);
                self.inodes[d].nlink -= 1;
                Ok(Answer::Ok)
            }
            FsOpSim::Rename(a, b) => {
                let (sd, sn) = self.parent(a)?;
                let (dd, dn) = self.parent(b)?;
                let src = self.lookup(sd, sn).ok_or(Errno::ENOENT)?;
                let dst = self.lookup(dd, dn);
                if sd == dd && sn == dn {
                    return Ok(Answer::Ok);
                }
                if self.is_dir(src) && self.under(dd, src) {
                    return Err(Errno::EINVAL);
                }
                if let Some(t) = dst {
                    if t == src {
                        return Ok(Answer::Ok);
                    }
                    match (self.is_dir(src), self.is_dir(t)) {
                        (true, false) => return Err(Errno::ENOTDIR),
                        (false, true) => return Err(Errno::EISDIR),
                        (true, true) if !self.is_empty_dir(t) => return Err(Errno::ENOTEMPTY),
                        _ => {}
                    }
                    self.inodes[t].nlink -= if self.is_dir(t) { 2 } else { 1 };
                    if self.is_dir(t) {
                        self.inodes[dd].nlink -= 1;
                    }
                }
                self.entries(sd).remove(sn);
                self.entries(dd).insert(dn.to_vec(), src);
                if self.is_dir(src) && sd != dd {
                    self.inodes[sd].nlink -= 1;
                    self.inodes[dd].nlink += 1;
                }
                Ok(Answer::Ok)
            }
            FsOpSim::Link(a, b) => {
                let i = self.resolve(a)?;
                let (dd, dn) = self.parent(b)?;
                if self.is_dir(i) {
                    return Err(Errno::EPERM);
                }
                if self.lookup(dd, dn).is_some() {
                    return Err(Errno::EEXIST);
                }
                self.entries(dd).insert(dn.to_vec(), i);
                self.inodes[i].nlink += 1;
                Ok(Answer::Ok)
            }
            FsOpSim::Symlink(p, target) => {
                self.make(
                    p,
                    RNode::Symlink {
                        target: target.as_bytes().to_vec(),
                    },
                )?;
                Ok(Answer::Data(target.as_bytes().to_vec()))
            }
            FsOpSim::Getattr(p) => {
                let i = self.resolve(p)?;
                let n = &self.inodes[i];
                Ok(match &n.node {
                    RNode::File { size, .. } => Answer::Attr(Kind::File, *size, n.nlink),
                    RNode::Dir { .. } => Answer::Attr(Kind::Dir, 0, n.nlink),
                    RNode::Symlink { target } => {
                        Answer::Attr(Kind::Symlink, target.len() as u64, n.nlink)
                    }
                })
            }
            FsOpSim::Readdir(p) => {
                let i = self.resolve(p)?;
                match &self.inodes[i].node {
                    RNode::Dir { entries } => Ok(Answer::Names(entries.keys().cloned().collect())),
                    _ => Err(Errno::ENOTDIR),
                }
            }
            FsOpSim::Fsync(p) => self.resolve(p).map(|_| Answer::Ok),
            FsOpSim::Xattr(p, name, value) => {
                let i = self.resolve(p)?;
                self.inodes[i]
                    .xattrs
                    .insert(name.as_bytes().to_vec(), value.clone());
                Ok(Answer::Data(value.clone()))
            }
        }
    }
}

/// Run `op` on the cluster through `c`; its answer.
pub fn apply_fs<B: Blocks>(c: &FsClient<B>, op: &FsOpSim) -> R<Answer> {
    let parent = |p: &str| -> R<(u64, Vec<u8>)> {
        let (d, name) = c.resolve_parent(p)?;
        if d.kind != Some(Kind::Dir) {
            return Err(Errno::ENOTDIR);
        }
        Ok((d.ino, name.as_bytes().to_vec()))
    };
    match op {
        FsOpSim::Create(p) => {
            let (d, n) = parent(p)?;
            c.create(d, &n, 0o644, 0, 0).map(|_| Answer::Ok)
        }
        FsOpSim::Mkdir(p) => {
            let (d, n) = parent(p)?;
            c.mkdir(d, &n, 0o755, 0, 0).map(|_| Answer::Ok)
        }
        FsOpSim::Write(p, off, len, seed) => {
            let i = c.resolve(p)?;
            if i.kind == Some(Kind::Symlink) {
                return Err(Errno::EINVAL);
            }
            c.write(i.ino, *off, &pattern(*seed, *len))
                .map(|_| Answer::Ok)
        }
        FsOpSim::Append(p, len, seed) => {
            let i = c.resolve(p)?;
            if i.kind == Some(Kind::Symlink) {
                return Err(Errno::EINVAL);
            }
            c.append(i.ino, &pattern(*seed, *len)).map(Answer::At)
        }
        FsOpSim::Read(p, off, len) => {
            let i = c.resolve(p)?;
            if i.kind == Some(Kind::Symlink) {
                return Err(Errno::EINVAL);
            }
            c.read(i.ino, *off, *len).map(Answer::Data)
        }
        FsOpSim::Truncate(p, size) => {
            let i = c.resolve(p)?;
            c.setattr(
                i.ino,
                &SetAttr {
                    size: Some(*size),
                    ..Default::default()
                },
            )
            .map(|_| Answer::Ok)
        }
        FsOpSim::Unlink(p) => {
            let (d, n) = parent(p)?;
            c.unlink(d, &n).map(|_| Answer::Ok)
        }
        FsOpSim::Rmdir(p) => {
            let (d, n) = parent(p)?;
            c.rmdir(d, &n).map(|_| Answer::Ok)
        }
        FsOpSim::Rename(a, b) => {
            let (sd, sn) = parent(a)?;
            let (dd, dn) = parent(b)?;
            c.rename(sd, &sn, dd, &dn, RenameMode::Replace)
                .map(|_| Answer::Ok)
        }
        FsOpSim::Link(a, b) => {
            let i = c.resolve(a)?;
            let (dd, dn) = parent(b)?;
            c.link(i.ino, dd, &dn).map(|_| Answer::Ok)
        }
        FsOpSim::Symlink(p, target) => {
            let (d, n) = parent(p)?;
            let i = c.symlink(d, &n, target.as_bytes(), 0, 0)?;
            c.readlink(i.ino).map(Answer::Data)
        }
        FsOpSim::Getattr(p) => {
            let i = c.resolve(p)?;
            let kind = i.kind.unwrap_or(Kind::File);
            let size = if kind == Kind::Dir { 0 } else { i.size };
            Ok(Answer::Attr(kind, size, i.nlink))
        }
        FsOpSim::Readdir(p) => {
            let i = c.resolve(p)?;
            let mut names: Vec<Vec<u8>> = c.readdir(i.ino)?.into_iter().map(|e| e.name).collect();
            names.sort();
            Ok(Answer::Names(names))
        }
        FsOpSim::Fsync(p) => {
            let i = c.resolve(p)?;
            c.fsync(i.ino).map(|_| Answer::Ok)
        }
        FsOpSim::Xattr(p, name, value) => {
            let i = c.resolve(p)?;
            c.setxattr(i.ino, name.as_bytes(), value, XattrMode::Any)?;
            c.getxattr(i.ino, name.as_bytes()).map(Answer::Data)
        }
    }
}

/// A random operation over a small namespace (so names collide).
pub fn random_op(rng: &mut Rng, data_only: bool, files: &[String]) -> FsOpSim {
    let dirs = ["", "/d0", "/d1", "/d0/e"];
    let path = |rng: &mut Rng| {
        // Mostly a file that exists (so data operations do something), else any name.
        if !files.is_empty() && rng.below(10) < 6 {
            return files[rng.below(files.len() as u64) as usize].clone();
        }
        let d = dirs[rng.below(dirs.len() as u64) as usize];
        format!("{d}/f{}", rng.below(5))
    };
    let dir = |rng: &mut Rng| {
        let d = ["/d0", "/d1", "/d0/e", "/d1/g"];
        d[rng.below(d.len() as u64) as usize].to_string()
    };
    let off = |rng: &mut Rng| match rng.below(10) {
        0 => (5 << 30) + rng.below(10_000), // past 4 GiB: sparse and large
        1..=3 => rng.below(3 * BLOCK as u64),
        _ => rng.below(20_000),
    };
    if data_only {
        return match rng.below(4) {
            0 => FsOpSim::Create(path(rng)),
            1 => FsOpSim::Truncate(path(rng), rng.below(12_000)),
            2 => FsOpSim::Append(path(rng), 1 + rng.below(9000) as usize, rng.next_u64()),
            _ => FsOpSim::Write(
                path(rng),
                off(rng),
                1 + rng.below(9000) as usize,
                rng.next_u64(),
            ),
        };
    }
    match rng.below(100) {
        0..=9 => FsOpSim::Create(path(rng)),
        10..=14 => FsOpSim::Mkdir(dir(rng)),
        15..=28 => FsOpSim::Write(
            path(rng),
            off(rng),
            1 + rng.below(9000) as usize,
            rng.next_u64(),
        ),
        29..=32 => FsOpSim::Append(path(rng), 1 + rng.below(9000) as usize, rng.next_u64()),
        33..=50 => FsOpSim::Read(path(rng), off(rng), 1 + rng.below(12_000) as usize),
        51..=55 => FsOpSim::Truncate(path(rng), rng.below(12_000)),
        56..=61 => FsOpSim::Unlink(path(rng)),
        62..=64 => FsOpSim::Rmdir(dir(rng)),
        65..=71 => {
            if rng.below(3) == 0 {
                FsOpSim::Rename(dir(rng), dir(rng))
            } else {
                FsOpSim::Rename(path(rng), path(rng))
            }
        }
        72..=75 => FsOpSim::Link(path(rng), path(rng)),
        76..=78 => FsOpSim::Symlink(path(rng), format!("target-{}", rng.below(100))),
        79..=86 => FsOpSim::Getattr(path(rng)),
        87..=92 => FsOpSim::Readdir(if rng.below(3) == 0 {
            "/".into()
        } else {
            dir(rng)
        }),
        93..=96 => FsOpSim::Fsync(path(rng)),
        _ => FsOpSim::Xattr(
            path(rng),
            format!("user.k{}", rng.below(3)),
            pattern(rng.next_u64(), 1 + rng.below(40) as usize),
        ),
    }
}
