// Types shared by the DPDK binding (mod.rs) and its stand-in without DPDK (missing.rs),
// included textually by both.

/// How to install DPDK (named by every error that finds it missing).
pub const INSTALL_HINT: &str =
    "apt-get install -y libdpdk-dev dpdk-dev pkg-config libclang-dev (then rebuild)";

/// Errors of DPDK calls.
#[derive(Debug, thiserror::Error)]
pub enum DpdkError {
    /// DPDK is not installed (the crate was built without it).
    #[error("DPDK is not available in this build: {INSTALL_HINT}")]
    Missing,
    /// A DPDK call failed.
    #[error("{what}: {msg} (rte_errno {code})")]
    Call {
        /// What was being done.
        what: String,
        /// The error number.
        code: i32,
        /// DPDK's description of it.
        msg: String,
    },
    /// A precondition of ours.
    #[error("{0}")]
    Invalid(String),
}

/// EAL settings: the defaults work on a machine without NIC or hugepages.
#[derive(Clone, Debug)]
pub struct EalOptions {
    /// Memory EAL reserves, in MiB (anonymous memory with `--no-huge`); default 512 or
    /// `AM_DPDK_MEM_MB`.
    pub mem_mb: usize,
    /// More EAL arguments (`AM_DPDK_EAL_ARGS`, split at spaces, adds to these).
    pub extra: Vec<String>,
}

impl Default for EalOptions {
    fn default() -> Self {
        EalOptions {
            mem_mb: std::env::var("AM_DPDK_MEM_MB")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(512),
            extra: std::env::var("AM_DPDK_EAL_ARGS")
                .map(|v| v.split_whitespace().map(String::from).collect())
                .unwrap_or_default(),
        }
    }
}

/// How to set a port up.
#[derive(Clone, Debug)]
pub struct PortSpec {
    /// Rx/Tx queue pairs (one per shard loop); default 1.
    pub queues: u16,
    /// Receive descriptors per queue; default 1024.
    pub rx_desc: u16,
    /// Transmit descriptors per queue; default 1024.
    pub tx_desc: u16,
    /// Mbufs in each queue's pool; default 4095.
    pub mbufs: u32,
    /// Ask for Rx interrupts (taken only where the port offers them).
    pub rx_interrupts: bool,
}

impl Default for PortSpec {
    fn default() -> Self {
        PortSpec {
            queues: 1,
            rx_desc: 1024,
            tx_desc: 1024,
            mbufs: 4095,
            rx_interrupts: true,
        }
    }
}

/// What a started port offers.
#[derive(Clone, Debug)]
pub struct PortInfo {
    /// The ethdev's name.
    pub name: String,
    /// Its driver (`net_ring`, `net_memif`, `net_af_packet`, ...).
    pub driver: String,
    /// Its MAC address.
    pub mac: [u8; 6],
    /// The port fills in IPv4 header checksums on transmit.
    pub tx_ipv4_checksum: bool,
    /// The port checks IPv4 header checksums on receive.
    pub rx_ipv4_checksum: bool,
    /// Rx interrupts are on (each queue has an fd to sleep on).
    pub rx_interrupts: bool,
    /// The owner of its one queue restarts the port when the link is down: a `net_memif`
    /// client connects only when its port starts, so this is how it reconnects after its
    /// server restarted ([`Queue::restart_port`]).
    pub restart_on_link_down: bool,
}
