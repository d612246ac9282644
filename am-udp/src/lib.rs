//! `am-udp`: the UDP driver of the Active Messages layer.
//!
//! [`UdpTransport`] implements [`am_core::Transport`] over one UDP socket (IPv4 or IPv6):
//! `recvmmsg`/`sendmmsg` batching, one epoll set holding the socket, an eventfd for
//! cross-thread wake-ups and any other fd a shard loop adds (an io_uring eventfd, say),
//! and optional busy-polling for latency. It holds no protocol logic: sequencing,
//! fragmentation to the path MTU, pacing and retransmission are the engine's, because UDP
//! provides none of them (its [`Capabilities`] say so).

use am_core::{Capabilities, EventMask, Notify, Time, Transmit, Transport, TransportError};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

struct EventFd(OwnedFd);

impl Notify for EventFd {
    fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a valid u64 to an eventfd we own.
        unsafe {
            libc::write(
                self.0.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            );
        }
    }
}

const TOKEN_SOCKET: u64 = 1;
const TOKEN_EVENTFD: u64 = 2;
const TOKEN_EXTRA: u64 = 3;

/// Receive buffers for one `recvmmsg` batch.
struct RecvBufs {
    bufs: Vec<Vec<u8>>,
    addrs: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    /// One control buffer per slot (for the UDP_GRO segment size), 8-byte aligned.
    cmsgs: Vec<[u64; 8]>,
}

/// `UDP_GRO` from linux/udp.h (the libc crate does not export it for glibc).
const UDP_GRO: libc::c_int = 104;

// SAFETY: the raw pointers in `iovs` and `hdrs` only ever point into the heap buffers of
// `bufs`, `addrs` and `iovs` of the same struct, which are never resized after
// construction; moving the struct to another thread moves what they point to with it.
unsafe impl Send for RecvBufs {}

/// Reused vectors for `sendmmsg`.
#[derive(Default)]
struct SendScratch {
    addrs: Vec<SockAddr>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    /// One control buffer per message (room for a UDP_SEGMENT cmsg), 8-byte aligned.
    cmsgs: Vec<[u64; 4]>,
    /// (first transmit, count, segment size) per message.
    groups: Vec<(usize, usize, usize)>,
}

// SAFETY: the raw pointers are only meaningful during one `send_batch` call, which rebuilds
// them first; between calls they are dead values.
unsafe impl Send for SendScratch {}

/// A UDP socket driving one endpoint.
pub struct UdpTransport {
    gso: bool,
    recv_hint: usize,
    send_scratch: SendScratch,
    socket: Socket,
    local: SocketAddr,
    epoll: OwnedFd,
    eventfd: Arc<EventFd>,
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

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn epoll_ctl(epfd: RawFd, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: valid epoll fd and event struct.
    cvt(unsafe { libc::epoll_ctl(epfd, op, fd, &mut ev) }).map(|_| ())
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
        // SAFETY: plain syscalls; the fds are owned immediately.
        let epoll = unsafe {
            OwnedFd::from_raw_fd(sys(
                "epoll_create1",
                cvt(libc::epoll_create1(libc::EPOLL_CLOEXEC)),
            )?)
        };
        let efd = unsafe {
            OwnedFd::from_raw_fd(sys(
                "eventfd",
                cvt(libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)),
            )?)
        };
        sys(
            "epoll_ctl(socket)",
            epoll_ctl(
                epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                socket.as_raw_fd(),
                libc::EPOLLIN as u32,
                TOKEN_SOCKET,
            ),
        )?;
        sys(
            "epoll_ctl(eventfd)",
            epoll_ctl(
                epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                efd.as_raw_fd(),
                libc::EPOLLIN as u32,
                TOKEN_EVENTFD,
            ),
        )?;
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(Instant::now().elapsed().as_nanos());
        h.write_u32(std::process::id());
        h.write_u16(local.port());
        let seed = h.finish()
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
        let max = Self::max_datagram_for(&local, cfg.mtu);
        let batch = cfg.batch.clamp(1, 1024);
        // GRO: the kernel may hand us several datagrams of one peer as one buffer with
        // their segment size (on loopback, a GSO send arrives whole).
        let gro = cfg.gro && set_int_option(&socket, libc::SOL_UDP, UDP_GRO, 1);
        let buf_len = if gro { 65_536 } else { max + 64 };
        let mut recv = RecvBufs {
            bufs: (0..batch).map(|_| vec![0u8; buf_len]).collect(),
            // SAFETY: sockaddr_storage is plain old data; zeroed is valid.
            addrs: (0..batch).map(|_| unsafe { std::mem::zeroed() }).collect(),
            iovs: Vec::with_capacity(batch),
            hdrs: Vec::with_capacity(batch),
            cmsgs: vec![[0u64; 8]; batch],
        };
        // Build the iovecs and headers once: they point into heap buffers that never move
        // (the Vecs are never resized after this).
        for i in 0..batch {
            let iov = libc::iovec {
                iov_base: recv.bufs[i].as_mut_ptr() as *mut libc::c_void,
                iov_len: recv.bufs[i].len(),
            };
            recv.iovs.push(iov);
        }
        for i in 0..batch {
            // SAFETY: plain old data; the pointers set below stay valid (see above).
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = &mut recv.addrs[i] as *mut _ as *mut libc::c_void;
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            h.msg_hdr.msg_iov = &mut recv.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = recv.cmsgs[i].as_mut_ptr() as *mut libc::c_void;
            h.msg_hdr.msg_controllen = std::mem::size_of::<[u64; 8]>();
            recv.hdrs.push(h);
        }
        Ok(UdpTransport {
            recv_hint: 1,
            gso: cfg.gso,
            send_scratch: SendScratch::default(),
            socket,
            local,
            epoll,
            eventfd: Arc::new(EventFd(efd)),
            cfg: UdpConfig { batch, ..cfg },
            origin: Instant::now(),
            seed,
            mask: EventMask::default(),
            recv,
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
        epoll_ctl(
            self.epoll.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            fd,
            libc::EPOLLIN as u32,
            TOKEN_EXTRA,
        )
    }

    /// Removes a source added with [`UdpTransport::add_source`].
    pub fn remove_source(&self, fd: RawFd) -> io::Result<()> {
        epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, 0, 0)
    }

    /// Driver counters.
    pub fn stats(&self) -> &UdpStats {
        &self.stats
    }

    fn apply_mask(&mut self, mask: EventMask) {
        if mask == self.mask {
            return;
        }
        let ev = |on: bool| if on { libc::EPOLLIN as u32 } else { 0 };
        let ep = self.epoll.as_raw_fd();
        let _ = epoll_ctl(
            ep,
            libc::EPOLL_CTL_MOD,
            self.socket.as_raw_fd(),
            ev(mask.network),
            TOKEN_SOCKET,
        );
        let _ = epoll_ctl(
            ep,
            libc::EPOLL_CTL_MOD,
            self.eventfd.0.as_raw_fd(),
            ev(mask.handle),
            TOKEN_EVENTFD,
        );
        self.mask = mask;
    }

    fn drain_eventfd(&self) {
        let mut v: u64 = 0;
        // SAFETY: reading 8 bytes into a valid u64 from our non-blocking eventfd.
        unsafe {
            libc::read(
                self.eventfd.0.as_raw_fd(),
                &mut v as *mut u64 as *mut libc::c_void,
                8,
            );
        }
    }
}

fn force_buffer(socket: &Socket, opt: libc::c_int, bytes: usize) {
    // Failure (not root) is harmless: the unforced size set before stands.
    let _ = set_int_option(socket, libc::SOL_SOCKET, opt, bytes as libc::c_int);
}

/// Sets an integer socket option; true if the kernel took it.
fn set_int_option(
    socket: &Socket,
    level: libc::c_int,
    opt: libc::c_int,
    value: libc::c_int,
) -> bool {
    // SAFETY: setsockopt with a pointer to a live int and its size.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            opt,
            &value as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

/// The segment size the kernel reports with a GRO-coalesced buffer, if any.
fn gro_segment_size(h: &libc::mmsghdr) -> Option<usize> {
    // SAFETY: walks the control buffer the kernel filled, within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::c_int);
                return usize::try_from(v).ok();
            }
            c = libc::CMSG_NXTHDR(&h.msg_hdr, c);
        }
    }
    None
}

fn to_socket_addr(s: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    // SAFETY: the kernel filled `len` bytes of a sockaddr_storage.
    let a = unsafe { SockAddr::new(*s, len) };
    a.as_socket()
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
            // Group the datagrams: a run of full-size datagrams to one peer (the fragments
            // of a bulk) goes as one GSO message the kernel segments; others go alone. One
            // sendmmsg carries up to `batch` groups. Scratch vectors are reused; their
            // pointers are rebuilt here for this call only.
            let sc = &mut self.send_scratch;
            sc.groups.clear();
            let mut j = done;
            while j < batch.len() && sc.groups.len() < self.cfg.batch {
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
                sc.groups.push((j, k - j, seg));
                j = k;
            }
            sc.addrs.clear();
            sc.iovs.clear();
            sc.hdrs.clear();
            sc.cmsgs.clear();
            sc.addrs.extend(
                sc.groups
                    .iter()
                    .map(|&(start, _, _)| SockAddr::from(batch[start].to)),
            );
            sc.iovs.extend(batch[done..j].iter().map(|t| libc::iovec {
                iov_base: t.bytes.as_ptr() as *mut libc::c_void,
                iov_len: t.bytes.len(),
            }));
            sc.cmsgs.resize(sc.groups.len(), [0u64; 4]);
            for (g, &(start, count, seg)) in sc.groups.iter().enumerate() {
                // SAFETY: msghdr is plain old data; the pointers below stay valid for the
                // call (nothing resizes the scratch vectors until it returns).
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_name = sc.addrs[g].as_ptr() as *mut libc::c_void;
                h.msg_hdr.msg_namelen = sc.addrs[g].len();
                h.msg_hdr.msg_iov = &mut sc.iovs[start - done];
                h.msg_hdr.msg_iovlen = count;
                if count > 1 {
                    // SAFETY: the cmsg buffer is 32 aligned bytes, room for one u16 cmsg.
                    unsafe {
                        let space = libc::CMSG_SPACE(2) as usize;
                        h.msg_hdr.msg_control = sc.cmsgs[g].as_mut_ptr() as *mut libc::c_void;
                        h.msg_hdr.msg_controllen = space;
                        let c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
                        (*c).cmsg_level = libc::SOL_UDP;
                        (*c).cmsg_type = libc::UDP_SEGMENT;
                        (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
                        std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, seg as u16);
                    }
                }
                sc.hdrs.push(h);
            }
            self.stats.send_calls += 1;
            // SAFETY: hdrs, iovs, addrs and cmsgs outlive the call; lengths match.
            let n = unsafe {
                libc::sendmmsg(
                    self.socket.as_raw_fd(),
                    sc.hdrs.as_mut_ptr(),
                    sc.hdrs.len() as u32,
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                let gso_used = sc.groups.first().is_some_and(|g| g.1 > 1);
                match e.kind() {
                    io::ErrorKind::WouldBlock => return Ok(done),
                    io::ErrorKind::Interrupted => continue,
                    _ if gso_used
                        && matches!(
                            e.raw_os_error(),
                            Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
                        ) =>
                    {
                        // The path cannot segment for us: send datagram by datagram.
                        self.gso = false;
                        self.stats.gso_disabled = true;
                        continue;
                    }
                    _ => {
                        // This datagram cannot go (unreachable network, refused...): drop
                        // it, count it, and go on; the engine's timers handle the loss.
                        self.stats.send_errors += 1;
                        done += sc.groups.first().map_or(1, |g| g.1);
                        continue;
                    }
                }
            }
            let sent: usize = sc.groups[..n as usize].iter().map(|g| g.1).sum();
            self.stats.gso_sends +=
                sc.groups[..n as usize].iter().filter(|g| g.1 > 1).count() as u64;
            done += sent;
            if (n as usize) < sc.groups.len() {
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
            let r = &mut self.recv;
            // The headers point into `bufs`/`addrs`/`iovs` (built once); the kernel
            // rewrites the name length and flags, so reset those.
            for h in r.hdrs[..want].iter_mut() {
                h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
                h.msg_hdr.msg_controllen = std::mem::size_of::<[u64; 8]>();
                h.msg_hdr.msg_flags = 0;
                h.msg_len = 0;
            }
            // SAFETY: buffers and headers are valid and sized as declared.
            let n = unsafe {
                libc::recvmmsg(
                    self.socket.as_raw_fd(),
                    r.hdrs.as_mut_ptr(),
                    want as u32,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => break,
                    io::ErrorKind::Interrupted => continue,
                    // ICMP errors surface here on some kernels; they carry no datagram.
                    io::ErrorKind::ConnectionRefused => continue,
                    _ => return Err(TransportError::Io(format!("recvmmsg: {e}"))),
                }
            }
            if n == 0 {
                break;
            }
            self.stats.recv_calls += 1;
            for i in 0..n as usize {
                let h = &r.hdrs[i];
                if h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                    self.stats.truncated += 1;
                    continue;
                }
                let Some(from) = to_socket_addr(&r.addrs[i], h.msg_hdr.msg_namelen) else {
                    continue;
                };
                let data = &r.bufs[i][..h.msg_len as usize];
                match gro_segment_size(h) {
                    // Several datagrams coalesced by GRO: hand them over one by one.
                    Some(seg) if seg > 0 && seg < data.len() => {
                        self.stats.gro_buffers += 1;
                        for d in data.chunks(seg) {
                            deliver(from, d);
                        }
                    }
                    _ => deliver(from, data),
                }
            }
            total += n as usize;
            self.recv_hint = if (n as usize) < want {
                (n as usize).max(1)
            } else {
                (want * 2).min(self.recv.bufs.len())
            };
            if (n as usize) < want {
                break;
            }
        }
        Ok(total)
    }

    fn wait(&mut self, timeout: Option<Duration>, mask: EventMask) -> Result<(), TransportError> {
        self.apply_mask(mask);
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut events: [libc::epoll_event; 8] = [libc::epoll_event { events: 0, u64: 0 }; 8];
        loop {
            let ms: libc::c_int = if self.cfg.busy_poll {
                0
            } else {
                match deadline {
                    None => -1,
                    Some(d) => {
                        let left = d.saturating_duration_since(Instant::now());
                        // Round up so we do not spin on sub-millisecond timeouts.
                        left.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int
                    }
                }
            };
            if !self.cfg.busy_poll {
                self.stats.sleeps += 1;
            }
            // SAFETY: valid epoll fd and event buffer.
            let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), events.as_mut_ptr(), 8, ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(TransportError::Io(format!("epoll_wait: {e}")));
            }
            for ev in &events[..n as usize] {
                if ev.u64 == TOKEN_EVENTFD {
                    self.drain_eventfd();
                }
            }
            // Busy-polling spins until an event or the deadline; sleeping returns at once.
            if n > 0 || !self.cfg.busy_poll || deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(());
            }
            std::hint::spin_loop();
        }
    }

    fn notifier(&self) -> Arc<dyn Notify> {
        self.eventfd.clone()
    }
}
