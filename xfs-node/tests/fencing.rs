//! Membership and fencing with real node processes over UDP on loopback, driven as a user
//! drives them (`xfs-node up`, `members`, `leave`, `join`, SIGSTOP/SIGCONT): a node that
//! stalls longer than the failure timeout is removed by the cluster (a committed change,
//! not one peer's guess), its stale dirty copy never overwrites what the others fsynced
//! meanwhile, and it comes back as a new incarnation that reads the new content.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use xfs_node::membership::MembershipStatus;
use xfs_node::node::config::Config;
use xfs_node::node::control::{Control, FsOp, NodeStatus, Request, Response};

const BIN: &str = env!("CARGO_BIN_EXE_xfs-node");

fn xfs(args: &[&str]) -> Output {
    am_testkit::cluster::run(Path::new(BIN), args)
}

fn ok(args: &[&str]) -> String {
    am_testkit::cluster::run_ok(Path::new(BIN), args)
}

fn data_dir(name: &str) -> PathBuf {
    let base = std::env::var("XFS_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let d = PathBuf::from(format!("{base}/xfs-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Kills the cluster's processes (SIGCONT first: a stopped process ignores nothing but
/// SIGKILL, yet leave none stopped), removes its nft table if any, and its directory.
struct Guard {
    data: PathBuf,
    nodes: usize,
    nft_table: Option<String>,
    /// Nodes the test started itself.
    children: Vec<std::process::Child>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(t) = &self.nft_table {
            let _ = am_testkit::shell::sh(&format!("nft delete table inet {t}"));
        }
        for p in pids(&self.data, self.nodes) {
            let _ = Command::new("kill")
                .args(["-CONT", &p.to_string()])
                .status();
            let _ = Command::new("kill").args(["-9", &p.to_string()]).status();
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

fn pids(data: &Path, n: usize) -> Vec<i32> {
    (1..=n)
        .filter_map(|k| std::fs::read_to_string(data.join(format!("node{k}.pid"))).ok())
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

fn up(data: &Path, nodes: usize, port: u16) -> Config {
    let out = ok(&[
        "up",
        "--nodes",
        &nodes.to_string(),
        "--data",
        data.to_str().unwrap(),
        "--port",
        &port.to_string(),
        "--storage-mb",
        "64",
    ]);
    assert!(out.contains("ready"), "{out}");
    Config::load(&data.join("cluster.toml")).unwrap()
}

fn status(cfg: &Config, node: u16) -> NodeStatus {
    let n = cfg.node(node).unwrap();
    match Control::connect(&n.control)
        .unwrap()
        .call_ok(&Request::Status)
        .unwrap()
    {
        Response::Status(s) => *s,
        r => panic!("{r:?}"),
    }
}

fn membership(cfg: &Config, node: u16) -> MembershipStatus {
    status(cfg, node).membership
}

fn state_of(m: &MembershipStatus, node: u16) -> (u64, String) {
    m.members
        .iter()
        .find(|(n, ..)| *n == node)
        .map(|(_, inc, st, _)| (*inc, st.clone()))
        .unwrap_or_else(|| panic!("node {node} not in {m:?}"))
}

fn put(data: &Path, node: u16, content: &[u8], path: &str) {
    let local = data.join(format!("local-put-{node}"));
    std::fs::write(&local, content).unwrap();
    ok(&[
        "put",
        "--data",
        data.to_str().unwrap(),
        "--node",
        &node.to_string(),
        local.to_str().unwrap(),
        path,
    ]);
}

fn get(data: &Path, node: u16, path: &str) -> Vec<u8> {
    let local = data.join(format!("local-get-{node}"));
    ok(&[
        "get",
        "--data",
        data.to_str().unwrap(),
        "--node",
        &node.to_string(),
        path,
        local.to_str().unwrap(),
    ]);
    std::fs::read(&local).unwrap()
}

/// Poll `f` every 100 ms until it holds; panics with `what` after `limit`.
fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    t.elapsed()
}

/// Start node `node` alone (`serve`, as an operator restarts one host), its output in
/// `node<K>-restart.log`, its pid in `node<K>.pid`.
fn serve_alone(data: &Path, node: u16) -> std::process::Child {
    let log = std::fs::File::create(data.join(format!("node{node}-restart.log"))).unwrap();
    let child = Command::new(BIN)
        .args([
            "serve",
            "--config",
            data.join("cluster.toml").to_str().unwrap(),
            "--node",
            &node.to_string(),
        ])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    std::fs::write(data.join(format!("node{node}.pid")), child.id().to_string()).unwrap();
    child
}

/// kill -9 of node `node`, its removal by the others, then `serve` of it alone until it
/// is ready (joined as a new incarnation).
fn restart_alone(cfg: &Config, data: &Path, node: u16, g: &mut Guard) {
    let pid = pids(data, 3)[node as usize - 1];
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    let other = if node == 1 { 2 } else { 1 };
    let removed = wait_for(Duration::from_secs(20), "the node removed", || {
        state_of(&membership(cfg, other), node).1 == "failed"
    });
    eprintln!("node {node} removed {removed:?} after kill -9");
    let child = serve_alone(data, node);
    g.children.push(child);
    wait_for(Duration::from_secs(60), "the node rejoins", || {
        Control::connect(&cfg.node(node).unwrap().control)
            .and_then(|mut c| c.call_ok(&Request::Status))
            .is_ok_and(|r| matches!(r, Response::Status(s) if s.ready))
    });
}

#[test]
fn a_stopped_node_is_fenced_and_its_stale_copy_never_overwrites_the_fsynced_block() {
    let data = data_dir("fence-stop");
    am_testkit::shell::need("nft", "nftables");
    let table = format!("xfsfence{}", std::process::id());
    let _g = Guard {
        data: data.clone(),
        nodes: 3,
        nft_table: Some(table.clone()),
        children: Vec::new(),
    };
    let cfg = up(&data, 3, 18300);
    let m = membership(&cfg, 1);
    assert!(m.enabled && m.leader.is_some(), "{m:?}");
    assert_eq!(m.voters, vec![1, 2, 3]);
    // A file managed by node 1 or 2 (node 3's own files move to a survivor when it is
    // removed: manager failover, tested through the mounts in fuse-front's tests).
    let map = cfg.manager_map();
    let mut chosen = None;
    for k in 0..16 {
        let path = format!("/f{k}");
        put(&data, 1, b"old, fsynced", &path);
        let mut c = Control::connect(&cfg.node(3).unwrap().control).unwrap();
        let ino = match c
            .call_ok(&Request::Fs(FsOp::Lookup {
                parent: map.root(),
                name: path.as_bytes()[1..].to_vec(),
            }))
            .unwrap()
        {
            Response::Attr(i) => i.ino,
            r => panic!("{r:?}"),
        };
        if map.manager(ino) != 3 {
            chosen = Some((path, ino));
            break;
        }
    }
    let (path, ino) = chosen.expect("a file managed by node 1 or 2");
    // Node 3 writes the file and does not fsync: its copy is dirty, un-fsynced.
    let stale = vec![b'S'; 3000];
    let mut c3 = Control::connect(&cfg.node(3).unwrap().control).unwrap();
    c3.call_ok(&Request::Fs(FsOp::Write {
        ino,
        offset: 0,
        data: stale.clone(),
    }))
    .unwrap();
    drop(c3);
    assert_eq!(
        get(&data, 3, &path)[..3000],
        stale[..],
        "node 3 reads its own write"
    );
    let (inc3, _) = state_of(&membership(&cfg, 1), 3);
    // Node 3 stalls, longer than the failure timeout. Its membership endpoint is cut off
    // too (an nft drop rule, until the end of the test's stale write), so that when it
    // goes on it cannot learn at once that it was removed: nothing of the membership log
    // waits in its socket.
    let pid3 = pids(&data, 3)[2];
    let stopped = Instant::now();
    Command::new("kill")
        .args(["-STOP", &pid3.to_string()])
        .status()
        .unwrap();
    let port = cfg
        .node(3)
        .unwrap()
        .membership_addr(cfg.cluster.shards)
        .port();
    for cmd in [
        format!("nft 'add table inet {table}'"),
        format!(
            "nft 'add chain inet {table} input {{ type filter hook input priority 0 ; policy accept ; }}'"
        ),
        format!("nft 'add rule inet {table} input udp dport {port} counter drop'"),
    ] {
        am_testkit::shell::sh(&cmd).unwrap();
    }
    // Node 1 replaces the file and fsyncs: the revoke of node 3's copy waits until the
    // cluster has removed node 3, then the write goes on.
    let new = b"new content, written and fsynced while node 3 was stopped".to_vec();
    put(&data, 1, &new, &path);
    let put_took = stopped.elapsed();
    let m = membership(&cfg, 1);
    assert_eq!(
        state_of(&m, 3).1,
        "failed",
        "removed before the write went on: {m:?}"
    );
    assert!(m.epoch >= 4, "three joins and a failure: {m:?}");
    eprintln!(
        "the write waited {put_took:?} for node 3's removal (epoch {})",
        m.epoch
    );
    assert_eq!(get(&data, 2, &path), new);
    // Stopped for 6 s in all, then it goes on where it stopped, with its dirty copy, not
    // knowing it was removed; an application on node 3 fsyncs the file: node 3 writes its
    // stale copy back. That write must be refused, and the fsync must fail.
    std::thread::sleep(Duration::from_secs(6).saturating_sub(stopped.elapsed()));
    Command::new("kill")
        .args(["-CONT", &pid3.to_string()])
        .status()
        .unwrap();
    let control3 = cfg.node(3).unwrap().control.clone();
    let fsync = std::thread::spawn(move || {
        let mut c = Control::connect(&control3).unwrap();
        let t = Instant::now();
        (c.call_ok(&Request::Fs(FsOp::Fsync { ino })), t.elapsed())
    });
    std::thread::sleep(Duration::from_secs(3));
    let fenced_1_2: u64 = (1..=2).map(|n| status(&cfg, n).counter("fenced")).sum();
    am_testkit::shell::sh(&format!("nft delete table inet {table}")).unwrap();
    let (fsynced, took) = fsync.join().unwrap();
    eprintln!("node 3's fsync of its stale copy: {fsynced:?} after {took:?}");
    assert!(
        fsynced.is_err(),
        "a removed node's fsync of its stale copy succeeded"
    );
    // It learns it was removed, drops its state and rejoins as a new incarnation.
    let back = wait_for(Duration::from_secs(30), "node 3 rejoins", || {
        let m = membership(&cfg, 3);
        m.joined && m.removed_self >= 1 && m.incarnation > inc3
    });
    eprintln!("node 3 rejoined {back:?} after its cut healed");
    let (inc3b, st) = state_of(&membership(&cfg, 1), 3);
    assert_eq!(st, "active");
    assert!(inc3b > inc3, "a new incarnation");
    assert!(status(&cfg, 3).counter("fenced_self") >= 1);
    // Its storage server, stopped with it, is attached again to the logs that wrote on
    // while it was down and rebuilt there, with no process restarted.
    let down_at_1 = status(&cfg, 1).counter("log_rebuilt");
    let reattached = wait_for(
        Duration::from_secs(30),
        "node 3's server re-attached",
        || (1..=2).all(|n| status(&cfg, n).counter("log_servers_down") == 0),
    );
    eprintln!(
        "node 3's storage server re-attached {reattached:?} after it rejoined ({} fragments \
         rebuilt on it for node 1's log so far)",
        down_at_1.max(status(&cfg, 1).counter("log_rebuilt"))
    );
    assert!(
        status(&cfg, 1).counter("log_rebuilt") >= 1,
        "node 1's log wrote while node 3's server was stopped, yet rebuilt nothing on it"
    );
    // Whatever node 3 tried to write back, the fsynced content stands, on every node,
    // and in storage: after the cluster is stopped (every log synced and checkpointed)
    // and started again, nothing is read from a cache.
    for node in 1..=3 {
        assert!(get(&data, node, &path) == new, "{path} through node {node}");
    }
    eprintln!("messages from node 3 refused by nodes 1 and 2 while it was cut off: {fenced_1_2}");
    assert!(
        fenced_1_2 >= 1,
        "node 3 sent nothing while cut off: the test did not test the fence"
    );
    ok(&["down", "--data", data.to_str().unwrap()]);
    up(&data, 3, 18300);
    for node in 1..=3 {
        let got = get(&data, node, &path);
        assert!(
            got == new,
            "{path} through node {node} after down and up: {} bytes starting {:?}, not the \
             fsynced content (node 3's stale copy is {} bytes of 'S')",
            got.len(),
            String::from_utf8_lossy(&got[..got.len().min(40)]),
            stale.len()
        );
    }
    // And node 3 writes again, as a member.
    put(&data, 3, b"node 3 again", &path);
    assert_eq!(get(&data, 1, &path), b"node 3 again");
    ok(&["down", "--data", data.to_str().unwrap()]);
}

#[test]
fn leave_and_join_through_the_membership_log() {
    let data = data_dir("fence-leave");
    let mut g = Guard {
        data: data.clone(),
        nodes: 3,
        nft_table: None,
        children: Vec::new(),
    };
    let cfg = up(&data, 3, 18400);
    let d = data.to_str().unwrap();
    let before = membership(&cfg, 1);
    let out = ok(&["members", "--data", d]);
    assert!(out.contains("leader") && out.contains("active"), "{out}");
    ok(&["leave", "--data", d, "2"]);
    wait_for(Duration::from_secs(10), "node 2 leaves", || {
        state_of(&membership(&cfg, 1), 2).1 == "left"
    });
    // It stays out (no automatic rejoin) and says so.
    std::thread::sleep(Duration::from_secs(2));
    let m2 = membership(&cfg, 2);
    assert_eq!(state_of(&m2, 2).1, "left", "{m2:?}");
    assert!(!m2.joined);
    let out = ok(&["members", "--data", d]);
    assert!(out.contains("not members: 2 (left)"), "{out}");
    // Back in, as a new incarnation.
    ok(&["join", "--data", d, "2"]);
    wait_for(Duration::from_secs(10), "node 2 joins", || {
        membership(&cfg, 2).joined
    });
    let after = membership(&cfg, 1);
    assert!(after.epoch >= before.epoch + 2, "{before:?} -> {after:?}");
    assert!(state_of(&after, 2).0 > state_of(&before, 2).0);
    put(&data, 2, b"after rejoining", "/r");
    assert_eq!(get(&data, 3, "/r"), b"after rejoining");
    // Node 2 restarts (its log replays the leave and the join): it joins again at once.
    let inc = state_of(&membership(&cfg, 1), 2).0;
    restart_alone(&cfg, &data, 2, &mut g);
    assert!(state_of(&membership(&cfg, 1), 2).0 > inc);
    assert_eq!(get(&data, 2, "/r"), b"after rejoining");
    // It leaves, restarts while out, and stays out until `join`.
    ok(&["leave", "--data", d, "2"]);
    wait_for(Duration::from_secs(10), "node 2 leaves again", || {
        state_of(&membership(&cfg, 1), 2).1 == "left"
    });
    let pid2 = pids(&data, 3)[1];
    Command::new("kill")
        .args(["-9", &pid2.to_string()])
        .status()
        .unwrap();
    let child = serve_alone(&data, 2);
    g.children.push(child);
    wait_for(Duration::from_secs(30), "node 2 answers, out", || {
        Control::connect(&cfg.node(2).unwrap().control)
            .and_then(|mut c| c.call_ok(&Request::Status))
            .is_ok()
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(state_of(&membership(&cfg, 1), 2).1, "left", "it stays out");
    assert!(!membership(&cfg, 2).joined);
    ok(&["join", "--data", d, "2"]);
    wait_for(
        Duration::from_secs(10),
        "node 2 joins after its restart",
        || membership(&cfg, 2).joined,
    );
    assert_eq!(get(&data, 2, "/r"), b"after rejoining");
    // A change through a node that is not running fails with a clear error.
    let o = xfs(&["leave", "--data", d, "--via", "9", "1"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("node 9 is not in the cluster"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    ok(&["down", "--data", d]);
}

/// kill -9 of one node while the others run, then that node alone started again (`serve`,
/// as an operator restarts one host): the others remove the dead incarnation, the new one
/// joins, the others forget what they knew of the old one (its channels, the copies of the
/// blocks it manages), and every file reads and writes as before, through every node.
#[test]
fn one_node_killed_and_restarted_alone_rejoins_as_a_new_incarnation() {
    let data = data_dir("fence-restart");
    let mut g = Guard {
        data: data.clone(),
        nodes: 3,
        nft_table: None,
        children: Vec::new(),
    };
    let cfg = up(&data, 3, 18500);
    let mut files = Vec::new();
    for (k, node) in [1u16, 2, 3, 1, 2, 3].into_iter().enumerate() {
        let path = format!("/r{k}");
        let content = format!("file {k} written through node {node}").into_bytes();
        put(&data, node, &content, &path);
        files.push((path, content));
    }
    // Every node caches every file.
    for node in 1..=3 {
        for (path, content) in &files {
            assert!(&get(&data, node, path) == content);
        }
    }
    let (inc2, _) = state_of(&membership(&cfg, 1), 2);
    restart_alone(&cfg, &data, 2, &mut g);
    let (inc2b, st) = state_of(&membership(&cfg, 1), 2);
    assert_eq!(st, "active");
    assert!(inc2b > inc2, "a new incarnation");
    // Everything reads through every node, the restarted one included; every file takes
    // a new write through a node other than the one that wrote it.
    for node in 1..=3 {
        for (path, content) in &files {
            assert!(
                &get(&data, node, path) == content,
                "{path} through node {node} after node 2's restart"
            );
        }
    }
    for (k, (path, _)) in files.iter().enumerate() {
        let node = (k % 3 + 1) as u16 % 3 + 1;
        let content = format!("file {k} rewritten through node {node}").into_bytes();
        put(&data, node, &content, path);
        for reader in 1..=3 {
            assert!(
                get(&data, reader, path) == content,
                "{path} through node {reader} after its rewrite"
            );
        }
    }
    let errors: u64 = (1..=3)
        .map(|n| status(&cfg, n).counter("protocol_errors"))
        .sum();
    assert_eq!(errors, 0, "the old incarnation's state confused no one");
    ok(&["down", "--data", data.to_str().unwrap()]);
}
