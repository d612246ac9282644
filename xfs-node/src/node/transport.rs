//! The transport a node's endpoints run on, chosen by the binary ([`MakeTransport`]:
//! [`Udp`], [`Rdma`]), and binding an endpoint on it.

use super::*;

pub(super) fn bind_err(what: &str, addr: SocketAddr, e: impl std::fmt::Display) -> String {
    format!("cannot bind the {what} at {addr}: {e} (is another node running on that port?)")
}

/// Make the transport of the configured kind.
pub trait MakeTransport: Send + Sync + 'static {
    /// The transport type.
    type T: Transport + Send + 'static;
    /// Bind one at `addr` (port 0: any).
    fn bind(&self, addr: SocketAddr) -> Result<Self::T, String>;
}

/// UDP.
pub struct Udp;
impl MakeTransport for Udp {
    type T = am_udp::UdpTransport;
    fn bind(&self, addr: SocketAddr) -> Result<Self::T, String> {
        am_udp::UdpTransport::bind(addr, am_udp::UdpConfig::default()).map_err(|e| e.to_string())
    }
}

/// RDMA verbs (RoCE).
pub struct Rdma;
impl MakeTransport for Rdma {
    type T = am_rdma::RdmaTransport;
    fn bind(&self, addr: SocketAddr) -> Result<Self::T, String> {
        am_rdma::RdmaTransport::bind(addr, am_rdma::RdmaConfig::default())
            .map_err(|e| e.to_string())
    }
}

pub(super) fn endpoint<M: MakeTransport>(
    mk: &M,
    addr: SocketAddr,
    tag: u64,
    segment_bytes: usize,
    what: &str,
) -> Result<Endpoint<M::T>, String> {
    let t = mk.bind(addr).map_err(|e| bind_err(what, addr, e))?;
    Ok(Endpoint::new(
        t,
        am_core::Config {
            tag: Tag(tag),
            segment_bytes,
            ..am_core::Config::default()
        },
    ))
}
