//! One seeded run of the whole-cluster simulation: random operations from random nodes over
//! the lossy network, a storage server lost, a node crashed and restarted, every answer checked.

use super::*;

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct FsSimReport {
    /// Operations compared.
    pub ops: usize,
    /// Of which failed with the same errno on both sides.
    pub errors_matched: usize,
    /// Reads served from peers' caches.
    pub peer_reads: u64,
    /// Datagrams lost by the network.
    pub lost: u64,
    /// Log reads rebuilt from parity.
    pub degraded_reads: u64,
    /// Whether a node crashed and restarted.
    pub crashed: bool,
    /// Blocks of the crashed node's unsynced writes that survived / were lost.
    pub unsynced_survived: usize,
    /// Unsynced blocks lost.
    pub unsynced_lost: usize,
    /// Pieces of store work the log actors left queued at the end of a step, summed over
    /// steps (answered late: the shards ran on meanwhile).
    pub actor_deferred: u64,
    /// Requests the storage servers answered (their own code, over the storage network).
    pub storage_served: u64,
    /// Datagrams the storage network lost, or sent to a lost server.
    pub storage_lost: u64,
    /// Requests the storage servers refused as outside their sender's window.
    pub storage_bad_requests: u64,
    /// Reads the nodes' kernels served from their copies (without asking the node).
    pub kernel_hits: u64,
    /// Invalidations the kernels answered (each sent by a shard through the mount queue).
    pub kernel_invalidations: u64,
    /// The loss planted by [`FsSimConfig::plant_lost_block_past`]: the path and block.
    pub planted: Option<(String, u64)>,
}

/// Read the whole tree through `c` (for the crash check): path → (kind, content).
pub(super) fn walk<B: Blocks>(c: &FsClient<B>) -> R<BTreeMap<String, (Kind, Vec<u8>)>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(String::new(), c.root())];
    while let Some((path, ino)) = stack.pop() {
        // A name whose inode died with the crashed node is not listed.
        for (e, i) in c.readdir_plus(ino)? {
            let p = format!("{path}/{}", String::from_utf8_lossy(&e.name));
            match e.kind {
                Kind::Dir => {
                    out.insert(p.clone(), (Kind::Dir, Vec::new()));
                    stack.push((p, e.ino));
                }
                Kind::Symlink => {
                    out.insert(p, (Kind::Symlink, i.target.clone()));
                }
                _ => {
                    // Sparse files past 4 GiB: keep only the blocks written (checked by
                    // reading the non-hole ranges the reference knows).
                    out.insert(p, (Kind::File, i.size.to_le_bytes().to_vec()));
                }
            }
        }
    }
    Ok(out)
}

/// A short description of an answer (data as length and checksum).
pub(super) fn brief(a: &R<Answer>) -> String {
    match a {
        Ok(Answer::Data(d)) => {
            let nz = d.iter().position(|x| *x != 0);
            format!(
                "Data({} bytes, crc {:08x}, first non-zero at {nz:?})",
                d.len(),
                crc32c::crc32c(d)
            )
        }
        other => format!("{other:?}"),
    }
}

pub(super) fn trace() -> bool {
    std::env::var_os("XFS_FS_SIM_TRACE").is_some()
}

/// Run one seeded simulation; `Err` names the seed and the first difference.
pub fn run(seed: u64, cfg: &FsSimConfig) -> Result<FsSimReport, String> {
    let fail = |m: String| format!("seed {seed}: {m} (replay: XFS_FS_SIM_SEED={seed})");
    let mut sim = FsSim::new(seed, cfg);
    let mut reference = Reference::new();
    let mut rng = Rng::new(seed);
    let mut report = FsSimReport::default();
    let nodes = cfg.nodes as NodeId;
    sim.client(1)
        .format()
        .map_err(|e| fail(format!("format: {e}")))?;
    for (i, d) in ["/d0", "/d1", "/d0/e"].iter().enumerate() {
        let op = FsOpSim::Mkdir(d.to_string());
        let want = reference.apply(&op);
        let got = apply_fs(sim.client(1 + (i as NodeId) % nodes), &op);
        if want != got {
            return Err(fail(format!("setup {op:?}: {got:?}, want {want:?}")));
        }
    }
    // The crash victim's unsynced window: from `crash_at - 8`, the victim writes without
    // fsync while the others fsync; then it crashes.
    let victim = 1 + (rng.below(nodes as u64) as NodeId);
    let window = cfg.crash_at.map(|c| c.saturating_sub(8));
    let mut unsynced: Unsynced = BTreeMap::new();
    for k in 0..cfg.ops {
        if cfg.lose_server_at == Some(k) {
            let s = rng.below(cfg.servers as u64) as usize;
            sim.world.borrow().tier.lose(s);
        }
        if window == Some(k) {
            // Everything durable, then the window opens.
            for n in 1..=nodes {
                sim.client(n)
                    .sync_all()
                    .map_err(|e| fail(format!("sync_all on node {n}: {e}")))?;
            }
        }
        if cfg.crash_at == Some(k) {
            for n in (1..=nodes).filter(|n| *n != victim) {
                sim.client(n)
                    .sync_all()
                    .map_err(|e| fail(format!("sync_all on node {n}: {e}")))?;
            }
            sim.crash_and_restart(victim).map_err(&fail)?;
            report.crashed = true;
            if let Some(past) = cfg.plant_lost_block_past {
                report.planted =
                    Some(plant_lost_block(&sim, &reference, &unsynced, past).map_err(&fail)?);
            }
            let planted = report.planted.as_ref().map_or(String::new(), |(p, b)| {
                format!(" [planted: {p} lost block {b}]")
            });
            let checked = check_after_crash(&sim, &reference, &unsynced, &mut report)
                .map_err(|e| fail(format!("after node {victim} crashed: {e}{planted}")))?;
            // What survived (and was checked) is the new truth.
            reference = adopt(&reference, &checked).map_err(&fail)?;
            unsynced.clear();
        }
        let in_window = window.is_some_and(|w| k >= w) && cfg.crash_at.is_some_and(|c| k < c);
        let (node, op) = if in_window && rng.below(2) == 0 {
            (victim, random_op(&mut rng, true, &reference.files()))
        } else {
            let mut n = 1 + rng.below(nodes as u64) as NodeId;
            if in_window {
                while n == victim {
                    n = 1 + rng.below(nodes as u64) as NodeId;
                }
            }
            (n, random_op(&mut rng, false, &reference.files()))
        };
        if in_window && node != victim {
            // Others must not touch what the victim has not synced (their reads would
            // make it durable through coherence, which the crash check allows but the
            // reference cannot predict).
            let touches = |p: &String| {
                unsynced
                    .keys()
                    .any(|u| u == p || p.starts_with(&format!("{u}/")))
            };
            let paths: Vec<&String> = match &op {
                FsOpSim::Rename(a, b) | FsOpSim::Link(a, b) => vec![a, b],
                FsOpSim::Create(p)
                | FsOpSim::Mkdir(p)
                | FsOpSim::Write(p, ..)
                | FsOpSim::Append(p, ..)
                | FsOpSim::Read(p, ..)
                | FsOpSim::Truncate(p, _)
                | FsOpSim::Unlink(p)
                | FsOpSim::Rmdir(p)
                | FsOpSim::Symlink(p, _)
                | FsOpSim::Getattr(p)
                | FsOpSim::Readdir(p)
                | FsOpSim::Fsync(p)
                | FsOpSim::Xattr(p, ..) => vec![p],
            };
            if paths.iter().any(|p| touches(p))
                || matches!(
                    op,
                    FsOpSim::Rename(..) | FsOpSim::Rmdir(_) | FsOpSim::Readdir(_)
                )
            {
                continue;
            }
        }
        if trace() {
            eprintln!("op {k} node {node}: {op:?}");
        }
        let pre = (in_window && node == victim).then(|| reference.clone());
        let want = reference.apply(&op);
        let got = apply_fs(sim.client(node), &op);
        report.ops += 1;
        if want != got {
            let errs = sim.world.borrow().protocol_errors();
            return Err(fail(format!(
                "op {k} on node {node}: {op:?}\n  cluster answered   {}\n  reference answered {}\n  protocol errors: {errs:?}",
                brief(&got),
                brief(&want)
            )));
        }
        if want.is_err() {
            report.errors_matched += 1;
        } else if in_window && node == victim {
            // An append is the write it became (at the offset it landed at), for the crash
            // check's block-by-block reasoning.
            let op = match (&op, &want) {
                (FsOpSim::Append(p, len, seed), Ok(Answer::At(at))) => {
                    FsOpSim::Write(p.clone(), *at, *len, *seed)
                }
                _ => op,
            };
            if let FsOpSim::Create(p) | FsOpSim::Write(p, ..) | FsOpSim::Truncate(p, _) = &op {
                // Every name of the inode (hard links) is affected.
                for alias in reference.aliases(p) {
                    unsynced
                        .entry(alias)
                        .or_insert_with(|| (pre.clone().unwrap_or_default(), Vec::new()))
                        .1
                        .push(op.clone());
                }
            }
        } else if node != victim || !in_window {
            // Others fsync as they go while the window is open.
            if in_window {
                let _ = sim.client(node).sync_all();
            }
        }
    }
    let w = sim.world.borrow();
    if w.stuck > 0 {
        return Err(fail(format!("{} block operations never finished", w.stuck)));
    }
    let errs = w.protocol_errors();
    if !errs.is_empty() {
        return Err(fail(format!("protocol errors: {errs:?}")));
    }
    for node in &w.shards {
        for s in node {
            report.peer_reads += s.client.counters.peer_reads;
        }
    }
    for l in &w.logs {
        if let Some(l) = l.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            report.degraded_reads += l.counters().degraded_reads;
        }
    }
    report.actor_deferred = w.actor_deferred;
    report.lost = w.net.counters().dropped;
    let tier = w.tier.counters();
    report.storage_served = tier.served;
    report.storage_lost = tier.lost;
    report.storage_bad_requests = tier.bad_requests;
    for m in &w.mounts {
        report.kernel_hits += m.hits;
        report.kernel_invalidations += m.invalidations;
    }
    Ok(report)
}
