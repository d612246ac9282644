//! A conformance [`Harness`] over DPDK ports, and the frame switch it needs.
//!
//! Every endpoint gets a node of its own: an IPv4 address `10.0.0.N`, a MAC made from it
//! and UDP port 7000, on one of two fabrics:
//!
//! * [`Fabric::Rings`]: a `net_ring` port per node (`rte_eth_from_rings`), all in this
//!   process; [`RingSwitch`] moves frames from each port's Tx ring to the Rx ring of the
//!   port owning the destination MAC (broadcasts to all), as an Ethernet switch would.
//! * [`Fabric::Queues`]: a queue pair per live endpoint of one port (a `net_memif` client
//!   port; a node takes its last queue again when free, else another free one);
//!   another process switches between the queues (`examples/dpdk_peer.rs switch`), so
//!   every frame crosses to that process and back over memif.
//!
//! The first endpoints learn the later ones by ARP; the later ones get the earlier ones
//! as static neighbours (so both paths run). A killed endpoint's node stays (its MAC, its
//! port or queue); a restart at its address takes them again, as a restarted process on
//! the same NIC would. Frames to a dead node are dropped by the switch.
//!
//! Test code shipped in the library; set-up failures panic with the DPDK error because
//! the `Harness` trait makes endpoints infallibly.

use crate::conformance::{poll_until, Harness};
use am_core::{Config, Endpoint, Stats, Time};
use am_dpdk::frame::{Mac, BROADCAST};
use am_dpdk::sys::{Mbuf, MbufPool, Port, PortSpec, Ring};
use am_dpdk::{mac_for, DpdkConfig, DpdkStats, DpdkTransport};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

/// The UDP port every harness endpoint uses.
pub const HARNESS_UDP_PORT: u16 = 7000;

/// Moves frames between ring ports by destination MAC.
pub struct RingSwitch {
    pool: MbufPool,
    ports: Vec<(Mac, Ring, Ring, bool)>,
    buf: Vec<Mbuf>,
    out: Vec<Mbuf>,
    /// Frames moved.
    pub switched: u64,
    /// Frames dropped (to a dead or unknown MAC, or a full ring).
    pub dropped: u64,
    /// When set, a copy of every frame switched is kept here.
    pub tap: Option<Vec<Vec<u8>>>,
}

impl RingSwitch {
    /// An empty switch (with a pool for broadcast copies).
    pub fn new() -> RingSwitch {
        RingSwitch {
            pool: MbufPool::new(4095).unwrap_or_else(|e| panic!("{e}")),
            ports: Vec::new(),
            buf: Vec::new(),
            out: Vec::new(),
            switched: 0,
            dropped: 0,
            tap: None,
        }
    }

    /// Plugs a port in: frames to `mac` go into `rx`, frames in `tx` are switched.
    pub fn plug(&mut self, mac: Mac, rx: Ring, tx: Ring) -> usize {
        self.ports.push((mac, rx, tx, true));
        self.ports.len() - 1
    }

    /// Marks a port up or down (down: frames to it are dropped, its Rx ring emptied).
    pub fn set_up(&mut self, i: usize, up: bool) {
        self.ports[i].3 = up;
        if !up {
            let mut junk = Vec::new();
            while self.ports[i].1.dequeue(&mut junk, 256) > 0 {
                self.dropped += junk.len() as u64;
                junk.clear();
            }
        }
    }

    /// Puts frames straight into port `i`'s Rx ring (as if the wire delivered them).
    pub fn inject(&mut self, i: usize, frames: &[Vec<u8>]) -> usize {
        let mut v: Vec<Mbuf> = frames.iter().filter_map(|f| self.pool.frame(f)).collect();
        let n = self.ports[i].1.enqueue(&mut v);
        self.dropped += v.len() as u64;
        n
    }

    /// Moves every frame waiting in a Tx ring; returns how many.
    pub fn step(&mut self) -> usize {
        let mut moved = 0;
        for i in 0..self.ports.len() {
            self.buf.clear();
            self.ports[i].2.dequeue(&mut self.buf, 512);
            let frames = std::mem::take(&mut self.buf);
            for m in frames {
                moved += 1;
                let d = m.data();
                if let Some(t) = self.tap.as_mut() {
                    t.push(d.to_vec());
                }
                if d.len() < 6 {
                    self.dropped += 1;
                    continue;
                }
                let mut dst = [0u8; 6];
                dst.copy_from_slice(&d[..6]);
                if dst == BROADCAST {
                    for j in 0..self.ports.len() {
                        if j != i && self.ports[j].3 {
                            if let Some(c) = self.pool.frame(m.data()) {
                                self.out.push(c);
                                let n = self.ports[j].1.enqueue(&mut self.out);
                                self.switched += n as u64;
                                self.dropped += self.out.len() as u64;
                                self.out.clear();
                            }
                        }
                    }
                    continue;
                }
                match self.ports.iter().position(|p| p.0 == dst && p.3) {
                    Some(j) => {
                        self.out.push(m);
                        let n = self.ports[j].1.enqueue(&mut self.out);
                        self.switched += n as u64;
                        self.dropped += self.out.len() as u64;
                        self.out.clear();
                    }
                    None => self.dropped += 1,
                }
            }
        }
        moved
    }
}

impl Default for RingSwitch {
    fn default() -> Self {
        Self::new()
    }
}

/// Where the harness's nodes live.
pub enum Fabric {
    /// A ring port per node, switched in this process.
    Rings(RingSwitch),
    /// A queue pair per node of this port, switched by another process.
    Queues(Port),
}

struct Node {
    ip: Ipv4Addr,
    /// Ring fabric: the port and its index in the switch; queue fabric: the queue.
    port: Option<Port>,
    index: usize,
}

/// Conformance harness over DPDK.
pub struct DpdkHarness {
    /// Base endpoint configuration.
    pub config: Config,
    /// Bulk size for the classes check.
    pub bulk: usize,
    /// Where nodes live.
    pub fabric: Fabric,
    /// Driver settings applied to every endpoint (address and MAC are the harness's).
    pub dpdk: DpdkConfig,
    nodes: Vec<Node>,
    origin: Instant,
    seen: BTreeMap<(SocketAddr, u64), (Stats, DpdkStats)>,
}

impl DpdkHarness {
    /// A harness on `fabric`.
    pub fn new(fabric: Fabric) -> DpdkHarness {
        DpdkHarness {
            config: Config {
                segment_bytes: 4 << 20,
                ..Config::default()
            },
            bulk: 1 << 20,
            fabric,
            dpdk: DpdkConfig::new(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)),
            nodes: Vec::new(),
            origin: Instant::now(),
            seen: BTreeMap::new(),
        }
    }

    /// Ring ports switched in this process.
    pub fn rings() -> DpdkHarness {
        Self::new(Fabric::Rings(RingSwitch::new()))
    }

    /// The address of node `i`.
    pub fn node_ip(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, (i / 250) as u8, (i % 250) as u8 + 1)
    }

    fn transport(&mut self, i: usize) -> DpdkTransport {
        let ip = self.nodes[i].ip;
        let mut cfg = self.dpdk.clone();
        cfg.addr = SocketAddrV4::new(ip, HARNESS_UDP_PORT);
        cfg.mac = Some(mac_for(ip));
        // Earlier nodes as static neighbours; later ones are learned by ARP.
        cfg.neighbours = self.nodes[..i]
            .iter()
            .map(|n| (n.ip, mac_for(n.ip)))
            .collect();
        let index = self.nodes[i].index;
        let r = match (&mut self.fabric, &mut self.nodes[i].port) {
            (Fabric::Rings(sw), Some(p)) => {
                sw.set_up(index, true);
                let info = p.info().clone();
                p.take_queue(0)
                    .and_then(|q| DpdkTransport::new(q, info, cfg))
            }
            (Fabric::Queues(p), _) => {
                // The node's last queue if free (the switch still sends its MAC there),
                // else any free one (the switch learns the MAC's new queue from its
                // first frame).
                let info = p.info().clone();
                let n = p.queues() as usize;
                let q = (0..n)
                    .map(|k| ((index + k) % n) as u16)
                    .find_map(|q| p.take_queue(q).ok())
                    .unwrap_or_else(|| panic!("all {n} queues of the port are in use"));
                self.nodes[i].index = q.id() as usize;
                DpdkTransport::new(q, info, cfg)
            }
            (Fabric::Rings(_), None) => unreachable!("ring nodes have a port"),
        };
        r.unwrap_or_else(|e| panic!("node {ip}: {e}"))
    }

    fn record(&mut self, ep: &Endpoint<DpdkTransport>) {
        self.seen.insert(
            (ep.name().addr, ep.incarnation()),
            (ep.stats().clone(), ep.transport().stats().clone()),
        );
    }

    /// Engine counters summed over every endpoint this harness has run.
    pub fn total_stats(&self) -> Stats {
        let mut t = Stats::default();
        for (s, _) in self.seen.values() {
            t.add(s);
        }
        t
    }

    /// Driver counters summed over every endpoint this harness has run.
    pub fn driver_stats(&self) -> DpdkStats {
        let mut d = DpdkStats::default();
        for (_, s) in self.seen.values() {
            d.rx_frames += s.rx_frames;
            d.rx_delivered += s.rx_delivered;
            d.tx_frames += s.tx_frames;
            d.arp_requests += s.arp_requests;
            d.arp_replies += s.arp_replies;
            d.arp_learned += s.arp_learned;
            d.not_our_mac += s.not_our_mac;
            d.wrong_port += s.wrong_port;
            d.not_our_address += s.not_our_address;
            for (k, v) in &s.bad {
                *d.bad.entry(*k).or_default() += v;
            }
        }
        d
    }

    /// Frames into node `addr`'s Rx ring as if from the wire (ring fabric only).
    pub fn inject(&mut self, addr: SocketAddr, frames: &[Vec<u8>]) -> usize {
        let Some(i) = self
            .nodes
            .iter()
            .position(|n| IpAddr::V4(n.ip) == addr.ip())
        else {
            return 0;
        };
        match &mut self.fabric {
            Fabric::Rings(sw) => sw.inject(self.nodes[i].index, frames),
            Fabric::Queues(_) => 0,
        }
    }

    /// The ring switch (ring fabric only).
    pub fn switch(&mut self) -> Option<&mut RingSwitch> {
        match &mut self.fabric {
            Fabric::Rings(sw) => Some(sw),
            Fabric::Queues(_) => None,
        }
    }

    fn new_node(&mut self, ip: Ipv4Addr) -> usize {
        let i = self.nodes.len();
        let (port, index) = match &mut self.fabric {
            Fabric::Rings(sw) => {
                let (port, rx, tx) =
                    Port::from_rings(&PortSpec::default()).unwrap_or_else(|e| panic!("{e}"));
                let index = sw.plug(mac_for(ip), rx, tx);
                (Some(port), index)
            }
            Fabric::Queues(p) => (None, i % p.queues() as usize),
        };
        self.nodes.push(Node { ip, port, index });
        i
    }
}

impl Harness for DpdkHarness {
    type T = DpdkTransport;
    fn base_config(&self) -> Config {
        self.config.clone()
    }
    fn endpoint(&mut self, cfg: Config) -> Endpoint<DpdkTransport> {
        let i = self.new_node(Self::node_ip(self.nodes.len()));
        let t = self.transport(i);
        Endpoint::new(t, cfg)
    }
    fn endpoint_at(&mut self, addr: SocketAddr, cfg: Config) -> Endpoint<DpdkTransport> {
        let i = match self
            .nodes
            .iter()
            .position(|n| IpAddr::V4(n.ip) == addr.ip())
        {
            Some(i) => i,
            None => match addr.ip() {
                IpAddr::V4(ip) => self.new_node(ip),
                IpAddr::V6(_) => panic!("DPDK harness nodes are IPv4: {addr}"),
            },
        };
        let t = self.transport(i);
        Endpoint::new(t, cfg)
    }
    fn kill(&mut self, ep: Endpoint<DpdkTransport>) {
        self.record(&ep);
        let ip = ep.name().addr.ip();
        drop(ep);
        if let Some(i) = self.nodes.iter().position(|n| IpAddr::V4(n.ip) == ip) {
            if let Fabric::Rings(sw) = &mut self.fabric {
                sw.set_up(self.nodes[i].index, false);
            }
        }
    }
    fn run(
        &mut self,
        eps: &mut [&mut Endpoint<DpdkTransport>],
        limit: Duration,
        done: &mut dyn FnMut() -> bool,
    ) -> bool {
        let fabric = &mut self.fabric;
        let mut pump = || match fabric {
            Fabric::Rings(sw) => sw.step(),
            Fabric::Queues(_) => 0,
        };
        let ok = poll_until(eps, limit, done, &mut pump, Duration::from_micros(20));
        for ep in eps.iter() {
            self.record(ep);
        }
        ok
    }
    fn now(&self) -> Time {
        Time(self.origin.elapsed().as_nanos() as u64)
    }
    fn bulk_bytes(&self) -> usize {
        self.bulk
    }
}
