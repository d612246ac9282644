//! The membership log: TiKV's `raft-rs` ([`RawNode`]) driven sans-IO ([`Consensus`]).
//!
//! The driver calls [`Consensus::tick`] every [`TICK_MS`], hands it the Raft messages
//! peers sent ([`Consensus::step`]) and the changes to propose ([`Consensus::propose`]),
//! then [`Consensus::poll`]s it: it gets back what to write to disk (the whole saved
//! state, [`Outputs::persist`]: written and synced **before** any message is sent), the
//! messages to send, and the changes committed and applied to the [`ClusterMap`], in log
//! order. Time (ticks) and randomness (the seed of the election timeouts) come in from the
//! driver, so a seeded simulation replays exactly.
//!
//! Voters are fixed by the configuration (3 or 5 nodes); the other nodes are learners:
//! they receive and apply the log but do not vote. Pre-vote and check-quorum are on: a
//! node cut off from the majority cannot win an election, and a leader that loses the
//! majority steps down, so only the majority side commits changes.
//!
//! Bounds: the log is kept whole (a membership change is about 40 bytes and changes are
//! rare: 10,000 of them make a 400 KB state file); [`MAX_PENDING_PROPOSALS`] proposals at a
//! time per node; the saved state is rewritten whole at each change.

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, EntryType, HardState, Message};
use raft::storage::MemStorage;
use raft::{Config, GetEntriesContext, RawNode, StateRole, Storage};
use serde::{Deserialize, Serialize};

use super::map::{Change, ClusterMap};
use crate::coherence::NodeId;

/// How often the driver ticks the log, in milliseconds.
pub const TICK_MS: u64 = 100;
/// Ticks without a leader's heartbeat before a follower stands for election (the
/// smallest; each election timeout is drawn from [`ELECTION_TICKS`, 2 × that)).
pub const ELECTION_TICKS: usize = 10;
/// Ticks between a leader's heartbeats.
pub const HEARTBEAT_TICKS: usize = 2;
/// Proposals not yet committed that a node accepts before it refuses more.
pub const MAX_PENDING_PROPOSALS: u64 = 64;

/// Why the log refused an input.
#[derive(Debug, thiserror::Error)]
pub enum ConsensusError {
    /// A peer's message did not parse, or claims another sender.
    #[error("bad Raft message from node {from}: {why}")]
    BadMessage {
        /// The sending node.
        from: NodeId,
        /// What was wrong.
        why: String,
    },
    /// The saved state did not parse (a corrupt or foreign state file).
    #[error(
        "the saved membership log does not parse: {0}; restore it from a backup (moving it \
         away is safe only on a learner, or for a whole cluster started afresh: a voter \
         without its log may vote twice in a term)"
    )]
    BadSaved(String),
    /// Raft refused (e.g. a proposal with no leader known).
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// Too many proposals wait to commit.
    #[error("{0} proposals wait to commit: try again when the cluster has a leader")]
    Busy(u64),
}

/// Who votes and who learns, and the map a new cluster starts from.
#[derive(Clone, Debug)]
pub struct ConsensusConfig {
    /// This node.
    pub me: NodeId,
    /// The voters (3 or 5 nodes).
    pub voters: Vec<NodeId>,
    /// The other nodes.
    pub learners: Vec<NodeId>,
    /// The map before any change.
    pub initial: ClusterMap,
    /// The seed of this node's election timeouts.
    pub seed: u64,
}

/// What a node keeps on disk: Raft's hard state and the whole log.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Saved {
    hard_state: Vec<u8>,
    voters: Vec<u64>,
    learners: Vec<u64>,
    entries: Vec<Vec<u8>>,
}

/// What [`Consensus::poll`] asks the driver to do, in this order.
#[derive(Debug, Default)]
pub struct Outputs {
    /// Write this to the node's membership file and sync it, before sending anything.
    pub persist: Option<Vec<u8>>,
    /// Raft messages to send: (node, bytes).
    pub messages: Vec<(NodeId, Vec<u8>)>,
    /// Changes committed and applied to the map, in log order (only those that changed
    /// it).
    pub applied: Vec<Change>,
}

/// Counters of the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConsensusCounters {
    /// Raft messages taken in.
    pub stepped: u64,
    /// Messages dropped as malformed or forged.
    pub bad_messages: u64,
    /// Proposals made here.
    pub proposed: u64,
    /// Committed entries applied.
    pub applied_entries: u64,
    /// Saved states handed out to be written.
    pub persisted: u64,
}

/// One node's replica of the membership log and the map it builds.
pub struct Consensus {
    me: NodeId,
    raw: RawNode<MemStorage>,
    map: ClusterMap,
    rng: u64,
    /// (term, role) when the election timeout was last drawn.
    drawn: (u64, StateRole),
    counters: ConsensusCounters,
}

fn raft_id(node: NodeId) -> u64 {
    node as u64 + 1
}

fn node_id(id: u64) -> Option<NodeId> {
    id.checked_sub(1).and_then(|n| NodeId::try_from(n).ok())
}

impl Consensus {
    /// This node's replica: fresh, or from what it saved (`saved`, the bytes of its last
    /// [`Outputs::persist`]), replaying the committed log onto `config.initial`.
    pub fn new(config: ConsensusConfig, saved: Option<&[u8]>) -> Result<Self, ConsensusError> {
        let (store, applied) = match saved {
            None => {
                let voters = config.voters.iter().map(|n| raft_id(*n));
                let learners = config.learners.iter().map(|n| raft_id(*n));
                (
                    MemStorage::new_with_conf_state(ConfState::from((voters, learners))),
                    0,
                )
            }
            Some(bytes) => {
                let s: Saved = bincode::deserialize(bytes)
                    .map_err(|e| ConsensusError::BadSaved(e.to_string()))?;
                let store = MemStorage::new_with_conf_state(ConfState::from((
                    s.voters.iter().copied(),
                    s.learners.iter().copied(),
                )));
                let hs = HardState::parse_from_bytes(&s.hard_state)
                    .map_err(|e| ConsensusError::BadSaved(e.to_string()))?;
                let entries = s
                    .entries
                    .iter()
                    .map(|b| Entry::parse_from_bytes(b))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| ConsensusError::BadSaved(e.to_string()))?;
                // Whole and in order from index 1, the commit inside it: else Raft would
                // panic on it.
                let contiguous = entries.iter().enumerate().all(|(k, e)| {
                    e.index == k as u64 + 1 && (k == 0 || e.term >= entries[k - 1].term)
                });
                if !contiguous || hs.commit > entries.len() as u64 {
                    return Err(ConsensusError::BadSaved(format!(
                        "{} entries, commit {}: not a whole log from index 1",
                        entries.len(),
                        hs.commit
                    )));
                }
                {
                    let mut w = store.wl();
                    w.append(&entries)?;
                    w.set_hardstate(hs);
                }
                (store, 0)
            }
        };
        let cfg = Config {
            id: raft_id(config.me),
            election_tick: ELECTION_TICKS,
            heartbeat_tick: HEARTBEAT_TICKS,
            applied,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            max_uncommitted_size: 1 << 20,
            ..Default::default()
        };
        cfg.validate()?;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let raw = RawNode::new(&cfg, store, &logger)?;
        let mut c = Consensus {
            me: config.me,
            raw,
            map: config.initial,
            rng: am_core::engine::splitmix(config.seed).max(1),
            drawn: (u64::MAX, StateRole::Follower),
            counters: ConsensusCounters::default(),
        };
        c.draw_timeout();
        Ok(c)
    }

    /// This node.
    pub fn me(&self) -> NodeId {
        self.me
    }

    /// The map as of the last applied change.
    pub fn map(&self) -> &ClusterMap {
        &self.map
    }

    /// The leader this node knows of.
    pub fn leader(&self) -> Option<NodeId> {
        match self.raw.raft.leader_id {
            0 => None,
            id => node_id(id),
        }
    }

    /// The current Raft term.
    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    /// The voters.
    pub fn voters(&self) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = self
            .raw
            .raft
            .prs()
            .conf()
            .voters()
            .ids()
            .iter()
            .filter_map(node_id)
            .collect();
        v.sort_unstable();
        v
    }

    /// The counters.
    pub fn counters(&self) -> ConsensusCounters {
        self.counters
    }

    /// One tick of [`TICK_MS`].
    pub fn tick(&mut self) {
        self.raw.tick();
        self.draw_timeout();
    }

    /// A Raft message from node `from`. A message that does not parse, or whose sender is
    /// not `from` (the transport authenticates the peer), is refused and counted.
    pub fn step(&mut self, from: NodeId, bytes: &[u8]) -> Result<(), ConsensusError> {
        let bad = |why: String| ConsensusError::BadMessage { from, why };
        let msg = match Message::parse_from_bytes(bytes) {
            Ok(m) if m.from == raft_id(from) && m.to == raft_id(self.me) => m,
            Ok(m) => {
                self.counters.bad_messages += 1;
                return Err(bad(format!("it says from {} to {}", m.from, m.to)));
            }
            Err(e) => {
                self.counters.bad_messages += 1;
                return Err(bad(e.to_string()));
            }
        };
        if raft::raw_node::is_local_msg(msg.get_msg_type()) {
            self.counters.bad_messages += 1;
            return Err(bad(format!("local message type {:?}", msg.get_msg_type())));
        }
        self.counters.stepped += 1;
        let r = self.raw.step(msg);
        self.draw_timeout();
        match r {
            // Stale or foreign-term messages Raft ignores are not errors of the sender.
            Err(raft::Error::StepPeerNotFound) | Err(raft::Error::StepLocalMsg) => {
                self.counters.bad_messages += 1;
                Err(bad("not a peer of this log".into()))
            }
            r => r.map_err(Into::into),
        }
    }

    /// Propose a change (forwarded to the leader by Raft). It takes effect when it commits:
    /// watch [`Outputs::applied`].
    pub fn propose(&mut self, change: &Change) -> Result<(), ConsensusError> {
        let pending = self.raw.raft.raft_log.last_index() - self.raw.raft.raft_log.committed;
        if pending >= MAX_PENDING_PROPOSALS {
            return Err(ConsensusError::Busy(pending));
        }
        let data = bincode::serialize(change).expect("a change serialises");
        self.raw.propose(vec![], data)?;
        self.counters.proposed += 1;
        Ok(())
    }

    /// Whether [`Consensus::poll`] has work.
    pub fn has_ready(&self) -> bool {
        self.raw.has_ready()
    }

    /// Collect what to persist, send and apply (see [`Outputs`]).
    pub fn poll(&mut self, out: &mut Outputs) -> Result<(), ConsensusError> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut rd = self.raw.ready();
        let mut changed = false;
        self.push_messages(rd.take_messages(), out);
        if rd.snapshot().get_metadata().index != 0 {
            // Never made: this log is not compacted.
            return Err(ConsensusError::BadSaved(
                "a snapshot arrived, and this log keeps no snapshots".into(),
            ));
        }
        let committed = rd.take_committed_entries();
        self.apply(committed, out);
        if !rd.entries().is_empty() {
            self.raw.mut_store().wl().append(rd.entries())?;
            changed = true;
        }
        if let Some(hs) = rd.hs() {
            self.raw.mut_store().wl().set_hardstate(hs.clone());
            changed = true;
        }
        self.push_messages(rd.take_persisted_messages(), out);
        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.raw
                .mut_store()
                .wl()
                .mut_hard_state()
                .set_commit(commit);
            changed = true;
        }
        self.push_messages(light.take_messages(), out);
        let committed = light.take_committed_entries();
        self.apply(committed, out);
        self.raw.advance_apply();
        if changed {
            out.persist = Some(self.saved()?);
            self.counters.persisted += 1;
        }
        self.draw_timeout();
        Ok(())
    }

    fn push_messages(&mut self, msgs: Vec<Message>, out: &mut Outputs) {
        for m in msgs {
            if let Some(to) = node_id(m.to) {
                out.messages
                    .push((to, m.write_to_bytes().expect("a Raft message serialises")));
            }
        }
    }

    fn apply(&mut self, entries: Vec<Entry>, out: &mut Outputs) {
        for e in entries {
            self.counters.applied_entries += 1;
            if e.get_entry_type() != EntryType::EntryNormal || e.data.is_empty() {
                continue;
            }
            // Every node applies the same bytes; one that does not parse (written by a
            // newer version) is skipped by all alike.
            if let Ok(change) = bincode::deserialize::<Change>(&e.data) {
                if self.map.apply(&change) {
                    out.applied.push(change);
                }
            }
        }
    }

    /// The whole state to save (what [`Outputs::persist`] carries), made again: for a
    /// driver whose last save failed.
    pub fn saved_state(&self) -> Result<Vec<u8>, ConsensusError> {
        self.saved()
    }

    fn saved(&self) -> Result<Vec<u8>, ConsensusError> {
        let store = self.raw.store();
        let first = store.first_index()?;
        let last = store.last_index()?;
        let entries = if last >= first {
            store.entries(first, last + 1, None, GetEntriesContext::empty(false))?
        } else {
            Vec::new()
        };
        let rs = store.initial_state()?;
        let s = Saved {
            hard_state: rs
                .hard_state
                .write_to_bytes()
                .expect("a hard state serialises"),
            voters: rs.conf_state.voters.clone(),
            learners: rs.conf_state.learners.clone(),
            entries: entries
                .iter()
                .map(|e| e.write_to_bytes().expect("an entry serialises"))
                .collect(),
        };
        Ok(bincode::serialize(&s).expect("the saved state serialises"))
    }

    /// Draw this node's election timeout from the seeded generator whenever Raft drew a
    /// new one (a change of term or role), so a seeded run replays exactly.
    fn draw_timeout(&mut self) {
        let now = (self.raw.raft.term, self.raw.raft.state);
        if now == self.drawn {
            return;
        }
        self.drawn = now;
        // xorshift64
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let min = ELECTION_TICKS;
        let t = min + (self.rng % min as u64) as usize;
        self.raw.raft.set_randomized_election_timeout(t);
    }
}
