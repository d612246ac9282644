//! The invalidation service: the node's stream of blocks this mount's client lost, turned
//! into kernel invalidations off the FUSE threads and answered when the kernel returns (or
//! after `inval_wait`, counted late).

use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

use xfs_node::node::spawn_named;

use super::*;

/// The invalidation thread: subscribe to the node's invalidations and carry each to the
/// kernel (see the module docs). Returns when `stop` is set; reconnects when the node
/// goes away and comes back.
pub fn invalidations(
    control: &Path,
    first: Control,
    notifier: KernelChannel,
    shared: Arc<Shared>,
    wait: Duration,
    stop: Arc<AtomicBool>,
) {
    let mut warned = false;
    let mut first = Some(first);
    while !stop.load(Ordering::Relaxed) {
        if let Some(c) = first.take() {
            if let (Ok(r), Ok(w)) = (c.stream().try_clone(), c.stream().try_clone()) {
                serve_stream(r, w, &notifier, &shared, wait, &stop);
            }
            continue;
        }
        let mut c = match Control::connect(control) {
            Ok(c) => c,
            Err(e) => {
                if !warned {
                    eprintln!("xfsam-mount: invalidation stream: {e} (retrying)");
                    warned = true;
                }
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
        };
        match c.call(&CtlRequest::Subscribe) {
            Ok(Response::Ok) => warned = false,
            other => {
                eprintln!("xfsam-mount: subscribing to invalidations: {other:?}");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        }
        // The stream broke (the node restarted, or was unreachable): its client may have
        // lost blocks without telling us. Drop everything the kernel caches.
        forget_everything(&notifier, &shared);
        let (Ok(r), Ok(w)) = (c.stream().try_clone(), c.stream().try_clone()) else {
            continue;
        };
        serve_stream(r, w, &notifier, &shared, wait, &stop);
    }
}

/// Subscribe to node's invalidations on a new connection (before mounting: a node takes
/// one mount, and a mount without invalidations would not be coherent).
pub fn subscribe(control: &Path) -> Result<Control, FrontError> {
    let mut c = Control::connect(control).map_err(FrontError::node)?;
    match c.call(&CtlRequest::Subscribe).map_err(FrontError::node)? {
        Response::Ok => Ok(c),
        Response::Err { message, .. } => Err(FrontError::Node(message)),
        other => Err(FrontError::Unexpected(Box::new(other))),
    }
}

/// Drop the pages and attributes of every inode and expire every name handed to the
/// kernel.
pub(crate) fn forget_everything(n: &KernelChannel, sh: &Shared) {
    sh.inval_epoch.fetch_add(1, Ordering::SeqCst);
    sh.all_buckets_invalidated();
    let inos: Vec<u64> = lock(&sh.inos).iter().copied().collect();
    for ino in inos {
        let _ = n.inval_inode(sh.fuse(ino).0, 0, 0);
    }
    let names = std::mem::take(&mut *lock(&sh.names));
    for ((dir, _), set) in names {
        for name in set {
            let _ = n.expire_entry(sh.fuse(dir).0, &name);
        }
    }
}

/// Batches given to the kernel and not answered yet: id -> (deadline, blocks).
pub(crate) type Pending = Mutex<HashMap<u64, (std::time::Instant, Vec<u64>)>>;

/// A batch of blocks to carry to the kernel, with its id.
type Job = (u64, Vec<u64>);

/// One batch read from the node: blocks, nothing yet, or the end of the stream.
pub(crate) enum Next {
    Batch(Vec<u64>),
    Idle,
    End,
}

/// How the node is answered for a batch of blocks.
type AnswerFn = Arc<dyn Fn(Vec<u64>) + Send + Sync>;

/// The invalidation thread of a mount whose node runs in this process: carry the batches
/// of `attached` to the kernel and answer them (see the module docs) until `stop` is set.
pub fn invalidations_hosted(
    attached: MountAttachment,
    notifier: KernelChannel,
    shared: Arc<Shared>,
    wait: Duration,
    stop: Arc<AtomicBool>,
) {
    let answers: MountAnswers = attached.answers();
    let mut next = || match attached.recv_timeout(Duration::from_millis(200)) {
        Ok(b) => Next::Batch(b),
        Err(mpsc::RecvTimeoutError::Timeout) => Next::Idle,
        Err(mpsc::RecvTimeoutError::Disconnected) => Next::End,
    };
    let send: AnswerFn = Arc::new(move |blocks| answers.kernel_done(blocks));
    serve_batches(&mut next, send, &notifier, &shared, wait, &stop);
    // Dropping the attachment detaches the mount: what it had not answered completes.
}

/// One subscription over a socket: batches read from `r`, answered on `w`.
pub(crate) fn serve_stream(
    mut r: UnixStream,
    w: UnixStream,
    notifier: &KernelChannel,
    shared: &Arc<Shared>,
    wait: Duration,
    stop: &Arc<AtomicBool>,
) {
    let w = Arc::new(Mutex::new(w));
    let send: AnswerFn = {
        let w = w.clone();
        Arc::new(move |blocks| {
            let _ = control::send(&mut *lock(&w), &CtlRequest::KernelDone(blocks));
        })
    };
    // Wake up now and then to look at `stop`.
    r.set_read_timeout(Some(Duration::from_millis(200))).ok();
    let mut next = || match control::recv::<Response>(&mut r) {
        Ok(Some(Response::Invalidate(b))) => Next::Batch(b),
        Ok(Some(_)) => Next::Idle,
        Ok(None) => Next::End,
        Err(e)
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut =>
        {
            Next::Idle
        }
        Err(_) => Next::End,
    };
    serve_batches(&mut next, send, notifier, shared, wait, stop);
    let _ = lock(&w).shutdown(std::net::Shutdown::Both);
}

/// Batches from `next` go to workers (a kernel call that blocks — the kernel waits for
/// this mount — holds up neither the stream nor other batches); a worker answers its batch
/// (`send`) when the kernel returned, a watchdog answers it at its deadline, whichever is
/// first (once). Returns when `stop` is set or the stream ends.
fn serve_batches(
    next: &mut dyn FnMut() -> Next,
    send: AnswerFn,
    notifier: &KernelChannel,
    shared: &Arc<Shared>,
    wait: Duration,
    stop: &Arc<AtomicBool>,
) {
    let pending: Arc<Pending> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let answer = Answer {
        send,
        pending: pending.clone(),
    };
    let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
    let mut threads = spawn_workers(jobs_rx, notifier, shared, &answer);
    threads.push(spawn_watchdog(done.clone(), shared.clone(), answer));
    read_batches(next, &pending, &jobs_tx, shared, wait, stop);
    drop(jobs_tx);
    done.store(true, Ordering::Relaxed);
    // Workers blocked in the kernel finish when it lets go; do not wait for them.
    drop(threads);
}

/// Answers the node for a batch, once: whoever comes first, the worker that carried it
/// to the kernel or the watchdog at its deadline.
#[derive(Clone)]
struct Answer {
    /// How the node is told.
    send: AnswerFn,
    pending: Arc<Pending>,
}

impl Answer {
    /// Tells the node batch `id` is done unless it was answered already; says whether
    /// it did.
    fn answer(&self, id: u64) -> bool {
        let Some((_, blocks)) = lock(&self.pending).remove(&id) else {
            return false;
        };
        (self.send)(blocks);
        true
    }
}

/// Four workers that take batches from `jobs`, carry each block to the kernel and answer
/// the batch; they end when the sending half of `jobs` is dropped.
fn spawn_workers(
    jobs: mpsc::Receiver<Job>,
    notifier: &KernelChannel,
    shared: &Arc<Shared>,
    answer: &Answer,
) -> Vec<JoinHandle<()>> {
    let jobs = Arc::new(Mutex::new(jobs));
    let mut threads = Vec::new();
    for _ in 0..4 {
        let (rx, n, sh, answer) = (
            jobs.clone(),
            notifier.clone(),
            shared.clone(),
            answer.clone(),
        );
        threads.push(spawn_named("fuse-inval", move || loop {
            let job = lock(&rx).recv();
            let Ok((id, blocks)) = job else {
                return;
            };
            for b in blocks {
                invalidate(&n, &sh, b);
            }
            answer.answer(id);
        }));
    }
    threads
}

/// The watchdog: every 2 ms, answers the batches whose deadline passed (counted in
/// `inval_late`), until `done` is set.
fn spawn_watchdog(done: Arc<AtomicBool>, sh: Arc<Shared>, answer: Answer) -> JoinHandle<()> {
    spawn_named("fuse-watchdog", move || {
        while !done.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(2));
            let now = std::time::Instant::now();
            let late: Vec<u64> = lock(&answer.pending)
                .iter()
                .filter(|(_, (d, _))| *d <= now)
                .map(|(id, _)| *id)
                .collect();
            for id in late {
                if answer.answer(id) {
                    sh.stats.inval_late.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    })
}

/// Reads the node's batches of invalidations from `next` and hands each to the workers,
/// with its deadline (`wait` from now) in `pending`. Returns when `stop` is set or the
/// stream ends.
fn read_batches(
    next: &mut dyn FnMut() -> Next,
    pending: &Pending,
    jobs: &mpsc::Sender<Job>,
    shared: &Shared,
    wait: Duration,
    stop: &AtomicBool,
) {
    let mut id = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let blocks = match next() {
            Next::Batch(b) => b,
            Next::Idle => continue,
            Next::End => break,
        };
        shared
            .stats
            .invalidations
            .fetch_add(blocks.len() as u64, Ordering::Relaxed);
        id += 1;
        lock(pending).insert(id, (std::time::Instant::now() + wait, blocks.clone()));
        if jobs.send((id, blocks)).is_err() {
            break;
        }
    }
}

/// Drop what the kernel caches of `block`.
pub(crate) fn invalidate(n: &KernelChannel, sh: &Shared, block: u64) {
    let advisory = block & control::ADVISORY != 0;
    let block = block & !control::ADVISORY;
    let ino = ino_of(block);
    let bn = block & INODE_BLOCK;
    // Before any kernel call (and before the answer): a listing taken before now is not
    // handed to the kernel.
    sh.inval_epoch.fetch_add(1, Ordering::SeqCst);
    let fi = sh.fuse(ino);
    let calls = &sh.stats.kernel_calls;
    // An inode never handed to the kernel (nor the root, which it always has): it caches
    // nothing of it, neither attributes nor pages nor names in it.
    if ino != sh.root && !lock(&sh.inos).contains(&ino) {
        sh.stats.inval_skipped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if bn == INODE_BLOCK {
        // Attributes only (a negative offset leaves the pages).
        let _ = n.inval_inode(fi.0, -1, 0);
        calls.fetch_add(1, Ordering::Relaxed);
        return;
    }
    sh.bucket_invalidated(ino, bn);
    let names = lock(&sh.names).remove(&(ino, bn));
    for name in names.into_iter().flatten() {
        let _ = n.expire_entry(fi.0, &name);
        calls.fetch_add(1, Ordering::Relaxed);
    }
    // An advisory block (the node's CLI changed the file) stands for all its pages.
    let (off, len) = if advisory {
        (0, 0)
    } else {
        ((bn * BLOCK as u64) as i64, BLOCK as i64)
    };
    let _ = n.inval_inode(fi.0, off, len);
    calls.fetch_add(1, Ordering::Relaxed);
}
