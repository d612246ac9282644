//! Fragments over Active Messages on UDP loopback: storage servers in their own threads
//! serving their stores, clients' logs striped over them with bulk messages.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use am_core::{Config, Endpoint, EndpointName, Tag};
use am_udp::{UdpConfig, UdpTransport};
use xfs_node::storage::fragment::{FragmentId, FragmentStore, MemFragmentStore, StoreError};
use xfs_node::storage::log::{Log, StripeGroup};
use xfs_node::storage::remote::{ClientPurpose, RemoteStore, ServerOptions, StorageServer};
use xfs_node::storage::uring::{UringOptions, UringStore};

const FRAG: usize = 64 * 1024;
const DEPTH: usize = 32;

fn endpoint(tag: u64, segment_bytes: usize) -> Endpoint<UdpTransport> {
    endpoint_giving_up_after(tag, segment_bytes, Config::default().unreachable_timeout)
}

/// An endpoint that writes off a peer that acknowledges nothing for `unreachable`.
fn endpoint_giving_up_after(
    tag: u64,
    segment_bytes: usize,
    unreachable: Duration,
) -> Endpoint<UdpTransport> {
    let t = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), UdpConfig::default()).unwrap();
    Endpoint::new(
        t,
        Config {
            tag: Tag(tag),
            segment_bytes,
            unreachable_timeout: unreachable,
            ..Config::default()
        },
    )
}

struct Server {
    name: EndpointName,
    tag: Tag,
    stop: Arc<AtomicBool>,
    /// While set, the server's thread sleeps a second before each step (a server that
    /// answers, late).
    slow: Arc<AtomicBool>,
    handle: Option<JoinHandle<usize>>,
}

impl Server {
    /// A storage server thread over `store`; returns the store's most requests in flight.
    fn start<S: FragmentStore + Send + 'static>(
        tag: u64,
        store: S,
        in_flight: fn(&S) -> usize,
    ) -> Server {
        Server::start_giving_up_after(tag, store, in_flight, Config::default().unreachable_timeout)
    }

    /// A server whose endpoint writes off a client that acknowledges nothing for
    /// `unreachable`.
    fn start_giving_up_after<S: FragmentStore + Send + 'static>(
        tag: u64,
        store: S,
        in_flight: fn(&S) -> usize,
        unreachable: Duration,
    ) -> Server {
        let ep = endpoint_giving_up_after(tag, 4 * DEPTH * FRAG, unreachable);
        let mut server = StorageServer::new(
            ep,
            store,
            ServerOptions {
                windows: 4,
                depth: DEPTH,
            },
        )
        .unwrap();
        let (name, tag) = server.name();
        let stop = Arc::new(AtomicBool::new(false));
        let slow = Arc::new(AtomicBool::new(false));
        let (s, late) = (stop.clone(), slow.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if late.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_secs(1));
                }
                if server.step().unwrap_or(0) == 0 {
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
            in_flight(server.store())
        });
        Server {
            name,
            tag,
            stop,
            slow,
            handle: Some(handle),
        }
    }

    fn stop(&mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().map_or(0, |h| h.join().unwrap_or(0))
    }

    fn client(&self, tag: u64) -> RemoteStore<UdpTransport> {
        let ep = endpoint(tag, 2 * DEPTH * FRAG);
        let mut c = RemoteStore::connect(ep, self.name, self.tag, DEPTH, Box::new(|| {})).unwrap();
        c.set_timeout(Duration::from_secs(2));
        c
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn id(segment: u64, index: u16) -> FragmentId {
    FragmentId { segment, index }
}

#[test]
fn fragments_round_trip_over_am_bulk_messages() {
    let mut server = Server::start(0x5e01, MemFragmentStore::new(200, FRAG), |_| 0);
    let mut c = server.client(0xc101);
    assert_eq!(c.fragment_bytes(), FRAG);
    let data: Vec<Vec<u8>> = (0..100u64)
        .map(|i| (0..FRAG as u64 - i).map(|b| (b * 31 + i) as u8).collect())
        .collect();
    let frags: Vec<(FragmentId, &[u8])> = data
        .iter()
        .enumerate()
        .map(|(i, d)| (id(i as u64, 1), d.as_slice()))
        .collect();
    c.write(&frags[..10]).unwrap();
    // Only the first write asks the server for its room; the puts' replies tell the rest.
    for chunk in frags[10..].chunks(10) {
        c.write(chunk).unwrap();
    }
    assert_eq!(c.stats_asked(), 1, "Stat requests for 10 writes");
    c.sync().unwrap();
    assert_eq!(c.free_slots().unwrap(), 100);
    let ids: Vec<FragmentId> = frags.iter().map(|f| f.0).collect();
    for (r, d) in c.read(&ids).into_iter().zip(&data) {
        assert_eq!(&r.unwrap(), d);
    }
    assert_eq!(c.list().unwrap(), ids);
    // A ranged read brings back just those bytes; a range past the end and a missing
    // fragment are errors.
    for (i, (off, len)) in [(0, 4096), (8192, 4096), (FRAG - 4096 - 99, 4096), (5, 1)]
        .into_iter()
        .enumerate()
    {
        let d = &data[i * 7];
        assert_eq!(
            c.read_range(ids[i * 7], off, len).unwrap(),
            d[off..off + len],
            "fragment {i}: {off}+{len}"
        );
    }
    assert!(matches!(
        c.read_range(ids[99], FRAG - 99, 4096),
        Err(StoreError::Config(_))
    ));
    assert!(matches!(
        c.read_range(id(5000, 0), 0, 4096),
        Err(StoreError::NotFound(_))
    ));
    c.delete(&ids[..10]).unwrap();
    c.sync().unwrap();
    assert!(matches!(
        c.read(&[ids[0]]).remove(0),
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(c.list().unwrap().len(), 90);
    // ENOSPC comes back as ENOSPC, before anything is written.
    let big = vec![1u8; FRAG];
    let many: Vec<(FragmentId, &[u8])> = (0..120)
        .map(|i| (id(1000 + i, 0), big.as_slice()))
        .collect();
    assert!(matches!(c.write(&many), Err(StoreError::NoSpace { .. })));
    assert_eq!(c.free_slots().unwrap(), 110);
    // A begun write and a begun sync: sent at once, answered by `finish`; a request in
    // between waits for the begun one first.
    let begun: Vec<(FragmentId, &[u8])> =
        (0..8).map(|i| (id(2000 + i, 2), big.as_slice())).collect();
    c.write_begin(&begun).unwrap();
    c.finish().unwrap();
    c.sync_begin().unwrap();
    c.finish().unwrap();
    let more: Vec<(FragmentId, &[u8])> =
        (0..2).map(|i| (id(3000 + i, 2), big.as_slice())).collect();
    c.write_begin(&more).unwrap();
    assert_eq!(c.free_slots().unwrap(), 100, "the stat after a begun write");
    assert!(c.finish().is_ok(), "nothing left to finish");
    let ids: Vec<FragmentId> = begun.iter().chain(&more).map(|f| f.0).collect();
    assert!(c.read(&ids).into_iter().all(|r| r.unwrap() == big));
    assert!(matches!(
        c.write_begin(&many).and_then(|_| c.finish()),
        Err(StoreError::NoSpace { .. })
    ));
    c.delete(&ids).unwrap();
    c.sync().unwrap();
    // A dead server is an error that names it, not a hang.
    let mut c2 = server.client(0xc102);
    server.stop();
    // A begun sync that another request had to wait for keeps its error for its finish.
    c2.sync_begin().unwrap();
    assert!(c2.free_slots().is_err());
    let e = c2.finish().unwrap_err();
    assert!(e.to_string().contains("storage server"), "{e}");
    let e = c.sync().unwrap_err();
    assert!(e.to_string().contains("storage server"), "{e}");
    let e = c.sync_begin().and_then(|_| c.finish()).unwrap_err();
    assert!(e.to_string().contains("storage server"), "{e}");
}

#[test]
fn a_log_striped_over_four_remote_servers_survives_one_going_down() {
    let dir = std::path::PathBuf::from("/var/tmp");
    let paths: Vec<_> = (0..4)
        .map(|i| dir.join(format!("xfs-remote-{}-{i}.img", std::process::id())))
        .collect();
    let mut servers: Vec<Server> = paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let _ = std::fs::remove_file(p);
            let store = UringStore::open(
                p,
                UringOptions {
                    fragment_bytes: FRAG,
                    depth: 64,
                    create_bytes: Some(32 << 20),
                },
            )
            .unwrap();
            Server::start(0x5e10 + i as u64, store, |s: &UringStore| {
                s.stats().max_in_flight
            })
        })
        .collect();
    let stores = servers
        .iter()
        .enumerate()
        .map(|(i, s)| Some(s.client(0xc110 + i as u64)))
        .collect();
    let group = StripeGroup {
        id: 1,
        servers: vec![0, 1, 2, 3],
        parity: 1,
    };
    let mut log = Log::new(5, group, stores).unwrap();
    let block = |b: u64| -> Vec<u8> { (0..4096u64).map(|i| (i * 7 + b * 13) as u8).collect() };
    for b in 0..3000 {
        log.write(b, &block(b)).unwrap();
    }
    log.fsync().unwrap();
    for b in (0..3000).step_by(11) {
        assert_eq!(log.read(b).unwrap(), block(b));
    }
    // Server 2 goes down: reads rebuild its fragments from the other three.
    servers[2].stop();
    for b in (0..3000).step_by(17) {
        assert_eq!(
            log.read(b).unwrap(),
            block(b),
            "block {b} with server 2 down"
        );
    }
    assert!(log.counters().degraded_reads > 0);
    // Writes still succeed with it down (on the other three: any three rebuild a segment).
    for b in 3000..3200 {
        log.write(b, &block(b)).unwrap();
    }
    log.fsync().unwrap();
    assert_eq!(log.counters().servers_lost, 1);
    for b in (2990..3200).step_by(3) {
        assert_eq!(log.read(b).unwrap(), block(b));
    }
    let in_flight: Vec<usize> = servers.iter_mut().map(|s| s.stop()).collect();
    assert!(
        in_flight.iter().any(|n| *n >= 16),
        "the servers' devices saw at most {in_flight:?} requests in flight"
    );
    eprintln!(
        "servers' most requests in flight: {in_flight:?}; {:?}",
        log.counters()
    );
    for p in &paths {
        let _ = std::fs::remove_file(p);
    }
}

/// A slow server (it answers, a second late) costs a log's stripes that second and nothing
/// else. The log begins each stripe on every server at once and takes the answers as they
/// come; waiting for the servers one after another left the fast servers' answers unread
/// (and their handshakes unanswered) while the slow one took its time, and servers that
/// give up a silent client sooner than that dropped those answers: the stripe failed
/// with the fast servers taken for dead (found by the whole-cluster simulation,
/// `tests/fs_sim.rs`, once it ran the real servers).
#[test]
fn a_slow_server_does_not_get_the_fast_ones_written_off() {
    let servers: Vec<Server> = (0..4)
        .map(|i| {
            Server::start_giving_up_after(
                0x5e30 + i,
                MemFragmentStore::new(400, FRAG),
                |_| 0,
                Duration::from_millis(300),
            )
        })
        .collect();
    let stores = servers
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let ep = endpoint_giving_up_after(
                0xc130 + i as u64,
                2 * DEPTH * FRAG,
                Duration::from_secs(3),
            );
            let mut c = RemoteStore::connect(ep, s.name, s.tag, DEPTH, Box::new(|| {})).unwrap();
            c.set_timeout(Duration::from_secs(4));
            Some(c)
        })
        .collect();
    let group = StripeGroup {
        id: 1,
        servers: vec![0, 1, 2, 3],
        parity: 1,
    };
    let mut log = Log::new(6, group, stores).unwrap();
    let block = |b: u64| -> Vec<u8> { (0..4096u64).map(|i| (i * 5 + b * 11) as u8).collect() };
    for b in 0..40 {
        log.write(b, &block(b)).unwrap();
    }
    log.fsync().unwrap();
    servers[1].slow.store(true, Ordering::Relaxed);
    // Each fsync writes one small stripe, begun on every server at once.
    for round in 0..3u64 {
        for b in 0..10 {
            let b = 100 + round * 10 + b;
            log.write(b, &block(b)).unwrap();
        }
        log.fsync()
            .unwrap_or_else(|e| panic!("fsync {round} with server 1 slow: {e}"));
    }
    assert_eq!(log.counters().servers_lost, 0, "{:?}", log.counters());
    servers[1].slow.store(false, Ordering::Relaxed);
    for b in (0..40).chain(100..130) {
        assert_eq!(log.read(b).unwrap(), block(b), "block {b}");
    }
}

#[test]
fn a_put_outside_the_senders_window_is_refused() {
    use am_core::Msg as AmMsg;
    let server = Server::start(0x5e20, MemFragmentStore::new(50, FRAG), |_| 0);
    // A client that never said hello writes straight into the server's segment.
    let mut rogue = endpoint(0xc120, 2 * FRAG);
    rogue.map(0, server.name, server.tag).unwrap();
    let got = Arc::new(std::sync::Mutex::new(None));
    let g = got.clone();
    rogue
        .register(xfs_node::storage::remote::CLIENT_HANDLER, move |_, m| {
            *g.lock().unwrap() = Some(m.args.to_vec())
        })
        .unwrap();
    rogue
        .request(
            0,
            AmMsg::bulk(
                xfs_node::storage::remote::SERVER_HANDLER,
                &[2, 9, 0, 0],
                &[(0, 4096)],
                0,
            ),
        )
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while got.lock().unwrap().is_none() && std::time::Instant::now() < deadline {
        rogue.poll(64).unwrap();
        std::thread::sleep(Duration::from_micros(100));
    }
    let reply = got.lock().unwrap().clone().expect("the server answers");
    assert_ne!(reply[0], 0, "the put was refused");
    // Nothing was stored.
    let mut honest = server.client(0xc121);
    assert!(honest.list().unwrap().is_empty());
}

/// A log's writer in a newer generation (a member that took a failed node's log over)
/// fences the older one: the older connection's puts are refused from then on, and it
/// cannot connect again in its old generation (the stalled node that wakes up writes
/// nothing more to the log it lost).
#[test]
fn a_newer_generation_of_a_log_fences_the_older_one() {
    let server = Server::start(0x5e30, MemFragmentStore::new(50, FRAG), |_| 0);
    let identity = xfs_node::storage::remote::client_identity(3, ClientPurpose::Log);
    let connect = |generation: u64| {
        let ep = endpoint(0xc130 + generation, 2 * DEPTH * FRAG);
        RemoteStore::connect_as(
            ep,
            server.name,
            server.tag,
            DEPTH,
            Box::new(|| {}),
            (identity, generation),
        )
        .map(|mut c| {
            c.set_timeout(Duration::from_secs(2));
            c
        })
    };
    let mut old = connect(4).expect("the home's own connection");
    old.write(&[(id(1, 0), &[1u8; 64][..])]).unwrap();
    let mut new = connect(7).expect("the member that took the log over");
    let e = old.write(&[(id(2, 0), &[2u8; 64][..])]);
    assert!(e.is_err(), "the fenced writer's put landed");
    // Nor can it delete what was written (its cleaner's view of the log is stale).
    let e = old.delete(&[id(1, 0)]);
    assert!(e.is_err(), "the fenced writer deleted a fragment");
    let again = connect(4)
        .err()
        .expect("the old generation connected again");
    assert!(again.to_string().contains("newer generation"), "{again}");
    new.write(&[(id(3, 0), &[3u8; 64][..])]).unwrap();
    let ids = new.list().unwrap();
    assert_eq!(
        ids,
        vec![id(1, 0), id(3, 0)],
        "what the fenced writer put after the takeover"
    );
}
