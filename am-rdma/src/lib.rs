//! `am-rdma`: the Active Messages transport over RDMA verbs (reliable-connected queue pairs).
//!
//! [`RdmaTransport`] implements [`am_core::Transport`] with the capabilities `reliable` and
//! `bulk_placement`, so `am-core` keeps its tables, tags, request/reply, delegation, credits
//! and upcalls and adds no retransmission; this crate only moves datagrams and places bulk
//! data:
//!
//! - **Connection setup out of band over UDP.** Each transport binds a UDP socket at its
//!   endpoint's address (an address of the netdev the RDMA device sits on) and exchanges
//!   queue-pair numbers, PSNs, GIDs and a per-connection nonce with `REQ`/`REP` datagrams.
//!   Chosen over `rdma_cm` because the endpoint's name already is an `IP:port`: one
//!   namespace, no second event channel per connection, no per-connection thread, and
//!   simultaneous opens resolve to one queue pair per pair of endpoints.
//! - **Small and medium messages as SEND/RECV**: a one-byte transport prefix then the
//!   engine's datagram, inline when it fits `max_inline`, else from a registered send ring;
//!   received into pre-posted registered slots that are reposted as soon as the datagram has
//!   been handed to the engine. Credits: the transport states its window
//!   (`Capabilities::max_window`, half the posted receives less room for control, since a
//!   bulk header's WRITE with immediate takes a receive too) and the engine never
//!   advertises more.
//! - **Bulk as RDMA WRITEs ending in one WRITE with immediate** into the receiver's
//!   registered segment. The AM header (handler, arguments, tag, sequence) goes first as a
//!   SEND marked "bulk header"; the data follows in WRITEs of at most
//!   [`WRITE_CHUNK_BYTES`], posted as send-queue slots free up, the last one with
//!   immediate data. The receiving transport parks the header and hands it to the engine
//!   when that immediate completion arrives (RC places the WRITEs of a queue pair in
//!   order), so the handler runs after the last byte. Each WRITE's completion is
//!   progress, reported to the engine ([`Transport::take_progress`]): a bulk that takes
//!   longer than the engine's unreachable timeout to cross a slow or loaded link is not
//!   declared lost while it moves, and one that stops moving is returned as `Unreachable`
//!   that long after its last completion. The sender learns its buffer is free from the
//!   engine's acknowledgement (the bulk-free callback).
//! - **Keys only after a tag check**: a sender asks for the segment's rkey by presenting the
//!   tag its message carries; the receiver grants it only when the tag is its endpoint's.
//!   A message with any other tag goes as a header alone, and the receiving engine rejects
//!   it with `BadTag` without a byte of it having been placed.
//! - **Dead and restarted peers**: `rxe` never fails a queue pair whose peer died, so when a
//!   send has waited [`PROBE_AFTER`] the transport probes the peer over UDP. A restarted peer
//!   answers by opening a new connection; the old one is torn down and reported through
//!   [`Transport::take_failed`], and the engine returns what it had sent as `Unreachable`. A
//!   peer that stays dead is caught by the engine's unreachable timeout (2 s). Error
//!   completions (retry exceeded on real NICs: [`verbs::QP_TIMEOUT`], [`verbs::RETRY_CNT`],
//!   [`verbs::RNR_RETRY`]) are reported the same way.
//! - Completions are polled by the owning event loop; `wait` sleeps on the completion
//!   channel fd, the UDP socket and an eventfd in one epoll set.
//!
//! All `unsafe` code is in [`verbs`], with its invariants; the crate root denies it.

#![deny(unsafe_code)]

#[allow(unsafe_code)]
pub mod verbs;

use am_core::{
    Capabilities, EventMask, Notify, SegmentMemory, Time, Transmit, Transport, TransportError,
};
use am_os::tsc::{coarse_now_ns, TscClock};
use am_os::{Epoll, EpollEvents, EventFd};
use rustc_hash::FxHashMap as HashMap;
use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};
use verbs::{Device, ForeignRegion, OwnedRegion, Qp, RemoteQp, Wc};

/// Largest RDMA WRITE a bulk is cut into. Its completion is the sender's evidence that the
/// bulk moves: at 1 MiB a link must be slower than 0.5 MB/s (a 2 s unreachable timeout)
/// before a moving bulk looks stalled, and a 64 MiB bulk costs 64 work requests.
pub const WRITE_CHUNK_BYTES: usize = 1 << 20;
/// A bulk's WRITEs in flight at once per peer. Four chunks (4 MiB) cover the
/// bandwidth-delay product of any RDMA link (100 Gb/s x 300 us), and bound what one post
/// costs the event loop where the device does its work inside the system call (rxe moves
/// the data in `ibv_post_send`): the loop gets back to its timers and other peers between
/// chunks.
pub const WRITE_WINDOW: u32 = 4;

/// How long a send may wait for its completion before the peer is probed over UDP.
pub const PROBE_AFTER: Duration = Duration::from_millis(50);
/// How often a connection request is repeated while unanswered.
const REQ_EVERY: Duration = Duration::from_millis(100);
/// How often the transport looks for stalled sends and unanswered connection requests.
const PROBE_CHECK: Duration = Duration::from_millis(10);

/// Settings of an [`RdmaTransport`].
#[derive(Clone, Debug)]
pub struct RdmaConfig {
    /// Device name (`rxe0`); `None`: the first device (or `AM_RDMA_DEVICE`).
    pub device: Option<String>,
    /// Receives posted per queue pair.
    pub recv_depth: u32,
    /// Sends outstanding per queue pair.
    pub send_depth: u32,
    /// Largest datagram the engine may hand over (a receive slot holds it plus one byte).
    pub max_datagram: usize,
    /// Sends up to this size go inline (`rxe` accepts up to 512).
    pub max_inline: u32,
    /// Most peers (queue pairs) at once; the shared CQ is sized for them.
    pub max_peers: usize,
    /// Datagrams held per peer while it connects or a key is asked for.
    pub pending_limit: usize,
    /// Spin in `wait` instead of sleeping (lowest latency, one core busy).
    pub busy_poll: bool,
}

impl Default for RdmaConfig {
    fn default() -> Self {
        RdmaConfig {
            device: std::env::var("AM_RDMA_DEVICE").ok(),
            // A window of 96 datagrams per peer: bulk data moves by RDMA WRITE, so a
            // window counts messages, not bytes.
            recv_depth: 256,
            send_depth: 128,
            // A 4 KiB medium and its AM header in one SEND.
            max_datagram: 4096 + 256,
            max_inline: 256,
            max_peers: 64,
            pending_limit: 8192,
            busy_poll: false,
        }
    }
}

/// Counters of an [`RdmaTransport`]: what moved how.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RdmaStats {
    /// SEND work requests posted (all kinds).
    pub sends_posted: u64,
    /// Of those, inline.
    pub sends_inline: u64,
    /// RDMA WRITE with immediate work requests posted (one per bulk: its last chunk).
    pub writes_imm_posted: u64,
    /// Plain RDMA WRITE work requests posted (the chunks of a bulk before its last).
    pub writes_posted: u64,
    /// Bytes moved by WRITEs of either kind.
    pub bytes_written: u64,
    /// Send work requests (SENDs and WRITEs) that completed successfully.
    pub sends_completed: u64,
    /// Receives completed carrying a SEND.
    pub recvs: u64,
    /// Receives completed by a WRITE with immediate (bulk arrivals).
    pub writes_imm_received: u64,
    /// Bulk messages sent as a header alone (tag refused, range outside the segment).
    pub bulk_header_only: u64,
    /// Key requests we answered with a grant / a refusal.
    pub grants: u64,
    /// Refusals.
    pub refusals: u64,
    /// Connections established.
    pub connects: u64,
    /// Connection requests sent.
    pub requests_sent: u64,
    /// Probes sent to peers whose sends stalled.
    pub probes_sent: u64,
    /// Connections torn down (peer restarted, queue pair error).
    pub connections_replaced: u64,
    /// Error completions.
    pub error_completions: u64,
    /// Malformed control datagrams or sends, counted and dropped.
    pub malformed: u64,
    /// Datagrams dropped (peer table full, connection torn down before they went).
    pub dropped: u64,
}

/// The transport's eventfd, as the engine's cross-thread wake-up.
struct Waker(EventFd);

impl Notify for Waker {
    fn notify(&self) {
        self.0.signal();
    }
}

const TOKEN_CQ: u64 = 1;
const TOKEN_UDP: u64 = 2;
const TOKEN_EVENTFD: u64 = 3;

/// Transport prefixes of a SEND.
mod prefix {
    /// An engine datagram: deliver.
    pub(crate) const DATA: u8 = 0;
    /// A bulk header: deliver when the next WRITE with immediate completes.
    pub(crate) const BULK: u8 = 1;
    /// A key request: tag (8 bytes).
    pub(crate) const ASK: u8 = 2;
    /// A key answer: ok (1), tag (8), rkey (4), addr (8), len (8).
    pub(crate) const GRANT: u8 = 3;
}

/// Out-of-band connection datagrams (UDP).
mod oob {
    pub(crate) const MAGIC: u32 = 0x414d_5243; // "AMRC"
    pub(crate) const VERSION: u8 = 1;
    pub(crate) const REQ: u8 = 1;
    pub(crate) const REP: u8 = 2;
    pub(crate) const PROBE: u8 = 3;
    pub(crate) const LEN: usize = 52;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) struct Msg {
        pub(crate) kind: u8,
        pub(crate) qpn: u32,
        pub(crate) psn: u32,
        pub(crate) lid: u16,
        pub(crate) gid: [u8; 16],
        /// The sender's connection nonce.
        pub(crate) nonce: u64,
        /// REP: the nonce of the request answered; PROBE: the nonce the sender believes
        /// the receiver's connection has.
        pub(crate) echo: u64,
    }

    impl Msg {
        pub(crate) fn encode(&self) -> [u8; LEN] {
            let mut b = [0u8; LEN];
            b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
            b[4] = VERSION;
            b[5] = self.kind;
            b[8..12].copy_from_slice(&self.qpn.to_le_bytes());
            b[12..16].copy_from_slice(&self.psn.to_le_bytes());
            b[16..18].copy_from_slice(&self.lid.to_le_bytes());
            b[20..36].copy_from_slice(&self.gid);
            b[36..44].copy_from_slice(&self.nonce.to_le_bytes());
            b[44..52].copy_from_slice(&self.echo.to_le_bytes());
            b
        }

        pub(crate) fn decode(b: &[u8]) -> Option<Msg> {
            if b.len() != LEN
                || u32::from_le_bytes(b[0..4].try_into().ok()?) != MAGIC
                || b[4] != VERSION
                || !(REQ..=PROBE).contains(&b[5])
            {
                return None;
            }
            Some(Msg {
                kind: b[5],
                qpn: u32::from_le_bytes(b[8..12].try_into().ok()?),
                psn: u32::from_le_bytes(b[12..16].try_into().ok()?),
                lid: u16::from_le_bytes(b[16..18].try_into().ok()?),
                gid: b[20..36].try_into().ok()?,
                nonce: u64::from_le_bytes(b[36..44].try_into().ok()?),
                echo: u64::from_le_bytes(b[44..52].try_into().ok()?),
            })
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Grant {
    Asked,
    Have { rkey: u32, addr: u64, len: u64 },
    Refused,
}

struct Peer {
    id: u32,
    qp: Qp,
    // Dropped after the QP (field order): the device may write into `recv` until then.
    recv: OwnedRegion,
    ring: OwnedRegion,
    nonce: u64,
    psn: u32,
    remote: Option<(RemoteQp, u64)>,
    /// Coarse-clock times (ns), see [`coarse_now_ns`].
    last_req: u64,
    control: VecDeque<Vec<u8>>,
    pending: VecDeque<Transmit>,
    outstanding: u32,
    posted: u64,
    stalled_since: Option<u64>,
    last_probe: u64,
    grants: HashMap<u64, Grant>,
    parked: VecDeque<Vec<u8>>,
    imm_send: u32,
    imm_recv: u32,
    /// The bulk whose WRITEs are being posted; nothing else goes to this peer meanwhile.
    writing: Option<BulkCursor>,
    /// A send completed since the engine last asked (`Transport::take_progress`).
    progressed: bool,
    /// The bulk's WRITEs posted and not completed (at most `WRITE_WINDOW`).
    writes_in_flight: u32,
}

/// Where a bulk's WRITEs stand: what of its source ranges is still to be posted, and where
/// it lands. Cuts the ranges into chunks of at most `WRITE_CHUNK_BYTES` and `MAX_SGE`
/// scatter entries.
#[derive(Clone, Debug, PartialEq, Eq)]
struct BulkCursor {
    src: Vec<(usize, usize)>,
    /// Index into `src` and offset inside that range of the next byte to post.
    range: usize,
    at: usize,
    rkey: u32,
    /// Remote address of the next byte.
    raddr: u64,
}

impl BulkCursor {
    fn new(src: &[(usize, usize)], rkey: u32, raddr: u64) -> BulkCursor {
        BulkCursor {
            src: src.iter().copied().filter(|r| r.1 > 0).collect(),
            range: 0,
            at: 0,
            rkey,
            raddr,
        }
    }

    fn done(&self) -> bool {
        self.range >= self.src.len()
    }

    /// The next chunk: its scatter list, remote address, and whether it is the last.
    fn next_chunk(&mut self, max_bytes: usize) -> (Vec<(usize, usize)>, u64, bool) {
        let raddr = self.raddr;
        let mut sges = Vec::new();
        let mut room = max_bytes;
        while room > 0 && sges.len() < verbs::MAX_SGE && !self.done() {
            let (off, len) = self.src[self.range];
            let take = (len - self.at).min(room);
            sges.push((off + self.at, take));
            room -= take;
            self.at += take;
            if self.at == len {
                self.range += 1;
                self.at = 0;
            }
        }
        self.raddr += (max_bytes - room) as u64;
        (sges, raddr, self.done())
    }
}

/// The RDMA verbs transport.
pub struct RdmaTransport {
    cfg: RdmaConfig,
    // Peers (queue pairs) drop before the segment registration and the device.
    peers: HashMap<SocketAddr, Peer>,
    by_id: HashMap<u32, SocketAddr>,
    segment: Option<ForeignRegion>,
    dev: Device,
    sock: UdpSocket,
    addr: SocketAddr,
    epoll: Epoll,
    eventfd: Arc<Waker>,
    clock: TscClock,
    seed: u64,
    next_id: u32,
    nonce_ctr: u64,
    tag: u64,
    wcs: Vec<Wc>,
    failed: Vec<SocketAddr>,
    /// Peers with a send completed since the engine last asked (at most one entry each).
    progressed: Vec<SocketAddr>,
    /// The UDP socket may have datagrams (epoll said so); otherwise it is read every
    /// `UDP_EVERY` polls, sparing a system call per poll.
    udp_ready: bool,
    polls: u64,
    /// Coarse-clock time of the last look for stalled peers.
    last_probe_check: u64,
    slot: usize,
    stats: RdmaStats,
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn io(what: &str, e: impl std::fmt::Display) -> TransportError {
    TransportError::Io(format!("{what}: {e}"))
}

const SEND_BIT: u64 = 1 << 31;
/// Marks a send work request that is one of a bulk's WRITEs.
const WRITE_BIT: u64 = 1 << 30;
/// Posted receives kept for acknowledgements and key exchanges, outside the window.
const RECV_SLACK: u32 = 64;

/// Connection events on stderr when `AM_RDMA_TRACE=1`.
fn tracing() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("AM_RDMA_TRACE").is_ok_and(|v| v == "1"))
}

macro_rules! trace {
    ($($arg:tt)*) => {
        if tracing() {
            eprintln!("[am-rdma {}] {}", std::process::id(), format!($($arg)*));
        }
    };
}

// After `trace!`, which they use.
mod connect;
mod datapath;
const UDP_EVERY: u64 = 32;

impl RdmaTransport {
    /// Opens the device and binds the connection socket at `addr` (an address of the
    /// device's netdev; port 0 picks one).
    pub fn bind(addr: SocketAddr, cfg: RdmaConfig) -> io::Result<RdmaTransport> {
        // Credits: the engine keeps at most `max_window` datagrams in flight to a peer (it
        // never advertises more, see `capabilities`); each takes one posted receive, a bulk
        // header's WRITE with immediate one more, and acknowledgements and key requests a
        // few: the peer never meets a receiver-not-ready.
        if cfg.recv_depth < RECV_SLACK + 8 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "RdmaConfig::recv_depth {} is below {} (room for a window of 4 plus control)",
                    cfg.recv_depth,
                    RECV_SLACK + 8
                ),
            ));
        }
        if cfg.max_datagram < 1024 || cfg.max_inline as usize > cfg.max_datagram {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "RdmaConfig::max_datagram must be at least 1024 and at least max_inline",
            ));
        }
        let sock = UdpSocket::bind(addr)?;
        sock.set_nonblocking(true)?;
        let addr = sock.local_addr()?;
        let cqe = (cfg.max_peers as u32) * (cfg.recv_depth + cfg.send_depth) + 64;
        let dev = Device::open(cfg.device.as_deref(), addr.ip(), cqe)?;
        let epoll = Epoll::new()?;
        let efd = EventFd::new()?;
        epoll.add(dev.channel_fd(), TOKEN_CQ)?;
        epoll.add(sock.as_raw_fd(), TOKEN_UDP)?;
        epoll.add(efd.as_raw_fd(), TOKEN_EVENTFD)?;
        let t0 = Instant::now();
        let seed = mix((std::process::id() as u64) << 32
            ^ addr.port() as u64
            ^ t0.elapsed().as_nanos() as u64
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64));
        let slot = cfg.max_datagram + 1;
        Ok(RdmaTransport {
            cfg,
            peers: HashMap::default(),
            by_id: HashMap::default(),
            segment: None,
            dev,
            sock,
            addr,
            epoll,
            eventfd: Arc::new(Waker(efd)),
            clock: TscClock::new(),
            seed,
            next_id: 1,
            nonce_ctr: 0,
            tag: 0,
            wcs: Vec::with_capacity(64),
            failed: Vec::new(),
            progressed: Vec::new(),
            udp_ready: true,
            polls: 0,
            last_probe_check: 0,
            slot,
            stats: RdmaStats::default(),
        })
    }

    /// Counters.
    pub fn stats(&self) -> &RdmaStats {
        &self.stats
    }

    /// The verbs device in use.
    pub fn device_name(&self) -> &str {
        &self.dev.name
    }

    /// The GID index of the transport's address on that device (perftest's `-x`).
    pub fn gid_index(&self) -> u8 {
        self.dev.gid_index
    }
}

impl Transport for RdmaTransport {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            reliable: true,
            bulk_placement: true,
            max_datagram: self.cfg.max_datagram,
            // Each datagram takes a posted receive, a bulk header's WRITE with immediate
            // one more, and acknowledgements and key exchanges need some room.
            max_window: self.cfg.recv_depth.saturating_sub(RECV_SLACK) / 2,
        }
    }

    fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    fn now(&self) -> Time {
        Time(self.clock.now_ns())
    }

    fn seed(&self) -> u64 {
        self.seed
    }

    fn attach(&mut self, tag: u64, segment: SegmentMemory) -> Result<(), TransportError> {
        let r = self
            .dev
            .register_segment(segment)
            .map_err(|e| io("register the segment", e))?;
        self.segment = Some(r);
        self.tag = tag;
        Ok(())
    }

    fn take_failed(&mut self, failed: &mut dyn FnMut(SocketAddr)) {
        for a in self.failed.drain(..) {
            failed(a);
        }
    }

    fn take_progress(&mut self, progressed: &mut dyn FnMut(SocketAddr, Time)) {
        if self.progressed.is_empty() {
            return;
        }
        let now = Time(self.clock.now_ns());
        for a in self.progressed.drain(..) {
            if let Some(p) = self.peers.get_mut(&a) {
                p.progressed = false;
                progressed(a, now);
            }
        }
    }

    fn send_batch(&mut self, batch: &[Transmit]) -> Result<usize, TransportError> {
        let mut taken = 0;
        for t in batch {
            if !self.peers.contains_key(&t.to) {
                if self.new_peer(t.to).is_err() {
                    // No queue pair to be had: dropped; the engine's timeout reports it.
                    self.stats.dropped += 1;
                    taken += 1;
                    continue;
                }
                if let Some(p) = self.peers.get_mut(&t.to) {
                    p.last_req = coarse_now_ns();
                }
                self.oob(t.to, oob::REQ, 0);
            }
            let limit = self.cfg.pending_limit;
            // `taken` counts from the front of the batch: every datagram passed over is
            // counted as taken (and, if not sent, as dropped).
            let Some(p) = self.peers.get_mut(&t.to) else {
                self.stats.dropped += 1;
                taken += 1;
                continue;
            };
            let direct = p.remote.is_some()
                && p.pending.is_empty()
                && p.control.is_empty()
                && p.writing.is_none();
            if direct {
                match self.try_send(t.to, t) {
                    Ok(true) => {
                        taken += 1;
                        continue;
                    }
                    Ok(false) => {}
                    Err(_) => {
                        self.fail_peer(t.to);
                        taken += 1;
                        continue;
                    }
                }
            }
            let Some(p) = self.peers.get_mut(&t.to) else {
                self.stats.dropped += 1;
                taken += 1;
                continue;
            };
            if p.pending.len() >= limit {
                break;
            }
            p.pending.push_back(t.clone());
            taken += 1;
        }
        self.probe_stalled();
        Ok(taken)
    }

    fn recv_batch(
        &mut self,
        max: usize,
        deliver: &mut dyn FnMut(SocketAddr, &[u8]),
    ) -> Result<usize, TransportError> {
        self.polls += 1;
        if self.udp_ready || self.polls.is_multiple_of(UDP_EVERY) {
            self.udp_ready = false;
            self.poll_udp();
        }
        let mut delivered = 0;
        if !self.wcs.is_empty() {
            // Completions `wait` found.
            delivered += self.process_wcs(deliver);
        }
        while delivered < max.max(1) {
            let room = (max.max(1) - delivered).min(64);
            let mut wcs = std::mem::take(&mut self.wcs);
            let n = self
                .dev
                .poll(&mut wcs, room)
                .map_err(|e| io("poll the completion queue", e))?;
            self.wcs = wcs;
            if n == 0 {
                break;
            }
            delivered += self.process_wcs(deliver);
        }
        self.probe_stalled();
        Ok(delivered)
    }

    fn wait(&mut self, timeout: Option<Duration>, mask: EventMask) -> Result<(), TransportError> {
        let mut timeout = timeout;
        if self.stalled_any() {
            timeout = Some(timeout.map_or(PROBE_AFTER, |t| t.min(PROBE_AFTER)));
        }
        if mask.network && !self.wcs.is_empty() {
            // Completions found earlier (by a wait the mask kept asleep) are waiting.
            return Ok(());
        }
        if self.cfg.busy_poll {
            return self.spin(timeout, mask);
        }
        // Arm, then look once more: a completion that arrived before arming raises no event.
        // (Events are consumed when epoll reports the channel, so no read is spent here.)
        self.dev
            .arm()
            .map_err(|e| io("arm the completion queue", e))?;
        if self.poll_cq_stash()? > 0 && mask.network {
            return Ok(());
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let ms = match deadline {
                None => -1,
                // Round up so we do not spin on sub-millisecond timeouts.
                Some(d) => d
                    .saturating_duration_since(Instant::now())
                    .as_micros()
                    .div_ceil(1000)
                    .min(i32::MAX as u128) as i32,
            };
            let mut evs = EpollEvents::default();
            self.epoll
                .wait(&mut evs, ms)
                .map_err(|e| io("epoll_wait", e))?;
            self.note_events(&evs);
            // Only the sources in `mask` wake the caller (the others are noted and handled
            // at the next poll); the deadline always does.
            let woken = evs.tokens().any(|t| match t {
                TOKEN_EVENTFD => mask.handle,
                _ => mask.network,
            });
            if woken || evs.is_empty() || deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(());
            }
            // A masked source fired: re-arm (its event was consumed) and sleep on.
            self.dev
                .arm()
                .map_err(|e| io("arm the completion queue", e))?;
        }
    }

    fn notifier(&self) -> Arc<dyn Notify> {
        self.eventfd.clone()
    }
}

#[cfg(test)]
mod tests;
