//! The membership log (`membership::Consensus`, raft-rs) on a deterministic in-memory
//! network: elections, commits on the majority side only, a cut-off node catching up and
//! learning it was removed, a restart from the saved state, garbage and forged messages,
//! and the same seed replaying the same run.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use xfs_node::coherence::NodeId;
use xfs_node::membership::{
    Change, ClusterMap, Consensus, ConsensusConfig, MemberState, Outputs, ELECTION_TICKS,
};

/// Nodes 1..=n, the first `voters` voting, over a network that delivers in order unless
/// a node is cut off (then everything to and from it is lost).
struct Net {
    nodes: BTreeMap<NodeId, Option<Consensus>>,
    saved: BTreeMap<NodeId, Vec<u8>>,
    wire: VecDeque<(NodeId, NodeId, Vec<u8>)>,
    cut: BTreeSet<NodeId>,
    applied: BTreeMap<NodeId, Vec<Change>>,
    config: BTreeMap<NodeId, ConsensusConfig>,
    ticks: u64,
}

fn map(n: u16) -> ClusterMap {
    let nodes: Vec<NodeId> = (1..=n).collect();
    ClusterMap::new(&nodes, nodes.clone(), vec![nodes.clone()])
}

impl Net {
    fn new(n: u16, voters: u16, seed: u64) -> Net {
        let mut net = Net {
            nodes: BTreeMap::new(),
            saved: BTreeMap::new(),
            wire: VecDeque::new(),
            cut: BTreeSet::new(),
            applied: BTreeMap::new(),
            config: BTreeMap::new(),
            ticks: 0,
        };
        for me in 1..=n {
            let cfg = ConsensusConfig {
                me,
                voters: (1..=voters).collect(),
                learners: (voters + 1..=n).collect(),
                initial: map(n),
                seed: seed.wrapping_mul(31).wrapping_add(me as u64),
            };
            net.config.insert(me, cfg.clone());
            net.nodes
                .insert(me, Some(Consensus::new(cfg, None).expect("a fresh log")));
            net.applied.insert(me, Vec::new());
        }
        net
    }

    fn node(&mut self, n: NodeId) -> &mut Consensus {
        self.nodes
            .get_mut(&n)
            .and_then(|c| c.as_mut())
            .expect("a running node")
    }

    /// Poll every running node and deliver until nothing moves.
    fn settle(&mut self) {
        for _ in 0..1000 {
            let mut moved = false;
            let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            for id in ids {
                let Some(Some(c)) = self.nodes.get_mut(&id) else {
                    continue;
                };
                let mut out = Outputs::default();
                c.poll(&mut out).expect("poll");
                if let Some(p) = out.persist {
                    self.saved.insert(id, p);
                }
                self.applied.entry(id).or_default().extend(out.applied);
                for (to, bytes) in out.messages {
                    moved = true;
                    if !self.cut.contains(&id) && !self.cut.contains(&to) {
                        self.wire.push_back((id, to, bytes));
                    }
                }
            }
            while let Some((from, to, bytes)) = self.wire.pop_front() {
                moved = true;
                if let Some(Some(c)) = self.nodes.get_mut(&to) {
                    // A message from an older term is the sender's problem, not an error
                    // of the test; anything else would be.
                    let _ = c.step(from, &bytes);
                }
            }
            if !moved {
                return;
            }
        }
        panic!("the network never settled");
    }

    fn tick(&mut self, n: u64) {
        for _ in 0..n {
            self.ticks += 1;
            for c in self.nodes.values_mut().flatten() {
                c.tick();
            }
            self.settle();
        }
    }

    /// Tick until `done` holds; the ticks it took (fails after `limit`).
    fn tick_until(&mut self, limit: u64, done: impl Fn(&Net) -> bool) -> u64 {
        for t in 0..limit {
            if done(self) {
                return t;
            }
            self.tick(1);
        }
        let state: Vec<_> = self
            .nodes
            .values()
            .flatten()
            .map(|c| (c.me(), c.leader(), c.term(), c.map().epoch))
            .collect();
        panic!("not done after {limit} ticks: (node, leader, term, epoch) {state:?}");
    }

    fn leaders(&self) -> BTreeSet<NodeId> {
        self.nodes
            .values()
            .flatten()
            .filter(|c| !self.cut.contains(&c.me()) && c.leader() == Some(c.me()))
            .map(|c| c.me())
            .collect()
    }

    fn leader(&self) -> Option<NodeId> {
        let l = self.leaders();
        (l.len() == 1).then(|| *l.iter().next().expect("one"))
    }

    fn epoch(&self, n: NodeId) -> u64 {
        self.nodes[&n].as_ref().expect("running").map().epoch
    }
}

fn fail(node: NodeId) -> Change {
    Change::Fail {
        node,
        incarnation: 0,
    }
}

#[test]
fn three_voters_elect_a_leader_and_every_node_applies_a_failure_once() {
    let mut net = Net::new(3, 3, 1);
    let t = net.tick_until(10 * ELECTION_TICKS as u64, |n| n.leader().is_some());
    assert!(t <= 3 * ELECTION_TICKS as u64, "elected after {t} ticks");
    // A follower proposes: Raft forwards it to the leader.
    let follower = (1..=3)
        .find(|n| Some(*n) != net.leader())
        .expect("a follower");
    net.node(follower).propose(&fail(3)).expect("propose");
    net.tick_until(20, |n| (1..=3).all(|i| n.epoch(i) == 1));
    for i in 1..=3 {
        assert_eq!(net.applied[&i], vec![fail(3)], "node {i}");
        let m = net.nodes[&i].as_ref().expect("running").map();
        assert_eq!(m.members[&3].state, MemberState::Failed);
        assert!(m.managers.iter().all(|n| *n != 3));
    }
    // The same failure proposed again changes nothing.
    net.node(1).propose(&fail(3)).expect("propose");
    net.tick(5);
    assert!((1..=3).all(|i| net.epoch(i) == 1 && net.applied[&i].len() == 1));
}

#[test]
fn only_the_majority_side_commits_and_the_cut_off_node_learns_it_was_removed() {
    let mut net = Net::new(3, 3, 2);
    net.tick_until(100, |n| n.leader().is_some());
    // Cut off the leader itself: the other two elect a new one and commit without it.
    let old = net.leader().expect("a leader");
    net.cut.insert(old);
    let others: Vec<NodeId> = (1..=3).filter(|n| *n != old).collect();
    net.node(old)
        .propose(&fail(others[0]))
        .expect("a leader takes proposals");
    let t = net.tick_until(100, |n| {
        n.leader().is_some_and(|l| l != old) && others.iter().all(|o| n.epoch(*o) == 0)
    });
    assert!(t <= 4 * ELECTION_TICKS as u64, "re-elected after {t} ticks");
    let new = net.leader().expect("the new leader");
    net.node(new).propose(&fail(old)).expect("propose");
    net.tick_until(20, |n| others.iter().all(|o| n.epoch(*o) == 1));
    net.tick(3 * ELECTION_TICKS as u64);
    assert_eq!(net.epoch(old), 0, "the cut-off node committed nothing");
    assert!(
        net.nodes[&old].as_ref().expect("running").leader() != Some(old),
        "a leader without its majority steps down (check-quorum)"
    );
    // Healed: it catches up, its own proposal lost, and learns it was removed.
    net.cut.clear();
    net.tick_until(50, |n| n.epoch(old) == 1);
    let m = net.nodes[&old].as_ref().expect("running").map().clone();
    assert_eq!(m.members[&old].state, MemberState::Failed);
    assert!(
        m.is_member(others[0]),
        "the minority's proposal never applied"
    );
    assert_eq!(net.applied[&old], vec![fail(old)]);
}

#[test]
fn learners_follow_and_do_not_count_for_the_majority() {
    let mut net = Net::new(5, 3, 3);
    net.tick_until(100, |n| n.leader().is_some());
    assert!(net.leader().is_some_and(|l| l <= 3), "only voters lead");
    // Both learners cut off: the voters still commit.
    net.cut.extend([4, 5]);
    let l = net.leader().expect("leader");
    net.node(l)
        .propose(&Change::Leave { node: 5 })
        .expect("propose");
    net.tick_until(20, |n| (1..=3).all(|i| n.epoch(i) == 1));
    assert_eq!(net.epoch(4), 0);
    net.cut.clear();
    net.tick_until(50, |n| n.epoch(4) == 1 && n.epoch(5) == 1);
    // Two voters cut off: nothing commits, even with both learners present.
    let cut: Vec<NodeId> = (1..=3).filter(|n| *n != l).collect();
    net.cut.extend(cut.iter().copied());
    let _ = net.node(l).propose(&fail(4));
    net.tick(5 * ELECTION_TICKS as u64);
    assert!((1..=5).all(|i| net.epoch(i) == 1), "no majority, no commit");
}

#[test]
fn a_node_restarted_from_its_saved_state_replays_the_log_and_catches_up() {
    let mut net = Net::new(3, 3, 4);
    net.tick_until(100, |n| n.leader().is_some());
    let l = net.leader().expect("leader");
    net.node(l).propose(&fail(2)).expect("propose");
    net.tick_until(20, |n| (1..=3).all(|i| n.epoch(i) == 1));
    // Node 3 crashes; a change commits without it; it restarts from its saved bytes.
    net.nodes.insert(3, None);
    net.tick_until(100, |n| n.leader().is_some());
    let l = net.leader().expect("leader");
    net.node(l)
        .propose(&Change::Join {
            node: 2,
            incarnation: 1,
        })
        .expect("propose");
    net.tick_until(20, |n| n.epoch(1) == 2);
    let saved = net.saved[&3].clone();
    let c = Consensus::new(net.config[&3].clone(), Some(&saved)).expect("restart");
    net.nodes.insert(3, Some(c));
    // Alone, it rebuilds the map from its own log: what it had seen committed.
    net.cut.insert(3);
    net.settle();
    assert_eq!(net.epoch(3), 1, "replayed from disk");
    assert_eq!(
        net.applied[&3],
        vec![fail(2), fail(2)],
        "applied before and after"
    );
    net.cut.clear();
    net.tick_until(100, |n| n.epoch(3) == 2);
    let m = net.nodes[&3].as_ref().expect("running").map().clone();
    assert_eq!(&m, net.nodes[&1].as_ref().expect("running").map());
    assert_eq!(m.members[&2].incarnation, 1);
    // A saved state that does not parse is refused with an error that says what to do.
    let Err(e) = Consensus::new(net.config[&3].clone(), Some(b"not a log")) else {
        panic!("garbage accepted as a saved log");
    };
    assert!(e.to_string().contains("restore it from a backup"), "{e}");
}

#[test]
fn garbage_and_forged_messages_are_refused_and_counted() {
    let mut net = Net::new(3, 3, 5);
    net.tick_until(100, |n| n.leader().is_some());
    let c = net.node(1);
    assert!(c.step(2, b"\xff\xff\xff garbage").is_err());
    // A real message relayed by the wrong peer: node 3 says it is node 2's.
    let mut out = Outputs::default();
    net.node(2).tick();
    net.node(2).poll(&mut out).expect("poll");
    net.tick(ELECTION_TICKS as u64);
    let mut forged = None;
    for _ in 0..50 {
        let mut out = Outputs::default();
        net.node(2).tick();
        net.node(2).poll(&mut out).expect("poll");
        if let Some((_, b)) = out.messages.into_iter().find(|(to, _)| *to == 1) {
            forged = Some(b);
            break;
        }
    }
    let forged = forged.expect("node 2 talks to node 1");
    let before = net.node(1).counters().bad_messages;
    assert!(
        net.node(1).step(3, &forged).is_err(),
        "a message from 2 relayed by 3"
    );
    assert_eq!(net.node(1).counters().bad_messages, before + 1);
    assert_eq!(before, 1, "the garbage was counted too");
    net.tick(10);
    assert!(net.leader().is_some(), "the cluster goes on");
}

#[test]
fn the_same_seed_replays_the_same_run() {
    let run = |seed: u64| {
        let mut net = Net::new(5, 5, seed);
        let t1 = net.tick_until(200, |n| n.leader().is_some());
        let l1 = net.leader();
        net.cut.insert(l1.expect("leader"));
        let t2 = net.tick_until(200, |n| n.leader().is_some_and(|l| Some(l) != l1));
        (t1, l1, t2, net.leader(), net.ticks)
    };
    assert_eq!(run(7), run(7));
    let runs: BTreeSet<_> = (0..8).map(run).collect();
    assert!(
        runs.len() > 1,
        "different seeds, different elections: {runs:?}"
    );
}
