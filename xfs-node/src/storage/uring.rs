//! The fragment store on a raw block device or a file, with io_uring, O_DIRECT and
//! registered buffers (DESIGN.md §4, Storage).
//!
//! The device is cut into slots of `4 KiB header + fragment_bytes`. A batch of reads or
//! writes is submitted at once, up to the ring's depth in flight (the store counts how many
//! it actually had in flight: [`UringStats::max_in_flight`]), from buffers registered with
//! the ring. [`FragmentStore::sync`] is `fdatasync` (on a block device it flushes the
//! device's volatile cache), so a write is durable once `sync` returns.
//!
//! # Safety
//!
//! Every `unsafe` of the storage code is in this file, for two reasons, with these
//! invariants:
//! 1. **Registered buffers** (`register_buffers`): each buffer is allocated here with 4 KiB
//!    alignment, never moves and is freed only after the ring is dropped (field order of
//!    [`UringStore`]; `Drop` leaks them instead if the ring may still own requests).
//! 2. **Submission entries** (`push`): an entry points into buffer `k` for `len <=` its size;
//!    every entry pushed in a batch is waited for before any buffer is touched again. If
//!    the ring fails in the middle of a batch the store is *poisoned*: every later call
//!    errors and the buffers are leaked rather than freed under the kernel.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::{File, Metadata, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use io_uring::{opcode, squeue, types, IoUring};

use super::fragment::{
    check_sizes, FragmentId, FragmentStore, Header, SlotIndex, StoreError, HEADER_BYTES,
};

const ALIGN: usize = 4096;

/// How to open a store.
#[derive(Clone, Debug)]
pub struct UringOptions {
    /// Largest fragment (a multiple of 4096).
    pub fragment_bytes: usize,
    /// Requests in flight at most (ring entries and registered buffers).
    pub depth: u32,
    /// For a plain file that does not exist yet: create it with this size.
    pub create_bytes: Option<u64>,
}

impl Default for UringOptions {
    fn default() -> Self {
        UringOptions {
            fragment_bytes: 64 * 1024,
            depth: 64,
            create_bytes: None,
        }
    }
}

/// What the store did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UringStats {
    /// Most requests it had submitted and not yet completed at once.
    pub max_in_flight: usize,
    /// Fragment writes completed.
    pub writes: u64,
    /// Fragment reads completed.
    pub reads: u64,
    /// `fdatasync`s.
    pub syncs: u64,
}

struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Result<AlignedBuf, StoreError> {
        let layout = Layout::from_size_align(len, ALIGN)
            .map_err(|e| StoreError::Config(format!("buffer of {len} bytes: {e}")))?;
        // SAFETY: the layout has a non-zero size (len >= 4096, checked by the caller).
        #[allow(unsafe_code)]
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(StoreError::Config(format!(
                "cannot allocate a {len}-byte buffer"
            )));
        }
        Ok(AlignedBuf { ptr, len })
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is a live allocation of `len` bytes owned by this value, and no IO
        // is in flight on it while the store holds `&mut self` between batches (invariant 2).
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts_mut(self.ptr, self.len)
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Ok(layout) = Layout::from_size_align(self.len, ALIGN) {
            // SAFETY: allocated in `new` with this layout; freed once.
            #[allow(unsafe_code)]
            unsafe {
                dealloc(self.ptr, layout)
            }
        }
    }
}

// SAFETY: the buffer is plain memory owned by this value; moving it between threads is fine.
#[allow(unsafe_code)]
unsafe impl Send for AlignedBuf {}

/// A fragment store on a file or block device.
pub struct UringStore {
    path: String,
    // Field order matters: the ring (which may reference the buffers) drops before them.
    ring: IoUring,
    bufs: Vec<AlignedBuf>,
    file: File,
    fragment_bytes: usize,
    slot_bytes: usize,
    slots: usize,
    index: SlotIndex,
    poisoned: bool,
    stats: UringStats,
}

impl Drop for UringStore {
    fn drop(&mut self) {
        if self.poisoned {
            // Requests may still reference the buffers: leak them (invariant 2).
            std::mem::forget(std::mem::take(&mut self.bufs));
        }
    }
}

/// One request of a batch: which buffer, where on the device, how many bytes.
struct Req {
    buf: usize,
    offset: u64,
    len: usize,
}

impl UringStore {
    /// Open (and, with `create_bytes`, create) the store at `path`, scanning its slot
    /// headers to rebuild the index.
    pub fn open(path: impl AsRef<Path>, opts: UringOptions) -> Result<UringStore, StoreError> {
        let path = path.as_ref();
        let path_s = path.display().to_string();
        let io = |source| StoreError::Io {
            path: path_s.clone(),
            source,
        };
        check_options(&opts)?;
        let (file, meta) = open_file(path, &path_s, &opts)?;
        let bytes = device_bytes(&file, &meta).map_err(io)?;
        let slot_bytes = HEADER_BYTES + opts.fragment_bytes;
        let slots = (bytes / slot_bytes as u64) as usize;
        if slots == 0 {
            return Err(StoreError::Config(format!(
                "{path_s}: {bytes} bytes hold no slot of {slot_bytes} bytes"
            )));
        }
        let ring = IoUring::new(opts.depth.next_power_of_two()).map_err(io)?;
        let mut bufs = Vec::with_capacity(opts.depth as usize);
        for _ in 0..opts.depth {
            bufs.push(AlignedBuf::new(slot_bytes)?);
        }
        let iovecs: Vec<libc::iovec> = bufs
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.ptr.cast(),
                iov_len: b.len,
            })
            .collect();
        // SAFETY: invariant 1: the buffers live (and do not move) until after the ring.
        #[allow(unsafe_code)]
        unsafe {
            ring.submitter().register_buffers(&iovecs).map_err(io)?;
        }
        let mut store = UringStore {
            path: path_s,
            ring,
            bufs,
            file,
            fragment_bytes: opts.fragment_bytes,
            slot_bytes,
            slots,
            index: SlotIndex::empty(0),
            poisoned: false,
            stats: UringStats::default(),
        };
        store.scan()?;
        Ok(store)
    }

    /// Slots on the device.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// What the store did so far.
    pub fn stats(&self) -> UringStats {
        self.stats
    }

    fn err(&self, source: std::io::Error) -> StoreError {
        StoreError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// An error if the store is poisoned (invariant 2): it must be reopened.
    fn check_usable(&self) -> Result<(), StoreError> {
        if self.poisoned {
            return Err(StoreError::Config(format!(
                "{}: the store failed earlier and must be reopened",
                self.path
            )));
        }
        Ok(())
    }

    /// Submit what is queued and wait for `want` completions (again when a signal
    /// interrupts the wait). A failure poisons the store: requests may be in flight.
    fn submit_and_wait(&mut self, want: usize) -> Result<(), StoreError> {
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    self.poisoned = true;
                    return Err(self.err(e));
                }
            }
        }
    }

    /// Count `n` completed fragment writes or reads.
    fn count_done(&mut self, write: bool, n: usize) {
        if write {
            self.stats.writes += n as u64;
        } else {
            self.stats.reads += n as u64;
        }
    }

    /// Read every slot header; rebuild the index.
    fn scan(&mut self) -> Result<(), StoreError> {
        let mut headers: Vec<(usize, Option<Header>)> = Vec::with_capacity(self.slots);
        let depth = self.bufs.len();
        let mut first = 0;
        while first < self.slots {
            let n = depth.min(self.slots - first);
            let reqs: Vec<Req> = (0..n)
                .map(|k| Req {
                    buf: k,
                    offset: ((first + k) * self.slot_bytes) as u64,
                    len: HEADER_BYTES,
                })
                .collect();
            self.run(&reqs, false)?;
            for k in 0..n {
                let h = Header::decode(&self.bufs[k].bytes()[..HEADER_BYTES])
                    .ok()
                    .flatten();
                headers.push((first + k, h));
            }
            first += n;
        }
        // Duplicates (a rewrite cut short): check the data of the newer copy.
        let mut checks: Vec<(usize, bool)> = Vec::new();
        {
            let mut seen = std::collections::BTreeMap::new();
            let mut dups = Vec::new();
            for (s, h) in &headers {
                if let Some(h) = h {
                    if let Some(prev) = seen.insert(h.id, *s) {
                        dups.push(prev);
                        dups.push(*s);
                    }
                }
            }
            for s in dups {
                let ok = self.slot_intact(s).unwrap_or(false);
                checks.push((s, ok));
            }
        }
        let (idx, stale) = SlotIndex::rebuild(headers.into_iter(), |s| {
            checks
                .iter()
                .find(|(c, _)| *c == s)
                .is_some_and(|(_, ok)| *ok)
        });
        self.index = idx;
        // Forget the losers on the device too, so the next scan agrees.
        self.zero_headers(&stale)?;
        if !stale.is_empty() {
            self.sync()?;
        }
        Ok(())
    }

    /// Read a whole slot into buffer 0; returns the request (to write the buffer back).
    fn read_slot_into_buffer_0(&mut self, slot: usize) -> Result<[Req; 1], StoreError> {
        let reqs = [Req {
            buf: 0,
            offset: (slot * self.slot_bytes) as u64,
            len: self.slot_bytes,
        }];
        self.run(&reqs, false)?;
        Ok(reqs)
    }

    fn slot_intact(&mut self, slot: usize) -> Result<bool, StoreError> {
        self.read_slot_into_buffer_0(slot)?;
        let b = self.bufs[0].bytes();
        let Ok(Some(h)) = Header::decode(&b[..HEADER_BYTES]) else {
            return Ok(false);
        };
        let end = HEADER_BYTES + h.len as usize;
        Ok(end <= b.len() && h.check(h.id, &b[HEADER_BYTES..end]).is_ok())
    }

    fn zero_headers(&mut self, slots: &[usize]) -> Result<(), StoreError> {
        for chunk in slots.chunks(self.bufs.len()) {
            let reqs: Vec<Req> = chunk
                .iter()
                .enumerate()
                .map(|(k, s)| Req {
                    buf: k,
                    offset: (*s * self.slot_bytes) as u64,
                    len: HEADER_BYTES,
                })
                .collect();
            for r in &reqs {
                self.bufs[r.buf].bytes()[..HEADER_BYTES].fill(0);
            }
            self.run(&reqs, true)?;
        }
        Ok(())
    }

    /// Submit `reqs` (reads, or writes when `write`) all at once and wait for every one.
    fn run(&mut self, reqs: &[Req], write: bool) -> Result<(), StoreError> {
        self.check_usable()?;
        let fd = types::Fd(self.file.as_raw_fd());
        for (i, r) in reqs.iter().enumerate() {
            let buf = &self.bufs[r.buf];
            debug_assert!(r.len <= buf.len && r.len % ALIGN == 0);
            let entry = fixed_io(fd, buf, r.buf, r.offset, r.len, write).user_data(i as u64);
            // SAFETY: invariant 2: the entry points into a registered buffer of at least
            // `len` bytes, and we wait for its completion below before touching it.
            #[allow(unsafe_code)]
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_err() {
                // The queue is sized to the buffer count; a full queue means a bug here.
                self.poisoned = i > 0;
                return Err(StoreError::Config("submission queue full".into()));
            }
        }
        let mut done = 0;
        let mut failure: Option<std::io::Error> = None;
        self.stats.max_in_flight = self.stats.max_in_flight.max(reqs.len());
        while done < reqs.len() {
            self.submit_and_wait(reqs.len() - done)?;
            for cqe in self.ring.completion() {
                done += 1;
                let want = reqs.get(cqe.user_data() as usize).map_or(0, |r| r.len);
                if let Err(e) = completed(cqe.result(), want, write) {
                    failure.get_or_insert(e);
                }
            }
        }
        self.count_done(write, reqs.len());
        match failure {
            Some(e) => Err(self.err(e)),
            None => Ok(()),
        }
    }

    /// Flip one bit of a fragment's data on the device (fault injection for tests: a latent
    /// media error). False if the fragment is not here.
    pub fn flip_bit(&mut self, id: FragmentId, bit: usize) -> Result<bool, StoreError> {
        let Some((slot, _)) = self.index.map.get(&id).copied() else {
            return Ok(false);
        };
        let reqs = self.read_slot_into_buffer_0(slot)?;
        let b = self.bufs[0].bytes();
        let len = Header::decode(&b[..HEADER_BYTES])
            .ok()
            .flatten()
            .map_or(0, |h| h.len as usize);
        if len == 0 {
            return Ok(false);
        }
        let bit = bit % (len * 8);
        b[HEADER_BYTES + bit / 8] ^= 1 << (bit % 8);
        self.run(&reqs, true)?;
        self.file.sync_data().map_err(|e| self.err(e))?;
        Ok(true)
    }

    /// Run `count` requests with up to the ring's depth in flight all the time: `fill`
    /// prepares request i in a free buffer (returns its device offset and length), `done`
    /// consumes buffer contents once request i completed; a buffer is reused as soon as its
    /// request is done. The first failure stops new requests; those in flight are waited
    /// for; the error is returned.
    fn stream(
        &mut self,
        count: usize,
        write: bool,
        mut fill: impl FnMut(&mut [u8], usize) -> (u64, usize),
        mut done: impl FnMut(&[u8], usize),
    ) -> Result<(), StoreError> {
        self.check_usable()?;
        let fd = types::Fd(self.file.as_raw_fd());
        let depth = self.bufs.len();
        let mut free: Vec<usize> = (0..depth).rev().collect();
        let mut lens = vec![0usize; depth];
        let (mut next, mut in_flight) = (0usize, 0usize);
        let mut failure: Option<std::io::Error> = None;
        while (next < count && failure.is_none()) || in_flight > 0 {
            while next < count && failure.is_none() {
                let Some(k) = free.pop() else { break };
                let buf = &mut self.bufs[k];
                let (offset, len) = fill(buf.bytes(), next);
                debug_assert!(len <= buf.len && len % ALIGN == 0);
                lens[k] = len;
                let entry = fixed_io(fd, buf, k, offset, len, write)
                    .user_data(((next as u64) << 16) | k as u64);
                // SAFETY: invariant 2: the entry points into registered buffer k, of at
                // least `len` bytes, which is not touched again until its completion.
                #[allow(unsafe_code)]
                let pushed = unsafe { self.ring.submission().push(&entry) };
                if pushed.is_err() {
                    // The queue has room for every buffer; full means a bug here.
                    self.poisoned = true;
                    return Err(StoreError::Config("submission queue full".into()));
                }
                next += 1;
                in_flight += 1;
            }
            self.stats.max_in_flight = self.stats.max_in_flight.max(in_flight);
            if in_flight == 0 {
                break;
            }
            self.submit_and_wait(1)?;
            let cqes: Vec<(u64, i32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (ud, res) in cqes {
                let (i, k) = ((ud >> 16) as usize, (ud & 0xffff) as usize);
                in_flight -= 1;
                match completed(res, lens[k], write) {
                    Err(e) => {
                        failure.get_or_insert(e);
                    }
                    Ok(()) => {
                        done(&self.bufs[k].bytes()[..lens[k]], i);
                        self.count_done(write, 1);
                    }
                }
                free.push(k);
            }
        }
        match failure {
            Some(e) => Err(self.err(e)),
            None => Ok(()),
        }
    }
}

impl FragmentStore for UringStore {
    fn fragment_bytes(&self) -> usize {
        self.fragment_bytes
    }

    fn free_slots(&mut self) -> Result<usize, StoreError> {
        Ok(self.index.free.len())
    }

    fn write(&mut self, fragments: &[(FragmentId, &[u8])]) -> Result<(), StoreError> {
        check_sizes(fragments, self.fragment_bytes)?;
        let reserved = self.index.reserve(fragments.len())?;
        let slot_bytes = self.slot_bytes as u64;
        let mut written = vec![false; fragments.len()];
        let r = self.stream(
            fragments.len(),
            true,
            |b, i| {
                let (id, data) = fragments[i];
                let (slot, generation) = reserved[i];
                let len = (HEADER_BYTES + data.len()).div_ceil(ALIGN) * ALIGN;
                Header::new(id, data, generation).encode(b);
                b[HEADER_BYTES..HEADER_BYTES + data.len()].copy_from_slice(data);
                b[HEADER_BYTES + data.len()..len].fill(0);
                (slot as u64 * slot_bytes, len)
            },
            |_, i| written[i] = true,
        );
        // What was written is in the index (a later write or sync decides its fate); the
        // slots of what was not go back.
        for (((id, _), (slot, generation)), w) in fragments.iter().zip(&reserved).zip(written) {
            if w {
                self.index.place(*id, *slot, *generation);
            } else {
                self.index.free.insert(*slot);
            }
        }
        r
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        self.check_usable()?;
        self.file.sync_data().map_err(|e| self.err(e))?;
        self.stats.syncs += 1;
        self.index.synced();
        Ok(())
    }

    fn read(&mut self, ids: &[FragmentId]) -> Vec<Result<Vec<u8>, StoreError>> {
        let mut out: Vec<Option<Result<Vec<u8>, StoreError>>> = ids.iter().map(|_| None).collect();
        let present: Vec<(usize, usize)> = ids
            .iter()
            .enumerate()
            .filter_map(|(i, id)| match self.index.map.get(id) {
                Some((slot, _)) => Some((i, *slot)),
                None => {
                    out[i] = Some(Err(StoreError::NotFound(*id)));
                    None
                }
            })
            .collect();
        let slot_bytes = self.slot_bytes;
        let r = self.stream(
            present.len(),
            false,
            |_, n| ((present[n].1 * slot_bytes) as u64, slot_bytes),
            |b, n| {
                let i = present[n].0;
                let id = ids[i];
                let r = match Header::decode(&b[..HEADER_BYTES]) {
                    Err(why) => Err(StoreError::Corrupt { id, why }),
                    Ok(None) => Err(StoreError::Corrupt {
                        id,
                        why: "header missing",
                    }),
                    Ok(Some(h)) => {
                        let end = HEADER_BYTES + (h.len as usize).min(b.len() - HEADER_BYTES);
                        let data = &b[HEADER_BYTES..end];
                        h.check(id, data).map(|()| data.to_vec())
                    }
                };
                out[i] = Some(r);
            },
        );
        let failed = r.err().map(|e| e.to_string());
        out.into_iter()
            .zip(ids)
            .map(|(r, id)| match (r, &failed) {
                (Some(r), _) => r,
                (None, Some(msg)) => Err(StoreError::Io {
                    path: self.path.clone(),
                    source: std::io::Error::other(msg.clone()),
                }),
                (None, None) => Err(StoreError::NotFound(*id)),
            })
            .collect()
    }

    fn delete(&mut self, ids: &[FragmentId]) -> Result<(), StoreError> {
        let slots: Vec<usize> = ids.iter().filter_map(|id| self.index.remove(*id)).collect();
        self.zero_headers(&slots)
    }

    fn list(&mut self) -> Result<Vec<FragmentId>, StoreError> {
        Ok(self.index.map.keys().copied().collect())
    }
}

/// Check a store's options: the fragment size and the ring's depth.
fn check_options(opts: &UringOptions) -> Result<(), StoreError> {
    if opts.fragment_bytes == 0 || !opts.fragment_bytes.is_multiple_of(ALIGN) {
        return Err(StoreError::Config(format!(
            "fragment_bytes {} must be a non-zero multiple of {ALIGN}",
            opts.fragment_bytes
        )));
    }
    if opts.depth == 0 || opts.depth > 4096 {
        return Err(StoreError::Config(format!(
            "depth {} must be 1..=4096",
            opts.depth
        )));
    }
    Ok(())
}

/// Open the device or file at `path` (`path_s` for messages) with O_DIRECT; a file that
/// does not exist is created with `opts.create_bytes` bytes, if given. Returns it with its
/// metadata as opened.
fn open_file(
    path: &Path,
    path_s: &str,
    opts: &UringOptions,
) -> Result<(File, Metadata), StoreError> {
    let io = |source| StoreError::Io {
        path: path_s.to_string(),
        source,
    };
    let exists = path.exists();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(!exists && opts.create_bytes.is_some())
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EINVAL) => StoreError::Config(format!(
                "{path_s}: O_DIRECT refused (tmpfs and some file systems do not support it; use a block device or a file on ext4/xfs)"
            )),
            _ => io(e),
        })?;
    let meta = file.metadata().map_err(io)?;
    if !exists {
        if let Some(n) = opts.create_bytes {
            file.set_len(n).map_err(io)?;
        }
    }
    Ok((file, meta))
}

/// The size in bytes of the open device or file (`meta`: its metadata as opened).
fn device_bytes(file: &File, meta: &Metadata) -> Result<u64, std::io::Error> {
    if meta.file_type().is_block_device() {
        let mut n: u64 = 0;
        // BLKGETSIZE64: the device's size in bytes.
        // SAFETY: the ioctl writes one u64 to the pointer, which is valid and aligned.
        #[allow(unsafe_code)]
        let r = unsafe { libc::ioctl(file.as_raw_fd(), 0x8008_1272, &mut n as *mut u64) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n)
    } else {
        Ok(file.metadata()?.len())
    }
}

/// The submission entry of a read (or, with `write`, a write) of `len` bytes at device
/// `offset` into (from) registered buffer `k`, `buf`.
fn fixed_io(
    fd: types::Fd,
    buf: &AlignedBuf,
    k: usize,
    offset: u64,
    len: usize,
    write: bool,
) -> squeue::Entry {
    if write {
        opcode::WriteFixed::new(fd, buf.ptr, len as u32, k as u16)
            .offset(offset)
            .build()
    } else {
        opcode::ReadFixed::new(fd, buf.ptr, len as u32, k as u16)
            .offset(offset)
            .build()
    }
}

/// Whether a request of `want` bytes completed with `res` (bytes done, or `-errno`):
/// the error if it failed or came short.
fn completed(res: i32, want: usize, write: bool) -> Result<(), std::io::Error> {
    if res < 0 {
        return Err(std::io::Error::from_raw_os_error(-res));
    }
    if res as usize != want {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!(
                "short {} of {res} of {want} bytes",
                if write { "write" } else { "read" }
            ),
        ));
    }
    Ok(())
}
