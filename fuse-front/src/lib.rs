//! The FUSE front of the file system: every FUSE operation mapped to the `xfs-node` client
//! API of one node (over the node's control socket), and the kernel's caches kept coherent
//! with the cluster's.
//!
//! * **Caching on.** Entries and attributes are cached by the kernel for [`Options::ttl`],
//!   file pages are kept across opens (`FOPEN_KEEP_CACHE`), no `direct_io`.
//! * **Coherence reaches the kernel.** The node's shard loops run with an external kernel:
//!   when this node's client loses a block (a revoke for another node's write, or an
//!   eviction), the node sends it on the mount's invalidation stream ([`Request::Subscribe`])
//!   and acknowledges the revoke only when the front answers. The front's invalidation
//!   thread turns each block into the kernel's terms — an inode block into
//!   `notify_inval_inode(ino, -1)` (attributes), a directory bucket into `notify_inval_entry`
//!   for every name of that bucket the kernel was given, a data block into
//!   `notify_inval_inode(ino, offset, 4096)` — and answers once the kernel returned. It never
//!   runs in a shard loop or a FUSE handler. Because the kernel holds page and directory locks
//!   while it waits for this daemon, an invalidation can wait for an operation of this mount
//!   that itself waits for the revoke: an invalidation that has not returned within
//!   [`Options::inval_wait`] is answered anyway and counted (`inval_late`); it completes when
//!   the kernel lets go (see docs/fuse.md for what that allows).
//! * Permission checks are the kernel's (`default_permissions`), as a local file system.
//!
//! The parts: the operations (`ops.rs`) over the mount's handle on its node ([`Front`],
//! `front.rs`); attributes in the kernel's terms (`attr.rs`); the names given to the kernel
//! ([`Shared`], `names.rs`); the invalidation service (`invalidate.rs`) and the kernel's
//! notify channel ([`KernelChannel`], `kernel.rs`); the raw mount (`mount.rs`); the errors
//! of mounting and of reaching the node ([`FrontError`], `error.rs`). `unsafe` is denied but
//! in `kernel.rs` and `mount.rs` (`writev` on /dev/fuse; `mount(2)`).

#![deny(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use xfs_node::fs::client::{RenameMode, SetAttr, XattrMode};
use xfs_node::fs::layout::{bucket_of, ino_of, Entry, Inode, Kind, BLOCK, INODE_BLOCK};
use xfs_node::node::control::{self, Control, ControlError, FsOp, Request as CtlRequest, Response};
use xfs_node::node::{MountAnswers, MountAttachment, Node};

mod attr;
mod error;
mod front;
mod invalidate;
#[allow(unsafe_code)]
mod kernel;
#[allow(unsafe_code)]
mod mount;
mod names;
mod ops;

use attr::*;
pub use attr::{may_access, seek};
pub use error::FrontError;
pub use front::{Front, NodeLink};
pub use invalidate::{invalidations, invalidations_hosted, subscribe};
pub use kernel::KernelChannel;
pub use mount::{
    abort_connection, connection_of, mount_fuse, raise_read_ahead, state_path, READ_AHEAD_KB,
};
pub use names::Shared;

/// Mount settings.
#[derive(Clone, Debug)]
pub struct Options {
    /// How long the kernel may cache entries and attributes (invalidations keep them
    /// coherent; the timeout only bounds what a lost invalidation could leave).
    pub ttl: Duration,
    /// How long an invalidation may wait for the kernel before the revoke is answered.
    pub inval_wait: Duration,
    /// Read-only mount.
    pub read_only: bool,
}

/// Counters of the front (written to the state file, read by tests and `status`).
#[derive(Default, Debug)]
pub struct Stats {
    /// FUSE requests of any kind.
    pub requests: AtomicU64,
    /// `read` requests (the kernel's page cache missed).
    pub reads: AtomicU64,
    /// `write` requests.
    pub writes: AtomicU64,
    /// Of those, appends (`O_APPEND`: placed at the coherent end by the node).
    pub appends: AtomicU64,
    /// `lookup` requests.
    pub lookups: AtomicU64,
    /// `getattr` requests.
    pub getattrs: AtomicU64,
    /// Names handed to the kernel with no time to live: their bucket was invalidated
    /// between the node's answer and the mount's remembering them.
    pub names_uncached: AtomicU64,
    /// Blocks the node asked to invalidate.
    pub invalidations: AtomicU64,
    /// Kernel calls made for them (inodes, pages and entries).
    pub kernel_calls: AtomicU64,
    /// Invalidations answered before the kernel returned (it waited for this mount).
    pub inval_late: AtomicU64,
    /// Invalidated blocks of inodes the kernel was never given: no kernel call needed.
    pub inval_skipped: AtomicU64,
    /// Requests that failed because the node could not be reached.
    pub node_errors: AtomicU64,
}

impl Stats {
    /// `name value` lines.
    pub fn render(&self) -> String {
        let v = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "requests {}\nreads {}\nwrites {}\nappends {}\nlookups {}\ngetattrs {}\ninvalidations {}\n\
             kernel_calls {}\ninval_late {}\ninval_skipped {}\nnode_errors {}\nnames_uncached {}\n",
            v(&self.requests),
            v(&self.reads),
            v(&self.writes),
            v(&self.appends),
            v(&self.lookups),
            v(&self.getattrs),
            v(&self.invalidations),
            v(&self.kernel_calls),
            v(&self.inval_late),
            v(&self.inval_skipped),
            v(&self.node_errors),
            v(&self.names_uncached)
        )
    }
}

fn lock<X>(m: &Mutex<X>) -> std::sync::MutexGuard<'_, X> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn errno(e: i32) -> Errno {
    Errno::from_i32(e)
}

#[cfg(test)]
mod tests {
    use super::names::swap;
    use super::*;

    fn file(size: u64, extents: Vec<(u64, u64)>) -> Inode {
        Inode {
            ino: 9,
            kind: Some(Kind::File),
            mode: libc::S_IFREG | 0o640,
            uid: 10,
            gid: 20,
            nlink: 1,
            size,
            extents,
            ..Inode::default()
        }
    }

    #[test]
    fn seek_finds_data_and_holes_from_extents() {
        let bs = BLOCK as i64;
        // Data in blocks 2..4 and 10..11 of a 12-block file.
        let i = file(12 * BLOCK as u64, vec![(2, 4), (10, 11)]);
        assert_eq!(seek(&i, 0, libc::SEEK_DATA), Ok(2 * bs));
        assert_eq!(seek(&i, 3 * bs + 5, libc::SEEK_DATA), Ok(3 * bs + 5));
        assert_eq!(seek(&i, 4 * bs, libc::SEEK_DATA), Ok(10 * bs));
        assert_eq!(seek(&i, 11 * bs, libc::SEEK_DATA), Err(Errno::ENXIO));
        assert_eq!(seek(&i, 0, libc::SEEK_HOLE), Ok(0));
        assert_eq!(seek(&i, 2 * bs, libc::SEEK_HOLE), Ok(4 * bs));
        assert_eq!(seek(&i, 10 * bs, libc::SEEK_HOLE), Ok(11 * bs));
        assert_eq!(seek(&i, 12 * bs, libc::SEEK_HOLE), Err(Errno::ENXIO));
        // The end of the file is a hole even inside an extent.
        let j = file(100, vec![(0, 1)]);
        assert_eq!(seek(&j, 0, libc::SEEK_HOLE), Ok(100));
        assert_eq!(seek(&j, -1, libc::SEEK_DATA), Err(Errno::EINVAL));
    }

    #[test]
    fn access_follows_owner_group_other_bits() {
        let i = file(0, vec![]);
        assert!(may_access(&i, 10, 99, 4 | 2));
        assert!(!may_access(&i, 10, 99, 1));
        assert!(may_access(&i, 11, 20, 4));
        assert!(!may_access(&i, 11, 20, 2));
        assert!(!may_access(&i, 11, 21, 4));
        // Root: anything but executing a file with no execute bit.
        assert!(may_access(&i, 0, 0, 4 | 2));
        assert!(!may_access(&i, 0, 0, 1));
    }

    #[test]
    fn the_root_and_ino_1_trade_places() {
        for root in [3u64, 7, 1] {
            for ino in [1u64, 2, 3, 7, 1 << 30] {
                assert_eq!(swap(swap(ino, root), root), ino);
            }
            assert_eq!(swap(root, root), 1);
        }
    }
}
