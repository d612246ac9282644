//! The node's errors: starting it ([`StartError`], from [`super::Node::start`] and
//! [`super::Node::wait_ready`]) and serving its control socket ([`ServeError`], from
//! [`super::Node::serve`]). Each names what to fix.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use am_core::AmError;

use crate::coherence::NodeId;
use crate::fs::client::Errno;
use crate::storage::fragment::StoreError;

/// Why a node did not start, or did not become ready.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The membership log on disk could not be read or does not parse.
    #[error("the membership log {}: {why}", path.display())]
    Membership {
        /// The file.
        path: std::path::PathBuf,
        /// What went wrong (and what to do).
        why: String,
    },
    /// The node is not in the configuration.
    #[error("node {0} is not in the config's [[nodes]]")]
    NotInConfig(NodeId),
    /// A storage node without a storage path (a configuration [`Config::validate`]
    /// refuses).
    ///
    /// [`Config::validate`]: super::config::Config::validate
    #[error("no storage path")]
    NoStoragePath(NodeId),
    /// The storage file or device cannot be opened.
    #[error("storage {}: {source}", path.display())]
    Storage {
        /// The file or device.
        path: PathBuf,
        /// Why.
        #[source]
        source: StoreError,
    },
    /// An endpoint's transport cannot be bound.
    #[error("cannot bind the {what} at {addr}: {source} (is another node running on that port?)")]
    Bind {
        /// Which endpoint (`shard endpoint`, `storage server`, `log endpoint`).
        what: &'static str,
        /// Its address.
        addr: SocketAddr,
        /// The transport's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The storage server could not set up its endpoint.
    #[error("storage server: {0}")]
    StorageServer(#[source] StoreError),
    /// A shard could not set up its endpoint or connect to a peer.
    #[error("shard {shard}: {source}")]
    Shard {
        /// The shard.
        shard: usize,
        /// Why.
        #[source]
        source: AmError,
    },
    /// A storage server of the log's stripe group does not answer (the log thread retries).
    #[error(transparent)]
    Connect(StoreError),
    /// Too few storage servers answered in time to recover the node's log.
    #[error(
        "node {node}: too few storage servers of its stripe group answered within {timeout:?} \
         to recover its log: check that they run and that every node uses the same \
         cluster config (name {cluster:?}, version {version})"
    )]
    NotReady {
        /// The node.
        node: NodeId,
        /// How long it waited.
        timeout: Duration,
        /// The cluster's name in this node's config.
        cluster: String,
        /// The config version.
        version: u64,
    },
    /// The root directory could not be created (this node manages it).
    #[error("node {node}: cannot create the root directory: {source}")]
    Root {
        /// The node.
        node: NodeId,
        /// Why.
        #[source]
        source: Errno,
    },
}

/// Why [`super::Node::serve`] stopped serving the control socket, or did not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The node is not in the configuration (so it has no control path).
    #[error("no control path")]
    NoControlPath(NodeId),
    /// The socket cannot be created.
    #[error("cannot create the control socket {}: {source}", path.display())]
    Bind {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Accepting a connection failed.
    #[error("control socket: {0}")]
    Accept(#[source] std::io::Error),
}
