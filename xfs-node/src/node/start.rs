//! Starting a node: its roles' threads (shard loops, command thread, storage server, log,
//! cleaners, write-back) and the queues between them ([`Node::start`]).

use super::transport::endpoint;
use super::*;

/// The leader's link to the writers of its group: cleaner commands over the shards.
struct NodeGroup<'a> {
    blocks: &'a NodeBlocks,
}

impl cleaner::Group for NodeGroup<'_> {
    fn call(
        &mut self,
        writer: NodeId,
        cmd: &cleaner::Command,
    ) -> Result<cleaner::Reply, cleaner::GroupError> {
        let request = bincode::serialize(cmd).map_err(cleaner::GroupError::Encode)?;
        // A usage query is quick (a dead writer is skipped after 3 s); cleaning and
        // checkpointing take their time.
        let timeout = match cmd {
            cleaner::Command::Usage { .. } | cleaner::Command::Ping => Duration::from_secs(3),
            _ => Duration::from_secs(120),
        };
        let answer = self.blocks.call(writer, request, timeout)?;
        bincode::deserialize(&answer)
            .map_err(|source| cleaner::GroupError::BadAnswer { writer, source })
    }
}

/// Every tenth of `age`, make durable the files whose oldest unsynced write is `age`
/// old; `synced` counts the files so written back (`periodic_write_backs` in the status).
fn write_back_loop(
    client: Arc<FsClient<NodeBlocks>>,
    age: Duration,
    ready: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    synced: Arc<AtomicU64>,
) {
    let tick = (age / 10).max(Duration::from_millis(100));
    let mut next = Instant::now() + tick;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        if Instant::now() < next || !ready.load(Ordering::Relaxed) {
            continue;
        }
        next = Instant::now() + tick;
        match client.write_back_older_than(age.as_nanos() as u64) {
            Ok(n) => {
                synced.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) => {
                eprintln!("xfs-node: periodic write-back: {e} (the blocks stay dirty; retried)")
            }
        }
    }
}

/// The cleaner of stripe group `group` on a node that may lead it: the first of
/// `candidates` (the group's servers, in config order) that answers leads; it looks at
/// the group every second and cleans when its policy says so.
#[allow(clippy::too_many_arguments)]
fn cleaner_loop(
    id: NodeId,
    group: u32,
    candidates: Vec<NodeId>,
    writers: Vec<NodeId>,
    cfg: cleaner::CleanerConfig,
    client: Arc<FsClient<NodeBlocks>>,
    ready: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    cleaners: Cleaners,
) {
    let mut leader: Option<cleaner::Leader> = None;
    let ping = bincode::serialize(&cleaner::Command::Ping).unwrap_or_default();
    let nap = |stop: &AtomicBool, d: Duration| {
        let end = Instant::now() + d;
        while Instant::now() < end && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50).min(d));
        }
    };
    while !stop.load(Ordering::Relaxed) {
        if !ready.load(Ordering::Relaxed) {
            nap(&stop, Duration::from_millis(200));
            continue;
        }
        let lead = cleaner::leader_of(&candidates, |n| {
            n == id
                || client
                    .blocks
                    .call(n, ping.clone(), Duration::from_secs(3))
                    .is_ok()
        });
        if lead != Some(id) {
            leader = None;
            lock(&cleaners).insert(group, (lead, None));
            nap(&stop, Duration::from_secs(1));
            continue;
        }
        let l = leader.get_or_insert_with(|| {
            eprintln!("xfs-node {id}: leading the cleaner of stripe group {group}");
            let l = cleaner::Leader::new(cfg.clone());
            lock(&cleaners).insert(group, (Some(id), Some(l.status.clone())));
            l
        });
        let before = l.status.clone();
        let cleaned = l.round(
            &mut NodeGroup {
                blocks: &client.blocks,
            },
            &writers,
            crate::storage::log::wall_clock_ms(),
            &mut |work| nap(&stop, cfg.pause(work)),
        );
        let s = &l.status;
        if cleaned > 0 {
            eprintln!(
                "xfs-node {id}: cleaner of stripe group {group}: {} segments cleaned ({} blocks, \
                 {} KiB moved, {} discarded), {} freed; {}/{} segments free",
                s.segments_cleaned - before.segments_cleaned,
                s.blocks_moved - before.blocks_moved,
                (s.bytes_moved - before.bytes_moved) >> 10,
                s.discarded - before.discarded,
                s.freed - before.freed,
                s.free_segments,
                s.total_segments
            );
        }
        if !s.last_error.is_empty() && s.last_error != before.last_error {
            eprintln!(
                "xfs-node {id}: cleaner of stripe group {group}: {}",
                s.last_error
            );
        }
        lock(&cleaners).insert(group, (Some(id), Some(s.clone())));
        if cleaned == 0 {
            nap(&stop, Duration::from_millis(200));
        }
    }
}

impl Node {
    /// Start node `id` of `config` with transport `mk`; returns once every part runs (the
    /// log may still wait for storage servers: see [`Node::is_ready`]).
    pub fn start<M: MakeTransport>(config: Config, id: NodeId, mk: M) -> Result<Node, StartError> {
        let me = config.node(id).ok_or(StartError::NotInConfig(id))?.clone();
        let c = &config.cluster;
        let tag = config.tag();
        let stop = Arc::new(AtomicBool::new(false));
        let ready = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let frag = c.fragment_bytes;
        // Each node's log and its cleaner's reader are clients of every storage server.
        let servers = 2 * config.nodes.len().max(1);

        // Storage server.
        let storage_total = Arc::new(AtomicU64::new(0));
        let storage_free = Arc::new(AtomicU64::new(0));
        if me.has("storage") {
            let path = me.storage.clone().ok_or(StartError::NoStoragePath(id))?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).ok();
            }
            let store = UringStore::open(
                &path,
                UringOptions {
                    fragment_bytes: frag,
                    depth: 64,
                    create_bytes: me.storage_bytes,
                },
            )
            .map_err(|source| StartError::Storage {
                path: path.clone(),
                source,
            })?;
            storage_total.store((store.slots() * frag) as u64, Ordering::Relaxed);
            let addr = me.storage_addr(c.shards);
            let ep = endpoint(
                &mk,
                addr,
                tag,
                servers * STORE_DEPTH * frag,
                "storage server",
            )?;
            let mut server = StorageServer::new(
                ep,
                store,
                ServerOptions {
                    windows: servers,
                    depth: STORE_DEPTH,
                },
            )
            .map_err(StartError::StorageServer)?;
            let s = stop.clone();
            let free = storage_free.clone();
            threads.push(std::thread::spawn(move || {
                let mut last = Instant::now() - Duration::from_secs(10);
                while !s.load(Ordering::Relaxed) {
                    if last.elapsed() > Duration::from_millis(200) {
                        if let Ok(f) = server.store().free_slots() {
                            free.store((f * frag) as u64, Ordering::Relaxed);
                        }
                        last = Instant::now();
                    }
                    if server.step().unwrap_or(0) == 0 {
                        // Woken by a request or a timer of the endpoint.
                        let _ = server.wait(Duration::from_millis(50));
                    }
                }
                let _ = server.store().sync();
            }));
        }

        // Shards.
        let placement = Placement {
            managers: config.manager_map.entries.clone(),
            storages: config.manager_map.entries.clone(),
            index_shift: Some(INDEX_SHIFT),
        };
        let clients: Vec<NodeId> = config
            .nodes
            .iter()
            .filter(|n| n.has("client"))
            .map(|n| n.id)
            .collect();
        let log: SharedLog<M::T> = Arc::new(Mutex::new(None));
        let reader: SharedReader<M::T> = Arc::new(Mutex::new(None));
        let (command_tx, command_rx) = mpsc::sync_channel::<(NodeId, OpId, Vec<u8>)>(64);
        let log_full = Arc::new(AtomicBool::new(false));
        // Bytes of new data this node's log can take now (u64::MAX: no log yet).
        let log_room = Arc::new(AtomicU64::new(u64::MAX));
        let mount: MountLink = Arc::new(Mutex::new(None));
        let mut senders = Vec::new();
        let mut wake = Vec::new();
        for s in 0..c.shards {
            let addr = me.shard_addr(s);
            let ep = endpoint(&mk, addr, tag, 1 << 16, "shard endpoint")?;
            let mut shard = Shard::new(
                ep,
                ShardConfig {
                    node: id,
                    protocol: ProtocolConfig {
                        sequenced: true,
                        n_chance: c.n_chance,
                    },
                    placement: placement.clone(),
                    clients: clients.clone(),
                    capacity: c.cache_blocks,
                },
                LogStore {
                    log: log.clone(),
                    full: log_full.clone(),
                },
            )
            .map_err(|source| StartError::Shard { shard: s, source })?;
            for n in &config.nodes {
                if n.id != id {
                    shard
                        .connect(
                            n.id,
                            EndpointName {
                                addr: n.shard_addr(s),
                                vnet: 0,
                            },
                            Tag(tag),
                        )
                        .map_err(|source| StartError::Shard { shard: s, source })?;
                }
            }
            let (tx, rx) = mpsc::sync_channel(4096);
            senders.push(tx);
            wake.push(shard.endpoint().transport().notifier());
            let st = stop.clone();
            let ml = mount.clone();
            // Shard 0 hands store commands (the cleaner's) to the command thread.
            let cmds = (s == 0).then(|| command_tx.clone());
            threads.push(std::thread::spawn(move || {
                shard_loop(shard, rx, st, ml, cmds)
            }));
        }
        // The command thread: the cleaner's moves and checkpoints, off the shard loops.
        {
            let (tx0, wake0, log, reader, full, st) = (
                senders[0].clone(),
                wake[0].clone(),
                log.clone(),
                reader.clone(),
                log_full.clone(),
                stop.clone(),
            );
            threads.push(std::thread::spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    let Ok((from, op, request)) =
                        command_rx.recv_timeout(Duration::from_millis(200))
                    else {
                        continue;
                    };
                    let reply = cleaner::serve(&log, &reader, id, &request);
                    if let Some(l) = lock(&log).as_ref() {
                        full.store(l.is_full(), Ordering::Relaxed);
                    }
                    let done = Cmd::CommandDone {
                        from,
                        op,
                        result: Ok(reply),
                    };
                    if tx0.send(done).is_err() {
                        return;
                    }
                    wake0.notify();
                }
            }));
        }

        // The log, once the stripe group's servers answer (they may start after us).
        if me.has("manager") {
            let groups = config.stripe_group_map();
            let gi = (id as usize - 1) % groups.groups.len();
            let g = groups.groups[gi].clone();
            // The managers whose logs share this group's stores (as the cleaner counts them).
            let writers = config
                .nodes
                .iter()
                .filter(|x| x.has("manager") && (x.id as usize - 1) % groups.groups.len() == gi)
                .count();
            let addrs: Vec<(NodeId, SocketAddr)> = g
                .servers
                .iter()
                .filter_map(|s| config.node(*s).map(|n| (*s, n.storage_addr(c.shards))))
                .collect();
            let host = me.host;
            let log2 = log.clone();
            let room2 = log_room.clone();
            let reader2 = reader.clone();
            let ready2 = ready.clone();
            let stop2 = stop.clone();
            let mk = Arc::new(mk);
            threads.push(std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(30);
                // A store client of the server at `addr`, on its own endpoint.
                let connect = |addr: SocketAddr| -> Result<RemoteStore<M::T>, StartError> {
                    let ep = endpoint(
                        &*mk,
                        SocketAddr::new(host, 0),
                        tag,
                        2 * STORE_DEPTH * frag,
                        "log endpoint",
                    )?;
                    let name = EndpointName { addr, vnet: 0 };
                    let mut rs =
                        RemoteStore::connect(ep, name, Tag(tag), STORE_DEPTH, Box::new(|| {}))
                            .map_err(StartError::Connect)?;
                    rs.set_timeout(Duration::from_secs(3));
                    Ok(rs)
                };
                let mut stores: Vec<Option<RemoteStore<M::T>>> =
                    addrs.iter().map(|_| None).collect();
                loop {
                    for (i, (node, addr)) in addrs.iter().enumerate() {
                        if stores[i].is_some() {
                            continue;
                        }
                        match connect(*addr) {
                            Ok(rs) => stores[i] = Some(rs),
                            Err(e) if Instant::now() > deadline => {
                                eprintln!(
                                    "xfs-node {id}: storage server of node {node} at {addr}: {e}"
                                )
                            }
                            Err(_) => {}
                        }
                    }
                    let up = stores.iter().filter(|s| s.is_some()).count();
                    if up == stores.len() || (Instant::now() > deadline && up >= g.data()) {
                        break;
                    }
                    if stop2.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                let group = g.clone();
                match Log::recover(id, g, stores) {
                    Ok(mut l) => {
                        l.set_writers(writers);
                        l.set_room_gauge(room2);
                        *lock(&log2) = Some(l);
                        // The cleaner reads segments over connections of its own.
                        let rs = addrs.iter().map(|(_, a)| connect(*a).ok()).collect();
                        *lock(&reader2) = SegmentReader::new(group, rs).ok();
                        ready2.store(true, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("xfs-node {id}: cannot recover the log: {e}");
                        return;
                    }
                }
                // A server marked down (or down at start) that answers again is attached
                // and rebuilt: this log's fragments it misses are recomputed from the others.
                while !stop2.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_secs(2));
                    // The cleaner's connections too (a reader store that died, or was
                    // never connected, is replaced once its server answers).
                    for (i, (_, addr)) in addrs.iter().enumerate() {
                        let dead = lock(&reader2)
                            .as_mut()
                            .and_then(|r| {
                                r.store_slot(i)
                                    .map(|s| s.as_ref().is_none_or(|s| s.is_dead()))
                            })
                            .unwrap_or(false);
                        if dead {
                            if let Ok(rs) = connect(*addr) {
                                if let Some(slot) =
                                    lock(&reader2).as_mut().and_then(|r| r.store_slot(i))
                                {
                                    *slot = Some(rs);
                                }
                            }
                        }
                    }
                    let down = lock(&log2).as_ref().map(|l| l.down()).unwrap_or_default();
                    for i in down {
                        let Some((node, addr)) = addrs.get(i).copied() else {
                            continue;
                        };
                        let Ok(rs) = connect(addr) else {
                            continue;
                        };
                        let mut g = lock(&log2);
                        if let Some(l) = g.as_mut() {
                            match l.rebuild(i, rs) {
                                Ok(n) => eprintln!(
                                    "xfs-node {id}: storage server of node {node} is back: \
                                     rebuilt {n} fragments of this node's log on it"
                                ),
                                Err(e) => {
                                    eprintln!("xfs-node {id}: rebuilding on node {node}: {e}");
                                    l.take_store(i);
                                }
                            }
                        }
                    }
                }
            }));
        } else {
            ready.store(true, Ordering::Relaxed);
        }

        let free = storage_free.clone();
        let room = log_room.clone();
        let data_frags = {
            let groups = config.stripe_group_map();
            groups.groups[(id as usize - 1) % groups.groups.len()].data()
        };
        let blocks = NodeBlocks {
            me: id,
            shards: senders,
            wake,
            next: AtomicU64::new(1),
            statfs: Box::new(move || {
                // In bytes of file data: a segment takes a slot on every server of the
                // group and carries `data` fragments less its summary. Free is what new
                // data may take: the log's room (free segments less the checkpoints' and
                // the cleaner's reserve), which `xfs-node status` shows too.
                let bs = BLOCK as u64;
                let slot_data = (data_frags * frag).saturating_sub(SUMMARY_BYTES) as u64;
                let total = storage_total.load(Ordering::Relaxed) / frag as u64 * slot_data;
                let raw_free = free.load(Ordering::Relaxed) / frag as u64 * slot_data;
                let free = if log_full.load(Ordering::Relaxed) {
                    0
                } else {
                    match room.load(Ordering::Relaxed) {
                        u64::MAX => raw_free,
                        r => r.min(raw_free),
                    }
                };
                Ok(StatFs {
                    bsize: bs,
                    blocks: total / bs,
                    bfree: free / bs,
                    namelen: 255,
                })
            }),
        };
        let client = Arc::new(FsClient::new(blocks, config.manager_map()));
        // A cleaner for each stripe group this node serves (its leader is the first
        // server of the group that answers).
        let cleaners: Cleaners = Default::default();
        {
            let groups = config.stripe_group_map();
            let n = groups.groups.len();
            for (gi, g) in groups.groups.iter().enumerate() {
                if !g.servers.contains(&id) {
                    continue;
                }
                let writers: Vec<NodeId> = config
                    .nodes
                    .iter()
                    .filter(|x| x.has("manager") && (x.id as usize - 1) % n == gi)
                    .map(|x| x.id)
                    .collect();
                let (gid, servers) = (g.id, g.servers.clone());
                let (cfg, c, r, s, cl) = (
                    config.cleaner.clone(),
                    client.clone(),
                    ready.clone(),
                    stop.clone(),
                    cleaners.clone(),
                );
                threads.push(std::thread::spawn(move || {
                    cleaner_loop(id, gid, servers, writers, cfg, c, r, s, cl)
                }));
            }
        }
        // The periodic write-back: what was written and not fsynced is durable within
        // `write_back_secs` and a tenth (checked ten times per period).
        let periodic = Arc::new(AtomicU64::new(0));
        {
            let (c, r, st, n) = (
                client.clone(),
                ready.clone(),
                stop.clone(),
                periodic.clone(),
            );
            let age = Duration::from_secs(config.cluster.write_back_secs);
            threads.push(std::thread::spawn(move || {
                write_back_loop(c, age, r, st, n)
            }));
        }
        let log4 = log.clone();
        let log_check: LogCheckFn =
            Box::new(move |repair| lock(&log4).as_mut().map(|l| l.check(repair)));
        let log3 = log.clone();
        let log_status: LogControl = Box::new(move |what: &str| {
            let mut g = lock(&log3);
            let Some(l) = g.as_mut() else {
                return Ok(Vec::new());
            };
            match what {
                "checkpoint" => l.checkpoint()?,
                "fsync" => l.fsync()?,
                _ => {}
            }
            let k = l.counters();
            let live: u64 = l.live_bytes().values().sum();
            Ok(vec![
                ("log_segments".into(), k.segments),
                ("log_degraded_reads".into(), k.degraded_reads),
                ("log_checkpoints".into(), k.checkpoints),
                ("log_servers_lost".into(), k.servers_lost),
                ("log_rebuilt".into(), k.rebuilt),
                ("log_servers_down".into(), l.down().len() as u64),
                ("log_live_bytes".into(), live),
                ("log_blocks".into(), l.imap().len() as u64),
            ])
        });
        let node = Node {
            config,
            id,
            client,
            stop,
            threads,
            log: log_status,
            ready,
            mount,
            cleaners,
            periodic,
            log_check,
        };
        Ok(node)
    }
}
