//! The transport a node's endpoints run on: the node takes a [`MakeTransport`] and names
//! no transport itself; the makers of the configured kinds ([`Udp`], [`Rdma`]) and
//! [`Node::start_configured`], which picks one by `[cluster] transport`
//! ([`super::config::TransportKind`]), serve the binaries that host a node (`xfs-node
//! serve`, `xfsam-mount --serve`). Binding an endpoint on it.

use super::*;

/// Make the transport of the configured kind.
pub trait MakeTransport: Send + Sync + 'static {
    /// The transport type.
    type T: Transport + Send + 'static;
    /// What [`MakeTransport::bind`] reports when it fails.
    type Error: std::error::Error + Send + Sync + 'static;
    /// Bind one at `addr` (port 0: any).
    fn bind(&self, addr: SocketAddr) -> Result<Self::T, Self::Error>;
}

pub(super) fn endpoint<M: MakeTransport>(
    mk: &M,
    addr: SocketAddr,
    tag: u64,
    segment_bytes: usize,
    what: &'static str,
) -> Result<Endpoint<M::T>, StartError> {
    let t = mk.bind(addr).map_err(|e| StartError::Bind {
        what,
        addr,
        source: Box::new(e),
    })?;
    Ok(Endpoint::new(
        t,
        am_core::Config {
            tag: Tag(tag),
            segment_bytes,
            ..am_core::Config::default()
        },
    ))
}

/// UDP over kernel sockets.
pub struct Udp;
impl MakeTransport for Udp {
    type T = am_udp::UdpTransport;
    type Error = am_udp::UdpError;
    fn bind(&self, addr: SocketAddr) -> Result<Self::T, Self::Error> {
        am_udp::UdpTransport::bind(addr, am_udp::UdpConfig::default())
    }
}

/// RDMA verbs (RoCE or InfiniBand).
pub struct Rdma;
impl MakeTransport for Rdma {
    type T = am_rdma::RdmaTransport;
    type Error = std::io::Error;
    fn bind(&self, addr: SocketAddr) -> Result<Self::T, Self::Error> {
        am_rdma::RdmaTransport::bind(addr, am_rdma::RdmaConfig::default())
    }
}

impl Node {
    /// Start node `id` of `config` on the transport its `[cluster] transport` names.
    pub fn start_configured(config: Config, id: NodeId) -> Result<Node, StartError> {
        match config.cluster.transport {
            config::TransportKind::Rdma => Node::start(config, id, Rdma),
            config::TransportKind::Udp => Node::start(config, id, Udp),
        }
    }

    /// Write back every dirty block and checkpoint the log: what a node does before it
    /// stops on a signal.
    pub fn write_back_and_checkpoint(&self) {
        if let Err(e) = self.client.sync_all() {
            eprintln!("xfs-node {}: write-back before stopping: {e}", self.id);
        }
        if let Err(e) = self.sync_log(true) {
            eprintln!("xfs-node {}: checkpoint before stopping: {e}", self.id);
        }
    }
}
