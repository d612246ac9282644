//! Properties of the engine under the simulator: the suite catches a broken engine, long
//! lossy streams are exactly-once and in order, runs replay from their seed, and random or
//! mutated packets never panic and are counted.

use am_core::engine::Core;
use am_core::sim::{Faults, SimNet};
use am_core::{Capabilities, Config, Endpoint, Msg, Tag, Time};
use am_testkit::conformance::{check_order, run_suite, Harness, SimHarness};
use proptest::prelude::*;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[test]
fn suite_fails_when_duplicate_suppression_is_off() {
    let mut failures = 0;
    let mut first = None;
    for seed in 0..20 {
        let mut h = SimHarness::new(seed, Faults::lossy(0.10));
        h.config.testing_disable_dedup = true;
        if let Err(e) = run_suite(&mut h) {
            failures += 1;
            first.get_or_insert(e);
        }
    }
    assert!(
        failures >= 15,
        "only {failures} of 20 seeds caught the missing dedup"
    );
    // The same seeds pass with suppression on (shown by sim_conformance over 1,000 seeds).
    let e = first.unwrap();
    assert!(!e.is_empty());
}

#[test]
fn the_order_check_catches_duplicates_directly() {
    let mut h = SimHarness::new(3, Faults::lossy(0.10));
    h.config.testing_disable_dedup = true;
    assert!(check_order(&mut h).is_err());
}

#[test]
fn hundred_thousand_messages_exactly_once_in_order_over_a_lossy_network() {
    let mut h = SimHarness::new(42, Faults::lossy(0.10));
    let mut a = h.endpoint(Config {
        tag: Tag(1),
        ..h.base_config()
    });
    let mut b = h.endpoint(Config {
        tag: Tag(2),
        ..h.base_config()
    });
    a.map(0, b.name(), b.tag()).unwrap();
    let seen = Arc::new(Mutex::new((0u64, 0u64))); // (next expected, violations)
    let s = seen.clone();
    b.register(1, move |_, m| {
        let mut g = s.lock().unwrap();
        if m.args[0] != g.0 {
            g.1 += 1;
        }
        g.0 = m.args[0] + 1;
    })
    .unwrap();
    const N: u64 = 100_000;
    let mut i = 0;
    while i < N {
        match a.send(0, Msg::small(1, &[i])) {
            Ok(_) => i += 1,
            Err(am_core::AmError::WouldBlock) => {
                h.run(&mut [&mut a, &mut b], Duration::from_millis(1), &mut || {
                    false
                });
            }
            Err(e) => panic!("{e}"),
        }
    }
    let s = seen.clone();
    let done = h.run(&mut [&mut a, &mut b], Duration::from_secs(120), &mut || {
        s.lock().unwrap().0 == N
    });
    h.run(
        &mut [&mut a, &mut b],
        Duration::from_millis(100),
        &mut || false,
    );
    let g = *seen.lock().unwrap();
    assert!(done, "stopped at {}", g.0);
    assert_eq!(
        g,
        (N, 0),
        "out-of-order or duplicate deliveries: {:?} {:?}",
        a.stats(),
        b.stats()
    );
    assert_eq!(b.stats().messages_handled, N);
    let c = h.net.counters();
    assert!(
        c.dropped > 1000 && c.duplicated > 1000 && c.reordered > 1000,
        "{c:?}"
    );
    assert!(a.stats().retransmits > 0);
    assert!(b.stats().duplicates_dropped > 0);
}

#[test]
fn runs_replay_from_their_seed() {
    let run = |seed| {
        let mut h = SimHarness::new(seed, Faults::lossy(0.1));
        check_order(&mut h).unwrap();
        (h.net.counters(), h.net.now())
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
}

#[test]
fn a_partition_makes_a_peer_unreachable_and_healing_restores_it() {
    let net = SimNet::new(5, Faults::none());
    let (mut a, mut b, got) = pair_logging_handler_1(&net);
    let ups = Arc::new(Mutex::new(Vec::new()));
    let u = ups.clone();
    a.set_upcall(move |_, x| u.lock().unwrap().push(x.code));
    let mut h = SimHarness {
        net: net.clone(),
        config: Config::default(),
        bulk: 0,
    };
    net.partition(a.name().addr, b.name().addr, true);
    a.send(0, Msg::small(1, &[1])).unwrap();
    h.run(&mut [&mut a, &mut b], Duration::from_secs(5), &mut || {
        !ups.lock().unwrap().is_empty()
    });
    assert_eq!(*ups.lock().unwrap(), vec![am_core::ErrorCode::Unreachable]);
    net.partition(a.name().addr, b.name().addr, false);
    a.send(0, Msg::small(1, &[2])).unwrap();
    assert!(
        h.run(&mut [&mut a, &mut b], Duration::from_secs(5), &mut || !got
            .lock()
            .unwrap()
            .is_empty())
    );
    assert_eq!(*got.lock().unwrap(), vec![2]);
    assert!(net.counters().partitioned > 0);
}

fn caps() -> Capabilities {
    Capabilities {
        reliable: false,
        bulk_placement: false,
        max_datagram: 1472,
        max_window: u32::MAX,
    }
}

fn core(tag: u64, addr: &str, seed: u64) -> Core {
    let mut cfg = Config {
        tag: Tag(tag),
        ..Config::default()
    };
    cfg.handlers = 4;
    let mut c = Core::new(cfg, caps(), addr.parse().unwrap(), seed);
    c.set_now(Time(1_000_000));
    c
}

const A: &str = "10.0.0.1:7000";
const B: &str = "10.0.0.2:7000";

/// Real traffic from A to B of a short exchange (handshake, small, fragmented medium,
/// request, bulk), captured by driving two engines by hand.
fn captured_traffic() -> Vec<Vec<u8>> {
    let mut a = core(1, A, 1);
    let mut b = core(2, B, 2);
    a.map(0, b.name(), Tag(2)).unwrap();
    let body = vec![3u8; 5000];
    a.send(0, &Msg::medium(1, &[1, 2], &[&body])).unwrap();
    a.request(0, &Msg::small(1, &[3])).unwrap();
    a.send(0, &Msg::bulk(1, &[4], &[(0, 3000)], 100)).unwrap();
    let mut captured = Vec::new();
    for step in 0..20u64 {
        a.flush();
        let out: Vec<_> = a.outbox().drain(..).collect();
        for t in out {
            captured.push(t.bytes.clone());
            b.handle_datagram(A.parse().unwrap(), &t.bytes);
        }
        b.flush();
        let back: Vec<_> = b.outbox().drain(..).collect();
        for t in back {
            a.handle_datagram(B.parse().unwrap(), &t.bytes);
        }
        a.handle_timeout(Time(1_000_000 + step * 1_000_000));
    }
    assert!(captured.len() >= 6, "captured {}", captured.len());
    captured
}

fn traffic() -> &'static Vec<Vec<u8>> {
    static T: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    T.get_or_init(captured_traffic)
}

#[test]
fn captured_traffic_is_accepted_unmutated() {
    // The baseline for the mutation test: the unmodified packets do deliver.
    let mut b = core(2, B, 2);
    b.set_handler_present(1, true);
    for p in traffic() {
        b.handle_datagram(A.parse().unwrap(), p);
    }
    assert_eq!(b.stats().messages_handled, 3, "{:?}", b.stats());
    assert_eq!(b.stats().malformed_dropped, 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_are_counted_drops(bytes in proptest::collection::vec(any::<u8>(), 0..1600)) {
        let mut c = core(2, B, 2);
        c.handle_datagram(A.parse().unwrap(), &bytes);
        c.handle_timeout(Time(2_000_000));
        c.flush();
        let s = c.stats().clone();
        prop_assert_eq!(s.messages_handled, 0);
        prop_assert!(s.malformed_dropped + s.stale_dropped >= 1 || s.packets_sent >= 1, "{:?}", s);
        prop_assert!(c.memory_in_use() < 1 << 20);
    }

    #[test]
    fn mutated_traffic_never_panics_and_stays_bounded(
        muts in proptest::collection::vec((any::<usize>(), any::<usize>(), any::<u8>(), 0u8..4), 1..12)
    ) {
        let mut pkts = traffic().clone();
        for (which, at, val, how) in muts {
            let n = pkts.len();
            let p = &mut pkts[which % n];
            if p.is_empty() { continue; }
            let i = at % p.len();
            match how {
                0 => p[i] = val,
                1 => p.truncate(i),
                2 => p[i] ^= 1 << (val % 8),
                _ => { let q = p.clone(); pkts.push(q); } // a duplicate
            }
        }
        let mut b = core(2, B, 2);
        b.set_handler_present(1, true);
        for p in &pkts {
            b.handle_datagram(A.parse().unwrap(), p);
        }
        b.handle_timeout(Time(5_000_000_000));
        b.flush();
        let s = b.stats().clone();
        prop_assert_eq!(s.packets_received, pkts.len() as u64);
        prop_assert!(s.messages_handled <= 3, "{:?}", s);
        prop_assert!(b.memory_in_use() < 4 << 20);
    }
}

fn hello(src_inc: u64, start_seq: u64) -> Vec<u8> {
    use am_core::wire::{self, Common, Packet};
    let common = Common {
        version: 1,
        kind: wire::kind::HELLO,
        vnet: 0,
        src_inc,
        dst_inc: 0,
    };
    let mut b = Vec::new();
    wire::encode_packet(
        &mut b,
        &Packet::Hello {
            common,
            window: 16,
            start_seq,
        },
    );
    b
}

#[test]
fn a_late_hello_of_a_replaced_incarnation_is_stale() {
    let mut b = core(2, B, 2);
    let from = A.parse().unwrap();
    b.handle_datagram(from, &hello(111, 1));
    b.handle_datagram(from, &hello(222, 1)); // the peer restarted
    let before = b.stats().stale_dropped;
    b.handle_datagram(from, &hello(111, 1)); // a late duplicate from the old life
    assert_eq!(b.stats().stale_dropped, before + 1);
    // Only two HELLO_ACKs went out: the stale HELLO changed nothing.
    b.flush();
    let acks = b.outbox().drain(..).count();
    assert_eq!(acks, 2);
}

#[test]
fn a_small_window_is_acknowledged_without_waiting_for_the_ack_delay() {
    // A receiver whose budget allows only 4 packets in flight: if acknowledgements waited
    // for the 500 us delay, 400 messages would take 400 / 4 * 500 us = 50 ms.
    let mut h = SimHarness::new(11, Faults::none());
    let mut a = h.endpoint(Config {
        tag: Tag(1),
        ..h.base_config()
    });
    let mut b = h.endpoint(Config {
        tag: Tag(2),
        recv_budget_packets: 4,
        ..h.base_config()
    });
    a.map(0, b.name(), b.tag()).unwrap();
    let got = Arc::new(Mutex::new(0u64));
    let g = got.clone();
    b.register(1, move |_, _| *g.lock().unwrap() += 1).unwrap();
    let start = h.now();
    for i in 0..400u64 {
        a.send(0, Msg::small(1, &[i])).unwrap();
    }
    let g = got.clone();
    assert!(
        h.run(&mut [&mut a, &mut b], Duration::from_secs(5), &mut || *g
            .lock()
            .unwrap()
            == 400)
    );
    let took = Duration::from_nanos(h.now().since_ns(start));
    assert!(
        took < Duration::from_millis(20),
        "400 messages through a 4-packet window took {took:?}"
    );
}

#[test]
fn a_request_deadline_counts_from_the_send_not_from_the_last_poll() {
    // Endpoints made late in a run, and a request sent before their first poll: its
    // deadline must count from the send (an engine clock left at its last poll would
    // time the request out at once).
    let net = SimNet::new(12, Faults::none());
    net.advance_to(Time(10_000_000_000));
    let mut h = SimHarness {
        net: net.clone(),
        config: Config::default(),
        bulk: 0,
    };
    let mut a = h.endpoint(Config {
        tag: Tag(1),
        request_timeout: Duration::from_secs(1),
        ..Config::default()
    });
    let mut b = h.endpoint(Config {
        tag: Tag(2),
        ..Config::default()
    });
    a.map(0, b.name(), b.tag()).unwrap();
    b.register(1, |ctx, mut m| {
        if let Some(t) = m.token.take() {
            let _ = ctx.reply(t, Msg::small(2, &[7]));
        }
    })
    .unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    a.register(2, move |_, m| g.lock().unwrap().push(m.args[0]))
        .unwrap();
    let ups = Arc::new(Mutex::new(Vec::new()));
    let u = ups.clone();
    a.set_upcall(move |_, x| u.lock().unwrap().push(x.code));
    net.advance_to(Time(20_000_000_000)); // time passes before the application sends
    a.request(0, Msg::small(1, &[])).unwrap();
    let g = got.clone();
    assert!(
        h.run(&mut [&mut a, &mut b], Duration::from_secs(3), &mut || !g
            .lock()
            .unwrap()
            .is_empty())
    );
    assert_eq!(*got.lock().unwrap(), vec![7]);
    assert!(ups.lock().unwrap().is_empty(), "{:?}", ups.lock().unwrap());
}

/// A reliable transport's connection breaks mid-stream (an RDMA queue pair torn down): what
/// was in flight is lost with it. Every message is then handled at most once and in order,
/// or returned as `Unreachable` (a message whose acknowledgement was lost may be both: the
/// sender cannot know), none vanishes, messages still queued behind the window when the
/// failure is noticed go through on the re-opened connection, and so do later ones.
#[test]
fn a_failed_connection_returns_what_was_in_flight_and_reopens_for_the_rest() {
    let mut reopened = 0;
    for seed in 0..100u64 {
        let net = SimNet::new(
            seed,
            Faults {
                delay: Duration::from_micros(20),
                ..Faults::reliable()
            },
        );
        let (mut a, mut b, got, ups, mut h) = pair_with_upcalls(&net);
        // More than the window (256): the rest waits in the queue.
        for i in 0..400u64 {
            a.send(0, Msg::small(1, &[i])).unwrap();
        }
        // Let part of the stream through, break the connection, let A notice.
        let partial = Duration::from_micros(10 + (seed * 37) % 400);
        h.run(&mut [&mut a, &mut b], partial, &mut || false);
        net.fail_path(a.name().addr, b.name().addr);
        // Nothing else happens: the queued messages must go by themselves, at once.
        let settled = h.run(
            &mut [&mut a, &mut b],
            Duration::from_millis(50),
            &mut || {
                let got = got.lock().unwrap();
                let ups = ups.lock().unwrap();
                (0..400u64).all(|i| got.contains(&i) || ups.iter().any(|u| u.0 == i))
            },
        );
        assert!(
            settled,
            "seed {seed}: messages queued at the failure did not go within 50 ms"
        );
        for i in 400..450u64 {
            a.send(0, Msg::small(1, &[i])).unwrap();
        }
        let ok = h.run(&mut [&mut a, &mut b], Duration::from_secs(5), &mut || {
            let got = got.lock().unwrap();
            let ups = ups.lock().unwrap();
            (0..450u64).all(|i| got.contains(&i) || ups.iter().any(|u| u.0 == i))
        });
        let got = got.lock().unwrap().clone();
        let ups = ups.lock().unwrap().clone();
        assert!(
            ok,
            "seed {seed}: a message vanished ({} handled, {} returned)",
            got.len(),
            ups.len()
        );
        assert!(
            got.windows(2).all(|w| w[0] < w[1]),
            "seed {seed}: handled twice or out of order: {got:?}"
        );
        assert!(
            ups.iter().all(|u| u.1 == am_core::ErrorCode::Unreachable),
            "seed {seed}: {ups:?}"
        );
        assert!(
            (400..450).all(|i| got.contains(&i)),
            "seed {seed}: the re-opened connection did not carry later messages"
        );
        let last_returned = ups.iter().map(|u| u.0).max();
        if let Some(l) = last_returned {
            if got.iter().any(|&i| i > l && i < 400) {
                reopened += 1;
            }
        }
    }
    assert!(
        reopened >= 5,
        "only {reopened} seeds lost messages in flight and then carried the queued ones"
    );
}

type SimEp = Endpoint<am_core::sim::SimTransport>;
type Upcalls = Arc<Mutex<Vec<(u64, am_core::ErrorCode)>>>;

/// [`pair_logging_handler_1`], A's upcalls logged (first argument, code), and a harness
/// over `net`.
fn pair_with_upcalls(net: &SimNet) -> (SimEp, SimEp, Arc<Mutex<Vec<u64>>>, Upcalls, SimHarness) {
    let (mut a, b, got) = pair_logging_handler_1(net);
    let ups: Upcalls = Arc::default();
    let u = ups.clone();
    a.set_upcall(move |_, x| u.lock().unwrap().push((x.args[0], x.code)));
    let h = SimHarness {
        net: net.clone(),
        config: Config::default(),
        bulk: 0,
    };
    (a, b, got, ups, h)
}

/// Endpoints A (tag 1) and B (tag 2) on `net`, B at A's index 0; B's handler 1 logs its
/// first argument.
fn pair_logging_handler_1(net: &SimNet) -> (SimEp, SimEp, Arc<Mutex<Vec<u64>>>) {
    let mut a = Endpoint::new(
        net.transport(),
        Config {
            tag: Tag(1),
            ..Config::default()
        },
    );
    let mut b = Endpoint::new(
        net.transport(),
        Config {
            tag: Tag(2),
            ..Config::default()
        },
    );
    a.map(0, b.name(), b.tag()).unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    b.register(1, move |_, m| g.lock().unwrap().push(m.args[0]))
        .unwrap();
    (a, b, got)
}

/// A reliable transport whose round trip (3 s) is longer than the unreachable timeout (2 s),
/// as a 64 MiB RDMA WRITE on a slow or loaded link is: while the transport reports progress
/// (`Transport::take_progress`, here datagrams moving on the path) the peer is not declared
/// unreachable, and the message is handled once and acknowledged. When the path is cut the
/// progress stops, and the message comes back as `Unreachable` within the timeout.
#[test]
fn a_slow_reliable_path_that_makes_progress_is_not_declared_unreachable() {
    let slow = Faults {
        delay: Duration::from_millis(1500),
        ..Faults::reliable()
    };
    let net = SimNet::new(7, slow);
    let (mut a, mut b, got, ups, mut h) = pair_with_upcalls(&net);
    // Open the connection first (its handshake is a round trip too).
    a.send(0, Msg::small(1, &[0])).unwrap();
    let opened = h.run(&mut [&mut a, &mut b], Duration::from_secs(20), &mut || {
        !got.lock().unwrap().is_empty() || !ups.lock().unwrap().is_empty()
    });
    assert!(
        opened,
        "nothing arrived or came back in 20 s of virtual time"
    );
    for i in 1..=20u64 {
        a.send(0, Msg::small(1, &[i])).unwrap();
    }
    let t0 = net.now();
    let done = h.run(&mut [&mut a, &mut b], Duration::from_secs(20), &mut || {
        got.lock().unwrap().len() == 21
    });
    assert!(done, "handled: {:?}", got.lock().unwrap());
    // Let the acknowledgements come back (another 1.5 s one way).
    h.run(&mut [&mut a, &mut b], Duration::from_secs(4), &mut || false);
    assert!(
        net.now().since_ns(t0) > 3_000_000_000,
        "the round trip must outlast the 2 s unreachable timeout for this test to mean anything"
    );
    assert_eq!(*got.lock().unwrap(), (0..=20).collect::<Vec<u64>>());
    assert_eq!(
        *ups.lock().unwrap(),
        vec![],
        "a path that made progress was declared unreachable"
    );
    assert_eq!(a.stats().connection_failures, 0);

    // Cut the path with a message in flight: nothing moves, and it comes back.
    a.send(0, Msg::small(1, &[99])).unwrap();
    h.run(&mut [&mut a, &mut b], Duration::from_millis(1), &mut || {
        false
    });
    net.partition(a.name().addr, b.name().addr, true);
    let t1 = net.now();
    let back = h.run(&mut [&mut a, &mut b], Duration::from_secs(20), &mut || {
        !ups.lock().unwrap().is_empty()
    });
    assert!(back, "a message on a cut path was never returned");
    assert_eq!(
        *ups.lock().unwrap(),
        vec![(99, am_core::ErrorCode::Unreachable)]
    );
    let waited = net.now().since_ns(t1);
    assert!(
        (2_000_000_000..2_100_000_000).contains(&waited),
        "returned after {waited} ns of virtual time, not at the 2 s unreachable timeout"
    );
    assert!(!got.lock().unwrap().contains(&99));
}
