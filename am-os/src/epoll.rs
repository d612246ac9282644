//! An epoll set of readable sources, each reported by a token.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// The most events one [`Epoll::wait`] reports; more ready sources are reported by the
/// next wait (epoll is level-triggered here).
pub const EPOLL_EVENTS_MAX: usize = 16;

/// An epoll set (close-on-exec). Sources are watched for reading, level-triggered.
#[derive(Debug)]
pub struct Epoll(OwnedFd);

/// A fixed buffer for the events of one [`Epoll::wait`]: waiting allocates nothing.
pub struct EpollEvents {
    events: [libc::epoll_event; EPOLL_EVENTS_MAX],
    len: usize,
}

impl Default for EpollEvents {
    fn default() -> Self {
        EpollEvents {
            events: [libc::epoll_event { events: 0, u64: 0 }; EPOLL_EVENTS_MAX],
            len: 0,
        }
    }
}

impl EpollEvents {
    /// The tokens of the sources the last wait found ready.
    pub fn tokens(&self) -> impl Iterator<Item = u64> + '_ {
        self.events[..self.len].iter().map(|e| e.u64)
    }
    /// How many sources the last wait found ready.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when the last wait found nothing ready (a timeout or a signal).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl Epoll {
    /// A new, empty epoll set.
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: a plain system call; the fd is owned at once.
        crate::owned_fd(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) }).map(Epoll)
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: a valid epoll fd and a valid event struct for the duration of the call.
        cvt(unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, fd, &mut ev) }).map(|_| ())
    }

    /// Watches `fd` for reading; its readiness is reported as `token`. The caller keeps
    /// `fd` open while it is in the set.
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, libc::EPOLLIN as u32, token)
    }

    /// Turns the watch on `fd` (already added) on or off, keeping it in the set.
    pub fn watch(&self, fd: RawFd, on: bool, token: u64) -> io::Result<()> {
        let events = if on { libc::EPOLLIN as u32 } else { 0 };
        self.ctl(libc::EPOLL_CTL_MOD, fd, events, token)
    }

    /// Takes `fd` out of the set.
    pub fn remove(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0)
    }

    /// Waits up to `timeout_ms` (-1: no limit, 0: just look) for a source to be readable
    /// and fills `out` with the ready ones. A signal interrupting the wait is a wake-up
    /// with nothing ready (`out` empty), not an error.
    pub fn wait(&self, out: &mut EpollEvents, timeout_ms: i32) -> io::Result<()> {
        // SAFETY: a valid epoll fd and a buffer of EPOLL_EVENTS_MAX events.
        let n = unsafe {
            libc::epoll_wait(
                self.0.as_raw_fd(),
                out.events.as_mut_ptr(),
                EPOLL_EVENTS_MAX as libc::c_int,
                timeout_ms,
            )
        };
        if n < 0 {
            out.len = 0;
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(e);
        }
        out.len = n as usize;
        Ok(())
    }
}

impl AsRawFd for Epoll {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EventFd;

    #[test]
    fn reports_the_ready_source_by_token_and_honours_watch_and_remove() {
        let ep = Epoll::new().unwrap();
        let (a, b) = (EventFd::new().unwrap(), EventFd::new().unwrap());
        ep.add(a.as_raw_fd(), 7).unwrap();
        ep.add(b.as_raw_fd(), 9).unwrap();
        let mut evs = EpollEvents::default();
        ep.wait(&mut evs, 0).unwrap();
        assert!(evs.is_empty(), "nothing signalled yet");
        b.signal();
        ep.wait(&mut evs, 1000).unwrap();
        assert_eq!(evs.tokens().collect::<Vec<_>>(), vec![9]);
        // Level-triggered: still ready until drained.
        ep.wait(&mut evs, 0).unwrap();
        assert_eq!(evs.len(), 1);
        b.drain();
        ep.watch(a.as_raw_fd(), false, 7).unwrap();
        a.signal();
        ep.wait(&mut evs, 0).unwrap();
        assert!(evs.is_empty(), "a is not watched");
        ep.watch(a.as_raw_fd(), true, 7).unwrap();
        ep.wait(&mut evs, 0).unwrap();
        assert_eq!(evs.tokens().collect::<Vec<_>>(), vec![7]);
        ep.remove(a.as_raw_fd()).unwrap();
        ep.wait(&mut evs, 0).unwrap();
        assert!(evs.is_empty(), "a was removed");
        assert!(
            ep.remove(a.as_raw_fd()).is_err(),
            "removing twice is an error"
        );
    }
}
