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
use fuse_front::{Front, Options};
use fuser::{Config as FuseConfig, Session, SessionACL};
use xfs_node::node::config::Config;

#[derive(Parser)]
#[command(
    name = "xfsam-mount",
    version,
    about = "Mount an xfs-node cluster's file system (FUSE) through one of its nodes",
    long_about = "Mount the file system of a running xfs-node cluster at MOUNTPOINT through \
                  node K's client. Runs in the foreground until unmounted (`fusermount3 -u \
                  MOUNTPOINT`, `umount`, `xfs-node down`) or sent SIGINT/SIGTERM, which \
                  unmount it.\n\n\
                  Example:  xfsam-mount --data /var/tmp/xfs --node 2 /mnt/xfs2 &\n\
                  `xfs-node up --mount DIR` and `xfs-node mount` run it for you."
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

fn run(a: Args) -> Result<(), String> {
    let cfg = Config::locate(a.data.as_deref(), a.config.as_deref()).map_err(|e| e.to_string())?;
    let node = cfg.node(a.node).ok_or_else(|| {
        format!(
            "node {} is not in the cluster (nodes: {:?})",
            a.node,
            cfg.nodes.iter().map(|n| n.id).collect::<Vec<_>>()
        )
    })?;
    let mp = mount_point(&a.mountpoint)?;
    let fsname = format!("xfsam:{}/node{}", cfg.cluster.name, a.node);
    let opts = MountOptions::parse(&a.options, fsname)?;
    // One mount per node: subscribe first (a mount without invalidations would not be
    // coherent), then mount.
    let stream =
        fuse_front::subscribe(&node.control).map_err(|e| format!("node {}: {e}", a.node))?;
    let front = Front::new(Options {
        control: node.control.clone(),
        ttl: Duration::from_secs(a.ttl),
        inval_wait: Duration::from_millis(20),
        read_only: opts.read_only,
    })
    .map_err(|e| e.to_string())?;
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
    {
        let (ctl, sh, st) = (node.control.clone(), shared.clone(), stop.clone());
        std::thread::spawn(move || {
            fuse_front::invalidations(&ctl, stream, notifier, sh, Duration::from_millis(20), st)
        });
    }
    let ended = spawn_session(session)?;
    let signalled = xfs_node::os::flag_on_signals(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP]);
    let state = fuse_front::state_path(&node.control);
    eprintln!(
        "xfsam-mount: node {} mounted at {} (pid {})",
        a.node,
        mp.display(),
        std::process::id()
    );
    serve_until_unmounted(&mp, &ended, signalled, &shared.stats, &state);
    stop.store(true, Ordering::Relaxed);
    let _ = std::fs::remove_file(&state);
    eprintln!("xfsam-mount: {} unmounted", mp.display());
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
/// point, counters) up to date. When `signalled`, unmounts `mp` and waits up to 2 s more.
fn serve_until_unmounted(
    mp: &Path,
    ended: &AtomicBool,
    signalled: &AtomicBool,
    stats: &fuse_front::Stats,
    state: &Path,
) {
    let mut last = String::new();
    while !ended.load(Ordering::Relaxed) {
        if signalled.load(Ordering::Relaxed) {
            unmount(mp);
            for _ in 0..40 {
                if ended.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            break;
        }
        let now = format!(
            "pid {}\nmountpoint {}\n{}",
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
