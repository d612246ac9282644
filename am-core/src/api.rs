//! The message-level API types: what a sender describes and what handlers and upcalls get.

use crate::error::ErrorCode;
use crate::types::EndpointName;
use crate::wire::MsgKind;
use std::net::SocketAddr;

/// Identifies a message sent by this endpoint (returned by every send).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MsgId(pub u64);

/// Identifies an outstanding request of this endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// The right to reply to one request, exactly once.
///
/// It is neither `Clone` nor `Copy`, and [`crate::Ctx::reply`] consumes it, so a second reply
/// does not compile:
///
/// ```compile_fail
/// fn twice(ctx: &mut am_core::Ctx<'_>, token: am_core::ReplyToken) {
///     let _ = ctx.reply(token, am_core::Msg::small(0, &[]));
///     let _ = ctx.reply(token, am_core::Msg::small(0, &[])); // use of moved value
/// }
/// ```
///
/// A request handler may instead pass it on with [`crate::Ctx::delegate`]; whoever holds
/// it last replies straight to the original requester.
#[derive(Debug, PartialEq, Eq)]
pub struct ReplyToken {
    pub(crate) addr: SocketAddr,
    pub(crate) vnet: u32,
    pub(crate) tag: u64,
    pub(crate) req_id: u64,
    pub(crate) inc: u64,
}

impl ReplyToken {
    /// The endpoint that will receive the reply (the original requester).
    pub fn requester(&self) -> EndpointName {
        EndpointName {
            addr: self.addr,
            vnet: self.vnet,
        }
    }
}

/// The body of an outgoing message.
#[derive(Clone, Copy, Debug)]
pub enum Body<'a> {
    /// No payload.
    Small,
    /// A payload gathered from these slices (copied at send time).
    Medium(&'a [&'a [u8]]),
    /// A payload gathered from `(offset, len)` ranges of the local segment, placed at
    /// `dst_offset` in the receiver's segment. The local ranges may be reused when the
    /// bulk-free callback names the message.
    Bulk {
        /// Source ranges in the local segment.
        src: &'a [(usize, usize)],
        /// Destination offset in the receiver's segment.
        dst_offset: u64,
    },
}

/// An outgoing message: handler index at the receiver, arguments and body.
#[derive(Clone, Copy, Debug)]
pub struct Msg<'a> {
    /// Handler index at the receiver.
    pub handler: u16,
    /// Up to 8 arguments.
    pub args: &'a [u64],
    /// Payload.
    pub body: Body<'a>,
}

impl<'a> Msg<'a> {
    /// A small message.
    pub fn small(handler: u16, args: &'a [u64]) -> Msg<'a> {
        Msg {
            handler,
            args,
            body: Body::Small,
        }
    }
    /// A medium message gathered from `slices`.
    pub fn medium(handler: u16, args: &'a [u64], slices: &'a [&'a [u8]]) -> Msg<'a> {
        Msg {
            handler,
            args,
            body: Body::Medium(slices),
        }
    }
    /// A bulk message from local segment ranges to `dst_offset` of the receiver's segment.
    pub fn bulk(
        handler: u16,
        args: &'a [u64],
        src: &'a [(usize, usize)],
        dst_offset: u64,
    ) -> Msg<'a> {
        Msg {
            handler,
            args,
            body: Body::Bulk { src, dst_offset },
        }
    }
}

/// A message as a handler sees it.
#[derive(Debug)]
pub struct Incoming<'a> {
    /// The endpoint that sent it (for a delegated reply: the delegate, not the one asked).
    pub source: EndpointName,
    /// One-way, request or reply.
    pub kind: MsgKind,
    /// The handler index it named.
    pub handler: u16,
    /// Its arguments.
    pub args: &'a [u64],
    /// A medium payload, in a buffer the layer owns, valid while the handler runs.
    pub payload: &'a [u8],
    /// A bulk payload: `(offset, len)` in this endpoint's segment, all bytes landed.
    pub bulk: Option<(u64, usize)>,
    /// For a request: the token to reply with (take it out to reply or delegate).
    pub token: Option<ReplyToken>,
    /// For a reply: the request it answers.
    pub request: Option<RequestId>,
}

/// A message that could not be delivered, returned to its sender by the error upcall.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undeliverable {
    /// Why.
    pub code: ErrorCode,
    /// Where it was going.
    pub dest: EndpointName,
    /// The id its send returned.
    pub msg_id: MsgId,
    /// What it was.
    pub kind: MsgKind,
    /// Its handler index.
    pub handler: u16,
    /// Its arguments.
    pub args: Vec<u64>,
    /// Its medium payload (empty for small and bulk, and for a medium the receiver could
    /// not hold: `Congested`).
    pub payload: Vec<u8>,
    /// For bulk: `(dst_offset, len)`.
    pub bulk: Option<(u64, usize)>,
    /// For a request: its id.
    pub request: Option<RequestId>,
    /// For a delegated request: the requester it was meant to answer (the token is
    /// consumed; the delegator may reply to the requester through its own means).
    pub delegated_for: Option<EndpointName>,
}

/// One reply collected by a gather.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatherReply {
    /// Who replied.
    pub source: EndpointName,
    /// The reply's arguments.
    pub args: Vec<u64>,
    /// Its medium payload.
    pub payload: Vec<u8>,
    /// Its bulk placement in our segment.
    pub bulk: Option<(u64, usize)>,
}

/// One member of a gather: a reply or the error that ended it.
pub type GatherResult = Result<GatherReply, ErrorCode>;
