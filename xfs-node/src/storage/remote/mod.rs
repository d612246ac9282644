//! Fragments over Active Messages: a storage server serving its [`FragmentStore`] to
//! clients' logs ([`StorageServer`]), and the client side, itself a [`FragmentStore`]
//! ([`RemoteStore`]), so a [`crate::storage::log::Log`] stripes over remote servers the
//! same way as over local stores.
//!
//! Fragment data travels as AM **bulk** messages, straight into a *window* of the other
//! side's segment: at `hello` the server gives each client a window of `depth` fragment
//! slots in its segment; the client keeps at most `depth` requests outstanding, request k
//! using slot k of its window (a put lands there; a get's data leaves from there) and slot
//! k of the client's own read area (where the get's bulk reply lands). The server batches
//! the puts (and gets) it received in one poll into one store call, so a client with
//! `depth` puts outstanding gets `depth` writes in flight on the server's device.
//!
//! Requests: `[op, ...]` to [`SERVER_HANDLER`] ([`Op`]); replies `[status, ...]` to
//! [`CLIENT_HANDLER`] ([`Status`]: `Ok`, or the kind of the [`StoreError`]). A server that
//! does not answer makes the client's call fail with [`StoreError::Io`] naming it. The
//! parts: the wire (`proto.rs`), the server (`server.rs`), the client (`client.rs`).

mod client;
mod proto;
mod server;

pub use client::RemoteStore;
pub use proto::{Op, Status, CLIENT_HANDLER, SERVER_HANDLER};
pub use server::{ServerOptions, StorageServer};

use crate::lock;
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use am_core::{
    AmError, Endpoint, EndpointName, Msg as AmMsg, ReplyToken, Tag, Transport, TransportError,
};

use super::fragment::{check_sizes, fragment_range, FragmentId, FragmentStore, StoreError};

/// What a store client is for, in its [`client_identity`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum ClientPurpose {
    /// A node's log.
    Log = 1,
    /// A node's cleaner's segment reader.
    Reader = 2,
}

/// The identity a node's store client gives its servers: the same for every connection
/// of that node's client of that purpose, whatever its address (nonzero).
pub fn client_identity(node: u16, purpose: ClientPurpose) -> u64 {
    ((node as u64) << 8) | purpose as u64
}
