//! The simulated storage tier: the node's own storage-server code ([`StorageServer`], each
//! over an in-memory [`MemFragmentStore`]) and the node's own store clients
//! ([`RemoteStore`]), talking Active Messages over a simulated network of their own, with
//! the same faults as the shards' (loss, duplication, reordering, jitter). A node's log
//! stripes over [`SimStore`]s exactly as a started node's log stripes over its
//! `RemoteStore<UdpTransport>`s.
//!
//! Everything runs on the simulation's thread. A store call waits as a real one does, by
//! polling its endpoint; between polls it runs the tier's pump, which moves the storage
//! network's virtual time to its next delivery (at most [`PUMP_STEP`] ahead) and lets every
//! server that is up serve what arrived. A lost server is taken off the network: its
//! clients' retransmissions go unanswered until their endpoints declare it unreachable, as
//! over UDP. The storage network keeps its own clock, so the time a store call waits does
//! not age the shards' connections (a node's log actor runs on its own thread, and its
//! shards keep answering while it waits).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use am_core::sim::{Faults, SimNet, SimTransport};
use am_core::{Config, Endpoint, EndpointName, Tag, Time};

use crate::storage::fragment::{FragmentStore, MemFragmentStore, StoreError};
use crate::storage::remote::{RemoteStore, ServerOptions, StorageServer};

/// A node's store client of one simulated server.
pub type SimStore = RemoteStore<SimTransport>;

/// Requests a store client keeps in flight (as a started node's: a stripe's batch of up to
/// `AT_ONCE_FRAGMENTS` per server is begun at once, not written one server after another).
pub const SIM_STORE_DEPTH: usize = 16;
/// Clients each server has room for: every node's log, the cleaner's readers, and the
/// logs recovered after crashes (a window is never handed back).
pub const SIM_SERVER_WINDOWS: usize = 24;
/// The furthest the pump moves the storage network's clock in one step.
pub const PUMP_STEP: Duration = Duration::from_micros(500);

/// The tag of the storage network's endpoints.
const STORAGE_TAG: Tag = Tag(0x5707_a6e0);

/// One simulated storage server.
struct TierServer {
    server: StorageServer<SimTransport, MemFragmentStore>,
    addr: SocketAddr,
    /// False once the server is lost for good.
    up: bool,
}

/// The storage servers and the network their clients reach them on; cloned handles share
/// them.
#[derive(Clone)]
pub struct StorageTier {
    net: SimNet,
    servers: Arc<Mutex<Vec<TierServer>>>,
}

/// What the storage tier did in a run.
#[derive(Clone, Copy, Debug, Default)]
pub struct TierCounters {
    /// Requests the servers answered.
    pub served: u64,
    /// Requests the servers refused as malformed or outside their sender's window.
    pub bad_requests: u64,
    /// Datagrams the storage network lost (or delivered to a lost server).
    pub lost: u64,
    /// Datagrams it delivered twice.
    pub duplicated: u64,
}

impl StorageTier {
    /// `servers` servers of `slots` fragments of `fragment_bytes` each, on a network whose
    /// faults and random choices derive from `faults` and `seed`.
    pub fn new(
        seed: u64,
        faults: Faults,
        servers: usize,
        slots: usize,
        fragment_bytes: usize,
    ) -> StorageTier {
        let net = SimNet::new(seed, faults);
        let list = (0..servers)
            .map(|_| {
                let ep = Endpoint::new(
                    net.transport(),
                    Config {
                        tag: STORAGE_TAG,
                        segment_bytes: SIM_SERVER_WINDOWS * SIM_STORE_DEPTH * fragment_bytes,
                        ..Config::default()
                    },
                );
                let addr = ep.name().addr;
                let server = StorageServer::new(
                    ep,
                    MemFragmentStore::new(slots, fragment_bytes),
                    ServerOptions {
                        windows: SIM_SERVER_WINDOWS,
                        depth: SIM_STORE_DEPTH,
                    },
                )
                .unwrap_or_else(|e| unreachable!("the segment is sized for the windows: {e}"));
                TierServer {
                    server,
                    addr,
                    up: true,
                }
            })
            .collect();
        StorageTier {
            net,
            servers: Arc::new(Mutex::new(list)),
        }
    }

    fn servers(&self) -> MutexGuard<'_, Vec<TierServer>> {
        self.servers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One step of the storage network: its clock to the next delivery (at most
    /// [`PUMP_STEP`] on), then every server that is up serves what reached it.
    pub fn pump(&self) {
        let now = self.net.now();
        let step = Time(now.0 + PUMP_STEP.as_nanos() as u64);
        let to = self.net.next_delivery().map_or(step, |t| t.min(step));
        self.net.advance_to(to);
        for s in self.servers().iter_mut().filter(|s| s.up) {
            // A simulated transport does not fail; a step that did would only serve less.
            let _ = s.server.step();
        }
    }

    /// A new store client of server `j`, on an endpoint of its own (`None`: the server is
    /// lost, or did not answer, as a started node's connect fails). A server that is up
    /// and refuses the client has no window left: the simulation is set up wrong
    /// ([`SIM_SERVER_WINDOWS`]), and it stops with that rather than run degraded.
    pub fn connect(&self, j: usize) -> Option<SimStore> {
        let (addr, tag, frag) = {
            let mut s = self.servers();
            let t = s.get_mut(j).filter(|t| t.up)?;
            let (_, tag) = t.server.name();
            (t.addr, tag, t.server.store().fragment_bytes())
        };
        let ep = Endpoint::new(
            self.net.transport(),
            Config {
                tag: STORAGE_TAG,
                segment_bytes: 2 * SIM_STORE_DEPTH * frag,
                ..Config::default()
            },
        );
        let tier = self.clone();
        match RemoteStore::connect(
            ep,
            EndpointName { addr, vnet: 0 },
            tag,
            SIM_STORE_DEPTH,
            Box::new(move || tier.pump()),
        ) {
            Ok(s) => Some(s),
            Err(StoreError::Config(e)) => panic!("storage server {j} refused a client: {e}"),
            Err(_) => None,
        }
    }

    /// A store client of every server, in stripe-group order.
    pub fn stores(&self) -> Vec<Option<SimStore>> {
        (0..self.len()).map(|j| self.connect(j)).collect()
    }

    /// Servers in the tier.
    pub fn len(&self) -> usize {
        self.servers().len()
    }

    /// Whether the tier has no server.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Lose server `j` for good: it serves nothing more, and what is sent to it is lost.
    pub fn lose(&self, j: usize) {
        let addr = {
            let mut s = self.servers();
            let Some(t) = s.get_mut(j) else { return };
            t.up = false;
            t.addr
        };
        self.net.kill(addr);
    }

    /// The fewest free slots of a server that is up, and the most slots of any.
    pub fn space(&self) -> (usize, usize) {
        let mut s = self.servers();
        let mut free = usize::MAX;
        let mut total = 0;
        for t in s.iter_mut().filter(|t| t.up) {
            let store = t.server.store();
            free = free.min(store.free_slots().unwrap_or(0));
            total = total.max(store.slots());
        }
        (free, total)
    }

    /// What the tier did so far.
    pub fn counters(&self) -> TierCounters {
        let s = self.servers();
        let net = self.net.counters();
        TierCounters {
            served: s.iter().map(|t| t.server.served).sum(),
            bad_requests: s.iter().map(|t| t.server.bad_requests).sum(),
            lost: net.dropped + net.partitioned,
            duplicated: net.duplicated,
        }
    }
}
