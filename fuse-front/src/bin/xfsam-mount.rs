//! `xfsam-mount`: mount the file system of an `xfs-node` cluster through one of its nodes.
//! (Named so as not to be taken for Linux's local XFS; the mount shows as `fuse.xfsam`.)

#![deny(unsafe_code)]

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use fuse_front::{Front, NodeLink, Options};
use fuser::{Config as FuseConfig, Session, SessionACL};
use xfs_node::node::config::Config;
use xfs_node::node::{MountAttachment, Node};

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
    /// Where to mount (an existing directory).
    mountpoint: PathBuf,
}

/// Whether `dir` is a mount point now.
fn is_mounted(dir: &Path) -> bool {
    let Ok(m) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = dir.to_string_lossy().replace(' ', "\\040");
    m.lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|p| p == want))
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

/// The node this mount reaches: hosted in this process (with its control-socket server),
/// or another process's.
enum Reached {
    Hosted {
        node: Arc<Node>,
        attached: MountAttachment,
        server: std::thread::JoinHandle<Result<(), xfs_node::node::ServeError>>,
    },
    Socket {
        control: PathBuf,
        stream: xfs_node::node::control::Control,
    },
}

/// Start node `id` of `cfg` here, wait until it is ready, serve its control socket and
/// attach this mount to it.
fn host_node(cfg: Config, id: u16, wait: u64) -> Result<Reached, String> {
    let node = Node::start_configured(cfg, id).map_err(|e| e.to_string())?;
    node.wait_ready(Duration::from_secs(wait))
        .map_err(|e| e.to_string())?;
    eprintln!("xfs-node {id}: ready (served in-process by xfsam-mount)");
    let node = Arc::new(node);
    let attached = node.attach_mount().map_err(|e| e.to_string())?;
    let server = std::thread::spawn({
        let node = node.clone();
        move || node.serve()
    });
    Ok(Reached::Hosted {
        node,
        attached,
        server,
    })
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
    let mp = mount_point(&a.mountpoint)?;
    let fsname = format!("xfsam:{}/node{}", cfg.cluster.name, a.node);
    let opts = MountOptions::parse(&a.options, fsname)?;
    // One mount per node: attach first (a mount without invalidations would not be
    // coherent), then mount.
    let reached = if a.serve {
        host_node(cfg, a.node, a.wait)?
    } else {
        let stream = fuse_front::subscribe(&node_cfg.control)
            .map_err(|e| format!("node {}: {e}", a.node))?;
        Reached::Socket {
            control: node_cfg.control.clone(),
            stream,
        }
    };
    let link = match &reached {
        Reached::Hosted { node, .. } => NodeLink::Hosted(node.clone()),
        Reached::Socket { control, .. } => NodeLink::socket(control.clone()),
    };
    let front = Front::new(
        Options {
            ttl: Duration::from_secs(a.ttl),
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
    let notifier = fd
        .try_clone()
        .map(fuse_front::KernelChannel::new)
        .map_err(|e| format!("cannot duplicate the FUSE descriptor: {e}"))?;
    shared.set_kernel(notifier.clone());
    let session = new_session(front, fd, &mp, opts.allow_other, a.threads)?;
    let stop = Arc::new(AtomicBool::new(false));
    let (sh, st) = (shared.clone(), stop.clone());
    let wait = Duration::from_millis(20);
    let (hosted, server) = match reached {
        Reached::Hosted {
            node,
            attached,
            server,
        } => {
            std::thread::spawn(move || {
                fuse_front::invalidations_hosted(attached, notifier, sh, wait, st)
            });
            (Some(node), Some(server))
        }
        Reached::Socket { control, stream } => {
            std::thread::spawn(move || {
                fuse_front::invalidations(&control, stream, notifier, sh, wait, st)
            });
            (None, None)
        }
    };
    let ended = spawn_session(session)?;
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
    let state = fuse_front::state_path(&node_cfg.control);
    eprintln!(
        "xfsam-mount: node {} mounted at {} (pid {}, {link})",
        a.node,
        mp.display(),
        std::process::id()
    );
    let node_stopped = || server.as_ref().is_some_and(|s| s.is_finished());
    serve_until_unmounted(
        &mp,
        &ended,
        &|| {
            signalled.load(Ordering::Relaxed)
                || unmount_asked.load(Ordering::Relaxed)
                || node_stopped()
        },
        &shared.stats,
        &state,
        link,
        conn,
    );
    if let (Some(node), false) = (&hosted, ended.load(Ordering::Relaxed)) {
        // The kernel still serves files through this mount (the abort failed): a node
        // that went on without the mount's invalidations would leave them incoherent.
        // Stop the node with the mount.
        eprintln!(
            "xfsam-mount: {} could not be unmounted nor aborted: stopping node {} with it",
            mp.display(),
            a.node
        );
        node.write_back_and_checkpoint();
        std::process::exit(1);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = std::fs::remove_file(&state);
    eprintln!("xfsam-mount: {} unmounted", mp.display());
    if let Some(node) = hosted {
        // The node goes on serving its peers and its control socket until a signal or a
        // `Shutdown` request.
        while !signalled.load(Ordering::Relaxed) && !node_stopped() {
            std::thread::sleep(Duration::from_millis(50));
        }
        if signalled.load(Ordering::Relaxed) {
            eprintln!(
                "xfs-node {}: signal: writing back and checkpointing",
                a.node
            );
            node.write_back_and_checkpoint();
        }
        eprintln!("xfs-node {}: stopped", a.node);
        // The node's threads do not end by themselves.
        std::process::exit(0);
    }
    Ok(())
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
    if is_mounted(&mp) {
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

/// Waits until the session has `ended`, keeping the state file at `state` (pid, mount
/// point, link, counters) up to date. Once `unmount_now()`, unmounts `mp` and waits up to
/// 2 s for the session to end; a detached mount (files still open) is then aborted
/// (FUSE connection `conn`): its open files fail from then on.
fn serve_until_unmounted(
    mp: &Path,
    ended: &AtomicBool,
    unmount_now: &dyn Fn() -> bool,
    stats: &fuse_front::Stats,
    state: &Path,
    link: &str,
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
        let now = format!(
            "pid {}\nmountpoint {}\nlink {link}\n{}",
            std::process::id(),
            mp.display(),
            stats.render()
        );
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
