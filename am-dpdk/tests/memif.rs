//! Two processes over `net_memif`: the conformance suite with every frame crossing to a
//! switch process and back; then an AM server in the other process: small, medium and a
//! 64 MiB bulk checked byte for byte (by hash), a stream cut by `kill -9` of the server
//! (every message handled once or returned by the upcall, within the bound), and a
//! restarted server reached again. One test per process: EAL starts once.

use am_core::{Config, Endpoint, EndpointName, Msg, Tag, Undeliverable};
use am_dpdk::sys::{Port, PortSpec};
use am_dpdk::{DpdkConfig, DpdkTransport};
use am_testkit::conformance::{poll_until, random_bytes, run_suite};
use am_testkit::dpdk::{DpdkHarness, Fabric};
use am_testkit::peer::{check_cut_stream, fnv, PeerProcess};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The peer example, built by `cargo test` next to the test binaries.
fn peer_exe() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let p = dir.join("examples").join("dpdk_peer");
    assert!(
        p.exists(),
        "{} missing: run `cargo build -p am-dpdk --examples`",
        p.display()
    );
    p
}

fn start_peer(args: &[&str]) -> PeerProcess {
    PeerProcess::start(&peer_exe(), args)
}

fn wait_link(port_up: impl Fn() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !port_up() {
        assert!(
            Instant::now() < deadline,
            "{what}: memif link not up in 15 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run_until(
    eps: &mut [&mut Endpoint<DpdkTransport>],
    limit: Duration,
    mut done: impl FnMut() -> bool,
) -> bool {
    poll_until(eps, limit, &mut done, &mut || 0, Duration::from_micros(200))
}

/// A reply: handler, arguments, payload.
type Reply = (u16, Vec<u64>, Vec<u8>);

#[test]
fn two_processes_over_memif() {
    let dir = TempDir(std::env::temp_dir().join(format!("am-dpdk-memif-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let t0 = Instant::now();
    suite_through_a_switch_process(&dir.0);
    eprintln!("suite through the switch process: {:?}", t0.elapsed());
    let t1 = Instant::now();
    server_process(&dir.0);
    eprintln!("server process: {:?}", t1.elapsed());
}

/// The memif sockets' folder, removed however the test ends.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn suite_through_a_switch_process(dir: &std::path::Path) {
    let sock = dir.join("switch.sock");
    let queues = 12;
    let sw = start_peer(&[
        "switch",
        "--dev",
        &format!("net_memif0,role=server,socket={}", sock.display()),
        "--queues",
        &queues.to_string(),
        "--seconds",
        "300",
    ]);
    assert_eq!(sw.first, "ready");
    let port = Port::open(
        &format!("net_memif0,role=client,socket={}", sock.display()),
        &PortSpec {
            queues,
            mbufs: 2047,
            ..PortSpec::default()
        },
    )
    .unwrap();
    wait_link(|| port.link_up(), "switch");
    assert_eq!(port.info().driver, "net_memif");
    let mut h = DpdkHarness::new(Fabric::Queues(port));
    h.bulk = 64 << 20;
    h.config.segment_bytes = (128 << 20) + (1 << 20);
    run_suite(&mut h).unwrap();
    let s = h.total_stats();
    assert!(
        s.bytes_sent >= 64 << 20,
        "the 64 MiB bulk crossed: {} bytes",
        s.bytes_sent
    );
    let d = h.driver_stats();
    assert!(
        d.arp_requests > 0 && d.arp_learned > 0,
        "ARP ran over memif: {d:?}"
    );
}

fn server_process(dir: &std::path::Path) {
    let sock = dir.join("server.sock");
    let server_dev = format!("net_memif1,role=server,socket={}", sock.display());
    let start_server = || {
        start_peer(&[
            "server",
            "--dev",
            &server_dev,
            "--bind",
            "10.1.0.1:7000",
            "--log-handled",
            "--seconds",
            "300",
        ])
    };
    let server = start_server();
    let addr: SocketAddr = server.addr();
    let t = DpdkTransport::open(
        &format!("net_memif1,role=client,socket={}", sock.display()),
        DpdkConfig::new("10.1.0.2:7000".parse().unwrap()),
    )
    .unwrap();
    let port = t.port_info().clone();
    assert_eq!(port.driver, "net_memif");
    let mut a = Endpoint::new(
        t,
        Config {
            tag: Tag(1),
            segment_bytes: (64 << 20) + (1 << 20),
            ..Config::default()
        },
    );
    a.map(0, EndpointName { addr, vnet: 0 }, Tag(7)).unwrap();
    let replies: Arc<Mutex<Vec<Reply>>> = Arc::default();
    for hix in [1u16, 3] {
        let r = replies.clone();
        a.register(hix, move |_, m| {
            r.lock()
                .unwrap()
                .push((hix, m.args.to_vec(), m.payload.to_vec()))
        })
        .unwrap();
    }
    let ups: Arc<Mutex<Vec<(Undeliverable, Instant)>>> = Arc::default();
    let u = ups.clone();
    a.set_upcall(move |_, x| u.lock().unwrap().push((x, Instant::now())));

    // Small, medium and a 64 MiB bulk, each answered and checked.
    a.request(0, Msg::small(1, &[1, 2, 3])).unwrap();
    let medium = random_bytes(7, 6000);
    a.request(0, Msg::medium(1, &[4], &[&medium[..1000], &medium[1000..]]))
        .unwrap();
    let bulk = random_bytes(9, 64 << 20);
    a.segment_mut()[..bulk.len()].copy_from_slice(&bulk);
    a.request(0, Msg::bulk(3, &[], &[(0, bulk.len())], 0))
        .unwrap();
    let r = replies.clone();
    assert!(
        run_until(&mut [&mut a], Duration::from_secs(60), || r
            .lock()
            .unwrap()
            .len()
            >= 3),
        "replies: {:?}",
        replies
            .lock()
            .unwrap()
            .iter()
            .map(|x| x.0)
            .collect::<Vec<_>>()
    );
    let got = replies.lock().unwrap().clone();
    assert_eq!(got[0], (1, vec![1, 2, 3], vec![]));
    assert_eq!(got[1], (1, vec![4], medium));
    assert_eq!(
        got[2],
        (3, vec![bulk.len() as u64, fnv(&bulk)], vec![]),
        "64 MiB bulk"
    );

    // A stream cut by kill -9: each message handled once or returned, within the bound.
    let mut seq = 0u64;
    for _ in 0..20 {
        for _ in 0..25 {
            a.send(0, Msg::small(2, &[seq])).unwrap();
            seq += 1;
        }
        run_until(&mut [&mut a], Duration::from_millis(5), || false);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !a.is_idle() {
        assert!(Instant::now() < deadline, "stream did not drain");
        run_until(&mut [&mut a], Duration::from_millis(1), || false);
    }
    std::thread::sleep(Duration::from_millis(50));
    server.signal("-STOP");
    for _ in 0..100 {
        a.send(0, Msg::small(2, &[seq])).unwrap();
        seq += 1;
    }
    run_until(&mut [&mut a], Duration::from_millis(20), || false);
    server.signal("-KILL");
    let killed_at = Instant::now();
    let total = seq;
    let ok = run_until(&mut [&mut a], Duration::from_secs(6), || {
        server.handled.lock().unwrap().len() as u64 + ups.lock().unwrap().len() as u64 >= total
    });
    let handled: Vec<u64> = server.handled.lock().unwrap().clone();
    let returned = ups.lock().unwrap().clone();
    assert!(
        ok,
        "handled {} + returned {} of {total}",
        handled.len(),
        returned.len()
    );
    let (handled_n, returned_n) = check_cut_stream(
        &handled,
        &returned,
        total,
        killed_at,
        Duration::from_millis(3500),
    );
    assert!(returned_n >= 100, "the burst in flight was not returned");
    assert!(
        handled_n >= 500,
        "the stream before the stop was not handled"
    );
    drop(server);

    // A restarted server on the same device and address is reached again.
    let server2 = start_server();
    let start = Instant::now();
    a.send(0, Msg::small(2, &[9999])).unwrap();
    let ok = run_until(&mut [&mut a], Duration::from_secs(10), || {
        server2.handled.lock().unwrap().contains(&9999)
    });
    assert!(ok, "restarted peer not reached ({:?})", start.elapsed());
    eprintln!("restarted server reached in {:?}", start.elapsed());
}
