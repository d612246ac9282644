//! The conformance suite over real UDP: IPv4 and IPv6 loopback, and two network namespaces
//! joined by a veth pair with an nft rule dropping 5% of the datagrams.

use am_testkit::conformance::run_suite;
use am_testkit::shell::{need, nft_drop_udp, nft_dropped, sh};
use am_testkit::udp::{Site, UdpHarness};
use std::process::Command;

#[test]
fn suite_over_ipv4_loopback() {
    let mut h = UdpHarness::loopback();
    run_suite(&mut h).unwrap();
    assert!(h.total_stats().messages_handled > 0);
}

#[test]
fn suite_over_ipv4_loopback_without_gso() {
    // The datagram-by-datagram path (used where a path refuses UDP segmentation offload).
    let mut h = UdpHarness::loopback();
    h.udp.gso = false;
    run_suite(&mut h).unwrap();
}

#[test]
fn suite_over_ipv4_loopback_with_gro() {
    // Receives coalesced by UDP_GRO are split back into datagrams by the driver.
    let mut h = UdpHarness::loopback();
    h.udp.gro = true;
    run_suite(&mut h).unwrap();
}

#[test]
fn suite_over_ipv6_loopback() {
    let mut h = UdpHarness::new(vec![Site::Local("::1".parse().unwrap())]);
    run_suite(&mut h).unwrap();
}

/// Two namespaces joined by a veth pair; removed on drop.
struct Namespaces {
    a: String,
    b: String,
}

impl Namespaces {
    fn create(loss_percent: u32) -> Namespaces {
        need("ip", "iproute2");
        need("nft", "nftables");
        let id = std::process::id() % 100_000;
        let ns = Namespaces {
            a: format!("amt{id}a"),
            b: format!("amt{id}b"),
        };
        let (a, b) = (&ns.a, &ns.b);
        let steps = [
            format!("ip netns add {a}"),
            format!("ip netns add {b}"),
            format!("ip link add v{id}a netns {a} type veth peer name v{id}b netns {b}"),
            format!("ip -n {a} addr add 10.77.0.1/24 dev v{id}a"),
            format!("ip -n {b} addr add 10.77.0.2/24 dev v{id}b"),
            format!("ip -n {a} link set v{id}a mtu 1500 up"),
            format!("ip -n {b} link set v{id}b mtu 1500 up"),
            format!("ip -n {a} link set lo up"),
            format!("ip -n {b} link set lo up"),
        ];
        for s in &steps {
            sh(s).unwrap_or_else(|e| panic!("{e} (network namespaces need root)"));
        }
        for n in [a, b] {
            nft_drop_udp(n, "amtest", loss_percent, &["input"]).unwrap();
        }
        ns
    }

    fn dropped(&self, ns: &str) -> u64 {
        nft_dropped(ns, "amtest")
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let _ = sh(&format!("ip netns del {}", self.a));
        let _ = sh(&format!("ip netns del {}", self.b));
    }
}

#[test]
fn suite_between_two_namespaces_with_five_percent_loss() {
    let ns = Namespaces::create(
        std::env::var("AM_NETNS_LOSS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5),
    );
    let mut h = UdpHarness::new(vec![
        Site::Netns {
            name: ns.a.clone(),
            ip: "10.77.0.1".parse().unwrap(),
        },
        Site::Netns {
            name: ns.b.clone(),
            ip: "10.77.0.2".parse().unwrap(),
        },
    ]);
    h.bulk = 512 << 10;
    let result = run_suite(&mut h);
    let dropped = ns.dropped(&ns.a) + ns.dropped(&ns.b);
    let stats = h.total_stats();
    let (a, b) = (ns.a.clone(), ns.b.clone());
    drop(ns);
    result.unwrap();
    assert!(dropped > 0, "nft dropped nothing");
    assert!(
        stats.retransmits > 0,
        "no retransmissions despite {dropped} drops"
    );
    for n in [a, b] {
        let listed = Command::new("ip").args(["netns", "list"]).output().unwrap();
        assert!(
            !String::from_utf8_lossy(&listed.stdout).contains(&n),
            "namespace {n} left behind"
        );
    }
}
