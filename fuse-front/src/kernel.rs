//! The kernel's notify channel: FUSE_NOTIFY_INVAL_INODE and FUSE_NOTIFY_INVAL_ENTRY (with
//! FUSE_EXPIRE_ONLY) written on a cloned /dev/fuse descriptor.

use super::*;

/// The FUSE device, for notifications to the kernel (a duplicate of the session's fd).
///
/// Written by hand rather than through `fuser::Notifier` for one flag: entries are
/// invalidated with `FUSE_EXPIRE_ONLY` (Linux 6.2), which makes the kernel look the name
/// up again before it next uses it, where a full invalidation would also detach whatever
/// is mounted on the entry (`d_invalidate`) and fail the lookup in progress.
#[derive(Clone)]
pub struct KernelChannel {
    pub(crate) fd: Arc<OwnedFd>,
}

pub(crate) const FUSE_NOTIFY_INVAL_INODE: i32 = 2;
pub(crate) const FUSE_NOTIFY_INVAL_ENTRY: i32 = 3;
pub(crate) const FUSE_EXPIRE_ONLY: u32 = 1;

impl KernelChannel {
    /// Notifications on `fd` (a `/dev/fuse` descriptor of the mount).
    pub fn new(fd: OwnedFd) -> KernelChannel {
        KernelChannel { fd: Arc::new(fd) }
    }

    /// One notification: the out header, then `parts`, in one `writev` (no copy).
    pub(crate) fn send(&self, code: i32, parts: &[&[u8]]) -> std::io::Result<()> {
        let len = 16 + parts.iter().map(|p| p.len()).sum::<usize>();
        let mut head = [0u8; 16];
        head[..4].copy_from_slice(&(len as u32).to_le_bytes());
        head[4..8].copy_from_slice(&code.to_le_bytes());
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; 4];
        for (v, p) in iov
            .iter_mut()
            .zip(std::iter::once(&head[..]).chain(parts.iter().copied()))
        {
            v.iov_base = p.as_ptr() as *mut libc::c_void;
            v.iov_len = p.len();
        }
        let n = (parts.len() + 1).min(iov.len());
        // SAFETY: `n` iovecs point into live buffers of the lengths given; the kernel only
        // reads them.
        let r = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), n as libc::c_int) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            // ENOENT: the kernel does not cache it (any more).
            if e.raw_os_error() == Some(libc::ENOENT) {
                return Ok(());
            }
            return Err(e);
        }
        Ok(())
    }

    /// Drop the attributes of `ino` and, for `offset >= 0`, its pages in
    /// `[offset, offset + len)` (`len <= 0`: to the end).
    pub fn inval_inode(&self, ino: u64, offset: i64, len: i64) -> std::io::Result<()> {
        let mut b = [0u8; 24];
        b[..8].copy_from_slice(&ino.to_le_bytes());
        b[8..16].copy_from_slice(&offset.to_le_bytes());
        b[16..].copy_from_slice(&len.to_le_bytes());
        self.send(FUSE_NOTIFY_INVAL_INODE, &[&b])
    }

    /// Make the kernel look `name` in directory `parent` up again before it uses it.
    pub fn expire_entry(&self, parent: u64, name: &[u8]) -> std::io::Result<()> {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&parent.to_le_bytes());
        b[8..12].copy_from_slice(&(name.len() as u32).to_le_bytes());
        b[12..].copy_from_slice(&FUSE_EXPIRE_ONLY.to_le_bytes());
        self.send(FUSE_NOTIFY_INVAL_ENTRY, &[&b, name, &[0]])
    }
}
