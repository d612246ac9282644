//! `am-core`: Active Messages for a serverless cluster file system.
//!
//! * [`Endpoint`]: a handler table, a translation table, a 64-bit [`Tag`], a bulk segment
//!   and a virtual network; small, medium and bulk messages; request/reply with a
//!   [`ReplyToken`] that can be delegated; gather; an asynchronous error upcall; `poll` and
//!   `wait`; a cross-thread [`EndpointHandle`].
//! * [`engine::Core`]: the sans-IO engine (no IO, no clock, no threads): connections with
//!   version and incarnation, reliability and order over datagrams, fragmentation, credits.
//! * [`Transport`]: what a driver provides (`am-udp`, `am-rdma`), with [`Capabilities`]
//!   saying what it does itself.
//! * [`sim`]: a deterministic simulated network with seeded faults.
//!
//! See DESIGN.md §3 for the semantics.
//!
//! `unsafe` is denied but for the segment's description handed to a transport
//! ([`transport::SegmentMemory::new`] and its one caller).

#![deny(unsafe_code)]

pub mod api;
pub mod endpoint;
pub mod engine;
pub mod error;
pub mod sim;
pub mod transport;
pub mod types;
pub mod wire;

pub use api::{
    Body, GatherReply, GatherResult, Incoming, Msg, MsgId, ReplyToken, RequestId, Undeliverable,
};
pub use endpoint::{Ctx, Endpoint, EndpointHandle};
pub use error::{AmError, ErrorCode, TransportError};
pub use transport::{
    BulkWrite, Capabilities, EventMask, Notify, SegmentMemory, Transmit, Transport,
};
pub use types::{Config, EndpointName, Stats, Tag, Time, MAX_ARGS, PROTOCOL_VERSION};
pub use wire::MsgKind;
