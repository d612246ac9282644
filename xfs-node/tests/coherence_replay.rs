//! The checked code is the running code: a path the model checker found (a peer-served read
//! racing a revoke) is replayed through real shard loops on the simulated AM network, and
//! every message the loops produce must equal the model's, in the same order, with the same
//! completions and the same final states.

mod model;

use std::time::Duration;

use am_core::sim::Faults;
use model::{Action, Addr, CoherenceModel, Payload, World};
use stateright::{Checker, HasDiscoveries, Model};
use xfs_node::coherence::{Msg, NodeId, Outcome, ProtocolConfig, UserOp};
use xfs_node::shard::Delivery;
use xfs_node::sim::Cluster;

const RACE: &str = "a peer-served read races a revoke";

fn widen(m: &Msg<u8>) -> Msg<u64> {
    m.clone().map_data(u64::from)
}

fn node(a: Addr) -> NodeId {
    match a {
        Addr::Client(c) | Addr::Kernel(c) => c,
        Addr::Manager => model::MANAGER,
        Addr::Storage => model::STORAGE,
    }
}

/// Index of `ids` in the cluster's shard table.
fn at(ids: &[NodeId], n: NodeId) -> usize {
    ids.iter()
        .position(|i| *i == n)
        .expect("a node of the replay")
}

#[test]
fn a_checker_path_replays_through_the_shard_loops_message_for_message() {
    // 1. The checker finds the race (breadth first: a shortest path), over the ordered
    //    network, which is what Active Messages deliver.
    let m = CoherenceModel {
        clients: 2,
        blocks: 1,
        ops_per_client: 2,
        ordered: true,
        config: ProtocolConfig::default(),
        capacity: 0,
        updates: false,
        txns: 0,
        removals: 0,
        storage_fenced: true,
    };
    let checker = m
        .clone()
        .checker()
        .finish_when(HasDiscoveries::AnyOf([RACE].into_iter().collect()))
        .spawn_bfs()
        .join();
    let path = checker
        .discovery(RACE)
        .expect("the checker finds the race")
        .into_vec();
    assert!(path.len() > 5);

    // 2. The same nodes as real shard loops: clients 0 and 1, the manager, the storage
    //    server, each one shard with its own AM endpoint on the simulated network.
    let ids: Vec<NodeId> = vec![0, 1, model::MANAGER, model::STORAGE];
    let mut cluster = Cluster::with_roles(
        1,
        &ids,
        &[0, 1],
        &[model::MANAGER],
        &[model::STORAGE],
        1,
        Faults::none(),
        ProtocolConfig::default(),
        0,
    );
    for n in cluster.shards.iter_mut() {
        n[0].manual = true;
        n[0].trace = Some(Vec::new());
    }

    // 3. Replay: each model step is forced on the loops; each message the model delivers
    //    must be waiting, identical, at the loop it is for.
    let mut expected: Vec<Delivery<u64>> = Vec::new();
    let mut model_completions = Vec::new();
    let mut loop_completions = Vec::new();
    for (w, action) in &path {
        let Some(action) = action else { continue };
        match action {
            Action::Op(c, block, op) => {
                let (id, user) = match op {
                    UserOp::Write(v) => (*v as u64, UserOp::Write(*v as u64)),
                    UserOp::Read => (0, UserOp::Read),
                    UserOp::Prefetch => (0, UserOp::Prefetch),
                    UserOp::Evict => (0, UserOp::Evict),
                    UserOp::Flush => (0, UserOp::Flush),
                    UserOp::Update(v) => (0, UserOp::Update(*v as u64)),
                    UserOp::Acquire => (0, UserOp::Acquire),
                    UserOp::Release => (0, UserOp::Release),
                };
                let s = &mut cluster.shards[at(&ids, *c)][0];
                s.submit(id, *block, user);
                s.step(16).expect("sim poll");
            }
            Action::KernelRead(..) => {}
            Action::Txn(_) | Action::TxnNext(_) => {
                unreachable!("the replayed model has no transactions")
            }
            Action::Remove(_) => unreachable!("the replayed model removes no client"),
            Action::Deliver(k) => {
                let e = &w.net[*k];
                match &e.payload {
                    Payload::Invalidate(block) => {
                        let s = &cluster.shards[at(&ids, node(e.from))][0];
                        assert_eq!(
                            s.kernel_pending().front(),
                            Some(block),
                            "the loop asked the kernel too"
                        );
                    }
                    Payload::Invalidated(block) => {
                        cluster.shards[at(&ids, node(e.to))][0].kernel_done(*block);
                    }
                    Payload::Proto(msg) => {
                        let want = Delivery {
                            from: node(e.from),
                            to: node(e.to),
                            msg: widen(msg),
                        };
                        let to = at(&ids, want.to);
                        let mut found = None;
                        for _ in 0..1000 {
                            cluster.step();
                            let got = cluster.shards[to][0].received();
                            if let Some(i) = got.iter().position(|d| d.from == want.from) {
                                found = Some((i, got[i].clone()));
                                break;
                            }
                            cluster.net.advance_to(am_core::Time(
                                cluster.net.now().0 + Duration::from_micros(5).as_nanos() as u64,
                            ));
                        }
                        let (i, got) =
                            found.unwrap_or_else(|| panic!("the loops never sent {want:?}"));
                        assert_eq!(got, want, "the loops sent another message than the model");
                        assert!(cluster.shards[to][0].handle_next(i));
                        expected.push(want);
                    }
                }
            }
        }
        // Completions of the step, on both sides.
        for s in cluster.shards.iter_mut() {
            for c in s[0].take_completions() {
                let value = match c.outcome {
                    Outcome::Read(v) => Some(v),
                    _ => s[0].client.blocks.get(&c.block).and_then(|b| b.data),
                };
                loop_completions.push((s[0].node(), c.block, value));
            }
        }
    }
    // What the model completed along the path: an operation is done when its block has no
    // operation after the step (at once, for a cache hit; later, when a message ends it).
    for pair in path.windows(2) {
        let (before, after): (&World, &World) = (&pair[0].0, &pair[1].0);
        let action = pair[0]
            .1
            .as_ref()
            .expect("every state but the last has its next action");
        for c in 0..before.clients.len() {
            let blocks: std::collections::BTreeSet<u64> = before.clients[c]
                .blocks
                .keys()
                .chain(after.clients[c].blocks.keys())
                .copied()
                .collect();
            for block in blocks {
                let op_before = before.clients[c]
                    .blocks
                    .get(&block)
                    .is_some_and(|b| b.op.is_some());
                let op_after = after.clients[c]
                    .blocks
                    .get(&block)
                    .is_some_and(|b| b.op.is_some());
                let started_here =
                    matches!(action, Action::Op(n, b, _) if *n as usize == c && *b == block);
                if (op_before || started_here) && !op_after {
                    let value = after.clients[c].blocks.get(&block).and_then(|b| b.data);
                    model_completions.push((c as NodeId, block, value.map(u64::from)));
                }
            }
        }
    }

    // 4. The same messages in the same order: the concatenated traces of the loops, in the
    //    order they handled them, are the model's deliveries.
    let mut handled: Vec<Delivery<u64>> = Vec::new();
    let mut cursors = vec![0usize; ids.len()];
    for want in &expected {
        let i = at(&ids, want.to);
        let t = cluster.shards[i][0].trace.as_ref().expect("tracing on");
        handled.push(t[cursors[i]].clone());
        cursors[i] += 1;
    }
    assert_eq!(handled, expected);
    for (i, s) in cluster.shards.iter().enumerate() {
        assert_eq!(
            s[0].trace.as_ref().map(Vec::len),
            Some(cursors[i]),
            "node {} handled extra messages",
            ids[i]
        );
        assert_eq!(s[0].counters().protocol_errors, 0);
    }
    // The race happened in the loops too: a revoke was held for a peer's data.
    let held: u64 = cluster
        .shards
        .iter()
        .map(|s| s[0].client.counters.revokes_held)
        .sum();
    assert!(
        held > 0,
        "no revoke was held behind the forwarded read in the loops"
    );
    // The same final protocol states (client blocks, manager), values widened.
    let last = &path.last().expect("non-empty").0;
    for c in 0..2usize {
        let model_state: Vec<_> = last.clients[c]
            .blocks
            .iter()
            .map(|(b, s)| (*b, s.state(), s.data.map(u64::from)))
            .collect();
        let loop_state: Vec<_> = cluster.shards[c][0]
            .client
            .blocks
            .iter()
            .map(|(b, s)| (*b, s.state(), s.data))
            .collect();
        assert_eq!(loop_state, model_state, "client {c}");
    }
    assert_eq!(
        cluster.shards[at(&ids, model::MANAGER)][0].manager.blocks,
        last.manager.blocks
    );
    // And the same operations finished, with the same values (a read's result; what a
    // write or eviction left in the cache).
    assert_eq!(loop_completions, model_completions);
    assert!(!model_completions.is_empty());
    eprintln!(
        "replayed {} model steps, {} messages",
        path.len() - 1,
        expected.len()
    );
}
