//! Unit tests of the driver that need no device (framing, the side channel, cursors).

use super::*;

#[test]
fn connection_datagrams_round_trip_and_garbage_is_refused() {
    let m = oob::Msg {
        kind: oob::REQ,
        qpn: 0x12_3456,
        psn: 0xab_cdef,
        lid: 7,
        gid: verbs::gid_of("10.99.0.1".parse().unwrap()),
        nonce: 0xdead_beef_0123_4567,
        echo: 42,
    };
    let b = m.encode();
    assert_eq!(oob::Msg::decode(&b), Some(m));
    // Truncated, lengthened, wrong magic, wrong version, unknown kind: all refused.
    assert_eq!(oob::Msg::decode(&b[..oob::LEN - 1]), None);
    let mut long = b.to_vec();
    long.push(0);
    assert_eq!(oob::Msg::decode(&long), None);
    for (i, v) in [(0usize, 0u8), (4, 9), (5, 0), (5, 4)] {
        let mut bad = b;
        bad[i] = v;
        assert_eq!(oob::Msg::decode(&bad), None, "byte {i} = {v} accepted");
    }
    // Random garbage of every length never decodes to a message with a bad kind.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for n in 0..200 {
        let g: Vec<u8> = (0..n % 64)
            .map(|_| {
                x = mix(x);
                x as u8
            })
            .collect();
        if let Some(m) = oob::Msg::decode(&g) {
            assert!((oob::REQ..=oob::PROBE).contains(&m.kind));
        }
    }
}

/// A bulk's ranges cut into chunks: every byte once, in order, at the right remote
/// address, no chunk over the byte or scatter-entry limit, the last one flagged.
#[test]
fn a_bulk_is_cut_into_bounded_chunks_covering_every_byte_once() {
    let cases: Vec<(Vec<(usize, usize)>, usize)> = vec![
        (vec![(0, 64 << 20)], 1 << 20),
        (vec![(0, 32 << 20), ((32 << 20) + 4096, 32 << 20)], 1 << 20),
        (vec![(0, 10), (100, 0), (200, 7), (300, 25)], 8),
        (vec![(5, 3)], 1 << 20),
        ((0..40).map(|i| (i * 100, 3)).collect(), 1000),
    ];
    for (src, chunk) in cases {
        let total: usize = src.iter().map(|r| r.1).sum();
        let mut cur = BulkCursor::new(&src, 9, 1 << 40);
        let mut placed = Vec::new();
        let mut next_raddr = 1u64 << 40;
        let mut chunks = 0;
        loop {
            let (sges, raddr, last) = cur.next_chunk(chunk);
            chunks += 1;
            assert_eq!(
                raddr, next_raddr,
                "{src:?}: chunk {chunks} lands at the wrong place"
            );
            let len: usize = sges.iter().map(|r| r.1).sum();
            assert!(len > 0 && len <= chunk, "{src:?}: chunk of {len} bytes");
            assert!(sges.len() <= verbs::MAX_SGE);
            next_raddr += len as u64;
            for (off, n) in sges {
                placed.extend(off..off + n);
            }
            if last {
                break;
            }
            assert!(chunks < 100_000);
        }
        let want: Vec<usize> = src.iter().flat_map(|&(o, n)| o..o + n).collect();
        assert_eq!(placed, want, "{src:?}");
        assert_eq!(next_raddr - (1 << 40), total as u64);
        assert!(cur.done());
        if src == vec![(0, 64 << 20)] {
            assert_eq!(chunks, 64);
        }
    }
}

#[test]
fn the_gid_of_an_ipv4_address_is_v4_mapped() {
    let g = verbs::gid_of("10.99.0.1".parse().unwrap());
    assert_eq!(
        std::net::Ipv6Addr::from(g),
        "::ffff:10.99.0.1".parse::<std::net::Ipv6Addr>().unwrap()
    );
    let v6: std::net::Ipv6Addr = "fe80::1".parse().unwrap();
    assert_eq!(verbs::gid_of(v6.into()), v6.octets());
}

#[test]
fn the_fast_clock_is_monotonic_and_tracks_real_time() {
    let c = am_os::tsc::TscClock::new();
    let t0 = c.now_ns();
    let mut last = t0;
    for _ in 0..100_000 {
        let t = c.now_ns();
        assert!(t >= last, "clock went back: {t} < {last}");
        last = t;
    }
    let wall = std::time::Instant::now();
    std::thread::sleep(Duration::from_millis(50));
    let dt = c.now_ns() - t0;
    let real = wall.elapsed().as_nanos() as u64;
    assert!(dt >= 45_000_000, "clock advanced {dt} ns over >= 50 ms");
    assert!(
        dt <= real + 200_000_000,
        "clock ran fast: {dt} ns vs {real} ns"
    );
}

#[test]
fn binding_without_a_device_names_the_fix() {
    if !verbs::device_names().is_empty() {
        return;
    }
    let e = RdmaTransport::bind("127.0.0.1:0".parse().unwrap(), RdmaConfig::default())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("RDMA") && (e.contains("rdma-core") || e.contains("not found")),
        "{e}"
    );
}

#[test]
fn a_receive_depth_without_room_for_a_window_is_refused() {
    let cfg = RdmaConfig {
        recv_depth: 16,
        ..RdmaConfig::default()
    };
    let e = RdmaTransport::bind("127.0.0.1:0".parse().unwrap(), cfg)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("recv_depth 16"), "{e}");
}
