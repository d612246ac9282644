//! Interoperability with the kernel: an `am-dpdk` endpoint on `net_af_packet` at one end
//! of a veth pair, an `am-udp` endpoint on a kernel socket in a network namespace at the
//! other. Neither knows the other's MAC: ARP both ways (the kernel asks, our transport
//! answers; we ask, the kernel answers). An `nft` rule in the namespace drops 5% of the
//! UDP datagrams on the kernel side; small, medium and bulk messages go both ways, exactly
//! once and in order, with retransmissions. One test per process: EAL starts once.
//!
//! Needs root, `ip` (iproute2), `nft` (nftables) and `ethtool`: the test fails naming the
//! package when one is missing.

use am_core::{Config, Endpoint, Msg, Tag, Transport};
use am_dpdk::{DpdkConfig, DpdkTransport};
use am_testkit::conformance::random_bytes;
use am_testkit::shell::{need, nft_drop_udp, nft_dropped, sh};
use am_testkit::udp::bind_in_netns;
use am_udp::{UdpConfig, UdpTransport};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A namespace holding one end of a veth pair; the other end stays here for DPDK.
struct Veth {
    ns: String,
    here: String,
}

impl Veth {
    fn create(loss: u32) -> Veth {
        need("ip", "iproute2");
        need("nft", "nftables");
        need("ethtool", "ethtool");
        let id = std::process::id() % 100_000;
        let v = Veth {
            ns: format!("amdp{id}"),
            here: format!("vdp{id}a"),
        };
        let (ns, a, b) = (&v.ns, &v.here, format!("vdp{id}b"));
        let steps = [
            format!("ip netns add {ns}"),
            format!("ip link add {a} type veth peer name {b} netns {ns}"),
            format!("sysctl -qw net.ipv6.conf.{a}.disable_ipv6=1"),
            format!("ip link set {a} mtu 1500 up"),
            format!("ip -n {ns} addr add 10.78.0.2/24 dev {b}"),
            format!("ip -n {ns} link set {b} mtu 1500 up"),
            format!("ip -n {ns} link set lo up"),
            // The kernel leaves UDP checksums to the device on veth and may pass a GSO
            // super-packet whole; a packet socket at the other end would see both. A
            // real NIC does this work on the wire: here the kernel must.
            format!("ip netns exec {ns} ethtool -K {b} tx off gso off tso off"),
            format!("ethtool -K {a} rx off tx off gro off"),
        ];
        for s in &steps {
            sh(s).unwrap_or_else(|e| panic!("{e} (network namespaces need root)"));
        }
        nft_drop_udp(ns, "amdpdk", loss, &["input", "output"]).unwrap();
        v
    }

    fn dropped(&self) -> u64 {
        nft_dropped(&self.ns, "amdpdk")
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = sh(&format!("ip link del {}", self.here));
        let _ = sh(&format!("ip netns del {}", self.ns));
    }
}

type Seen = Arc<Mutex<Vec<(u16, Vec<u64>, Vec<u8>)>>>;

fn record<T: Transport>(ep: &mut Endpoint<T>) -> Seen {
    let seen: Seen = Arc::default();
    for h in [1u16, 2, 3] {
        let s = seen.clone();
        ep.register(h, move |ctx, m| {
            let payload = match m.bulk {
                Some((off, len)) => ctx.segment()[off as usize..off as usize + len].to_vec(),
                None => m.payload.to_vec(),
            };
            s.lock().unwrap().push((h, m.args.to_vec(), payload));
        })
        .unwrap();
    }
    seen
}

/// Message `i` of the stream: small (even) or medium (odd); false when the queue is full.
fn send_one<T: Transport>(ep: &mut Endpoint<T>, i: u64) -> bool {
    let r = if i.is_multiple_of(2) {
        ep.send(0, Msg::small(1, &[i, i * 3]))
    } else {
        let payload = random_bytes(i, 100 + (i as usize * 37) % 3000);
        ep.send(0, Msg::medium(2, &[i], &[&payload]))
    };
    r.is_ok()
}

#[test]
fn dpdk_and_kernel_udp_talk_through_a_lossy_veth() {
    let veth = Veth::create(
        std::env::var("AM_NETNS_LOSS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5),
    );
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| exchange(&veth)));
    let dropped = veth.dropped();
    drop(veth);
    let (retransmits, frames) = result.unwrap_or_else(|e| std::panic::resume_unwind(e));
    assert!(dropped > 0, "nft dropped nothing");
    assert!(
        retransmits > 0,
        "no retransmissions despite {dropped} drops"
    );
    eprintln!("nft dropped {dropped}, retransmissions {retransmits}, dpdk frames {frames}");
}

fn exchange(veth: &Veth) -> (u64, u64) {
    let cfg = |tag| Config {
        tag: Tag(tag),
        segment_bytes: 16 << 20,
        ..Config::default()
    };
    let t = DpdkTransport::open(
        &format!("net_af_packet0,iface={}", veth.here),
        DpdkConfig::new("10.78.0.1:7000".parse().unwrap()),
    )
    .unwrap();
    assert_eq!(t.port_info().driver, "net_af_packet");
    assert_eq!(
        t.wait_mode(),
        "spin-then-sleep",
        "af_packet has no Rx interrupts"
    );
    let mut d = Endpoint::new(t, cfg(0xd));
    let sock = bind_in_netns(&veth.ns, "10.78.0.2:7001".parse().unwrap()).unwrap();
    let mut k = Endpoint::new(
        UdpTransport::from_socket(sock, UdpConfig::default()).unwrap(),
        cfg(0xe),
    );
    d.map(0, k.name(), k.tag()).unwrap();
    k.map(0, d.name(), d.tag()).unwrap();
    let at_d = record(&mut d);
    let at_k = record(&mut k);

    // The kernel speaks first: it asks for our MAC by ARP and our transport answers
    // (learning the kernel's MAC from the request).
    assert!(send_one(&mut k, 0));
    let t0 = Instant::now();
    while d.transport().stats().arp_replies == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "no ARP request from the kernel answered"
        );
        k.poll(256).unwrap();
        d.poll(256).unwrap();
        d.wait(Some(Duration::from_micros(200))).unwrap();
    }

    // Both ways: a stream of smalls and mediums (sequence numbers in the first argument),
    // and a 4 MiB bulk; sent in rounds so the send queues never refuse.
    let n = 600u64;
    let bulk_d = random_bytes(11, 4 << 20);
    let bulk_k = random_bytes(12, 4 << 20);
    d.segment_mut()[..bulk_d.len()].copy_from_slice(&bulk_d);
    k.segment_mut()[..bulk_k.len()].copy_from_slice(&bulk_k);
    d.send(0, Msg::bulk(3, &[0], &[(0, bulk_d.len())], 8 << 20))
        .unwrap();
    k.send(0, Msg::bulk(3, &[0], &[(0, bulk_k.len())], 8 << 20))
        .unwrap();
    let (mut sent_d, mut sent_k) = (0u64, 1u64);
    let deadline = Instant::now() + Duration::from_secs(60);
    let full = |s: &Seen| s.lock().unwrap().len() as u64 > n;
    while !(full(&at_d) && full(&at_k)) {
        assert!(
            Instant::now() < deadline,
            "not all arrived: at dpdk {}, at kernel {} of {}",
            at_d.lock().unwrap().len(),
            at_k.lock().unwrap().len(),
            n + 1
        );
        while sent_d < n && send_one(&mut d, sent_d) {
            sent_d += 1;
        }
        while sent_k < n && send_one(&mut k, sent_k) {
            sent_k += 1;
        }
        let work = d.poll(256).unwrap() + k.poll(256).unwrap();
        if work == 0 {
            d.wait(Some(Duration::from_micros(100))).unwrap();
            if k.poll(256).unwrap() == 0 {
                k.wait(Some(Duration::from_micros(100))).unwrap();
            }
        }
    }
    for (name, seen, bulk) in [("dpdk", &at_d, &bulk_k), ("kernel", &at_k, &bulk_d)] {
        let v = seen.lock().unwrap().clone();
        let stream: Vec<&(u16, Vec<u64>, Vec<u8>)> = v.iter().filter(|x| x.0 != 3).collect();
        let seqs: Vec<u64> = stream.iter().map(|x| x.1[0]).collect();
        assert_eq!(
            seqs,
            (0..n).collect::<Vec<_>>(),
            "at {name}: exactly once, in order"
        );
        for x in &stream {
            let i = x.1[0];
            if i.is_multiple_of(2) {
                assert_eq!(x.1, vec![i, i * 3], "small {i} at {name}");
            } else {
                assert_eq!(
                    x.2,
                    random_bytes(i, 100 + (i as usize * 37) % 3000),
                    "medium {i} at {name}"
                );
            }
        }
        let bulks: Vec<_> = v.iter().filter(|x| x.0 == 3).collect();
        assert_eq!(bulks.len(), 1, "one bulk at {name}");
        assert!(bulks[0].2 == *bulk, "bulk at {name} byte-exact");
    }
    let ds = d.transport().stats().clone();
    eprintln!("dpdk driver: {ds:?}");
    assert!(
        ds.arp_replies > 0,
        "the kernel asked for our MAC and got it"
    );
    assert!(ds.arp_learned > 0, "we learned the kernel's MAC by ARP");
    // The kernel's IPv6 chatter (router and neighbour solicitations) is foreign; every
    // other frame parsed: no checksum, length or header complaint.
    assert!(
        ds.bad.keys().all(|b| *b == am_dpdk::frame::Bad::Foreign),
        "kernel frames parsed: {ds:?}"
    );
    (d.stats().retransmits + k.stats().retransmits, ds.rx_frames)
}
