//! The transport a node's endpoints run on: the binary (`xfs-node serve`) picks it by
//! `[cluster] transport` ([`super::config::TransportKind`]) and hands the node a
//! [`MakeTransport`] for it; the library names no transport. Binding an endpoint on it.

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
