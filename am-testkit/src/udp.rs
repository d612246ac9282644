//! A conformance [`Harness`] over real UDP sockets: on loopback, or spread over network
//! namespaces (each endpoint bound inside one, round-robin).
//!
//! A failure to bind
//! (a missing namespace, a taken port) panics with the address and the OS error, because
//! the `Harness` trait makes endpoints infallibly and a test cannot go on without them.

use crate::conformance::{poll_until, Harness};
use am_core::{Config, Endpoint, Stats, Time};
use am_udp::{UdpConfig, UdpTransport};
use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Where endpoints are bound.
#[derive(Clone, Debug)]
pub enum Site {
    /// An address of this network namespace (loopback, say).
    Local(IpAddr),
    /// An address inside the named network namespace (`ip netns add NAME`).
    Netns {
        /// Namespace name under /run/netns.
        name: String,
        /// Address inside it.
        ip: IpAddr,
    },
}

impl Site {
    fn ip(&self) -> IpAddr {
        match self {
            Site::Local(ip) | Site::Netns { ip, .. } => *ip,
        }
    }
}

/// Binds a UDP socket at `addr` inside network namespace `ns` (a thread enters the
/// namespace, binds, and exits; the socket stays in the namespace).
pub fn bind_in_netns(ns: &str, addr: SocketAddr) -> io::Result<UdpSocket> {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let f = std::fs::File::open(&path)
                .map_err(|e| io::Error::new(e.kind(), format!("open {path}: {e}")))?;
            // SAFETY: setns on this (short-lived) thread only.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            UdpSocket::bind(addr)
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("bind thread panicked")))
    })
}

/// Conformance harness over UDP.
pub struct UdpHarness {
    /// Base endpoint configuration.
    pub config: Config,
    /// Driver configuration.
    pub udp: UdpConfig,
    /// Sites used round-robin for new endpoints.
    pub sites: Vec<Site>,
    /// Bulk size for the classes check.
    pub bulk: usize,
    next: usize,
    origin: Instant,
    seen: BTreeMap<(SocketAddr, u64), Stats>,
}

impl UdpHarness {
    /// A harness binding endpoints round-robin at `sites`.
    pub fn new(sites: Vec<Site>) -> UdpHarness {
        UdpHarness {
            config: Config {
                segment_bytes: 4 << 20,
                ..Config::default()
            },
            udp: UdpConfig::default(),
            sites,
            bulk: 1 << 20,
            next: 0,
            origin: Instant::now(),
            seen: BTreeMap::new(),
        }
    }

    /// On IPv4 loopback.
    pub fn loopback() -> UdpHarness {
        Self::new(vec![Site::Local("127.0.0.1".parse().expect("ip"))])
    }

    fn bind(&self, site: &Site, port: u16) -> UdpTransport {
        let addr = SocketAddr::new(site.ip(), port);
        let t = match site {
            Site::Local(_) => UdpTransport::bind(addr, self.udp.clone()),
            Site::Netns { name, .. } => {
                let s = bind_in_netns(name, addr)
                    .unwrap_or_else(|e| panic!("bind {addr} in netns {name}: {e}"));
                UdpTransport::from_socket(s, self.udp.clone())
            }
        };
        t.unwrap_or_else(|e| panic!("{e}"))
    }

    fn record(&mut self, ep: &Endpoint<UdpTransport>) {
        self.seen
            .insert((ep.name().addr, ep.incarnation()), ep.stats().clone());
    }

    /// Counters summed over every endpoint this harness has run.
    pub fn total_stats(&self) -> Stats {
        let mut t = Stats::default();
        for s in self.seen.values() {
            t.add(s);
        }
        t
    }
}

impl Harness for UdpHarness {
    type T = UdpTransport;
    fn base_config(&self) -> Config {
        self.config.clone()
    }
    fn endpoint(&mut self, cfg: Config) -> Endpoint<UdpTransport> {
        let site = self.sites[self.next % self.sites.len()].clone();
        self.next += 1;
        Endpoint::new(self.bind(&site, 0), cfg)
    }
    fn endpoint_at(&mut self, addr: SocketAddr, cfg: Config) -> Endpoint<UdpTransport> {
        let site = self
            .sites
            .iter()
            .find(|s| s.ip() == addr.ip())
            .cloned()
            .unwrap_or(Site::Local(addr.ip()));
        Endpoint::new(self.bind(&site, addr.port()), cfg)
    }
    fn kill(&mut self, ep: Endpoint<UdpTransport>) {
        self.record(&ep);
        drop(ep);
    }
    fn run(
        &mut self,
        eps: &mut [&mut Endpoint<UdpTransport>],
        limit: Duration,
        done: &mut dyn FnMut() -> bool,
    ) -> bool {
        let ok = poll_until(eps, limit, done, &mut || 0, Duration::from_micros(50));
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
