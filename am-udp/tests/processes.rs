//! Real processes: the ping-pong example as a second process, a peer killed mid-stream and
//! restarted, and a peer of another protocol version; over UDP loopback and over RDMA verbs
//! (the `_over_verbs` tests need a verbs device: they run in the SoftRoCE VM, see
//! `scripts/verbs-tests.sh`, and say they were skipped elsewhere).

use am_core::conformance::poll_until;
use am_core::{Config, Endpoint, EndpointName, ErrorCode, Msg, Tag, Transport, Undeliverable};
use am_rdma::harness::{skip_without_device, test_ip};
use am_rdma::{RdmaConfig, RdmaTransport};
use am_udp::harness::{check_cut_stream, PeerProcess};
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

/// A transport the tests run over: its name for `--transport`, the address to bind, and
/// how to make an in-process endpoint on it.
struct Net<T: Transport> {
    name: &'static str,
    /// How soon after a kill the messages in flight must come back.
    dead_bound: Duration,
    ip: String,
    make: fn(&str) -> T,
}

fn udp() -> Net<UdpTransport> {
    Net {
        name: "udp",
        dead_bound: Duration::from_millis(3500),
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
        // The engine's unreachable timeout (2 s) plus a poll: rxe reports nothing itself.
        dead_bound: Duration::from_millis(2250),
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
        Endpoint::try_new(
            (self.make)(&self.ip),
            Config {
                tag: Tag(tag),
                ..Config::default()
            },
        )
        .unwrap()
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
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(a.is_idle() && c.is_idle()) {
        assert!(Instant::now() < deadline, "stream did not drain");
        run_until(&mut [&mut a, &mut c], Duration::from_millis(1), || false);
    }
    // Give the server time to go back to sleep after its last acknowledgement.
    std::thread::sleep(Duration::from_millis(50));
    server.signal("-STOP");
    send(&mut a, 100, &mut seq, &mut to_c);
    run_until(&mut [&mut a, &mut c], Duration::from_millis(20), || false);
    server.signal("-KILL");
    let killed_at = Instant::now();
    let total = seq;
    let ok = run_until(&mut [&mut a, &mut c], Duration::from_secs(6), || {
        let handled = server.handled.lock().unwrap().len() as u64;
        let returned = ups.lock().unwrap().len() as u64;
        handled + returned >= total && at_c.lock().unwrap().len() as u64 >= to_c
    });
    let handled: Vec<u64> = server.handled.lock().unwrap().clone();
    let returned: Vec<(Undeliverable, Instant)> = ups.lock().unwrap().clone();
    assert!(
        ok,
        "handled {} + returned {} of {total}",
        handled.len(),
        returned.len()
    );
    let (handled_n, returned_n) =
        check_cut_stream(&handled, &returned, total, killed_at, net.dead_bound);
    assert!(returned_n >= 100, "the burst in flight was not returned");
    assert!(
        handled_n >= 500,
        "the stream before the stop was not handled"
    );
    // The survivor kept working, exactly once and in order.
    assert_eq!(*at_c.lock().unwrap(), (0..to_c).collect::<Vec<u64>>());

    // Restart on the same address: reachable again within 2 s.
    let port = server.addr.to_string();
    drop(server);
    let server2 = net.server(&["--bind", &port, "--log-handled"]);
    let start = Instant::now();
    a.send(0, Msg::small(2, &[9999])).unwrap();
    let ok = run_until(&mut [&mut a], Duration::from_secs(2), || {
        server2.handled.lock().unwrap().contains(&9999)
    });
    assert!(
        ok,
        "restarted peer not reachable within 2 s ({:?})",
        start.elapsed()
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
    assert!(run_until(&mut [&mut a], Duration::from_secs(3), || !ups
        .lock()
        .unwrap()
        .is_empty()));
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
