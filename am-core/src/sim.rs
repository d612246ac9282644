//! A deterministic simulated network: many endpoints on one thread, virtual time, and
//! seeded faults (loss, duplication, reordering, delay, partitions, dead hosts), each
//! counted. Any run replays exactly from its seed.

use crate::engine::splitmix;
use crate::error::TransportError;
use crate::transport::{Capabilities, EventMask, Notify, Transmit, Transport};
use crate::types::Time;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Fault knobs of the simulated network.
#[derive(Clone, Debug)]
pub struct Faults {
    /// Probability that a datagram is lost.
    pub loss: f64,
    /// Probability that a datagram is delivered twice.
    pub duplicate: f64,
    /// Probability that a datagram is held back so later ones overtake it.
    pub reorder: f64,
    /// Base one-way delay.
    pub delay: Duration,
    /// Extra random delay, up to this much.
    pub jitter: Duration,
    /// Play a reliable, ordered transport (like RDMA RC): no loss, duplication or
    /// reordering, and the engine adds no retransmission.
    pub reliable: bool,
    /// Largest datagram.
    pub max_datagram: usize,
}

impl Faults {
    /// A perfect network with 10 µs delay.
    pub fn none() -> Faults {
        Faults {
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            delay: Duration::from_micros(10),
            jitter: Duration::ZERO,
            reliable: false,
            max_datagram: 1472,
        }
    }
    /// Loss, duplication and reordering each at probability `p`.
    pub fn lossy(p: f64) -> Faults {
        Faults {
            loss: p,
            duplicate: p,
            reorder: p,
            jitter: Duration::from_micros(20),
            ..Faults::none()
        }
    }
    /// A reliable, ordered transport such as RDMA RC.
    pub fn reliable() -> Faults {
        Faults {
            reliable: true,
            ..Faults::none()
        }
    }
}

/// Counters of injected faults.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimCounters {
    /// Datagrams offered to the network.
    pub sent: u64,
    /// Datagrams delivered to an inbox.
    pub delivered: u64,
    /// Datagrams lost by the loss knob.
    pub dropped: u64,
    /// Datagrams duplicated.
    pub duplicated: u64,
    /// Datagrams held back to be reordered.
    pub reordered: u64,
    /// Datagrams dropped by a partition or a dead host.
    pub partitioned: u64,
}

struct InFlight {
    at: u64,
    order: u64,
    from: SocketAddr,
    to: SocketAddr,
    bytes: Vec<u8>,
}

struct Inner {
    seed: u64,
    now: u64,
    rng: u64,
    order: u64,
    faults: Faults,
    heap: BinaryHeap<Reverse<(u64, u64)>>,
    flights: HashMap<u64, InFlight>,
    inboxes: HashMap<SocketAddr, VecDeque<(SocketAddr, Vec<u8>)>>,
    down: HashSet<SocketAddr>,
    cut: HashSet<(SocketAddr, SocketAddr)>,
    counters: SimCounters,
    next_host: u32,
    last_at: HashMap<(SocketAddr, SocketAddr), u64>,
    /// Per transport, peers whose path it reports failed (`Transport::take_failed`).
    failed: HashMap<SocketAddr, Vec<SocketAddr>>,
    /// Datagrams in flight per (from, to): on a reliable network a path with datagrams
    /// moving on it reports progress (`Transport::take_progress`), as an RDMA queue pair's
    /// send completions do while a long WRITE crosses.
    moving: HashMap<(SocketAddr, SocketAddr), u64>,
}

impl Inner {
    fn rand(&mut self) -> u64 {
        // splitmix64: a counter stepped by the golden ratio, then mixed (period 2^64;
        // iterating the mixer on its own output can fall into a short cycle).
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        splitmix(self.rng)
    }
    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (self.rand() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
    fn push(&mut self, at: u64, from: SocketAddr, to: SocketAddr, bytes: Vec<u8>) {
        self.order += 1;
        let o = self.order;
        self.heap.push(Reverse((at, o)));
        *self.moving.entry((from, to)).or_default() += 1;
        self.flights.insert(
            o,
            InFlight {
                at,
                order: o,
                from,
                to,
                bytes,
            },
        );
    }
    fn landed(&mut self, from: SocketAddr, to: SocketAddr) {
        if let Some(n) = self.moving.get_mut(&(from, to)) {
            *n -= 1;
            if *n == 0 {
                self.moving.remove(&(from, to));
            }
        }
    }
    fn deliver_due(&mut self) {
        while let Some(Reverse((at, o))) = self.heap.peek().copied() {
            if at > self.now {
                break;
            }
            self.heap.pop();
            if let Some(f) = self.flights.remove(&o) {
                debug_assert!(f.at == at && f.order == o);
                self.landed(f.from, f.to);
                if self.down.contains(&f.to) || self.cut.contains(&(f.from, f.to)) {
                    self.counters.partitioned += 1;
                    continue;
                }
                self.counters.delivered += 1;
                self.inboxes
                    .entry(f.to)
                    .or_default()
                    .push_back((f.from, f.bytes));
            }
        }
    }
}

/// The simulated network, shared by its transports. Driven from one thread at a time (the
/// replay is exact only then); `Send`, so a transport on it can sit inside a structure that
/// threads share (a node's log and its remote stores).
#[derive(Clone)]
pub struct SimNet(Arc<Mutex<Inner>>);

impl SimNet {
    /// The network's state (a poisoned lock still holds a usable state: every change to it
    /// is made whole under the lock).
    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A network whose every random choice derives from `seed`.
    pub fn new(seed: u64, faults: Faults) -> SimNet {
        SimNet(Arc::new(Mutex::new(Inner {
            seed,
            now: 1_000_000,
            rng: splitmix(seed),
            order: 0,
            faults,
            heap: BinaryHeap::new(),
            flights: HashMap::new(),
            inboxes: HashMap::new(),
            down: HashSet::new(),
            cut: HashSet::new(),
            counters: SimCounters::default(),
            next_host: 1,
            last_at: HashMap::new(),
            failed: HashMap::new(),
            moving: HashMap::new(),
        })))
    }

    /// The seed this network replays from.
    pub fn seed(&self) -> u64 {
        self.inner().seed
    }

    /// A transport at a fresh address.
    pub fn transport(&self) -> SimTransport {
        let addr = {
            let mut i = self.inner();
            let h = i.next_host;
            i.next_host += 1;
            SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(10, 0, (h >> 8) as u8, h as u8)),
                7000,
            )
        };
        self.transport_at(addr)
    }

    /// A transport at `addr` (for example a restarted host); brings the address up.
    pub fn transport_at(&self, addr: SocketAddr) -> SimTransport {
        let mut i = self.inner();
        i.down.remove(&addr);
        i.inboxes.remove(&addr);
        let seed = i.rand();
        SimTransport {
            net: self.clone(),
            addr,
            seed,
            woken: Arc::new(SimNotify),
        }
    }

    /// Takes `addr` down: everything sent to it is lost until a transport is made there.
    pub fn kill(&self, addr: SocketAddr) {
        let mut i = self.inner();
        i.down.insert(addr);
        i.inboxes.remove(&addr);
    }

    /// Cuts (or heals) the path between `a` and `b` in both directions.
    pub fn partition(&self, a: SocketAddr, b: SocketAddr, cut: bool) {
        let mut i = self.inner();
        if cut {
            i.cut.insert((a, b));
            i.cut.insert((b, a));
        } else {
            i.cut.remove(&(a, b));
            i.cut.remove(&(b, a));
        }
    }

    /// The connection between `a` and `b` breaks, as an RDMA queue pair does: what is in
    /// flight between them is lost, and both transports report the other failed
    /// (`Transport::take_failed`). The path itself stays up: new datagrams go through.
    pub fn fail_path(&self, a: SocketAddr, b: SocketAddr) {
        let mut i = self.inner();
        let lost: Vec<u64> = i
            .flights
            .iter()
            .filter(|(_, f)| (f.from, f.to) == (a, b) || (f.from, f.to) == (b, a))
            .map(|(&o, _)| o)
            .collect();
        for o in lost {
            if let Some(f) = i.flights.remove(&o) {
                i.landed(f.from, f.to);
            }
            i.counters.partitioned += 1;
        }
        i.failed.entry(a).or_default().push(b);
        i.failed.entry(b).or_default().push(a);
    }

    /// Changes the fault knobs.
    pub fn set_faults(&self, f: Faults) {
        self.inner().faults = f;
    }

    /// Virtual now.
    pub fn now(&self) -> Time {
        Time(self.inner().now)
    }

    /// When the next datagram lands, if any is in flight.
    pub fn next_delivery(&self) -> Option<Time> {
        self.inner().heap.peek().map(|Reverse((at, _))| Time(*at))
    }

    /// Moves virtual time forward to `t` (never back) and lands datagrams due by then.
    pub fn advance_to(&self, t: Time) {
        let mut i = self.inner();
        if t.0 > i.now {
            i.now = t.0;
        }
        i.deliver_due();
    }

    /// Fault counters.
    pub fn counters(&self) -> SimCounters {
        self.inner().counters.clone()
    }
}

struct SimNotify;
impl Notify for SimNotify {
    fn notify(&self) {}
}

/// One endpoint's view of the simulated network.
pub struct SimTransport {
    net: SimNet,
    addr: SocketAddr,
    seed: u64,
    woken: Arc<SimNotify>,
}

impl Transport for SimTransport {
    fn capabilities(&self) -> Capabilities {
        let f = &self.net.inner().faults;
        Capabilities {
            reliable: f.reliable,
            bulk_placement: false,
            max_datagram: f.max_datagram,
            max_window: u32::MAX,
        }
    }
    fn local_addr(&self) -> SocketAddr {
        self.addr
    }
    fn now(&self) -> Time {
        self.net.now()
    }
    fn seed(&self) -> u64 {
        self.seed
    }
    fn send_batch(&mut self, batch: &[Transmit]) -> Result<usize, TransportError> {
        let mut i = self.net.inner();
        if i.down.contains(&self.addr) {
            i.counters.partitioned += batch.len() as u64;
            return Ok(batch.len());
        }
        for t in batch {
            i.counters.sent += 1;
            if t.bytes.len() > i.faults.max_datagram + 256 {
                i.counters.dropped += 1;
                continue;
            }
            let f = i.faults.clone();
            let base = i.now + f.delay.as_nanos() as u64;
            if f.reliable {
                // FIFO per pair: never earlier than the last datagram on this path.
                let key = (self.addr, t.to);
                let at = base.max(i.last_at.get(&key).copied().unwrap_or(0));
                i.last_at.insert(key, at);
                i.push(at, self.addr, t.to, t.bytes.clone());
                continue;
            }
            if i.chance(f.loss) {
                i.counters.dropped += 1;
                continue;
            }
            let jitter = f.jitter.as_nanos() as u64;
            let mut at = base + if jitter > 0 { i.rand() % jitter } else { 0 };
            if i.chance(f.reorder) {
                i.counters.reordered += 1;
                at += f.delay.as_nanos() as u64 * 3 + jitter * 2 + 1;
            }
            i.push(at, self.addr, t.to, t.bytes.clone());
            if i.chance(f.duplicate) {
                i.counters.duplicated += 1;
                let extra = i.rand() % (jitter * 4 + f.delay.as_nanos() as u64 + 1);
                i.push(at + extra, self.addr, t.to, t.bytes.clone());
            }
        }
        Ok(batch.len())
    }
    fn recv_batch(
        &mut self,
        max: usize,
        deliver: &mut dyn FnMut(SocketAddr, &[u8]),
    ) -> Result<usize, TransportError> {
        let mut n = 0;
        while n < max {
            let item = self
                .net
                .inner()
                .inboxes
                .get_mut(&self.addr)
                .and_then(|q| q.pop_front());
            let Some((from, bytes)) = item else { break };
            deliver(from, &bytes);
            n += 1;
        }
        Ok(n)
    }
    fn wait(&mut self, _timeout: Option<Duration>, _mask: EventMask) -> Result<(), TransportError> {
        // Virtual time only moves when the simulation driver advances it.
        Ok(())
    }
    fn notifier(&self) -> Arc<dyn Notify> {
        self.woken.clone()
    }
    fn take_failed(&mut self, failed: &mut dyn FnMut(SocketAddr)) {
        let list = {
            let mut i = self.net.inner();
            if i.failed.is_empty() {
                return;
            }
            i.failed.remove(&self.addr)
        };
        for a in list.unwrap_or_default() {
            failed(a);
        }
    }
    fn take_progress(&mut self, progressed: &mut dyn FnMut(SocketAddr, Time)) {
        let moving: Vec<SocketAddr> = {
            let i = self.net.inner();
            if !i.faults.reliable || i.down.contains(&self.addr) {
                return;
            }
            // A path that is cut, or leads to a dead host, moves nothing.
            i.moving
                .keys()
                .filter(|&&(from, to)| {
                    from == self.addr && !i.down.contains(&to) && !i.cut.contains(&(from, to))
                })
                .map(|&(_, to)| to)
                .collect()
        };
        let now = self.net.now();
        for to in moving {
            progressed(to, now);
        }
    }
}
