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
    /// Invalidations of directory buckets, counted in [`BUCKET_GENERATIONS`] slots by
    /// (directory, bucket): a name answered while its bucket's slot moved (the bucket was
    /// invalidated between the node's answer and the name's being remembered, so the
    /// invalidation could not expire it) is handed to the kernel with no time to live.
    pub(crate) bucket_generations: Box<[AtomicU64]>,
    /// The kernel's notify channel, once mounted: an append drops the pages its kernel
    /// cached where the bytes really landed ([`Shared::set_kernel`]).
    pub(crate) kernel: std::sync::OnceLock<KernelChannel>,
    /// Regular files' truncation counts as last seen in their attributes, and when each
    /// changed (at most [`TRUNCATIONS_TRACKED`] files; beyond, the oldest go): a file
    /// truncated lately is opened around the page cache (`front::open_mode`).
    pub(crate) truncations: Mutex<HashMap<u64, (u64, Instant)>>,
}

/// Slots of [`Shared::bucket_generations`] (buckets share a slot by hash: a shared slot
/// only costs a name its caching now and then).
pub(crate) const BUCKET_GENERATIONS: usize = 4096;

/// The counters of [`Shared::bucket_generations`], all zero.
pub(crate) fn bucket_generations() -> Box<[AtomicU64]> {
    (0..BUCKET_GENERATIONS).map(|_| AtomicU64::new(0)).collect()
}

/// Files whose truncation counts a mount keeps (beyond, those not changed lately go).
pub(crate) const TRUNCATIONS_TRACKED: usize = 4096;

impl Shared {
    /// Give the operations the kernel's notify channel (set once, after the mount).
    pub fn set_kernel(&self, k: KernelChannel) {
        let _ = self.kernel.set(k);
    }

    /// The attributes of file `ino` say it has been truncated `count` times: note when
    /// that count changed (its first sight counts as a change).
    pub(crate) fn saw_truncations(&self, ino: u64, count: u64) {
        let mut t = lock(&self.truncations);
        if t.get(&ino).is_some_and(|(c, _)| *c == count) {
            return;
        }
        if t.len() >= TRUNCATIONS_TRACKED {
            // Those seen longer ago go first; if all are recent, the older half of them
            // (never everything: the file truncated a moment ago must stay).
            t.retain(|_, (_, at)| at.elapsed() < crate::front::TRUNCATED_DIRECT);
            if t.len() >= TRUNCATIONS_TRACKED {
                let mut times: Vec<Instant> = t.values().map(|(_, at)| *at).collect();
                times.sort_unstable();
                let cut = times[times.len() / 2];
                t.retain(|_, (_, at)| *at > cut);
            }
        }
        t.insert(ino, (count, Instant::now()));
    }

    /// Whether file `ino` was truncated lately (within `front::TRUNCATED_DIRECT`), as far
    /// as its attributes told this mount.
    pub(crate) fn truncated_lately(&self, ino: u64) -> bool {
        lock(&self.truncations)
            .get(&ino)
            .is_some_and(|(_, at)| at.elapsed() < crate::front::TRUNCATED_DIRECT)
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

    fn bucket_slot(&self, dir: u64, bucket: u64) -> &AtomicU64 {
        let h = dir.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(17)
            ^ bucket.wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
        &self.bucket_generations[(h % BUCKET_GENERATIONS as u64) as usize]
    }

    /// The invalidation count of the bucket of `name` in `dir` (read before asking the
    /// node, compared after remembering the name).
    pub(crate) fn bucket_generation(&self, dir: u64, name: &[u8]) -> u64 {
        self.bucket_slot(dir, bucket_of(name))
            .load(Ordering::SeqCst)
    }

    /// Bucket `bucket` of `dir` is being invalidated (counted before its names are taken).
    pub(crate) fn bucket_invalidated(&self, dir: u64, bucket: u64) {
        self.bucket_slot(dir, bucket).fetch_add(1, Ordering::SeqCst);
    }

    /// Every bucket is being invalidated (the node's stream broke).
    pub(crate) fn all_buckets_invalidated(&self) {
        for g in self.bucket_generations.iter() {
            g.fetch_add(1, Ordering::SeqCst);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Shared {
        Shared {
            stats: Stats::default(),
            root: 7,
            names: Mutex::new(HashMap::new()),
            inos: Mutex::new(HashSet::new()),
            inval_epoch: AtomicU64::new(0),
            bucket_generations: bucket_generations(),
            kernel: std::sync::OnceLock::new(),
            truncations: Mutex::new(HashMap::new()),
        }
    }

    /// A name answered across its bucket's invalidation is seen to be (its generation
    /// moved: the front then hands it out with no time to live); another bucket's
    /// invalidation leaves it alone.
    #[test]
    fn a_bucket_invalidation_moves_the_generation_of_its_names_only() {
        let sh = shared();
        let g = sh.bucket_generation(5, b"x");
        let other = (0..64u64)
            .map(|d| (100 + d, b"y".as_slice()))
            .find(|(d, n)| {
                !std::ptr::eq(
                    sh.bucket_slot(*d, bucket_of(n)),
                    sh.bucket_slot(5, bucket_of(b"x")),
                )
            })
            .expect("some other bucket has a slot of its own");
        sh.bucket_invalidated(other.0, bucket_of(other.1));
        assert_eq!(
            sh.bucket_generation(5, b"x"),
            g,
            "another bucket's invalidation"
        );
        sh.bucket_invalidated(5, bucket_of(b"x"));
        assert_ne!(
            sh.bucket_generation(5, b"x"),
            g,
            "its own bucket's invalidation"
        );
        let g = sh.bucket_generation(5, b"x");
        sh.all_buckets_invalidated();
        assert_ne!(sh.bucket_generation(5, b"x"), g, "the stream broke");
    }
}
