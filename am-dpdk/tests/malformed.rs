//! Malformed and foreign frames fed to an endpoint's receive path (put into its ring
//! port's Rx ring, as if from the wire) are counted by reason and dropped: none reaches a
//! handler, nothing panics, and the endpoint goes on working. One test per process.

use am_core::{Msg, Tag};
use am_dpdk::frame::{self, Bad, UdpAddrs};
use am_dpdk::mac_for;
use am_testkit::conformance::{random_bytes, Harness};
use am_testkit::dpdk::DpdkHarness;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn v4(a: SocketAddr) -> SocketAddrV4 {
    match a {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => panic!("IPv4 expected"),
    }
}

fn udp(src: SocketAddrV4, dst: SocketAddrV4, dst_mac: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; frame::HEADERS + payload.len() + frame::MIN_FRAME];
    let a = UdpAddrs {
        src_mac: mac_for(*src.ip()),
        dst_mac,
        src,
        dst,
    };
    let n = frame::write_udp(&mut b, &a, 1, payload, true, true).unwrap();
    b.truncate(n);
    b
}

/// Rewrites the IPv4 header checksum after an edit.
fn fix_ip(f: &mut [u8]) {
    let h = frame::ETH_LEN;
    f[h + 10] = 0;
    f[h + 11] = 0;
    let c = frame::ipv4_checksum(&f[h..h + frame::IPV4_LEN]);
    f[h + 10..h + 12].copy_from_slice(&c.to_be_bytes());
}

/// Rewrites the UDP checksum after an edit of the payload.
fn fix_udp(f: &mut [u8]) {
    let u = frame::ETH_LEN + frame::IPV4_LEN;
    let len = u16::from_be_bytes([f[u + 4], f[u + 5]]) as usize;
    f[u + 6] = 0;
    f[u + 7] = 0;
    let src = Ipv4Addr::new(f[26], f[27], f[28], f[29]);
    let dst = Ipv4Addr::new(f[30], f[31], f[32], f[33]);
    let c = match frame::udp_checksum(src, dst, &f[u..u + len]) {
        0 => 0xffff,
        c => c,
    };
    f[u + 6..u + 8].copy_from_slice(&c.to_be_bytes());
}

#[test]
fn malformed_and_foreign_frames_are_counted_and_dropped() {
    let mut h = DpdkHarness::rings();
    let mut ca = h.base_config();
    ca.tag = Tag(0xa);
    let mut cb = h.base_config();
    cb.tag = Tag(0xb);
    let mut a = h.endpoint(ca);
    let mut b = h.endpoint(cb);
    let (na, ta, nb, tb) = (a.name(), a.tag(), b.name(), b.tag());
    a.map(0, nb, tb).unwrap();
    b.map(0, na, ta).unwrap();
    let handled = Arc::new(AtomicUsize::new(0));
    let hc = handled.clone();
    b.register(1, move |_, _| {
        hc.fetch_add(1, Ordering::SeqCst);
    })
    .unwrap();

    // One real message, its frames captured by the switch.
    h.switch().unwrap().tap = Some(Vec::new());
    a.send(0, Msg::medium(1, &[42], &[&[7u8; 300]])).unwrap();
    let hc = handled.clone();
    assert!(
        h.run(&mut [&mut a, &mut b], Duration::from_secs(5), &mut || {
            hc.load(Ordering::SeqCst) == 1
        })
    );
    h.run(
        &mut [&mut a, &mut b],
        Duration::from_millis(100),
        &mut || false,
    );
    let captured = h.switch().unwrap().tap.take().unwrap();
    let (sa, sb) = (v4(na.addr), v4(nb.addr));
    let mac_b = mac_for(*sb.ip());
    let data: Vec<Vec<u8>> = captured
        .iter()
        .filter(|f| f.len() > 300 && f[..6] == mac_b)
        .cloned()
        .collect();
    assert!(!data.is_empty(), "the message's data frame was captured");

    let good = udp(sa, sb, mac_b, &[1, 2, 3, 4]);
    let mut frames: Vec<(Vec<u8>, &str)> = Vec::new();
    frames.push((good[..10].to_vec(), "runt"));
    frames.push((good[..20].to_vec(), "runt ip"));
    let mut x = good.clone();
    x[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    frames.push((x, "ipv6"));
    let mut x = good.clone();
    x[12..14].copy_from_slice(&0x8100u16.to_be_bytes());
    frames.push((x, "vlan"));
    let mut x = good.clone();
    x[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    frames.push((x, "bad arp"));
    let mut x = good.clone();
    x[14] = 0x65;
    frames.push((x, "ip version 6"));
    let mut x = good.clone();
    x[14] = 0x43;
    frames.push((x, "ihl 3"));
    let mut x = good.clone();
    x[24] ^= 0x55;
    frames.push((x, "ip checksum"));
    let mut x = good.clone();
    x[23] = 6;
    fix_ip(&mut x);
    frames.push((x, "tcp"));
    let mut x = good.clone();
    x[20] = 0x20;
    fix_ip(&mut x);
    frames.push((x, "fragment"));
    let mut x = good.clone();
    x[16..18].copy_from_slice(&1400u16.to_be_bytes());
    fix_ip(&mut x);
    frames.push((x, "ip length past the frame"));
    let mut x = good.clone();
    x[38..40].copy_from_slice(&900u16.to_be_bytes());
    frames.push((x, "udp length past the frame"));
    let mut x = data[0].clone();
    x[frame::HEADERS + 20] ^= 0x10;
    frames.push((x, "udp checksum"));
    let other_port = SocketAddrV4::new(*sb.ip(), sb.port() + 1);
    frames.push((
        udp(sa, other_port, mac_b, &data[0][frame::HEADERS..]),
        "wrong port",
    ));
    let other_ip = SocketAddrV4::new(Ipv4Addr::new(10, 9, 9, 9), sb.port());
    frames.push((
        udp(sa, other_ip, mac_b, &data[0][frame::HEADERS..]),
        "other ip",
    ));
    let mut x = data[0].clone();
    x[..6].copy_from_slice(&[2, 9, 9, 9, 9, 9]);
    frames.push((x, "other mac"));
    // Datagrams that pass every frame check but are not the engine's: garbage, cut short,
    // a changed header byte (checksums fixed), a forged tag-ish change, a replay.
    frames.push((
        udp(sa, sb, mac_b, &random_bytes(5, 200)),
        "garbage datagram",
    ));
    frames.push((
        udp(sa, sb, mac_b, &data[0][frame::HEADERS..frame::HEADERS + 9]),
        "short datagram",
    ));
    for i in 0..40 {
        let mut x = data[0].clone();
        let at = frame::HEADERS + (i * 7) % 64;
        x[at] ^= 1 << (i % 8);
        fix_udp(&mut x);
        frames.push((x, "edited datagram"));
    }
    frames.push((data[0].clone(), "replay"));
    // And random bytes of every length.
    for i in 0..500u64 {
        let len = (i as usize * 37) % 1600;
        let mut x = random_bytes(1000 + i, len);
        if i % 3 == 0 && len >= 14 {
            // Make some look like IPv4 to us so the deeper checks run.
            x[..6].copy_from_slice(&mac_b);
            x[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        }
        frames.push((x, "random"));
    }
    let n = frames.len();
    let before = b.transport().stats().clone();
    let eng_before = b.stats().clone();
    let raw: Vec<Vec<u8>> = frames.iter().map(|f| f.0.clone()).collect();
    for chunk in raw.chunks(200) {
        assert_eq!(h.inject(SocketAddr::V4(sb), chunk), chunk.len());
        h.run(
            &mut [&mut a, &mut b],
            Duration::from_millis(50),
            &mut || false,
        );
    }
    h.run(
        &mut [&mut a, &mut b],
        Duration::from_millis(300),
        &mut || false,
    );
    let s = b.transport().stats().clone();
    let e = b.stats().clone();
    eprintln!("driver: {s:?}\nengine: {e:?}");
    assert_eq!(
        handled.load(Ordering::SeqCst),
        1,
        "no injected frame reached a handler"
    );
    assert!(s.rx_frames - before.rx_frames >= n as u64);
    for bad in [
        Bad::Runt,
        Bad::Foreign,
        Bad::BadArp,
        Bad::BadIpHeader,
        Bad::BadIpChecksum,
        Bad::NotUdp,
        Bad::Fragment,
        Bad::Truncated,
        Bad::BadUdpChecksum,
    ] {
        let c = s.bad.get(&bad).copied().unwrap_or(0) - before.bad.get(&bad).copied().unwrap_or(0);
        assert!(c > 0, "{bad:?} counted");
    }
    assert!(s.wrong_port > before.wrong_port);
    assert!(s.not_our_address > before.not_our_address);
    assert!(s.not_our_mac > before.not_our_mac);
    let engine_drops = (e.malformed_dropped
        + e.duplicates_dropped
        + e.bad_tag_dropped
        + e.stale_dropped
        + e.window_dropped)
        - (eng_before.malformed_dropped
            + eng_before.duplicates_dropped
            + eng_before.bad_tag_dropped
            + eng_before.stale_dropped
            + eng_before.window_dropped);
    assert!(
        engine_drops > 0,
        "the engine dropped the datagrams that passed the frame checks"
    );
    assert!(e.malformed_dropped > eng_before.malformed_dropped);

    // Still working: the next message arrives, once.
    a.send(0, Msg::small(1, &[1])).unwrap();
    let hc = handled.clone();
    assert!(
        h.run(&mut [&mut a, &mut b], Duration::from_secs(5), &mut || {
            hc.load(Ordering::SeqCst) == 2
        })
    );
    h.run(
        &mut [&mut a, &mut b],
        Duration::from_millis(200),
        &mut || false,
    );
    assert_eq!(handled.load(Ordering::SeqCst), 2);
}
