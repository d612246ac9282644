//! `xfsam-mount`: mount the file system of an `xfs-node` cluster through one of its nodes.
//! (Named so as not to be taken for Linux's local XFS; the mount shows as `fuse.xfsam`.)

#![deny(unsafe_code)]

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
    let cfg = Config::locate(a.data.as_deref(), a.config.as_deref())?;
    let node = cfg.node(a.node).ok_or_else(|| {
        format!(
            "node {} is not in the cluster (nodes: {:?})",
            a.node,
            cfg.nodes.iter().map(|n| n.id).collect::<Vec<_>>()
        )
    })?;
    let md = std::fs::metadata(&a.mountpoint).map_err(|e| {
        format!(
            "mount point {}: {e} (create it first: mkdir -p {})",
            a.mountpoint.display(),
            a.mountpoint.display()
        )
    })?;
    if !md.is_dir() {
        return Err(format!(
            "mount point {} is not a directory",
            a.mountpoint.display()
        ));
    }
    let mp = a
        .mountpoint
        .canonicalize()
        .map_err(|e| format!("{}: {e}", a.mountpoint.display()))?;
    if is_mounted(&mp) {
        return Err(format!(
            "{} is busy: something is mounted there already (unmount it: fusermount3 -u {})",
            mp.display(),
            mp.display()
        ));
    }
    let (mut allow_other, mut ro) = (false, false);
    let mut fsname = format!("xfsam:{}/node{}", cfg.cluster.name, a.node);
    for o in &a.options {
        match o.as_str() {
            "" => {}
            "allow_other" => allow_other = true,
            "ro" => ro = true,
            "rw" => ro = false,
            o if o.starts_with("fsname=") => fsname = o["fsname=".len()..].to_string(),
            o => {
                return Err(format!(
                    "unknown mount option {o:?} (known: allow_other, ro, rw, fsname=NAME)"
                ))
            }
        }
    }
    // One mount per node: subscribe first (a mount without invalidations would not be
    // coherent), then mount.
    let stream =
        fuse_front::subscribe(&node.control).map_err(|e| format!("node {}: {e}", a.node))?;
    let front = Front::new(Options {
        control: node.control.clone(),
        ttl: Duration::from_secs(a.ttl),
        inval_wait: Duration::from_millis(20),
        read_only: ro,
    })?;
    let shared = front.shared();
    let fd = fuse_front::mount_fuse(&mp, &fsname, allow_other, ro)?;
    let notifier = fd
        .try_clone()
        .map(fuse_front::KernelChannel::new)
        .map_err(|e| format!("cannot duplicate the FUSE descriptor: {e}"))?;
    let acl = if allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    let mut fc = FuseConfig::default();
    fc.acl = acl;
    fc.n_threads = Some(a.threads.max(1));
    fc.clone_fd = true;
    let session = match Session::from_fd(front, fd, acl, fc) {
        Ok(s) => s,
        Err(e) => {
            unmount(&mp);
            return Err(format!(
                "the FUSE session at {} did not start: {e}",
                mp.display()
            ));
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    {
        let (ctl, sh, st) = (node.control.clone(), shared.clone(), stop.clone());
        std::thread::spawn(move || {
            fuse_front::invalidations(&ctl, stream, notifier, sh, Duration::from_millis(20), st)
        });
    }
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
    let signalled = xfs_node::os::flag_on_signals(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP]);
    let state = fuse_front::state_path(&node.control);
    eprintln!(
        "xfsam-mount: node {} mounted at {} (pid {})",
        a.node,
        mp.display(),
        std::process::id()
    );
    let mut last = String::new();
    while !ended.load(Ordering::Relaxed) {
        if signalled.load(Ordering::Relaxed) {
            unmount(&mp);
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
            shared.stats.render()
        );
        if now != last {
            let tmp = state.with_extension("mount.tmp");
            if std::fs::write(&tmp, &now).is_ok() {
                let _ = std::fs::rename(&tmp, &state);
            }
            last = now;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = std::fs::remove_file(&state);
    eprintln!("xfsam-mount: {} unmounted", mp.display());
    Ok(())
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
