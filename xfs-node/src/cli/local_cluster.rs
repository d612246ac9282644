//! A local cluster run by the CLI: `up` starts node processes on this machine (their
//! config, pid files and logs under the data directory), `mount` runs `xfsam-mount` for a
//! node, `down` unmounts everything and stops the nodes cleanly.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use xfs_node::node::config::{Config, TransportKind};
use xfs_node::node::control::{Control, Request};

use super::status::{print_status, status_of};
use crate::{call, Where};

/// Whether process `pid` runs (a zombie does not).
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

/// `up --mount`: node 1 runs as `xfsam-mount --serve`, its mount served in its process.
pub(crate) struct HostedMount {
    /// The mount point.
    pub(crate) dir: PathBuf,
    /// FUSE `allow_other`.
    pub(crate) allow_other: bool,
}

/// The node `up --mount` hosts in the mount's process.
const HOSTING_NODE: u16 = 1;

/// `xfs-node up`: start (or restart) the local cluster in `data` and wait until every
/// node is ready (and, with `mount`, node 1's mount is up).
#[allow(clippy::too_many_arguments)]
pub(crate) fn up(
    nodes: usize,
    data: &Path,
    transport: TransportKind,
    port: u16,
    host: std::net::IpAddr,
    devices: &[PathBuf],
    storage_mb: u64,
    timeout: u64,
    mount: Option<&HostedMount>,
) -> Result<(), String> {
    // Before anything starts: the mount's binary must be there for --mount; without it,
    // the nodes run as `xfs-node serve` (mounted over their sockets only).
    let helper = match mount {
        Some(_) => Some(mount_helper()?),
        None => mount_helper().ok(),
    };
    if nodes == 0 || nodes > 64 {
        return Err(format!("--nodes {nodes}: use 1 to 64"));
    }
    std::fs::create_dir_all(data).map_err(|e| format!("cannot create {}: {e}", data.display()))?;
    let data = data
        .canonicalize()
        .map_err(|e| format!("{}: {e}", data.display()))?;
    let cfg_path = data.join("cluster.toml");
    let cfg = if cfg_path.exists() {
        existing_config(&cfg_path, &data, nodes, transport)?
    } else {
        let mut c = Config::local(nodes, &data, transport, port, storage_mb << 20);
        place_nodes(&mut c, nodes, host, devices)?;
        c.validate().map_err(|e| e.to_string())?;
        std::fs::write(&cfg_path, c.to_toml())
            .map_err(|e| format!("{}: {e}", cfg_path.display()))?;
        c
    };
    check_not_running(&cfg, &data)?;
    start_nodes(&cfg, &cfg_path, &data, helper.as_deref(), mount)?;
    eprint!("waiting for {} nodes", cfg.nodes.len());
    let deadline = Instant::now() + Duration::from_secs(timeout);
    for n in &cfg.nodes {
        wait_ready(&cfg, &data, n.id, deadline, timeout)?;
    }
    if let Some(m) = mount {
        wait_hosted_mount(&cfg, &data, HOSTING_NODE, &m.dir)?;
    }
    eprintln!(" up");
    print_status(&cfg, false)?;
    if let Some(m) = mount {
        println!(
            "\nmounted at {} through node {HOSTING_NODE}, served in its process (a second \
             mount: xfs-node mount --data {} --node 2 DIR)",
            m.dir.display(),
            data.display()
        );
    }
    println!(
        "\nUse it:   xfs-node put --data {d} LOCAL /PATH ; xfs-node get --data {d} --node 2 /PATH LOCAL\n\
         Stop it:  xfs-node down --data {d}",
        d = data.display()
    );
    Ok(())
}

/// The config of the cluster `up` started in `data` before: it must have as many nodes
/// and the same transport.
fn existing_config(
    cfg_path: &Path,
    data: &Path,
    nodes: usize,
    transport: TransportKind,
) -> Result<Config, String> {
    let c = Config::load(cfg_path).map_err(|e| e.to_string())?;
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
    Ok(c)
}

/// A new cluster's nodes bind `host`; with `devices` (one per node of the `nodes`), node k
/// stores on the k-th device.
fn place_nodes(
    c: &mut Config,
    nodes: usize,
    host: std::net::IpAddr,
    devices: &[PathBuf],
) -> Result<(), String> {
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
    Ok(())
}

/// Refuse to start a cluster any of whose nodes runs (by its pid file).
fn check_not_running(cfg: &Config, data: &Path) -> Result<(), String> {
    for n in &cfg.nodes {
        if let Some(pid) = read_pid(data, n.id) {
            if pid_alive(pid) {
                return Err(format!(
                    "node {} is already running (pid {pid}): stop the cluster with `xfs-node down --data {}`",
                    n.id,
                    data.display()
                ));
            }
        }
    }
    Ok(())
}

/// Start every node, its output in `nodeK.log`, its pid in `nodeK.pid`: as
/// `xfsam-mount --serve` when the mount helper is there (`helper`: each node can then
/// serve a mount in its own process, `xfs-node mount`), else as `xfs-node serve`. With
/// `mount`, node 1 mounts itself there.
fn start_nodes(
    cfg: &Config,
    cfg_path: &Path,
    data: &Path,
    helper: Option<&Path>,
    mount: Option<&HostedMount>,
) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own executable: {e}"))?;
    for n in &cfg.nodes {
        let log = std::fs::File::create(data.join(format!("node{}.log", n.id)))
            .map_err(|e| format!("cannot create the node's log file: {e}"))?;
        let mount = mount.filter(|_| n.id == HOSTING_NODE);
        let mut cmd = match helper {
            Some(helper) => {
                let mut c = Command::new(helper);
                c.arg("--serve");
                if mount.is_some_and(|m| m.allow_other) {
                    c.args(["-o", "allow_other"]);
                }
                // Its own process group: a Ctrl-C meant for the shell does not unmount it.
                c.process_group(0);
                c
            }
            None => {
                let mut c = Command::new(&exe);
                c.arg("serve");
                c
            }
        };
        cmd.arg("--config")
            .arg(cfg_path)
            .args(["--node", &n.id.to_string()]);
        if let Some(m) = mount {
            cmd.arg(&m.dir);
        }
        let child = cmd
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
    Ok(())
}

/// Wait until node `id` says it is ready; an error if it exits first (with its log) or
/// `deadline` (`timeout` s after the start) passes.
fn wait_ready(
    cfg: &Config,
    data: &Path,
    id: u16,
    deadline: Instant,
    timeout: u64,
) -> Result<(), String> {
    loop {
        if let Ok(s) = status_of(cfg, id) {
            if s.ready {
                eprint!(".");
                return Ok(());
            }
        }
        let alive = read_pid(data, id).is_some_and(pid_alive);
        if !alive {
            let log =
                std::fs::read_to_string(data.join(format!("node{id}.log"))).unwrap_or_default();
            return Err(format!("node {id} exited during start:\n{log}"));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "node {id} did not become healthy within {timeout} s (see {}/node{id}.log)",
                data.display(),
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
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

/// Wait (up to 20 s) until node `id`, which hosts its mount, reports it mounted at `dir`.
fn wait_hosted_mount(cfg: &Config, data: &Path, id: u16, dir: &Path) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let log = || std::fs::read_to_string(data.join(format!("node{id}.log"))).unwrap_or_default();
    loop {
        let pid = read_pid(data, id);
        if mount_state(cfg, id).is_some_and(|(p, _)| Some(p) == pid) {
            return Ok(());
        }
        if !pid.is_some_and(pid_alive) {
            return Err(format!(
                "mounting node {id} at {} failed:\n{}",
                dir.display(),
                log()
            ));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "node {id}'s mount at {} did not come up within 20 s (see {}/node{id}.log)",
                dir.display(),
                data.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How `xfs-node mount` reaches the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MountVia {
    /// Served in the node's process when it can (started by `up` as `xfsam-mount
    /// --serve`), else over its control socket.
    Best,
    /// Over the node's control socket, by an `xfsam-mount` process of its own.
    Socket,
}

/// Mount the file system at `dir` through node `id` and wait until it is mounted: asked of
/// the node's own process (`Request::Mount`), or, when that process cannot host a mount
/// (`xfs-node serve`) or `via` says so, by `xfsam-mount` (beside this executable) over the
/// node's control socket.
pub(crate) fn mount_node(
    cfg_path: &Path,
    cfg: &Config,
    id: u16,
    dir: &Path,
    (allow_other, ro): (bool, bool),
    via: MountVia,
) -> Result<(), String> {
    let node = cfg
        .node(id)
        .ok_or_else(|| format!("node {id} is not in the cluster"))?;
    if let Some((pid, d)) = mount_state(cfg, id) {
        // Unmounted a moment ago: its server ends within a fraction of a second.
        let deadline = Instant::now() + Duration::from_secs(3);
        while !xfs_node::os::is_mount_point(&d)
            && mount_state(cfg, id).is_some_and(|(p, _)| p == pid)
            && pid_alive(pid)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        if mount_state(cfg, id).is_some_and(|(p, _)| p == pid) && pid_alive(pid) {
            return Err(format!(
                "node {id} is mounted at {} already (pid {pid}); one mount per node",
                d.display()
            ));
        }
    }
    if via == MountVia::Best {
        let abs = dir
            .canonicalize()
            .map_err(|e| format!("mount point {}: {e} (create it first)", dir.display()))?;
        let ask = Request::Mount {
            dir: abs,
            allow_other,
            read_only: ro,
        };
        match Control::connect(&node.control).and_then(|mut c| c.call_ok(&ask)) {
            Ok(_) => return Ok(()),
            // `xfs-node serve`: mounted over the socket below.
            Err(e) if e.errno() == Some(libc::ENOTSUP) => {}
            Err(e) => return Err(format!("node {id}: {e}")),
        }
    }
    let helper = mount_helper()?;
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
    let child = spawn_mount(cmd, dir, log, &helper)?;
    wait_mounted(cfg, id, dir, child, &logp)
}

/// `xfsam-mount`, which must sit beside this executable.
fn mount_helper() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own executable: {e}"))?;
    let helper = exe.with_file_name("xfsam-mount");
    if !helper.exists() {
        return Err(format!(
            "{} is missing: build the mount helper with `cargo build --release -p fuse-front` \
             (it must sit beside xfs-node)",
            helper.display()
        ));
    }
    Ok(helper)
}

/// Start the mount helper `cmd` on `dir`, its output in `log`, in its own process group.
fn spawn_mount(
    mut cmd: Command,
    dir: &Path,
    log: std::fs::File,
    helper: &Path,
) -> Result<Child, String> {
    use std::os::unix::process::CommandExt;
    cmd.arg(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        // Its own process group: a Ctrl-C meant for the shell does not unmount it.
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", helper.display()))
}

/// Wait (up to 20 s) until `child` reports node `id` mounted at `dir`; an error (with its
/// log at `logp`) if it exits first.
fn wait_mounted(
    cfg: &Config,
    id: u16,
    dir: &Path,
    mut child: Child,
    logp: &Path,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some((pid, _)) = mount_state(cfg, id) {
            if pid == child.id() as i32 {
                return Ok(());
            }
        }
        if let Ok(Some(st)) = child.try_wait() {
            let log = std::fs::read_to_string(logp).unwrap_or_default();
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

/// Unmount every mount of the cluster's nodes and wait for their processes (a mount
/// served in its node's process: until it is unmounted; the node stops with the others).
fn unmount_all(cfg: &Config, data: &Path, problems: &mut Vec<String>) {
    for n in &cfg.nodes {
        let Some((pid, dir)) = mount_state(cfg, n.id) else {
            continue;
        };
        if !pid_alive(pid) {
            continue;
        }
        if read_pid(data, n.id) == Some(pid) {
            unmount_hosted(cfg, n.id, pid, &dir, problems);
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

/// Ask node `id`'s process `pid` to unmount the mount at `dir` it serves, and wait until
/// it says so (it removes its mount state; the node itself goes on).
fn unmount_hosted(cfg: &Config, id: u16, pid: i32, dir: &Path, problems: &mut Vec<String>) {
    let _ = xfs_node::os::send_signal(pid, xfs_node::os::UNMOUNT_SIGNAL);
    let deadline = Instant::now() + Duration::from_secs(10);
    while mount_state(cfg, id).is_some_and(|(p, _)| p == pid)
        && pid_alive(pid)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    if mount_state(cfg, id).is_some_and(|(p, _)| p == pid) && pid_alive(pid) {
        problems.push(format!(
            "node {id} did not report its mount at {} gone",
            dir.display()
        ));
    } else {
        println!("unmounted {}", dir.display());
    }
}

/// `xfs-node down`: unmount, write back, checkpoint, stop every node (killing what does
/// not exit within 20 s).
pub(crate) fn down(data: &Path) -> Result<(), String> {
    let cfg = Where {
        data: Some(data.to_path_buf()),
        config: None,
    }
    .load()?;
    let mut problems = Vec::new();
    unmount_all(&cfg, data, &mut problems);
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
