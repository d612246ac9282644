//! `wait` on Rx interrupts: an `am-dpdk` endpoint on `net_tap` (a port with Rx interrupts)
//! answers an `am-udp` endpoint on the tap's kernel side; between messages it sleeps on
//! the queue's interrupt (counted), and an idle `wait` costs next to no CPU. One test per
//! process: EAL starts once. Needs root and `ip` (iproute2).

use am_core::{Config, Endpoint, Msg, Tag};
use am_dpdk::{DpdkConfig, DpdkTransport};
use am_testkit::shell::sh;
use am_udp::{UdpConfig, UdpTransport};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Runs `cmd`, failing the test with what it said (root and iproute2 are needed).
fn run(cmd: &str) {
    if let Err(e) = sh(cmd) {
        panic!("{e} (needs root and iproute2: apt-get install -y iproute2)");
    }
}

fn cpu_time() -> Duration {
    // SAFETY: getrusage fills a plain struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointer.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    let t = |v: libc::timeval| Duration::new(v.tv_sec as u64, v.tv_usec as u32 * 1000);
    t(ru.ru_utime) + t(ru.ru_stime)
}

struct Tap(String);

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).output();
    }
}

#[test]
fn wait_sleeps_on_rx_interrupts() {
    let id = std::process::id() % 100_000;
    let iface = format!("amtap{id}");
    let tap = Tap(iface.clone());
    let t = DpdkTransport::open(
        &format!("net_tap0,iface={iface}"),
        DpdkConfig::new("10.79.0.1:7000".parse().unwrap()),
    )
    .unwrap();
    assert_eq!(t.port_info().driver, "net_tap");
    assert!(t.port_info().rx_interrupts, "net_tap offers Rx interrupts");
    assert_eq!(t.wait_mode(), "rx-interrupts");
    let _ = Command::new("sysctl")
        .args(["-qw", &format!("net.ipv6.conf.{iface}.disable_ipv6=1")])
        .output();
    run(&format!(
        "ip addr add 10.79.0.2/24 dev {iface} && ip link set {iface} up"
    ));

    let mut d = Endpoint::new(
        t,
        Config {
            tag: Tag(0xd),
            ..Config::default()
        },
    );
    let k_sock = std::net::UdpSocket::bind("10.79.0.2:7001").unwrap();
    let mut k = Endpoint::new(
        UdpTransport::from_socket(k_sock, UdpConfig::default()).unwrap(),
        Config {
            tag: Tag(0xe),
            ..Config::default()
        },
    );
    d.map(0, k.name(), k.tag()).unwrap();
    k.map(0, d.name(), d.tag()).unwrap();
    // The DPDK side echoes requests; the kernel side counts replies.
    d.register(1, |ctx, mut m| {
        if let Some(t) = m.token.take() {
            let _ = ctx.reply(t, Msg::small(2, m.args));
        }
    })
    .unwrap();
    let replies = Arc::new(AtomicU64::new(0));
    let r = replies.clone();
    k.register(2, move |_, _| {
        r.fetch_add(1, Ordering::SeqCst);
    })
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let n = 200u64;
    // The kernel side in a thread of its own: one request at a time, spaced out so the
    // DPDK side goes to sleep between them.
    let kt = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut sent = 0;
        while !st.load(Ordering::SeqCst) && Instant::now() < deadline {
            if sent == replies.load(Ordering::SeqCst) && sent < n {
                k.request(0, Msg::small(1, &[sent])).unwrap();
                sent += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            k.poll(256).unwrap();
            k.wait(Some(Duration::from_millis(1))).unwrap();
        }
        replies.load(Ordering::SeqCst)
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !kt.is_finished() && Instant::now() < deadline {
        d.poll(256).unwrap();
        d.wait(Some(Duration::from_millis(100))).unwrap();
        if d.stats().messages_handled >= n {
            break;
        }
    }
    // Keep answering until the last reply is acknowledged.
    let until = Instant::now() + Duration::from_millis(300);
    while Instant::now() < until {
        d.poll(256).unwrap();
        d.wait(Some(Duration::from_millis(20))).unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let got = kt.join().unwrap();
    let s = d.transport().stats().clone();
    eprintln!("driver: {s:?}");
    assert_eq!(got, n, "every request answered");
    assert!(s.interrupts > 0, "woken by Rx interrupts: {s:?}");

    // Idle: a 300 ms wait sleeps (on the interrupt), it does not spin.
    let c0 = cpu_time();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(300) {
        d.poll(256).unwrap();
        d.wait(Some(
            Duration::from_millis(300) - t0.elapsed().min(Duration::from_millis(300)),
        ))
        .unwrap();
    }
    let used = cpu_time() - c0;
    assert!(
        used < Duration::from_millis(60),
        "an idle wait used {used:?} of CPU in 300 ms"
    );
    drop(d);
    drop(tap);
}
