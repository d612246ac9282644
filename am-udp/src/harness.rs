//! A conformance [`Harness`] over real UDP sockets: on loopback, or spread over network
//! namespaces (each endpoint bound inside one, round-robin).
//!
//! Test code shipped in the library so other crates' tests can use it: a failure to bind
//! (a missing namespace, a taken port) panics with the address and the OS error, because
//! the `Harness` trait makes endpoints infallibly and a test cannot go on without them.

use crate::{UdpConfig, UdpTransport};
use am_core::conformance::{poll_until, Harness};
use am_core::{Config, Endpoint, Stats, Time};
use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Where endpoints are bound.
#[derive(Clone, Debug)]
pub enum Site {
    /// An address of this network namespace (loopback, say).
    Local(IpAddr),
    /// An address inside the named network namespace (`ip netns add NAME`).
    Netns {
        /// Namespace name under /run/netns.
        name: String,
        /// Address inside it.
        ip: IpAddr,
    },
}

impl Site {
    fn ip(&self) -> IpAddr {
        match self {
            Site::Local(ip) | Site::Netns { ip, .. } => *ip,
        }
    }
}

/// Binds a UDP socket at `addr` inside network namespace `ns` (a thread enters the
/// namespace, binds, and exits; the socket stays in the namespace).
pub fn bind_in_netns(ns: &str, addr: SocketAddr) -> io::Result<UdpSocket> {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let f = std::fs::File::open(&path)
                .map_err(|e| io::Error::new(e.kind(), format!("open {path}: {e}")))?;
            // SAFETY: setns on this (short-lived) thread only.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            UdpSocket::bind(addr)
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("bind thread panicked")))
    })
}

/// Conformance harness over UDP.
pub struct UdpHarness {
    /// Base endpoint configuration.
    pub config: Config,
    /// Driver configuration.
    pub udp: UdpConfig,
    /// Sites used round-robin for new endpoints.
    pub sites: Vec<Site>,
    /// Bulk size for the classes check.
    pub bulk: usize,
    next: usize,
    origin: Instant,
    seen: BTreeMap<(SocketAddr, u64), Stats>,
}

impl UdpHarness {
    /// A harness binding endpoints round-robin at `sites`.
    pub fn new(sites: Vec<Site>) -> UdpHarness {
        UdpHarness {
            config: Config {
                segment_bytes: 4 << 20,
                ..Config::default()
            },
            udp: UdpConfig::default(),
            sites,
            bulk: 1 << 20,
            next: 0,
            origin: Instant::now(),
            seen: BTreeMap::new(),
        }
    }

    /// On IPv4 loopback.
    pub fn loopback() -> UdpHarness {
        Self::new(vec![Site::Local("127.0.0.1".parse().expect("ip"))])
    }

    fn bind(&self, site: &Site, port: u16) -> UdpTransport {
        let addr = SocketAddr::new(site.ip(), port);
        let t = match site {
            Site::Local(_) => UdpTransport::bind(addr, self.udp.clone()),
            Site::Netns { name, .. } => {
                let s = bind_in_netns(name, addr)
                    .unwrap_or_else(|e| panic!("bind {addr} in netns {name}: {e}"));
                UdpTransport::from_socket(s, self.udp.clone())
            }
        };
        t.unwrap_or_else(|e| panic!("{e}"))
    }

    fn record(&mut self, ep: &Endpoint<UdpTransport>) {
        self.seen
            .insert((ep.name().addr, ep.incarnation()), ep.stats().clone());
    }

    /// Counters summed over every endpoint this harness has run.
    pub fn total_stats(&self) -> Stats {
        let mut t = Stats::default();
        for s in self.seen.values() {
            t.add(s);
        }
        t
    }
}

impl Harness for UdpHarness {
    type T = UdpTransport;
    fn base_config(&self) -> Config {
        self.config.clone()
    }
    fn endpoint(&mut self, cfg: Config) -> Endpoint<UdpTransport> {
        let site = self.sites[self.next % self.sites.len()].clone();
        self.next += 1;
        Endpoint::new(self.bind(&site, 0), cfg)
    }
    fn endpoint_at(&mut self, addr: SocketAddr, cfg: Config) -> Endpoint<UdpTransport> {
        let site = self
            .sites
            .iter()
            .find(|s| s.ip() == addr.ip())
            .cloned()
            .unwrap_or(Site::Local(addr.ip()));
        Endpoint::new(self.bind(&site, addr.port()), cfg)
    }
    fn kill(&mut self, ep: Endpoint<UdpTransport>) {
        self.record(&ep);
        drop(ep);
    }
    fn run(
        &mut self,
        eps: &mut [&mut Endpoint<UdpTransport>],
        limit: Duration,
        done: &mut dyn FnMut() -> bool,
    ) -> bool {
        let ok = poll_until(eps, limit, done, &mut || 0, Duration::from_micros(50));
        for ep in eps.iter() {
            self.record(ep);
        }
        ok
    }
    fn now(&self) -> Time {
        Time(self.origin.elapsed().as_nanos() as u64)
    }
    fn bulk_bytes(&self) -> usize {
        self.bulk
    }
}

/// FNV-1a of `bytes`: how the ping-pong servers (`pingpong`, `dpdk_peer`) report the bytes
/// of a bulk that landed, so a client checks them without sending them back.
pub fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// The handlers of a ping-pong server, over any transport: 1 echoes a request (args and
/// payload) back; 2 takes a one-way message (with `log_handled`, printing `handled SEQ`
/// on stdout before the message is acknowledged); 3 answers a bulk request with the
/// length and [`fnv`] of the bytes that landed.
pub fn pingpong_handlers<T: am_core::Transport>(
    ep: &mut Endpoint<T>,
    log_handled: bool,
) -> Result<(), am_core::AmError> {
    use am_core::Msg;
    use std::io::Write;
    ep.register(1, |ctx, mut m| {
        if let Some(t) = m.token.take() {
            let slices = [m.payload];
            let msg = if m.payload.is_empty() {
                Msg::small(1, m.args)
            } else {
                Msg::medium(1, m.args, &slices)
            };
            let _ = ctx.reply(t, msg);
        }
    })?;
    ep.register(2, move |_, m| {
        if log_handled {
            // One write per message, before the message is acknowledged.
            let line = format!("handled {}\n", m.args.first().copied().unwrap_or(0));
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(line.as_bytes());
            let _ = out.flush();
        }
    })?;
    ep.register(3, |ctx, mut m| {
        let (off, len) = m.bulk.unwrap_or((0, 0));
        let h = fnv(&ctx.segment()[off as usize..off as usize + len]);
        if let Some(t) = m.token.take() {
            let _ = ctx.reply(t, Msg::small(3, &[len as u64, h]));
        }
    })?;
    Ok(())
}

/// A peer process a test started: its first line of output, the `handled SEQ` lines it
/// printed after that, and signals; killed and reaped when dropped.
pub struct PeerProcess {
    child: std::process::Child,
    /// The first line it printed (`listening ADDR ...`, `ready`).
    pub first: String,
    /// The sequence numbers of its `handled SEQ` lines, in order.
    pub handled: std::sync::Arc<std::sync::Mutex<Vec<u64>>>,
}

impl PeerProcess {
    /// Starts `exe` with `args` and waits for its first line (panics with the command if
    /// it says nothing: a test cannot go on without its peer).
    pub fn start(exe: &std::path::Path, args: &[&str]) -> PeerProcess {
        use std::io::BufRead;
        let mut child = std::process::Command::new(exe)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} {args:?}: {e}", exe.display()));
        let Some(out) = child.stdout.take() else {
            panic!("{} {args:?}: no stdout", exe.display());
        };
        let mut lines = std::io::BufReader::new(out).lines();
        let first = match lines.next() {
            Some(Ok(l)) => l,
            _ => panic!("{} {args:?} said nothing", exe.display()),
        };
        let handled = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let h = handled.clone();
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                if let Some(n) = l.strip_prefix("handled ").and_then(|n| n.parse().ok()) {
                    if let Ok(mut v) = h.lock() {
                        v.push(n);
                    }
                }
            }
        });
        PeerProcess {
            child,
            first,
            handled,
        }
    }

    /// The address in its first line (`listening ADDR ...`).
    pub fn addr(&self) -> SocketAddr {
        self.first
            .split_whitespace()
            .nth(1)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in the first line {:?}", self.first))
    }

    /// Sends `sig` (`-STOP`, `-KILL`, ...) with kill(1).
    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {} failed", self.child.id());
    }

    /// How many `handled` lines so far.
    pub fn handled_count(&self) -> usize {
        self.handled.lock().map(|v| v.len()).unwrap_or(0)
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `cmd` with `sh -c`: its stdout, or an error naming the command and what it said.
pub fn sh(cmd: &str) -> Result<String, String> {
    let o = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "`{cmd}` failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Fails the test, naming the package to install, when `tool` is not on the PATH.
pub fn need(tool: &str, package: &str) {
    assert!(
        sh(&format!("command -v {tool}")).is_ok(),
        "`{tool}` is missing: install it with `apt-get install -y {package}` (as root)"
    );
}

/// In network namespace `ns`, an nft table `table` dropping `percent`% of UDP datagrams at
/// each hook of `hooks` (`input`, `output`), counting what it drops.
pub fn nft_drop_udp(ns: &str, table: &str, percent: u32, hooks: &[&str]) -> Result<(), String> {
    sh(&format!("ip netns exec {ns} nft 'add table inet {table}'"))?;
    for hook in hooks {
        sh(&format!(
            "ip netns exec {ns} nft 'add chain inet {table} {hook} {{ type filter hook {hook} priority 0 ; policy accept ; }}'"
        ))?;
        sh(&format!(
            "ip netns exec {ns} nft 'add rule inet {table} {hook} meta l4proto udp numgen random mod 100 < {percent} counter drop'"
        ))?;
    }
    Ok(())
}

/// Datagrams the rules of [`nft_drop_udp`] dropped so far (0 when the table is gone).
pub fn nft_dropped(ns: &str, table: &str) -> u64 {
    let text = sh(&format!("ip netns exec {ns} nft list table inet {table}")).unwrap_or_default();
    let words: Vec<&str> = text.split_whitespace().collect();
    words
        .windows(2)
        .filter(|w| w[0] == "packets")
        .filter_map(|w| w[1].parse::<u64>().ok())
        .sum()
}

/// Checks a stream of one-way messages `0..total` (sequence number in the first argument)
/// cut by killing its receiver at `killed_at`: each was handled at most once (`handled`,
/// in the receiver's log) or returned to the sender's upcall as `Unreachable` within
/// `bound` of the kill (`returned`, with when), never both, none lost; the returns come
/// in order. Returns how many were handled and how many returned.
pub fn check_cut_stream(
    handled: &[u64],
    returned: &[(am_core::Undeliverable, Instant)],
    total: u64,
    killed_at: Instant,
    bound: Duration,
) -> (usize, usize) {
    let hs: std::collections::BTreeSet<u64> = handled.iter().copied().collect();
    assert_eq!(hs.len(), handled.len(), "a message was handled twice");
    let mut rs = std::collections::BTreeSet::new();
    for (u, at) in returned {
        assert_eq!(u.code, am_core::ErrorCode::Unreachable);
        assert!(rs.insert(u.args[0]), "message {} returned twice", u.args[0]);
        assert!(
            !hs.contains(&u.args[0]),
            "message {} both handled and returned",
            u.args[0]
        );
        let after = at.saturating_duration_since(killed_at);
        assert!(
            after <= bound,
            "returned {after:?} after the kill (bound {bound:?})"
        );
    }
    assert_eq!(
        hs.len() + rs.len(),
        total as usize,
        "a message was neither handled nor returned"
    );
    assert!(
        returned.windows(2).all(|w| w[0].0.args[0] < w[1].0.args[0]),
        "upcalls out of order"
    );
    (hs.len(), rs.len())
}
