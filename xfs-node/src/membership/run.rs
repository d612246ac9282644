//! The membership loop: the thread that drives a node's replica of the membership log
//! ([`Consensus`]) over its own Active Messages endpoint (a virtual network of its own,
//! [`MEMBERSHIP_VNET`]), keeps the log on the node's disk, proposes what the node sees
//! (its own join at start, peers it cannot reach, an operator's `join`/`leave`), and tells
//! the shard loops each change the cluster commits ([`MembershipUpdate`]).
//!
//! Failure: a peer is a *suspect* when a Raft message or a coherence message to it comes
//! back undeliverable (the AM layer's `Unreachable`, about 2 s without progress); the loop
//! proposes `Fail` for the peer's current incarnation. Only a committed change removes it;
//! the node that learns it was removed drops its cache and rejoins as a new incarnation.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use am_core::{Endpoint, EndpointName, Msg as AmMsg, Tag, Transport};
use serde::{Deserialize, Serialize};

use super::{Change, ClusterMap, Consensus, ConsensusCounters, MemberState, Outputs, TICK_MS};
use crate::coherence::{Epoch, Fence, NodeId};
use crate::lock;
use crate::shard::ANNOUNCE_HANDLER;

/// The virtual network the membership endpoints use (the shards' is 0).
pub const MEMBERSHIP_VNET: u32 = 7;
/// The AM handler of Raft messages.
pub const RAFT_HANDLER: u16 = 2;
/// Proposals of a peer's failure are repeated at most this often while it stays a member.
const FAIL_AGAIN_TICKS: u64 = 20;
/// This node's join is proposed again this often until it commits.
const JOIN_AGAIN_TICKS: u64 = 10;

/// A committed change as the shard loops apply it.
#[derive(Clone, Debug)]
pub struct MembershipUpdate {
    /// The fence as of the newest epoch.
    pub fence: Fence,
    /// Peers removed by the changes since the last update.
    pub removed: Vec<NodeId>,
    /// Peers that joined again as new incarnations.
    pub rejoined: Vec<NodeId>,
    /// This node was removed: drop every cached block and start afresh.
    pub me_removed: bool,
    /// The epoch this node's current incarnation joined in (`None`: not a member now).
    pub joined_since: Option<Epoch>,
    /// The manager map (slot → node) as of the newest epoch (`ClusterMap::managers`).
    pub managers: Vec<NodeId>,
    /// The epoch of the manager map's last change.
    pub managers_epoch: Epoch,
}

/// The membership loop's hook on each map it applies ([`MembershipLoop::on_map`]): the
/// map, and the epoch this incarnation joined in (`None`: not a member).
pub type OnMap = Box<dyn Fn(&ClusterMap, Option<Epoch>) + Send>;

/// What `xfs-node status` and `members` show of the membership.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MembershipStatus {
    /// Whether this node keeps a membership log.
    pub enabled: bool,
    /// The epoch applied here.
    pub epoch: u64,
    /// The leader this node knows of.
    pub leader: Option<NodeId>,
    /// The Raft term.
    pub term: u64,
    /// The voters.
    pub voters: Vec<NodeId>,
    /// Every node named: (node, incarnation, "active" / "failed" / "left", since epoch).
    pub members: Vec<(NodeId, u64, String, u64)>,
    /// The manager map (slot → node) and the epoch of its last change.
    pub managers: Vec<NodeId>,
    /// The epoch of the manager map's last change.
    pub managers_epoch: u64,
    /// The epoch of the stripe-group map's last change.
    pub stripe_groups_epoch: u64,
    /// This node's incarnation.
    pub incarnation: u64,
    /// Whether this node's incarnation is a member (its join committed).
    pub joined: bool,
    /// Times this node found itself removed.
    pub removed_self: u64,
    /// Failures proposed by this node.
    pub failures_proposed: u64,
    /// The log's counters: Raft messages taken, bad ones, proposals, entries applied.
    pub stepped: u64,
    /// Raft messages dropped as malformed or forged.
    pub bad_messages: u64,
    /// Committed entries applied.
    pub applied_entries: u64,
    /// The last error writing the log to disk or proposing, if any.
    pub last_error: String,
}

/// A request from the control socket: propose `change`, answered once it is proposed
/// (not committed: `members` shows when it is).
pub type ChangeRequest = (Change, Sender<Result<(), String>>);

/// What the membership loop is given.
pub struct MembershipLoop<T: Transport> {
    /// Its endpoint (on [`MEMBERSHIP_VNET`]), the peers mapped at their node ids.
    pub endpoint: Endpoint<T>,
    /// The log.
    pub consensus: Consensus,
    /// Where the log is kept.
    pub file: PathBuf,
    /// This node's incarnation: chosen by [`MembershipLoop::run`] once the saved log is
    /// replayed (greater than any before it in the log, and than the clock).
    pub incarnation: u64,
    /// Peers' membership endpoints by node, as mapped on `endpoint`.
    pub peers: BTreeMap<NodeId, EndpointName>,
    /// Each shard loop's way in: a committed change goes to all of them.
    pub shards: Vec<Box<dyn Fn(MembershipUpdate) -> bool + Send>>,
    /// Called with the map and this incarnation's join epoch each time the map is applied,
    /// before the shards hear of it (the node's log thread takes over or gives back the
    /// logs of the homes whose slots moved).
    pub on_map: OnMap,
    /// Peers the shard loops found unreachable, each with the epoch its undelivered
    /// message was sent in.
    pub suspects: Receiver<(NodeId, Epoch)>,
    /// Changes asked for on the control socket.
    pub requests: Receiver<ChangeRequest>,
    /// Published after each turn.
    pub status: Arc<Mutex<MembershipStatus>>,
    /// Set once this node's incarnation is a member.
    pub joined: Arc<AtomicBool>,
    /// Set to stop.
    pub stop: Arc<AtomicBool>,
    /// This node left (an operator's `leave`): it does not rejoin until asked to (taken
    /// from the replayed log at start).
    pub left: bool,
}

/// Read the saved log, if any.
pub fn load(file: &Path) -> std::io::Result<Option<Vec<u8>>> {
    match std::fs::read(file) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Write the log whole and durably: a new file, synced, renamed over the old one, the
/// directory synced.
fn save(file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = file.with_extension("membership.new");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, file)?;
    if let Some(dir) = file.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The incarnation a node starts as: later than any it had (the map remembers its last)
/// and than the clock.
pub fn next_incarnation(map: &ClusterMap, me: NodeId) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let last = map.members.get(&me).map_or(0, |m| m.incarnation);
    now.max(last + 1)
}

/// Raft messages received, not yet stepped: (sender's endpoint, bytes).
type RaftInbox = Arc<Mutex<VecDeque<(EndpointName, Vec<u8>)>>>;

/// What the loop keeps between turns.
#[derive(Default)]
struct Turns {
    ticks: u64,
    /// Per suspect: the incarnation whose failure was proposed, and when (ticks).
    fail_proposed: BTreeMap<NodeId, (u64, u64)>,
    /// When this node's join was last proposed (ticks).
    join_proposed_at: Option<u64>,
    removed_self: u64,
    failures_proposed: u64,
    last_error: String,
    /// A save failed: nothing is sent until the log is saved.
    unsaved: bool,
}

impl<T: Transport> MembershipLoop<T> {
    /// Run until `stop`.
    pub fn run(mut self) {
        let me = self.consensus.me();
        let inbox: RaftInbox = Default::default();
        let unreachable: Arc<Mutex<Vec<(EndpointName, Epoch)>>> = Default::default();
        let i = inbox.clone();
        if self
            .endpoint
            .register(RAFT_HANDLER, move |_, m| {
                lock(&i).push_back((m.source, m.payload.to_vec()));
            })
            .is_err()
        {
            eprintln!("xfs-node {me}: membership: cannot register the Raft handler");
            return;
        }
        let u = unreachable.clone();
        // A Raft message carries the epoch it was sent in (its one argument).
        self.endpoint
            .set_upcall(move |_, m| lock(&u).push((m.dest, m.args.first().copied().unwrap_or(0))));
        let names: BTreeMap<(std::net::SocketAddr, u32), NodeId> = self
            .peers
            .iter()
            .map(|(n, name)| ((name.addr, name.vnet), *n))
            .collect();
        let index: BTreeMap<NodeId, u16> = self
            .peers
            .keys()
            .enumerate()
            .map(|(k, n)| (*n, k as u16))
            .collect();
        // Hello to every peer first (see `Shard::announce`), on a handler that drops it.
        let _ = self.endpoint.register(ANNOUNCE_HANDLER, |_, _| {});
        for k in 0..self.peers.len() {
            let _ = self
                .endpoint
                .send(k as u16, AmMsg::small(ANNOUNCE_HANDLER, &[]));
        }
        let mut turns = Turns::default();
        let mut next_tick = Instant::now();
        let mut out = Outputs::default();
        self.replay(&mut out, &mut turns);
        let update = MembershipUpdate {
            fence: self.consensus.map().fence(),
            removed: Vec::new(),
            rejoined: Vec::new(),
            me_removed: false,
            joined_since: self.joined_since(),
            managers: self.consensus.map().managers.clone(),
            managers_epoch: self.consensus.map().managers_epoch,
        };
        (self.on_map)(self.consensus.map(), update.joined_since);
        self.shards.retain(|send| send(update.clone()));
        while !self.stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now >= next_tick {
                next_tick = now + Duration::from_millis(TICK_MS);
                turns.ticks += 1;
                self.consensus.tick();
            }
            let _ = self.endpoint.poll(64);
            let msgs: Vec<_> = lock(&inbox).drain(..).collect();
            for (src, bytes) in msgs {
                if let Some(from) = names.get(&(src.addr, src.vnet)) {
                    // Refused messages are counted by the log.
                    let _ = self.consensus.step(*from, &bytes);
                }
            }
            // Suspects: from the Raft endpoint and from the shard loops.
            let mut suspects: Vec<(NodeId, Epoch)> = lock(&unreachable)
                .drain(..)
                .filter_map(|(d, e)| names.get(&(d.addr, d.vnet)).map(|n| (*n, e)))
                .collect();
            while let Ok(n) = self.suspects.try_recv() {
                suspects.push(n);
            }
            self.propose_failures(suspects, &mut turns);
            self.propose_own_join(&mut turns);
            while let Ok((change, reply)) = self.requests.try_recv() {
                let r = self.requested(change, &mut turns);
                let _ = reply.send(r);
            }
            self.drive(&mut out, &index, &mut turns);
            let joined = self.is_joined();
            self.joined.store(joined, Ordering::Relaxed);
            self.publish(joined, &turns);
            let wait = next_tick.saturating_duration_since(Instant::now());
            if !self.consensus.has_ready() && lock(&inbox).is_empty() {
                let _ = self
                    .endpoint
                    .wait(Some(wait.min(Duration::from_millis(20))));
            }
        }
    }

    /// Whether this node's current incarnation is a member.
    fn is_joined(&self) -> bool {
        self.joined_since().is_some()
    }

    /// The epoch this node's current incarnation joined in, if it is a member.
    fn joined_since(&self) -> Option<Epoch> {
        let me = self.consensus.me();
        self.consensus
            .map()
            .members
            .get(&me)
            .filter(|m| m.incarnation == self.incarnation && m.state == MemberState::Active)
            .map(|m| m.since)
    }

    /// Rebuild the map from the saved log (its committed entries come back in the first
    /// polls), then choose this start's incarnation after every one the log names, and
    /// take from it whether this node left.
    fn replay(&mut self, out: &mut Outputs, turns: &mut Turns) {
        for _ in 0..1000 {
            if !self.consensus.has_ready() {
                break;
            }
            if let Err(e) = self.consensus.poll(out) {
                turns.last_error = e.to_string();
                break;
            }
            if let Some(bytes) = out.persist.take() {
                if let Err(e) = save(&self.file, &bytes) {
                    turns.last_error = format!("writing {}: {e}", self.file.display());
                    turns.unsaved = true;
                }
            }
            // The history is not news: only the map as it stands now counts.
            out.applied.clear();
            out.messages.clear();
        }
        let me = self.consensus.me();
        self.incarnation = next_incarnation(self.consensus.map(), me).max(self.incarnation);
        self.left = self.has_left();
    }

    /// Whether the map says this node left (`xfs-node leave`).
    fn has_left(&self) -> bool {
        let me = self.consensus.me();
        self.consensus
            .map()
            .members
            .get(&me)
            .is_some_and(|m| m.state == MemberState::Left)
    }

    /// Propose the failure of each suspect still a member (again only after
    /// [`FAIL_AGAIN_TICKS`] for the same incarnation). A message sent before the peer's
    /// current incarnation joined says nothing about it: that suspicion is dropped.
    fn propose_failures(&mut self, suspects: Vec<(NodeId, Epoch)>, turns: &mut Turns) {
        let me = self.consensus.me();
        for (s, sent_in) in suspects {
            let Some(m) = self.consensus.map().members.get(&s).copied() else {
                continue;
            };
            if s == me || m.state != MemberState::Active || m.since > sent_in {
                continue;
            }
            let again = turns.fail_proposed.get(&s).is_none_or(|(inc, at)| {
                *inc != m.incarnation || turns.ticks >= at + FAIL_AGAIN_TICKS
            });
            if !again {
                continue;
            }
            let change = Change::Fail {
                node: s,
                incarnation: m.incarnation,
            };
            match self.consensus.propose(&change) {
                Ok(()) => {
                    // Proposed, not committed: proposed again after FAIL_AGAIN_TICKS while
                    // the suspects are reported (a proposal can be lost with a leader).
                    turns.fail_proposed.insert(s, (m.incarnation, turns.ticks));
                    turns.failures_proposed += 1;
                    eprintln!("xfs-node {me}: node {s} is unreachable: proposed its removal");
                }
                Err(e) => turns.last_error = format!("proposing node {s}'s failure: {e}"),
            }
        }
    }

    /// Propose this node's join until it commits (unless it left).
    fn propose_own_join(&mut self, turns: &mut Turns) {
        if self.is_joined()
            || self.left
            || turns
                .join_proposed_at
                .is_some_and(|t| turns.ticks < t + JOIN_AGAIN_TICKS)
        {
            return;
        }
        turns.join_proposed_at = Some(turns.ticks);
        let change = Change::Join {
            node: self.consensus.me(),
            incarnation: self.incarnation,
        };
        if let Err(e) = self.consensus.propose(&change) {
            turns.last_error = format!("proposing this node's join: {e}");
        }
    }

    /// A change asked for on the control socket.
    fn requested(&mut self, change: Change, turns: &mut Turns) -> Result<(), String> {
        match change {
            // This node joins again (after `leave`): as a new incarnation.
            Change::Join { node, .. } if node == self.consensus.me() => {
                self.left = false;
                turns.join_proposed_at = None;
                Ok(())
            }
            change => self.consensus.propose(&change).map_err(|e| e.to_string()),
        }
    }

    /// Poll the log: persist, then send, then hand what committed to the shard loops.
    fn drive(&mut self, out: &mut Outputs, index: &BTreeMap<NodeId, u16>, turns: &mut Turns) {
        let me = self.consensus.me();
        let was_joined = self.is_joined();
        if let Err(e) = self.consensus.poll(out) {
            turns.last_error = e.to_string();
        }
        if turns.unsaved && out.persist.is_none() {
            // An earlier save failed: save the whole state again before sending anything.
            match self.consensus.saved_state() {
                Ok(bytes) => out.persist = Some(bytes),
                Err(e) => turns.last_error = e.to_string(),
            }
        }
        if let Some(bytes) = out.persist.take() {
            match save(&self.file, &bytes) {
                Ok(()) => turns.unsaved = false,
                Err(e) => {
                    turns.last_error = format!("writing {}: {e}", self.file.display());
                    eprintln!("xfs-node {me}: membership: {}", turns.last_error);
                    turns.unsaved = true;
                }
            }
        }
        if turns.unsaved {
            // Not durable: nothing may be sent that depends on it (Raft sends again).
            out.messages.clear();
        }
        let epoch = self.consensus.map().epoch;
        for (to, bytes) in out.messages.drain(..) {
            if let Some(k) = index.get(&to) {
                let slices = [bytes.as_slice()];
                let _ = self
                    .endpoint
                    .send(*k, AmMsg::medium(RAFT_HANDLER, &[epoch], &slices));
            }
        }
        if out.applied.is_empty() {
            return;
        }
        let mut update = self.update(&out.applied, me);
        let joined_since = self.joined_since();
        update.joined_since = joined_since;
        // Removed: this incarnation was a member and is not any more.
        update.me_removed = was_joined && joined_since.is_none();
        for c in &out.applied {
            eprintln!(
                "xfs-node {me}: membership epoch {}: {c:?}",
                self.consensus.map().epoch
            );
        }
        if update.me_removed {
            turns.removed_self += 1;
            self.left = self.has_left();
            eprintln!(
                "xfs-node {me}: the cluster removed this node: dropping its cache and \
                 un-fsynced writes{}",
                if self.left {
                    " (it left: `xfs-node join` brings it back)"
                } else {
                    ", rejoining as a new incarnation"
                }
            );
            self.incarnation = next_incarnation(self.consensus.map(), me);
            turns.join_proposed_at = None;
        }
        if self.is_joined() {
            turns.last_error.clear();
        }
        out.applied.clear();
        (self.on_map)(self.consensus.map(), update.joined_since);
        self.shards.retain(|send| send(update.clone()));
    }

    /// What the shard loops must apply for `applied`.
    fn update(&self, applied: &[Change], me: NodeId) -> MembershipUpdate {
        let mut removed = Vec::new();
        let mut rejoined = Vec::new();
        let mut me_removed = false;
        for c in applied {
            match c {
                Change::Fail { node, .. } | Change::Leave { node } => {
                    if *node == me {
                        me_removed = true;
                    } else {
                        removed.push(*node);
                    }
                }
                Change::Join { node, .. } if *node != me => rejoined.push(*node),
                Change::Join { .. } | Change::ReplaceServer { .. } => {}
            }
        }
        MembershipUpdate {
            fence: self.consensus.map().fence(),
            removed,
            rejoined,
            me_removed,
            joined_since: None,
            managers: self.consensus.map().managers.clone(),
            managers_epoch: self.consensus.map().managers_epoch,
        }
    }

    fn publish(&self, joined: bool, turns: &Turns) {
        let c: ConsensusCounters = self.consensus.counters();
        let map = self.consensus.map();
        let s = MembershipStatus {
            enabled: true,
            epoch: map.epoch,
            leader: self.consensus.leader(),
            term: self.consensus.term(),
            voters: self.consensus.voters(),
            members: map
                .members
                .iter()
                .map(|(n, m)| {
                    let state = match m.state {
                        MemberState::Active => "active",
                        MemberState::Failed => "failed",
                        MemberState::Left => "left",
                    };
                    (*n, m.incarnation, state.to_string(), m.since)
                })
                .collect(),
            managers: map.managers.clone(),
            managers_epoch: map.managers_epoch,
            stripe_groups_epoch: map.stripe_groups_epoch,
            incarnation: self.incarnation,
            joined,
            removed_self: turns.removed_self,
            failures_proposed: turns.failures_proposed,
            stepped: c.stepped,
            bad_messages: c.bad_messages,
            applied_entries: c.applied_entries,
            last_error: turns.last_error.clone(),
        };
        *lock(&self.status) = s;
    }
}

/// Connect the membership endpoint to every peer's: node → its name, mapped in node order.
pub fn connect_peers<T: Transport>(
    endpoint: &mut Endpoint<T>,
    peers: &BTreeMap<NodeId, EndpointName>,
    tag: u64,
) -> Result<(), am_core::AmError> {
    for (k, name) in peers.values().enumerate() {
        endpoint.map(k as u16, *name, Tag(tag))?;
    }
    Ok(())
}
