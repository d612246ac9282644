//! The few process-level system calls the node's binaries make, behind safe functions: the
//! crate's only `unsafe` outside the io_uring store (`storage::uring`).
#![allow(unsafe_code)]

use std::ffi::CString;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether a process `pid` exists (signal 0: nothing is sent). A zombie counts as existing.
pub fn process_exists(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

/// Send signal `signal` (e.g. `libc::SIGTERM`) to process `pid` (which must be > 0: never a
/// process group).
pub fn send_signal(pid: i32, signal: i32) -> std::io::Result<()> {
    if pid <= 0 {
        return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
    }
    // SAFETY: a plain syscall on a single process id.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALLED.store(true, Ordering::Relaxed);
}

/// Catch `signals` (e.g. SIGINT, SIGTERM): each only sets the flag this returns (the one
/// thing a signal handler may safely do), for the program's loop to look at.
pub fn flag_on_signals(signals: &[i32]) -> &'static AtomicBool {
    for s in signals {
        // SAFETY: installing a handler that only stores to an atomic.
        unsafe {
            libc::signal(*s, on_signal as *const () as libc::sighandler_t);
        }
    }
    &SIGNALLED
}

static UNMOUNT_ASKED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_unmount_signal(_: libc::c_int) {
    UNMOUNT_ASKED.store(true, Ordering::Relaxed);
}

/// The signal that asks a node which serves its mount in its own process
/// (`xfsam-mount --serve`) to unmount and go on serving as a node (`xfs-node down` sends
/// it before it stops the nodes).
pub const UNMOUNT_SIGNAL: i32 = libc::SIGUSR1;

/// Catch [`UNMOUNT_SIGNAL`]: it only sets the flag this returns.
pub fn flag_on_unmount_signal() -> &'static AtomicBool {
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(
            UNMOUNT_SIGNAL,
            on_unmount_signal as *const () as libc::sighandler_t,
        );
    }
    &UNMOUNT_ASKED
}

/// Restore SIGPIPE's default (end quietly when the output pipe closes, as Unix tools do);
/// call it first thing in `main`, before any thread starts.
pub fn default_sigpipe() {
    // SAFETY: restoring the default disposition of a signal.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// `umount2(dir, flags)` (`flags`: 0, or e.g. `libc::MNT_DETACH`).
pub fn unmount(dir: &Path, flags: i32) -> std::io::Result<()> {
    let c = CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a plain syscall on a NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether something is mounted at `dir` now (by `/proc/self/mountinfo`; `dir` as the
/// kernel names it: absolute, symlinks resolved).
pub fn is_mount_point(dir: &Path) -> bool {
    let Ok(m) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = dir.to_string_lossy().replace(' ', "\\040");
    m.lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|p| p == want))
}
