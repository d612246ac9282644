//! Behaviour of the UDP driver with the engine: forged and garbage datagrams, an idle
//! endpoint's CPU use and wake-ups, and large paced bulk transfers.

use am_core::wire::{self, Class, Common, MsgHeader, MsgKind, Packet};
use am_core::{Config, Endpoint, EndpointName, Msg, Tag};
use am_udp::{UdpConfig, UdpTransport};
use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn endpoint(tag: u64, segment: usize) -> Endpoint<UdpTransport> {
    let t = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), UdpConfig::default()).unwrap();
    Endpoint::new(
        t,
        Config {
            tag: Tag(tag),
            segment_bytes: segment,
            ..Config::default()
        },
    )
}

/// How long a wait for something the endpoint must do by itself may take, or how long a
/// transfer may go without an acknowledgement, before a test calls it a hang. Only a hang
/// guard: no pass depends on being faster than this, and a loaded 2-core machine cannot
/// come near it; what happened is checked by counting events.
const HANG_GUARD: Duration = Duration::from_secs(60);

/// Polls `ep` until `done` holds; fails naming `what` if that takes `HANG_GUARD` (a hang).
fn pump_until(
    ep: &mut Endpoint<UdpTransport>,
    what: &str,
    mut done: impl FnMut(&Endpoint<UdpTransport>) -> bool,
) {
    let start = Instant::now();
    while !done(ep) {
        assert!(
            start.elapsed() < HANG_GUARD,
            "{what}: not after {HANG_GUARD:?} of polling (a hang); {:?}",
            ep.stats()
        );
        ep.poll(64).unwrap();
        ep.wait(Some(Duration::from_millis(1))).unwrap();
    }
}

/// Polls for `d`: lets a peer finish what it does by itself (no check depends on it).
fn pump(ep: &mut Endpoint<UdpTransport>, d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        ep.poll(64).unwrap();
        ep.wait(Some(Duration::from_millis(1))).unwrap();
    }
}

fn forged_data(b_inc: u64, seq: u64, tag: u64) -> Vec<u8> {
    let common = Common {
        version: 1,
        kind: wire::kind::DATA,
        vnet: 0,
        src_inc: 12345,
        dst_inc: b_inc,
    };
    let mut out = Vec::new();
    wire::put_data_header(&mut out, &common, seq, 1, 16);
    let hdr = MsgHeader {
        kind: MsgKind::Oneway,
        class: Class::Small,
        handler: 1,
        code: 0,
        orig_kind: MsgKind::Oneway,
        dst_tag: tag,
        src_tag: 0,
        req_id: 0,
        total_len: 0,
        orig_len: 0,
        bulk_off: 0,
        token_inc: 0,
        msg_id: seq,
        nargs: 1,
    };
    wire::put_first(&mut out, &hdr, &[seq], None);
    out
}

#[test]
fn forged_wrong_tag_datagram_never_runs_a_handler_and_is_counted() {
    let mut b = endpoint(0xfeed, 1 << 16);
    let ran = Arc::new(Mutex::new(Vec::new()));
    let r = ran.clone();
    b.register(1, move |_, m| r.lock().unwrap().push(m.args[0]))
        .unwrap();
    let forger = UdpSocket::bind("127.0.0.1:0").unwrap();
    forger
        .set_read_timeout(Some(Duration::from_millis(1)))
        .unwrap();
    let to = b.name().addr;

    // Garbage first: counted, nothing else.
    forger
        .send_to(b"\x00garbage that is no packet", to)
        .unwrap();
    pump_until(&mut b, "the garbage datagram counted", |b| {
        b.stats().malformed_dropped >= 1
    });
    assert_eq!(b.stats().malformed_dropped, 1);

    // A real handshake from a plain socket.
    let mut hello = Vec::new();
    let common = Common {
        version: 1,
        kind: wire::kind::HELLO,
        vnet: 0,
        src_inc: 12345,
        dst_inc: 0,
    };
    wire::encode_packet(
        &mut hello,
        &Packet::Hello {
            common,
            window: 16,
            start_seq: 1,
        },
    );
    forger.send_to(&hello, to).unwrap();
    let mut buf = [0u8; 2048];
    let start = Instant::now();
    let n = loop {
        b.poll(64).unwrap();
        match forger.recv_from(&mut buf) {
            Ok((n, _)) => break n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                assert!(
                    start.elapsed() < HANG_GUARD,
                    "no HELLO_ACK after {HANG_GUARD:?} (a hang); {:?}",
                    b.stats()
                );
            }
            Err(e) => panic!("receiving the HELLO_ACK: {e}"),
        }
    };
    let b_inc = match wire::parse_packet(&buf[..n]).unwrap() {
        Packet::Hello { common, .. } => common.src_inc,
        p => panic!("expected HELLO_ACK, got {p:?}"),
    };
    assert_eq!(b_inc, b.incarnation());

    // Wrong tag: dropped, counted, no handler.
    forger.send_to(&forged_data(b_inc, 1, 0xbad), to).unwrap();
    pump_until(&mut b, "the forged message dropped", |b| {
        b.stats().bad_tag_dropped >= 1
    });
    assert!(
        ran.lock().unwrap().is_empty(),
        "a forged message ran a handler"
    );
    assert_eq!(b.stats().bad_tag_dropped, 1);

    // The same forged path with the right tag does reach the handler: the test is real.
    forger.send_to(&forged_data(b_inc, 2, 0xfeed), to).unwrap();
    pump_until(&mut b, "the rightly tagged message handled", |_| {
        !ran.lock().unwrap().is_empty()
    });
    assert_eq!(*ran.lock().unwrap(), vec![2]);
    assert_eq!(b.stats().bad_tag_dropped, 1);
}

fn thread_cpu() -> Duration {
    // SAFETY: getrusage fills the struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    Duration::from_micros(us(ru.ru_utime) + us(ru.ru_stime))
}

#[test]
fn an_idle_endpoint_sleeps_and_wakes_on_a_message_and_on_a_handle_send() {
    let mut b = endpoint(2, 1 << 16);
    let mut a = endpoint(1, 1 << 16);
    let mut c = endpoint(3, 1 << 16);
    a.map(0, b.name(), b.tag()).unwrap();
    b.map(0, c.name(), c.tag()).unwrap();
    let got_b = Arc::new(AtomicU64::new(0));
    let g = got_b.clone();
    b.register(1, move |_, m| g.store(m.args[0], Ordering::SeqCst))
        .unwrap();
    let got_c = Arc::new(AtomicU64::new(0));
    let g = got_c.clone();
    c.register(1, move |_, m| g.store(m.args[0], Ordering::SeqCst))
        .unwrap();
    let handle = b.handle();
    let stop = Arc::new(AtomicBool::new(false));
    let idle_cpu = Arc::new(Mutex::new(None));
    let (s, ic) = (stop.clone(), idle_cpu.clone());
    let (started_tx, started) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        let start = Instant::now();
        let cpu0 = thread_cpu();
        started_tx.send(start).unwrap();
        while !s.load(Ordering::SeqCst) {
            b.wait(None).unwrap();
            b.poll(64).unwrap();
            if start.elapsed() >= Duration::from_secs(5) && ic.lock().unwrap().is_none() {
                *ic.lock().unwrap() = Some((thread_cpu() - cpu0, start.elapsed()));
            }
        }
    });
    // Idle for over 5 s counted from the thread's own start (a thread that starts late on
    // a loaded machine must still have idled that long before the first wake-up).
    let start = started.recv().unwrap();
    std::thread::sleep(
        (start + Duration::from_millis(5100)).saturating_duration_since(Instant::now()),
    );
    // Wake it with a message. B sleeps in `wait(None)`: only the arrival can end it, so
    // any time under the hang guard shows the wake-up.
    let t0 = Instant::now();
    a.send(0, Msg::small(1, &[77])).unwrap();
    while got_b.load(Ordering::SeqCst) != 77 {
        a.poll(64).unwrap();
        assert!(
            t0.elapsed() < HANG_GUARD,
            "a message did not wake the endpoint in {HANG_GUARD:?}"
        );
        std::thread::sleep(Duration::from_micros(100));
    }
    let (cpu, over) = idle_cpu.lock().unwrap().expect("idle cpu measured");
    assert!(over >= Duration::from_secs(5));
    assert!(
        cpu.as_secs_f64() < 0.01 * over.as_secs_f64(),
        "idle endpoint used {cpu:?} of CPU over {over:?}"
    );
    // Wake it with a handle send from this thread: it forwards to C.
    let t1 = Instant::now();
    handle.send(0, 1, &[88], &[]).unwrap();
    while got_c.load(Ordering::SeqCst) != 88 {
        c.poll(64).unwrap();
        assert!(
            t1.elapsed() < HANG_GUARD,
            "a handle send did not wake the endpoint in {HANG_GUARD:?}"
        );
        std::thread::sleep(Duration::from_micros(100));
    }
    stop.store(true, Ordering::SeqCst);
    handle.send(0, 1, &[0], &[]).unwrap();
    t.join().unwrap();
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    am_testkit::conformance::random_bytes(seed, len)
}

/// Sends `size` bytes from each of `senders` endpoints (own threads) to one receiver;
/// returns (bytes sent, bytes retransmitted) summed over the senders.
fn bulk_to_one_receiver(senders: usize, size: usize) -> (u64, u64) {
    let mut rx = endpoint(100, senders * size);
    let landed = Arc::new(Mutex::new(Vec::new()));
    let l = landed.clone();
    rx.register(3, move |ctx, m| {
        let (off, len) = m.bulk.unwrap();
        let ok = ctx.segment()[off as usize..off as usize + len] == pattern(m.args[0], len)[..];
        l.lock().unwrap().push((m.args[0], len, ok));
    })
    .unwrap();
    let rx_name: EndpointName = rx.name();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let rx_thread = std::thread::spawn(move || {
        while !s.load(Ordering::SeqCst) {
            rx.poll(256).unwrap();
            rx.wait(Some(Duration::from_millis(5))).unwrap();
        }
        rx.stats().clone()
    });
    let mut threads = Vec::new();
    for i in 0..senders {
        threads.push(std::thread::spawn(move || {
            let mut tx = endpoint(1 + i as u64, size);
            tx.map(0, rx_name, Tag(100)).unwrap();
            tx.segment_mut().copy_from_slice(&pattern(i as u64, size));
            let freed = Arc::new(AtomicBool::new(false));
            let f = freed.clone();
            tx.set_bulk_free(move |_| f.store(true, Ordering::SeqCst));
            tx.send(
                0,
                Msg::bulk(3, &[i as u64], &[(0, size)], (i * size) as u64),
            )
            .unwrap();
            let start = Instant::now();
            // Stuck is no acknowledgement for HANG_GUARD, however long the whole takes.
            let (mut acks, mut since) = (tx.stats().packets_received, Instant::now());
            while !freed.load(Ordering::SeqCst) {
                tx.poll(256).unwrap();
                tx.wait(Some(Duration::from_millis(5))).unwrap();
                if tx.stats().packets_received != acks {
                    (acks, since) = (tx.stats().packets_received, Instant::now());
                }
                assert!(
                    since.elapsed() < HANG_GUARD,
                    "bulk send stuck: nothing received for {HANG_GUARD:?}; {:?}",
                    tx.stats()
                );
            }
            let s = tx.stats();
            let u = tx.transport().stats();
            assert!(!u.gso_disabled, "the kernel refused UDP GSO on loopback");
            assert!(u.gso_sends > 0, "bulk fragments did not go as GSO messages");
            (s.bytes_sent, s.bytes_retransmitted, start.elapsed())
        }));
    }
    let mut sent = 0;
    let mut retx = 0;
    for t in threads {
        let (s, r, took) = t.join().unwrap();
        eprintln!("sender: {s} bytes, {r} retransmitted, {took:?}");
        sent += s;
        retx += r;
    }
    // Every sender's bulk was acknowledged, so it was handled: this waits only for the
    // handler's log (the hang guard is only that; the check is the equality below).
    let start = Instant::now();
    while landed.lock().unwrap().len() < senders && start.elapsed() < HANG_GUARD {
        std::thread::sleep(Duration::from_millis(1));
    }
    stop.store(true, Ordering::SeqCst);
    let rx_stats = rx_thread.join().unwrap();
    let mut l = landed.lock().unwrap().clone();
    l.sort();
    let want: Vec<(u64, usize, bool)> = (0..senders as u64).map(|i| (i, size, true)).collect();
    assert_eq!(l, want, "bulk did not land byte-exact exactly once");
    assert_eq!(rx_stats.messages_handled, senders as u64);
    (sent, retx)
}

#[test]
fn a_64_mib_bulk_lands_byte_exact_with_under_one_percent_retransmitted() {
    let (sent, retx) = bulk_to_one_receiver(1, 64 << 20);
    assert!(sent >= 64 << 20);
    assert!(
        (retx as f64) < 0.01 * sent as f64,
        "{retx} of {sent} bytes retransmitted"
    );
}

#[test]
fn three_senders_of_16_mib_to_one_receiver_are_paced_together() {
    let (sent, retx) = bulk_to_one_receiver(3, 16 << 20);
    assert!(sent >= 3 * (16 << 20));
    assert!(
        (retx as f64) < 0.01 * sent as f64,
        "{retx} of {sent} bytes retransmitted"
    );
}

#[test]
fn the_event_mask_chooses_what_wakes_wait_and_other_fds_join_the_epoll_set() {
    let mut b = endpoint(2, 1 << 16);
    let mut a = endpoint(1, 1 << 16);
    a.map(0, b.name(), b.tag()).unwrap();
    b.register(1, |_, _| {}).unwrap();
    // Open the connection first.
    a.send(0, Msg::small(1, &[0])).unwrap();
    let t0 = Instant::now();
    while b.stats().messages_handled < 1 {
        assert!(
            t0.elapsed() < HANG_GUARD,
            "the first message was not handled in {HANG_GUARD:?}"
        );
        a.poll(16).unwrap();
        b.poll(16).unwrap();
    }
    pump(&mut a, Duration::from_millis(20));
    b.poll(16).unwrap();
    // With the network masked out, a datagram does not end the wait.
    b.set_event_mask(am_core::EventMask {
        network: false,
        handle: true,
    });
    a.send(0, Msg::small(1, &[1])).unwrap();
    a.poll(16).unwrap();
    // (A lower bound on a sleep: load only makes it longer, so it cannot fail for that.)
    let t0 = Instant::now();
    b.wait(Some(Duration::from_millis(300))).unwrap();
    assert!(
        t0.elapsed() >= Duration::from_millis(290),
        "a masked source woke wait"
    );
    // Unmasked, the pending datagram wakes it at once: a wait that ran to its timeout
    // (HANG_GUARD) did not see it; no load delays a ready wake-up by half that.
    b.set_event_mask(am_core::EventMask::default());
    let t0 = Instant::now();
    b.wait(Some(HANG_GUARD)).unwrap();
    assert!(
        t0.elapsed() < HANG_GUARD / 2,
        "the pending datagram did not end the wait: it ran {:?} (its timeout)",
        t0.elapsed()
    );
    b.poll(16).unwrap();
    assert_eq!(b.stats().messages_handled, 2);
    // Let its delayed acknowledgement go out, so no timer is left to wake it.
    for _ in 0..100 {
        match b.next_timeout() {
            None => break,
            Some(t) => std::thread::sleep(t),
        }
        b.poll(16).unwrap();
    }
    assert_eq!(b.next_timeout(), None);
    // Another fd (standing in for an io_uring eventfd) in the same epoll set wakes it.
    // SAFETY: plain eventfd syscalls on an fd this test owns.
    let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK) };
    assert!(efd >= 0);
    b.transport().add_source(efd).unwrap();
    // The wait must end after the write (not before: it slept) and because of it (not at
    // its timeout, HANG_GUARD).
    let written = Arc::new(AtomicBool::new(false));
    let w = written.clone();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        w.store(true, Ordering::SeqCst);
        let one: u64 = 1;
        unsafe { libc::write(efd, &one as *const u64 as *const libc::c_void, 8) };
    });
    let t0 = Instant::now();
    b.wait(Some(HANG_GUARD)).unwrap();
    let waited = t0.elapsed();
    let after_write = written.load(Ordering::SeqCst);
    writer.join().unwrap();
    assert!(
        after_write,
        "wait returned before the eventfd was written ({waited:?})"
    );
    assert!(
        waited < HANG_GUARD / 2,
        "the eventfd did not end the wait: it ran {waited:?} (its timeout)"
    );
    b.transport().remove_source(efd).unwrap();
    unsafe { libc::close(efd) };
}

#[test]
fn gro_coalesced_receives_are_split_back_into_datagrams() {
    let udp = UdpConfig {
        gro: true,
        ..UdpConfig::default()
    };
    let rx_t = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), udp.clone()).unwrap();
    let mut rx = Endpoint::new(
        rx_t,
        Config {
            tag: Tag(9),
            segment_bytes: 8 << 20,
            ..Config::default()
        },
    );
    let mut tx = endpoint(1, 8 << 20);
    tx.map(0, rx.name(), rx.tag()).unwrap();
    let data = pattern(77, 8 << 20);
    tx.segment_mut().copy_from_slice(&data);
    let ok = Arc::new(Mutex::new(None));
    let o = ok.clone();
    rx.register(3, move |ctx, m| {
        let (off, len) = m.bulk.unwrap();
        *o.lock().unwrap() =
            Some(ctx.segment()[off as usize..off as usize + len] == pattern(77, len)[..]);
    })
    .unwrap();
    tx.send(0, Msg::bulk(3, &[], &[(0, 8 << 20)], 0)).unwrap();
    // Stuck is nothing received by either side for HANG_GUARD, however long the whole takes.
    let moved = |tx: &Endpoint<UdpTransport>, rx: &Endpoint<UdpTransport>| {
        tx.stats().packets_received + rx.stats().packets_received
    };
    let (mut last, mut since) = (moved(&tx, &rx), Instant::now());
    while ok.lock().unwrap().is_none() {
        if moved(&tx, &rx) != last {
            (last, since) = (moved(&tx, &rx), Instant::now());
        }
        assert!(
            since.elapsed() < HANG_GUARD,
            "bulk did not land: nothing received for {HANG_GUARD:?}; {:?} {:?}",
            tx.stats(),
            rx.stats()
        );
        tx.poll(256).unwrap();
        rx.poll(256).unwrap();
    }
    assert_eq!(
        *ok.lock().unwrap(),
        Some(true),
        "bytes differ after GRO splitting"
    );
    assert!(tx.transport().stats().gso_sends > 0);
    assert!(
        rx.transport().stats().gro_buffers > 0,
        "no receive was GRO-coalesced"
    );
    assert_eq!(rx.stats().malformed_dropped, 0);
}
