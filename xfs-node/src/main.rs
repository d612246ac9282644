//! `xfs-node`: run and use a serverless xFS-style cluster.

#![deny(unsafe_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use xfs_node::fs::layout::Kind;
use xfs_node::node::config::Config;
use xfs_node::node::config::TransportKind;
use xfs_node::node::control::{Control, NodeStatus, Request, Response};
use xfs_node::node::{MakeTransport, Node};

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
        /// Also mount the file system here through node 1 (runs `xfsam-mount`, found
        /// beside this executable).
        #[arg(long)]
        mount: Option<PathBuf>,
        /// With --mount: let every user use the mount (FUSE `allow_other`).
        #[arg(long)]
        allow_other: bool,
    },
    /// Mount the file system at DIR through a node (runs `xfsam-mount` in the background;
    /// unmount with `fusermount3 -u DIR`, or `xfs-node down` stops everything).
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

fn pid_alive(pid: i32) -> bool {
    let exists = xfs_node::os::process_exists(pid);
    // A killed node whose parent (`up`, gone) was not reaped yet is a zombie: dead.
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false);
    exists && !zombie
}

fn read_pid(data: &Path, id: u16) -> Option<i32> {
    std::fs::read_to_string(data.join(format!("node{id}.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn status_of(cfg: &Config, id: u16) -> Result<NodeStatus, String> {
    match control(cfg, id)?
        .call_ok(&Request::Status)
        .map_err(|e| e.to_string())?
    {
        Response::Status(s) => Ok(*s),
        other => Err(format!("unexpected answer {other:?}")),
    }
}

#[allow(clippy::too_many_arguments)]
fn up(
    nodes: usize,
    data: &Path,
    transport: TransportKind,
    port: u16,
    host: std::net::IpAddr,
    devices: &[PathBuf],
    storage_mb: u64,
    timeout: u64,
) -> Result<(), String> {
    if nodes == 0 || nodes > 64 {
        return Err(format!("--nodes {nodes}: use 1 to 64"));
    }
    std::fs::create_dir_all(data).map_err(|e| format!("cannot create {}: {e}", data.display()))?;
    let data = data
        .canonicalize()
        .map_err(|e| format!("{}: {e}", data.display()))?;
    let cfg_path = data.join("cluster.toml");
    let cfg = if cfg_path.exists() {
        let c = Config::load(&cfg_path).map_err(|e| e.to_string())?;
        if c.nodes.len() != nodes || c.cluster.transport != transport {
            return Err(format!(
                "{} holds a cluster of {} nodes over {}: restart it with --nodes {} --transport {}, \
                 or use another --data directory",
                data.display(),
                c.nodes.len(),
                c.cluster.transport,
                c.nodes.len(),
                c.cluster.transport
            ));
        }
        c
    } else {
        let mut c = Config::local(nodes, &data, transport, port, storage_mb << 20);
        if !devices.is_empty() && devices.len() != nodes {
            return Err(format!(
                "--devices names {} devices for {nodes} nodes: give one per node",
                devices.len()
            ));
        }
        for (i, n) in c.nodes.iter_mut().enumerate() {
            n.host = host;
            if let Some(d) = devices.get(i) {
                n.storage = Some(d.clone());
                n.storage_bytes = None;
            }
        }
        c.validate().map_err(|e| e.to_string())?;
        std::fs::write(&cfg_path, c.to_toml())
            .map_err(|e| format!("{}: {e}", cfg_path.display()))?;
        c
    };
    for n in &cfg.nodes {
        if let Some(pid) = read_pid(&data, n.id) {
            if pid_alive(pid) {
                return Err(format!(
                    "node {} is already running (pid {pid}): stop the cluster with `xfs-node down --data {}`",
                    n.id,
                    data.display()
                ));
            }
        }
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own executable: {e}"))?;
    for n in &cfg.nodes {
        let log = std::fs::File::create(data.join(format!("node{}.log", n.id)))
            .map_err(|e| format!("cannot create the node's log file: {e}"))?;
        let child = Command::new(&exe)
            .args(["serve", "--config"])
            .arg(&cfg_path)
            .args(["--node", &n.id.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start node {}: {e}", n.id))?;
        std::fs::write(
            data.join(format!("node{}.pid", n.id)),
            child.id().to_string(),
        )
        .map_err(|e| e.to_string())?;
    }
    eprint!("waiting for {} nodes", cfg.nodes.len());
    let deadline = Instant::now() + Duration::from_secs(timeout);
    for n in &cfg.nodes {
        loop {
            if let Ok(s) = status_of(&cfg, n.id) {
                if s.ready {
                    eprint!(".");
                    break;
                }
            }
            let alive = read_pid(&data, n.id).is_some_and(pid_alive);
            if !alive {
                let log = std::fs::read_to_string(data.join(format!("node{}.log", n.id)))
                    .unwrap_or_default();
                return Err(format!("node {} exited during start:\n{log}", n.id));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "node {} did not become healthy within {timeout} s (see {}/node{}.log)",
                    n.id,
                    data.display(),
                    n.id
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    eprintln!(" up");
    print_status(&cfg, false)?;
    println!(
        "\nUse it:   xfs-node put --data {d} LOCAL /PATH ; xfs-node get --data {d} --node 2 /PATH LOCAL\n\
         Stop it:  xfs-node down --data {d}",
        d = data.display()
    );
    Ok(())
}

/// The state a running mount of node `id` keeps beside its control socket:
/// (pid, mount point).
fn mount_state(cfg: &Config, id: u16) -> Option<(i32, PathBuf)> {
    let n = cfg.node(id)?;
    let mut p = n.control.as_os_str().to_owned();
    p.push(".mount");
    let s = std::fs::read_to_string(PathBuf::from(p)).ok()?;
    let mut pid = None;
    let mut dir = None;
    for l in s.lines() {
        if let Some(v) = l.strip_prefix("pid ") {
            pid = v.trim().parse().ok();
        } else if let Some(v) = l.strip_prefix("mountpoint ") {
            dir = Some(PathBuf::from(v));
        }
    }
    Some((pid?, dir?))
}

/// Run `xfsam-mount` (beside this executable) for node `id` at `dir` and wait until it
/// is mounted.
fn mount_node(
    cfg_path: &Path,
    cfg: &Config,
    id: u16,
    dir: &Path,
    allow_other: bool,
    ro: bool,
) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let node = cfg
        .node(id)
        .ok_or_else(|| format!("node {id} is not in the cluster"))?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own executable: {e}"))?;
    let helper = exe.with_file_name("xfsam-mount");
    if !helper.exists() {
        return Err(format!(
            "{} is missing: build the mount helper with `cargo build --release -p fuse-front` \
             (it must sit beside xfs-node)",
            helper.display()
        ));
    }
    if let Some((pid, d)) = mount_state(cfg, id) {
        if pid_alive(pid) {
            return Err(format!(
                "node {id} is mounted at {} already (pid {pid}); one mount per node",
                d.display()
            ));
        }
    }
    let mut logp = node.control.as_os_str().to_owned();
    logp.push(".mount.log");
    let logp = PathBuf::from(logp);
    let log = std::fs::File::create(&logp)
        .map_err(|e| format!("cannot create {}: {e}", logp.display()))?;
    let mut opts = Vec::new();
    if allow_other {
        opts.push("allow_other");
    }
    if ro {
        opts.push("ro");
    }
    let mut cmd = Command::new(&helper);
    cmd.arg("--config")
        .arg(cfg_path)
        .args(["--node", &id.to_string()]);
    if !opts.is_empty() {
        cmd.arg("-o").arg(opts.join(","));
    }
    let mut child = cmd
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        // Its own process group: a Ctrl-C meant for the shell does not unmount it.
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", helper.display()))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some((pid, _)) = mount_state(cfg, id) {
            if pid == child.id() as i32 {
                return Ok(());
            }
        }
        if let Ok(Some(st)) = child.try_wait() {
            let log = std::fs::read_to_string(&logp).unwrap_or_default();
            return Err(format!(
                "mounting node {id} at {} failed ({st}):\n{log}",
                dir.display()
            ));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "node {id}'s mount at {} did not come up within 20 s (see {})",
                dir.display(),
                logp.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Unmount every mount of the cluster's nodes and wait for their processes.
fn unmount_all(cfg: &Config, problems: &mut Vec<String>) {
    for n in &cfg.nodes {
        let Some((pid, dir)) = mount_state(cfg, n.id) else {
            continue;
        };
        if !pid_alive(pid) {
            continue;
        }
        // SIGTERM: the mount unmounts itself (detaching it if files are open).
        let _ = xfs_node::os::send_signal(pid, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while pid_alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if pid_alive(pid) {
            let _ = xfs_node::os::send_signal(pid, libc::SIGKILL);
            problems.push(format!(
                "the mount at {} did not exit; killed",
                dir.display()
            ));
        } else {
            println!("unmounted {}", dir.display());
        }
    }
}

fn down(data: &Path) -> Result<(), String> {
    let cfg = Where {
        data: Some(data.to_path_buf()),
        config: None,
    }
    .load()?;
    let mut problems = Vec::new();
    unmount_all(&cfg, &mut problems);
    // Every client writes back first, then every log is checkpointed.
    for n in &cfg.nodes {
        if let Err(e) = call(&cfg, n.id, &Request::Flush) {
            problems.push(format!("node {}: {e}", n.id));
        }
    }
    for n in &cfg.nodes {
        if let Err(e) = call(&cfg, n.id, &Request::Checkpoint) {
            problems.push(format!("node {}: {e}", n.id));
        }
    }
    for n in &cfg.nodes {
        if let Err(e) = call(&cfg, n.id, &Request::Shutdown) {
            problems.push(format!("node {}: {e}", n.id));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for n in &cfg.nodes {
        if let Some(pid) = read_pid(data, n.id) {
            while pid_alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if pid_alive(pid) {
                let _ = xfs_node::os::send_signal(pid, libc::SIGKILL);
                problems.push(format!("node {} did not exit; killed", n.id));
            }
            let _ = std::fs::remove_file(data.join(format!("node{}.pid", n.id)));
        }
    }
    if problems.is_empty() {
        println!(
            "stopped {} nodes (written back, checkpointed)",
            cfg.nodes.len()
        );
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

fn print_status(cfg: &Config, counters: bool) -> Result<(), String> {
    let map = cfg.manager_map();
    println!(
        "cluster {:?} (config version {}, transport {}, {} shards per node)",
        cfg.cluster.name, cfg.cluster.version, cfg.cluster.transport, cfg.cluster.shards
    );
    println!(
        "{:<5} {:<8} {:<22} {:<24} {:>9} {:>14}  state",
        "node", "pid", "address", "roles", "managers", "storage used"
    );
    let mut down_nodes = Vec::new();
    let mut statuses = Vec::new();
    for n in &cfg.nodes {
        let managed = map.entries.iter().filter(|e| **e == n.id).count();
        match status_of(cfg, n.id) {
            Ok(s) => {
                statuses.push(s.clone());
                println!(
                    "{:<5} {:<8} {:<22} {:<24} {:>9} {:>14}  {}{}",
                    n.id,
                    s.pid,
                    format!("{}:{}", n.host, n.port),
                    n.roles.join(","),
                    format!("{managed}/{}", map.entries.len()),
                    format!(
                        "{}/{} MiB",
                        s.storage_used_bytes >> 20,
                        s.storage_total_bytes >> 20
                    ),
                    if s.ready { "ready" } else { "starting" },
                    if s.counter("log_servers_down") > 0 {
                        ", log degraded (a storage server is down)"
                    } else {
                        ""
                    }
                );
                if counters {
                    for (k, v) in &s.counters {
                        println!("      {k} = {v}");
                    }
                }
            }
            Err(_) => {
                down_nodes.push(n.id);
                println!(
                    "{:<5} {:<8} {:<22} {:<24} {:>9} {:>14}  DOWN",
                    n.id,
                    "-",
                    format!("{}:{}", n.host, n.port),
                    n.roles.join(","),
                    format!("{managed}/{}", map.entries.len()),
                    "-"
                );
            }
        }
    }
    println!(
        "manager map v{}: {} entries",
        map.version,
        map.entries.len()
    );
    for g in &cfg.stripe_groups {
        let lost: Vec<_> = g
            .servers
            .iter()
            .filter(|s| down_nodes.contains(s))
            .collect();
        println!(
            "stripe group {}: servers {:?}, {} data + {} parity{}",
            g.id,
            g.servers,
            g.servers.len() - g.parity,
            g.parity,
            if lost.is_empty() {
                String::new()
            } else {
                format!(", DEGRADED (down: {lost:?})")
            }
        );
        let led = statuses.iter().find_map(|s| {
            s.cleaners
                .iter()
                .find(|(id, l, st)| *id == g.id && *l == Some(s.node) && st.is_some())
                .and_then(|(_, _, st)| st.clone().map(|st| (s.node, st)))
        });
        match led {
            Some((leader, s)) => {
                let mib = |b: u64| b as f64 / (1 << 20) as f64;
                // What new data may take: the least any of the group's nodes reports (its
                // statfs, which `df` on a mount through it shows): the free segments less
                // the checkpoints' and the cleaner's reserve.
                let fits = statuses
                    .iter()
                    .filter(|n| g.servers.contains(&n.node) && n.storage_total_bytes > 0)
                    .map(|n| n.storage_total_bytes.saturating_sub(n.storage_used_bytes))
                    .min();
                println!(
                    "  space: {:.1} MiB free of {:.1} MiB ({} of {} segments), {:.1} MiB live, {:.1} MiB cleanable{}",
                    mib(s.free_segments * s.segment_payload),
                    mib(s.total_segments * s.segment_payload),
                    s.free_segments,
                    s.total_segments,
                    mib(s.live_bytes),
                    mib(s.cleanable_bytes),
                    fits.map_or(String::new(), |f| format!(
                        "; {:.1} MiB fits new data (as df reports, the rest is reserve)",
                        mib(f)
                    ))
                );
                println!(
                    "  cleaner: led by node {leader}, {}{}; {} segments cleaned, {:.1} MiB moved, {} copies discarded (writer won), {} segments freed{}",
                    s.state,
                    if s.state.starts_with("cleaning") {
                        format!(" (round: {} of {} segments)", s.progress.0, s.progress.1)
                    } else {
                        String::new()
                    },
                    s.segments_cleaned,
                    mib(s.bytes_moved),
                    s.discarded,
                    s.freed,
                    if s.last_error.is_empty() {
                        String::new()
                    } else {
                        format!("; last error: {}", s.last_error)
                    }
                );
            }
            None => println!("  cleaner: no leader has reported yet"),
        }
    }
    Ok(())
}

fn serve(config: &Path, id: u16, wait: u64) -> Result<(), String> {
    let cfg = Config::load(config).map_err(|e| e.to_string())?;
    let node = match cfg.cluster.transport {
        TransportKind::Rdma => Node::start(cfg, id, Rdma),
        TransportKind::Udp => Node::start(cfg, id, Udp),
    }
    .map_err(|e| e.to_string())?;
    node.wait_ready(Duration::from_secs(wait))
        .map_err(|e| e.to_string())?;
    eprintln!("xfs-node {id}: ready");
    let stop = xfs_node::os::flag_on_signals(&[libc::SIGINT, libc::SIGTERM]);
    let node = Arc::new(node);
    let n2 = node.clone();
    let server = std::thread::spawn(move || n2.serve());
    while !server.is_finished() {
        if stop.load(Ordering::Relaxed) {
            eprintln!("xfs-node {id}: signal: writing back and checkpointing");
            let _ = node.client.sync_all();
            let _ = node.sync_log(true);
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
            up(
                nodes, &data, transport, port, host, &devices, storage_mb, timeout,
            )?;
            if let Some(dir) = mount {
                let cfg_path = data.join("cluster.toml");
                let cfg = Config::load(&cfg_path).map_err(|e| e.to_string())?;
                mount_node(&cfg_path, &cfg, 1, &dir, allow_other, false)?;
                println!(
                    "mounted at {} through node 1 (a second mount: xfs-node mount --data {} --node 2 DIR)",
                    dir.display(),
                    data.display()
                );
            }
            Ok(())
        }
        Cmd::Mount {
            at,
            node,
            allow_other,
            ro,
            dir,
        } => {
            let cfg_path = match (&at.data, &at.config) {
                (Some(d), _) => d.join("cluster.toml"),
                (None, Some(c)) => c.clone(),
                (None, None) => return Err("say which cluster: --data DIR or --config FILE".into()),
            };
            let cfg = at.load()?;
            mount_node(&cfg_path, &cfg, node, &dir, allow_other, ro)?;
            println!("mounted at {} through node {node}", dir.display());
            Ok(())
        }
        Cmd::Down { data } => down(&data),
        Cmd::Status { at, counters } => print_status(&at.load()?, counters),
        Cmd::Serve { config, node, wait } => serve(&config, node, wait),
        Cmd::Put {
            at,
            node,
            local,
            path,
        } => {
            let data = std::fs::read(&local)
                .map_err(|e| format!("cannot read {}: {e}", local.display()))?;
            control(&at.load()?, node)?
                .call_ok(&Request::Put { path, data })
                .map_err(|e| e.to_string())?;
            Ok(())
        }
        Cmd::Get {
            at,
            node,
            path,
            local,
        } => match control(&at.load()?, node)?
            .call_ok(&Request::Get { path })
            .map_err(|e| e.to_string())?
        {
            Response::Data(d) => {
                if local.as_os_str() == "-" {
                    std::io::stdout().write_all(&d).map_err(|e| e.to_string())
                } else {
                    std::fs::write(&local, d)
                        .map_err(|e| format!("cannot write {}: {e}", local.display()))
                }
            }
            other => Err(format!("unexpected answer {other:?}")),
        },
        Cmd::Ls { at, node, path } => {
            match control(&at.load()?, node)?
                .call_ok(&Request::Ls { path })
                .map_err(|e| e.to_string())?
            {
                Response::Entries(v) => {
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
                other => Err(format!("unexpected answer {other:?}")),
            }
        }
        Cmd::Rm { at, node, path } => control(&at.load()?, node)?
            .call_ok(&Request::Rm { path })
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Cmd::Mv { at, node, from, to } => control(&at.load()?, node)?
            .call_ok(&Request::Rename { from, to })
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Cmd::Fsck { at, node, repair } => fsck(&at.load()?, node, repair),
        Cmd::Mkdir { at, node, path } => control(&at.load()?, node)?
            .call_ok(&Request::Mkdir { path })
            .map(|_| ())
            .map_err(|e| e.to_string()),
    }
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

/// UDP over kernel sockets.
struct Udp;
impl MakeTransport for Udp {
    type T = am_udp::UdpTransport;
    type Error = am_udp::UdpError;
    fn bind(&self, addr: std::net::SocketAddr) -> Result<Self::T, Self::Error> {
        am_udp::UdpTransport::bind(addr, am_udp::UdpConfig::default())
    }
}

/// RDMA verbs (RoCE or InfiniBand).
struct Rdma;
impl MakeTransport for Rdma {
    type T = am_rdma::RdmaTransport;
    type Error = std::io::Error;
    fn bind(&self, addr: std::net::SocketAddr) -> Result<Self::T, Self::Error> {
        am_rdma::RdmaTransport::bind(addr, am_rdma::RdmaConfig::default())
    }
}
