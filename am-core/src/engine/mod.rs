//! The sans-IO engine: connections, reliability, fragmentation, request/reply bookkeeping.
//!
//! [`Core`] does no IO and reads no clock. A driver feeds it datagrams
//! ([`Core::handle_datagram`]) and time ([`Core::handle_timeout`]), and takes out what it
//! must transmit ([`Core::outbox`]) and what handlers must run (the events that `Endpoint` dispatches).
//!
//! Per peer (one remote endpoint) it keeps one connection: a handshake that carries the
//! protocol version, the virtual network and both incarnation numbers; on transports that
//! are not reliable, sequence numbers, cumulative plus selective acknowledgements,
//! retransmission with an adaptive timeout, duplicate suppression and a bounded reorder
//! buffer. Each direction of a connection opens with its own HELLO, which names the first
//! sequence number, so a packet of an earlier life of the connection is a duplicate.

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

    fn new_request(
        &mut self,
        name: EndpointName,
        tag: Tag,
        msg: &Msg<'_>,
        gather: Option<(u64, usize)>,
    ) -> Result<RequestId, AmError> {
        if self.requests.len() >= self.cfg.max_outstanding_requests {
            return Err(AmError::TooManyRequests(self.requests.len()));
        }
        if !self.queue_room(name.addr) {
            return Err(AmError::WouldBlock);
        }
        let mut m = self.build(MsgKind::Request, msg, tag.0)?;
        let req = self.next_req;
        self.next_req += 1;
        m.hdr.req_id = req;
        let deadline = self.now.plus(self.cfg.request_timeout);
        self.requests.insert(
            req,
            ReqState {
                dest: name,
                deadline,
                gather,
                msg_id: m.id,
                handler: msg.handler,
                args: msg.args.to_vec(),
            },
        );
        self.deadlines.insert((deadline, req));
        self.stats.requests_sent += 1;
        self.enqueue(name.addr, m);
        Ok(RequestId(req))
    }

    /// Sends a request to the endpoint at `index`; its handler gets a reply token.
    pub fn request(&mut self, index: u16, msg: &Msg<'_>) -> Result<RequestId, AmError> {
        let (name, tag) = self.lookup(index)?;
        self.new_request(name, tag, msg, None)
    }

    /// Replies to the requester named by `token` (consumed: at most one reply).
    pub fn reply(&mut self, token: ReplyToken, msg: &Msg<'_>) -> Result<MsgId, AmError> {
        let mut m = self.build(MsgKind::Reply, msg, token.tag)?;
        m.hdr.req_id = token.req_id;
        m.hdr.token_inc = token.inc;
        // A reply is owed: it may exceed the queue bound, up to twice it (a requester that
        // never acknowledges cannot make us hold replies without bound).
        let hard_cap = 2 * self.cfg.send_queue_messages;
        if self
            .peers
            .get(&token.addr)
            .is_some_and(|p| p.queue.len() >= hard_cap)
        {
            return Err(AmError::WouldBlock);
        }
        let id = MsgId(m.id);
        self.stats.replies_sent += 1;
        self.enqueue(token.addr, m);
        Ok(id)
    }

    /// Passes `token` on with a new request to the endpoint at `index`; whoever ends up
    /// holding the token replies straight to the original requester.
    pub fn delegate(
        &mut self,
        token: ReplyToken,
        index: u16,
        msg: &Msg<'_>,
    ) -> Result<MsgId, (AmError, ReplyToken)> {
        let (name, tag) = match self.lookup(index) {
            Ok(x) => x,
            Err(e) => return Err((e, token)),
        };
        if !self.queue_room(name.addr) {
            return Err((AmError::WouldBlock, token));
        }
        let mut m = match self.build(MsgKind::Request, msg, tag.0) {
            Ok(m) => m,
            Err(e) => return Err((e, token)),
        };
        m.token = Some(TokenWire {
            addr: token.addr,
            tag: token.tag,
            req_id: token.req_id,
            inc: token.inc,
        });
        let id = MsgId(m.id);
        self.stats.delegations += 1;
        self.enqueue(name.addr, m);
        Ok(id)
    }

    /// Sends one request per target and runs `completion` once with every result in
    /// target order.
    pub(crate) fn gather(
        &mut self,
        targets: &[(u16, Msg<'_>)],
        completion: GatherFn,
    ) -> Result<(), AmError> {
        if self.requests.len() + targets.len() > self.cfg.max_outstanding_requests {
            return Err(AmError::TooManyRequests(self.requests.len()));
        }
        let mut resolved = Vec::with_capacity(targets.len());
        for (index, _) in targets {
            let (name, tag) = self.lookup(*index)?;
            if !self.queue_room(name.addr) {
                return Err(AmError::WouldBlock);
            }
            resolved.push((name, tag));
        }
        let gid = self.next_gather;
        self.next_gather += 1;
        self.gathers.insert(
            gid,
            GatherState {
                results: vec![None; targets.len()],
                remaining: targets.len(),
                completion,
            },
        );
        for (slot, ((name, tag), (_, msg))) in resolved.into_iter().zip(targets).enumerate() {
            if let Err(e) = self.new_request(name, tag, msg, Some((gid, slot))) {
                // Validation failed for this member: it completes with an error now.
                let code = match e {
                    AmError::WouldBlock | AmError::TooManyRequests(_) => ErrorCode::Congested,
                    _ => ErrorCode::NoHandler,
                };
                self.gather_fill(gid, slot, Err(code));
            }
        }
        if targets.is_empty() {
            self.gather_fill(gid, usize::MAX, Err(ErrorCode::NoEndpoint));
        }
        Ok(())
    }

    fn gather_fill(&mut self, gid: u64, slot: usize, r: GatherResult) {
        let done = match self.gathers.get_mut(&gid) {
            Some(g) => {
                if let Some(s) = g.results.get_mut(slot) {
                    if s.is_none() {
                        *s = Some(r);
                        g.remaining -= 1;
                    }
                }
                g.remaining == 0
            }
            None => false,
        };
        if done {
            if let Some(g) = self.gathers.remove(&gid) {
                let results = g
                    .results
                    .into_iter()
                    .map(|r| r.unwrap_or(Err(ErrorCode::Unreachable)))
                    .collect();
                self.events
                    .push_back(Event::GatherDone(g.completion, results));
            }
        }
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

    /// Outstanding requests.
    pub fn outstanding_requests(&self) -> usize {
        self.requests.len()
    }

    // ------------------------------------------------------------------------------------
    // Input.

    /// Handles one received datagram. Bad input is counted and dropped.
    /// As [`Core::handle_datagram`], but a medium message that arrives whole and in order
    /// is not copied: its delivery names its payload's place in `bytes`, and
    /// [`Core::take_inline_queued`] says so. The caller must then run every queued event
    /// before `bytes` goes away (the endpoint does, inside the transport's receive call, so
    /// a handler reads the transport's buffer: an mbuf, a registered receive buffer).
    pub(crate) fn handle_datagram_inline(&mut self, from: SocketAddr, bytes: &[u8]) {
        self.inline_datagram = Some((bytes.as_ptr() as usize, bytes.len()));
        self.handle_datagram(from, bytes);
        self.inline_datagram = None;
    }

    /// Whether an inline delivery was queued since the last call (and clears it).
    pub(crate) fn take_inline_queued(&mut self) -> bool {
        std::mem::take(&mut self.inline_queued)
    }

    pub fn handle_datagram(&mut self, from: SocketAddr, bytes: &[u8]) {
        self.flush_needed = true;
        self.stats.packets_received += 1;
        // Another version is answered from the fixed common header alone: the rest of its
        // packets may be laid out differently.
        let common = match wire::parse_common(bytes) {
            Ok(c) => c,
            Err(_) => {
                self.stats.malformed_dropped += 1;
                return;
            }
        };
        if common.version != self.cfg.protocol_version {
            match common.kind {
                wire::kind::HELLO => self.send_refused(from, common.src_inc, wire::refuse::VERSION),
                wire::kind::REFUSED
                    if bytes.get(wire::COMMON_LEN) == Some(&wire::refuse::VERSION) =>
                {
                    self.on_refused(from, common, wire::refuse::VERSION)
                }
                _ => self.stats.malformed_dropped += 1,
            }
            return;
        }
        let pkt = match wire::parse_packet(bytes) {
            Ok(p) => p,
            Err(_) => {
                self.stats.malformed_dropped += 1;
                return;
            }
        };
        match pkt {
            Packet::Hello {
                common,
                window,
                start_seq,
            } => self.on_hello(from, common, window, start_seq),
            Packet::Refused { common, reason } => self.on_refused(from, common, reason),
            Packet::Data {
                common,
                seq,
                ack,
                window,
                frame,
            } => self.on_data(from, common, seq, ack, window, frame),
            Packet::Ack {
                common,
                ack,
                window,
                sack,
            } => {
                let known = common.dst_inc == self.inc
                    && self
                        .peers
                        .get(&from)
                        .is_some_and(|p| p.remote_inc == common.src_inc);
                if !known {
                    self.stats.stale_dropped += 1;
                    return;
                }
                self.on_ack(from, ack, window, Some(&sack));
            }
            Packet::Reset { common, echo } => self.on_reset(from, common, echo),
        }
    }

    fn common(&self, kind: u8, dst_inc: u64) -> Common {
        Common {
            version: self.cfg.protocol_version,
            kind,
            vnet: self.cfg.vnet,
            src_inc: self.inc,
            dst_inc,
        }
    }

    fn push_packet(&mut self, to: SocketAddr, bytes: Vec<u8>) {
        self.push_packet_with(to, bytes, None);
    }

    fn push_packet_with(&mut self, to: SocketAddr, bytes: Vec<u8>, bulk: Option<BulkWrite>) {
        self.stats.packets_sent += 1;
        self.stats.bytes_sent += bytes.len() as u64 + bulk.as_ref().map_or(0, |b| b.len as u64);
        self.outbox.push_back(Transmit { to, bytes, bulk });
    }

    /// The transport moved data towards `addr` (`Transport::take_progress`) at time `at`:
    /// the peer's unreachable clock restarts there, as if it had acknowledged.
    pub fn peer_progressed(&mut self, addr: SocketAddr, at: Time) {
        let now = self.now.max(at);
        match self.peers.get_mut(&addr) {
            Some(p) if p.state == SendState::Open => p.last_progress = p.last_progress.max(now),
            Some(p) => {
                if let SendState::Connecting { last_hello, .. } = p.state {
                    p.state = SendState::Connecting {
                        since: now,
                        last_hello,
                    };
                }
            }
            None => {}
        }
    }

    /// The transport lost the path to `addr` (a queue pair error, or a connection replaced
    /// because the peer restarted): what was sent on it may be lost, so every message sent
    /// and not acknowledged returns through the upcall as `Unreachable`. Queued messages
    /// stay; the send direction re-opens with a HELLO.
    pub fn peer_failed(&mut self, addr: SocketAddr) {
        self.fail_sent(addr, ErrorCode::Unreachable);
        // What is still queued re-opens the connection at the next flush.
        self.flush_needed = true;
    }

    fn send_refused(&mut self, to: SocketAddr, dst_inc: u64, reason: u8) {
        let mut b = Vec::with_capacity(32);
        wire::encode_packet(
            &mut b,
            &Packet::Refused {
                common: self.common(wire::kind::REFUSED, dst_inc),
                reason,
            },
        );
        self.push_packet(to, b);
    }

    /// Sends HELLO (open our direction) or HELLO_ACK (answer one).
    fn send_hello(&mut self, to: SocketAddr, kind: u8, dst_inc: u64, start_seq: u64) {
        let window = self.advertised_window();
        let mut b = Vec::with_capacity(40);
        wire::encode_packet(
            &mut b,
            &Packet::Hello {
                common: self.common(kind, dst_inc),
                window,
                start_seq,
            },
        );
        self.push_packet(to, b);
    }

    fn on_hello(&mut self, from: SocketAddr, common: Common, window: u32, start_seq: u64) {
        if start_seq == 0 || common.src_inc == 0 {
            self.stats.malformed_dropped += 1;
            return;
        }
        if common.vnet != self.cfg.vnet {
            if common.kind == wire::kind::HELLO {
                self.send_refused(from, common.src_inc, wire::refuse::VNET);
            } else {
                self.stats.stale_dropped += 1;
            }
            return;
        }
        if common.kind == wire::kind::HELLO_ACK && common.dst_inc != self.inc {
            self.stats.stale_dropped += 1;
            return;
        }
        let peer = self.peers.entry(from).or_insert_with(|| Peer::new(from));
        if peer.retired.contains(&common.src_inc) {
            // A late packet of an incarnation that has since been replaced.
            self.stats.stale_dropped += 1;
            return;
        }
        let known = peer.remote_inc;
        if known != 0 && known != common.src_inc {
            // A new incarnation: nothing sent to the old one may reach it.
            self.fail_sent(from, ErrorCode::Unreachable);
            if let Some(p) = self.peers.get_mut(&from) {
                if p.retired.len() >= RETIRED_INCARNATIONS {
                    p.retired.pop_front();
                }
                p.retired.push_back(known);
                p.rx_valid = false;
                p.rx_buf.clear();
                p.reasm = None;
            }
        }
        let now = self.now;
        let window = window.clamp(1, MAX_WINDOW);
        let Some(p) = self.peers.get_mut(&from) else {
            return;
        };
        p.remote_inc = common.src_inc;
        p.remote_window = window;
        let reply_needed = common.kind == wire::kind::HELLO;
        if common.kind == wire::kind::HELLO {
            if !p.rx_valid {
                p.rx_valid = true;
                p.rx_next = start_seq;
                p.rx_buf.clear();
                p.reasm = None;
            } else if start_seq > p.rx_next {
                // The sender gave up on (and returned) everything before start_seq.
                p.rx_next = start_seq;
                let keep = p.rx_buf.split_off(&start_seq);
                p.rx_buf = keep;
                p.reasm = None;
            }
        } else if let SendState::Connecting { .. } = p.state {
            p.state = SendState::Open;
            p.last_progress = now;
            p.backoff = 0;
            self.stats.handshakes += 1;
        }
        if reply_needed {
            let next = self.peers.get(&from).map_or(1, |p| p.next_seq);
            self.send_hello(from, wire::kind::HELLO_ACK, common.src_inc, next);
        }
    }

    fn on_refused(&mut self, from: SocketAddr, common: Common, reason: u8) {
        if common.dst_inc != self.inc {
            self.stats.stale_dropped += 1;
            return;
        }
        let connecting = self
            .peers
            .get(&from)
            .is_some_and(|p| matches!(p.state, SendState::Connecting { .. }));
        if !connecting {
            self.stats.stale_dropped += 1;
            return;
        }
        let code = if reason == wire::refuse::VERSION {
            ErrorCode::VersionMismatch {
                local: self.cfg.protocol_version,
                remote: common.version,
            }
        } else {
            ErrorCode::NoEndpoint
        };
        self.fail_all(from, code);
    }

    fn on_reset(&mut self, from: SocketAddr, common: Common, echo: u64) {
        if common.dst_inc != self.inc {
            self.stats.stale_dropped += 1;
            return;
        }
        let matches = self.peers.get(&from).is_some_and(|p| {
            p.remote_inc != 0 && p.remote_inc == echo && p.state == SendState::Open
        });
        if matches {
            self.fail_all(from, ErrorCode::Unreachable);
        } else {
            self.stats.stale_dropped += 1;
        }
    }

    fn conn_matches(&self, from: SocketAddr, common: &Common) -> bool {
        common.dst_inc == self.inc
            && self
                .peers
                .get(&from)
                .is_some_and(|p| p.remote_inc == common.src_inc && p.rx_valid)
    }

    fn on_data(
        &mut self,
        from: SocketAddr,
        common: Common,
        seq: u64,
        ack: u64,
        window: u32,
        frame: &[u8],
    ) {
        if !self.conn_matches(from, &common) {
            self.stats.stale_dropped += 1;
            if common.src_inc != 0 {
                let mut b = Vec::with_capacity(32);
                wire::encode_packet(
                    &mut b,
                    &Packet::Reset {
                        common: self.common(wire::kind::RESET, common.src_inc),
                        echo: common.dst_inc,
                    },
                );
                self.push_packet(from, b);
            }
            return;
        }
        self.on_ack(from, ack, window, None);
        let now = self.now;
        let max_window = self.cfg.recv_window_packets as u64;
        let dedup_off = self.cfg.testing_disable_dedup;
        let ack_delay = self.cfg.ack_delay;
        let window_now = self.last_window;
        let Some(p) = self.peers.get_mut(&from) else {
            return;
        };
        if !p.ack_needed {
            p.ack_needed = true;
            p.ack_deadline = now.plus(ack_delay);
        }
        p.last_rx = now;
        if seq != p.rx_next || !p.rx_buf.is_empty() {
            // Duplicates, gaps, packets beyond the window and a packet that fills a gap
            // are answered at once, so a sender in recovery learns quickly.
            p.ack_now = true;
        } else {
            p.rx_since_ack += 1;
            // With a small window (many active peers) half of it must not wait for the
            // delayed acknowledgement, or the sender stalls.
            if p.rx_since_ack >= ACK_EVERY.min((window_now / 2).max(1)) {
                p.ack_now = true;
            }
        }
        if seq < p.rx_next {
            self.stats.duplicates_dropped += 1;
            if dedup_off {
                let f = frame.to_vec();
                self.process_frame(from, &f);
            }
            return;
        }
        if seq >= p.rx_next + max_window {
            self.stats.window_dropped += 1;
            return;
        }
        if seq > p.rx_next {
            if let std::collections::btree_map::Entry::Vacant(e) = p.rx_buf.entry(seq) {
                e.insert(frame.to_vec());
                self.stats.reordered += 1;
            } else {
                self.stats.duplicates_dropped += 1;
            }
            return;
        }
        p.rx_next += 1;
        self.frame_direct = true;
        self.process_frame(from, frame);
        self.frame_direct = false;
        loop {
            let Some(p) = self.peers.get_mut(&from) else {
                return;
            };
            let next = p.rx_next;
            match p.rx_buf.remove(&next) {
                Some(f) => {
                    p.rx_next += 1;
                    self.process_frame(from, &f);
                }
                None => break,
            }
        }
    }

    fn verdict(&self, hdr: &MsgHeader) -> Result<(), ErrorCode> {
        if hdr.dst_tag != self.cfg.tag.0 {
            return Err(ErrorCode::BadTag);
        }
        match hdr.class {
            Class::Medium if hdr.total_len as usize > self.cfg.max_medium_bytes => {
                return Err(ErrorCode::Congested)
            }
            Class::Bulk if hdr.kind != MsgKind::Bounce => {
                let end = hdr.bulk_off.checked_add(hdr.total_len as u64);
                if end.is_none_or(|e| e > self.segment.len() as u64) {
                    return Err(ErrorCode::SegmentBounds);
                }
            }
            Class::Small if hdr.total_len != 0 => return Err(ErrorCode::Congested),
            _ => {}
        }
        match hdr.kind {
            MsgKind::Oneway | MsgKind::Request => {
                if !self
                    .handler_present
                    .get(hdr.handler as usize)
                    .copied()
                    .unwrap_or(false)
                {
                    return Err(ErrorCode::NoHandler);
                }
            }
            MsgKind::Reply => {
                let Some(r) = self.requests.get(&hdr.req_id) else {
                    return Err(ErrorCode::ReplyRejected);
                };
                if hdr.token_inc != self.inc {
                    return Err(ErrorCode::ReplyRejected);
                }
                if r.gather.is_none()
                    && !self
                        .handler_present
                        .get(hdr.handler as usize)
                        .copied()
                        .unwrap_or(false)
                {
                    return Err(ErrorCode::NoHandler);
                }
            }
            MsgKind::Bounce => {}
        }
        Ok(())
    }

    fn process_frame(&mut self, from: SocketAddr, frame: &[u8]) {
        let parsed = match wire::parse_frame(frame) {
            Ok(f) => f,
            Err(_) => {
                self.stats.malformed_dropped += 1;
                if let Some(p) = self.peers.get_mut(&from) {
                    p.reasm = None;
                }
                return;
            }
        };
        match parsed {
            Frame::First {
                hdr,
                args,
                token,
                payload,
            } => {
                let abandoned = self
                    .peers
                    .get_mut(&from)
                    .and_then(|p| p.reasm.take())
                    .is_some();
                if abandoned {
                    self.stats.malformed_dropped += 1;
                }
                let verdict = self.verdict(&hdr);
                let keep = match hdr.class {
                    Class::Medium => (hdr.total_len as usize) <= self.cfg.max_medium_bytes,
                    Class::Bulk => verdict.is_ok() && hdr.kind != MsgKind::Bounce,
                    Class::Small => false,
                };
                let mut r = Reassembly {
                    hdr,
                    args,
                    token,
                    verdict,
                    buf: Vec::new(),
                    received: 0,
                    inline: None,
                };
                // A medium that arrives whole, in order, for a handler (not a gather, not
                // a bounce) stays in the datagram: no copy.
                if keep
                    && hdr.class == Class::Medium
                    && r.verdict.is_ok()
                    && payload.len() == hdr.total_len as usize
                    && matches!(
                        hdr.kind,
                        MsgKind::Oneway | MsgKind::Request | MsgKind::Reply
                    )
                    && !(hdr.kind == MsgKind::Reply
                        && self
                            .requests
                            .get(&hdr.req_id)
                            .is_none_or(|q| q.gather.is_some()))
                {
                    if let (true, Some((base, len))) = (self.frame_direct, self.inline_datagram) {
                        let off = (payload.as_ptr() as usize).wrapping_sub(base);
                        if off.checked_add(payload.len()).is_some_and(|e| e <= len) {
                            r.inline = Some((off, payload.len()));
                            r.received = payload.len();
                            self.finish_or_park(from, r);
                            return;
                        }
                    }
                }
                if keep && hdr.class == Class::Medium {
                    r.buf.reserve_exact(hdr.total_len as usize);
                }
                if self.caps.bulk_placement
                    && hdr.class == Class::Bulk
                    && hdr.kind != MsgKind::Bounce
                {
                    // The transport placed the data (or, for a refused tag or range, the
                    // sender's transport sent the header alone): no fragments follow.
                    r.received = hdr.total_len as usize;
                }
                self.absorb(&mut r, payload, keep);
                self.finish_or_park(from, r);
            }
            Frame::Cont { frag_off, payload } => {
                let Some(mut r) = self.peers.get_mut(&from).and_then(|p| p.reasm.take()) else {
                    self.stats.malformed_dropped += 1;
                    return;
                };
                if frag_off as usize != r.received
                    || r.received + payload.len() > r.hdr.total_len as usize
                {
                    self.stats.malformed_dropped += 1;
                    return;
                }
                let keep = match r.hdr.class {
                    Class::Medium => (r.hdr.total_len as usize) <= self.cfg.max_medium_bytes,
                    Class::Bulk => r.verdict.is_ok() && r.hdr.kind != MsgKind::Bounce,
                    Class::Small => false,
                };
                self.absorb(&mut r, payload, keep);
                self.finish_or_park(from, r);
            }
        }
    }

    fn absorb(&mut self, r: &mut Reassembly, payload: &[u8], keep: bool) {
        if keep {
            match r.hdr.class {
                Class::Medium => r.buf.extend_from_slice(payload),
                Class::Bulk => {
                    let at = r.hdr.bulk_off as usize + r.received;
                    if let Some(dst) = self.segment.get_mut(at..at + payload.len()) {
                        dst.copy_from_slice(payload);
                    }
                }
                Class::Small => {}
            }
        }
        r.received += payload.len();
    }

    fn finish_or_park(&mut self, from: SocketAddr, r: Reassembly) {
        if r.received < r.hdr.total_len as usize {
            if let Some(p) = self.peers.get_mut(&from) {
                p.reasm = Some(r);
            }
            return;
        }
        self.complete(from, r);
    }

    fn complete(&mut self, from: SocketAddr, r: Reassembly) {
        let Reassembly {
            hdr,
            args,
            token,
            verdict,
            buf,
            inline,
            ..
        } = r;
        if inline.is_some() {
            self.inline_queued = true;
        }
        let vnet = self.cfg.vnet;
        if let Err(code) = verdict {
            match code {
                ErrorCode::BadTag => self.stats.bad_tag_dropped += 1,
                _ => self.stats.messages_rejected += 1,
            }
            if hdr.kind == MsgKind::Bounce {
                return; // never bounce a bounce
            }
            self.bounce(from, &hdr, &args, token, buf, code);
            return;
        }
        let bulk = (hdr.class == Class::Bulk).then_some((hdr.bulk_off, hdr.total_len as usize));
        let source = EndpointName { addr: from, vnet };
        match hdr.kind {
            MsgKind::Oneway | MsgKind::Request => {
                let token = if hdr.kind == MsgKind::Request {
                    Some(match token {
                        Some(t) => ReplyToken {
                            addr: t.addr,
                            vnet,
                            tag: t.tag,
                            req_id: t.req_id,
                            inc: t.inc,
                        },
                        None => ReplyToken {
                            addr: from,
                            vnet,
                            tag: hdr.src_tag,
                            req_id: hdr.req_id,
                            inc: self.peers.get(&from).map_or(0, |p| p.remote_inc),
                        },
                    })
                } else {
                    None
                };
                self.stats.messages_handled += 1;
                self.events.push_back(Event::Deliver(Delivery {
                    from,
                    kind: hdr.kind,
                    handler: hdr.handler,
                    args,
                    nargs: hdr.nargs as usize,
                    payload: buf,
                    inline,
                    bulk,
                    token,
                    request: None,
                }));
            }
            MsgKind::Reply => {
                let Some(req) = self.requests.remove(&hdr.req_id) else {
                    return;
                };
                self.deadlines.remove(&(req.deadline, hdr.req_id));
                self.stats.replies_handled += 1;
                match req.gather {
                    Some((gid, slot)) => self.gather_fill(
                        gid,
                        slot,
                        Ok(GatherReply {
                            source,
                            args: args[..hdr.nargs as usize].to_vec(),
                            payload: buf,
                            bulk,
                        }),
                    ),
                    None => self.events.push_back(Event::Deliver(Delivery {
                        from,
                        kind: MsgKind::Reply,
                        handler: hdr.handler,
                        args,
                        nargs: hdr.nargs as usize,
                        payload: buf,
                        inline,
                        bulk,
                        token: None,
                        request: Some(RequestId(hdr.req_id)),
                    })),
                }
            }
            MsgKind::Bounce => {
                let code = ErrorCode::from_wire(hdr.code).unwrap_or(ErrorCode::Unreachable);
                let u = Undeliverable {
                    code,
                    dest: source,
                    msg_id: MsgId(hdr.msg_id),
                    kind: hdr.orig_kind,
                    handler: hdr.handler,
                    args: args[..hdr.nargs as usize].to_vec(),
                    payload: buf,
                    bulk: (hdr.class == Class::Bulk)
                        .then_some((hdr.bulk_off, hdr.orig_len as usize)),
                    request: (hdr.orig_kind == MsgKind::Request && token.is_none())
                        .then_some(RequestId(hdr.req_id)),
                    delegated_for: token.map(|t| EndpointName { addr: t.addr, vnet }),
                };
                self.upcall(u);
            }
        }
    }

    /// Sends an undeliverable message back to its sender.
    fn bounce(
        &mut self,
        to: SocketAddr,
        hdr: &MsgHeader,
        args: &[u64; MAX_ARGS],
        token: Option<TokenWire>,
        payload: Vec<u8>,
        code: ErrorCode,
    ) {
        let cap = 2 * self.cfg.send_queue_messages;
        self.flush_needed = true;
        let Some(p) = self.peers.get_mut(&to) else {
            return;
        };
        if p.queue.len() >= cap {
            self.stats.messages_rejected += 1;
            return;
        }
        let id = self.next_msg;
        self.next_msg += 1;
        let payload = if hdr.class == Class::Medium {
            payload
        } else {
            Vec::new()
        };
        let m = OutMsg {
            id,
            hdr: MsgHeader {
                kind: MsgKind::Bounce,
                class: hdr.class,
                handler: hdr.handler,
                code: code.to_wire(),
                orig_kind: hdr.kind,
                dst_tag: hdr.src_tag,
                src_tag: self.cfg.tag.0,
                req_id: hdr.req_id,
                total_len: payload.len() as u32,
                orig_len: hdr.total_len,
                bulk_off: hdr.bulk_off,
                token_inc: 0,
                msg_id: hdr.msg_id,
                nargs: hdr.nargs,
            },
            args: *args,
            token,
            payload,
            bulk_src: Vec::new(),
            sent: 0,
            first_sent: false,
            last_seq: 0,
        };
        p.queue.push_back(m);
    }

    /// Routes an undeliverable message: to its request's gather, or to the upcall.
    fn upcall(&mut self, u: Undeliverable) {
        self.stats.upcalls += 1;
        if let Some(RequestId(rid)) = u.request {
            if let Some(req) = self.requests.remove(&rid) {
                self.deadlines.remove(&(req.deadline, rid));
                if let Some((gid, slot)) = req.gather {
                    self.gather_fill(gid, slot, Err(u.code));
                    return;
                }
            }
        }
        self.events.push_back(Event::Upcall(u));
    }

    fn undeliverable_of(&self, dest: SocketAddr, m: &OutMsg, code: ErrorCode) -> Undeliverable {
        let vnet = self.cfg.vnet;
        Undeliverable {
            code,
            dest: EndpointName { addr: dest, vnet },
            msg_id: MsgId(m.id),
            kind: m.hdr.kind,
            handler: m.hdr.handler,
            args: m.args[..m.hdr.nargs as usize].to_vec(),
            payload: m.payload.clone(),
            bulk: (m.hdr.class == Class::Bulk).then_some((m.hdr.bulk_off, m.total())),
            request: (m.hdr.kind == MsgKind::Request && m.token.is_none())
                .then_some(RequestId(m.hdr.req_id)),
            delegated_for: m.token.map(|t| EndpointName { addr: t.addr, vnet }),
        }
    }

    /// Returns every message sent (fully or partly) on the connection and not acknowledged;
    /// the send direction must then re-open with a HELLO.
    fn fail_sent(&mut self, addr: SocketAddr, code: ErrorCode) {
        let Some(p) = self.peers.get_mut(&addr) else {
            return;
        };
        let mut failed: Vec<OutMsg> = p.inflight.drain(..).collect();
        if p.queue.front().is_some_and(|m| m.first_sent) {
            if let Some(m) = p.queue.pop_front() {
                failed.push(m);
            }
        }
        p.unacked.clear();
        p.acked = p.next_seq;
        p.state = SendState::Idle;
        p.backoff = 0;
        p.rto_at = None;
        self.stats.connection_failures += 1;
        for m in failed {
            let u = self.undeliverable_of(addr, &m, code);
            self.upcall(u);
        }
    }

    /// Returns everything pending towards `addr`, queued or sent.
    fn fail_all(&mut self, addr: SocketAddr, code: ErrorCode) {
        self.fail_sent(addr, code);
        let queued: Vec<OutMsg> = match self.peers.get_mut(&addr) {
            Some(p) => p.queue.drain(..).collect(),
            None => return,
        };
        for m in queued {
            let u = self.undeliverable_of(addr, &m, code);
            self.upcall(u);
        }
    }

    fn on_ack(&mut self, from: SocketAddr, ack: u64, window: u32, sack: Option<&[u64; 4]>) {
        let now = self.now;
        let reliable = self.caps.reliable;
        let mut freed = Vec::new();
        {
            let Some(p) = self.peers.get_mut(&from) else {
                return;
            };
            if p.state != SendState::Open {
                return;
            }
            if ack > p.next_seq {
                self.stats.malformed_dropped += 1;
                return;
            }
            p.remote_window = window.clamp(1, MAX_WINDOW);
            if ack > p.acked {
                let mut sample = None;
                while p.unacked.front().is_some_and(|s| s.seq < ack) {
                    if let Some(s) = p.unacked.pop_front() {
                        if s.retx == 0 {
                            sample = Some(now.since_ns(s.sent_at));
                        }
                        pool_give(&mut self.pool, s.bytes);
                    }
                }
                if let Some(rtt) = sample {
                    if p.srtt_ns == 0 {
                        p.srtt_ns = rtt;
                        p.rttvar_ns = rtt / 2;
                    } else {
                        let err = p.srtt_ns.abs_diff(rtt);
                        p.rttvar_ns = (3 * p.rttvar_ns + err) / 4;
                        p.srtt_ns = (7 * p.srtt_ns + rtt) / 8;
                    }
                }
                p.acked = ack;
                p.backoff = 0;
                p.last_progress = now;
                p.rto_at = (!p.unacked.is_empty()).then(|| Time(now.0 + p.rto_ns(&self.cfg)));
                while p.inflight.front().is_some_and(|m| m.last_seq < ack) {
                    if let Some(m) = p.inflight.pop_front() {
                        if m.hdr.class == Class::Bulk && m.hdr.kind != MsgKind::Bounce {
                            freed.push(MsgId(m.id));
                        }
                    }
                }
            }
            if let (Some(sack), false) = (sack, reliable) {
                let base = ack + 1;
                let mut highest = 0u64;
                for s in p.unacked.iter_mut() {
                    let Some(d) = s.seq.checked_sub(base) else {
                        continue;
                    };
                    let d = d as usize;
                    if d < 256 && sack[d / 64] & (1u64 << (d % 64)) != 0 {
                        s.sacked = true;
                        highest = highest.max(s.seq);
                    }
                }
                // Fast retransmission: a packet three or more below a selectively
                // acknowledged one is lost; resend it once now, later only after a full
                // retransmission timeout.
                let rto = p.rto_ns(&self.cfg);
                let mut resend = Vec::new();
                for s in p.unacked.iter_mut() {
                    if s.seq + 3 <= highest
                        && !s.sacked
                        && (s.retx == 0 || now.since_ns(s.sent_at) >= rto)
                    {
                        s.sent_at = now;
                        s.retx += 1;
                        resend.push(s.bytes.clone());
                    }
                }
                let addr = p.addr;
                for b in resend {
                    self.stats.retransmits += 1;
                    self.stats.bytes_retransmitted += b.len() as u64;
                    self.push_packet(addr, b);
                }
            }
        }
        for id in freed {
            self.events.push_back(Event::BulkFree(id));
        }
    }

    // ------------------------------------------------------------------------------------
    // Time.

    /// When [`Core::handle_timeout`] must next run, if ever.
    pub fn poll_timeout(&self) -> Option<Time> {
        let mut t = self.deadlines.iter().next().map(|(t, _)| *t);
        let mut min = |x: Time| t = Some(t.map_or(x, |y| y.min(x)));
        let rto_base = |p: &Peer| Time(p.rto_ns(&self.cfg));
        for p in self.peers.values() {
            if p.ack_needed {
                min(if p.ack_now { self.now } else { p.ack_deadline });
            }
            match p.state {
                SendState::Connecting { since, last_hello } => {
                    min(Time(last_hello.0 + rto_base(p).0));
                    min(since.plus(self.cfg.unreachable_timeout));
                }
                SendState::Open if !p.unacked.is_empty() || !p.inflight.is_empty() => {
                    if let Some(at) = p.rto_at {
                        min(at);
                    }
                    min(p.last_progress.plus(self.cfg.unreachable_timeout));
                }
                _ => {}
            }
        }
        t
    }

    /// Runs timers due at `now`: retransmissions, handshake retries, unreachable peers,
    /// request deadlines.
    pub fn handle_timeout(&mut self, now: Time) {
        self.flush_needed = true;
        self.set_now(now);
        let now = self.now;
        // Request deadlines.
        while let Some(&(t, rid)) = self.deadlines.iter().next() {
            if t > now {
                break;
            }
            self.deadlines.remove(&(t, rid));
            if let Some(req) = self.requests.get(&rid) {
                let u = Undeliverable {
                    code: ErrorCode::Unreachable,
                    dest: req.dest,
                    msg_id: MsgId(req.msg_id),
                    kind: MsgKind::Request,
                    handler: req.handler,
                    args: req.args.clone(),
                    payload: Vec::new(),
                    bulk: None,
                    request: Some(RequestId(rid)),
                    delegated_for: None,
                };
                self.upcall(u);
            }
        }
        let unreachable_ns = self.cfg.unreachable_timeout.as_nanos() as u64;
        let mut cursor = self.peers.keys().next().copied();
        while let Some(addr) = cursor {
            cursor = self.next_peer_after(addr);
            let Some(p) = self.peers.get_mut(&addr) else {
                continue;
            };
            match p.state {
                SendState::Connecting { since, last_hello } => {
                    if now.since_ns(since) >= unreachable_ns {
                        self.fail_all(addr, ErrorCode::Unreachable);
                    } else if now.since_ns(last_hello) >= p.rto_ns(&self.cfg) {
                        p.state = SendState::Connecting {
                            since,
                            last_hello: now,
                        };
                        p.backoff += 1;
                        let (inc, next) = (p.remote_inc, p.next_seq);
                        self.send_hello(addr, wire::kind::HELLO, inc, next);
                    }
                }
                SendState::Open => {
                    if p.unacked.is_empty() && p.inflight.is_empty() {
                        continue;
                    }
                    if now.since_ns(p.last_progress) >= unreachable_ns {
                        self.fail_all(addr, ErrorCode::Unreachable);
                        continue;
                    }
                    if self.caps.reliable {
                        continue;
                    }
                    if p.rto_at.is_some_and(|t| t <= now) {
                        // Resend only the oldest packet that waited a full timeout (the
                        // timeout may be spurious); holes below selectively acknowledged
                        // packets are resent by fast retransmission in `on_ack`.
                        let rto = p.rto_ns(&self.cfg);
                        let mut resend = Vec::new();
                        if let Some(s) = p
                            .unacked
                            .iter_mut()
                            .find(|s| !s.sacked && now.since_ns(s.sent_at) >= rto)
                        {
                            s.sent_at = now;
                            s.retx += 1;
                            resend.push(s.bytes.clone());
                        }
                        p.backoff += 1;
                        p.rto_at = Some(Time(now.0 + p.rto_ns(&self.cfg)));
                        for b in resend {
                            self.stats.retransmits += 1;
                            self.stats.bytes_retransmitted += b.len() as u64;
                            self.push_packet(addr, b);
                        }
                    }
                }
                SendState::Idle => {}
            }
        }
    }

    // ------------------------------------------------------------------------------------
    // Output.

    fn next_peer_after(&self, addr: SocketAddr) -> Option<SocketAddr> {
        use std::ops::Bound::{Excluded, Unbounded};
        self.peers
            .range((Excluded(addr), Unbounded))
            .next()
            .map(|(a, _)| *a)
    }

    fn advertised_window(&self) -> u32 {
        let now = self.now;
        let active = self
            .peers
            .values()
            .filter(|p| p.last_rx.0 != 0 && now.since_ns(p.last_rx) < ACTIVE_NS)
            .count()
            .max(1) as u32;
        // The budget is in packets and in bytes (the socket buffer holds bytes): with a
        // large MTU the byte budget is the tighter one.
        let by_bytes = self.cfg.recv_budget_bytes / self.caps.max_datagram.max(1);
        let budget = (self.cfg.recv_budget_packets as usize).min(by_bytes) as u32;
        (budget / active).clamp(4, self.cfg.recv_window_packets)
    }

    /// Packetises queued messages within each peer's window, opens connections that have
    /// queued messages, and writes acknowledgements. Call after a batch of inputs.
    pub fn flush(&mut self) {
        // Nothing was queued, received or timed out since the last flush: nothing to do
        // (this runs on every poll, busy-polling included).
        if !self.flush_needed {
            return;
        }
        self.flush_needed = false;
        let window = self.advertised_window();
        self.last_window = window;
        // Walk the peers without allocating (flush runs on every poll).
        let mut cursor = self.peers.keys().next().copied();
        while let Some(addr) = cursor {
            self.flush_peer(addr, window);
            cursor = self.next_peer_after(addr);
        }
    }

    fn flush_peer(&mut self, addr: SocketAddr, window: u32) {
        let now = self.now;
        let Some(p) = self.peers.get_mut(&addr) else {
            return;
        };
        if p.state == SendState::Idle && !p.queue.is_empty() {
            p.state = SendState::Connecting {
                since: now,
                last_hello: now,
            };
            let (inc, next) = (p.remote_inc, p.next_seq);
            self.send_hello(addr, wire::kind::HELLO, inc, next);
        }
        let max_dgram = self.caps.max_datagram;
        let reliable = self.caps.reliable;
        let placement = self.caps.bulk_placement;
        loop {
            let Some(p) = self.peers.get_mut(&addr) else {
                return;
            };
            if p.state != SendState::Open
                || p.queue.is_empty()
                || p.in_flight() >= p.remote_window as u64
            {
                break;
            }
            let common = Common {
                version: self.cfg.protocol_version,
                kind: wire::kind::DATA,
                vnet: self.cfg.vnet,
                src_inc: self.inc,
                dst_inc: p.remote_inc,
            };
            let seq = p.next_seq;
            if p.acked == p.next_seq {
                // Nothing was in flight: the unreachable clock starts now.
                p.last_progress = now;
            }
            let mut b = pool_take(&mut self.pool, max_dgram);
            wire::put_data_header(&mut b, &common, seq, p.rx_next, window);
            let Some(m) = p.queue.front_mut() else { break };
            let room;
            if !m.first_sent {
                wire::put_first(
                    &mut b,
                    &m.hdr,
                    &m.args[..m.hdr.nargs as usize],
                    m.token.as_ref(),
                );
                m.first_sent = true;
                room = max_dgram.saturating_sub(b.len()).max(64);
            } else {
                wire::put_cont(&mut b, m.sent as u32);
                room = max_dgram.saturating_sub(b.len()).max(64);
            }
            let placed = placement && m.hdr.class == Class::Bulk && m.hdr.kind != MsgKind::Bounce;
            let take = if placed {
                0
            } else {
                room.min(m.total() - m.sent)
            };
            let bulk = placed.then(|| BulkWrite {
                tag: m.hdr.dst_tag,
                src: m.bulk_src.clone(),
                dst_offset: m.hdr.bulk_off,
                len: m.total(),
            });
            if placed {
                m.sent = m.total();
            }
            match m.hdr.class {
                Class::Bulk if m.hdr.kind != MsgKind::Bounce => {
                    copy_ranges(&self.segment, &m.bulk_src, m.sent, take, &mut b)
                }
                _ => b.extend_from_slice(&m.payload[m.sent..m.sent + take]),
            }
            m.sent += take;
            let done = m.sent >= m.total();
            p.next_seq += 1;
            if p.rx_buf.is_empty() {
                // The data carries the acknowledgement. With a gap, a standalone ACK with
                // its selective bitmap must still go, so the sender can repair the gap.
                p.ack_needed = false;
                p.ack_now = false;
                p.rx_since_ack = 0;
            }
            if done {
                if let Some(mut m) = p.queue.pop_front() {
                    m.last_seq = seq;
                    if m.hdr.class != Class::Bulk {
                        m.bulk_src = Vec::new();
                    }
                    p.inflight.push_back(m);
                }
            }
            if !reliable {
                p.unacked.push_back(SentPkt {
                    seq,
                    bytes: {
                        let mut copy = pool_take(&mut self.pool, b.len());
                        copy.extend_from_slice(&b);
                        copy
                    },
                    sent_at: now,
                    retx: 0,
                    sacked: false,
                });
                if p.rto_at.is_none() {
                    p.rto_at = Some(Time(now.0 + p.rto_ns(&self.cfg)));
                }
            }
            self.push_packet_with(addr, b, bulk);
        }
        let Some(p) = self.peers.get_mut(&addr) else {
            return;
        };
        if p.ack_needed && p.rx_valid && (p.ack_now || now >= p.ack_deadline) {
            p.ack_needed = false;
            p.ack_now = false;
            p.rx_since_ack = 0;
            let mut sack = [0u64; wire::SACK_WORDS];
            let base = p.rx_next + 1;
            for (&s, _) in p.rx_buf.range(base..base + MAX_WINDOW as u64) {
                let d = (s - base) as usize;
                sack[d / 64] |= 1u64 << (d % 64);
            }
            let mut b = pool_take(&mut self.pool, 72);
            wire::encode_packet(
                &mut b,
                &Packet::Ack {
                    common: Common {
                        version: self.cfg.protocol_version,
                        kind: wire::kind::ACK,
                        vnet: self.cfg.vnet,
                        src_inc: self.inc,
                        dst_inc: p.remote_inc,
                    },
                    ack: p.rx_next,
                    window,
                    sack,
                },
            );
            self.push_packet(addr, b);
        }
    }

    /// Drops the first `n` datagrams of the outbox (the transport took them) and keeps
    /// their buffers for reuse.
    pub fn sent(&mut self, n: usize) {
        let n = n.min(self.outbox.len());
        for t in self.outbox.drain(..n) {
            pool_give(&mut self.pool, t.bytes);
        }
    }

    /// Datagrams waiting for the transport, oldest first.
    pub fn outbox(&mut self) -> &mut VecDeque<Transmit> {
        &mut self.outbox
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
