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
use rustc_hash::FxHashMap as HashMap;
use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
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

struct EventFd(OwnedFd);

impl Notify for EventFd {
    fn notify(&self) {
        let one: u64 = 1;
        let _ = verbs::fd::write(self.0.as_raw_fd(), &one.to_ne_bytes());
    }
}

const TOKEN_CQ: u64 = 1;
const TOKEN_UDP: u64 = 2;
const TOKEN_EVENTFD: u64 = 3;

/// Transport prefixes of a SEND.
mod prefix {
    /// An engine datagram: deliver.
    pub const DATA: u8 = 0;
    /// A bulk header: deliver when the next WRITE with immediate completes.
    pub const BULK: u8 = 1;
    /// A key request: tag (8 bytes).
    pub const ASK: u8 = 2;
    /// A key answer: ok (1), tag (8), rkey (4), addr (8), len (8).
    pub const GRANT: u8 = 3;
}

/// Out-of-band connection datagrams (UDP).
mod oob {
    pub const MAGIC: u32 = 0x414d_5243; // "AMRC"
    pub const VERSION: u8 = 1;
    pub const REQ: u8 = 1;
    pub const REP: u8 = 2;
    pub const PROBE: u8 = 3;
    pub const LEN: usize = 52;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Msg {
        pub kind: u8,
        pub qpn: u32,
        pub psn: u32,
        pub lid: u16,
        pub gid: [u8; 16],
        /// The sender's connection nonce.
        pub nonce: u64,
        /// REP: the nonce of the request answered; PROBE: the nonce the sender believes
        /// the receiver's connection has.
        pub echo: u64,
    }

    impl Msg {
        pub fn encode(&self) -> [u8; LEN] {
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

        pub fn decode(b: &[u8]) -> Option<Msg> {
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
    /// Coarse-clock times (ns), see [`verbs::coarse_now_ns`].
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
    epoll: OwnedFd,
    eventfd: Arc<EventFd>,
    clock: verbs::FastClock,
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
        let epoll = verbs::fd::epoll()?;
        let efd = verbs::fd::eventfd()?;
        verbs::fd::epoll_add(epoll.as_raw_fd(), dev.channel_fd(), TOKEN_CQ)?;
        verbs::fd::epoll_add(epoll.as_raw_fd(), sock.as_raw_fd(), TOKEN_UDP)?;
        verbs::fd::epoll_add(epoll.as_raw_fd(), efd.as_raw_fd(), TOKEN_EVENTFD)?;
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
            eventfd: Arc::new(EventFd(efd)),
            clock: verbs::FastClock::new(),
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

    fn new_peer(&mut self, to: SocketAddr) -> io::Result<()> {
        if self.peers.len() >= self.cfg.max_peers {
            return Err(io::Error::other(format!(
                "more than {} peers (RdmaConfig::max_peers)",
                self.cfg.max_peers
            )));
        }
        let mut qp = self.dev.create_qp(
            self.cfg.send_depth,
            self.cfg.recv_depth,
            self.cfg.max_inline,
        )?;
        let recv = self
            .dev
            .register_owned(self.slot * self.cfg.recv_depth as usize)?;
        let ring = self
            .dev
            .register_owned(self.slot * self.cfg.send_depth as usize)?;
        let id = self.next_id;
        self.next_id += 1;
        for i in 0..self.cfg.recv_depth as usize {
            qp.post_recv(((id as u64) << 32) | i as u64, &recv, i, self.slot)?;
        }
        self.nonce_ctr += 1;
        let nonce = mix(self.seed ^ self.nonce_ctr).max(1);
        let now = verbs::coarse_now_ns();
        self.peers.insert(
            to,
            Peer {
                id,
                qp,
                recv,
                ring,
                nonce,
                psn: (nonce as u32) & 0x00ff_ffff,
                remote: None,
                last_req: now,
                control: VecDeque::new(),
                pending: VecDeque::new(),
                outstanding: 0,
                posted: 0,
                stalled_since: None,
                last_probe: now,
                grants: HashMap::default(),
                parked: VecDeque::new(),
                imm_send: 0,
                imm_recv: 0,
                writing: None,
                progressed: false,
                writes_in_flight: 0,
            },
        );
        self.by_id.insert(id, to);
        Ok(())
    }

    fn oob(&mut self, to: SocketAddr, kind: u8, echo: u64) {
        let Some(p) = self.peers.get(&to) else { return };
        let m = oob::Msg {
            kind,
            qpn: p.qp.qpn(),
            psn: p.psn,
            lid: self.dev.lid,
            gid: verbs::gid_of(self.addr.ip()),
            nonce: p.nonce,
            echo,
        };
        if kind == oob::REQ {
            self.stats.requests_sent += 1;
        }
        if kind == oob::PROBE {
            self.stats.probes_sent += 1;
        }
        // A lost datagram is repeated (REQ) or harmless (PROBE, REP: the REQ repeats).
        let _ = self.sock.send_to(&m.encode(), to);
    }

    /// Tears down the connection to `addr` and reports it failed, so the engine returns
    /// what it had sent on it as `Unreachable` and re-opens with a HELLO. Datagrams still
    /// waiting here are dropped (counted) rather than sent on the next connection: the
    /// engine has just returned their messages, which must not then arrive as well.
    fn replace(&mut self, addr: SocketAddr) {
        let Some(p) = self.peers.remove(&addr) else {
            return;
        };
        trace!("{} connection to {addr} torn down", self.addr);
        self.by_id.remove(&p.id);
        self.stats.connections_replaced += 1;
        self.stats.dropped += p.pending.len() as u64;
        if !self.failed.contains(&addr) {
            self.failed.push(addr);
        }
    }

    fn connect_peer(&mut self, addr: SocketAddr, m: &oob::Msg) -> io::Result<()> {
        let Some(p) = self.peers.get_mut(&addr) else {
            return Ok(());
        };
        let remote = RemoteQp {
            qpn: m.qpn,
            psn: m.psn,
            gid: m.gid,
            lid: m.lid,
        };
        p.qp.connect(&self.dev, &remote, p.psn)?;
        p.remote = Some((remote, m.nonce));
        self.stats.connects += 1;
        Ok(())
    }

    fn on_oob(&mut self, from: SocketAddr, m: oob::Msg) {
        trace!(
            "{} <- {from}: kind {} qpn {} nonce {:x} echo {:x}; have {:?}",
            self.addr,
            m.kind,
            m.qpn,
            m.nonce,
            m.echo,
            self.peers
                .get(&from)
                .map(|p| (p.nonce, p.remote.map(|r| r.1), p.outstanding))
        );
        match m.kind {
            oob::REQ => {
                let state = self.peers.get(&from).map(|p| p.remote.map(|r| r.1));
                match state {
                    Some(Some(n)) if n == m.nonce => {
                        self.oob(from, oob::REP, m.nonce);
                        return;
                    }
                    Some(Some(_)) => {
                        // The peer restarted (or rebuilt its side): a new connection.
                        self.replace(from);
                        if self.new_peer(from).is_err() {
                            return;
                        }
                    }
                    Some(None) => {}
                    None => {
                        if self.new_peer(from).is_err() {
                            self.stats.dropped += 1;
                            return;
                        }
                    }
                }
                if self.connect_peer(from, &m).is_err() {
                    self.stats.error_completions += 1;
                    return;
                }
                self.oob(from, oob::REP, m.nonce);
                let _ = self.flush_peer(from);
            }
            oob::REP => {
                let Some(p) = self.peers.get(&from) else {
                    return;
                };
                if m.echo != p.nonce || p.remote.is_some() {
                    return;
                }
                if self.connect_peer(from, &m).is_err() {
                    self.stats.error_completions += 1;
                    return;
                }
                let _ = self.flush_peer(from);
            }
            _ => {
                // PROBE: if we do not hold the connection the prober believes in, open a
                // new one (the prober then replaces its stale queue pair).
                let ours = self
                    .peers
                    .get(&from)
                    .is_some_and(|p| p.nonce == m.echo && p.remote.is_some_and(|r| r.1 == m.nonce));
                if ours {
                    return;
                }
                if self.peers.contains_key(&from) {
                    self.replace(from);
                    if self.new_peer(from).is_err() {
                        return;
                    }
                } else if self.new_peer(from).is_err() {
                    return;
                }
                self.oob(from, oob::REQ, 0);
            }
        }
    }

    fn poll_udp(&mut self) {
        let mut buf = [0u8; 128];
        for _ in 0..64 {
            match self.sock.recv_from(&mut buf) {
                Ok((n, from)) => match oob::Msg::decode(&buf[..n]) {
                    Some(m) => self.on_oob(from, m),
                    None => self.stats.malformed += 1,
                },
                Err(_) => break,
            }
        }
    }

    /// Posts one SEND of `[prefix | body]`; false if the send queue is full.
    fn post_send(&mut self, addr: SocketAddr, pfx: u8, body: &[u8]) -> io::Result<bool> {
        let max_inline = self.cfg.max_inline as usize;
        let depth = self.cfg.send_depth;
        let slot = self.slot;
        let Some(p) = self.peers.get_mut(&addr) else {
            return Ok(false);
        };
        if p.outstanding >= depth {
            return Ok(false);
        }
        let idx = (p.posted % depth as u64) as usize;
        let wr_id = ((p.id as u64) << 32) | SEND_BIT | idx as u64;
        if body.len() < max_inline {
            p.qp.post_send_inline(wr_id, &[&[pfx], body])?;
            self.stats.sends_inline += 1;
        } else {
            if body.len() + 1 > slot {
                return Err(io::Error::other("datagram larger than a receive slot"));
            }
            let off = idx * slot;
            let b = &mut p.ring.bytes_mut()[off..off + body.len() + 1];
            b[0] = pfx;
            b[1..].copy_from_slice(body);
            p.qp.post_send(wr_id, &p.ring, off, body.len() + 1)?;
        }
        if p.outstanding == 0 {
            p.stalled_since = Some(verbs::coarse_now_ns());
        }
        p.outstanding += 1;
        p.posted += 1;
        self.stats.sends_posted += 1;
        Ok(true)
    }

    /// Sends what waits for `addr`, in order, as far as connection, keys and send credits
    /// allow.
    fn flush_peer(&mut self, addr: SocketAddr) -> io::Result<()> {
        loop {
            // Key requests and answers go first: a bulk may be waiting for one.
            self.flush_control(addr)?;
            let Some(p) = self.peers.get_mut(&addr) else {
                return Ok(());
            };
            if p.remote.is_none() || !p.control.is_empty() {
                return Ok(());
            }
            if p.writing.is_some() {
                self.post_writes(addr)?;
                if self.peers.get(&addr).is_some_and(|p| p.writing.is_some()) {
                    return Ok(());
                }
                continue;
            }
            let Some(p) = self.peers.get_mut(&addr) else {
                return Ok(());
            };
            let Some(t) = p.pending.pop_front() else {
                return Ok(());
            };
            match self.try_send(addr, &t)? {
                true => {}
                false => {
                    if let Some(p) = self.peers.get_mut(&addr) {
                        p.pending.push_front(t);
                    }
                    return Ok(());
                }
            }
        }
    }

    /// Sends one datagram on an open connection; false: not now (credits, key pending).
    fn try_send(&mut self, addr: SocketAddr, t: &Transmit) -> io::Result<bool> {
        let Some(b) = t.bulk.as_ref().filter(|b| b.len > 0) else {
            return self.post_send(addr, prefix::DATA, &t.bytes);
        };
        let depth = self.cfg.send_depth;
        let Some(p) = self.peers.get_mut(&addr) else {
            return Ok(false);
        };
        match p.grants.get(&b.tag).copied() {
            None => {
                p.grants.insert(b.tag, Grant::Asked);
                let mut c = vec![prefix::ASK];
                c.extend_from_slice(&b.tag.to_le_bytes());
                p.control.push_back(c);
                let _ = self.flush_control(addr);
                Ok(false)
            }
            Some(Grant::Asked) => Ok(false),
            Some(Grant::Refused) => {
                self.stats.bulk_header_only += 1;
                self.post_send(addr, prefix::DATA, &t.bytes)
            }
            Some(Grant::Have {
                rkey,
                addr: base,
                len,
            }) => {
                let fits = b
                    .dst_offset
                    .checked_add(b.len as u64)
                    .is_some_and(|end| end <= len);
                if !fits {
                    self.stats.bulk_header_only += 1;
                    return self.post_send(addr, prefix::DATA, &t.bytes);
                }
                if p.outstanding + 2 > depth {
                    return Ok(false);
                }
                if !self.post_send(addr, prefix::BULK, &t.bytes)? {
                    return Ok(false);
                }
                // (post_writes fails at once if no segment was registered.)
                if let Some(p) = self.peers.get_mut(&addr) {
                    p.writing = Some(BulkCursor::new(&b.src, rkey, base + b.dst_offset));
                }
                self.post_writes(addr)?;
                Ok(true)
            }
        }
    }

    /// Posts the WRITEs of the bulk in progress towards `addr` while send slots allow;
    /// the last carries the immediate that releases the receiver's parked header.
    fn post_writes(&mut self, addr: SocketAddr) -> io::Result<()> {
        let depth = self.cfg.send_depth;
        let Some(seg) = self.segment.as_ref() else {
            return Err(io::Error::other("bulk before the segment was registered"));
        };
        let Some(p) = self.peers.get_mut(&addr) else {
            return Ok(());
        };
        while p.outstanding < depth && p.writes_in_flight < WRITE_WINDOW {
            let Some(cur) = p.writing.as_mut() else {
                break;
            };
            let (src, raddr, last) = cur.next_chunk(WRITE_CHUNK_BYTES);
            let rkey = cur.rkey;
            let idx = (p.posted % depth as u64) as usize;
            let wr_id = ((p.id as u64) << 32) | SEND_BIT | WRITE_BIT | idx as u64;
            let imm = last.then_some(p.imm_send);
            p.qp.post_write(wr_id, seg, &src, rkey, raddr, imm)?;
            if p.outstanding == 0 {
                p.stalled_since = Some(verbs::coarse_now_ns());
            }
            p.outstanding += 1;
            p.writes_in_flight += 1;
            p.posted += 1;
            self.stats.bytes_written += src.iter().map(|r| r.1 as u64).sum::<u64>();
            if last {
                p.imm_send = p.imm_send.wrapping_add(1);
                p.writing = None;
                self.stats.writes_imm_posted += 1;
            } else {
                self.stats.writes_posted += 1;
            }
        }
        Ok(())
    }

    fn flush_control(&mut self, addr: SocketAddr) -> io::Result<()> {
        loop {
            let Some(p) = self.peers.get_mut(&addr) else {
                return Ok(());
            };
            if p.remote.is_none() {
                return Ok(());
            }
            let Some(c) = p.control.pop_front() else {
                return Ok(());
            };
            if !self.post_send(addr, c[0], &c[1..])? {
                if let Some(p) = self.peers.get_mut(&addr) {
                    p.control.push_front(c);
                }
                return Ok(());
            }
        }
    }

    fn on_control(&mut self, addr: SocketAddr, body: &[u8], pfx: u8) {
        match pfx {
            prefix::ASK if body.len() == 8 => {
                let tag = u64::from_le_bytes(body.try_into().unwrap_or([0; 8]));
                let mut c = vec![prefix::GRANT];
                match (&self.segment, tag == self.tag) {
                    (Some(seg), true) => {
                        let (rkey, base, len) = seg.grant();
                        c.push(1);
                        c.extend_from_slice(&tag.to_le_bytes());
                        c.extend_from_slice(&rkey.to_le_bytes());
                        c.extend_from_slice(&base.to_le_bytes());
                        c.extend_from_slice(&len.to_le_bytes());
                        self.stats.grants += 1;
                    }
                    _ => {
                        c.push(0);
                        c.extend_from_slice(&tag.to_le_bytes());
                        c.extend_from_slice(&[0; 20]);
                        self.stats.refusals += 1;
                    }
                }
                if let Some(p) = self.peers.get_mut(&addr) {
                    p.control.push_back(c);
                }
                let _ = self.flush_control(addr);
            }
            prefix::GRANT if body.len() == 29 => {
                let tag = u64::from_le_bytes(body[1..9].try_into().unwrap_or([0; 8]));
                let g = if body[0] == 1 {
                    Grant::Have {
                        rkey: u32::from_le_bytes(body[9..13].try_into().unwrap_or([0; 4])),
                        addr: u64::from_le_bytes(body[13..21].try_into().unwrap_or([0; 8])),
                        len: u64::from_le_bytes(body[21..29].try_into().unwrap_or([0; 8])),
                    }
                } else {
                    Grant::Refused
                };
                if let Some(p) = self.peers.get_mut(&addr) {
                    p.grants.insert(tag, g);
                }
                let _ = self.flush_peer(addr);
            }
            _ => self.stats.malformed += 1,
        }
    }

    /// An error completion or a failed post: the queue pair is unusable. It is torn down
    /// at once; the next datagram to `addr` opens a new connection (a new nonce, so the
    /// peer replaces its side too).
    fn fail_peer(&mut self, addr: SocketAddr) {
        trace!("{} connection to {addr} broken", self.addr);
        self.replace(addr);
    }

    /// Handles completions in `self.wcs`, delivering datagrams; returns how many delivered.
    fn process_wcs(&mut self, deliver: &mut dyn FnMut(SocketAddr, &[u8])) -> usize {
        let mut delivered = 0;
        let wcs = std::mem::take(&mut self.wcs);
        let mut flush = Vec::new();
        for wc in &wcs {
            let id = (wc.wr_id >> 32) as u32;
            let Some(&addr) = self.by_id.get(&id) else {
                continue; // a completion of a torn-down queue pair
            };
            if wc.wr_id & SEND_BIT != 0 {
                if let Some(p) = self.peers.get_mut(&addr) {
                    p.outstanding = p.outstanding.saturating_sub(1);
                    if wc.wr_id & WRITE_BIT != 0 {
                        p.writes_in_flight = p.writes_in_flight.saturating_sub(1);
                    }
                    p.stalled_since = (p.outstanding > 0).then(verbs::coarse_now_ns);
                    if wc.status == 0 {
                        if !std::mem::replace(&mut p.progressed, true) {
                            self.progressed.push(addr);
                        }
                        self.stats.sends_completed += 1;
                    }
                    // A freed send slot lets waiting datagrams and WRITEs go.
                    let waiting =
                        !(p.pending.is_empty() && p.control.is_empty() && p.writing.is_none());
                    if waiting && !flush.contains(&addr) {
                        flush.push(addr);
                    }
                }
                if wc.status != 0 {
                    self.stats.error_completions += 1;
                    self.fail_peer(addr);
                }
                continue;
            }
            if wc.status != 0 {
                self.stats.error_completions += 1;
                self.fail_peer(addr);
                continue;
            }
            let slot_idx = (wc.wr_id & 0xffff_ffff) as usize;
            let slot = self.slot;
            if wc.opcode == verbs::opcode::RECV_RDMA_WITH_IMM {
                self.stats.writes_imm_received += 1;
                let hdr = self.peers.get_mut(&addr).and_then(|p| {
                    let expect = p.imm_recv;
                    p.imm_recv = p.imm_recv.wrapping_add(1);
                    p.parked.pop_front().filter(|_| wc.imm == expect)
                });
                match hdr {
                    Some(h) => {
                        deliver(addr, &h);
                        delivered += 1;
                    }
                    None => {
                        // A WRITE with immediate without its header, or out of step: the
                        // peer broke the protocol, and a datagram is lost. Tear the
                        // connection down so the engine returns what it had sent and
                        // re-opens, rather than stall on the gap.
                        self.stats.malformed += 1;
                        self.fail_peer(addr);
                        continue;
                    }
                }
            } else {
                self.stats.recvs += 1;
                let len = wc.byte_len as usize;
                let mut control = None;
                match self.peers.get_mut(&addr) {
                    Some(p) if len >= 1 && len <= slot => {
                        let b = &p.recv.bytes()[slot_idx * slot..slot_idx * slot + len];
                        match b[0] {
                            prefix::DATA => {
                                // Straight from the receive slot: it is reposted below,
                                // after the engine has taken the datagram.
                                deliver(addr, &b[1..]);
                                delivered += 1;
                            }
                            prefix::BULK => {
                                let h = b[1..].to_vec();
                                p.parked.push_back(h);
                            }
                            other => control = Some((other, b[1..].to_vec())),
                        }
                    }
                    _ => self.stats.malformed += 1,
                }
                if let Some((pfx, body)) = control {
                    self.on_control(addr, &body, pfx);
                }
            }
            if let Some(p) = self.peers.get_mut(&addr) {
                let wr_id = ((p.id as u64) << 32) | slot_idx as u64;
                if p.qp.post_recv(wr_id, &p.recv, slot_idx, slot).is_err() {
                    self.fail_peer(addr);
                }
            }
        }
        self.wcs = wcs;
        self.wcs.clear();
        for addr in flush {
            if self.flush_peer(addr).is_err() {
                self.fail_peer(addr);
            }
        }
        delivered
    }

    fn probe_stalled(&mut self) {
        // Runs on every batch: look at the peers at most every PROBE_CHECK, not per poll.
        let now = verbs::coarse_now_ns();
        if now.saturating_sub(self.last_probe_check) < PROBE_CHECK.as_nanos() as u64 {
            return;
        }
        self.last_probe_check = now;
        if !self.stalled_any() {
            return;
        }
        let (req_every, probe_after) = (REQ_EVERY.as_nanos() as u64, PROBE_AFTER.as_nanos() as u64);
        let mut due = Vec::new();
        for (&addr, p) in &mut self.peers {
            if p.remote.is_none() {
                if !p.pending.is_empty() && now.saturating_sub(p.last_req) >= req_every {
                    p.last_req = now;
                    due.push((addr, oob::REQ, 0));
                }
                continue;
            }
            if p.stalled_since
                .is_some_and(|t| now.saturating_sub(t) >= probe_after)
                && now.saturating_sub(p.last_probe) >= probe_after
            {
                p.last_probe = now;
                let echo = p.remote.map_or(0, |r| r.1);
                due.push((addr, oob::PROBE, echo));
            }
        }
        for (addr, kind, echo) in due {
            self.oob(addr, kind, echo);
        }
    }

    /// Polls the CQ into the stash that the next `recv_batch` processes.
    fn poll_cq_stash(&mut self) -> Result<usize, TransportError> {
        let mut wcs = std::mem::take(&mut self.wcs);
        let n = self.dev.poll(&mut wcs, 64);
        self.wcs = wcs;
        n.map_err(|e| io("poll the completion queue", e))
    }

    fn note_events(&mut self, toks: &[u64]) {
        if toks.contains(&TOKEN_EVENTFD) {
            let _ = verbs::fd::read8(self.eventfd.0.as_raw_fd());
        }
        if toks.contains(&TOKEN_CQ) {
            self.dev.drain_events();
        }
        if toks.contains(&TOKEN_UDP) {
            self.udp_ready = true;
        }
    }

    /// Busy-polling wait: spins on the CQ (no system call); looks at the other fds every
    /// 256 turns.
    fn spin(&mut self, timeout: Option<Duration>, mask: EventMask) -> Result<(), TransportError> {
        let deadline = timeout.map(|t| verbs::coarse_now_ns() + t.as_nanos() as u64);
        let mut turn = 0u32;
        loop {
            if mask.network && self.poll_cq_stash()? > 0 {
                return Ok(());
            }
            turn = turn.wrapping_add(1);
            if turn.is_multiple_of(256) {
                let toks = verbs::fd::epoll_wait(self.epoll.as_raw_fd(), 0)
                    .map_err(|e| io("epoll_wait", e))?;
                self.note_events(&toks);
                let woken = toks.iter().any(|&t| match t {
                    TOKEN_EVENTFD => mask.handle,
                    _ => mask.network,
                });
                if woken {
                    return Ok(());
                }
                if deadline.is_some_and(|d| verbs::coarse_now_ns() >= d) {
                    return Ok(());
                }
            }
            std::hint::spin_loop();
        }
    }

    fn stalled_any(&self) -> bool {
        self.peers
            .values()
            .any(|p| p.stalled_since.is_some() || (p.remote.is_none() && !p.pending.is_empty()))
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
                    p.last_req = verbs::coarse_now_ns();
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
            let toks = verbs::fd::epoll_wait(self.epoll.as_raw_fd(), ms)
                .map_err(|e| io("epoll_wait", e))?;
            self.note_events(&toks);
            // Only the sources in `mask` wake the caller (the others are noted and handled
            // at the next poll); the deadline always does.
            let woken = toks.iter().any(|&t| match t {
                TOKEN_EVENTFD => mask.handle,
                _ => mask.network,
            });
            if woken || toks.is_empty() || deadline.is_some_and(|d| Instant::now() >= d) {
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
mod tests {
    use super::*;

    #[test]
    fn connection_datagrams_round_trip_and_garbage_is_refused() {
        let m = oob::Msg {
            kind: oob::REQ,
            qpn: 0x12_3456,
            psn: 0xab_cdef,
            lid: 7,
            gid: verbs::gid_of("10.99.0.1".parse().unwrap()),
            nonce: 0xdead_beef_0123_4567,
            echo: 42,
        };
        let b = m.encode();
        assert_eq!(oob::Msg::decode(&b), Some(m));
        // Truncated, lengthened, wrong magic, wrong version, unknown kind: all refused.
        assert_eq!(oob::Msg::decode(&b[..oob::LEN - 1]), None);
        let mut long = b.to_vec();
        long.push(0);
        assert_eq!(oob::Msg::decode(&long), None);
        for (i, v) in [(0usize, 0u8), (4, 9), (5, 0), (5, 4)] {
            let mut bad = b;
            bad[i] = v;
            assert_eq!(oob::Msg::decode(&bad), None, "byte {i} = {v} accepted");
        }
        // Random garbage of every length never decodes to a message with a bad kind.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for n in 0..200 {
            let g: Vec<u8> = (0..n % 64)
                .map(|_| {
                    x = mix(x);
                    x as u8
                })
                .collect();
            if let Some(m) = oob::Msg::decode(&g) {
                assert!((oob::REQ..=oob::PROBE).contains(&m.kind));
            }
        }
    }

    /// A bulk's ranges cut into chunks: every byte once, in order, at the right remote
    /// address, no chunk over the byte or scatter-entry limit, the last one flagged.
    #[test]
    fn a_bulk_is_cut_into_bounded_chunks_covering_every_byte_once() {
        let cases: Vec<(Vec<(usize, usize)>, usize)> = vec![
            (vec![(0, 64 << 20)], 1 << 20),
            (vec![(0, 32 << 20), ((32 << 20) + 4096, 32 << 20)], 1 << 20),
            (vec![(0, 10), (100, 0), (200, 7), (300, 25)], 8),
            (vec![(5, 3)], 1 << 20),
            ((0..40).map(|i| (i * 100, 3)).collect(), 1000),
        ];
        for (src, chunk) in cases {
            let total: usize = src.iter().map(|r| r.1).sum();
            let mut cur = BulkCursor::new(&src, 9, 1 << 40);
            let mut placed = Vec::new();
            let mut next_raddr = 1u64 << 40;
            let mut chunks = 0;
            loop {
                let (sges, raddr, last) = cur.next_chunk(chunk);
                chunks += 1;
                assert_eq!(
                    raddr, next_raddr,
                    "{src:?}: chunk {chunks} lands at the wrong place"
                );
                let len: usize = sges.iter().map(|r| r.1).sum();
                assert!(len > 0 && len <= chunk, "{src:?}: chunk of {len} bytes");
                assert!(sges.len() <= verbs::MAX_SGE);
                next_raddr += len as u64;
                for (off, n) in sges {
                    placed.extend(off..off + n);
                }
                if last {
                    break;
                }
                assert!(chunks < 100_000);
            }
            let want: Vec<usize> = src.iter().flat_map(|&(o, n)| o..o + n).collect();
            assert_eq!(placed, want, "{src:?}");
            assert_eq!(next_raddr - (1 << 40), total as u64);
            assert!(cur.done());
            if src == vec![(0, 64 << 20)] {
                assert_eq!(chunks, 64);
            }
        }
    }

    #[test]
    fn the_gid_of_an_ipv4_address_is_v4_mapped() {
        let g = verbs::gid_of("10.99.0.1".parse().unwrap());
        assert_eq!(
            std::net::Ipv6Addr::from(g),
            "::ffff:10.99.0.1".parse::<std::net::Ipv6Addr>().unwrap()
        );
        let v6: std::net::Ipv6Addr = "fe80::1".parse().unwrap();
        assert_eq!(verbs::gid_of(v6.into()), v6.octets());
    }

    #[test]
    fn the_fast_clock_is_monotonic_and_tracks_real_time() {
        let c = verbs::FastClock::new();
        let t0 = c.now_ns();
        let mut last = t0;
        for _ in 0..100_000 {
            let t = c.now_ns();
            assert!(t >= last, "clock went back: {t} < {last}");
            last = t;
        }
        let wall = std::time::Instant::now();
        std::thread::sleep(Duration::from_millis(50));
        let dt = c.now_ns() - t0;
        let real = wall.elapsed().as_nanos() as u64;
        assert!(dt >= 45_000_000, "clock advanced {dt} ns over >= 50 ms");
        assert!(
            dt <= real + 200_000_000,
            "clock ran fast: {dt} ns vs {real} ns"
        );
    }

    #[test]
    fn binding_without_a_device_names_the_fix() {
        if !verbs::device_names().is_empty() {
            return;
        }
        let e = RdmaTransport::bind("127.0.0.1:0".parse().unwrap(), RdmaConfig::default())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("RDMA") && (e.contains("rdma-core") || e.contains("not found")),
            "{e}"
        );
    }

    #[test]
    fn a_receive_depth_without_room_for_a_window_is_refused() {
        let cfg = RdmaConfig {
            recv_depth: 16,
            ..RdmaConfig::default()
        };
        let e = RdmaTransport::bind("127.0.0.1:0".parse().unwrap(), cfg)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("recv_depth 16"), "{e}");
    }
}
