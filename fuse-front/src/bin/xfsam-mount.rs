//! `xfsam-mount`: mount the file system of an `xfs-node` cluster through one of its nodes.
//! (Named so as not to be taken for Linux's local XFS; the mount shows as `fuse.xfsam`.)

#![deny(unsafe_code)]

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use fuse_front::{Front, NodeLink, Options};
use fuser::{Config as FuseConfig, Session, SessionACL};
use xfs_node::node::config::Config;
use xfs_node::node::{spawn_named, MountAttachment, Node};

#[derive(Parser)]
#[command(
    name = "xfsam-mount",
    version,
    about = "Mount an xfs-node cluster's file system (FUSE) through one of its nodes",
    long_about = "Mount the file system of an xfs-node cluster at MOUNTPOINT through node K's \
                  client. Runs in the foreground until unmounted (`fusermount3 -u MOUNTPOINT`, \
                  `umount`, `xfs-node down`) or sent SIGINT/SIGTERM, which unmount it.\n\n\
                  Two ways to reach the node:\n\
                  * --serve: this process runs node K itself (as `xfs-node serve` would) and \
                  serves the mount from it in-process, with no socket between a FUSE request \
                  and the node's client. Unmounting leaves the node running (its control \
                  socket still answers); SIGINT/SIGTERM unmount, write back, checkpoint and \
                  stop it; a `Shutdown` request unmounts and stops it (`xfs-node down` \
                  sends it after it wrote back and checkpointed every node).\n\
                  * without --serve: node K runs in another process and is reached over its \
                  control socket (one more hop per request).\n\n\
                  Examples:\n  xfsam-mount --serve --config cluster.toml --node 1 /mnt/xfs1 &\n  \
                  xfsam-mount --data /var/tmp/xfs --node 2 /mnt/xfs2 &\n\
                  `xfs-node up --mount DIR` (node 1 served in-process) and `xfs-node mount` \
                  (a running node, over its socket) run it for you."
)]
struct Args {
    /// The local cluster's data directory (as given to `xfs-node up`).
    #[arg(long, conflicts_with = "config")]
    data: Option<PathBuf>,
    /// A cluster config file (real clusters).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The node whose client serves this mount.
    #[arg(long, default_value_t = 1)]
    node: u16,
    /// Mount options, comma-separated: `allow_other`, `ro`, `fsname=NAME`.
    #[arg(short = 'o', value_delimiter = ',')]
    options: Vec<String>,
    /// Seconds the kernel may cache entries and attributes (kept coherent by invalidations).
    #[arg(long, default_value_t = 60)]
    ttl: u64,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Run node K in this process and serve the mount from it (no control-socket hop).
    #[arg(long)]
    serve: bool,
    /// With --serve: seconds to wait for the stripe group's storage servers.
    #[arg(long, default_value_t = 60, requires = "serve")]
    wait: u64,
    /// Where to mount (an existing directory); with --serve it may be left out: the node
    /// runs, and `xfs-node mount` mounts it later in this process.
    mountpoint: Option<PathBuf>,
}

fn unmount(dir: &Path) {
    if xfs_node::os::unmount(dir, 0).is_err() {
        // Files are open: detach it (they see errors once this process is gone).
        eprintln!(
            "xfsam-mount: {} is busy (open files); detaching it",
            dir.display()
        );
        let _ = xfs_node::os::unmount(dir, libc::MNT_DETACH);
    }
}

/// Where a mount's invalidations come from: the node hosted in this process (its
/// attachment), or another process's node (a `Subscribe` stream on its control socket).
enum Invalidations {
    Hosted(MountAttachment),
    Socket {
        control: PathBuf,
        stream: xfs_node::node::control::Control,
    },
}

/// What every mount of this process shares: the command line's settings and the state
/// file's place.
#[derive(Clone)]
struct Settings {
    ttl: u64,
    threads: usize,
    /// Node K's control socket (the mount's state file sits beside it).
    control: PathBuf,
    node: u16,
    /// The file system's name in /proc/mounts unless `-o fsname=` says otherwise.
    fsname: String,
}

/// A mount made: served until unmounted ([`Mounted::serve`]).
struct Mounted {
    mp: PathBuf,
    ended: Arc<AtomicBool>,
    shared: Arc<fuse_front::Shared>,
    /// Stops the invalidation thread.
    stop: Arc<AtomicBool>,
    /// A hosted mount's invalidation thread: it holds the node's attachment until it
    /// ends (within 200 ms of `stop`).
    invalidating: Option<std::thread::JoinHandle<()>>,
    conn: Option<u64>,
    state: PathBuf,
    link: &'static str,
}

/// Mount the file system at `mp` through `link`, its invalidations from `inval`, and start
/// serving it (FUSE session and invalidation threads). Returns once mounted.
fn mount(
    s: &Settings,
    link: NodeLink,
    inval: Invalidations,
    mp: PathBuf,
    opts: &MountOptions,
) -> Result<Mounted, String> {
    let front = Front::new(
        Options {
            ttl: Duration::from_secs(s.ttl),
            inval_wait: Duration::from_millis(20),
            read_only: opts.read_only,
        },
        link,
    )
    .map_err(|e| e.to_string())?;
    let link = front.link_kind();
    let shared = front.shared();
    let fd = fuse_front::mount_fuse(&mp, &opts.fsname, opts.allow_other, opts.read_only)
        .map_err(|e| e.to_string())?;
    let notifier = match fd.try_clone() {
        Ok(d) => fuse_front::KernelChannel::new(d),
        Err(e) => {
            unmount(&mp);
            return Err(format!("cannot duplicate the FUSE descriptor: {e}"));
        }
    };
    shared.set_kernel(notifier.clone());
    let session = new_session(front, fd, &mp, opts.allow_other, s.threads)?;
    let ended = match spawn_session(session) {
        Ok(e) => e,
        Err(e) => {
            unmount(&mp);
            // `inval` (the node's attachment) is dropped here: the node can be mounted
            // again.
            return Err(e);
        }
    };
    // Invalidations that came meanwhile wait in the attachment's queue.
    let stop = Arc::new(AtomicBool::new(false));
    let (sh, st) = (shared.clone(), stop.clone());
    let wait = Duration::from_millis(20);
    let invalidating = match inval {
        Invalidations::Hosted(attached) => Some(spawn_named("fuse-inval-in", move || {
            fuse_front::invalidations_hosted(attached, notifier, sh, wait, st)
        })),
        Invalidations::Socket { control, stream } => {
            spawn_named("fuse-inval-in", move || {
                fuse_front::invalidations(&control, stream, notifier, sh, wait, st)
            });
            None
        }
    };
    // Known once the session serves (the stat is a FUSE request): for aborting a detached
    // mount whose files stay open.
    let conn = fuse_front::connection_of(&mp).ok();
    if let Some(c) = conn {
        if let Err(e) = fuse_front::raise_read_ahead(c) {
            eprintln!(
                "xfsam-mount: cannot raise the read-ahead to {} KiB (sequential reads stay \
                 at the kernel's default): {e}",
                fuse_front::READ_AHEAD_KB
            );
        }
    }
    let state = fuse_front::state_path(&s.control);
    let m = Mounted {
        mp,
        ended,
        shared,
        stop,
        invalidating,
        conn,
        state,
        link,
    };
    // Written once before anyone is told it is mounted; kept current by `serve`.
    write_state(&m.state, &m.state_text());
    eprintln!(
        "xfsam-mount: node {} mounted at {} (pid {}, {link})",
        s.node,
        m.mp.display(),
        std::process::id()
    );
    Ok(m)
}

impl Mounted {
    fn state_text(&self) -> String {
        format!(
            "pid {}\nmountpoint {}\nlink {}\n{}",
            std::process::id(),
            self.mp.display(),
            self.link,
            self.shared.stats.render()
        )
    }

    /// Serve until the file system is unmounted (from outside, or here once
    /// `unmount_now()`). Returns false if it could be neither unmounted nor aborted: the
    /// kernel still serves files through it.
    fn serve(self, unmount_now: &dyn Fn() -> bool) -> bool {
        serve_until_unmounted(
            &self.mp,
            &self.ended,
            unmount_now,
            &self.state,
            &|| self.state_text(),
            self.conn,
        );
        if !self.ended.load(Ordering::Relaxed) {
            return false;
        }
        self.stop.store(true, Ordering::Relaxed);
        // The node is free for another mount once the attachment is dropped; only then
        // does the state file (which `xfs-node mount` checks) go.
        if let Some(t) = self.invalidating {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.state);
        eprintln!("xfsam-mount: {} unmounted", self.mp.display());
        true
    }
}

/// Node `id` of `cfg`, started here and ready.
fn host_node(cfg: Config, id: u16, wait: u64) -> Result<Arc<Node>, String> {
    let node = Node::start_configured(cfg, id).map_err(|e| e.to_string())?;
    node.wait_ready(Duration::from_secs(wait))
        .map_err(|e| e.to_string())?;
    eprintln!("xfs-node {id}: ready (served in-process by xfsam-mount)");
    Ok(Arc::new(node))
}

/// Serve `node`'s control socket on a thread; `gone` is set when that server stops (a
/// `Shutdown` request).
fn serve_control(node: &Arc<Node>, id: u16, gone: Arc<AtomicBool>) {
    std::thread::spawn({
        let node = node.clone();
        move || {
            if let Err(e) = node.serve() {
                eprintln!("xfs-node {id}: control socket: {e}");
            }
            gone.store(true, Ordering::Relaxed);
        }
    });
}

/// What the hosted mounts of this process share.
#[derive(Clone)]
struct Host {
    node: Arc<Node>,
    settings: Settings,
    /// Set when the node's control server stopped.
    gone: Arc<AtomicBool>,
    /// Mounts being served.
    active: Arc<AtomicUsize>,
    /// SIGINT/SIGTERM/SIGHUP came: unmount, then stop.
    signalled: &'static AtomicBool,
    /// The unmount signal came (`xfs-node down`): unmount, the node goes on.
    unmount_asked: &'static AtomicBool,
}

impl Host {
    /// Mount the hosted node's file system at `dir` (one mount per node) and serve it on a
    /// thread of its own until it is unmounted: from outside, by the unmount signal
    /// (`xfs-node down`), by SIGINT/SIGTERM or when the node stops. Returns once mounted.
    fn mount(&self, dir: &Path, opts: &MountOptions) -> Result<(), (i32, String)> {
        let attached = self
            .node
            .attach_mount()
            .map_err(|e| (libc::EBUSY, e.to_string()))?;
        let mp = mount_point(dir).map_err(|e| (libc::EINVAL, e))?;
        // An unmount signal that came with no mount to take it is not for this one.
        self.unmount_asked.store(false, Ordering::Relaxed);
        let link = NodeLink::Hosted(self.node.clone());
        let inval = Invalidations::Hosted(attached);
        let m = mount(&self.settings, link, inval, mp, opts).map_err(|e| (libc::EIO, e))?;
        self.active.fetch_add(1, Ordering::Relaxed);
        let host = self.clone();
        std::thread::spawn(move || {
            let unmount_now = || {
                host.signalled.load(Ordering::Relaxed)
                    || host.unmount_asked.load(Ordering::Relaxed)
                    || host.gone.load(Ordering::Relaxed)
            };
            let mp = m.mp.clone();
            if !m.serve(&unmount_now) {
                // The kernel still serves files through this mount (the abort failed): a
                // node that went on without the mount's invalidations would leave them
                // incoherent. Stop the node with the mount.
                eprintln!(
                    "xfsam-mount: {} could not be unmounted nor aborted: stopping node {} \
                     with it",
                    mp.display(),
                    host.settings.node
                );
                host.node.write_back_and_checkpoint();
                std::process::exit(1);
            }
            // The unmount signal asked for this one; a later mount starts afresh.
            host.unmount_asked.store(false, Ordering::Relaxed);
            host.active.fetch_sub(1, Ordering::Relaxed);
        });
        Ok(())
    }
}

fn run(a: Args) -> Result<(), String> {
    // First: a signal during a hosted node's start (which may wait a minute for its
    // stripe group) must not kill it with a mount half made; it is looked at once mounted.
    let signalled = xfs_node::os::flag_on_signals(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP]);
    let unmount_asked = xfs_node::os::flag_on_unmount_signal();
    let cfg = Config::locate(a.data.as_deref(), a.config.as_deref()).map_err(|e| e.to_string())?;
    let node_cfg = cfg
        .node(a.node)
        .ok_or_else(|| {
            format!(
                "node {} is not in the cluster (nodes: {:?})",
                a.node,
                cfg.nodes.iter().map(|n| n.id).collect::<Vec<_>>()
            )
        })?
        .clone();
    let settings = Settings {
        ttl: a.ttl,
        threads: a.threads,
        control: node_cfg.control.clone(),
        node: a.node,
        fsname: format!("xfsam:{}/node{}", cfg.cluster.name, a.node),
    };
    let opts = MountOptions::parse(&a.options, settings.fsname.clone())?;
    if !a.serve {
        let dir = a
            .mountpoint
            .as_deref()
            .ok_or("say where to mount (MOUNTPOINT; only --serve runs without one)")?;
        let mp = mount_point(dir)?;
        // One mount per node: attach first (a mount without invalidations would not be
        // coherent), then mount.
        let stream = fuse_front::subscribe(&node_cfg.control)
            .map_err(|e| format!("node {}: {e}", a.node))?;
        let inval = Invalidations::Socket {
            control: node_cfg.control.clone(),
            stream,
        };
        let link = NodeLink::socket(node_cfg.control.clone());
        let m = mount(&settings, link, inval, mp, &opts)?;
        m.serve(&|| signalled.load(Ordering::Relaxed) || unmount_asked.load(Ordering::Relaxed));
        return Ok(());
    }
    // Checked before the node starts (which may take a while).
    if let Some(dir) = &a.mountpoint {
        mount_point(dir)?;
    }
    let host = Host {
        node: host_node(cfg, a.node, a.wait)?,
        settings,
        gone: Arc::new(AtomicBool::new(false)),
        active: Arc::new(AtomicUsize::new(0)),
        signalled,
        unmount_asked,
    };
    // Mounts asked later (`xfs-node mount`, over the control socket), taken from the
    // socket's first request on.
    let h = host.clone();
    host.node.set_mounter(Box::new(move |dir, flags| {
        let opts = MountOptions {
            allow_other: flags.allow_other,
            read_only: flags.read_only,
            fsname: h.settings.fsname.clone(),
        };
        h.mount(dir, &opts)
    }));
    serve_control(&host.node, a.node, host.gone.clone());
    if let Some(dir) = &a.mountpoint {
        host.mount(dir, &opts).map_err(|(_, e)| e)?;
    }
    // The node goes on serving its peers and its control socket (mounted or not) until a
    // signal or a `Shutdown` request.
    while !signalled.load(Ordering::Relaxed) && !host.gone.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
    }
    // The mounts see it too and unmount.
    for _ in 0..200 {
        if host.active.load(Ordering::Relaxed) == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if signalled.load(Ordering::Relaxed) {
        eprintln!(
            "xfs-node {}: signal: writing back and checkpointing",
            a.node
        );
        host.node.write_back_and_checkpoint();
    }
    eprintln!("xfs-node {}: stopped", a.node);
    // The node's threads do not end by themselves.
    std::process::exit(0);
}

/// The mount point `dir`, made canonical: an existing directory with nothing mounted on it.
fn mount_point(dir: &Path) -> Result<PathBuf, String> {
    let md = std::fs::metadata(dir).map_err(|e| {
        format!(
            "mount point {}: {e} (create it first: mkdir -p {})",
            dir.display(),
            dir.display()
        )
    })?;
    if !md.is_dir() {
        return Err(format!("mount point {} is not a directory", dir.display()));
    }
    let mp = dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    if xfs_node::os::is_mount_point(&mp) {
        return Err(format!(
            "{} is busy: something is mounted there already (unmount it: fusermount3 -u {})",
            mp.display(),
            mp.display()
        ));
    }
    Ok(mp)
}

/// What `-o` asked for.
struct MountOptions {
    allow_other: bool,
    read_only: bool,
    fsname: String,
}

impl MountOptions {
    /// Parses the `-o` options (`fsname` unless one is given).
    fn parse(options: &[String], fsname: String) -> Result<MountOptions, String> {
        let mut o = MountOptions {
            allow_other: false,
            read_only: false,
            fsname,
        };
        for opt in options {
            match opt.as_str() {
                "" => {}
                "allow_other" => o.allow_other = true,
                "ro" => o.read_only = true,
                "rw" => o.read_only = false,
                s if s.starts_with("fsname=") => o.fsname = s["fsname=".len()..].to_string(),
                s => {
                    return Err(format!(
                        "unknown mount option {s:?} (known: allow_other, ro, rw, fsname=NAME)"
                    ))
                }
            }
        }
        Ok(o)
    }
}

/// A FUSE session of `front` on `fd` (mounted at `mp`, which is unmounted if the session
/// does not start).
fn new_session(
    front: Front,
    fd: OwnedFd,
    mp: &Path,
    allow_other: bool,
    threads: usize,
) -> Result<Session<Front>, String> {
    let acl = if allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    let mut fc = FuseConfig::default();
    fc.acl = acl;
    fc.n_threads = Some(threads.max(1));
    fc.clone_fd = true;
    Session::from_fd(front, fd, acl, fc).map_err(|e| {
        unmount(mp);
        format!("the FUSE session at {} did not start: {e}", mp.display())
    })
}

/// Runs `session` in the background; the flag it returns is set when the session ends
/// (the file system was unmounted).
fn spawn_session(session: Session<Front>) -> Result<Arc<AtomicBool>, String> {
    let bg = session
        .spawn()
        .map_err(|e| format!("cannot start the FUSE session: {e}"))?;
    let ended = Arc::new(AtomicBool::new(false));
    {
        let ended = ended.clone();
        std::thread::spawn(move || {
            let _ = bg.join();
            ended.store(true, Ordering::Relaxed);
        });
    }
    Ok(ended)
}

/// Waits until the session has `ended`, keeping the state file at `state` (`text`: pid,
/// mount point, link, counters) up to date. Once `unmount_now()`, unmounts `mp` and waits up to
/// 2 s for the session to end; a detached mount (files still open) is then aborted
/// (FUSE connection `conn`): its open files fail from then on.
fn serve_until_unmounted(
    mp: &Path,
    ended: &AtomicBool,
    unmount_now: &dyn Fn() -> bool,
    state: &Path,
    text: &dyn Fn() -> String,
    conn: Option<u64>,
) {
    let wait_ended = || {
        for _ in 0..40 {
            if ended.load(Ordering::Relaxed) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    };
    let mut last = String::new();
    while !ended.load(Ordering::Relaxed) {
        if unmount_now() {
            unmount(mp);
            if !wait_ended() {
                if let Some(c) = conn {
                    eprintln!(
                        "xfsam-mount: files stay open on {}: aborting it",
                        mp.display()
                    );
                    if let Err(e) = fuse_front::abort_connection(c) {
                        eprintln!("xfsam-mount: cannot abort FUSE connection {c}: {e}");
                    }
                    wait_ended();
                }
            }
            break;
        }
        let now = text();
        if now != last {
            write_state(state, &now);
            last = now;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Replaces the state file at `state` with `text` (written beside it, then renamed, so a
/// reader never sees half of it).
fn write_state(state: &Path, text: &str) {
    let tmp = state.with_extension("mount.tmp");
    if std::fs::write(&tmp, text).is_ok() {
        let _ = std::fs::rename(&tmp, state);
    }
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xfsam-mount: {e}");
            ExitCode::FAILURE
        }
    }
}
