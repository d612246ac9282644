//! Per-core shard loops: the driver that runs the coherence state machine over Active
//! Messages (DESIGN.md §4, "Per-core shards").
//!
//! A node runs N [`Shard`]s, one single-threaded loop per core. A block belongs to shard
//! [`shard_of`]`(block, N)` on every node, so shard s of one node only ever talks to shard s
//! of the others. Each shard owns one AM endpoint and the client, manager and storage state
//! of its blocks; no protocol state is shared between shards (a shard is `Send`, moved into
//! its thread, and driven only by [`Shard::step`]). The node's log is shared: each shard
//! hands its storage role's reads, writes and syncs to the node's log actor
//! ([`Shard::external_store`], `storage::log_actor`) and takes the answers back, never
//! waiting for them in the loop (docs/architecture.md).
//!
//! The loop: poll the endpoint (its handler only decodes and queues), then feed the queued
//! messages, finished kernel invalidations and waiting user operations to the state
//! machines, and execute their outputs: sends to peers through the endpoint (to this node,
//! straight into the local queue), kernel invalidations, completions. A send the endpoint
//! refuses for lack of room (`WouldBlock`) waits in the outgoing queue, in order, for the
//! next step; nothing is dropped.
//!
//! Wire format: AM handler [`COHERENCE_HANDLER`], arguments `[kind, block, a, b]`, block data
//! (for `Data`, `Handoff`, `WriteBack`) as the medium payload ([`BlockData`]). A message that
//! does not decode, or comes from an endpoint that is not a known node, is counted in
//! [`ShardCounters::bad_messages`] and dropped.

pub mod queue;
pub mod run;
pub mod store;

pub use store::{StoreDone, StoreWork, SyncFor};

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use crate::lock;

use am_core::{AmError, Endpoint, EndpointName, Msg as AmMsg, Tag, Transport, TransportError};

use crate::coherence::{
    mix, Admit, BlockId, BlockStore, ClientShard, Epoch, Fence, ManagerShard, Msg, NodeId, OpId,
    Outcome, Output, Placement, ProtocolConfig, ProtocolError, Role, StorageShard, SyncError,
    UserOp,
};

mod moves;
pub use moves::{MoveBarrier, Moves, SyncLedger, MOVED_HANDLER};

/// Messages a shard keeps until its node has applied the newer epoch they were sent in;
/// beyond this, the newest are dropped (counted in [`ShardCounters::fenced`]).
pub const MAX_HELD_FOR_EPOCH: usize = 65_536;

/// The AM handler index of coherence messages.
pub const COHERENCE_HANDLER: u16 = 1;

/// The AM handler index of log-sync requests and store commands between nodes, and their
/// answers: `[kind, op, status]` ([`SyncKind`]), a payload where the kind has one.
pub const SYNC_HANDLER: u16 = 4;

/// The AM handler of a node's hello to its peers at start ([`Shard::announce`]): an empty
/// message the receiver drops. Its handshake tells each peer's endpoint this node's new
/// incarnation before anything else is sent to it.
pub const ANNOUNCE_HANDLER: u16 = 5;

/// What a message to [`SYNC_HANDLER`] is: its first argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum SyncKind {
    /// `[SyncRequest, op, 0]`: make your log durable.
    SyncRequest = 0,
    /// `[SyncReply, op, errno]`: done (errno 0), or failed with the error text as payload.
    SyncReply = 1,
    /// `[CommandRequest, op, 0]`: run the store command in the payload (the cleaner's).
    CommandRequest = 2,
    /// `[CommandReply, op, status]` ([`CommandStatus`]): its answer or error text as
    /// payload.
    CommandReply = 3,
}

/// The status of a [`SyncKind::CommandReply`]: its third argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum CommandStatus {
    /// The command ran; the payload is its answer.
    Ok = 0,
    /// It failed; the payload is the error text.
    Failed = 1,
}

impl CommandStatus {
    /// The status a reply's third argument names (any value but `Ok`'s reads as `Failed`).
    pub fn from_wire(v: u64) -> CommandStatus {
        if v == CommandStatus::Ok as u64 {
            CommandStatus::Ok
        } else {
            CommandStatus::Failed
        }
    }
}

/// Why a store command ([`Shard::call`], `NodeBlocks::call`) got no answer, or failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The node the command went to takes no store commands.
    #[error("this node runs no store commands")]
    NoCommands,
    /// The node is not a peer of this shard.
    #[error("node {0} is not connected to this shard")]
    NotConnected(NodeId),
    /// The send to the node failed.
    #[error("node {node} unreachable: {source}")]
    Unreachable {
        /// The node.
        node: NodeId,
        /// Why the send failed.
        #[source]
        source: AmError,
    },
    /// The node ran the command and it failed (its error text, from the wire).
    #[error("node {node}: {message}")]
    Remote {
        /// The node.
        node: NodeId,
        /// What it reported.
        message: String,
    },
    /// Too many commands are queued for the command thread.
    #[error("busy: too many commands queued")]
    Busy,
    /// This node was removed from the cluster while the command waited.
    #[error("this node was removed from the cluster (fenced); it rejoins as a new incarnation")]
    Fenced,
    /// The node's command thread has stopped.
    #[error("the command thread has stopped")]
    CommandThreadStopped,
    /// The shard loop has stopped (the node is stopping).
    #[error("the shard loop has stopped")]
    Stopped,
    /// No answer in time.
    #[error("node {node} did not answer within {timeout:?}")]
    Timeout {
        /// The node.
        node: NodeId,
        /// How long the caller waited.
        timeout: std::time::Duration,
    },
}

impl SyncKind {
    /// The kind a message's first argument names, if any.
    pub fn from_wire(v: u64) -> Option<SyncKind> {
        [
            SyncKind::SyncRequest,
            SyncKind::SyncReply,
            SyncKind::CommandRequest,
            SyncKind::CommandReply,
        ]
        .into_iter()
        .find(|k| *k as u64 == v)
    }
}

/// The shard that owns `block` in a node of `shards` shards.
pub fn shard_of(block: BlockId, shards: usize) -> usize {
    ((mix(block) >> 40) % shards.max(1) as u64) as usize
}

pub use crate::coherence::wire::{decode, encode, BlockData};

/// Counters of one shard loop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardCounters {
    /// Protocol messages handled (received from peers or from this node).
    pub messages: u64,
    /// User operations started.
    pub ops_started: u64,
    /// User operations completed.
    pub ops_completed: u64,
    /// Messages that did not decode or came from an unknown endpoint (dropped).
    pub bad_messages: u64,
    /// Inputs a state machine had no rule for (see [`Shard::last_error`]).
    pub protocol_errors: u64,
    /// Messages the AM layer returned as undeliverable (a dead peer).
    pub undeliverable: u64,
    /// Of those, coherence messages answered for the dead peer (see `bounce`).
    pub bounced: u64,
    /// Sends that waited in the outgoing queue because the endpoint was full.
    pub deferred_sends: u64,
    /// Messages sent to other nodes through the endpoint.
    pub remote_sends: u64,
    /// Messages to this node itself (not through the network).
    pub local_sends: u64,
    /// Reads served from a copy while the kernel was dropping it (each makes the kernel
    /// invalidation go round once more).
    pub reads_during_invalidation: u64,
    /// Messages refused by the fence: from a node the cluster removed, from an older
    /// incarnation, or more than [`MAX_HELD_FOR_EPOCH`] waiting for a newer epoch.
    pub fenced: u64,
    /// Messages kept until this node applied the newer epoch they were sent in.
    pub held_for_epoch: u64,
    /// Messages to a node the cluster removed, answered for it and never sent.
    pub answered_for_removed: u64,
    /// Times this node found itself removed by the cluster and dropped its state.
    pub fenced_self: u64,
    /// Blocks whose manager slot moved while this node held state for them (dropped).
    pub blocks_moved: u64,
    /// Of those, dirty copies written back to the block's new storage node.
    pub moved_write_backs: u64,
    /// Operations in progress on a moved block, run again under its new manager.
    pub ops_run_again: u64,
    /// Requests held until every member dropped its copies of the moved blocks.
    pub held_for_move: u64,
    /// Requests for blocks this node no longer manages (its sender asks again).
    pub not_managed_here: u64,
    /// Moves' write-backs never acknowledged, or barriers lifted, after their timeout.
    pub moves_expired: u64,
    /// Times this node told its peers it let go of its copies of moved blocks.
    pub moves_announced: u64,
}

/// One delivered protocol message, as the trace records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery<D> {
    /// The sender.
    pub from: NodeId,
    /// The receiver.
    pub to: NodeId,
    /// The message.
    pub msg: Msg<D>,
}

/// A finished user operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion<D> {
    /// The driver's operation id.
    pub op: OpId,
    /// Its block.
    pub block: BlockId,
    /// How it ended.
    pub outcome: Outcome<D>,
}

type Inbox<D> = Arc<Mutex<VecDeque<(EndpointName, Msg<D>, Epoch)>>>;
type SyncInbox = Arc<Mutex<VecDeque<(EndpointName, [u64; 3], Vec<u8>)>>>;
type Bounced = Arc<Mutex<VecDeque<(EndpointName, Vec<u64>, Vec<u8>)>>>;

/// One shard loop of one node.
pub struct Shard<T: Transport, D: BlockData, S: BlockStore<D>> {
    node: NodeId,
    endpoint: Endpoint<T>,
    /// The client state machine of this shard's blocks.
    pub client: ClientShard<D>,
    /// The manager state machine of this shard's blocks.
    pub manager: ManagerShard,
    /// The storage state machine of this shard's blocks.
    pub storage: StorageShard<S>,
    inbox: Inbox<D>,
    sync_inbox: SyncInbox,
    sync_out: VecDeque<(NodeId, [u64; 3], Vec<u8>)>,
    sync_done: Vec<(OpId, Result<(), SyncError>)>,
    call_done: Vec<(OpId, Result<Vec<u8>, CommandError>)>,
    bad: Arc<Mutex<u64>>,
    undeliverable: Arc<Mutex<u64>>,
    bounced: Bounced,
    /// Peers whose messages bounced and that have not been heard from since.
    dead: std::collections::BTreeSet<NodeId>,
    peers: BTreeMap<NodeId, u16>,
    names: BTreeMap<(std::net::SocketAddr, u32), NodeId>,
    /// Messages from this node to itself, and messages received but not yet handled.
    pending: VecDeque<Delivery<D>>,
    /// Sends the endpoint had no room for, in order.
    outgoing: VecDeque<(NodeId, Msg<D>)>,
    kernel: VecDeque<BlockId>,
    /// Blocks whose kernel invalidation served a read meanwhile: the kernel may have
    /// cached that read after it dropped the pages, so it must drop them once more.
    reread: std::collections::BTreeSet<BlockId>,
    waiting: BTreeMap<BlockId, VecDeque<(OpId, UserOp<D>)>>,
    completions: Vec<Completion<D>>,
    out: Vec<Output<D>>,
    payload: Vec<u8>,
    /// Every message handled, in order, when tracing is on.
    pub trace: Option<Vec<Delivery<D>>>,
    /// When true, [`Shard::step`] does not handle received messages by itself: a replay
    /// driver picks them with [`Shard::handle_next`].
    pub manual: bool,
    /// When true, kernel invalidations are not reported done by [`Shard::step`] at once:
    /// whoever drops the kernel's pages (the FUSE front's notifier thread, off this loop,
    /// because an invalidation may call back into the file system) takes them with
    /// [`Shard::take_kernel_requests`] and reports each with [`Shard::kernel_done`]. Until
    /// then the revoke or eviction behind it waits; the rest of the shard runs on.
    pub external_kernel: bool,
    /// When true, store commands ([`Shard::call`] to this node, and those peers send) are
    /// taken by whoever drives the loop with [`Shard::take_commands`], run elsewhere (the
    /// cleaner's moves read segments and write checkpoints: never on this loop) and
    /// reported with [`Shard::command_done`]; when false they are refused.
    pub external_commands: bool,
    commands: Vec<(NodeId, OpId, Vec<u8>)>,
    /// When true, the storage role's block reads and writes and the log syncs are not run
    /// on [`StorageShard::store`] inside the loop: whoever drives the loop takes them with
    /// [`Shard::take_store_work`], runs them elsewhere in the order given (in a node, the
    /// log actor) and reports each with [`Shard::store_done`]. The loop never waits for
    /// the store.
    pub external_store: bool,
    store_work: Vec<StoreWork<D>>,
    /// Store work taken and not yet reported done.
    store_outstanding: usize,
    last_error: Option<ProtocolError>,
    counters: ShardCounters,
    /// The membership as this node last applied it: what incoming messages are checked by,
    /// and whose epoch outgoing ones are stamped with.
    fence: Fence,
    /// Messages sent in an epoch this node has not applied yet.
    held_for_epoch: VecDeque<(NodeId, Msg<D>, Epoch)>,
    /// When true (a node with a membership log), a message the AM layer could not deliver
    /// does not decide the peer dead: the peer becomes a suspect (for the membership loop
    /// to propose its removal, [`Shard::take_suspects`]) and the message waits until the
    /// cluster removed it ([`Shard::set_membership`]). When false, the peer is taken as
    /// dead at once (the block-level simulation, clusters without a membership log).
    pub fenced_failures: bool,
    /// Suspects, each with the epoch its undelivered message was sent in.
    suspects: Vec<(NodeId, Epoch)>,
    /// Messages to suspects, answered for them once the cluster removed them.
    suspended: Vec<(NodeId, Msg<D>)>,
    /// Per suspect with suspended messages: the epoch its first undelivered message was
    /// sent in (reported again by [`Shard::suspects_waiting`] until it is removed).
    suspected_in: BTreeMap<NodeId, Epoch>,
    /// Blocks whose kernel pages were dropped because this node was removed: their
    /// invalidations complete with no state machine waiting for them.
    forgotten: std::collections::BTreeSet<BlockId>,
    /// The epoch this node's current incarnation joined in; `None` while it is not a
    /// member (starting, or removed): then it takes no coherence message at all, and one
    /// sent before that epoch was meant for an earlier incarnation of this node.
    joined_since: Option<Epoch>,
    /// Operations given up ([`ClientShard::abandon`]): their manager or storage node was
    /// removed or restarted; the driver fails them with EIO.
    failed_ops: Vec<OpId>,
    /// Manager failover: slots that moved ([`moves`]).
    moves: Moves<D>,
}

/// How a shard is set up.
#[derive(Clone, Debug)]
pub struct ShardConfig {
    /// This node.
    pub node: NodeId,
    /// Protocol variant (sequence numbers on in every real node).
    pub protocol: ProtocolConfig,
    /// Managers and storage servers.
    pub placement: Placement,
    /// Every client node (N-chance candidates).
    pub clients: Vec<NodeId>,
    /// Blocks the client caches in this shard before a miss evicts one (0: unbounded).
    pub capacity: usize,
}

impl<T: Transport, D: BlockData, S: BlockStore<D>> Shard<T, D, S> {
    /// A shard over `endpoint`, storing blocks in `store`.
    pub fn new(mut endpoint: Endpoint<T>, cfg: ShardConfig, store: S) -> Result<Self, AmError> {
        let inbox: Inbox<D> = Arc::new(Mutex::new(VecDeque::new()));
        let bad = Arc::new(Mutex::new(0u64));
        let (i, b) = (inbox.clone(), bad.clone());
        endpoint.register(COHERENCE_HANDLER, move |_, m| {
            // `[kind, block, a, b, epoch]` (a peer without an epoch sends four: epoch 0).
            let (args, epoch) = match m.args {
                [a @ .., e] if m.args.len() == 5 => (a, *e),
                a => (a, 0),
            };
            match decode::<D>(args, m.payload) {
                Some(msg) => lock(&i).push_back((m.source, msg, epoch)),
                None => *lock(&b) += 1,
            }
        })?;
        let sync_inbox: SyncInbox = Arc::new(Mutex::new(VecDeque::new()));
        let (si, b) = (sync_inbox.clone(), bad.clone());
        endpoint.register(SYNC_HANDLER, move |_, m| match m.args {
            [k, op, ok, ..] if SyncKind::from_wire(*k).is_some() => {
                lock(&si).push_back((m.source, [*k, *op, *ok], m.payload.to_vec()))
            }
            _ => *lock(&b) += 1,
        })?;
        endpoint.register(ANNOUNCE_HANDLER, |_, _| {})?;
        let moves = Moves::new(cfg.placement.managers.clone());
        let mi = moves.inbox.clone();
        endpoint.register(MOVED_HANDLER, move |_, m| {
            if let [epoch] = m.args {
                lock(&mi).push_back(((m.source.addr, m.source.vnet), *epoch));
            }
        })?;
        let undeliverable = Arc::new(Mutex::new(0u64));
        let bounced: Bounced = Arc::new(Mutex::new(VecDeque::new()));
        let (u, bq) = (undeliverable.clone(), bounced.clone());
        endpoint.set_upcall(move |_, m| {
            *lock(&u) += 1;
            if m.handler == COHERENCE_HANDLER {
                lock(&bq).push_back((m.dest, m.args.clone(), m.payload.clone()));
            }
        });
        Ok(Shard {
            node: cfg.node,
            endpoint,
            client: ClientShard::new(cfg.node, cfg.protocol, cfg.placement.clone(), cfg.capacity),
            manager: ManagerShard::new(cfg.node, cfg.protocol, cfg.placement, cfg.clients),
            storage: StorageShard { store },
            inbox,
            sync_inbox,
            sync_out: VecDeque::new(),
            sync_done: Vec::new(),
            call_done: Vec::new(),
            bad,
            undeliverable,
            bounced,
            dead: Default::default(),
            peers: BTreeMap::new(),
            names: BTreeMap::new(),
            pending: VecDeque::new(),
            outgoing: VecDeque::new(),
            kernel: VecDeque::new(),
            reread: Default::default(),
            waiting: BTreeMap::new(),
            completions: Vec::new(),
            out: Vec::new(),
            payload: Vec::new(),
            trace: None,
            manual: false,
            external_kernel: false,
            external_commands: false,
            commands: Vec::new(),
            external_store: false,
            store_work: Vec::new(),
            store_outstanding: 0,
            last_error: None,
            counters: ShardCounters::default(),
            fence: Fence::default(),
            held_for_epoch: VecDeque::new(),
            fenced_failures: false,
            suspects: Vec::new(),
            suspended: Vec::new(),
            forgotten: Default::default(),
            joined_since: Some(0),
            failed_ops: Vec::new(),
            suspected_in: BTreeMap::new(),
            moves,
        })
    }

    /// This shard's node.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// The endpoint's name, for the other nodes' [`Shard::connect`].
    pub fn name(&self) -> EndpointName {
        self.endpoint.name()
    }

    /// The endpoint's tag.
    pub fn tag(&self) -> Tag {
        self.endpoint.tag()
    }

    /// The endpoint (for its statistics and timeouts).
    pub fn endpoint(&self) -> &Endpoint<T> {
        &self.endpoint
    }

    /// Make `node`'s shard of the same index reachable (its endpoint `name`, `tag`).
    pub fn connect(&mut self, node: NodeId, name: EndpointName, tag: Tag) -> Result<(), AmError> {
        let index = match self.peers.get(&node) {
            Some(i) => *i,
            None => self.peers.len() as u16,
        };
        self.endpoint.map(index, name, tag)?;
        self.peers.insert(node, index);
        self.names.insert((name.addr, name.vnet), node);
        Ok(())
    }

    /// Counters.
    pub fn counters(&self) -> ShardCounters {
        let mut c = self.counters;
        c.bad_messages += *lock(&self.bad);
        c.undeliverable = *lock(&self.undeliverable);
        c
    }

    /// The last protocol error, if any.
    pub fn last_error(&self) -> Option<&ProtocolError> {
        self.last_error.as_ref()
    }

    /// Queue a user operation; it starts when the block has no other in progress.
    pub fn submit(&mut self, op: OpId, block: BlockId, user: UserOp<D>) {
        self.waiting.entry(block).or_default().push_back((op, user));
    }

    /// Ask node `node` to make its log durable (every write-back it acknowledged so far);
    /// the answer comes from [`Shard::take_sync_done`] with `op`.
    pub fn sync(&mut self, op: OpId, node: NodeId) {
        // A home's log is synced where it is written now (its slots' manager).
        let home = node;
        let node = self.current_of_home(home);
        if let Err(e) = self.sync_asked(op, home, node) {
            self.sync_done.push((op, Err(e)));
            return;
        }
        if node == self.node && self.external_store {
            self.store_work.push(StoreWork::Sync(SyncFor::Local(op)));
        } else if node == self.node {
            let r = self.storage.store.sync();
            self.sync_done.push((op, r));
        } else if self.peers.contains_key(&node) {
            self.sync_out
                .push_back((node, [SyncKind::SyncRequest as u64, op, 0], Vec::new()));
        } else {
            self.sync_done.push((
                op,
                Err(SyncError::io(format!(
                    "node {node} is not connected to this shard"
                ))),
            ));
        }
    }

    /// Send a store command (the log cleaner's, see `storage::cleaner`) to node `node`; the
    /// answer comes from [`Shard::take_call_done`] with `op`.
    pub fn call(&mut self, op: OpId, node: NodeId, request: Vec<u8>) {
        if node == self.node && self.external_commands {
            self.commands.push((node, op, request));
        } else if node == self.node {
            self.call_done.push((op, Err(CommandError::NoCommands)));
        } else if self.peers.contains_key(&node) {
            self.sync_out
                .push_back((node, [SyncKind::CommandRequest as u64, op, 0], request));
        } else {
            self.call_done
                .push((op, Err(CommandError::NotConnected(node))));
        }
    }

    /// Take the store commands to run (external commands mode): (from, op, request).
    pub fn take_commands(&mut self) -> Vec<(NodeId, OpId, Vec<u8>)> {
        std::mem::take(&mut self.commands)
    }

    /// A store command from `from` finished: answer it (to this node's caller, or to the
    /// peer that sent it).
    pub fn command_done(&mut self, from: NodeId, op: OpId, r: Result<Vec<u8>, CommandError>) {
        if from == self.node {
            self.call_done.push((op, r));
            return;
        }
        let (status, bytes) = match r {
            Ok(b) => (CommandStatus::Ok, b),
            Err(e) => (CommandStatus::Failed, e.to_string().into_bytes()),
        };
        self.sync_out.push_back((
            from,
            [SyncKind::CommandReply as u64, op, status as u64],
            bytes,
        ));
    }

    /// Take the answers to [`Shard::call`].
    pub fn take_call_done(&mut self) -> Vec<(OpId, Result<Vec<u8>, CommandError>)> {
        std::mem::take(&mut self.call_done)
    }

    /// This node restarted: its client and manager state machines start empty, its queues
    /// are dropped (the endpoint and its peers stay), its store is `store`.
    pub fn restart(&mut self, cfg: ShardConfig, store: S) {
        self.client = ClientShard::new(cfg.node, cfg.protocol, cfg.placement.clone(), cfg.capacity);
        self.manager = ManagerShard::new(cfg.node, cfg.protocol, cfg.placement, cfg.clients);
        self.storage = StorageShard { store };
        lock(&self.inbox).clear();
        lock(&self.sync_inbox).clear();
        self.pending.clear();
        self.outgoing.clear();
        self.sync_out.clear();
        self.sync_done.clear();
        self.call_done.clear();
        self.commands.clear();
        self.kernel.clear();
        self.waiting.clear();
        self.completions.clear();
        // Work handed to the store before the restart is the old run's: its answers are
        // not taken (the driver drops them with the store's queue).
        self.store_work.clear();
        self.store_outstanding = 0;
        self.moves.reset();
    }

    /// Node `peer` restarted: forget what this shard's state machines knew of it. The
    /// copies of the blocks it manages that the client drops leave the kernel too (no
    /// invalidation would reach them any more). Returns how many dirty copies were dropped.
    pub fn peer_restarted(&mut self, peer: NodeId) -> usize {
        self.manager.peer_restarted(peer);
        self.pending.retain(|d| d.from != peer);
        let placement = &self.client.placement;
        let dropping: Vec<BlockId> = self
            .client
            .blocks
            .iter()
            .filter(|(b, c)| {
                placement.manager(**b) == peer
                    && c.op.is_none()
                    && c.step.is_none()
                    && c.data.is_some()
            })
            .map(|(b, _)| *b)
            .collect();
        let dirty = self.client.peer_restarted(peer);
        for b in dropping {
            self.forgotten.insert(b);
            self.kernel.push_back(b);
        }
        dirty
    }

    /// Take the finished log syncs.
    pub fn take_sync_done(&mut self) -> Vec<(OpId, Result<(), SyncError>)> {
        let done = std::mem::take(&mut self.sync_done);
        self.syncs_done(&done);
        done
    }

    /// Take the store work asked for since the last call (external store mode), in the
    /// order the store must do it; each piece must be reported with [`Shard::store_done`].
    pub fn take_store_work(&mut self) -> Vec<StoreWork<D>> {
        self.store_outstanding += self.store_work.len();
        std::mem::take(&mut self.store_work)
    }

    /// Store work taken and not yet reported done.
    pub fn store_outstanding(&self) -> usize {
        self.store_outstanding
    }

    /// The store did these pieces of work (external store mode): answer them (a block's
    /// reader or writer, a local sync caller, a peer's sync request).
    pub fn store_done(&mut self, done: impl IntoIterator<Item = StoreDone<D>>) {
        for d in done {
            self.store_outstanding = self.store_outstanding.saturating_sub(1);
            match d {
                StoreDone::Block {
                    block,
                    reply,
                    result,
                } => {
                    let r = StorageShard::<S>::answer(block, reply, result, &mut self.out);
                    self.note(r);
                    self.execute();
                }
                StoreDone::Sync {
                    asked: SyncFor::Local(op),
                    result,
                } => self.sync_done.push((op, result)),
                StoreDone::Sync {
                    asked: SyncFor::Peer { from, op },
                    result,
                } => self.reply_sync(from, op, result),
            }
        }
        self.flush_outgoing();
    }

    /// Answer peer `from`'s log-sync request `op` with `result` (errno 0, or the error's
    /// errno and text).
    fn reply_sync(&mut self, from: NodeId, op: OpId, result: Result<(), SyncError>) {
        let (errno, text) = match result {
            Ok(()) => (0, Vec::new()),
            Err(e) => (e.errno.max(1) as u64, e.message.into_bytes()),
        };
        self.sync_out
            .push_back((from, [SyncKind::SyncReply as u64, op, errno], text));
    }

    /// Block until the endpoint has something to do or `timeout` passes.
    pub fn wait(&mut self, timeout: std::time::Duration) -> Result<(), TransportError> {
        self.endpoint.wait(Some(timeout))
    }

    fn handle_syncs(&mut self) -> usize {
        let msgs: Vec<_> = lock(&self.sync_inbox).drain(..).collect();
        let n = msgs.len();
        for (name, [kind, op, errno], payload) in msgs {
            let Some(from) = self.names.get(&(name.addr, name.vnet)).copied() else {
                self.counters.bad_messages += 1;
                continue;
            };
            let Some(kind) = SyncKind::from_wire(kind) else {
                self.counters.bad_messages += 1;
                continue;
            };
            if kind == SyncKind::CommandRequest {
                if self.external_commands {
                    self.commands.push((from, op, payload));
                } else {
                    self.command_done(from, op, Err(CommandError::NoCommands));
                }
            } else if kind == SyncKind::CommandReply {
                let r = match CommandStatus::from_wire(errno) {
                    CommandStatus::Ok => Ok(payload),
                    CommandStatus::Failed => Err(CommandError::Remote {
                        node: from,
                        message: String::from_utf8_lossy(&payload).into_owned(),
                    }),
                };
                self.call_done.push((op, r));
            } else if kind == SyncKind::SyncRequest && self.external_store {
                self.store_work
                    .push(StoreWork::Sync(SyncFor::Peer { from, op }));
            } else if kind == SyncKind::SyncRequest {
                let r = self.storage.store.sync();
                self.reply_sync(from, op, r);
            } else if errno == 0 {
                self.sync_done.push((op, Ok(())));
            } else {
                let text = String::from_utf8_lossy(&payload);
                self.sync_done.push((
                    op,
                    Err(SyncError {
                        errno: errno as i32,
                        message: format!("node {from}: {text}"),
                    }),
                ));
            }
        }
        while let Some((to, args, payload)) = self.sync_out.front() {
            let Some(index) = self.peers.get(to).copied() else {
                self.sync_out.pop_front();
                continue;
            };
            let slices = [payload.as_slice()];
            let msg = if payload.is_empty() {
                AmMsg::small(SYNC_HANDLER, args)
            } else {
                AmMsg::medium(SYNC_HANDLER, args, &slices)
            };
            match self.endpoint.send(index, msg) {
                Ok(_) => {
                    self.sync_out.pop_front();
                }
                Err(AmError::WouldBlock) => break,
                Err(e) => {
                    let (to, args, _) = self.sync_out.pop_front().unwrap_or_default();
                    match SyncKind::from_wire(args[0]) {
                        Some(SyncKind::CommandRequest) => self.call_done.push((
                            args[1],
                            Err(CommandError::Unreachable {
                                node: to,
                                source: e,
                            }),
                        )),
                        Some(SyncKind::SyncRequest) => self.sync_done.push((
                            args[1],
                            Err(SyncError::io(format!("node {to} unreachable: {e}"))),
                        )),
                        // A reply that cannot be sent: the peer times out.
                        _ => {}
                    }
                }
            }
        }
        n
    }

    /// Take the operations finished so far.
    pub fn take_completions(&mut self) -> Vec<Completion<D>> {
        std::mem::take(&mut self.completions)
    }

    /// Whether nothing is queued here (the state machines may still wait for peers).
    pub fn is_quiet(&self) -> bool {
        self.pending.is_empty()
            && self.outgoing.is_empty()
            && self.kernel.is_empty()
            && self.waiting.is_empty()
            && self.store_work.is_empty()
            && self.store_outstanding == 0
            && lock(&self.inbox).is_empty()
    }

    /// Received messages not yet handled (manual mode), oldest first.
    pub fn received(&mut self) -> &VecDeque<Delivery<D>> {
        self.collect_inbox();
        &self.pending
    }

    /// Take the kernel invalidations asked for since the last call (external kernel mode).
    /// Each must be reported with [`Shard::kernel_done`] once the kernel dropped the pages.
    pub fn take_kernel_requests(&mut self) -> Vec<BlockId> {
        self.kernel.drain(..).collect()
    }

    /// Kernel invalidations asked for and not yet reported done.
    pub fn kernel_pending(&self) -> &VecDeque<BlockId> {
        &self.kernel
    }

    fn collect_inbox(&mut self) {
        let mut inbox = lock(&self.inbox);
        while let Some((name, msg, epoch)) = inbox.pop_front() {
            if self.joined_since.is_none_or(|j| epoch < j) {
                // Not a member, or meant for an earlier incarnation of this node.
                self.counters.fenced += 1;
                continue;
            }
            match self.names.get(&(name.addr, name.vnet)).copied() {
                Some(_) if self.before_move(msg.block(), epoch) => {
                    // About a block whose slot moved after it was sent: the old map's.
                    self.counters.not_managed_here += 1;
                }
                Some(from) => match self.fence.admit(from, epoch) {
                    Admit::Yes => {
                        // Heard from: alive (again).
                        self.dead.remove(&from);
                        self.pending.push_back(Delivery {
                            from,
                            to: self.node,
                            msg,
                        })
                    }
                    Admit::Refused => self.counters.fenced += 1,
                    Admit::Later { .. } if self.held_for_epoch.len() >= MAX_HELD_FOR_EPOCH => {
                        self.counters.fenced += 1
                    }
                    Admit::Later { .. } => {
                        self.counters.held_for_epoch += 1;
                        self.held_for_epoch.push_back((from, msg, epoch));
                    }
                },
                None => self.counters.bad_messages += 1,
            }
        }
    }

    /// The membership this node applied (in order): `fence` as of its newest epoch, the
    /// peers removed by the changes applied since the last call, and the peers that joined
    /// again as new incarnations. A removed peer's suspended messages are answered for it
    /// and the manager lets go of it ([`ManagerShard::peer_removed`]); a rejoined one
    /// starts afresh ([`Shard::peer_restarted`]); messages held for this epoch are
    /// checked again.
    pub fn set_membership(
        &mut self,
        fence: Fence,
        removed: &[NodeId],
        rejoined: &[NodeId],
        joined_since: Option<Epoch>,
        (managers, managers_epoch): (&[NodeId], Epoch),
    ) {
        self.fence = fence;
        self.joined_since = joined_since;
        self.move_slots(managers, managers_epoch);
        for p in removed.iter().chain(rejoined) {
            if *p == self.node {
                continue;
            }
            self.moves_peer_gone(*p);
            let r = self.manager.peer_removed(*p, &mut self.out);
            self.note(r);
            // What this client waited for from it will not come.
            for (block, op, had) in self.client.abandon_managed_by(*p) {
                self.failed_ops.extend(op);
                if had {
                    self.forgotten.insert(block);
                    self.kernel.push_back(block);
                }
            }
            let mine: Vec<Msg<D>> = {
                let (mine, rest) = std::mem::take(&mut self.suspended)
                    .into_iter()
                    .partition(|(to, _)| to == p);
                self.suspended = rest;
                mine.into_iter().map(|(_, m)| m).collect()
            };
            for m in mine {
                let r = self.manager.undeliverable(*p, m, &mut self.out);
                self.note(r);
            }
            self.outgoing.retain(|(to, _)| to != p);
            self.suspects.retain(|(s, _)| s != p);
            self.suspected_in.remove(p);
            self.execute();
        }
        for p in rejoined {
            if *p != self.node {
                self.peer_restarted(*p);
                self.manager.peer_joined(*p);
                self.dead.remove(p);
            }
        }
        let held = std::mem::take(&mut self.held_for_epoch);
        for (from, msg, epoch) in held {
            if self.joined_since.is_none_or(|j| epoch < j) {
                self.counters.fenced += 1;
                continue;
            }
            match self.fence.admit(from, epoch) {
                Admit::Yes => self.pending.push_back(Delivery {
                    from,
                    to: self.node,
                    msg,
                }),
                Admit::Refused => self.counters.fenced += 1,
                Admit::Later { .. } => self.held_for_epoch.push_back((from, msg, epoch)),
            }
        }
    }

    /// Say hello to every peer (an empty message on [`ANNOUNCE_HANDLER`]): a node that
    /// restarted does this first, so that no peer's endpoint still takes it for its old
    /// incarnation when the peer next sends to it (a message to the old incarnation fails,
    /// and would make the peer suspect the new one).
    pub fn announce(&mut self) {
        let peers: Vec<u16> = self.peers.values().copied().collect();
        for index in peers {
            let _ = self
                .endpoint
                .send(index, AmMsg::small(ANNOUNCE_HANDLER, &[]));
        }
    }

    /// Whether this node's current incarnation is a member (always, without a membership
    /// log).
    pub fn is_joined(&self) -> bool {
        self.joined_since.is_some()
    }

    /// Start as not joined: a node with a membership log takes no coherence message until
    /// its join commits ([`Shard::set_membership`]).
    pub fn await_join(&mut self) {
        self.joined_since = None;
    }

    /// Operations given up since the last call (their manager or storage node was removed
    /// or restarted): fail them with EIO.
    pub fn take_failed_ops(&mut self) -> Vec<OpId> {
        std::mem::take(&mut self.failed_ops)
    }

    /// The epoch this shard stamps its messages with.
    pub fn epoch(&self) -> Epoch {
        self.fence.epoch
    }

    /// Peers found unreachable since the last call (with [`Shard::fenced_failures`]): the
    /// membership loop proposes their removal.
    pub fn take_suspects(&mut self) -> Vec<(NodeId, Epoch)> {
        std::mem::take(&mut self.suspects)
    }

    /// The suspects whose messages still wait for their removal, with the epoch of the
    /// first one (the membership loop proposes their removal again until it commits: a
    /// proposal can be lost with a leader).
    pub fn suspects_waiting(&self) -> Vec<(NodeId, Epoch)> {
        self.suspected_in.iter().map(|(n, e)| (*n, *e)).collect()
    }

    /// The cluster removed this node: its state machines start empty, its suspended and
    /// queued messages are dropped, its operations waiting here are dropped (the caller
    /// answers them), and the kernel is asked to drop every block this node cached (its
    /// copies, clean or dirty, are fenced: a removed node's un-fsynced writes are lost, as
    /// a crashed node's). Returns the blocks dropped.
    pub fn fenced_self(&mut self) -> usize {
        self.counters.fenced_self += 1;
        let cached: Vec<BlockId> = self.client.blocks.keys().copied().collect();
        let n = cached.len();
        let c = &self.client;
        let client = ClientShard::new(c.me, c.config, c.placement.clone(), c.capacity);
        let m = &self.manager;
        let manager = ManagerShard::new(m.me, m.config, m.placement.clone(), m.clients.clone());
        self.client = client;
        self.manager = manager;
        self.pending.clear();
        self.outgoing.clear();
        self.held_for_epoch.clear();
        self.suspended.clear();
        self.suspects.clear();
        self.suspected_in.clear();
        self.waiting.clear();
        self.reread.clear();
        self.kernel.clear();
        self.moves.reset();
        for b in cached {
            self.forgotten.insert(b);
            self.kernel.push_back(b);
        }
        n
    }

    /// One turn of the loop: poll the endpoint for up to `budget` datagrams, handle what
    /// arrived (unless manual), report kernel invalidations done, start waiting operations,
    /// and send. Returns how much work it did.
    pub fn step(&mut self, budget: usize) -> Result<usize, TransportError> {
        let mut work = self.endpoint.poll(budget)?;
        work += self.collect_bounced();
        self.collect_inbox();
        work += self.step_moves();
        if !self.manual {
            while let Some(d) = self.pending.pop_front() {
                self.handle(d);
                work += 1;
            }
            while !self.external_kernel {
                let Some(block) = self.kernel.pop_front() else {
                    break;
                };
                self.kernel_done(block);
                work += 1;
            }
        }
        work += self.start_waiting();
        work += self.flush_outgoing();
        work += self.handle_syncs();
        Ok(work)
    }

    /// Manual mode: handle the received message at `index` of [`Shard::received`].
    pub fn handle_next(&mut self, index: usize) -> bool {
        self.collect_inbox();
        match self.pending.remove(index) {
            Some(d) => {
                self.handle(d);
                self.flush_outgoing();
                true
            }
            None => false,
        }
    }

    /// Manual mode: the kernel finished invalidating `block`.
    pub fn kernel_done(&mut self, block: BlockId) {
        if let Some(i) = self.kernel.iter().position(|b| *b == block) {
            self.kernel.remove(i);
        }
        if self.moved_kernel_done(block) {
            return;
        }
        if self.forgotten.remove(&block) {
            // Dropped because this node was removed: nothing waits for it.
            return;
        }
        if self.reread.remove(&block) {
            // A read served from the copy meanwhile may have reached the kernel's cache
            // after the pages were dropped: drop them again (until a round serves none).
            self.kernel.push_back(block);
            return;
        }
        let r = self.client.kernel_invalidated(block, &mut self.out);
        self.note(r);
        self.execute();
        self.flush_outgoing();
    }

    fn start_waiting(&mut self) -> usize {
        if self.waiting.is_empty() {
            return 0;
        }
        let mut started = 0;
        // Reads of blocks whose kernel invalidation is in progress complete from the copy
        // (see `ClientShard::read_while_invalidating`).
        let busy: Vec<BlockId> = self
            .waiting
            .keys()
            .copied()
            .filter(|b| !self.client.is_idle(*b) || self.is_moving(*b))
            .collect();
        if !busy.is_empty() {
            for block in busy {
                while let Some((op, UserOp::Read)) =
                    self.waiting.get(&block).and_then(|q| q.front())
                {
                    let op = *op;
                    // A moved block's copy serves reads until the kernel let go of it (a
                    // read the kernel sent meanwhile may hold the page the invalidation
                    // waits for: it must not wait for the new manager, which waits for
                    // this node's invalidations).
                    let served = self
                        .client
                        .read_while_invalidating(op, block, &mut self.out)
                        || self.read_moved_copy(op, block);
                    if !served {
                        break;
                    }
                    if let Some(q) = self.waiting.get_mut(&block) {
                        q.pop_front();
                        if q.is_empty() {
                            self.waiting.remove(&block);
                        }
                    }
                    self.reread.insert(block);
                    self.counters.reads_during_invalidation += 1;
                    self.counters.ops_started += 1;
                    started += 1;
                }
            }
            self.execute();
        }
        let ready: Vec<BlockId> = self
            .waiting
            .keys()
            .copied()
            .filter(|b| self.client.is_idle(*b) && !self.is_moving(*b))
            .collect();
        for block in ready {
            // Starting one operation may begin a capacity eviction of another block.
            if !self.client.is_idle(block) {
                continue;
            }
            let Some(q) = self.waiting.get_mut(&block) else {
                continue;
            };
            let Some((op, user)) = q.pop_front() else {
                continue;
            };
            if q.is_empty() {
                self.waiting.remove(&block);
            }
            self.counters.ops_started += 1;
            let r = self.client.start(op, block, user, &mut self.out);
            self.note(r);
            self.execute();
            started += 1;
        }
        started
    }

    fn handle(&mut self, d: Delivery<D>) {
        let Some(d) = self.held_for_move(d) else {
            return;
        };
        self.counters.messages += 1;
        if let Some(t) = &mut self.trace {
            t.push(d.clone());
        }
        let r = match d.msg.role() {
            Role::Client => self.client.receive(d.from, d.msg, &mut self.out),
            Role::Manager => self.manager.receive(d.from, d.msg, &mut self.out),
            Role::Storage if self.external_store => {
                StorageShard::<S>::request(d.from, d.msg).map(|r| {
                    self.store_work.push(StoreWork::Block(r));
                })
            }
            Role::Storage => self.storage.receive(d.from, d.msg, &mut self.out),
        };
        self.note(r);
        self.execute();
    }

    fn note(&mut self, r: Result<(), ProtocolError>) {
        if let Err(e) = r {
            self.counters.protocol_errors += 1;
            self.last_error = Some(e);
        }
    }

    fn execute(&mut self) {
        loop {
            let mut out = std::mem::take(&mut self.out);
            self.execute_some(&mut out);
            if self.out.is_empty() {
                // Keep the buffer.
                self.out = out;
                return;
            }
            // Answers for a removed node made more outputs: run those too.
        }
    }

    fn execute_some(&mut self, out: &mut Vec<Output<D>>) {
        for o in out.drain(..) {
            match o {
                Output::Send { to, msg } if to == self.node => {
                    self.counters.local_sends += 1;
                    self.pending.push_back(Delivery {
                        from: self.node,
                        to,
                        msg,
                    })
                }
                // To a node the cluster removed: answered for it, never sent.
                Output::Send { to, msg } if !self.fence.is_member(to) => {
                    self.counters.answered_for_removed += 1;
                    if matches!(
                        msg,
                        Msg::ReadReq { .. }
                            | Msg::WriteReq { .. }
                            | Msg::EvictReq { .. }
                            | Msg::WriteBack { .. }
                    ) {
                        // This client's request to a removed manager or storage node:
                        // nothing will answer it.
                        let block = msg.block();
                        let (op, had) = self.client.abandon(block);
                        self.failed_ops.extend(op);
                        if had {
                            self.forgotten.insert(block);
                            self.kernel.push_back(block);
                        }
                    }
                    let r = self.manager.undeliverable(to, msg, &mut self.out);
                    self.note(r);
                }
                Output::Send { to, msg } => self.outgoing.push_back((to, msg)),
                Output::InvalidateKernel { block } => self.kernel.push_back(block),
                Output::Complete { op, block, outcome } => {
                    self.counters.ops_completed += 1;
                    self.completions.push(Completion { op, block, outcome });
                }
            }
        }
    }

    fn flush_outgoing(&mut self) -> usize {
        let mut sent = 0;
        while let Some((to, msg)) = self.outgoing.front() {
            let Some(index) = self.peers.get(to).copied() else {
                // No route to that node: a configuration error, counted like a dead peer.
                self.counters.undeliverable += 1;
                self.outgoing.pop_front();
                continue;
            };
            let [k, b, x, y] = encode(msg, &mut self.payload);
            let args = [k, b, x, y, self.fence.epoch];
            let r = if self.payload.is_empty() {
                self.endpoint
                    .send(index, AmMsg::small(COHERENCE_HANDLER, &args))
            } else {
                let slices = [self.payload.as_slice()];
                self.endpoint
                    .send(index, AmMsg::medium(COHERENCE_HANDLER, &args, &slices))
            };
            match r {
                Ok(_) => {
                    self.outgoing.pop_front();
                    self.counters.remote_sends += 1;
                    sent += 1;
                }
                Err(AmError::WouldBlock) => {
                    self.counters.deferred_sends += 1;
                    break;
                }
                Err(_) => {
                    self.counters.undeliverable += 1;
                    if let Some((to, msg)) = self.outgoing.pop_front() {
                        let epoch = self.fence.epoch;
                        self.bounce(to, msg, epoch);
                    }
                }
            }
        }
        sent
    }

    /// A message to `to` could not be delivered (the AM layer declared the peer dead):
    /// the manager answers for it where the protocol would otherwise wait forever
    /// (`ManagerShard::undeliverable`: a revoke counts as acknowledged, a forwarded read is
    /// served from another copy or storage, a handoff from storage), and the dead node is
    /// dropped from every cacher list of this manager. What
    /// the dead node alone held (its dirty blocks, the files it managed) is gone until it
    /// restarts: requests for those fail at the caller's timeout.
    fn bounce(&mut self, to: NodeId, msg: Msg<D>, sent_in: Epoch) {
        self.counters.bounced += 1;
        // Sent to an incarnation the cluster has replaced or removed since: answered now.
        let gone = self
            .fence
            .nodes
            .get(&to)
            .is_some_and(|m| !m.member || m.since > sent_in);
        if self.fenced_failures && !gone {
            // Not this node's decision: the cluster removes the peer (then the message is
            // answered for it) or the peer comes back as a new incarnation.
            if !self.suspects.iter().any(|(s, _)| *s == to) {
                self.suspects.push((to, sent_in));
            }
            self.suspected_in.entry(to).or_insert(sent_in);
            self.suspended.push((to, msg));
            return;
        }
        let r = self.manager.undeliverable(to, msg, &mut self.out);
        self.note(r);
        self.execute();
        // Forget its copies once per death, not once per bounced message (a walk over every
        // block this manager knows).
        if self.dead.insert(to) {
            self.manager.peer_died(to);
        }
    }

    fn collect_bounced(&mut self) -> usize {
        let msgs: Vec<_> = lock(&self.bounced).drain(..).collect();
        let n = msgs.len();
        for (dest, args, payload) in msgs {
            let Some(to) = self.names.get(&(dest.addr, dest.vnet)).copied() else {
                continue;
            };
            let sent_in = args.get(4).copied().unwrap_or(0);
            if let Some(msg) = decode::<D>(&args[..args.len().min(4)], &payload) {
                self.bounce(to, msg, sent_in);
            }
        }
        n
    }
}

/// Connect every node's shard s to shard s of every other node (`nodes[n][s]`; every node
/// has the same number of shards).
pub fn connect_all<T: Transport, D: BlockData, S: BlockStore<D>>(
    nodes: &mut [Vec<Shard<T, D, S>>],
) -> Result<(), AmError> {
    let names: Vec<Vec<_>> = nodes
        .iter()
        .map(|n| n.iter().map(|s| (s.node(), s.name(), s.tag())).collect())
        .collect();
    for node in nodes.iter_mut() {
        for (s, shard) in node.iter_mut().enumerate() {
            for peer in &names {
                let (id, name, tag) = peer[s];
                if id != shard.node() {
                    shard.connect(id, name, tag)?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_messages() -> Vec<Msg<u64>> {
        vec![
            Msg::ReadReq { block: 7 },
            Msg::WriteReq {
                block: 7,
                has_data: true,
                whole: false,
            },
            Msg::EvictReq {
                block: 1 << 60,
                keep: true,
            },
            Msg::EvictReq {
                block: 2,
                keep: false,
            },
            Msg::RevokeAck { block: 0 },
            Msg::ForwardFailed {
                block: 3,
                reader: 65535,
                reader_seq: u32::MAX,
            },
            Msg::Forward {
                block: 3,
                seq: 9,
                reader: 2,
                reader_seq: 4,
            },
            Msg::Revoke { block: 3, seq: 1 },
            Msg::Grant { block: 3, seq: 2 },
            Msg::EvictGrant {
                block: 3,
                seq: 2,
                handoff: Some((5, 6)),
            },
            Msg::EvictGrant {
                block: 3,
                seq: 2,
                handoff: None,
            },
            Msg::Fetch {
                block: 3,
                to: 4,
                seq: 5,
                exclusive: true,
            },
            Msg::Data {
                block: 3,
                seq: 5,
                data: 99,
                exclusive: false,
                from_cache: true,
            },
            Msg::Handoff {
                block: 3,
                seq: 5,
                data: 1,
            },
            Msg::WriteBack { block: 3, data: 2 },
            Msg::WriteBackAck { block: 3 },
            Msg::Skip { block: 3, seq: 9 },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        let mut payload = Vec::new();
        for m in all_messages() {
            let args = encode(&m, &mut payload);
            assert_eq!(decode::<u64>(&args, &payload), Some(m));
        }
    }

    #[test]
    fn garbage_does_not_decode() {
        let mut payload = Vec::new();
        assert_eq!(decode::<u64>(&[0, 1, 2, 3], &[]), None);
        assert_eq!(decode::<u64>(&[16, 1, 2, 3], &[]), None);
        assert_eq!(decode::<u64>(&[1, 2], &[]), None);
        // A flag that is not 0/1, a sequence number that does not fit, a short payload.
        assert_eq!(decode::<u64>(&[2, 1, 7, 0], &[]), None);
        assert_eq!(decode::<u64>(&[7, 1, 1 << 40, 0], &[]), None);
        assert_eq!(decode::<u64>(&[11, 1, 0, 0], &[1, 2, 3]), None);
        // A message without data that carries a payload.
        let args = encode(&Msg::<u64>::ReadReq { block: 1 }, &mut payload);
        assert_eq!(decode::<u64>(&args, &[0]), None);
    }

    #[test]
    fn blocks_spread_over_shards() {
        let mut n = [0usize; 4];
        for b in 0..4000u64 {
            n[shard_of(b, 4)] += 1;
        }
        assert!(n.iter().all(|c| (800..1200).contains(c)), "{n:?}");
    }
}
