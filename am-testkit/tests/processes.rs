//! Real processes: the ping-pong example as a second process, a peer killed mid-stream and
//! restarted, and a peer of another protocol version; over UDP loopback and over RDMA verbs
//! (the `_over_verbs` tests need a verbs device: they run in the SoftRoCE VM, see
//! `scripts/verbs-tests.sh`, and say they were skipped elsewhere).

use am_core::{Config, Endpoint, EndpointName, ErrorCode, Msg, Tag, Transport, Undeliverable};
use am_rdma::{RdmaConfig, RdmaTransport};
use am_testkit::conformance::poll_until;
use am_testkit::peer::{check_cut_stream, PeerProcess};
use am_testkit::rdma::{skip_without_device, test_ip};
use am_udp::{UdpConfig, UdpTransport};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The pingpong example, built by `cargo test` next to the test binaries.
fn pingpong() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let p = dir.join("examples").join("pingpong");
    assert!(
        p.exists(),
        "{} missing: run `cargo build --examples`",
        p.display()
    );
    p
}

/// The pingpong server process (its first line is `listening ADDR tag N`).
struct Server {
    peer: PeerProcess,
    addr: SocketAddr,
    handled: Arc<Mutex<Vec<u64>>>,
}

/// How long a wait for something the engine must do by itself (a message handled, a dead
/// peer's messages returned) may take before the test calls it a hang. Only a hang guard:
/// far above the engine's 2 s unreachable timeout, so that a loaded 2-core machine or an
/// emulated VM cannot reach it; what happened is checked by counting events.
const HANG_GUARD: Duration = Duration::from_secs(60);

/// The most retransmission timeouts an engine with `cfg` can take towards one silent peer
/// before declaring it unreachable: its timeouts start at `min_rto` at the shortest and
/// double up to `max_rto`, and each sends at most one packet again; `unreachable_timeout`
/// after the last progress the peer is given up (load only delays the timers, so it
/// means fewer, never more).
fn rto_expiries_before_unreachable(cfg: &Config) -> u64 {
    let (mut at, mut rto, mut n) = (Duration::ZERO, cfg.min_rto, 0);
    while at + rto < cfg.unreachable_timeout {
        at += rto;
        rto = (rto * 2).min(cfg.max_rto);
        n += 1;
    }
    n
}

/// A transport the tests run over: its name for `--transport`, the address to bind, and
/// how to make an in-process endpoint on it.
struct Net<T: Transport> {
    name: &'static str,
    ip: String,
    make: fn(&str) -> T,
}

fn udp() -> Net<UdpTransport> {
    Net {
        name: "udp",
        ip: "127.0.0.1".into(),
        make: |ip| {
            UdpTransport::bind(format!("{ip}:0").parse().unwrap(), UdpConfig::default()).unwrap()
        },
    }
}

fn rdma(test: &str) -> Option<Net<RdmaTransport>> {
    if skip_without_device(test) {
        return None;
    }
    Some(Net {
        name: "rdma",
        ip: test_ip().to_string(),
        make: |ip| {
            RdmaTransport::bind(format!("{ip}:0").parse().unwrap(), RdmaConfig::default()).unwrap()
        },
    })
}

impl<T: Transport> Net<T> {
    fn any_port(&self) -> String {
        format!("{}:0", self.ip)
    }
    fn endpoint(&self, tag: u64) -> Endpoint<T> {
        Endpoint::try_new((self.make)(&self.ip), Self::config(tag)).unwrap()
    }
    fn config(tag: u64) -> Config {
        Config {
            tag: Tag(tag),
            ..Config::default()
        }
    }
    fn server(&self, extra: &[&str]) -> Server {
        Server::start(self.name, extra)
    }
    /// Runs the pingpong client against `server` to its end.
    fn client(&self, server: &Server, extra: &[&str]) -> std::process::Output {
        let addr = server.addr.to_string();
        Command::new(pingpong())
            .args(["client", "--transport", self.name, "--server", &addr])
            .args(extra)
            .output()
            .unwrap()
    }
}

impl Server {
    fn start(transport: &str, extra: &[&str]) -> Server {
        let mut args = vec!["server", "--transport", transport];
        args.extend_from_slice(extra);
        let peer = PeerProcess::start(&pingpong(), &args);
        Server {
            addr: peer.addr(),
            handled: peer.handled.clone(),
            peer,
        }
    }
    fn signal(&self, sig: &str) {
        self.peer.signal(sig);
    }
}

/// Maps the pingpong server (its default tag 7) at index 0.
fn map_server<T: Transport>(ep: &mut Endpoint<T>, server: &Server) {
    let name = EndpointName {
        addr: server.addr,
        vnet: 0,
    };
    ep.map(0, name, Tag(7)).unwrap();
}

fn run_until<T: Transport>(
    eps: &mut [&mut Endpoint<T>],
    limit: Duration,
    mut done: impl FnMut() -> bool,
) -> bool {
    poll_until(eps, limit, &mut done, &mut || 0, Duration::from_micros(100))
}

#[test]
fn two_processes_exchange_small_medium_and_bulk() {
    two_processes(udp());
}

#[test]
fn two_processes_exchange_small_medium_and_bulk_over_verbs() {
    if let Some(net) = rdma("two_processes_exchange_small_medium_and_bulk_over_verbs") {
        two_processes(net);
        println!("VERBS-TEST-RAN two_processes_exchange_small_medium_and_bulk_over_verbs");
    }
}

fn two_processes<T: Transport>(net: Net<T>) {
    let server = net.server(&["--bind", &net.any_port()]);
    let out = net.client(&server, &["--mode", "all"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in ["small ok", "medium ok", "bulk ok"] {
        assert!(text.contains(line), "missing {line:?} in {text}");
    }
    let ping = net.client(&server, &["--count", "200", "--size", "100"]);
    assert!(ping.status.success());
    assert!(String::from_utf8_lossy(&ping.stdout).contains("200 round trips of 100 B"));
}

#[test]
fn killing_the_peer_mid_stream_loses_nothing_and_a_restart_is_reachable() {
    kill_and_restart(udp());
}

#[test]
fn killing_the_peer_mid_stream_loses_nothing_and_a_restart_is_reachable_over_verbs() {
    let test = "killing_the_peer_mid_stream_loses_nothing_and_a_restart_is_reachable_over_verbs";
    if let Some(net) = rdma(test) {
        kill_and_restart(net);
        println!("VERBS-TEST-RAN {test}");
    }
}

fn kill_and_restart<T: Transport>(net: Net<T>) {
    let server = net.server(&["--bind", &net.any_port(), "--log-handled"]);
    let mut a = net.endpoint(1);
    let mut c = net.endpoint(3);
    map_server(&mut a, &server);
    a.map(1, c.name(), c.tag()).unwrap();
    let at_c = Arc::new(Mutex::new(Vec::new()));
    let g = at_c.clone();
    c.register(1, move |_, m| g.lock().unwrap().push(m.args[0]))
        .unwrap();
    let ups: Arc<Mutex<Vec<(Undeliverable, Instant)>>> = Arc::default();
    let u = ups.clone();
    a.set_upcall(move |_, x| u.lock().unwrap().push((x, Instant::now())));

    // A stream to the server and to the survivor C.
    let mut seq = 0u64;
    let mut to_c = 0u64;
    let send = |a: &mut Endpoint<T>, n: u64, seq: &mut u64, to_c: &mut u64| {
        for _ in 0..n {
            a.send(0, Msg::small(2, &[*seq])).unwrap();
            *seq += 1;
            a.send(1, Msg::small(1, &[*to_c])).unwrap();
            *to_c += 1;
        }
    };
    for _ in 0..20 {
        send(&mut a, 25, &mut seq, &mut to_c);
        run_until(&mut [&mut a, &mut c], Duration::from_millis(5), || false);
    }
    // Stop the server where it sleeps (everything so far handled and acknowledged), put a
    // burst in flight that it will never handle, then kill it.
    let deadline = Instant::now() + HANG_GUARD;
    while !(a.is_idle() && c.is_idle()) {
        assert!(
            Instant::now() < deadline,
            "the stream did not drain in {HANG_GUARD:?} (a hang): {:?}",
            a.stats()
        );
        run_until(&mut [&mut a, &mut c], Duration::from_millis(1), || false);
    }
    // Give the server time to go back to sleep after its last acknowledgement.
    std::thread::sleep(Duration::from_millis(50));
    server.signal("-STOP");
    // From here the server acknowledges nothing: what the engine sends it again is counted
    // (its retransmissions probe the silent peer until it is declared unreachable).
    let retransmits_before = a.stats().retransmits;
    send(&mut a, 100, &mut seq, &mut to_c);
    run_until(&mut [&mut a, &mut c], Duration::from_millis(20), || false);
    server.signal("-KILL");
    let killed_at = Instant::now();
    let total = seq;
    let ok = run_until(&mut [&mut a, &mut c], HANG_GUARD, || {
        let handled = server.handled.lock().unwrap().len() as u64;
        let returned = ups.lock().unwrap().len() as u64;
        handled + returned >= total && at_c.lock().unwrap().len() as u64 >= to_c
    });
    let retransmits = a.stats().retransmits - retransmits_before;
    let handled: Vec<u64> = server.handled.lock().unwrap().clone();
    let returned: Vec<(Undeliverable, Instant)> = ups.lock().unwrap().clone();
    assert!(
        ok,
        "the dead peer was never declared unreachable: {HANG_GUARD:?} after the kill, handled \
         {} + returned {} of {total}, {retransmits} retransmissions since it stopped; {:?}",
        handled.len(),
        returned.len(),
        a.stats()
    );
    // How soon the dead peer was declared dead, as a count of what the engine sent it
    // meanwhile (not as wall-clock time: a loaded machine polls late). Over UDP each
    // retransmission timeout sends one packet again: at most `expiries` of them fit in the
    // unreachable timeout (the survivor C, which acknowledges, normally adds none; as much
    // again is allowed for it), so a peer declared dead much later than the timeout (or
    // never) is caught; and at least one went, or the count proves nothing. Over a
    // reliable transport (verbs) the engine sends nothing again (checked), so there is
    // nothing to count here: that the peer is declared dead at the unreachable timeout is
    // checked in virtual time (am-core's
    // `a_slow_reliable_path_that_makes_progress_is_not_declared_unreachable`), and here
    // that it is declared dead at all, before the hang guard.
    let expiries = rto_expiries_before_unreachable(&Net::<T>::config(1));
    if a.transport().capabilities().reliable {
        assert_eq!(
            retransmits, 0,
            "the engine retransmitted over a reliable transport"
        );
    } else {
        assert!(
            (1..=2 * expiries).contains(&retransmits),
            "{retransmits} retransmissions between the server's stop and the return of its \
             messages; the unreachable timeout allows at most {expiries} towards it (at most \
             {} with the survivor's): it was declared dead late, or never probed",
            2 * expiries
        );
    }
    println!(
        "the dead peer was declared unreachable after {retransmits} retransmissions (at most \
         {expiries} fit in the unreachable timeout)"
    );
    // Returned, exactly once each and in order (at any time before the hang guard: how soon
    // is the count above).
    let (handled_n, returned_n) =
        check_cut_stream(&handled, &returned, total, killed_at, HANG_GUARD);
    assert!(returned_n >= 100, "the burst in flight was not returned");
    assert!(
        handled_n >= 500,
        "the stream before the stop was not handled"
    );
    // The survivor kept working, exactly once and in order.
    assert_eq!(*at_c.lock().unwrap(), (0..to_c).collect::<Vec<u64>>());

    // Restart on the same address: reachable again. The engine gives a peer that does not
    // answer its handshake the unreachable timeout (2 s), then returns the message: the
    // message must be handled, not returned.
    let port = server.addr.to_string();
    drop(server);
    let server2 = net.server(&["--bind", &port, "--log-handled"]);
    let returned_before = ups.lock().unwrap().len();
    a.send(0, Msg::small(2, &[9999])).unwrap();
    let ok = run_until(&mut [&mut a], HANG_GUARD, || {
        server2.handled.lock().unwrap().contains(&9999)
            || ups.lock().unwrap().len() > returned_before
    });
    let back: Vec<Undeliverable> = ups.lock().unwrap()[returned_before..]
        .iter()
        .map(|(u, _)| u.clone())
        .collect();
    assert!(
        ok && back.is_empty(),
        "the restarted peer was not reachable: handled: {}, returned: {back:?}",
        server2.handled.lock().unwrap().contains(&9999)
    );
}

#[test]
fn a_peer_of_another_protocol_version_is_refused_naming_both() {
    let server = udp().server(&["--bind", "127.0.0.1:0", "--protocol-version", "9"]);
    let mut a = udp().endpoint(1);
    map_server(&mut a, &server);
    let ups: Arc<Mutex<Vec<Undeliverable>>> = Arc::default();
    let u = ups.clone();
    a.set_upcall(move |_, x| u.lock().unwrap().push(x));
    a.send(0, Msg::small(2, &[1])).unwrap();
    assert!(
        run_until(&mut [&mut a], HANG_GUARD, || !ups
            .lock()
            .unwrap()
            .is_empty()),
        "no upcall for a peer of another version in {HANG_GUARD:?}"
    );
    let code = ups.lock().unwrap()[0].code;
    assert_eq!(
        code,
        ErrorCode::VersionMismatch {
            local: am_core::PROTOCOL_VERSION,
            remote: 9
        }
    );
    let text = code.to_string();
    assert!(
        text.contains("we speak version 1") && text.contains("peer speaks version 9"),
        "{text}"
    );
}
