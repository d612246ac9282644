//! Workloads for `coherence-bench`: the coherence state machine alone (an in-memory FIFO
//! network on one thread, no AM, no syscalls) and the shard loops over AM on UDP loopback,
//! one thread per shard index.
//!
//! An *event* is one input to a state machine: a protocol message handled or a user
//! operation started (kernel invalidations, immediate here, are not counted).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use am_core::{Config, Endpoint, Tag};
use am_udp::{UdpConfig, UdpTransport};
use xfs_node::coherence::{
    BlockId, ClientShard, ManagerShard, MemStore, Msg, NodeId, Output, Placement, ProtocolConfig,
    Role, StorageShard, UserOp,
};
use xfs_node::shard::{connect_all, shard_of, Shard, ShardConfig};
use xfs_node::sim::Rng;

/// The operation mix: 60% reads, 25% writes, 10% evictions, 5% flushes.
fn pick_op(rng: &mut Rng, value: u64) -> UserOp<u64> {
    match rng.below(20) {
        0..=11 => UserOp::Read,
        12..=16 => UserOp::Write(value),
        17..=18 => UserOp::Evict,
        _ => UserOp::Flush,
    }
}

/// Result of one run.
#[derive(Clone, Copy, Debug)]
pub struct Throughput {
    /// Events handled.
    pub events: u64,
    /// User operations completed.
    pub ops: u64,
    /// Messages that crossed the network (AM over UDP); 0 for the state machine alone.
    pub remote: u64,
    /// Wall time.
    pub seconds: f64,
}

impl Throughput {
    /// Events per second.
    pub fn events_per_s(&self) -> f64 {
        self.events as f64 / self.seconds
    }
}

/// The pure state machine: `clients` client shards, one manager and one storage shard, an
/// in-memory FIFO network, `blocks` blocks, each client keeping `depth` operations in
/// flight, until `ops` operations are done. One thread.
pub fn pure(clients: usize, blocks: u64, depth: usize, ops: u64, seed: u64) -> Throughput {
    const MANAGER: NodeId = 1000;
    const STORAGE: NodeId = 1001;
    let placement = Placement {
        managers: vec![MANAGER],
        storages: vec![STORAGE],
        index_shift: None,
    };
    let ids: Vec<NodeId> = (0..clients as NodeId).collect();
    let cfg = ProtocolConfig::default();
    let mut cs: Vec<ClientShard<u64>> = ids
        .iter()
        .map(|c| ClientShard::new(*c, cfg, placement.clone(), (blocks / 2) as usize))
        .collect();
    let mut m = ManagerShard::new(MANAGER, cfg, placement, ids.clone());
    let mut st: StorageShard<MemStore<u64>> = StorageShard::default();
    let mut net: VecDeque<(NodeId, NodeId, Msg<u64>)> = VecDeque::new();
    let mut kernel: VecDeque<(NodeId, BlockId)> = VecDeque::new();
    let mut out: Vec<Output<u64>> = Vec::new();
    let mut rng = Rng::new(seed);
    let mut in_flight = vec![0usize; clients];
    let (mut events, mut done, mut started, mut next_value) = (0u64, 0u64, 0u64, 1u64);
    let t = Instant::now();
    let route = |from: NodeId,
                 out: &mut Vec<Output<u64>>,
                 net: &mut VecDeque<(NodeId, NodeId, Msg<u64>)>,
                 kernel: &mut VecDeque<(NodeId, BlockId)>,
                 in_flight: &mut [usize],
                 done: &mut u64| {
        for o in out.drain(..) {
            match o {
                Output::Send { to, msg } => net.push_back((from, to, msg)),
                Output::InvalidateKernel { block } => kernel.push_back((from, block)),
                Output::Complete { .. } => {
                    in_flight[from as usize] -= 1;
                    *done += 1;
                }
            }
        }
    };
    while done < ops {
        for c in 0..clients {
            while in_flight[c] < depth && started < ops {
                let block = rng.below(blocks);
                if !cs[c].is_idle(block) {
                    break;
                }
                let op = pick_op(&mut rng, next_value);
                next_value += 1;
                in_flight[c] += 1;
                started += 1;
                events += 1;
                // An idle block accepts the operation.
                let _ = cs[c].start(next_value, block, op, &mut out);
                route(
                    c as NodeId,
                    &mut out,
                    &mut net,
                    &mut kernel,
                    &mut in_flight,
                    &mut done,
                );
            }
        }
        while let Some((c, block)) = kernel.pop_front() {
            let _ = cs[c as usize].kernel_invalidated(block, &mut out);
            route(
                c,
                &mut out,
                &mut net,
                &mut kernel,
                &mut in_flight,
                &mut done,
            );
        }
        let mut budget = 64;
        while let Some((from, to, msg)) = net.pop_front() {
            events += 1;
            let me = match msg.role() {
                Role::Manager => {
                    let _ = m.receive(from, msg, &mut out);
                    MANAGER
                }
                Role::Storage => {
                    let _ = st.receive(from, msg, &mut out);
                    STORAGE
                }
                Role::Client => {
                    let _ = cs[to as usize].receive(from, msg, &mut out);
                    to
                }
            };
            route(
                me,
                &mut out,
                &mut net,
                &mut kernel,
                &mut in_flight,
                &mut done,
            );
            budget -= 1;
            if budget == 0 {
                break;
            }
        }
    }
    Throughput {
        events,
        ops: done,
        remote: 0,
        seconds: t.elapsed().as_secs_f64(),
    }
}

type UdpShard = Shard<UdpTransport, u64, MemStore<u64>>;

/// The shard loops: two nodes (each client, manager and storage server for half the blocks)
/// with `shards` shards each, every shard its own AM endpoint on UDP loopback. Thread s runs
/// shard s of both nodes (the two machines' core s, side by side), busy-polling, each node
/// keeping `depth` operations in flight on the blocks of that shard. Runs `warmup`, then
/// counts events for `duration`.
pub fn loops(
    shards: usize,
    depth: usize,
    warmup: Duration,
    duration: Duration,
) -> std::io::Result<Throughput> {
    let nodes: [NodeId; 2] = [0, 1];
    let placement = Placement {
        managers: nodes.to_vec(),
        storages: nodes.to_vec(),
        index_shift: None,
    };
    let mut all: Vec<Vec<UdpShard>> = Vec::new();
    for node in nodes {
        let mut v = Vec::new();
        for s in 0..shards {
            let addr: SocketAddr = "127.0.0.1:0".parse().map_err(std::io::Error::other)?;
            let t =
                UdpTransport::bind(addr, UdpConfig::default()).map_err(std::io::Error::other)?;
            let ep = Endpoint::new(
                t,
                Config {
                    tag: Tag(0xbe00 + ((node as u64) << 8) + s as u64),
                    ..Config::default()
                },
            );
            let cfg = ShardConfig {
                node,
                protocol: ProtocolConfig::default(),
                placement: placement.clone(),
                clients: nodes.to_vec(),
                capacity: 128,
            };
            v.push(Shard::new(ep, cfg, MemStore::default()).map_err(std::io::Error::other)?);
        }
        all.push(v);
    }
    connect_all(&mut all).map_err(std::io::Error::other)?;
    // Per shard index: the blocks it owns (a pool of 256).
    let pools: Vec<Vec<BlockId>> = (0..shards)
        .map(|s| {
            (0u64..)
                .filter(|b| shard_of(*b, shards) == s)
                .take(256)
                .collect()
        })
        .collect();
    let mut by_index: Vec<Vec<UdpShard>> = (0..shards).map(|_| Vec::new()).collect();
    for n in all {
        for (s, shard) in n.into_iter().enumerate() {
            by_index[s].push(shard);
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(shards + 1));
    let counting = Arc::new(Barrier::new(shards + 1));
    let mut handles = Vec::new();
    for (s, mut pair) in by_index.into_iter().enumerate() {
        let pool = pools[s].clone();
        let (stop, start, counting) = (stop.clone(), start.clone(), counting.clone());
        handles.push(std::thread::spawn(move || {
            let mut rng = Rng::new(s as u64 + 1);
            let mut in_flight = vec![0usize; pair.len()];
            let mut next_value = 1u64 + ((s as u64) << 40);
            let mut base = (0u64, 0u64, 0u64);
            let mut counted = false;
            start.wait();
            let warm_until = Instant::now() + warmup;
            loop {
                for (i, sh) in pair.iter_mut().enumerate() {
                    while in_flight[i] < depth {
                        let block = pool[rng.below(pool.len() as u64) as usize];
                        let op = pick_op(&mut rng, next_value);
                        sh.submit(next_value, block, op);
                        next_value += 1;
                        in_flight[i] += 1;
                    }
                    // Loopback UDP does not fail in this benchmark; a failure stops it.
                    if sh.step(64).is_err() {
                        return (0, 0, 0);
                    }
                    in_flight[i] -= sh.take_completions().len();
                }
                if !counted && Instant::now() >= warm_until {
                    base = totals(&pair);
                    counted = true;
                    counting.wait();
                }
                if counted && stop.load(Ordering::Relaxed) {
                    let end = totals(&pair);
                    return (end.0 - base.0, end.1 - base.1, end.2 - base.2);
                }
            }
        }));
    }
    start.wait();
    counting.wait();
    let t = Instant::now();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let seconds = t.elapsed().as_secs_f64();
    let mut sum = Throughput {
        events: 0,
        ops: 0,
        remote: 0,
        seconds,
    };
    for h in handles {
        let (e, o, r) = h
            .join()
            .map_err(|_| std::io::Error::other("a shard thread panicked"))?;
        sum.events += e;
        sum.ops += o;
        sum.remote += r;
    }
    Ok(sum)
}

/// (events, operations completed, messages sent over the network) of a thread's shards.
fn totals(pair: &[UdpShard]) -> (u64, u64, u64) {
    pair.iter().fold((0, 0, 0), |(e, o, r), s| {
        let c = s.counters();
        (
            e + c.messages + c.ops_started,
            o + c.ops_completed,
            r + c.remote_sends,
        )
    })
}
