//! `am-udp`: the UDP driver of the Active Messages layer.
//!
//! [`UdpTransport`] implements [`am_core::Transport`] over one UDP socket (IPv4 or IPv6):
//! `recvmmsg`/`sendmmsg` batching, one epoll set holding the socket, an eventfd for
//! cross-thread wake-ups and any other fd a shard loop adds (an io_uring eventfd, say),
//! and optional busy-polling for latency. It holds no protocol logic: sequencing,
//! fragmentation to the path MTU, pacing and retransmission are the engine's, because UDP
//! provides none of them (its [`Capabilities`] say so).
//!
//! Every `unsafe` block is in the `sys` module (the `recvmmsg`/`sendmmsg` batches and
//! socket options); the crate root denies `unsafe` elsewhere.

#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod sys;

use am_core::{Capabilities, EventMask, Notify, Time, Transmit, Transport, TransportError};
use am_os::{Epoll, EpollEvents, EventFd};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};
use sys::{Received, RecvBufs, SendGroup, SendScratch};

/// Errors setting up the UDP driver.
#[derive(Debug, thiserror::Error)]
pub enum UdpError {
    /// Could not bind.
    #[error(
        "cannot bind UDP socket to {addr}: {source} (is the address local and the port free?)"
    )]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// Settings of the UDP driver.
#[derive(Clone, Debug)]
pub struct UdpConfig {
    /// Path MTU in bytes (IP and UDP headers are subtracted); default 1500.
    pub mtu: usize,
    /// Datagrams per `recvmmsg`/`sendmmsg` call; default 32.
    pub batch: usize,
    /// Spin instead of sleeping in `wait` (lower latency, one core busy).
    pub busy_poll: bool,
    /// Let the kernel segment runs of full-size datagrams to one peer (UDP GSO); switched
    /// off by itself if the path refuses it.
    pub gso: bool,
    /// Accept GRO-coalesced receives (UDP_GRO), split back into datagrams here. Off by
    /// default: on loopback it made 16 MiB streaming 2.5x faster and 4 KiB round trips
    /// 25% faster, but small round trips 0.6 us slower (`bench/RESULTS.md`). Costs 64 KiB
    /// per receive slot instead of one datagram.
    pub gro: bool,
    /// Socket receive buffer in bytes; default 8 MiB (forced as root).
    pub recv_buffer_bytes: usize,
    /// Socket send buffer in bytes; default 4 MiB.
    pub send_buffer_bytes: usize,
}

impl Default for UdpConfig {
    fn default() -> Self {
        UdpConfig {
            mtu: 1500,
            batch: 32,
            busy_poll: false,
            gso: true,
            gro: false,
            recv_buffer_bytes: 8 << 20,
            send_buffer_bytes: 4 << 20,
        }
    }
}

/// Counters of the driver itself.
#[derive(Clone, Debug, Default)]
pub struct UdpStats {
    /// `recvmmsg` calls that returned datagrams.
    pub recv_calls: u64,
    /// `sendmmsg` calls.
    pub send_calls: u64,
    /// Datagrams the OS refused to send (dropped; the engine retransmits).
    pub send_errors: u64,
    /// Received datagrams larger than the buffer (dropped).
    pub truncated: u64,
    /// Times `wait` slept in epoll.
    pub sleeps: u64,
    /// Messages sent as one GSO (UDP segmentation offload) super-datagram.
    pub gso_sends: u64,
    /// Received buffers that GRO had coalesced from several datagrams.
    pub gro_buffers: u64,
    /// GSO was refused by the path and switched off.
    pub gso_disabled: bool,
}

/// The transport's eventfd, as the engine's cross-thread wake-up.
struct Waker(EventFd);

impl Notify for Waker {
    fn notify(&self) {
        self.0.signal();
    }
}

const TOKEN_SOCKET: u64 = 1;
const TOKEN_EVENTFD: u64 = 2;
const TOKEN_EXTRA: u64 = 3;

/// A UDP socket driving one endpoint.
pub struct UdpTransport {
    gso: bool,
    recv_hint: usize,
    send_scratch: SendScratch,
    /// The groups of the `sendmmsg` being built (reused).
    send_groups: Vec<SendGroup>,
    socket: Socket,
    local: SocketAddr,
    epoll: Epoll,
    epoll_events: EpollEvents,
    waker: Arc<Waker>,
    cfg: UdpConfig,
    origin: Instant,
    seed: u64,
    mask: EventMask,
    recv: RecvBufs,
    stats: UdpStats,
}

fn sys<T>(what: &'static str, r: io::Result<T>) -> Result<T, UdpError> {
    r.map_err(|source| UdpError::Sys { what, source })
}

/// A seed for the engine's randomness that differs between processes and sockets.
fn random_seed(local: &SocketAddr) -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.write_u32(std::process::id());
    h.write_u16(local.port());
    h.finish()
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
}

impl UdpTransport {
    /// Binds a socket at `addr` (port 0 picks one).
    pub fn bind(addr: SocketAddr, cfg: UdpConfig) -> Result<UdpTransport, UdpError> {
        let domain = if addr.is_ipv4() {
            Domain::IPV4
        } else {
            Domain::IPV6
        };
        let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))
            .map_err(|source| UdpError::Bind { addr, source })?;
        if addr.is_ipv6() {
            let _ = socket.set_only_v6(false);
        }
        socket
            .bind(&SockAddr::from(addr))
            .map_err(|source| UdpError::Bind { addr, source })?;
        Self::from_socket(socket.into(), cfg)
    }

    /// Drives an already bound socket (for example one made inside a network namespace).
    pub fn from_socket(socket: UdpSocket, cfg: UdpConfig) -> Result<UdpTransport, UdpError> {
        let socket = Socket::from(socket);
        sys("set non-blocking", socket.set_nonblocking(true))?;
        // Large buffers so a window of bulk fragments fits; force past rmem_max as root.
        if socket.set_recv_buffer_size(cfg.recv_buffer_bytes).is_ok() {
            force_buffer(&socket, libc::SO_RCVBUFFORCE, cfg.recv_buffer_bytes);
        }
        if socket.set_send_buffer_size(cfg.send_buffer_bytes).is_ok() {
            force_buffer(&socket, libc::SO_SNDBUFFORCE, cfg.send_buffer_bytes);
        }
        let local = sys("local address", socket.local_addr())?
            .as_socket()
            .ok_or(UdpError::Sys {
                what: "local address",
                source: io::Error::other("not an inet socket"),
            })?;
        let epoll = sys("epoll_create1", Epoll::new())?;
        let eventfd = sys("eventfd", EventFd::new())?;
        sys(
            "epoll_ctl(socket)",
            epoll.add(socket.as_raw_fd(), TOKEN_SOCKET),
        )?;
        sys(
            "epoll_ctl(eventfd)",
            epoll.add(eventfd.as_raw_fd(), TOKEN_EVENTFD),
        )?;
        let max = Self::max_datagram_for(&local, cfg.mtu);
        let batch = cfg.batch.clamp(1, 1024);
        // GRO: the kernel may hand us several datagrams of one peer as one buffer with
        // their segment size (on loopback, a GSO send arrives whole).
        let gro = cfg.gro && sys::set_int_option(&socket, libc::SOL_UDP, sys::UDP_GRO, 1);
        let slot_bytes = if gro { 65_536 } else { max + 64 };
        Ok(UdpTransport {
            recv_hint: 1,
            gso: cfg.gso,
            send_scratch: SendScratch::default(),
            send_groups: Vec::with_capacity(batch),
            seed: random_seed(&local),
            socket,
            local,
            epoll,
            epoll_events: EpollEvents::default(),
            waker: Arc::new(Waker(eventfd)),
            cfg: UdpConfig { batch, ..cfg },
            origin: Instant::now(),
            mask: EventMask::default(),
            recv: RecvBufs::new(batch, slot_bytes),
            stats: UdpStats::default(),
        })
    }

    fn max_datagram_for(local: &SocketAddr, mtu: usize) -> usize {
        let ip = if local.is_ipv4() { 20 } else { 40 };
        // A UDP datagram carries at most 65,507 bytes over IPv4 (65,535 less the headers).
        mtu.saturating_sub(ip + 8).clamp(576, 65_507)
    }

    /// The epoll fd the endpoint sleeps on (it can itself be put in an outer epoll set).
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Adds another readable source (an io_uring eventfd, a timerfd...) to the epoll set,
    /// so `wait` wakes when it is ready. The caller keeps the fd open and drains it.
    pub fn add_source(&self, fd: RawFd) -> io::Result<()> {
        self.epoll.add(fd, TOKEN_EXTRA)
    }

    /// Removes a source added with [`UdpTransport::add_source`].
    pub fn remove_source(&self, fd: RawFd) -> io::Result<()> {
        self.epoll.remove(fd)
    }

    /// Driver counters.
    pub fn stats(&self) -> &UdpStats {
        &self.stats
    }

    fn apply_mask(&mut self, mask: EventMask) {
        if mask == self.mask {
            return;
        }
        let _ = self
            .epoll
            .watch(self.socket.as_raw_fd(), mask.network, TOKEN_SOCKET);
        let _ = self
            .epoll
            .watch(self.waker.0.as_raw_fd(), mask.handle, TOKEN_EVENTFD);
        self.mask = mask;
    }

    /// Groups `batch[from..]` for one `sendmmsg` into `self.send_groups`: a run of
    /// full-size datagrams to one peer (the fragments of a bulk) becomes one GSO message
    /// the kernel segments; others go alone; at most `batch` messages. Returns the end of
    /// the datagrams grouped.
    fn group_for_send(&mut self, batch: &[Transmit], from: usize) -> usize {
        self.send_groups.clear();
        let mut j = from;
        while j < batch.len() && self.send_groups.len() < self.cfg.batch {
            let seg = batch[j].bytes.len();
            let max_segs = if self.gso {
                (65_507 / seg.max(1)).min(64)
            } else {
                1
            };
            let mut k = j + 1;
            while k < batch.len()
                && k - j < max_segs
                && batch[k].to == batch[j].to
                && batch[k - 1].bytes.len() == seg
                && batch[k].bytes.len() <= seg
                && !batch[k].bytes.is_empty()
            {
                k += 1;
            }
            self.send_groups.push(SendGroup {
                first: j,
                count: k - j,
                segment: seg,
            });
            j = k;
        }
        j
    }
}

fn force_buffer(socket: &Socket, opt: libc::c_int, bytes: usize) {
    // Failure (not root) is harmless: the unforced size set before stands.
    let _ = sys::set_int_option(socket, libc::SOL_SOCKET, opt, bytes as libc::c_int);
}

/// What `send_batch` does after `sendmmsg` failed.
enum SendFailure {
    /// The socket is full: report what went so far.
    Full,
    /// Interrupted, or GSO just switched off: try again.
    Retry,
    /// This message cannot go: drop it (counted) and go on.
    Drop,
}

impl UdpTransport {
    fn classify_send_error(&mut self, e: &io::Error) -> SendFailure {
        let gso_used = self.send_groups.first().is_some_and(|g| g.count > 1);
        match e.kind() {
            io::ErrorKind::WouldBlock => SendFailure::Full,
            io::ErrorKind::Interrupted => SendFailure::Retry,
            _ if gso_used
                && matches!(
                    e.raw_os_error(),
                    Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
                ) =>
            {
                // The path cannot segment for us: send datagram by datagram.
                self.gso = false;
                self.stats.gso_disabled = true;
                SendFailure::Retry
            }
            // Unreachable network, refused...: the engine's timers handle the loss.
            _ => SendFailure::Drop,
        }
    }
}

impl Transport for UdpTransport {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            reliable: false,
            bulk_placement: false,
            max_datagram: Self::max_datagram_for(&self.local, self.cfg.mtu),
            max_window: u32::MAX,
        }
    }

    fn local_addr(&self) -> SocketAddr {
        self.local
    }

    fn now(&self) -> Time {
        Time(self.origin.elapsed().as_nanos() as u64 + 1)
    }

    fn seed(&self) -> u64 {
        self.seed
    }

    fn send_batch(&mut self, batch: &[Transmit]) -> Result<usize, TransportError> {
        let mut done = 0;
        while done < batch.len() {
            self.group_for_send(batch, done);
            self.stats.send_calls += 1;
            let fd = self.socket.as_raw_fd();
            let n = match self.send_scratch.sendmmsg(fd, batch, &self.send_groups) {
                Ok(n) => n,
                Err(e) => match self.classify_send_error(&e) {
                    SendFailure::Full => return Ok(done),
                    SendFailure::Retry => continue,
                    SendFailure::Drop => {
                        self.stats.send_errors += 1;
                        done += self.send_groups.first().map_or(1, |g| g.count);
                        continue;
                    }
                },
            };
            let went = &self.send_groups[..n];
            done += went.iter().map(|g| g.count).sum::<usize>();
            self.stats.gso_sends += went.iter().filter(|g| g.count > 1).count() as u64;
            if n < self.send_groups.len() {
                return Ok(done);
            }
        }
        Ok(done)
    }

    fn recv_batch(
        &mut self,
        max: usize,
        deliver: &mut dyn FnMut(SocketAddr, &[u8]),
    ) -> Result<usize, TransportError> {
        let mut total = 0;
        while total < max {
            // Ask for as many datagrams as the last call found, doubled: one for ping-pong
            // traffic (so the kernel does not look for a second), the whole batch for a
            // stream.
            let want = (max - total).min(self.recv_hint).max(1);
            let n = match self.recv.recvmmsg(self.socket.as_raw_fd(), want) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => match e.kind() {
                    io::ErrorKind::WouldBlock => break,
                    io::ErrorKind::Interrupted => continue,
                    // ICMP errors surface here on some kernels; they carry no datagram.
                    io::ErrorKind::ConnectionRefused => continue,
                    _ => return Err(TransportError::Io(format!("recvmmsg: {e}"))),
                },
            };
            self.stats.recv_calls += 1;
            for i in 0..n {
                match self.recv.received(i) {
                    Received::Truncated => self.stats.truncated += 1,
                    Received::NoAddress => {}
                    // Several datagrams coalesced by GRO: hand them over one by one.
                    Received::Data {
                        from,
                        bytes,
                        gro_segment: Some(seg),
                    } if seg > 0 && seg < bytes.len() => {
                        self.stats.gro_buffers += 1;
                        for d in bytes.chunks(seg) {
                            deliver(from, d);
                        }
                    }
                    Received::Data { from, bytes, .. } => deliver(from, bytes),
                }
            }
            total += n;
            self.recv_hint = if n < want {
                n.max(1)
            } else {
                (want * 2).min(self.recv.slots())
            };
            if n < want {
                break;
            }
        }
        Ok(total)
    }

    fn wait(&mut self, timeout: Option<Duration>, mask: EventMask) -> Result<(), TransportError> {
        self.apply_mask(mask);
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let ms: i32 = if self.cfg.busy_poll {
                0
            } else {
                match deadline {
                    None => -1,
                    Some(d) => {
                        let left = d.saturating_duration_since(Instant::now());
                        // Round up so we do not spin on sub-millisecond timeouts.
                        left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
                    }
                }
            };
            if !self.cfg.busy_poll {
                self.stats.sleeps += 1;
            }
            self.epoll
                .wait(&mut self.epoll_events, ms)
                .map_err(|e| TransportError::Io(format!("epoll_wait: {e}")))?;
            if self.epoll_events.tokens().any(|t| t == TOKEN_EVENTFD) {
                self.waker.0.drain();
            }
            // Busy-polling spins until an event or the deadline; sleeping returns at once.
            let woke = !self.epoll_events.is_empty();
            if woke || !self.cfg.busy_poll || deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(());
            }
            std::hint::spin_loop();
        }
    }

    fn notifier(&self) -> Arc<dyn Notify> {
        self.waker.clone()
    }
}
