//! The transport a node's endpoints run on: the binary (`xfs-node serve`) picks it by
//! `[cluster] transport` ([`super::config::TransportKind`]) and hands the node a
//! [`MakeTransport`] for it; the library names no transport. Binding an endpoint on it.

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
