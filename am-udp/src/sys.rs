//! The system calls of the UDP driver that need `unsafe`: the `recvmmsg` and `sendmmsg`
//! batches (headers that point into buffers), the UDP GSO/GRO control messages, and
//! integer socket options. Every `unsafe` block of the crate is here, with its reasoning;
//! the crate root denies `unsafe` elsewhere. eventfd and epoll come from `am-os`.

use am_core::Transmit;
use socket2::{SockAddr, Socket};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

/// `UDP_GRO` from linux/udp.h (the libc crate does not export it for glibc).
pub(crate) const UDP_GRO: libc::c_int = 104;

/// Receive buffers for one `recvmmsg` batch: one datagram (or one GRO-coalesced run) per
/// slot, with its sender's address and a control buffer for the GRO segment size.
pub(crate) struct RecvBufs {
    bufs: Vec<Vec<u8>>,
    addrs: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    /// One control buffer per slot (for the UDP_GRO segment size), 8-byte aligned.
    cmsgs: Vec<[u64; 8]>,
}

// SAFETY: the raw pointers in `iovs` and `hdrs` only ever point into the heap buffers of
// `bufs`, `addrs`, `iovs` and `cmsgs` of the same struct, which are never resized after
// construction; moving the struct to another thread moves what they point to with it.
unsafe impl Send for RecvBufs {}

/// What one receive slot holds after [`RecvBufs::recvmmsg`].
pub(crate) enum Received<'a> {
    /// The datagram was larger than the slot: dropped by the kernel's truncation.
    Truncated,
    /// The sender's address was not an inet address.
    NoAddress,
    /// A datagram, or several of one sender's datagrams of `gro_segment` bytes each
    /// (the last may be shorter) coalesced by GRO.
    Data {
        from: SocketAddr,
        bytes: &'a [u8],
        gro_segment: Option<usize>,
    },
}

impl RecvBufs {
    /// `slots` buffers of `slot_bytes` each.
    pub(crate) fn new(slots: usize, slot_bytes: usize) -> RecvBufs {
        let mut r = RecvBufs {
            bufs: (0..slots).map(|_| vec![0u8; slot_bytes]).collect(),
            // SAFETY: sockaddr_storage is plain old data; zeroed is valid.
            addrs: (0..slots).map(|_| unsafe { std::mem::zeroed() }).collect(),
            iovs: Vec::with_capacity(slots),
            hdrs: Vec::with_capacity(slots),
            cmsgs: vec![[0u64; 8]; slots],
        };
        // Build the iovecs and headers once: they point into heap buffers that never move
        // (the Vecs are never resized after this).
        for i in 0..slots {
            let iov = libc::iovec {
                iov_base: r.bufs[i].as_mut_ptr() as *mut libc::c_void,
                iov_len: r.bufs[i].len(),
            };
            r.iovs.push(iov);
        }
        for i in 0..slots {
            // SAFETY: plain old data; the pointers set below stay valid (see above).
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = &mut r.addrs[i] as *mut _ as *mut libc::c_void;
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            h.msg_hdr.msg_iov = &mut r.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = r.cmsgs[i].as_mut_ptr() as *mut libc::c_void;
            h.msg_hdr.msg_controllen = std::mem::size_of::<[u64; 8]>();
            r.hdrs.push(h);
        }
        r
    }

    /// How many slots there are.
    pub(crate) fn slots(&self) -> usize {
        self.bufs.len()
    }

    /// One non-blocking `recvmmsg` into the first `want` slots (at most [`Self::slots`]);
    /// returns how many it filled (`WouldBlock` when none was waiting).
    pub(crate) fn recvmmsg(&mut self, fd: RawFd, want: usize) -> io::Result<usize> {
        let want = want.min(self.slots());
        // The kernel rewrites the name length, control length and flags: reset them.
        for h in self.hdrs[..want].iter_mut() {
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            h.msg_hdr.msg_controllen = std::mem::size_of::<[u64; 8]>();
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        // SAFETY: buffers and headers are valid and sized as declared (see `new`).
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                want as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Slot `i` after a [`Self::recvmmsg`] that filled more than `i` slots.
    pub(crate) fn received(&self, i: usize) -> Received<'_> {
        let h = &self.hdrs[i];
        if h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
            return Received::Truncated;
        }
        // SAFETY: the kernel filled `msg_namelen` bytes of this sockaddr_storage.
        let from = unsafe { SockAddr::new(self.addrs[i], h.msg_hdr.msg_namelen) };
        let Some(from) = from.as_socket() else {
            return Received::NoAddress;
        };
        Received::Data {
            from,
            bytes: &self.bufs[i][..h.msg_len as usize],
            gro_segment: gro_segment_size(h),
        }
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

/// One message of a `sendmmsg`: `count` datagrams of `batch` from `first`, to the first
/// one's peer; more than one goes as a GSO super-datagram of `segment`-byte segments.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SendGroup {
    pub(crate) first: usize,
    pub(crate) count: usize,
    pub(crate) segment: usize,
}

/// Reused vectors for `sendmmsg`: nothing is allocated per send once they have grown.
#[derive(Default)]
pub(crate) struct SendScratch {
    addrs: Vec<SockAddr>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    /// One control buffer per message (room for a UDP_SEGMENT cmsg), 8-byte aligned.
    cmsgs: Vec<[u64; 4]>,
}

// SAFETY: the raw pointers are only meaningful during one `sendmmsg` call, which rebuilds
// them first; between calls they are dead values.
unsafe impl Send for SendScratch {}

impl SendScratch {
    /// Sends `groups` (consecutive, starting at datagram `groups[0].first` of `batch`)
    /// with one `sendmmsg` on `fd`; returns how many groups went.
    pub(crate) fn sendmmsg(
        &mut self,
        fd: RawFd,
        batch: &[Transmit],
        groups: &[SendGroup],
    ) -> io::Result<usize> {
        let Some(start) = groups.first().map(|g| g.first) else {
            return Ok(0);
        };
        let end = groups.last().map_or(start, |g| g.first + g.count);
        self.addrs.clear();
        self.iovs.clear();
        self.hdrs.clear();
        self.cmsgs.clear();
        self.addrs
            .extend(groups.iter().map(|g| SockAddr::from(batch[g.first].to)));
        self.iovs
            .extend(batch[start..end].iter().map(|t| libc::iovec {
                iov_base: t.bytes.as_ptr() as *mut libc::c_void,
                iov_len: t.bytes.len(),
            }));
        self.cmsgs.resize(groups.len(), [0u64; 4]);
        for (i, g) in groups.iter().enumerate() {
            // SAFETY: msghdr is plain old data; the pointers below stay valid for the
            // call (nothing resizes the scratch vectors until it returns).
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = self.addrs[i].as_ptr() as *mut libc::c_void;
            h.msg_hdr.msg_namelen = self.addrs[i].len();
            h.msg_hdr.msg_iov = &mut self.iovs[g.first - start];
            h.msg_hdr.msg_iovlen = g.count;
            if g.count > 1 {
                // SAFETY: the cmsg buffer is 32 aligned bytes, room for one u16 cmsg.
                unsafe {
                    let space = libc::CMSG_SPACE(2) as usize;
                    h.msg_hdr.msg_control = self.cmsgs[i].as_mut_ptr() as *mut libc::c_void;
                    h.msg_hdr.msg_controllen = space;
                    let c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = libc::UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, g.segment as u16);
                }
            }
            self.hdrs.push(h);
        }
        // SAFETY: hdrs, iovs, addrs and cmsgs outlive the call; lengths match; the iovecs
        // point into `batch`, borrowed for the call.
        let n = unsafe { libc::sendmmsg(fd, self.hdrs.as_mut_ptr(), self.hdrs.len() as u32, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// Sets an integer socket option; true if the kernel took it.
pub(crate) fn set_int_option(
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
