//! The conformance harness over real verbs: endpoints on [`RdmaTransport`]s bound to the
//! address of the RDMA device's netdev (`AM_RDMA_ADDR`, default `10.99.0.1`, the SoftRoCE
//! VM's `dummy0`).

use crate::conformance::Harness;
use am_core::{Config, Endpoint, Time};
use am_rdma::{RdmaConfig, RdmaTransport};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// The IP address tests bind to.
pub fn test_ip() -> IpAddr {
    std::env::var("AM_RDMA_ADDR")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(IpAddr::from([10, 99, 0, 1]))
}

/// Why verbs tests cannot run here, or `None` when a device with `test_ip()` is present.
pub fn unavailable() -> Option<String> {
    let names = am_rdma::verbs::device_names();
    if names.is_empty() {
        return Some(
            "no RDMA verbs device (they run in the SoftRoCE VM: `bash scripts/verbs-tests.sh`)"
                .into(),
        );
    }
    match RdmaTransport::bind(SocketAddr::new(test_ip(), 0), RdmaConfig::default()) {
        Ok(_) => None,
        Err(e) => Some(format!(
            "devices {names:?} present but unusable at {}: {e}",
            test_ip()
        )),
    }
}

/// Skips (returning true) when no device is usable, unless `AM_RDMA_REQUIRE=1`, under which
/// a missing device panics with the reason.
pub fn skip_without_device(test: &str) -> bool {
    match unavailable() {
        None => false,
        Some(why) => {
            if std::env::var("AM_RDMA_REQUIRE").is_ok_and(|v| v == "1") {
                panic!("{test}: AM_RDMA_REQUIRE=1 but {why}");
            }
            // Straight to stderr, past the test harness's capture: a skip must be seen.
            let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
            true
        }
    }
}

/// Endpoints on real verbs.
pub struct RdmaHarness {
    origin: Instant,
    /// Transport settings for new endpoints.
    pub rdma: RdmaConfig,
    /// Bulk size of the classes check.
    pub bulk: usize,
}

impl RdmaHarness {
    /// A harness moving `bulk` bytes in the classes check.
    pub fn new(bulk: usize) -> RdmaHarness {
        RdmaHarness {
            origin: Instant::now(),
            rdma: RdmaConfig::default(),
            bulk,
        }
    }

    fn make(&mut self, addr: SocketAddr, cfg: Config) -> Endpoint<RdmaTransport> {
        let t = RdmaTransport::bind(addr, self.rdma.clone())
            .unwrap_or_else(|e| panic!("harness: cannot open the RDMA transport at {addr}: {e}"));
        Endpoint::try_new(t, cfg)
            .unwrap_or_else(|e| panic!("harness: cannot attach the endpoint: {e}"))
    }
}

impl Harness for RdmaHarness {
    type T = RdmaTransport;

    fn base_config(&self) -> Config {
        Config {
            segment_bytes: (self.bulk * 2 + (1 << 20)).max(4 << 20),
            ..Config::default()
        }
    }

    fn endpoint(&mut self, cfg: Config) -> Endpoint<RdmaTransport> {
        self.make(SocketAddr::new(test_ip(), 0), cfg)
    }

    fn endpoint_at(&mut self, addr: SocketAddr, cfg: Config) -> Endpoint<RdmaTransport> {
        self.make(addr, cfg)
    }

    fn kill(&mut self, ep: Endpoint<RdmaTransport>) {
        // Destroys its queue pairs and closes its socket: on rxe the peer sees nothing, as
        // with a killed process.
        drop(ep);
    }

    fn run(
        &mut self,
        eps: &mut [&mut Endpoint<RdmaTransport>],
        limit: Duration,
        done: &mut dyn FnMut() -> bool,
    ) -> bool {
        let end = Instant::now() + limit;
        loop {
            for ep in eps.iter_mut() {
                if let Err(e) = ep.poll(256) {
                    panic!("harness: poll failed: {e}");
                }
            }
            if done() {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
        }
    }

    fn now(&self) -> Time {
        Time(self.origin.elapsed().as_nanos() as u64)
    }

    fn bulk_bytes(&self) -> usize {
        self.bulk
    }
}
