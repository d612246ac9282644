//! Starting a node: its roles' threads (shard loops, command thread, storage server, log,
//! cleaners, write-back) and the queues between them ([`Node::start`]).

use std::net::IpAddr;
use std::sync::mpsc::{Receiver, SyncSender};
use std::thread::JoinHandle;

use super::config::NodeSection;
use super::transport::endpoint;
use super::*;
use crate::storage::log::StripeGroup;
use crate::storage::log_actor::{Adopted, AdoptedLogs, HomeRoute};
use crate::storage::remote::{client_identity, ClientPurpose};

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
        let shared = Shared::<M::T>::new();
        let mut threads = Vec::new();
        if me.has("storage") {
            threads.push(spawn_storage_server(&config, &me, &mk, &shared)?);
        }
        let (command_tx, command_rx) = mpsc::sync_channel::<StoreCommand>(64);
        // Peers the shard loops find unreachable, for the membership loop to propose.
        let (suspect_tx, suspect_rx) =
            mpsc::sync_channel::<(NodeId, crate::coherence::Epoch)>(SUSPECT_QUEUE);
        let suspects = config.cluster.membership.then_some(suspect_tx);
        let (senders, wake) = spawn_shard_loops(
            &config,
            &me,
            &mk,
            &shared,
            &command_tx,
            suspects,
            &mut threads,
        )?;
        let membership = if config.cluster.membership {
            Some(spawn_membership(
                &config,
                &me,
                &mk,
                &shared,
                (&senders, &wake),
                suspect_rx,
                &mut threads,
            )?)
        } else {
            None
        };
        threads.push(spawn_command_thread(
            id,
            senders[0].clone(),
            wake[0].clone(),
            &shared,
            command_rx,
        ));
        if me.has("manager") {
            threads.push(spawn_log_thread(&config, &me, mk, &shared));
        } else {
            shared.ready.store(true, Ordering::Relaxed);
        }
        let blocks = node_blocks(&config, id, senders, wake, &shared);
        let client = Arc::new(FsClient::new(blocks, config.manager_map()));
        let cleaners: Cleaners = Default::default();
        spawn_cleaners(&config, id, &client, &shared, &cleaners, &mut threads);
        let periodic = Arc::new(AtomicU64::new(0));
        threads.push(spawn_write_back(&config, &client, &shared, &periodic));
        Ok(Node {
            config,
            id,
            client,
            stop: shared.stop,
            threads,
            log: log_control(shared.log.clone(), shared.actor.clone()),
            ready: shared.ready,
            mount: shared.mount,
            cleaners,
            periodic,
            socket_fs_requests: AtomicU64::new(0),
            log_check: log_check(shared.log),
            mounter: std::sync::OnceLock::new(),
            membership,
        })
    }
}

/// Suspects the shard loops may have queued for the membership loop.
const SUSPECT_QUEUE: usize = 256;
/// Changes asked for on the control socket and not yet proposed.
const CHANGE_QUEUE: usize = 16;

/// The membership loop (see [`crate::membership::run`]): its endpoint on its own virtual
/// network, its log from the node's disk, its way into every shard loop.
fn spawn_membership<M: MakeTransport>(
    config: &Config,
    me: &NodeSection,
    mk: &M,
    shared: &Shared<M::T>,
    (senders, wake): (&[SyncSender<Cmd>], &[Wake]),
    suspects: Receiver<(NodeId, crate::coherence::Epoch)>,
    threads: &mut Vec<JoinHandle<()>>,
) -> Result<MembershipHandle, StartError> {
    use crate::membership::run::{self as mrun, MembershipLoop, MEMBERSHIP_VNET};
    use crate::membership::{ClusterMap, Consensus, ConsensusConfig, MembershipUpdate};
    let shards = config.cluster.shards;
    let addr = me.membership_addr(shards);
    let t = mk.bind(addr).map_err(|e| StartError::Bind {
        what: "membership endpoint",
        addr,
        source: Box::new(e),
    })?;
    let mut endpoint = Endpoint::new(
        t,
        am_core::Config {
            tag: Tag(config.tag()),
            vnet: MEMBERSHIP_VNET,
            segment_bytes: 1 << 16,
            ..am_core::Config::default()
        },
    );
    let peers: BTreeMap<NodeId, EndpointName> = config
        .nodes
        .iter()
        .filter(|n| n.id != me.id)
        .map(|n| {
            (
                n.id,
                EndpointName {
                    addr: n.membership_addr(shards),
                    vnet: MEMBERSHIP_VNET,
                },
            )
        })
        .collect();
    mrun::connect_peers(&mut endpoint, &peers, config.tag()).map_err(|source| {
        StartError::Shard {
            shard: usize::MAX,
            source,
        }
    })?;
    let ids: Vec<NodeId> = config.nodes.iter().map(|n| n.id).collect();
    let voters = config.voters();
    let initial = ClusterMap::new(
        &ids,
        config.manager_map.entries.clone(),
        config
            .stripe_group_map()
            .groups
            .iter()
            .map(|g| g.servers.clone())
            .collect(),
    );
    let file = me.membership_file();
    let saved = mrun::load(&file).map_err(|source| StartError::Membership {
        path: file.clone(),
        why: source.to_string(),
    })?;
    let consensus = Consensus::new(
        ConsensusConfig {
            me: me.id,
            voters: voters.clone(),
            learners: ids
                .iter()
                .copied()
                .filter(|n| !voters.contains(n))
                .collect(),
            initial,
            seed: mrun::next_incarnation(&ClusterMap::new(&[], vec![], vec![]), me.id),
        },
        saved.as_deref(),
    )
    .map_err(|e| StartError::Membership {
        path: file.clone(),
        why: e.to_string(),
    })?;
    let incarnation = mrun::next_incarnation(consensus.map(), me.id);
    let (requests_tx, requests_rx) = mpsc::sync_channel(CHANGE_QUEUE);
    let status = Arc::new(Mutex::new(Default::default()));
    let joined = Arc::new(AtomicBool::new(false));
    let shard_links: Vec<Box<dyn Fn(MembershipUpdate) -> bool + Send>> = senders
        .iter()
        .zip(wake)
        .map(|(tx, w)| {
            let (tx, w) = (tx.clone(), w.clone());
            Box::new(move |u: MembershipUpdate| {
                // A membership change must reach every shard: wait for room.
                let ok = tx.send(Cmd::Membership(u)).is_ok();
                w.notify();
                ok
            }) as Box<dyn Fn(MembershipUpdate) -> bool + Send>
        })
        .collect();
    let ml = MembershipLoop {
        endpoint,
        consensus,
        file,
        incarnation,
        peers,
        shards: shard_links,
        suspects,
        requests: requests_rx,
        status: status.clone(),
        joined: joined.clone(),
        stop: shared.stop.clone(),
        left: false,
        on_map: on_map(me.id, shared.takeover.clone(), shared.adopted.clone()),
    };
    threads.push(spawn_named("membership", move || ml.run()));
    Ok(MembershipHandle {
        requests: requests_tx,
        status,
        joined,
    })
}

/// A store command for the command thread: from which node, its operation, the request.
type StoreCommand = (NodeId, OpId, Vec<u8>);

/// What the node's threads share (each thread gets clones of the parts it uses).
struct Shared<T: Transport> {
    /// Set to stop every thread.
    stop: Arc<AtomicBool>,
    /// Set once the log is recovered (at start on a node without the manager role).
    ready: Arc<AtomicBool>,
    /// This node's log, once recovered (manager role).
    log: SharedLog<T>,
    /// The cleaner's connections to the stripe group, for reading segments.
    reader: SharedReader<T>,
    /// Whether the log cannot write what it holds (its stores are full).
    log_full: Arc<AtomicBool>,
    /// Bytes of new data this node's log can take now (u64::MAX: no log yet).
    log_room: Arc<AtomicU64>,
    /// The storage server's capacity, bytes (0 without the storage role).
    storage_total: Arc<AtomicU64>,
    /// The storage server's free space, bytes, as it last looked.
    storage_free: Arc<AtomicU64>,
    /// The attached mount's queue of kernel invalidations.
    mount: MountLink,
    /// What the log actor did (published after each batch).
    actor: Arc<Mutex<LogActorCounters>>,
    /// The manager map and this incarnation's join, as the membership loop last applied.
    takeover: Arc<Mutex<Takeover>>,
    /// The logs this node took over from failed homes.
    adopted: AdoptedLogs<RemoteStore<T>>,
}

impl<T: Transport> Shared<T> {
    fn new() -> Self {
        Shared {
            stop: Arc::new(AtomicBool::new(false)),
            ready: Arc::new(AtomicBool::new(false)),
            log: Arc::new(Mutex::new(None)),
            reader: Arc::new(Mutex::new(None)),
            log_full: Arc::new(AtomicBool::new(false)),
            log_room: Arc::new(AtomicU64::new(u64::MAX)),
            storage_total: Arc::new(AtomicU64::new(0)),
            storage_free: Arc::new(AtomicU64::new(0)),
            mount: Arc::new(Mutex::new(None)),
            actor: Arc::new(Mutex::new(LogActorCounters::default())),
            takeover: Default::default(),
            adopted: Default::default(),
        }
    }
}

/// The storage role: open the fragment store on the configured file or device and serve
/// it on its own endpoint, in a thread of its own.
fn spawn_storage_server<M: MakeTransport>(
    config: &Config,
    me: &NodeSection,
    mk: &M,
    shared: &Shared<M::T>,
) -> Result<JoinHandle<()>, StartError> {
    let frag = config.cluster.fragment_bytes;
    // Each node's log and its cleaner's reader are clients of every storage server.
    let clients = 2 * config.nodes.len().max(1);
    let store = open_store(me, frag)?;
    shared
        .storage_total
        .store((store.slots() * frag) as u64, Ordering::Relaxed);
    let addr = me.storage_addr(config.cluster.shards);
    let ep = endpoint(
        mk,
        addr,
        config.tag(),
        clients * STORE_DEPTH * frag,
        "storage server",
    )?;
    let server = StorageServer::new(
        ep,
        store,
        ServerOptions {
            windows: clients,
            depth: STORE_DEPTH,
        },
    )
    .map_err(StartError::StorageServer)?;
    let (stop, free) = (shared.stop.clone(), shared.storage_free.clone());
    Ok(spawn_named("store-server", move || {
        storage_server_loop(server, frag, stop, free)
    }))
}

/// The node's fragment store (io_uring, ring depth 64), its file created if missing.
fn open_store(me: &NodeSection, frag: usize) -> Result<UringStore, StartError> {
    let path = me.storage.clone().ok_or(StartError::NoStoragePath(me.id))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).ok();
    }
    UringStore::open(
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
    })
}

/// Serve store requests until `stop`; every 200 ms publish the free space into `free`.
fn storage_server_loop<T: Transport>(
    mut server: StorageServer<T, UringStore>,
    frag: usize,
    stop: Arc<AtomicBool>,
    free: Arc<AtomicU64>,
) {
    let mut last = Instant::now() - Duration::from_secs(10);
    while !stop.load(Ordering::Relaxed) {
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
}

/// Wakes a shard loop from its wait (when a command is queued for it).
type Wake = Arc<dyn am_core::Notify>;

/// A shard loop of this node; its storage work goes to the log actor.
type NodeShard<T> = Shard<T, Vec<u8>, ActorStore>;

/// Make the shards, each connected to the same shard of the other nodes, and start a loop
/// for each, and the log actor that does their storage work; returns each shard's command
/// queue and wake-up.
fn spawn_shard_loops<M: MakeTransport>(
    config: &Config,
    me: &NodeSection,
    mk: &M,
    shared: &Shared<M::T>,
    command_tx: &SyncSender<StoreCommand>,
    suspects: Option<SyncSender<(NodeId, crate::coherence::Epoch)>>,
    threads: &mut Vec<JoinHandle<()>>,
) -> Result<(Vec<SyncSender<Cmd>>, Vec<Wake>), StartError> {
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
    let mut senders = Vec::new();
    let mut wake = Vec::new();
    // The shards' shared ledger of write-backs acknowledged and synced (manager failover).
    let top = config
        .nodes
        .iter()
        .map(|n| n.id as usize)
        .max()
        .unwrap_or(0);
    let ledger = Arc::new(crate::shard::SyncLedger::new(top + 1));
    // The log actor's queue: every shard's storage work; the answers come back on each
    // shard's own queue.
    let (work_tx, work_rx) = mpsc::sync_channel(ACTOR_QUEUE);
    let mut inboxes = Vec::new();
    for s in 0..config.cluster.shards {
        let cfg = ShardConfig {
            node: me.id,
            protocol: ProtocolConfig {
                sequenced: true,
                n_chance: config.cluster.n_chance,
                hand_off_written: config.cluster.hand_off_written,
            },
            placement: placement.clone(),
            clients: clients.clone(),
            capacity: config.cluster.cache_blocks,
        };
        let mut shard = connected_shard(config, me, mk, s, cfg)?;
        shard.share_ledger(ledger.clone());
        let (tx, rx) = mpsc::sync_channel(4096);
        senders.push(tx);
        let notifier = shard.endpoint().transport().notifier();
        wake.push(notifier.clone());
        let (done_tx, done_rx) = mpsc::sync_channel(ACTOR_DONE_QUEUE);
        inboxes.push(ShardInbox {
            done: done_tx,
            wake: notifier,
        });
        let link = StoreLink::new(work_tx.clone(), done_rx, s);
        let st = shared.stop.clone();
        let ml = shared.mount.clone();
        // Shard 0 hands store commands (the cleaner's) to the command thread.
        let cmds = (s == 0).then(|| command_tx.clone());
        let sus = suspects.clone();
        threads.push(spawn_named(&format!("shard-{s}"), move || {
            shard_loop(shard, rx, st, ml, cmds, link, sus)
        }));
    }
    let route = HomeRoute {
        me: me.id,
        homes: config.manager_map.entries.clone(),
        shift: INDEX_SHIFT,
    };
    let mut actor = LogActor::new(shared.log.clone(), shared.log_full.clone())
        .with_adopted(shared.adopted.clone(), route);
    if me.has("manager") {
        actor = actor.expecting_own_log();
    }
    let (stop, counters) = (shared.stop.clone(), shared.actor.clone());
    threads.push(spawn_named("log-actor", move || {
        log_actor::serve(actor, work_rx, inboxes, stop, counters)
    }));
    Ok((senders, wake))
}

/// Shard `s` of this node on its endpoint (port + s), connected to shard `s` of every
/// other node.
fn connected_shard<M: MakeTransport>(
    config: &Config,
    me: &NodeSection,
    mk: &M,
    s: usize,
    cfg: ShardConfig,
) -> Result<NodeShard<M::T>, StartError> {
    let tag = config.tag();
    let ep = endpoint(mk, me.shard_addr(s), tag, 1 << 16, "shard endpoint")?;
    let mut shard =
        Shard::new(ep, cfg, ActorStore).map_err(|source| StartError::Shard { shard: s, source })?;
    for n in &config.nodes {
        if n.id != me.id {
            let name = EndpointName {
                addr: n.shard_addr(s),
                vnet: 0,
            };
            shard
                .connect(n.id, name, Tag(tag))
                .map_err(|source| StartError::Shard { shard: s, source })?;
        }
    }
    Ok(shard)
}

/// The command thread: runs the cleaner's store commands (moves and checkpoints) that
/// shard 0 hands over, off the shard loops, and answers through shard 0's queue.
fn spawn_command_thread<T: Transport + Send + 'static>(
    id: NodeId,
    shard0: SyncSender<Cmd>,
    wake0: Wake,
    shared: &Shared<T>,
    commands: Receiver<StoreCommand>,
) -> JoinHandle<()> {
    let (log, reader, full, stop) = (
        shared.log.clone(),
        shared.reader.clone(),
        shared.log_full.clone(),
        shared.stop.clone(),
    );
    spawn_named("node-commands", move || {
        while !stop.load(Ordering::Relaxed) {
            let Ok((from, op, request)) = commands.recv_timeout(Duration::from_millis(200)) else {
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
            if shard0.send(done).is_err() {
                return;
            }
            wake0.notify();
        }
    })
}

/// The log thread (manager role): the log, once the stripe group's servers answer (they
/// may start after us), and the logs this node takes over from failed homes; see
/// [`LogThread`].
fn spawn_log_thread<M: MakeTransport>(
    config: &Config,
    me: &NodeSection,
    mk: M,
    shared: &Shared<M::T>,
) -> JoinHandle<()> {
    let groups = config.stripe_group_map().groups;
    // The managers whose logs share each group's stores (as the cleaner counts them).
    let writers = (0..groups.len())
        .map(|gi| {
            config
                .nodes
                .iter()
                .filter(|x| x.has("manager") && (x.id as usize - 1) % groups.len() == gi)
                .count()
        })
        .collect();
    let addrs = config
        .nodes
        .iter()
        .map(|n| (n.id, n.storage_addr(config.cluster.shards)))
        .collect();
    let thread = LogThread {
        id: me.id,
        mk,
        host: me.host,
        tag: config.tag(),
        frag: config.cluster.fragment_bytes,
        groups,
        writers,
        addrs,
        membership: config.cluster.membership,
        log: shared.log.clone(),
        reader: shared.reader.clone(),
        room: shared.log_room.clone(),
        ready: shared.ready.clone(),
        stop: shared.stop.clone(),
        takeover: shared.takeover.clone(),
        adopted: shared.adopted.clone(),
    };
    spawn_named("log-writer", move || thread.run())
}

/// How far a member that takes over a log numbers its segments past the last one it
/// recovered ([`Log::skip_segments`]): more than any one storage server holds, so nothing
/// the cut-off writer wrote meanwhile shares a number with them (2^30 of the 2^40 numbers
/// a writer has: a thousand takeovers).
const TAKEOVER_SEGMENT_GAP: u64 = 1 << 30;

/// What the membership loop tells the log thread (`on_map`): the epoch this incarnation
/// joined in, and the manager map. The logs to take over are marked in
/// [`Shared::adopted`] at once (so the log actor waits for them rather than failing).
#[derive(Clone, Debug, Default)]
struct Takeover {
    /// The epoch this node's current incarnation joined in (`None`: not a member).
    joined: Option<crate::coherence::Epoch>,
    /// Per manager slot, its node now.
    managers: Vec<NodeId>,
    /// Per manager slot, its home.
    homes: Vec<NodeId>,
}

/// The membership loop's hook ([`crate::membership::run::MembershipLoop::on_map`]): note
/// the map for the log thread, and mark the logs of homes whose slots moved here wanted.
fn on_map<T: Transport + Send + 'static>(
    me: NodeId,
    takeover: Arc<Mutex<Takeover>>,
    adopted: AdoptedLogs<RemoteStore<T>>,
) -> crate::membership::run::OnMap {
    Box::new(move |map, joined| {
        let mut a = lock(&adopted);
        for (home, now) in map.homes.iter().zip(&map.managers) {
            if *now == me && *home != me && joined.is_some() && !a.contains_key(home) {
                a.insert(*home, Adopted::Wanted(map.managers_epoch));
            }
        }
        *lock(&takeover) = Takeover {
            joined,
            managers: map.managers.clone(),
            homes: map.homes.clone(),
        };
    })
}

/// The log thread's state: how it reaches the stripe groups' storage servers, and what
/// it shares with the node.
struct LogThread<M: MakeTransport> {
    id: NodeId,
    mk: M,
    /// This node's address (the store clients' endpoints bind it, any port).
    host: IpAddr,
    tag: u64,
    frag: usize,
    /// The stripe groups (a home's log is striped over group `(home - 1) % len`).
    groups: Vec<StripeGroup>,
    /// Per group, the logs that share its stores.
    writers: Vec<usize>,
    /// Every node's storage server address.
    addrs: BTreeMap<NodeId, SocketAddr>,
    /// Whether the node keeps a membership log: then the log waits for this incarnation's
    /// join, whose epoch is its storage clients' generation.
    membership: bool,
    log: SharedLog<M::T>,
    reader: SharedReader<M::T>,
    room: Arc<AtomicU64>,
    ready: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    takeover: Arc<Mutex<Takeover>>,
    adopted: AdoptedLogs<RemoteStore<M::T>>,
}

impl<M: MakeTransport> LogThread<M> {
    /// The stripe group of `home`'s log.
    fn group_of(&self, home: NodeId) -> usize {
        (home as usize - 1) % self.groups.len()
    }

    /// The servers of `home`'s group, in the group's order: node and address.
    fn servers_of(&self, home: NodeId) -> Vec<(NodeId, SocketAddr)> {
        self.groups[self.group_of(home)]
            .servers
            .iter()
            .filter_map(|s| self.addrs.get(s).map(|a| (*s, *a)))
            .collect()
    }

    /// Recover the log (then the node is ready), keep the servers attached, take over the
    /// logs of failed homes whose slots move here and give them back when they go. With
    /// a membership log, the log is recovered once this incarnation's join commits (its
    /// epoch is the generation of its connections), and again after each rejoin (a member
    /// that took the log over meanwhile wrote to it).
    fn run(self) {
        let mut generation = None;
        let mut last_upkeep = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            let joined = if self.membership {
                lock(&self.takeover).joined
            } else {
                Some(0)
            };
            if let Some(j) = joined.filter(|j| generation != Some(*j)) {
                // A rejoin: the log as this node last knew it may be stale (a member that
                // took it over wrote to it). Work for it waits until it is recovered again.
                if generation.is_some() {
                    *lock(&self.log) = None;
                }
                match self.recover_own(j) {
                    Some(Ok(())) => generation = Some(j),
                    Some(Err(e)) => {
                        eprintln!("xfs-node {}: cannot recover the log: {e}", self.id);
                        return;
                    }
                    None => return,
                }
            }
            self.take_over_wanted();
            self.give_back_moved();
            // A server marked down (or down at start) that answers again is attached
            // and rebuilt: this log's fragments it misses are recomputed from the others.
            if generation.is_some() && last_upkeep.elapsed() >= Duration::from_secs(2) {
                last_upkeep = Instant::now();
                self.replace_dead_readers(generation.unwrap_or(0));
                self.rebuild_returned(generation.unwrap_or(0));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A store client of the server at `addr` as `identity` in `generation`, on its own
    /// endpoint (the server knows it by identity, whatever port it binds).
    fn connect(
        &self,
        addr: SocketAddr,
        identity: u64,
        generation: u64,
    ) -> Result<RemoteStore<M::T>, StartError> {
        let ep = endpoint(
            &self.mk,
            SocketAddr::new(self.host, 0),
            self.tag,
            2 * STORE_DEPTH * self.frag,
            "log endpoint",
        )?;
        let name = EndpointName { addr, vnet: 0 };
        let mut rs = RemoteStore::connect_as(
            ep,
            name,
            Tag(self.tag),
            STORE_DEPTH,
            Box::new(|| {}),
            (identity, generation),
        )
        .map_err(StartError::Connect)?;
        rs.set_timeout(Duration::from_secs(3));
        Ok(rs)
    }

    /// Store clients of `servers` as `identity` in `generation`, retried every 100 ms
    /// until every server answers or, after `patience`, `data` of them do (the others
    /// start down; their errors are printed from then on). `None`: the node stopped first.
    fn connect_group(
        &self,
        servers: &[(NodeId, SocketAddr)],
        (identity, generation): (u64, u64),
        data: usize,
        patience: Duration,
    ) -> Option<Vec<Option<RemoteStore<M::T>>>> {
        let deadline = Instant::now() + patience;
        let mut stores: Vec<Option<RemoteStore<M::T>>> = servers.iter().map(|_| None).collect();
        loop {
            for (i, (node, addr)) in servers.iter().enumerate() {
                if stores[i].is_some() {
                    continue;
                }
                match self.connect(*addr, identity, generation) {
                    Ok(rs) => stores[i] = Some(rs),
                    Err(e) if Instant::now() > deadline => {
                        eprintln!(
                            "xfs-node {}: storage server of node {node} at {addr}: {e}",
                            self.id
                        )
                    }
                    Err(_) => {}
                }
            }
            let up = stores.iter().filter(|s| s.is_some()).count();
            if up == stores.len()
                || (Instant::now() > deadline && (up >= data || patience.is_zero()))
            {
                return Some(stores);
            }
            if self.stop.load(Ordering::Relaxed) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Recover this node's own log in `generation` and install it with the cleaner's
    /// segment reader; then the node is ready. `None`: the node stopped first.
    fn recover_own(&self, generation: u64) -> Option<Result<(), LogError>> {
        let gi = self.group_of(self.id);
        let group = self.groups[gi].clone();
        let servers = self.servers_of(self.id);
        let identity = (client_identity(self.id, ClientPurpose::Log), generation);
        let stores =
            self.connect_group(&servers, identity, group.data(), Duration::from_secs(30))?;
        let mut l = match Log::recover(self.id, group.clone(), stores) {
            Ok(l) => l,
            Err(e) => return Some(Err(e)),
        };
        l.set_writers(self.writers[gi]);
        l.set_room_gauge(self.room.clone());
        *lock(&self.log) = Some(l);
        // The cleaner reads segments over connections of its own.
        let reader = client_identity(self.id, ClientPurpose::Reader);
        let rs = servers
            .iter()
            .map(|(_, a)| self.connect(*a, reader, generation).ok())
            .collect();
        *lock(&self.reader) = SegmentReader::new(group, rs).ok();
        self.ready.store(true, Ordering::Relaxed);
        Some(Ok(()))
    }

    /// Recover each log marked wanted (a failed home's, whose slots moved here): its
    /// servers are asked once (the home's own is likely down: its fragments are read
    /// from parity), its connections fence the home's.
    fn take_over_wanted(&self) {
        let adopted = self.adopted.clone();
        let wanted: Vec<(NodeId, u64)> = lock(&adopted)
            .iter()
            .filter_map(|(h, a)| match a {
                Adopted::Wanted(g) => Some((*h, *g)),
                _ => None,
            })
            .collect();
        for (home, generation) in wanted {
            let gi = self.group_of(home);
            let group = self.groups[gi].clone();
            let servers = self.servers_of(home);
            let identity = (client_identity(home, ClientPurpose::Log), generation);
            let Some(stores) = self.connect_group(&servers, identity, group.data(), Duration::ZERO)
            else {
                return;
            };
            let up = stores.iter().filter(|s| s.is_some()).count();
            let started = Instant::now();
            let state = if up < group.data() {
                Adopted::Failed(
                    generation,
                    format!("{up} of its {} storage servers answer", servers.len()),
                )
            } else {
                match Log::recover(home, group, stores) {
                    Ok(mut l) => {
                        l.set_writers(self.writers[gi]);
                        l.skip_segments(TAKEOVER_SEGMENT_GAP);
                        eprintln!(
                            "xfs-node {}: took over the log of node {home} (epoch \
                             {generation}): {} blocks, recovered in {} ms",
                            self.id,
                            l.imap().len(),
                            started.elapsed().as_millis()
                        );
                        Adopted::Ready(Box::new(l))
                    }
                    Err(e) => Adopted::Failed(generation, e.to_string()),
                }
            };
            if let Adopted::Failed(_, why) = &state {
                eprintln!(
                    "xfs-node {}: cannot take over the log of node {home}: {why}",
                    self.id
                );
            }
            let mut a = lock(&adopted);
            // Still wanted (not given back meanwhile)?
            if matches!(a.get(&home), Some(Adopted::Wanted(g)) if *g == generation) {
                a.insert(home, state);
            }
        }
    }

    /// The logs taken over whose slots no longer are this node's (their home rejoined, or
    /// they moved on): made durable, then dropped. A log that failed to be taken over is
    /// asked for again.
    fn give_back_moved(&self) {
        let t = lock(&self.takeover).clone();
        let adopted = &self.adopted;
        let mine = |home: NodeId| {
            t.joined.is_some()
                && t.homes
                    .iter()
                    .zip(&t.managers)
                    .any(|(h, m)| *h == home && *m == self.id)
        };
        let mut a = lock(adopted);
        let homes: Vec<NodeId> = a.keys().copied().collect();
        for home in homes {
            if mine(home) {
                if let Some(Adopted::Failed(g, _)) = a.get(&home) {
                    let g = *g;
                    a.insert(home, Adopted::Wanted(g));
                }
                continue;
            }
            if let Some(Adopted::Ready(mut l)) = a.remove(&home) {
                match l.fsync() {
                    Ok(()) => eprintln!(
                        "xfs-node {}: gave the log of node {home} back (its slots moved)",
                        self.id
                    ),
                    Err(e) => eprintln!(
                        "xfs-node {}: giving the log of node {home} back: its last writes \
                         could not be made durable: {e}",
                        self.id
                    ),
                }
            }
        }
    }

    /// The cleaner's connections: a reader store that died, or was never connected, is
    /// replaced once its server answers.
    fn replace_dead_readers(&self, generation: u64) {
        let identity = client_identity(self.id, ClientPurpose::Reader);
        for (i, (_, addr)) in self.servers_of(self.id).iter().enumerate() {
            let dead = lock(&self.reader)
                .as_mut()
                .and_then(|r| {
                    r.store_slot(i)
                        .map(|s| s.as_ref().is_none_or(|s| s.is_dead()))
                })
                .unwrap_or(false);
            if dead {
                if let Ok(rs) = self.connect(*addr, identity, generation) {
                    if let Some(slot) = lock(&self.reader).as_mut().and_then(|r| r.store_slot(i)) {
                        *slot = Some(rs);
                    }
                }
            }
        }
    }

    /// Each server the log has marked down that answers again: attach it and rebuild on it
    /// this log's fragments it misses (a failed rebuild leaves it down).
    fn rebuild_returned(&self, generation: u64) {
        let id = self.id;
        let down = lock(&self.log)
            .as_ref()
            .map(|l| l.down())
            .unwrap_or_default();
        let servers = self.servers_of(id);
        for i in down {
            let Some((node, addr)) = servers.get(i).copied() else {
                continue;
            };
            let identity = client_identity(id, ClientPurpose::Log);
            let Ok(rs) = self.connect(addr, identity, generation) else {
                continue;
            };
            let mut g = lock(&self.log);
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
}

/// The client's block API: the shards' queues, and `statfs` from the space gauges.
fn node_blocks<T: Transport>(
    config: &Config,
    id: NodeId,
    shards: Vec<SyncSender<Cmd>>,
    wake: Vec<Wake>,
    shared: &Shared<T>,
) -> NodeBlocks {
    let frag = config.cluster.fragment_bytes;
    let data_frags = {
        let groups = config.stripe_group_map();
        groups.groups[(id as usize - 1) % groups.groups.len()].data()
    };
    let (storage_total, free, log_full, room) = (
        shared.storage_total.clone(),
        shared.storage_free.clone(),
        shared.log_full.clone(),
        shared.log_room.clone(),
    );
    NodeBlocks {
        me: id,
        shards,
        wake,
        next: AtomicU64::new(1),
        prefetch: Default::default(),
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
    }
}

/// A cleaner for each stripe group this node serves (its leader is the first server of
/// the group that answers).
fn spawn_cleaners<T: Transport>(
    config: &Config,
    id: NodeId,
    client: &Arc<FsClient<NodeBlocks>>,
    shared: &Shared<T>,
    cleaners: &Cleaners,
    threads: &mut Vec<JoinHandle<()>>,
) {
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
            shared.ready.clone(),
            shared.stop.clone(),
            cleaners.clone(),
        );
        threads.push(spawn_named(&format!("cleaner-{id}"), move || {
            cleaner_loop(id, gid, servers, writers, cfg, c, r, s, cl)
        }));
    }
}

/// The periodic write-back: what was written and not fsynced is durable within
/// `write_back_secs` and a tenth (checked ten times per period).
fn spawn_write_back<T: Transport>(
    config: &Config,
    client: &Arc<FsClient<NodeBlocks>>,
    shared: &Shared<T>,
    periodic: &Arc<AtomicU64>,
) -> JoinHandle<()> {
    let (c, r, st, n) = (
        client.clone(),
        shared.ready.clone(),
        shared.stop.clone(),
        periodic.clone(),
    );
    let age = Duration::from_secs(config.cluster.write_back_secs);
    spawn_named("write-back", move || write_back_loop(c, age, r, st, n))
}

/// The log's fsck for the control socket ([`Log::check`]; `None`: no log).
fn log_check<T: Transport + Send + 'static>(log: SharedLog<T>) -> LogCheckFn {
    Box::new(move |repair| lock(&log).as_mut().map(|l| l.check(repair)))
}

/// The log's counters for the status, after a `"checkpoint"` or an `"fsync"` if asked
/// (empty without a log).
fn log_control<T: Transport + Send + 'static>(
    log: SharedLog<T>,
    actor: Arc<Mutex<LogActorCounters>>,
) -> LogControl {
    Box::new(move |what: &str| {
        let a = *lock(&actor);
        let mut g = lock(&log);
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
            ("log_fragment_fetches".into(), k.fragment_fetches),
            ("log_fragment_cache_hits".into(), k.fragment_cache_hits),
            ("log_fragment_range_reads".into(), k.fragment_range_reads),
            ("log_checkpoints".into(), k.checkpoints),
            ("log_servers_lost".into(), k.servers_lost),
            ("log_rebuilt".into(), k.rebuilt),
            ("log_servers_down".into(), l.down().len() as u64),
            ("log_live_bytes".into(), live),
            ("log_blocks".into(), l.imap().len() as u64),
            ("log_actor_batches".into(), a.batches),
            ("log_actor_blocks".into(), a.blocks),
            ("log_actor_syncs".into(), a.syncs),
            ("log_actor_fsyncs".into(), a.fsyncs),
        ])
    })
}
