//! The sans-IO engine: connections, reliability, fragmentation, request/reply bookkeeping.
//!
//! [`Core`] does no IO and reads no clock. A driver feeds it datagrams
//! ([`Core::handle_datagram`]) and time ([`Core::handle_timeout`]), and takes out what it
//! must transmit ([`Core::outbox`]) and what handlers must run (the events that `Endpoint`
//! dispatches).
//!
//! Per peer (one remote endpoint) it keeps one connection: a handshake that carries the
//! protocol version, the virtual network and both incarnation numbers; on transports that
//! are not reliable, sequence numbers, cumulative plus selective acknowledgements,
//! retransmission with an adaptive timeout, duplicate suppression and a bounded reorder
//! buffer. Each direction of a connection opens with its own HELLO, which names the first
//! sequence number, so a packet of an earlier life of the connection is a duplicate.
//!
//! The parts: the state and the send API here; connections and the handshake (`peer.rs`);
//! request/reply, delegation and gather (`rpc.rs`); the receive path (`receive.rs`);
//! acknowledgements, timers and upcalls (`reliable.rs`); the window and transmission
//! (`flow.rs`).

mod flow;
mod peer;
mod receive;
mod reliable;
mod rpc;

use crate::api::{
    Body, GatherReply, GatherResult, Msg, MsgId, ReplyToken, RequestId, Undeliverable,
};
use crate::error::{AmError, ErrorCode};
use crate::transport::{BulkWrite, Capabilities, Transmit};
use crate::types::{Config, EndpointName, Stats, Tag, Time, MAX_ARGS};
use crate::wire::{self, Class, Common, Frame, MsgHeader, MsgKind, Packet, TokenWire};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;

/// Largest receive window (the selective-ack bitmap covers this many packets).
pub const MAX_WINDOW: u32 = (wire::SACK_WORDS * 64) as u32;
/// Packet buffers kept for reuse.
pub const POOL_BUFFERS: usize = 512;
/// In-order packets that make an acknowledgement leave at once instead of delayed.
const ACK_EVERY: u32 = 8;
/// Earlier incarnations remembered per peer.
const RETIRED_INCARNATIONS: usize = 4;
/// A peer counts as active for rate matching if it sent data this recently.
const ACTIVE_NS: u64 = 50_000_000;

/// A gather completion, run once when every member has a result.
pub(crate) type GatherFn = Box<dyn FnOnce(&mut crate::Ctx<'_>, Vec<GatherResult>) + Send>;

/// What the engine hands to the endpoint to run.
pub(crate) enum Event {
    /// Run a request or one-way handler, or a reply handler.
    Deliver(Delivery),
    /// Run the error upcall.
    Upcall(Undeliverable),
    /// Run a gather completion.
    GatherDone(GatherFn, Vec<GatherResult>),
    /// A bulk message's source ranges may be reused.
    BulkFree(MsgId),
}

/// A message ready for its handler.
pub(crate) struct Delivery {
    pub from: SocketAddr,
    pub kind: MsgKind,
    pub handler: u16,
    pub args: [u64; MAX_ARGS],
    pub nargs: usize,
    pub payload: Vec<u8>,
    /// The payload was not copied: it is `(offset, len)` of the datagram being received,
    /// and the endpoint runs the handler before that datagram's buffer is given back
    /// (see [`Core::handle_datagram_inline`]). `payload` is empty then.
    pub inline: Option<(usize, usize)>,
    pub bulk: Option<(u64, usize)>,
    pub token: Option<ReplyToken>,
    pub request: Option<RequestId>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SendState {
    Idle,
    Connecting { since: Time, last_hello: Time },
    Open,
}

/// A message queued or in flight to one peer.
struct OutMsg {
    id: u64,
    hdr: MsgHeader,
    args: [u64; MAX_ARGS],
    token: Option<TokenWire>,
    payload: Vec<u8>,
    bulk_src: Vec<(usize, usize)>,
    /// Payload bytes already packetised.
    sent: usize,
    first_sent: bool,
    /// Sequence number of its last fragment, once fully packetised.
    last_seq: u64,
}

impl OutMsg {
    fn total(&self) -> usize {
        self.hdr.total_len as usize
    }
    fn bytes_held(&self) -> usize {
        self.payload.capacity() + std::mem::size_of::<OutMsg>()
    }
}

struct SentPkt {
    seq: u64,
    bytes: Vec<u8>,
    sent_at: Time,
    retx: u32,
    sacked: bool,
}

struct Reassembly {
    hdr: MsgHeader,
    args: [u64; MAX_ARGS],
    token: Option<TokenWire>,
    verdict: Result<(), ErrorCode>,
    buf: Vec<u8>,
    received: usize,
    /// The payload left in the datagram being received (`Delivery::inline`).
    inline: Option<(usize, usize)>,
}

struct Peer {
    addr: SocketAddr,
    remote_inc: u64,
    /// Incarnations this peer had before (late packets from them are stale).
    retired: VecDeque<u64>,
    // Receive direction.
    rx_valid: bool,
    rx_next: u64,
    rx_buf: BTreeMap<u64, Vec<u8>>,
    reasm: Option<Reassembly>,
    ack_needed: bool,
    /// Send the acknowledgement in this flush (out of order, duplicate, or many pending).
    ack_now: bool,
    /// Otherwise send it by then (delayed acknowledgement), unless data carries it first.
    ack_deadline: Time,
    /// In-order packets received since the last acknowledgement left.
    rx_since_ack: u32,
    last_rx: Time,
    // Send direction.
    state: SendState,
    next_seq: u64,
    acked: u64,
    remote_window: u32,
    unacked: VecDeque<SentPkt>,
    queue: VecDeque<OutMsg>,
    inflight: VecDeque<OutMsg>,
    srtt_ns: u64,
    rttvar_ns: u64,
    backoff: u32,
    last_progress: Time,
    rto_at: Option<Time>,
}

impl Peer {
    fn new(addr: SocketAddr) -> Peer {
        Peer {
            addr,
            remote_inc: 0,
            retired: VecDeque::new(),
            rx_valid: false,
            rx_next: 1,
            rx_buf: BTreeMap::new(),
            reasm: None,
            ack_needed: false,
            ack_now: false,
            ack_deadline: Time(0),
            rx_since_ack: 0,
            last_rx: Time(0),
            state: SendState::Idle,
            next_seq: 1,
            acked: 1,
            remote_window: 8,
            unacked: VecDeque::new(),
            queue: VecDeque::new(),
            inflight: VecDeque::new(),
            srtt_ns: 0,
            rttvar_ns: 0,
            backoff: 0,
            last_progress: Time(0),
            rto_at: None,
        }
    }

    fn rto_ns(&self, cfg: &Config) -> u64 {
        let base = if self.srtt_ns == 0 {
            cfg.min_rto.as_nanos() as u64 * 2
        } else {
            self.srtt_ns + 4 * self.rttvar_ns
        };
        let base = base.clamp(cfg.min_rto.as_nanos() as u64, cfg.max_rto.as_nanos() as u64);
        (base << self.backoff.min(6)).min(cfg.max_rto.as_nanos() as u64)
    }

    fn in_flight(&self) -> u64 {
        self.next_seq - self.acked
    }

    fn held_bytes(&self) -> usize {
        let q: usize = self.queue.iter().map(OutMsg::bytes_held).sum();
        let f: usize = self.inflight.iter().map(OutMsg::bytes_held).sum();
        let u: usize = self.unacked.iter().map(|p| p.bytes.capacity() + 48).sum();
        let r: usize = self.rx_buf.values().map(|b| b.capacity() + 48).sum();
        let a = self.reasm.as_ref().map_or(0, |r| r.buf.capacity());
        q + f + u + r + a
    }
}

struct ReqState {
    dest: EndpointName,
    deadline: Time,
    gather: Option<(u64, usize)>,
    msg_id: u64,
    handler: u16,
    args: Vec<u64>,
}

struct GatherState {
    results: Vec<Option<GatherResult>>,
    remaining: usize,
    completion: GatherFn,
}

/// The sans-IO engine of one endpoint.
pub struct Core {
    pub(crate) cfg: Config,
    caps: Capabilities,
    local: SocketAddr,
    inc: u64,
    now: Time,
    translations: Vec<Option<(EndpointName, Tag)>>,
    pub(crate) handler_present: Vec<bool>,
    peers: BTreeMap<SocketAddr, Peer>,
    pub(crate) segment: Vec<u8>,
    outbox: VecDeque<Transmit>,
    events: VecDeque<Event>,
    requests: HashMap<u64, ReqState, IdHasher>,
    deadlines: BTreeSet<(Time, u64)>,
    gathers: HashMap<u64, GatherState>,
    next_req: u64,
    next_gather: u64,
    next_msg: u64,
    pub(crate) stats: Stats,
    closed: bool,
    /// Something may be sendable: set by every input, send and timeout; cleared by flush.
    flush_needed: bool,
    /// Packet buffers to reuse (at most `POOL_BUFFERS`), so the data path does not call
    /// the allocator per packet.
    pool: Vec<Vec<u8>>,
    /// The receive window advertised by the last flush.
    last_window: u32,
    /// While `handle_datagram_inline` runs: the address and length of its datagram.
    inline_datagram: Option<(usize, usize)>,
    /// The frame being processed is the datagram just received (not one from the reorder
    /// buffer), so its payload may stay where it is.
    frame_direct: bool,
    /// An inline delivery was queued: the endpoint must dispatch before the datagram goes.
    inline_queued: bool,
}

impl Core {
    /// A new engine for the endpoint at `local`, with `seed` for its incarnation number.
    pub fn new(cfg: Config, caps: Capabilities, local: SocketAddr, seed: u64) -> Core {
        let mut cfg = cfg;
        cfg.recv_window_packets = cfg
            .recv_window_packets
            .min(caps.max_window)
            .clamp(4, MAX_WINDOW);
        cfg.recv_budget_packets = cfg.recv_budget_packets.max(4);
        // A delayed acknowledgement must never look like a loss to the sender.
        cfg.ack_delay = cfg.ack_delay.min(cfg.min_rto / 4);
        let mut x = seed ^ 0x9e37_79b9_7f4a_7c15;
        let inc = loop {
            x = splitmix(x);
            if x != 0 {
                break x;
            }
        };
        Core {
            translations: vec![None; cfg.translations],
            handler_present: vec![false; cfg.handlers],
            segment: vec![0; cfg.segment_bytes],
            cfg,
            caps,
            local,
            inc,
            now: Time(0),
            peers: BTreeMap::new(),
            outbox: VecDeque::new(),
            events: VecDeque::new(),
            requests: HashMap::default(),
            deadlines: BTreeSet::new(),
            gathers: HashMap::new(),
            next_req: 1,
            next_gather: 1,
            next_msg: 1,
            stats: Stats::default(),
            closed: false,
            flush_needed: false,
            pool: Vec::new(),
            last_window: MAX_WINDOW,
            inline_datagram: None,
            frame_direct: false,
            inline_queued: false,
        }
    }

    /// This endpoint's name.
    pub fn name(&self) -> EndpointName {
        EndpointName {
            addr: self.local,
            vnet: self.cfg.vnet,
        }
    }

    /// This endpoint's incarnation number.
    pub fn incarnation(&self) -> u64 {
        self.inc
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Sets the time before a batch of inputs.
    pub fn set_now(&mut self, now: Time) {
        if now > self.now {
            self.now = now;
        }
    }

    /// Enters `name` (with its `tag`) at `index` of the translation table.
    pub fn map(&mut self, index: u16, name: EndpointName, tag: Tag) -> Result<(), AmError> {
        if name.vnet != self.cfg.vnet {
            return Err(AmError::OtherVirtualNetwork {
                name: name.to_string(),
                ours: self.cfg.vnet,
                theirs: name.vnet,
            });
        }
        let slot = self
            .translations
            .get_mut(index as usize)
            .ok_or(AmError::BadIndex(index))?;
        *slot = Some((name, tag));
        Ok(())
    }

    /// Declares whether a handler is installed at `index` (the endpoint does this on
    /// `register`; messages for an absent handler are returned with `NoHandler`).
    pub fn set_handler_present(&mut self, index: u16, present: bool) {
        if let Some(h) = self.handler_present.get_mut(index as usize) {
            *h = present;
        }
    }

    /// Removes the entry at `index`.
    pub fn unmap(&mut self, index: u16) {
        if let Some(s) = self.translations.get_mut(index as usize) {
            *s = None;
        }
    }

    /// Bytes this engine holds in queues and buffers now.
    pub fn memory_in_use(&self) -> usize {
        self.peers.values().map(Peer::held_bytes).sum::<usize>()
            + self
                .outbox
                .iter()
                .map(|t| t.bytes.capacity())
                .sum::<usize>()
            + self.pool.iter().map(Vec::capacity).sum::<usize>()
    }

    /// The most bytes held for one peer: the send queue of full mediums (twice, for owed
    /// replies and bounces), a window of packets awaiting acknowledgement, the receive
    /// window and one medium being reassembled. [`Core::memory_in_use`] stays under
    /// `peers * memory_bound_per_peer()` plus the packet pool (512 buffers of one datagram).
    pub fn memory_bound_per_peer(&self) -> usize {
        let msg = self.cfg.max_medium_bytes + std::mem::size_of::<OutMsg>();
        let pkt = self.caps.max_datagram + 48;
        // Bounces to a misbehaving peer may use a second queue's worth.
        2 * self.cfg.send_queue_messages * msg
            + MAX_WINDOW as usize * (pkt + msg)
            + self.cfg.recv_window_packets as usize * pkt
            + self.cfg.max_medium_bytes
    }

    fn lookup(&self, index: u16) -> Result<(EndpointName, Tag), AmError> {
        self.translations
            .get(index as usize)
            .copied()
            .flatten()
            .ok_or(AmError::BadIndex(index))
    }

    /// Validates a message and turns it into a queued `OutMsg` (without queueing it).
    fn build(&mut self, kind: MsgKind, msg: &Msg<'_>, dst_tag: u64) -> Result<OutMsg, AmError> {
        if self.closed {
            return Err(AmError::Closed);
        }
        if msg.args.len() > MAX_ARGS {
            return Err(AmError::TooManyArgs(msg.args.len()));
        }
        let mut args = [0u64; MAX_ARGS];
        args[..msg.args.len()].copy_from_slice(msg.args);
        let (class, payload, bulk_src, total, bulk_off) = match msg.body {
            Body::Small => (Class::Small, Vec::new(), Vec::new(), 0usize, 0u64),
            Body::Medium(slices) => {
                let len: usize = slices.iter().map(|s| s.len()).sum();
                if len > self.cfg.max_medium_bytes {
                    return Err(AmError::TooLarge {
                        len,
                        max: self.cfg.max_medium_bytes,
                    });
                }
                let mut p = Vec::with_capacity(len);
                for s in slices {
                    p.extend_from_slice(s);
                }
                (Class::Medium, p, Vec::new(), len, 0)
            }
            Body::Bulk { src, dst_offset } => {
                let mut len = 0usize;
                for &(off, l) in src {
                    let end = off.saturating_add(l);
                    if end > self.segment.len() {
                        return Err(AmError::SourceOutOfSegment {
                            start: off,
                            end,
                            segment: self.segment.len(),
                        });
                    }
                    len += l;
                }
                if len > u32::MAX as usize {
                    return Err(AmError::TooLarge {
                        len,
                        max: u32::MAX as usize,
                    });
                }
                (Class::Bulk, Vec::new(), src.to_vec(), len, dst_offset)
            }
        };
        let id = self.next_msg;
        self.next_msg += 1;
        Ok(OutMsg {
            id,
            hdr: MsgHeader {
                kind,
                class,
                handler: msg.handler,
                code: 0,
                orig_kind: MsgKind::Oneway,
                dst_tag,
                src_tag: self.cfg.tag.0,
                req_id: 0,
                total_len: total as u32,
                orig_len: 0,
                bulk_off,
                token_inc: 0,
                msg_id: id,
                nargs: msg.args.len() as u8,
            },
            args,
            token: None,
            payload,
            bulk_src,
            sent: 0,
            first_sent: false,
            last_seq: 0,
        })
    }

    fn queue_room(&self, addr: SocketAddr) -> bool {
        self.peers
            .get(&addr)
            .is_none_or(|p| p.queue.len() < self.cfg.send_queue_messages)
    }

    fn enqueue(&mut self, addr: SocketAddr, m: OutMsg) {
        self.flush_needed = true;
        let peer = self.peers.entry(addr).or_insert_with(|| Peer::new(addr));
        peer.queue.push_back(m);
    }

    /// Sends a one-way message to the endpoint at `index`.
    pub fn send(&mut self, index: u16, msg: &Msg<'_>) -> Result<MsgId, AmError> {
        let (name, tag) = self.lookup(index)?;
        if !self.queue_room(name.addr) {
            return Err(AmError::WouldBlock);
        }
        let m = self.build(MsgKind::Oneway, msg, tag.0)?;
        let id = MsgId(m.id);
        self.enqueue(name.addr, m);
        Ok(id)
    }

    /// Marks the endpoint closed: later sends fail with `Closed`.
    pub fn close(&mut self) {
        self.closed = true;
    }

    /// True if there is nothing queued or unacknowledged towards any peer.
    pub fn is_idle(&self) -> bool {
        self.outbox.is_empty()
            && self.events.is_empty()
            && self
                .peers
                .values()
                .all(|p| p.queue.is_empty() && p.inflight.is_empty() && p.unacked.is_empty())
    }

    fn push_packet(&mut self, to: SocketAddr, bytes: Vec<u8>) {
        self.push_packet_with(to, bytes, None);
    }

    fn push_packet_with(&mut self, to: SocketAddr, bytes: Vec<u8>, bulk: Option<BulkWrite>) {
        self.stats.packets_sent += 1;
        self.stats.bytes_sent += bytes.len() as u64 + bulk.as_ref().map_or(0, |b| b.len as u64);
        self.outbox.push_back(Transmit { to, bytes, bulk });
    }

    /// The next thing for the endpoint to run.
    pub(crate) fn next_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Queues an upcall for a message that failed before reaching the wire.
    pub(crate) fn local_upcall(&mut self, u: Undeliverable) {
        self.upcall(u);
    }
}

/// A cleared buffer from the pool (or a new one with room for `cap` bytes).
fn pool_take(pool: &mut Vec<Vec<u8>>, cap: usize) -> Vec<u8> {
    match pool.pop() {
        Some(mut v) => {
            v.reserve(cap);
            v
        }
        None => Vec::with_capacity(cap),
    }
}

/// Returns a buffer to the pool (dropped when the pool is full).
fn pool_give(pool: &mut Vec<Vec<u8>>, mut v: Vec<u8>) {
    if pool.len() < POOL_BUFFERS && v.capacity() <= 1 << 17 {
        v.clear();
        pool.push(v);
    }
}

/// Appends `len` bytes starting `skip` bytes into the concatenation of `ranges` of `seg`.
fn copy_ranges(seg: &[u8], ranges: &[(usize, usize)], skip: usize, len: usize, out: &mut Vec<u8>) {
    let mut skip = skip;
    let mut left = len;
    for &(off, l) in ranges {
        if left == 0 {
            break;
        }
        if skip >= l {
            skip -= l;
            continue;
        }
        let start = off + skip;
        let n = (l - skip).min(left);
        out.extend_from_slice(&seg[start..start + n]);
        left -= n;
        skip = 0;
    }
}

/// Hashes the engine's own sequential ids (request ids): a multiply is enough, and SipHash
/// showed up in profiles.
#[derive(Clone, Copy, Default)]
pub struct IdHasher;

impl std::hash::BuildHasher for IdHasher {
    type Hasher = IdHash;
    fn build_hasher(&self) -> IdHash {
        IdHash(0)
    }
}

/// The hasher of [`IdHasher`].
pub struct IdHash(u64);

impl std::hash::Hasher for IdHash {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(5) ^ *b as u64).wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0 ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A step of the splitmix64 generator.
pub fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
