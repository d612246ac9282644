//! `xfs-node`: run and use a serverless xFS-style cluster. The commands are defined here
//! ([`Cmd`]); the local cluster's (`up`, `mount`, `down`) and the `status` report are in
//! [`cli`].

#![deny(unsafe_code)]

mod cli;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use xfs_node::fs::layout::Kind;
use xfs_node::node::config::Config;
use xfs_node::node::config::TransportKind;
use xfs_node::node::control::{Control, Request, Response};
use xfs_node::node::Node;

use cli::local_cluster::{down, mount_node, up, HostedMount, MountVia};
use cli::status::{print_members, print_status};

#[derive(Parser)]
#[command(
    name = "xfs-node",
    version,
    about = "A serverless distributed file system node (xFS over Active Messages)",
    long_about = "Run a cluster of xfs-node processes (client, manager and storage roles over \
                  Active Messages on UDP or RDMA verbs) and use it without a mount.\n\n\
                  Start a local 3-node cluster:  xfs-node up --data /var/tmp/xfs\n\
                  Store and fetch a file:        xfs-node put --data /var/tmp/xfs ./a.txt /a.txt\n\
                  \x20                              xfs-node get --data /var/tmp/xfs --node 2 /a.txt ./b.txt\n\
                  Stop it:                       xfs-node down --data /var/tmp/xfs"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct Where {
    /// The local cluster's data directory (as given to `up`; holds cluster.toml).
    #[arg(long, conflicts_with = "config")]
    data: Option<PathBuf>,
    /// A cluster config file (real clusters).
    #[arg(long)]
    config: Option<PathBuf>,
}

impl Where {
    fn load(&self) -> Result<Config, String> {
        Config::locate(self.data.as_deref(), self.config.as_deref()).map_err(|e| e.to_string())
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a local cluster of N node processes on loopback and wait until it is healthy.
    Up {
        /// Number of nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Data directory (config, storage files, sockets, logs).
        #[arg(long)]
        data: PathBuf,
        /// The network the nodes talk over.
        #[arg(long, value_enum, default_value_t = TransportKind::Udp)]
        transport: TransportKind,
        /// First UDP port (node k uses port + 10 (k - 1) and up).
        #[arg(long, default_value_t = 7100)]
        port: u16,
        /// The address every node binds (over rdma: the RoCE device's address).
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        /// Block devices for the nodes' storage, comma-separated, one per node (instead of
        /// files under DIR).
        #[arg(long, value_delimiter = ',')]
        devices: Vec<PathBuf>,
        /// Size of each node's storage file, MiB.
        #[arg(long, default_value_t = 256)]
        storage_mb: u64,
        /// Seconds to wait for the cluster to become healthy.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Also mount the file system here through node 1, served in node 1's own process
        /// (node 1 runs as `xfsam-mount --serve`, found beside this executable).
        #[arg(long)]
        mount: Option<PathBuf>,
        /// With --mount: let every user use the mount (FUSE `allow_other`).
        #[arg(long)]
        allow_other: bool,
    },
    /// Mount the file system at DIR through a node: served in the node's own process when
    /// `up` started it (as `xfsam-mount --serve`), else by an `xfsam-mount` of its own over
    /// the node's control socket; unmount with `fusermount3 -u DIR`, or `xfs-node down`
    /// stops everything.
    Mount {
        #[command(flatten)]
        at: Where,
        /// The node whose client serves the mount.
        #[arg(long, default_value_t = 1)]
        node: u16,
        /// Let every user use the mount (FUSE `allow_other`).
        #[arg(long)]
        allow_other: bool,
        /// Mount read-only.
        #[arg(long)]
        ro: bool,
        /// Mount over the node's control socket even if its process could serve the mount
        /// itself (one more hop per request; for comparison).
        #[arg(long)]
        socket: bool,
        /// Where to mount (an existing directory).
        dir: PathBuf,
    },
    /// Unmount the cluster's mounts, then stop a local cluster cleanly (write back, fsync,
    /// checkpoint).
    Down {
        /// The data directory given to `up`.
        #[arg(long)]
        data: PathBuf,
    },
    /// Show nodes, roles, manager map, stripe groups, space and degraded groups.
    Status {
        #[command(flatten)]
        at: Where,
        /// Also print every node's counters.
        #[arg(long)]
        counters: bool,
    },
    /// Run one node in the foreground (real clusters; `up` runs these for you).
    Serve {
        /// The cluster config file.
        #[arg(long)]
        config: PathBuf,
        /// This node's id in the config.
        #[arg(long)]
        node: u16,
        /// Seconds to wait for the stripe group's storage servers before giving up.
        #[arg(long, default_value_t = 60)]
        wait: u64,
    },
    /// Copy a local file into the cluster (fsynced before it returns).
    Put {
        #[command(flatten)]
        at: Where,
        /// The node whose client to use.
        #[arg(long, default_value_t = 1)]
        node: u16,
        /// Local file.
        local: PathBuf,
        /// Path in the cluster (absolute).
        path: String,
    },
    /// Copy a file out of the cluster (LOCAL `-` writes to stdout).
    Get {
        #[command(flatten)]
        at: Where,
        /// The node whose client to use.
        #[arg(long, default_value_t = 1)]
        node: u16,
        /// Path in the cluster.
        path: String,
        /// Local file.
        local: PathBuf,
    },
    /// List a directory in the cluster.
    Ls {
        #[command(flatten)]
        at: Where,
        /// The node whose client to use.
        #[arg(long, default_value_t = 1)]
        node: u16,
        /// Path in the cluster.
        #[arg(default_value = "/")]
        path: String,
    },
    /// Remove a file or an empty directory in the cluster.
    Rm {
        #[command(flatten)]
        at: Where,
        /// The node whose client to use.
        #[arg(long, default_value_t = 1)]
        node: u16,
        /// Path in the cluster.
        path: String,
    },
    /// Rename a file or directory in the cluster (replacing a file at TO), durably.
    Mv {
        #[command(flatten)]
        at: Where,
        /// The node whose client to use.
        #[arg(long, default_value_t = 1)]
        node: u16,
        /// Path in the cluster.
        from: String,
        /// New path.
        to: String,
    },
    /// Check the cluster: the name space (names pointing at free inodes, link counts,
    /// directories with two names, renames a crash interrupted, orphaned inodes) through
    /// one node, and every node's log (imap entries outside its segments, unreadable
    /// fragments, wrong parity). Exit status: 0 clean, 1 problems found and all repaired,
    /// 4 problems left (without --repair, or that the repair could not fix).
    Fsck {
        #[command(flatten)]
        at: Where,
        /// The node whose client checks the name space.
        #[arg(long, default_value_t = 1)]
        node: u16,
        /// Fix what is found (run it on a quiet cluster: a file being created at the same
        /// moment looks like an orphan).
        #[arg(long)]
        repair: bool,
    },
    /// Show the membership: epoch, leader, voters, every member with its incarnation and
    /// state, the map versions (as node NODE applied them).
    Members {
        #[command(flatten)]
        at: Where,
        /// The node to ask.
        #[arg(long, default_value_t = 1)]
        node: u16,
    },
    /// Take node NODE out of the cluster through the membership log: it is fenced (its
    /// un-fsynced writes are lost, as a crashed node's) and stays out until `join`.
    Leave {
        #[command(flatten)]
        at: Where,
        /// The node that leaves.
        node: u16,
        /// The node to propose it through (any member).
        #[arg(long, default_value_t = 1)]
        via: u16,
    },
    /// Bring node NODE (running, after `leave`) back into the cluster as a new incarnation.
    Join {
        #[command(flatten)]
        at: Where,
        /// The node that joins.
        node: u16,
    },
    /// Create a directory in the cluster.
    Mkdir {
        #[command(flatten)]
        at: Where,
        /// The node whose client to use.
        #[arg(long, default_value_t = 1)]
        node: u16,
        /// Path in the cluster.
        path: String,
    },
}

/// A connection to node `node`'s control socket.
fn control(cfg: &Config, node: u16) -> Result<Control, String> {
    let n = cfg.node(node).ok_or_else(|| {
        format!(
            "node {node} is not in the cluster (nodes: {:?})",
            cfg.nodes.iter().map(|n| n.id).collect::<Vec<_>>()
        )
    })?;
    Control::connect(&n.control).map_err(|e| e.to_string())
}

/// Send `req` to node `node` and wait for its answer (an error answer is an `Err`).
fn call(cfg: &Config, node: u16, req: &Request) -> Result<Response, String> {
    control(cfg, node)?.call_ok(req).map_err(|e| e.to_string())
}

/// `xfs-node serve`: run node `id` until a signal (then write back and checkpoint) or a
/// `Shutdown` request.
fn serve(config: &Path, id: u16, wait: u64) -> Result<(), String> {
    let cfg = Config::load(config).map_err(|e| e.to_string())?;
    let node = Node::start_configured(cfg, id).map_err(|e| e.to_string())?;
    node.wait_ready(Duration::from_secs(wait))
        .map_err(|e| e.to_string())?;
    if node.is_ready() {
        eprintln!("xfs-node {id}: ready");
    } else {
        eprintln!("xfs-node {id}: out of the cluster (it left): waiting for `xfs-node join {id}`");
    }
    let stop = xfs_node::os::flag_on_signals(&[libc::SIGINT, libc::SIGTERM]);
    let node = Arc::new(node);
    let server = std::thread::spawn({
        let node = node.clone();
        move || node.serve()
    });
    while !server.is_finished() {
        if stop.load(Ordering::Relaxed) {
            eprintln!("xfs-node {id}: signal: writing back and checkpointing");
            node.write_back_and_checkpoint();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if server.is_finished() {
        server
            .join()
            .map_err(|_| "control thread panicked")?
            .map_err(|e| e.to_string())?;
    }
    eprintln!("xfs-node {id}: stopped");
    std::process::exit(0);
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.cmd {
        Cmd::Up {
            nodes,
            data,
            transport,
            port,
            host,
            devices,
            storage_mb,
            timeout,
            mount,
            allow_other,
        } => {
            let mount = mount.map(|dir| HostedMount { dir, allow_other });
            up(
                nodes,
                &data,
                transport,
                port,
                host,
                &devices,
                storage_mb,
                timeout,
                mount.as_ref(),
            )
        }
        Cmd::Mount {
            at,
            node,
            allow_other,
            ro,
            socket,
            dir,
        } => {
            let via = if socket {
                MountVia::Socket
            } else {
                MountVia::Best
            };
            mount(&at, node, &dir, (allow_other, ro), via)
        }
        Cmd::Down { data } => down(&data),
        Cmd::Status { at, counters } => print_status(&at.load()?, counters),
        Cmd::Serve { config, node, wait } => serve(&config, node, wait),
        Cmd::Put {
            at,
            node,
            local,
            path,
        } => put(&at, node, &local, path),
        Cmd::Get {
            at,
            node,
            path,
            local,
        } => get(&at, node, path, &local),
        Cmd::Ls { at, node, path } => ls(&at, node, path),
        Cmd::Rm { at, node, path } => call(&at.load()?, node, &Request::Rm { path }).map(drop),
        Cmd::Mv { at, node, from, to } => {
            call(&at.load()?, node, &Request::Rename { from, to }).map(drop)
        }
        Cmd::Fsck { at, node, repair } => fsck(&at.load()?, node, repair),
        Cmd::Mkdir { at, node, path } => {
            call(&at.load()?, node, &Request::Mkdir { path }).map(drop)
        }
        Cmd::Members { at, node } => print_members(&at.load()?, node),
        Cmd::Leave { at, node, via } => {
            let change = xfs_node::membership::Change::Leave { node };
            call(&at.load()?, via, &Request::Propose(change)).map(drop)?;
            println!("proposed: node {node} leaves (see `xfs-node members`)");
            Ok(())
        }
        Cmd::Join { at, node } => {
            // The node proposes its own join, as a new incarnation.
            let change = xfs_node::membership::Change::Join {
                node,
                incarnation: 0,
            };
            call(&at.load()?, node, &Request::Propose(change)).map(drop)?;
            println!("node {node} asks to join (see `xfs-node members`)");
            Ok(())
        }
    }
}

/// `xfs-node mount`: mount the cluster `at` at `dir` through `node`.
fn mount(
    at: &Where,
    node: u16,
    dir: &Path,
    flags: (bool, bool),
    via: MountVia,
) -> Result<(), String> {
    let cfg_path = match (&at.data, &at.config) {
        (Some(d), _) => d.join("cluster.toml"),
        (None, Some(c)) => c.clone(),
        (None, None) => return Err("say which cluster: --data DIR or --config FILE".into()),
    };
    let cfg = at.load()?;
    mount_node(&cfg_path, &cfg, node, dir, flags, via)?;
    println!("mounted at {} through node {node}", dir.display());
    Ok(())
}

/// `xfs-node put`: copy the local file `local` to `path`.
fn put(at: &Where, node: u16, local: &Path, path: String) -> Result<(), String> {
    let data = std::fs::read(local).map_err(|e| format!("cannot read {}: {e}", local.display()))?;
    call(&at.load()?, node, &Request::Put { path, data }).map(drop)
}

/// `xfs-node get`: copy `path` to the local file `local` (`-`: stdout).
fn get(at: &Where, node: u16, path: String, local: &Path) -> Result<(), String> {
    match call(&at.load()?, node, &Request::Get { path })? {
        Response::Data(d) => {
            if local.as_os_str() == "-" {
                std::io::stdout().write_all(&d).map_err(|e| e.to_string())
            } else {
                std::fs::write(local, d)
                    .map_err(|e| format!("cannot write {}: {e}", local.display()))
            }
        }
        other => Err(format!("unexpected answer {other:?}")),
    }
}

/// `xfs-node ls`: one line per entry: type and mode, link count, size, name.
fn ls(at: &Where, node: u16, path: String) -> Result<(), String> {
    let v = match call(&at.load()?, node, &Request::Ls { path })? {
        Response::Entries(v) => v,
        other => return Err(format!("unexpected answer {other:?}")),
    };
    for (e, a) in v {
        let t = match e.kind {
            Kind::Dir => 'd',
            Kind::Symlink => 'l',
            Kind::File => '-',
            Kind::Special => 's',
        };
        println!(
            "{t}{:o} {:>3} {:>12} {}",
            a.mode & 0o7777,
            a.nlink,
            a.size,
            String::from_utf8_lossy(&e.name)
        );
    }
    Ok(())
}

/// `xfs-node fsck`: the name space through `node`, every node's log; exits 0, 1 or 4.
fn fsck(cfg: &Config, node: u16, repair: bool) -> Result<(), String> {
    if cfg.node(node).is_none() {
        return Err(format!("node {node} is not in the cluster"));
    }
    let (mut found, mut left) = (0usize, 0usize);
    let mut ids: Vec<u16> = cfg.nodes.iter().map(|n| n.id).collect();
    // The name space first (its repairs write to the logs the log checks then read).
    ids.sort_by_key(|i| *i != node);
    for id in ids {
        let req = Request::Fsck {
            repair,
            namespace: id == node,
        };
        let r = match call(cfg, id, &req) {
            Ok(Response::Fsck(r)) => r,
            Ok(other) => return Err(format!("node {id}: unexpected answer {other:?}")),
            Err(e) => {
                println!("node {id}: not checked: {e}");
                left += 1;
                continue;
            }
        };
        if let Some(ns) = &r.namespace {
            println!(
                "name space (through node {id}): {} directories, {} names, {} inodes in use: {} problem(s)",
                ns.directories,
                ns.names,
                ns.inodes,
                ns.problems.len()
            );
            for p in &ns.problems {
                println!("  {p}");
            }
            found += ns.problems.len();
            if repair {
                for p in &ns.remaining {
                    println!("  still wrong after the repair: {p}");
                }
                left += ns.remaining.len();
            } else {
                left += ns.problems.len();
            }
        }
        match &r.log {
            Some(k) => {
                println!(
                    "log of node {id}: {} imap entries, {} segments checked: {} problem(s)",
                    k.imap_entries,
                    k.segments,
                    r.log_problems.len()
                );
                for p in &r.log_problems {
                    println!("  {p}");
                }
                found += r.log_problems.len();
                left += r
                    .log_problems
                    .iter()
                    .filter(|p| !p.ends_with("(repaired: rewritten from the others)"))
                    .count();
            }
            None => println!("node {id}: keeps no log"),
        }
    }
    let verdict = match (found, left) {
        (0, 0) => "clean",
        (_, 0) => "every problem repaired",
        _ if repair => "problems remain",
        _ => "problems found (run with --repair to fix them)",
    };
    println!("fsck: {found} problem(s) found, {left} left: {verdict}");
    std::process::exit(match (found, left) {
        (0, 0) => 0,
        (_, 0) => 1,
        _ => 4,
    })
}

fn main() -> ExitCode {
    // Output into a closed pipe (`xfs-node status | head`) ends the program quietly, as
    // for other Unix tools, rather than a panic in println!.
    xfs_node::os::default_sigpipe();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xfs-node: {e}");
            ExitCode::FAILURE
        }
    }
}
