//! `am-testkit`: the workspace's test and tool code, kept out of the product crates
//! (`am-core`, the drivers, `xfs-node`, `fuse-front` only dev-depend on it; `bench`, a
//! measuring tool, depends on it).
//!
//! * [`conformance`]: the behaviour suite every transport must pass, the [`conformance::Harness`]
//!   trait and the simulator's harness;
//! * [`udp`], [`rdma`], [`dpdk`]: harnesses over the real drivers (loopback and network
//!   namespaces; a SoftRoCE device; DPDK `net_ring` ports or `net_memif` queues);
//! * [`peer`]: the ping-pong server's handlers (`examples/pingpong.rs`, am-dpdk's
//!   `dpdk_peer`), peer processes, the check of a stream cut by a kill;
//! * [`shell`]: commands, required tools, `nft` drop rules;
//! * [`cluster`]: running the `xfs-node` CLI, hosts as network namespaces on a bridge.
//!
//! The benchmarks and examples parse their flags with clap (derive).

pub mod cluster;
pub mod conformance;
pub mod dpdk;
pub mod peer;
pub mod rdma;
pub mod shell;
pub mod udp;
