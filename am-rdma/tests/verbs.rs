//! The `am-core` conformance suite and bulk placement over real verbs. These tests need an
//! RDMA device whose netdev has `AM_RDMA_ADDR` (default 10.99.0.1): they run in the
//! SoftRoCE VM (`bash scripts/verbs-tests.sh`), where `AM_RDMA_REQUIRE=1` makes a missing
//! device a failure; elsewhere they say they were skipped.

use am_core::{Config, Endpoint, ErrorCode, Msg, Tag, Undeliverable};
use am_rdma::RdmaTransport;
use am_testkit::conformance::{run_suite, Harness};
use am_testkit::rdma::{skip_without_device, RdmaHarness};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a wait for something the endpoints must do by themselves may take before a test
/// calls it a hang. Only a hang guard: these tests run in an emulated (TCG) VM on a loaded
/// 2-core machine, so no pass may depend on being fast; what happened is checked by counting
/// events, and waits end as soon as their condition holds.
const HANG_GUARD: Duration = Duration::from_secs(60);

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    am_testkit::conformance::random_bytes(seed, len)
}

/// rxe0's hardware counters (whatever this kernel exposes), by name.
fn hw_counters(dev: &str) -> BTreeMap<String, u64> {
    let dir = format!("/sys/class/infiniband/{dev}/ports/1/hw_counters");
    let mut m = BTreeMap::new();
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for e in rd.flatten() {
            if let Ok(s) = std::fs::read_to_string(e.path()) {
                if let Ok(v) = s.trim().parse() {
                    m.insert(e.file_name().to_string_lossy().into_owned(), v);
                }
            }
        }
    }
    m
}

#[test]
fn conformance_suite_over_verbs() {
    if skip_without_device("conformance_suite_over_verbs") {
        return;
    }
    let mut h = RdmaHarness::new(1 << 20);
    run_suite(&mut h).unwrap();
    println!("VERBS-TEST-RAN conformance_suite_over_verbs");
}

fn pair(h: &mut RdmaHarness, bulk: usize) -> (Endpoint<RdmaTransport>, Endpoint<RdmaTransport>) {
    let cfg = Config {
        segment_bytes: bulk + (1 << 20),
        ..h.base_config()
    };
    let mut a = h.endpoint(Config {
        tag: Tag(0xa),
        ..cfg.clone()
    });
    let b = h.endpoint(Config {
        tag: Tag(0xb),
        ..cfg
    });
    a.map(0, b.name(), b.tag()).unwrap();
    (a, b)
}

type Logged = Arc<Mutex<Vec<u64>>>;

/// A pair (see `pair`) whose B logs the first argument of what reaches `handler`.
fn pair_logging(
    h: &mut RdmaHarness,
    handler: u16,
) -> (Endpoint<RdmaTransport>, Endpoint<RdmaTransport>, Logged) {
    let (a, mut b) = pair(h, 1 << 20);
    let got: Logged = Arc::default();
    let g = got.clone();
    b.register(handler, move |_, m| g.lock().unwrap().push(m.args[0]))
        .unwrap();
    (a, b, got)
}

/// What shows a pair of endpoints moving: send completions and bulk arrivals.
fn moved(eps: &[&mut Endpoint<RdmaTransport>]) -> u64 {
    eps.iter()
        .map(|e| e.transport().stats().sends_completed + e.transport().stats().writes_imm_received)
        .sum()
}

/// Runs `eps` until `done`, for as long as they keep moving: fails only when nothing
/// completes for `STALL` (a hang), however long a slow machine takes in all.
fn run_while_moving(
    h: &mut RdmaHarness,
    eps: &mut [&mut Endpoint<RdmaTransport>],
    done: &mut dyn FnMut() -> bool,
) -> bool {
    const STALL: Duration = Duration::from_secs(20);
    let (mut last, mut still) = (moved(eps), Duration::ZERO);
    loop {
        if h.run(eps, Duration::from_millis(500), done) {
            return true;
        }
        let now = moved(eps);
        if now > last {
            (last, still) = (now, Duration::ZERO);
        } else {
            still += Duration::from_millis(500);
            if still >= STALL {
                return false;
            }
        }
    }
}

#[test]
fn bulk_64_mib_moves_as_chunked_writes_ending_in_one_immediate() {
    if skip_without_device("bulk_64_mib_moves_as_chunked_writes_ending_in_one_immediate") {
        return;
    }
    const N: usize = 64 << 20;
    let mut h = RdmaHarness::new(N);
    let (mut a, mut b) = pair(&mut h, N);
    let got: Arc<Mutex<Option<(u64, usize, bool)>>> = Arc::default();
    let data = pattern(7, N);
    let expect = data.clone();
    let g = got.clone();
    b.register(3, move |ctx, m| {
        let (off, len) = m.bulk.unwrap_or((0, 0));
        let same = ctx.segment()[off as usize..off as usize + len] == expect[..];
        *g.lock().unwrap() = Some((off, len, same));
    })
    .unwrap();
    let freed = Arc::new(Mutex::new(0));
    let f = freed.clone();
    a.set_bulk_free(move |_| *f.lock().unwrap() += 1);
    // Two source ranges, to exercise the scatter list.
    a.segment_mut()[..N / 2].copy_from_slice(&data[..N / 2]);
    a.segment_mut()[N / 2 + 4096..N + 4096].copy_from_slice(&data[N / 2..]);
    let dev = a.transport().device_name().to_string();
    let before = hw_counters(&dev);
    let ups: Arc<Mutex<Vec<ErrorCode>>> = Arc::default();
    let u = ups.clone();
    a.set_upcall(move |_, x| u.lock().unwrap().push(x.code));
    let t0 = std::time::Instant::now();
    a.send(
        0,
        Msg::bulk(3, &[1], &[(0, N / 2), (N / 2 + 4096, N / 2)], 512),
    )
    .unwrap();
    // However long the bulk takes (an emulated machine under load: seconds, longer than
    // the engine's 2 s unreachable timeout), it must keep moving and must not be given up.
    let ok = run_while_moving(&mut h, &mut [&mut a, &mut b], &mut || {
        got.lock().unwrap().is_some() && *freed.lock().unwrap() == 1
    });
    let took = t0.elapsed();
    assert!(
        ok,
        "64 MiB bulk stopped moving (nothing completed for 20 s) after {:.3} s; arrived: {:?}, \
         freed: {}, upcalls: {:?}\nsender {:?}\n{:?}\nreceiver {:?}\n{:?}",
        took.as_secs_f64(),
        got.lock().unwrap(),
        freed.lock().unwrap(),
        ups.lock().unwrap(),
        a.transport().stats(),
        a.stats(),
        b.transport().stats(),
        b.stats(),
    );
    assert_eq!(*ups.lock().unwrap(), vec![], "the moving bulk was returned");
    println!(
        "64 MiB bulk arrived and was freed in {:.3} s ({:.1} MB/s)",
        took.as_secs_f64(),
        N as f64 / took.as_secs_f64() / 1e6
    );
    let after = hw_counters(&dev);
    assert_eq!(
        *got.lock().unwrap(),
        Some((512, N, true)),
        "bulk not byte-exact"
    );
    let (sa, sb) = (a.transport().stats().clone(), b.transport().stats().clone());
    println!("sender {sa:?}\nreceiver {sb:?}");
    for (k, v) in &after {
        let d = v - before.get(k).copied().unwrap_or(0);
        if d > 0 {
            println!("{dev} counter {k}: +{d}");
        }
    }
    assert_eq!(
        sa.writes_imm_posted, 1,
        "the bulk must end in one RDMA WRITE with immediate"
    );
    let chunks = N.div_ceil(am_rdma::WRITE_CHUNK_BYTES) as u64;
    assert_eq!(
        sa.writes_posted,
        chunks - 1,
        "the bulk must move as {chunks} WRITEs of at most WRITE_CHUNK_BYTES"
    );
    assert_eq!(sa.bytes_written, N as u64);
    assert_eq!(sb.writes_imm_received, 1);
    assert!(
        sa.sends_posted < 16 && sb.recvs < 16,
        "the data must not move as SENDs: {} sends posted, {} received",
        sa.sends_posted,
        sb.recvs
    );
    // rxe counts packets both ways on one device: 64 MiB at the path MTU is thousands of
    // packets, all of them from the WRITEs.
    if let (Some(s0), Some(s1)) = (before.get("sent_pkts"), after.get("sent_pkts")) {
        assert!(
            s1 - s0 >= (N / 4096) as u64,
            "rxe0 sent {} packets",
            s1 - s0
        );
    }
    // ... while it counts only a handful of SEND messages (headers, key exchange, acks).
    if let (Some(s0), Some(s1)) = (before.get("rdma_sends"), after.get("rdma_sends")) {
        assert!(s1 - s0 < 32, "rxe0 counted {} SENDs for one bulk", s1 - s0);
    }
    println!("VERBS-TEST-RAN bulk_64_mib_moves_as_chunked_writes_ending_in_one_immediate");
}

#[test]
fn a_wrong_tag_gets_no_key_and_places_no_byte() {
    if skip_without_device("a_wrong_tag_gets_no_key_and_places_no_byte") {
        return;
    }
    let mut h = RdmaHarness::new(1 << 20);
    let (mut a, mut b) = pair(&mut h, 1 << 20);
    let ups: Arc<Mutex<Vec<Undeliverable>>> = Arc::default();
    let u = ups.clone();
    a.set_upcall(move |_, x| u.lock().unwrap().push(x));
    b.register(3, |_, _| {
        panic!("a bulk with a forged tag must not run its handler")
    })
    .unwrap();
    a.map(1, b.name(), Tag(0xbad)).unwrap();
    a.segment_mut()[..65536].fill(0xee);
    a.send(1, Msg::bulk(3, &[], &[(0, 65536)], 0)).unwrap();
    let ok = h.run(&mut [&mut a, &mut b], HANG_GUARD, &mut || {
        !ups.lock().unwrap().is_empty()
    });
    assert!(ok, "no upcall for the forged tag in {HANG_GUARD:?}");
    assert_eq!(ups.lock().unwrap()[0].code, ErrorCode::BadTag);
    assert!(
        b.segment()[..65536].iter().all(|&x| x == 0),
        "bytes were placed"
    );
    assert_eq!(b.transport().stats().refusals, 1);
    assert_eq!(a.transport().stats().writes_imm_posted, 0);
    assert_eq!(a.transport().stats().bulk_header_only, 1);
    println!("VERBS-TEST-RAN a_wrong_tag_gets_no_key_and_places_no_byte");
}

#[test]
fn garbage_on_the_connection_socket_is_counted_and_harmless() {
    if skip_without_device("garbage_on_the_connection_socket_is_counted_and_harmless") {
        return;
    }
    let mut h = RdmaHarness::new(1 << 20);
    let (mut a, mut b, got) = pair_logging(&mut h, 1);
    // Random datagrams of every length up to 119 bytes.
    let sock = std::net::UdpSocket::bind((am_testkit::rdma::test_ip(), 0)).unwrap();
    let mut x = 0x1234_5678_9abc_def1u64;
    for n in 0..300usize {
        let bytes: Vec<u8> = (0..n % 120)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        sock.send_to(&bytes, b.name().addr).unwrap();
    }
    // Until they are counted (not for a fixed time: a loaded VM may take longer).
    let t0 = std::time::Instant::now();
    while b.transport().stats().malformed < 250 && t0.elapsed() < HANG_GUARD {
        h.run(
            &mut [&mut a, &mut b],
            Duration::from_millis(10),
            &mut || false,
        );
    }
    let malformed = b.transport().stats().malformed;
    assert!(
        malformed >= 250,
        "only {malformed} of 300 garbage datagrams counted in {HANG_GUARD:?}"
    );
    // The endpoint still works.
    for i in 0..100u64 {
        a.send(0, Msg::small(1, &[i])).unwrap();
    }
    let ok = h.run(&mut [&mut a, &mut b], HANG_GUARD, &mut || {
        got.lock().unwrap().len() == 100
    });
    assert!(
        ok && *got.lock().unwrap() == (0..100).collect::<Vec<u64>>(),
        "after the garbage, {} of 100 messages arrived in {HANG_GUARD:?}",
        got.lock().unwrap().len()
    );
    println!("VERBS-TEST-RAN garbage_on_the_connection_socket_is_counted_and_harmless");
}

#[test]
fn a_stalled_receiver_is_never_sent_more_than_it_has_posted() {
    if skip_without_device("a_stalled_receiver_is_never_sent_more_than_it_has_posted") {
        return;
    }
    let mut h = RdmaHarness::new(1 << 20);
    let (mut a, mut b, got) = pair_logging(&mut h, 2);
    // Connect, then stop polling B while A pushes 2,000 mediums and bulks at it: only the
    // window may be in flight, so no send meets an empty receive queue (RNR).
    a.send(0, Msg::small(2, &[0])).unwrap();
    assert!(
        h.run(&mut [&mut a, &mut b], HANG_GUARD, &mut || {
            got.lock().unwrap().len() == 1
        }),
        "the first message did not arrive in {HANG_GUARD:?}"
    );
    let dev = a.transport().device_name().to_string();
    let before = hw_counters(&dev);
    let body = pattern(3, 2000);
    let mut sent = 1u64;
    let mut blocked = 0;
    while sent < 2000 {
        let args = [sent];
        let slices = [&body[..]];
        let msg = if sent.is_multiple_of(5) {
            Msg::bulk(2, &args, &[(0, 8192)], (sent % 64) * 8192)
        } else {
            Msg::medium(2, &args, &slices)
        };
        match a.send(0, msg) {
            Ok(_) => sent += 1,
            Err(am_core::AmError::WouldBlock) => {
                blocked += 1;
                h.run(&mut [&mut a], Duration::from_millis(1), &mut || false);
                if blocked > 200 {
                    break;
                }
            }
            Err(e) => panic!("{e}"),
        }
    }
    h.run(&mut [&mut a], Duration::from_millis(200), &mut || false);
    let posted = a.transport().stats().sends_posted;
    // However long it takes, as long as it moves.
    let ok = run_while_moving(&mut h, &mut [&mut a, &mut b], &mut || {
        got.lock().unwrap().len() as u64 == sent
    });
    assert!(ok, "{} of {sent} arrived", got.lock().unwrap().len());
    assert_eq!(*got.lock().unwrap(), (0..sent).collect::<Vec<u64>>());
    let after = hw_counters(&dev);
    if dev.starts_with("rxe") {
        assert!(
            before.contains_key("rcvd_rnr_err"),
            "rxe counters missing: {before:?}"
        );
    }
    for k in ["rcvd_rnr_err", "send_rnr_err", "retry_rnr_exceeded_err"] {
        if let (Some(x), Some(y)) = (before.get(k), after.get(k)) {
            assert_eq!(y - x, 0, "{dev} counted {k} ({posted} sends posted)");
        }
    }
    println!("VERBS-TEST-RAN a_stalled_receiver_is_never_sent_more_than_it_has_posted ({sent} sent, {blocked} WouldBlock)");
}

#[test]
fn wait_sleeps_on_the_completion_channel_and_keeps_to_the_event_mask() {
    if skip_without_device("wait_sleeps_on_the_completion_channel_and_keeps_to_the_event_mask") {
        return;
    }
    let mut h = RdmaHarness::new(1 << 20);
    let (mut a, mut b) = pair(&mut h, 1 << 20);
    b.register(1, |_, _| {}).unwrap();
    a.send(0, Msg::small(1, &[0])).unwrap();
    let settle = |a: &mut Endpoint<RdmaTransport>, b: &mut Endpoint<RdmaTransport>| {
        // Poll both until B has handled everything, acknowledged it and has no timer left.
        let t0 = std::time::Instant::now();
        loop {
            a.poll(64).unwrap();
            b.poll(64).unwrap();
            if a.is_idle() && b.is_idle() && b.next_timeout().is_none() {
                break;
            }
            assert!(
                t0.elapsed() < HANG_GUARD,
                "the pair did not settle in {HANG_GUARD:?}: A idle {}, B idle {}, B's next \
                 timer {:?}",
                a.is_idle(),
                b.is_idle(),
                b.next_timeout()
            );
        }
        for _ in 0..20 {
            a.poll(64).unwrap();
            b.poll(64).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    settle(&mut a, &mut b);
    assert_eq!(b.stats().messages_handled, 1);
    assert_eq!(b.next_timeout(), None, "a timer would end the wait early");
    // With the network masked out, an arrival does not end the wait.
    b.set_event_mask(am_core::EventMask {
        network: false,
        handle: true,
    });
    a.send(0, Msg::small(1, &[1])).unwrap();
    a.poll(64).unwrap();
    // (A lower bound on a sleep: load only makes it longer, so it cannot fail for that.)
    let t0 = std::time::Instant::now();
    b.wait(Some(Duration::from_millis(300))).unwrap();
    let masked = t0.elapsed();
    assert!(
        masked >= Duration::from_millis(280),
        "a masked arrival woke wait after {masked:?}"
    );
    // Unmasked, the waiting completion ends the wait at once: a wait that ran to its
    // timeout (HANG_GUARD) did not see it; no load delays a ready wake-up by half that.
    b.set_event_mask(am_core::EventMask::default());
    let t0 = std::time::Instant::now();
    b.wait(Some(HANG_GUARD)).unwrap();
    assert!(
        t0.elapsed() < HANG_GUARD / 2,
        "the waiting completion did not end the wait: it ran {:?} (its timeout)",
        t0.elapsed()
    );
    b.poll(64).unwrap();
    assert_eq!(b.stats().messages_handled, 2);
    settle(&mut a, &mut b);
    // A sleeping B is woken by the completion channel when a message lands.
    let waker = std::thread::spawn({
        let handle = a.handle();
        move || {
            std::thread::sleep(Duration::from_millis(150));
            handle.send(0, 1, &[2], &[]).unwrap();
        }
    });
    let t0 = std::time::Instant::now();
    let mut woke_after = None;
    while t0.elapsed() < HANG_GUARD {
        a.poll(64).unwrap();
        a.wait(Some(Duration::from_millis(1))).unwrap();
        b.wait(Some(Duration::from_millis(20))).unwrap();
        b.poll(64).unwrap();
        if b.stats().messages_handled == 3 {
            woke_after = Some(t0.elapsed());
            break;
        }
    }
    waker.join().unwrap();
    let woke_after =
        woke_after.unwrap_or_else(|| panic!("the message never arrived ({HANG_GUARD:?})"));
    println!("the handle send arrived after {woke_after:?}");
    println!("VERBS-TEST-RAN wait_sleeps_on_the_completion_channel_and_keeps_to_the_event_mask");
}

/// A bulk towards a receiver whose queue pair is gone (its process died after granting
/// its key) makes no progress: the sender's WRITEs never complete, and the message comes
/// back through the error upcall as `Unreachable` (from a retry-exceeded completion or the
/// engine's unreachable timeout, whichever comes first), is never freed as delivered, and
/// the sender keeps working with a new peer.
#[test]
fn a_bulk_that_stops_moving_comes_back_unreachable() {
    if skip_without_device("a_bulk_that_stops_moving_comes_back_unreachable") {
        return;
    }
    const N: usize = 16 << 20;
    let mut h = RdmaHarness::new(N);
    let (mut a, mut b) = pair(&mut h, N);
    let got: Logged = Arc::default();
    let g = got.clone();
    b.register(3, move |_, m| g.lock().unwrap().push(m.args[0]))
        .unwrap();
    let freed: Logged = Arc::default();
    let f = freed.clone();
    a.set_bulk_free(move |id| f.lock().unwrap().push(id.0));
    let ups: Arc<Mutex<Vec<(u64, ErrorCode)>>> = Arc::default();
    let u = ups.clone();
    a.set_upcall(move |_, x| u.lock().unwrap().push((x.args[0], x.code)));
    // A small bulk first: the connection is up and B's key granted.
    a.send(0, Msg::bulk(3, &[1], &[(0, 4096)], 0)).unwrap();
    let ok = run_while_moving(&mut h, &mut [&mut a, &mut b], &mut || {
        got.lock().unwrap().len() == 1 && freed.lock().unwrap().len() == 1
    });
    assert!(ok, "the first bulk did not arrive");
    h.kill(b);
    let completed = a.transport().stats().sends_completed;
    let t0 = std::time::Instant::now();
    a.send(0, Msg::bulk(3, &[2], &[(0, N)], 0)).unwrap();
    let back = h.run(&mut [&mut a], HANG_GUARD, &mut || {
        !ups.lock().unwrap().is_empty()
    });
    let took = t0.elapsed();
    let sa = a.transport().stats().clone();
    println!("returned after {:.3} s; sender {sa:?}", took.as_secs_f64());
    assert!(
        back,
        "a bulk to a dead receiver never came back (a silent hang)"
    );
    assert_eq!(*ups.lock().unwrap(), vec![(2, ErrorCode::Unreachable)]);
    assert_eq!(
        freed.lock().unwrap().len(),
        1,
        "the lost bulk was freed as delivered"
    );
    assert!(sa.writes_posted >= 1, "the bulk's WRITEs were never posted");
    assert!(
        sa.sends_completed - completed <= 1,
        "the bulk's WRITEs completed towards a dead queue pair: {} completions",
        sa.sends_completed - completed
    );
    // The sender is not wedged: a new receiver gets a new bulk.
    let mut c = h.endpoint(Config {
        tag: Tag(0xc),
        segment_bytes: N + (1 << 20),
        ..h.base_config()
    });
    let got_c: Logged = Arc::default();
    let g = got_c.clone();
    c.register(3, move |_, m| g.lock().unwrap().push(m.args[0]))
        .unwrap();
    a.map(1, c.name(), c.tag()).unwrap();
    a.send(1, Msg::bulk(3, &[3], &[(0, N)], 0)).unwrap();
    let ok = run_while_moving(&mut h, &mut [&mut a, &mut c], &mut || {
        got_c.lock().unwrap().len() == 1 && freed.lock().unwrap().len() == 2
    });
    assert!(
        ok,
        "after the loss, a bulk to a live receiver did not arrive"
    );
    println!("VERBS-TEST-RAN a_bulk_that_stops_moving_comes_back_unreachable");
}
