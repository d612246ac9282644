//! The names given to the kernel: inode numbers (the root and inode 1 trade places), and
//! which names of each directory bucket the kernel was handed (so an invalidated bucket
//! expires exactly those entries).

use super::*;

/// Names given to the kernel, by (directory, bucket).
pub(crate) type NamesByBucket = HashMap<(u64, u64), HashSet<Vec<u8>>>;

/// What the front and its invalidation thread share.
pub struct Shared {
    /// Counters.
    pub stats: Stats,
    /// The root's index number in the file system (FUSE calls it 1).
    pub(crate) root: u64,
    /// Names handed to the kernel, by (directory, bucket): what an invalidation of that
    /// bucket must drop.
    pub(crate) names: Mutex<NamesByBucket>,
    /// Index numbers handed to the kernel (dropped wholesale when the node's stream breaks).
    /// Never pruned on `forget`: an invalidation of an inode missing here is skipped, which
    /// is right only if every inode the kernel may still cache is in it.
    pub(crate) inos: Mutex<HashSet<u64>>,
    /// Invalidations carried out so far (counted before each is answered): a directory
    /// listing taken at `opendir` is handed to the kernel only if none came in between.
    pub(crate) inval_epoch: AtomicU64,
    /// The kernel's notify channel, once mounted: an append drops the pages its kernel
    /// cached where the bytes really landed ([`Shared::set_kernel`]).
    pub(crate) kernel: std::sync::OnceLock<KernelChannel>,
}

impl Shared {
    /// Give the operations the kernel's notify channel (set once, after the mount).
    pub fn set_kernel(&self, k: KernelChannel) {
        let _ = self.kernel.set(k);
    }

    /// Invalidations carried out so far.
    pub(crate) fn inval_epoch(&self) -> u64 {
        self.inval_epoch.load(Ordering::SeqCst)
    }

    /// FUSE's number for index number `ino` (the root and 1 trade places).
    pub(crate) fn fuse(&self, ino: u64) -> INodeNo {
        INodeNo(swap(ino, self.root))
    }

    pub(crate) fn ours(&self, ino: INodeNo) -> u64 {
        swap(ino.0, self.root)
    }

    /// The kernel was given `ino` under `name` in `parent`.
    pub(crate) fn hand_out(&self, parent: u64, name: &[u8], ino: u64) {
        lock(&self.inos).insert(ino);
        self.remember(parent, name);
    }

    pub(crate) fn remember(&self, parent: u64, name: &[u8]) {
        lock(&self.names)
            .entry((parent, bucket_of(name)))
            .or_default()
            .insert(name.to_vec());
    }
}

pub(crate) fn swap(ino: u64, root: u64) -> u64 {
    if ino == root {
        1
    } else if ino == 1 {
        root
    } else {
        ino
    }
}
