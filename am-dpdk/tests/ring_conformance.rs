//! The am-core conformance suite over `net_ring` ports in one process, switched by
//! destination MAC, with a 64 MiB bulk message checked byte for byte. One test per
//! process: EAL starts once.

use am_testkit::conformance::run_suite;
use am_testkit::dpdk::DpdkHarness;

#[test]
fn suite_over_net_ring() {
    let mut h = DpdkHarness::rings();
    h.bulk = 64 << 20;
    // The classes check moves min(bulk, segment / 2).
    h.config.segment_bytes = (128 << 20) + (1 << 20);
    let t0 = std::time::Instant::now();
    let r = run_suite(&mut h);
    eprintln!("suite over net_ring: {:?} in {:?}", r, t0.elapsed());
    r.unwrap();
    let s = h.total_stats();
    assert!(s.messages_handled > 0);
    assert!(
        s.bytes_sent >= 64 << 20,
        "the 64 MiB bulk crossed: {} bytes sent",
        s.bytes_sent
    );
    let d = h.driver_stats();
    eprintln!("driver: {d:?}");
    assert!(d.arp_requests > 0 && d.arp_replies > 0, "ARP ran: {d:?}");
}
