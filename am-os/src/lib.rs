//! `am-os`: the one copy of the Linux plumbing every Active Messages driver needs.
//!
//! Each driver (`am-udp`, `am-rdma`, `am-dpdk`) sleeps in an epoll set, is woken from other
//! threads through an eventfd, and reads a clock on every turn of its loop. Those system
//! calls live here, once, with their `unsafe` and its reasoning, so that the drivers keep
//! only what is particular to their hardware:
//!
//! - [`EventFd`]: a non-blocking eventfd (signal from any thread, drain in the owner);
//! - [`Epoll`]: an epoll set of readable sources, each reported by a `u64` token, waited on
//!   without allocating ([`EpollEvents`] is a fixed buffer);
//! - [`tsc`]: the time-stamp counter, a clock calibrated against it, and the kernel's
//!   coarse monotonic clock.
//!
//! No protocol logic, no dependency but `libc`.

mod epoll;
mod eventfd;
pub mod tsc;

pub use epoll::{Epoll, EpollEvents, EPOLL_EVENTS_MAX};
pub use eventfd::EventFd;

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

/// Turns a system call's returned fd into an owned one, or the OS error.
fn owned_fd(fd: libc::c_int) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by a successful system call and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
