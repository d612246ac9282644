//! After a crash: every file read back whole and checked against what the reference says
//! was durable (fsynced data never reads as zeros or as anything else); a planted loss to show
//! the check catches one.

use super::*;

/// The crash check's verdict on each of the victim's unsynced paths, all [`adopt`] takes:
/// None (the file is gone), or its size and the blocks the check read and accepted (those
/// not all zeros, zero-padded to a block).
pub(super) type Checked = BTreeMap<String, Option<(u64, BTreeMap<u64, Vec<u8>>)>>;

/// Most blocks of one file the crash check reads (this workload's files have a few dozen
/// worth reading; a file past it is an error, not a partial check).
pub(super) const MAX_CHECKED_BLOCKS: u64 = 1 << 16;

/// A file's blocks in the reference: block number → its bytes (a whole block).
pub(super) type RBlocks = BTreeMap<u64, Vec<u8>>;

/// `v`'s regular file at `p`: its inode, size and blocks.
pub(super) fn ref_file<'a>(v: &'a Reference, p: &str) -> Option<(usize, u64, &'a RBlocks)> {
    let i = v.resolve(p).ok()?;
    match &v.inodes[i].node {
        RNode::File { blocks, size } => Some((i, *size, blocks)),
        _ => None,
    }
}

/// What a reader sees of block `b` of a file of `size` bytes holding `blocks` (a block
/// absent is zeros).
pub(super) fn visible(blocks: &BTreeMap<u64, Vec<u8>>, size: u64, b: u64) -> Vec<u8> {
    let bs = BLOCK as u64;
    let len = size.saturating_sub(b * bs).min(bs) as usize;
    blocks
        .get(&b)
        .map_or_else(|| vec![0; len], |d| d[..len].to_vec())
}

/// Add the blocks of `v`'s file at `p` the crash check reads: every block it holds and
/// their neighbours (holes there read as zeros), every block it ever held, its first and
/// its last.
pub(super) fn blocks_worth_reading(v: &Reference, p: &str, out: &mut BTreeSet<u64>) {
    if let Some((i, size, blocks)) = ref_file(v, p) {
        for b in blocks.keys() {
            out.extend([b.saturating_sub(1), *b, b + 1]);
        }
        out.extend(v.held.get(&i).into_iter().flatten().copied());
        out.insert(0);
        out.insert(size.saturating_sub(1) / BLOCK as u64);
    }
}

/// `which`, with every block the cluster's inode says may hold data (its extents), less
/// the blocks past its size (a reader sees nothing there).
pub(super) fn with_extents(
    p: &str,
    mut which: BTreeSet<u64>,
    i: &Inode,
) -> Result<BTreeSet<u64>, String> {
    let end = i.size.div_ceil(BLOCK as u64);
    let mut n = 0;
    for (s, e) in &i.extents {
        let e = (*e).min(end);
        n += e.saturating_sub(*s);
        if n > MAX_CHECKED_BLOCKS {
            return Err(format!(
                "{p}: its extents {:?} cover more than {MAX_CHECKED_BLOCKS} blocks below its \
                 size {}: too many for the crash check to read (raise MAX_CHECKED_BLOCKS)",
                i.extents, i.size
            ));
        }
        which.extend(*s..e);
    }
    which.retain(|b| *b < end);
    Ok(which)
}

/// Read blocks `which` of file `ino` through `c`, one read per run of consecutive blocks:
/// block → the bytes read (short at the end of the file).
pub(super) fn read_blocks<B: Blocks>(
    c: &FsClient<B>,
    ino: u64,
    which: &BTreeSet<u64>,
) -> R<BTreeMap<u64, Vec<u8>>> {
    let bs = BLOCK as u64;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for b in which {
        match runs.last_mut() {
            Some(r) if r.1 == *b && r.1 - r.0 < 256 => r.1 += 1,
            _ => runs.push((*b, b + 1)),
        }
    }
    let mut out = BTreeMap::new();
    for (s, e) in runs {
        let d = c.read(ino, s * bs, ((e - s) * bs) as usize)?;
        for b in s..e {
            let from = ((b - s) * bs) as usize;
            let to = d.len().min(from + BLOCK);
            out.insert(b, d.get(from..to).unwrap_or_default().to_vec());
        }
    }
    Ok(out)
}

/// A block's bytes, briefly.
pub(super) fn brief_block(d: &[u8]) -> String {
    brief(&Ok(Answer::Data(d.to_vec())))
}

/// After the crash: every path the victim did not touch since the snapshot is exactly as
/// the reference says (kind, size, and every block worth reading: see
/// [`blocks_worth_reading`] and [`with_extents`]); every path it touched is a file of one
/// of the sizes its versions had (the snapshot's, or one of the victim's unsynced
/// operations'), each block read equal to that block in one of the versions, or gone if a
/// version had no such file. Returns what it checked of the touched paths, for [`adopt`].
pub(super) fn check_after_crash(
    sim: &FsSim,
    now: &Reference,
    unsynced: &Unsynced,
    report: &mut FsSimReport,
) -> Result<Checked, String> {
    let bs = BLOCK as u64;
    let c = sim.client(1);
    let tree = walk(c).map_err(|e| format!("walking the tree: {e}"))?;
    let listed: BTreeSet<&String> = tree.keys().collect();
    let expected: BTreeSet<String> = now.paths().into_iter().map(|(p, _)| p).collect();
    for p in &expected {
        if unsynced.contains_key(p) {
            continue;
        }
        let Some((kind, content)) = tree.get(p) else {
            return Err(format!("{p} is gone"));
        };
        let i = now
            .resolve(p)
            .map_err(|e| format!("{p}: the reference lists it and cannot resolve it: {e}"))?;
        match &now.inodes[i].node {
            RNode::Dir { .. } => {
                if *kind != Kind::Dir {
                    return Err(format!("{p} is a {kind:?}, want a directory"));
                }
            }
            RNode::Symlink { target } => {
                if *kind != Kind::Symlink || content != target {
                    return Err(format!(
                        "{p} is a {kind:?} ({:?}), want a symlink to {:?}",
                        String::from_utf8_lossy(content),
                        String::from_utf8_lossy(target)
                    ));
                }
            }
            RNode::File { blocks, size } => {
                if *kind != Kind::File {
                    return Err(format!("{p} is a {kind:?}, want a file"));
                }
                let got = c.resolve(p).map_err(|e| format!("{p}: {e}"))?;
                if got.size != *size {
                    return Err(format!("{p}: size {}, want {size}", got.size));
                }
                let mut which = BTreeSet::new();
                blocks_worth_reading(now, p, &mut which);
                let which = with_extents(p, which, &got)?;
                let data =
                    read_blocks(c, got.ino, &which).map_err(|e| format!("{p}: reading: {e}"))?;
                for (b, d) in &data {
                    let want = visible(blocks, *size, *b);
                    if *d != want {
                        return Err(format!(
                            "{p}: block {b} (bytes {}..) reads {}, want {}",
                            b * bs,
                            brief_block(d),
                            brief_block(&want)
                        ));
                    }
                }
            }
        }
    }
    for p in listed {
        if !expected.contains(p) && !unsynced.contains_key(p) {
            return Err(format!("{p} appeared"));
        }
    }
    // Unsynced files: the size one of the versions', each block one of the versions'.
    let mut checked = Checked::new();
    for (p, (start, ops)) in unsynced {
        let mut versions: Vec<Reference> = vec![start.clone()];
        let mut r = start.clone();
        for op in ops {
            let _ = r.apply(op);
            versions.push(r.clone());
        }
        let files: Vec<(u64, &BTreeMap<u64, Vec<u8>>)> = versions
            .iter()
            .filter_map(|v| ref_file(v, p).map(|(_, s, b)| (s, b)))
            .collect();
        let got = match c.resolve(p) {
            Ok(i) => i,
            Err(Errno::ENOENT) if files.len() < versions.len() => {
                report.unsynced_lost += 1;
                checked.insert(p.clone(), None);
                continue;
            }
            Err(Errno::ENOENT) => {
                return Err(format!(
                    "{p} is gone, though every version of it (the fsynced one too) is a file"
                ))
            }
            Err(e) => return Err(format!("{p}: {e}")),
        };
        if got.kind != Some(Kind::File) {
            return Err(format!("{p} is a {:?}, want a file", got.kind));
        }
        let sizes: Vec<u64> = files.iter().map(|(s, _)| *s).collect();
        if !sizes.contains(&got.size) {
            return Err(format!(
                "{p}: size {}, none of its versions' sizes {sizes:?}",
                got.size
            ));
        }
        let mut which = BTreeSet::new();
        for v in &versions {
            blocks_worth_reading(v, p, &mut which);
        }
        which.insert(got.size.saturating_sub(1) / bs);
        let which = with_extents(p, which, &got)?;
        let data = read_blocks(c, got.ino, &which).map_err(|e| format!("{p}: reading: {e}"))?;
        let zero = vec![0u8; BLOCK];
        let last = files.last().filter(|_| ref_file(&r, p).is_some());
        let mut as_last = last.is_some_and(|(s, _)| *s == got.size);
        let mut kept = BTreeMap::new();
        for (b, d) in &data {
            // Each block is written back whole, the inode block on its own: each block
            // is that block of one of the versions (its tail past the size unseen).
            let ok = files
                .iter()
                .any(|(_, blocks)| blocks.get(b).unwrap_or(&zero)[..d.len()] == **d);
            if !ok {
                return Err(format!(
                    "{p}: block {b} (bytes {}..) reads {}, which is none of the {} versions \
                     written (the last: {})",
                    b * bs,
                    brief_block(d),
                    files.len(),
                    last.map_or("none".into(), |(s, blocks)| brief_block(&visible(
                        blocks, *s, *b
                    )))
                ));
            }
            as_last &=
                last.is_some_and(|(_, blocks)| blocks.get(b).unwrap_or(&zero)[..d.len()] == **d);
            if d.iter().any(|x| *x != 0) {
                let mut full = d.clone();
                full.resize(BLOCK, 0);
                kept.insert(*b, full);
            }
        }
        checked.insert(p.clone(), Some((got.size, kept)));
        if as_last {
            report.unsynced_survived += 1;
        } else {
            report.unsynced_lost += 1;
        }
    }
    Ok(checked)
}

/// Plant the loss [`FsSimConfig::plant_lost_block_past`] asks for: through node 1's client,
/// zero the first block (by path, then block) at or past byte `past` that holds data, in a
/// file of one name that `now` has and the victim did not touch (fsynced); its path and
/// block.
pub(super) fn plant_lost_block(
    sim: &FsSim,
    now: &Reference,
    unsynced: &Unsynced,
    past: u64,
) -> Result<(String, u64), String> {
    let bs = BLOCK as u64;
    for p in now.files() {
        if unsynced.contains_key(&p) {
            continue;
        }
        let Some((i, size, blocks)) = ref_file(now, &p) else {
            continue;
        };
        if now.inodes[i].nlink != 1 {
            continue;
        }
        for (b, d) in blocks.range(past.div_ceil(bs)..) {
            let len = size.saturating_sub(b * bs).min(bs) as usize;
            if d[..len].iter().all(|x| *x == 0) {
                continue;
            }
            let c = sim.client(1);
            let lose = |e: Errno| format!("planting the loss of block {b} of {p}: {e}");
            let ino = c.resolve(&p).map_err(lose)?.ino;
            c.write(ino, b * bs, &vec![0; len]).map_err(lose)?;
            return Ok((p, *b));
        }
    }
    Err(format!(
        "nothing to plant: no fsynced block at or past byte {past} in a file of one name \
         the victim did not touch (choose another seed)"
    ))
}

impl Reference {
    /// Every path in the tree and the inode it names, sorted by path.
    pub(super) fn paths(&self) -> Vec<(String, usize)> {
        let mut out = Vec::new();
        let mut stack = vec![(String::new(), 0usize)];
        while let Some((path, i)) = stack.pop() {
            if let RNode::Dir { entries } = &self.inodes[i].node {
                for (name, j) in entries {
                    let q = format!("{path}/{}", String::from_utf8_lossy(name));
                    out.push((q.clone(), *j));
                    stack.push((q, *j));
                }
            }
        }
        out.sort();
        out
    }

    /// Every regular file's path.
    pub(super) fn files(&self) -> Vec<String> {
        self.paths()
            .into_iter()
            .filter(|(_, i)| matches!(self.inodes[*i].node, RNode::File { .. }))
            .map(|(p, _)| p)
            .collect()
    }

    /// Every path naming the same inode as `p` (itself included).
    pub(super) fn aliases(&self, p: &str) -> Vec<String> {
        let Ok(target) = self.resolve(p) else {
            return vec![p.to_string()];
        };
        self.paths()
            .into_iter()
            .filter(|(_, i)| *i == target)
            .map(|(p, _)| p)
            .collect()
    }
}

/// The reference after the crash: the one before it, with the victim's unsynced files
/// replaced by what the crash check read of them and accepted (`checked`), nothing else.
pub(super) fn adopt(now: &Reference, checked: &Checked) -> Result<Reference, String> {
    let mut r = now.clone();
    for (p, what) in checked {
        let exists_ref = r.resolve(p).is_ok();
        match what {
            Some((size, blocks)) => {
                if !exists_ref {
                    r.make(
                        p,
                        RNode::File {
                            blocks: BTreeMap::new(),
                            size: 0,
                        },
                    )
                    .map_err(|e| format!("adopting {p}: {e}"))?;
                }
                let ri = r.resolve(p).map_err(|e| format!("adopting {p}: {e}"))?;
                r.held.entry(ri).or_default().extend(blocks.keys());
                r.inodes[ri].node = RNode::File {
                    blocks: blocks.clone(),
                    size: *size,
                };
            }
            None => {
                if exists_ref {
                    let (d, name) = r.parent(p).map_err(|e| format!("adopting {p}: {e}"))?;
                    if let Some(i) = r.entries(d).remove(name) {
                        r.inodes[i].nlink -= 1;
                    }
                }
            }
        }
    }
    Ok(r)
}
