//! Test support for the tests that run real processes (the cluster tests here, the mount
//! tests of `fuse-front`): running the CLI, and hosts as network namespaces on a bridge
//! (root, iproute2) for nodes on separate addresses.

use std::path::Path;
use std::process::{Command, Output, Stdio};

/// Run `bin` with `args`.
pub fn run(bin: &Path, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", bin.display()))
}

/// Run `bin` with `args`, assert that it succeeded (printing its output if not), and
/// return its standard output.
pub fn run_ok(bin: &Path, args: &[&str]) -> String {
    let o = run(bin, args);
    assert!(
        o.status.success(),
        "{} {args:?} failed:\n{}{}",
        bin.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs `ip` with `args`; panics with the install hint if it is missing.
pub fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stderr(Stdio::null())
        .status()
        .unwrap_or_else(|e| {
            panic!("ip: {e}: install iproute2 (apt-get install iproute2) and run as root")
        })
        .success()
}

/// `n` network namespaces on a bridge, host k at `10.{subnet}.0.k/24`; removed when
/// dropped. Names carry `prefix` and this process's id, so parallel runs do not clash.
pub struct Hosts {
    /// The namespaces' names (`/run/netns/NAME`), host 1 first.
    pub names: Vec<String>,
    bridge: String,
}

impl Hosts {
    /// Create them (panics, naming what is missing, when it cannot).
    pub fn new(prefix: &str, n: usize, subnet: u8) -> Hosts {
        let tag = std::process::id() % 10_000;
        let bridge = format!("{prefix}br{tag}");
        let h = Hosts {
            names: (1..=n).map(|k| format!("{prefix}{tag}n{k}")).collect(),
            bridge: bridge.clone(),
        };
        assert!(
            ip(&["link", "add", &bridge, "type", "bridge"]),
            "cannot create a bridge: the namespace tests need root (CAP_NET_ADMIN)"
        );
        assert!(ip(&["link", "set", &bridge, "up"]));
        for (k, ns) in h.names.iter().enumerate() {
            let (a, b) = (format!("{prefix}v{tag}a{k}"), format!("{prefix}v{tag}b{k}"));
            assert!(ip(&["netns", "add", ns]), "ip netns add {ns}");
            assert!(ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]));
            assert!(ip(&["link", "set", &a, "master", &bridge, "up"]));
            assert!(ip(&["link", "set", &b, "netns", ns]));
            let addr = format!("10.{subnet}.0.{}/24", k + 1);
            assert!(ip(&["-n", ns, "addr", "add", &addr, "dev", &b]));
            assert!(ip(&["-n", ns, "link", "set", &b, "up"]));
            assert!(ip(&["-n", ns, "link", "set", "lo", "up"]));
        }
        h
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in &self.names {
            ip(&["netns", "del", ns]);
        }
        ip(&["link", "del", &self.bridge]);
    }
}
