//! `fsck` of the name space, on a running cluster, through a node's [`FsClient`]: walks
//! every directory from the root and checks what the file system's invariants say of
//! names and inodes:
//! * a name points at a live inode (not a freed one);
//! * a file's link count is the number of names it has; a directory has one name, in the
//!   directory its parent field names, and a link count of 2 plus its subdirectories;
//! * a directory that tracks its buckets ([`crate::fs::layout::DIR_TRACKED`]) marks every
//!   bucket that holds a name (else a listing would miss the name: a crash wrote the
//!   bucket back but not its directory's inode; `--repair` marks it);
//! * no inode carries a [`RenameIntent`] (a rename a crash interrupted: the stale name is
//!   the one the intent calls the source, if the target name exists too);
//! * every inode the nodes' allocators handed out and that is still in use has a name
//!   (else it is an orphan: `--repair` gives it one in `/lost+found`).
//!
//! With `repair`, each problem is fixed as it is found (names removed, link counts and
//! parent fields set, orphans named, intents cleared), the changes are made durable, and
//! the check runs again: the report holds what the second pass found (nothing, when the
//! repair worked). Run `--repair` on a quiet cluster: a file created at the same moment
//! (its inode written, its name not yet) would look like an orphan.
//! The logs' own checks (imap entries, parity) are [`crate::storage::log::Log::check`].

use std::collections::{BTreeMap, BTreeSet};

use super::client::{Blocks, Errno, FsClient};
use super::layout::{
    block_id, decode_bucket, field, inode_block, name_hash, Entry, Inode, Kind, Op, RenameIntent,
    DIR_BUCKETS,
};

/// What `fsck` found (and repaired).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FsckReport {
    /// Directories walked.
    pub directories: u64,
    /// Names seen.
    pub names: u64,
    /// Inodes in use (named or orphaned).
    pub inodes: u64,
    /// Problems found (in repair mode: by the first pass, each one repaired).
    pub problems: Vec<String>,
    /// Problems the second pass still found after a repair (empty: the repair worked).
    pub remaining: Vec<String>,
    /// Whether this was a repair.
    pub repaired: bool,
}

fn set(offset: u32, v: u64) -> Op {
    Op::Splice {
        offset,
        bytes: v.to_le_bytes().to_vec(),
    }
}

/// One name as a directory holds it.
struct Name {
    dir: u64,
    path: String,
    entry: Entry,
}

/// Check the name space; with `repair`, fix what is found and check again.
pub fn fsck<B: Blocks>(c: &FsClient<B>, repair: bool) -> Result<FsckReport, Errno> {
    let mut report = FsckReport {
        repaired: repair,
        ..Default::default()
    };
    pass(c, repair, &mut report)?;
    if repair {
        c.sync_all()?;
        let mut again = FsckReport::default();
        pass(c, false, &mut again)?;
        report.remaining = again.problems;
        report.directories = again.directories;
        report.names = again.names;
        report.inodes = again.inodes;
    }
    Ok(report)
}

/// A directory's entries as stored, with their buckets (the names of dead inodes
/// included): every bucket is read, whichever its directory marks.
fn raw_entries<B: Blocks>(c: &FsClient<B>, dir: u64) -> Result<Vec<(u64, Entry)>, Errno> {
    let mut all = Vec::new();
    for b in 0..DIR_BUCKETS {
        let d = c.read_block(block_id(dir, b))?;
        all.extend(
            decode_bucket(&d)
                .ok_or(Errno::EIO)?
                .into_iter()
                .map(|e| (b, e)),
        );
    }
    Ok(all)
}

/// The inode as stored: `None` if free (never written, freed, or a file with no link).
fn stored<B: Blocks>(c: &FsClient<B>, ino: u64) -> Result<Option<Inode>, Errno> {
    match Inode::decode(ino, &c.read_block(inode_block(ino))?) {
        Ok(Some(i)) if i.kind.is_some() && (i.nlink > 0 || i.kind == Some(Kind::Dir)) => {
            Ok(Some(i))
        }
        Ok(_) => Ok(None),
        Err(_) => Err(Errno::EIO),
    }
}

/// One check of the name space, repairing as it goes if `repair`.
fn pass<B: Blocks>(c: &FsClient<B>, repair: bool, r: &mut FsckReport) -> Result<(), Errno> {
    let mut check = Check { c, repair, r };
    let mut tree = check.walk()?;
    // Interrupted renames first: they decide which name is stale.
    check.renames(&mut tree)?;
    check.directory_names(&mut tree)?;
    check.link_counts(&tree)?;
    let orphans = check.orphans(&tree.inodes)?;
    check.r.inodes = (tree.inodes.len() + orphans.len()) as u64;
    if orphans.is_empty() {
        return Ok(());
    }
    check.name_orphans(tree.root, orphans)
}

/// What a walk of the tree found: every live inode it names, and their names.
struct Tree {
    root: u64,
    /// Every name, by inode.
    names: BTreeMap<u64, Vec<Name>>,
    /// The inodes named (and the root).
    inodes: BTreeMap<u64, Inode>,
}

/// A pass of the check: the client it reads (and repairs) through, and its report.
struct Check<'a, B: Blocks> {
    c: &'a FsClient<B>,
    repair: bool,
    r: &'a mut FsckReport,
}

impl<B: Blocks> Check<'_, B> {
    /// Walk every directory from the root; a name of a free inode is a problem (removed
    /// in a repair).
    fn walk(&mut self) -> Result<Tree, Errno> {
        let c = self.c;
        let root = c.root();
        let mut names: BTreeMap<u64, Vec<Name>> = BTreeMap::new();
        let mut inodes: BTreeMap<u64, Inode> = BTreeMap::new();
        let mut paths: BTreeMap<u64, String> = BTreeMap::from([(root, String::new())]);
        let mut todo = vec![root];
        let mut seen = BTreeSet::from([root]);
        if let Some(i) = stored(c, root)? {
            inodes.insert(root, i);
        }
        while let Some(dir) = todo.pop() {
            self.r.directories += 1;
            let dpath = paths.get(&dir).cloned().unwrap_or_default();
            let marked = stored(c, dir)?.map(|i| i.dir_buckets());
            let mut unmarked = BTreeSet::new();
            for (bucket, e) in raw_entries(c, dir)? {
                if marked.as_ref().is_some_and(|m| !m.contains(&bucket)) && unmarked.insert(bucket)
                {
                    self.r.problems.push(msg_with_repair(
                        format!(
                            "{dpath}/: bucket {bucket} holds names its directory does not mark"
                        ),
                        self.repair,
                        "marked",
                    ));
                    if self.repair {
                        c.update(
                            inode_block(dir),
                            &[Op::Extent {
                                start: bucket,
                                end: bucket + 1,
                            }],
                        )?;
                    }
                }
                self.r.names += 1;
                let path = format!("{dpath}/{}", String::from_utf8_lossy(&e.name));
                let Some(i) = stored(c, e.ino)? else {
                    self.r
                        .problems
                        .push(format!("{path}: names inode {}, which is free", e.ino));
                    if self.repair {
                        c.remove(dir, &e.name, e.ino)?;
                    }
                    continue;
                };
                if i.kind == Some(Kind::Dir) && seen.insert(e.ino) {
                    paths.insert(e.ino, path.clone());
                    todo.push(e.ino);
                }
                inodes.insert(e.ino, i);
                names.entry(e.ino).or_default().push(Name {
                    dir,
                    path,
                    entry: e,
                });
            }
        }
        Ok(Tree {
            root,
            names,
            inodes,
        })
    }

    /// Inodes that carry a [`RenameIntent`]: a crash interrupted their rename (a repair
    /// removes the stale name if both remain, and clears the intent).
    fn renames(&mut self, tree: &mut Tree) -> Result<(), Errno> {
        for (ino, i) in &tree.inodes {
            let Some(intent) = i.rename else { continue };
            let list = tree.names.entry(*ino).or_default();
            let what = self.interrupted_rename(*ino, &intent, list)?;
            self.r
                .problems
                .push(msg_with_repair(what, self.repair, "intent cleared"));
            if self.repair {
                self.c
                    .update(inode_block(*ino), &RenameIntent::patch(None))?;
            }
        }
        Ok(())
    }

    /// What became of the rename of inode `ino` that `intent` records, given its names
    /// `list`; a repair removes the source name if the target's exists too.
    fn interrupted_rename(
        &mut self,
        ino: u64,
        intent: &RenameIntent,
        list: &mut Vec<Name>,
    ) -> Result<String, Errno> {
        let repair = self.repair;
        let is = |n: &Name, dir: u64, h: u64| n.dir == dir && name_hash(&n.entry.name) == h;
        let from = list
            .iter()
            .position(|n| is(n, intent.from_dir, intent.from_name));
        let to = list
            .iter()
            .position(|n| is(n, intent.to_dir, intent.to_name));
        Ok(match (from, to) {
            (Some(f), Some(t)) if f != t => {
                let stale = list[f].path.clone();
                let msg = format!(
                    "inode {ino}: a rename from {stale} to {} was interrupted by a crash: both names remain{}",
                    list[t].path,
                    if repair { format!("; removed {stale}") } else { String::new() }
                );
                if repair {
                    let n = list.remove(f);
                    self.c.remove(n.dir, &n.entry.name, ino)?;
                }
                msg
            }
            (_, Some(t)) => format!(
                "inode {ino}: a rename to {} was interrupted after it took effect",
                list[t].path
            ),
            (Some(f), None) => format!(
                "inode {ino}: a rename from {} was interrupted before it took effect",
                list[f].path
            ),
            (None, None) => format!("inode {ino}: a rename was interrupted and left no name"),
        })
    }

    /// A directory has one name, in the directory its parent field names (a repair
    /// removes the other names and sets the parent field).
    fn directory_names(&mut self, tree: &mut Tree) -> Result<(), Errno> {
        let (c, repair) = (self.c, self.repair);
        for (ino, i) in &tree.inodes {
            if i.kind != Some(Kind::Dir) || *ino == tree.root {
                continue;
            }
            let list = tree.names.entry(*ino).or_default();
            if list.len() > 1 {
                let (keep, stale): (Vec<Name>, Vec<Name>) =
                    list.drain(..).partition(|n| n.dir == i.parent);
                for n in &stale {
                    self.r.problems.push(msg_with_repair(
                        format!(
                            "{}: a second name of directory inode {ino}, whose parent is inode {}",
                            n.path, i.parent
                        ),
                        repair,
                        "name removed",
                    ));
                    if repair && !keep.is_empty() {
                        c.remove(n.dir, &n.entry.name, *ino)?;
                    }
                }
                *list = if keep.is_empty() { stale } else { keep };
            }
            if let Some(n) = list.first() {
                if n.dir != i.parent {
                    self.r.problems.push(msg_with_repair(
                        format!(
                            "{}: directory inode {ino} has parent field {}, but is in inode {}",
                            n.path, i.parent, n.dir
                        ),
                        repair,
                        "parent field set",
                    ));
                    if repair {
                        c.update(inode_block(*ino), &[set(field::PARENT, n.dir)])?;
                    }
                }
            }
        }
        Ok(())
    }

    /// A file's link count is its number of names; a directory's, 2 plus its
    /// subdirectories (a repair sets it).
    fn link_counts(&mut self, tree: &Tree) -> Result<(), Errno> {
        let (names, inodes) = (&tree.names, &tree.inodes);
        let is_dir = |ino: &u64| inodes.get(ino).is_some_and(|i| i.kind == Some(Kind::Dir));
        let mut subdirs: BTreeMap<u64, u64> = BTreeMap::new();
        for (ino, list) in names {
            if is_dir(ino) {
                for n in list {
                    *subdirs.entry(n.dir).or_default() += 1;
                }
            }
        }
        for (ino, i) in inodes {
            let (want, what) = if i.kind == Some(Kind::Dir) {
                (
                    2 + subdirs.get(ino).copied().unwrap_or(0),
                    "2 + its subdirectories",
                )
            } else {
                let n = names.get(ino).map_or(0, |l| l.len() as u64);
                if n == 0 {
                    continue; // an orphan: see `orphans`
                }
                (n, "its names")
            };
            if i.nlink as u64 != want {
                let path = names
                    .get(ino)
                    .and_then(|l| l.first())
                    .map_or(String::from("/"), |n| n.path.clone());
                self.r.problems.push(msg_with_repair(
                    format!(
                        "{path}: inode {ino} has link count {}, but {what} make {want}",
                        i.nlink
                    ),
                    self.repair,
                    "link count set",
                ));
                if self.repair {
                    self.c
                        .update(inode_block(*ino), &[set(field::NLINK, want)])?;
                }
            }
        }
        Ok(())
    }

    /// Orphans: every index number the allocators handed out that is in use and unnamed
    /// (not among `named`).
    fn orphans(&self, named: &BTreeMap<u64, Inode>) -> Result<Vec<Inode>, Errno> {
        let c = self.c;
        let map = c.map();
        let m = map.entries.len() as u64;
        let mut orphans = Vec::new();
        let mut owners: BTreeSet<u64> = BTreeSet::new();
        for node in &map.entries {
            let entries = map.entries_of(*node);
            let Some(first) = entries.first().copied() else {
                continue;
            };
            if !owners.insert(first) {
                continue;
            }
            let counter = c.read_block(block_id(first, 0))?;
            let handed = counter
                .get(..8)
                .map_or(0, |s| u64::from_le_bytes(s.try_into().unwrap_or([0; 8])));
            for k in 0..handed {
                let ino = (k + 2) * m + entries[(k % entries.len() as u64) as usize];
                if named.contains_key(&ino) {
                    continue;
                }
                if let Some(i) = stored(c, ino)? {
                    orphans.push(i);
                }
            }
        }
        Ok(orphans)
    }

    /// Report the orphans; a repair names each `/lost+found/#<inode>` (made if missing).
    fn name_orphans(&mut self, root: u64, orphans: Vec<Inode>) -> Result<(), Errno> {
        let c = self.c;
        let lost = if self.repair {
            Some(match c.lookup(root, b"lost+found") {
                Ok(i) => i.ino,
                Err(Errno::ENOENT) => c.mkdir(root, b"lost+found", 0o700, 0, 0)?.ino,
                Err(e) => return Err(e),
            })
        } else {
            None
        };
        for i in orphans {
            self.r.problems.push(msg_with_repair(
                format!(
                    "inode {} ({:?}, {} bytes, link count {}) is in use but has no name",
                    i.ino,
                    i.kind.unwrap_or(Kind::File),
                    i.size,
                    i.nlink
                ),
                self.repair,
                "named /lost+found/#<inode>",
            ));
            if let Some(lost) = lost {
                adopt(c, lost, &i)?;
            }
        }
        Ok(())
    }
}

/// Name orphan `i` `#<inode>` in directory `lost`: a file gets a link count of 1, a
/// directory `lost` as its parent (and `lost` one link more).
fn adopt<B: Blocks>(c: &FsClient<B>, lost: u64, i: &Inode) -> Result<(), Errno> {
    let kind = i.kind.unwrap_or(Kind::File);
    let name = format!("#{}", i.ino).into_bytes();
    c.insert(
        lost,
        Entry {
            name,
            ino: i.ino,
            kind,
        },
        false,
    )?;
    let ops = if kind == Kind::Dir {
        vec![set(field::PARENT, lost)]
    } else {
        vec![set(field::NLINK, 1)]
    };
    c.update(inode_block(i.ino), &ops)?;
    if kind == Kind::Dir {
        c.update(
            inode_block(lost),
            &[Op::Add {
                offset: field::NLINK,
                delta: 1,
            }],
        )?;
    }
    Ok(())
}

fn msg_with_repair(msg: String, repair: bool, done: &str) -> String {
    if repair {
        format!("{msg} (repaired: {done})")
    } else {
        msg
    }
}
