//! `am-dpdk`: the DPDK driver of the Active Messages layer.
//!
//! [`DpdkTransport`] implements [`am_core::Transport`] over one Rx/Tx queue pair of a DPDK
//! port: Ethernet/IPv4/UDP frames built and parsed in user space ([`frame`]) carrying
//! exactly the datagrams `am-udp` sends, so a DPDK endpoint and an `am-udp` endpoint on a
//! kernel socket talk to each other. Like `am-udp` it holds no protocol logic: sequencing,
//! fragmentation to the MTU, pacing of bulk fragments and retransmission are the engine's
//! (its [`Capabilities`] say the path is unreliable).
//!
//! * **Neighbours**: a table from [`DpdkConfig::neighbours`], filled further by ARP:
//!   requests for our address are answered (so kernel peers reach us) and their sender
//!   learned; a datagram to an unknown address is held (up to [`ARP_HOLD`] per
//!   destination) while an ARP request goes out, and sent when the reply comes.
//! * **Checksums**: the IPv4 header checksum is left to the port where it offers
//!   `RTE_ETH_TX_OFFLOAD_IPV4_CKSUM` and checked by it where it offers the Rx offload;
//!   otherwise both are done here. UDP checksums are computed and (when not zero) checked
//!   here.
//! * **Bad frames** (not IPv4/ARP, not UDP, another address or port, truncated, bad
//!   checksums, fragments, multi-segment) are counted in [`DpdkStats`] by reason and
//!   dropped; they never reach the engine.
//! * **Zero copy on receive**: the engine reads each datagram straight from the mbuf, and
//!   the handler of a medium that arrives whole and in order reads the mbuf's bytes (the
//!   endpoint runs it inside `recv_batch`); the mbufs are freed after the burst.
//! * **Bursts**: receive and transmit in bursts of [`DpdkConfig::burst`]; a transmit the
//!   port does not take at once stays queued here (bounded) and goes first next time.
//! * **`wait`**: with Rx interrupts (ports that offer them, `net_tap` and most NICs) it
//!   sleeps on the queue's interrupt fd and the cross-thread eventfd; otherwise (the
//!   virtual devices ring, memif, af_packet) it spins for [`DpdkConfig::spin`] polling the
//!   queue, then sleeps [`DpdkConfig::sleep`] at a time on the eventfd (`ppoll`) and
//!   returns so the endpoint polls again. [`DpdkConfig::busy_poll`] spins until the
//!   timeout instead (lowest latency, one core busy).
//!
//! One transport owns one queue: a shard loop per core each takes its own queue of the
//! port ([`sys::Port::take_queue`]) with its own mbuf pool, and no lock is taken on the
//! fast path. Which queue a frame arrives on is the port's business (RSS or flow rules on
//! a NIC); a transport drops datagrams for another UDP port (`wrong_port`).

#![deny(unsafe_code)]

pub mod frame;
/// The DPDK binding; without `libdpdk` at build time, a stand-in whose every attempt to
/// start DPDK fails with [`DpdkError::Missing`] naming what to install.
#[cfg_attr(am_dpdk_missing, path = "sys/missing.rs")]
pub mod sys;

/// Whether this build has DPDK (`libdpdk-dev` was found when it was compiled).
pub const AVAILABLE: bool = !cfg!(am_dpdk_missing);

use am_core::{Capabilities, EventMask, Notify, Time, Transmit, Transport, TransportError};
use frame::{Arp, Bad, Mac, Parsed, UdpAddrs, ARP_REPLY, ARP_REQUEST, BROADCAST};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
pub use sys::{DpdkError, Mbuf, MbufPool, Port, PortInfo, PortSpec, Queue, INSTALL_HINT};

/// Datagrams held per destination while its ARP reply is awaited (more are dropped and
/// counted; the engine retransmits them).
pub const ARP_HOLD: usize = 256;
/// How often an unanswered ARP request is repeated while datagrams wait.
const ARP_RETRY: Duration = Duration::from_millis(100);

/// Settings of the DPDK driver.
#[derive(Clone, Debug)]
pub struct DpdkConfig {
    /// This endpoint's IPv4 address and UDP port.
    pub addr: SocketAddrV4,
    /// The MAC to use (default: the port's; a locally administered one made from the
    /// address when the port has none, as ring ports do).
    pub mac: Option<Mac>,
    /// Path MTU (IP and UDP headers are subtracted); default 1500.
    pub mtu: usize,
    /// Frames per Rx/Tx burst; default 32.
    pub burst: usize,
    /// Static neighbours: IPv4 address to MAC (ARP adds to these; it never replaces one).
    pub neighbours: Vec<(Ipv4Addr, Mac)>,
    /// Without Rx interrupts, how long `wait` polls the queue before sleeping; default
    /// 50 us.
    pub spin: Duration,
    /// Without Rx interrupts, how long one sleep lasts before the queue is polled again;
    /// default 200 us.
    pub sleep: Duration,
    /// Spin in `wait` until the timeout instead of sleeping (lowest latency, a core busy).
    pub busy_poll: bool,
    /// Check UDP checksums of received datagrams (those that carry one); default on.
    pub verify_udp_checksum: bool,
}

impl DpdkConfig {
    /// Defaults at `addr`.
    pub fn new(addr: SocketAddrV4) -> DpdkConfig {
        DpdkConfig {
            addr,
            mac: None,
            mtu: 1500,
            burst: 32,
            neighbours: Vec::new(),
            spin: Duration::from_micros(50),
            sleep: Duration::from_micros(200),
            busy_poll: false,
            verify_udp_checksum: true,
        }
    }
}

/// Counters of the driver.
#[derive(Clone, Debug, Default)]
pub struct DpdkStats {
    /// Frames received (all, before any check).
    pub rx_frames: u64,
    /// Datagrams handed to the engine.
    pub rx_delivered: u64,
    /// Frames transmitted (taken by the port).
    pub tx_frames: u64,
    /// Rx bursts that returned frames.
    pub rx_bursts: u64,
    /// Tx bursts.
    pub tx_bursts: u64,
    /// Times the port took fewer frames than offered (the rest waited here).
    pub tx_partial: u64,
    /// Dropped frames by reason ([`frame::Bad`]).
    pub bad: BTreeMap<Bad, u64>,
    /// Frames for another MAC (not ours, not broadcast).
    pub not_our_mac: u64,
    /// Datagrams for another IPv4 address.
    pub not_our_address: u64,
    /// Datagrams for our address but another UDP port.
    pub wrong_port: u64,
    /// Frames in more than one segment (not taken).
    pub segmented: u64,
    /// Datagrams the engine asked to send that could not be (not IPv4, too large).
    pub unsendable: u64,
    /// Datagrams dropped because the ARP hold queue was full.
    pub arp_hold_dropped: u64,
    /// ARP requests sent.
    pub arp_requests: u64,
    /// ARP replies sent.
    pub arp_replies: u64,
    /// Neighbours learned from ARP.
    pub arp_learned: u64,
    /// Times the mbuf pool was empty on transmit.
    pub pool_empty: u64,
    /// Sleeps in `wait`.
    pub sleeps: u64,
    /// Wake-ups by an Rx interrupt.
    pub interrupts: u64,
    /// Times a memif client restarted its port to reconnect.
    pub relinks: u64,
}

/// Wakes `wait` from another thread: a flag the spinning loop reads and an eventfd the
/// sleeping one polls.
struct Waker {
    fd: am_os::EventFd,
    flag: AtomicBool,
}

impl Notify for Waker {
    fn notify(&self) {
        self.flag.store(true, Ordering::Release);
        self.fd.signal();
    }
}

impl Waker {
    /// Whether a wake-up came (and clears it).
    fn take(&self) -> bool {
        if !self.flag.swap(false, Ordering::AcqRel) {
            return false;
        }
        self.fd.drain();
        true
    }
}

struct Held {
    frames: VecDeque<(SocketAddrV4, Vec<u8>)>,
    last_request: Option<Instant>,
}

/// One queue pair of a DPDK port driving one endpoint.
pub struct DpdkTransport {
    queue: Queue,
    info: PortInfo,
    cfg: DpdkConfig,
    mac: Mac,
    neighbours: HashMap<Ipv4Addr, (Mac, bool)>,
    held: HashMap<Ipv4Addr, Held>,
    /// Frames built and not yet taken by the port.
    tx: Vec<Mbuf>,
    /// Frames received and not yet processed (a `wait` that spun found them).
    rx: Vec<Mbuf>,
    waker: Arc<Waker>,
    origin: Instant,
    clock: Option<sys::TscClock>,
    /// The last neighbour looked up (most traffic goes to one peer at a time).
    last_neighbour: Option<(Ipv4Addr, Mac)>,
    seed: u64,
    ip_id: u16,
    stats: DpdkStats,
    /// The last `wait` slept without finding anything: the next one sleeps at once.
    idle: bool,
    /// The Rx interrupt's epoll set, where the port has Rx interrupts.
    sleeper: Option<sys::RxSleeper>,
    /// When the link was last checked (memif clients reconnect when it is down).
    link_checked: Time,
}

/// A locally administered unicast MAC made from an IPv4 address (02:00:a.b.c.d).
pub fn mac_for(ip: Ipv4Addr) -> Mac {
    let o = ip.octets();
    [0x02, 0x00, o[0], o[1], o[2], o[3]]
}

impl DpdkTransport {
    /// Opens the device `spec` (see [`Port::open`]) with one queue pair and drives it.
    pub fn open(spec: &str, cfg: DpdkConfig) -> Result<DpdkTransport, DpdkError> {
        let mut port = Port::open(spec, &PortSpec::default())?;
        let q = port.take_queue(0)?;
        DpdkTransport::new(q, port.info().clone(), cfg)
    }

    /// A port that must be restarted when its link is down (a one-queue memif client,
    /// [`PortInfo::restart_on_link_down`]) is, at most every 500 ms: so it reconnects
    /// when its server restarts.
    fn check_link(&mut self) {
        if !self.info.restart_on_link_down {
            return;
        }
        // The transport's own clock (the TSC): this runs on every send and wait.
        let now = self.now();
        if now.since_ns(self.link_checked) < 500_000_000 {
            return;
        }
        self.link_checked = now;
        if self.queue.stopped() || !self.queue.link_up() {
            self.stats.relinks += 1;
            let _ = self.queue.restart_port();
        }
    }

    /// Drives `queue` of the port described by `info`.
    pub fn new(queue: Queue, info: PortInfo, cfg: DpdkConfig) -> Result<DpdkTransport, DpdkError> {
        if cfg.mtu < 576 || cfg.mtu > 2048 - frame::ETH_LEN {
            return Err(DpdkError::Invalid(format!(
                "mtu {} out of range 576..={} (one mbuf per frame)",
                cfg.mtu,
                2048 - frame::ETH_LEN
            )));
        }
        let fd = am_os::EventFd::new().map_err(|e| DpdkError::Invalid(format!("eventfd: {e}")))?;
        let mac = match cfg.mac {
            Some(m) => m,
            None if info.mac != [0; 6] => info.mac,
            None => mac_for(*cfg.addr.ip()),
        };
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.write_u16(cfg.addr.port());
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        let neighbours = cfg
            .neighbours
            .iter()
            .map(|&(ip, m)| (ip, (m, true)))
            .collect();
        let mut queue = queue;
        let sleeper = queue.rx_sleeper(std::os::fd::AsRawFd::as_raw_fd(&fd))?;
        Ok(DpdkTransport {
            sleeper,
            tx: Vec::with_capacity(cfg.burst * 2),
            rx: Vec::with_capacity(cfg.burst),
            queue,
            info,
            mac,
            neighbours,
            held: HashMap::new(),
            waker: Arc::new(Waker {
                fd,
                flag: AtomicBool::new(false),
            }),
            origin: Instant::now(),
            clock: sys::TscClock::new(),
            last_neighbour: None,
            seed: h.finish(),
            ip_id: 0,
            stats: DpdkStats::default(),
            idle: false,
            link_checked: Time(0),
            cfg,
        })
    }

    /// Driver counters.
    pub fn stats(&self) -> &DpdkStats {
        &self.stats
    }

    /// The MAC this transport uses.
    pub fn mac(&self) -> Mac {
        self.mac
    }

    /// How `wait` sleeps on this port: `"busy-poll"` ([`DpdkConfig::busy_poll`]),
    /// `"rx-interrupts"` (the port has Rx interrupts) or `"spin-then-sleep"` (it has none:
    /// a bounded spin after traffic, then short sleeps).
    pub fn wait_mode(&self) -> &'static str {
        if self.cfg.busy_poll {
            "busy-poll"
        } else if self.sleeper.is_some() {
            "rx-interrupts"
        } else {
            "spin-then-sleep"
        }
    }

    /// Whether the port's link is up (a memif peer connected).
    pub fn link_up(&self) -> bool {
        self.queue.link_up()
    }

    /// The port it runs on.
    pub fn port_info(&self) -> &PortInfo {
        &self.info
    }

    fn max_datagram(&self) -> usize {
        self.cfg.mtu - frame::IPV4_LEN - frame::UDP_LEN
    }

    /// Builds a frame of at most `len` bytes in a fresh mbuf with `fill` and queues it for
    /// transmission, asking the port for the IPv4 header checksum when `ip_offload`; false
    /// when the pool is empty (a frame that cannot be built is counted and dropped).
    fn queue_frame(
        &mut self,
        len: usize,
        ip_offload: bool,
        fill: impl FnOnce(&mut [u8]) -> Option<usize>,
    ) -> bool {
        let Some(mut m) = self.queue.alloc() else {
            self.stats.pool_empty += 1;
            return false;
        };
        if m.append(len.max(frame::MIN_FRAME)).and_then(fill).is_none() {
            self.stats.unsendable += 1;
            return true;
        }
        if ip_offload {
            m.offload_ipv4_checksum(frame::ETH_LEN as u16, frame::IPV4_LEN as u16);
        }
        self.tx.push(m);
        true
    }

    fn queue_udp(&mut self, dst_mac: Mac, to: SocketAddrV4, payload: &[u8]) -> bool {
        let a = UdpAddrs {
            src_mac: self.mac,
            dst_mac,
            src: self.cfg.addr,
            dst: to,
        };
        self.ip_id = self.ip_id.wrapping_add(1);
        let id = self.ip_id;
        let offload = self.info.tx_ipv4_checksum;
        self.queue_frame(frame::HEADERS + payload.len(), offload, |b| {
            frame::write_udp(b, &a, id, payload, !offload, true)
        })
    }

    fn queue_arp(&mut self, arp: Arp) {
        if self.queue_frame(frame::ARP_FRAME, false, |b| frame::write_arp(b, &arp)) {
            match arp.op {
                ARP_REQUEST => self.stats.arp_requests += 1,
                _ => self.stats.arp_replies += 1,
            }
        }
    }

    fn request_neighbour(&mut self, ip: Ipv4Addr) {
        self.queue_arp(Arp {
            op: ARP_REQUEST,
            sha: self.mac,
            spa: *self.cfg.addr.ip(),
            tha: [0; 6],
            tpa: ip,
        });
    }

    /// Pushes queued frames to the port; returns whether all went.
    fn flush(&mut self) -> bool {
        while !self.tx.is_empty() {
            let offered = self.tx.len();
            let n = self.queue.tx_burst(&mut self.tx);
            self.stats.tx_bursts += 1;
            self.stats.tx_frames += n as u64;
            if n < offered {
                self.stats.tx_partial += 1;
                return false;
            }
        }
        true
    }

    fn learn(&mut self, ip: Ipv4Addr, mac: Mac) {
        if ip.is_unspecified() || mac == BROADCAST || mac[0] & 1 != 0 {
            return;
        }
        match self.neighbours.get(&ip) {
            Some(&(_, true)) => return,
            Some(&(m, false)) if m == mac => {}
            _ => {
                self.last_neighbour = None;
                self.neighbours.insert(ip, (mac, false));
                self.stats.arp_learned += 1;
            }
        }
        if let Some(h) = self.held.remove(&ip) {
            for (to, bytes) in h.frames {
                if !self.queue_udp(mac, to, &bytes) {
                    self.stats.arp_hold_dropped += 1;
                }
            }
        }
    }

    fn on_arp(&mut self, dst_mac: Mac, arp: Arp) {
        if dst_mac != self.mac && dst_mac != BROADCAST {
            self.stats.not_our_mac += 1;
            return;
        }
        let ours = arp.tpa == *self.cfg.addr.ip();
        if ours || self.neighbours.contains_key(&arp.spa) || self.held.contains_key(&arp.spa) {
            self.learn(arp.spa, arp.sha);
        }
        if ours && arp.op == ARP_REQUEST {
            self.queue_arp(Arp {
                op: ARP_REPLY,
                sha: self.mac,
                spa: *self.cfg.addr.ip(),
                tha: arp.sha,
                tpa: arp.spa,
            });
        }
    }

    /// Checks one received frame; the datagram it carries, if any, for the engine.
    fn classify<'a>(&mut self, m: &'a Mbuf) -> Option<(SocketAddr, &'a [u8])> {
        self.stats.rx_frames += 1;
        if m.segments() != 1 || m.pkt_len() != m.data().len() {
            self.stats.segmented += 1;
            return None;
        }
        let checked = if self.info.rx_ipv4_checksum {
            m.ipv4_checksum_checked()
        } else {
            None
        };
        match frame::parse(m.data(), checked, self.cfg.verify_udp_checksum) {
            Err(b) => {
                *self.stats.bad.entry(b).or_default() += 1;
                None
            }
            Ok(Parsed::Arp { dst_mac, arp }) => {
                self.on_arp(dst_mac, arp);
                None
            }
            Ok(Parsed::Udp {
                dst_mac,
                src,
                dst,
                payload,
                ..
            }) => {
                if dst_mac != self.mac {
                    self.stats.not_our_mac += 1;
                } else if dst.ip() != self.cfg.addr.ip() {
                    self.stats.not_our_address += 1;
                } else if dst.port() != self.cfg.addr.port() {
                    self.stats.wrong_port += 1;
                } else {
                    self.stats.rx_delivered += 1;
                    return Some((SocketAddr::V4(src), payload));
                }
                None
            }
        }
    }

    /// Receives a burst into `self.rx` if it is empty; returns how many frames wait there.
    fn fill_rx(&mut self) -> usize {
        if self.rx.is_empty() {
            let n = self.queue.rx_burst(&mut self.rx, self.cfg.burst);
            if n > 0 {
                self.stats.rx_bursts += 1;
            }
        }
        self.rx.len()
    }

    fn spin_poll(&mut self, until: Instant) -> bool {
        loop {
            if self.fill_rx() > 0 || self.waker.take() {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// Drains the cross-thread eventfd.
    fn drain_waker(&mut self) {
        self.waker.flag.store(false, Ordering::Release);
        self.waker.fd.drain();
    }

    /// Sleeps up to `d` on the cross-thread eventfd (the port has no Rx interrupts).
    fn sleep(&mut self, d: Duration, mask: EventMask) -> Result<(), TransportError> {
        self.stats.sleeps += 1;
        let woken = self
            .waker
            .fd
            .wait_readable(d, mask.handle)
            .map_err(|e| TransportError::Io(format!("ppoll: {e}")))?;
        if woken {
            self.drain_waker();
        }
        Ok(())
    }

    /// Sleeps on the Rx interrupt and the eventfd: arm, look at the queue once more (a
    /// frame may have come before arming), sleep, disarm.
    fn sleep_interrupt(&mut self, d: Duration) {
        self.queue.rx_interrupt(true);
        if self.fill_rx() > 0 || self.waker.take() {
            self.queue.rx_interrupt(false);
            return;
        }
        let ms = d.as_micros().div_ceil(1000).min(1000) as i32;
        self.stats.sleeps += 1;
        let (rx, wake) = match self.sleeper.as_mut() {
            Some(s) => s.sleep(ms),
            None => (false, false),
        };
        self.queue.rx_interrupt(false);
        if rx {
            self.stats.interrupts += 1;
        }
        if wake {
            self.drain_waker();
        }
    }
}

impl Transport for DpdkTransport {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            reliable: false,
            bulk_placement: false,
            max_datagram: self.max_datagram(),
            // Never more in flight from one peer than half the Rx descriptors.
            max_window: (self.queue.rx_desc() as u32 / 2).max(16),
        }
    }

    fn local_addr(&self) -> SocketAddr {
        SocketAddr::V4(self.cfg.addr)
    }

    fn now(&self) -> Time {
        match &self.clock {
            Some(c) => Time(c.ns() + 1),
            None => Time(self.origin.elapsed().as_nanos() as u64 + 1),
        }
    }

    fn seed(&self) -> u64 {
        self.seed
    }

    fn send_batch(&mut self, batch: &[Transmit]) -> Result<usize, TransportError> {
        self.check_link();
        // Frames the port did not take last time go first; while they wait, nothing new.
        if !self.flush() {
            return Ok(0);
        }
        let max = self.max_datagram();
        let mut done = 0;
        for t in batch {
            let to = match t.to {
                SocketAddr::V4(a) if t.bytes.len() <= max => a,
                _ => {
                    self.stats.unsendable += 1;
                    done += 1;
                    continue;
                }
            };
            let known = match self.last_neighbour {
                Some((ip, mac)) if ip == *to.ip() => Some(mac),
                _ => self.neighbours.get(to.ip()).map(|n| n.0),
            };
            match known {
                Some(mac) => {
                    self.last_neighbour = Some((*to.ip(), mac));
                    if !self.queue_udp(mac, to, &t.bytes) {
                        break;
                    }
                }
                None => {
                    let now = Instant::now();
                    let h = self.held.entry(*to.ip()).or_insert_with(|| Held {
                        frames: VecDeque::new(),
                        last_request: None,
                    });
                    if h.frames.len() < ARP_HOLD {
                        h.frames.push_back((to, t.bytes.clone()));
                    } else {
                        self.stats.arp_hold_dropped += 1;
                    }
                    let ask = h.last_request.is_none_or(|l| now - l >= ARP_RETRY);
                    if ask {
                        h.last_request = Some(now);
                        self.request_neighbour(*to.ip());
                    }
                }
            }
            done += 1;
            if self.tx.len() >= self.cfg.burst && !self.flush() {
                break;
            }
        }
        self.flush();
        Ok(done)
    }

    fn recv_batch(
        &mut self,
        max: usize,
        deliver: &mut dyn FnMut(SocketAddr, &[u8]),
    ) -> Result<usize, TransportError> {
        self.flush();
        let mut total = 0;
        while total < max {
            if self.fill_rx() == 0 {
                break;
            }
            let frames = std::mem::take(&mut self.rx);
            let full = frames.len() >= self.cfg.burst;
            for m in &frames {
                if let Some((from, d)) = self.classify(m) {
                    deliver(from, d);
                    total += 1;
                }
            }
            // The mbufs are freed here, after the engine has read them.
            let mut frames = frames;
            frames.clear();
            self.rx = frames;
            if !full {
                break;
            }
        }
        if total > 0 {
            self.idle = false;
        }
        // ARP replies made while receiving.
        self.flush();
        Ok(total)
    }

    fn wait(&mut self, timeout: Option<Duration>, mask: EventMask) -> Result<(), TransportError> {
        self.check_link();
        self.flush();
        let start = Instant::now();
        let deadline = timeout.map(|t| start + t);
        if mask.network && !self.rx.is_empty() {
            return Ok(());
        }
        if timeout == Some(Duration::ZERO) {
            return Ok(());
        }
        let far = start + Duration::from_secs(3600);
        if self.cfg.busy_poll {
            self.spin_poll(deadline.unwrap_or(far));
            return Ok(());
        }
        if self.sleeper.is_some() && mask.network {
            let d = deadline.map_or(Duration::from_secs(1), |d| {
                d.saturating_duration_since(start)
            });
            self.sleep_interrupt(d);
            return Ok(());
        }
        // Spin a little after traffic (a reply often comes within microseconds), then sleep
        // in short steps, polling the queue between them.
        if !self.idle && mask.network {
            let until = (start + self.cfg.spin).min(deadline.unwrap_or(far));
            if self.spin_poll(until) {
                return Ok(());
            }
        }
        let left = deadline.map_or(self.cfg.sleep, |d| {
            d.saturating_duration_since(Instant::now())
        });
        if left.is_zero() {
            return Ok(());
        }
        self.sleep(left.min(self.cfg.sleep), mask)?;
        self.idle = !(mask.network && self.fill_rx() > 0);
        Ok(())
    }

    fn notifier(&self) -> Arc<dyn Notify> {
        self.waker.clone()
    }
}
