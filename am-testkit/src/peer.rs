//! Peer processes for the tests and demos that run two processes: the ping-pong server's
//! handlers (shared by `examples/pingpong.rs` and am-dpdk's `dpdk_peer`), a started peer
//! process with its `handled SEQ` log, and the check of a message stream cut by a kill.

use am_core::Endpoint;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

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
