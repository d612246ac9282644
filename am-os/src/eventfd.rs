//! A non-blocking eventfd: how another thread wakes a sleeping event loop.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

/// A non-blocking, close-on-exec eventfd. [`EventFd::signal`] may be called from any
/// thread (the type is `Send + Sync`); the loop that sleeps on it calls
/// [`EventFd::drain`] when its epoll set reports it readable.
#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    /// A new eventfd with its counter at zero.
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: a plain system call; the fd is owned at once.
        crate::owned_fd(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })
            .map(EventFd)
    }

    /// Adds one to the counter: the fd becomes readable. Never blocks; an error (the
    /// counter at its maximum, which cannot happen while the owner drains) is ignored,
    /// because the fd is readable then anyway.
    #[inline]
    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
        unsafe {
            libc::write(
                self.0.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            );
        }
    }

    /// Clears the counter and returns what it held (0 when nothing was signalled).
    #[inline]
    pub fn drain(&self) -> u64 {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from our non-blocking eventfd.
        let n = unsafe {
            libc::read(
                self.0.as_raw_fd(),
                &mut v as *mut u64 as *mut libc::c_void,
                8,
            )
        };
        if n == 8 {
            v
        } else {
            0
        }
    }

    /// Sleeps up to `d` until the counter is non-zero (`watch`), or just for `d` when not
    /// watching; returns whether it became readable. Nanosecond resolution (`ppoll`), for
    /// loops that nap for microseconds. A signal ends the sleep early; that is not an error.
    pub fn wait_readable(&self, d: Duration, watch: bool) -> io::Result<bool> {
        let mut fds = [libc::pollfd {
            fd: if watch { self.0.as_raw_fd() } else { -1 },
            events: libc::POLLIN,
            revents: 0,
        }];
        let ts = libc::timespec {
            tv_sec: d.as_secs() as libc::time_t,
            tv_nsec: d.subsec_nanos() as libc::c_long,
        };
        // SAFETY: one valid pollfd (fd -1 is ignored), a valid timespec, no signal mask.
        let n = unsafe { libc::ppoll(fds.as_mut_ptr(), 1, &ts, std::ptr::null()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        Ok(fds[0].revents & libc::POLLIN != 0)
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_add_up_and_drain_clears() {
        let e = EventFd::new().unwrap();
        assert_eq!(e.drain(), 0, "a fresh eventfd holds nothing");
        e.signal();
        e.signal();
        let e2 = std::sync::Arc::new(e);
        let t = {
            let e2 = e2.clone();
            std::thread::spawn(move || e2.signal())
        };
        t.join().unwrap();
        assert_eq!(e2.drain(), 3, "three signals, one from another thread");
        assert_eq!(e2.drain(), 0, "drained");
        let d = Duration::from_millis(1);
        assert!(
            !e2.wait_readable(d, true).unwrap(),
            "nothing to read: times out"
        );
        e2.signal();
        assert!(e2.wait_readable(d, true).unwrap(), "signalled: readable");
        assert!(
            !e2.wait_readable(d, false).unwrap(),
            "not watched: just sleeps"
        );
    }
}
