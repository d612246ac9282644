//! Errors of the Active Messages layer: synchronous send errors and asynchronous upcall codes.

use std::fmt;

/// Why a message could not be delivered; carried by the asynchronous error upcall.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The receiver's tag did not match the tag the message carried.
    BadTag,
    /// No such endpoint at the destination (for example another virtual network).
    NoEndpoint,
    /// The receiver has no handler at the message's handler index.
    NoHandler,
    /// The peer did not acknowledge within the retry bound, restarted, or the request got
    /// no reply within the request timeout.
    Unreachable,
    /// The receiver had no room to reassemble or hold the message.
    Congested,
    /// The requester refused a reply: no such outstanding request (already answered,
    /// timed out, or a reply for an older incarnation).
    ReplyRejected,
    /// A bulk message named bytes outside the receiver's segment.
    SegmentBounds,
    /// The peer speaks another protocol version; both are named.
    VersionMismatch {
        /// Our protocol version.
        local: u8,
        /// The peer's protocol version.
        remote: u8,
    },
}

impl ErrorCode {
    /// Wire encoding of the code (versions are carried elsewhere).
    pub fn to_wire(self) -> u8 {
        match self {
            ErrorCode::BadTag => 1,
            ErrorCode::NoEndpoint => 2,
            ErrorCode::NoHandler => 3,
            ErrorCode::Unreachable => 4,
            ErrorCode::Congested => 5,
            ErrorCode::ReplyRejected => 6,
            ErrorCode::SegmentBounds => 7,
            ErrorCode::VersionMismatch { .. } => 8,
        }
    }

    /// Decodes a wire code; `None` for an unknown value.
    pub fn from_wire(v: u8) -> Option<ErrorCode> {
        Some(match v {
            1 => ErrorCode::BadTag,
            2 => ErrorCode::NoEndpoint,
            3 => ErrorCode::NoHandler,
            4 => ErrorCode::Unreachable,
            5 => ErrorCode::Congested,
            6 => ErrorCode::ReplyRejected,
            7 => ErrorCode::SegmentBounds,
            _ => return None,
        })
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorCode::BadTag => write!(f, "bad tag: the receiver's tag differs from the one in the translation table"),
            ErrorCode::NoEndpoint => write!(f, "no endpoint: the destination is not in this virtual network"),
            ErrorCode::NoHandler => write!(f, "no handler at that index on the receiver"),
            ErrorCode::Unreachable => write!(f, "unreachable: the peer did not answer within the bound (dead, restarted or partitioned)"),
            ErrorCode::Congested => write!(f, "congested: the receiver had no room for the message"),
            ErrorCode::ReplyRejected => write!(f, "reply rejected: the requester has no such outstanding request"),
            ErrorCode::SegmentBounds => write!(f, "bulk message outside the receiver's segment"),
            ErrorCode::VersionMismatch { local, remote } => write!(
                f,
                "protocol version mismatch: we speak version {local}, the peer speaks version {remote}"
            ),
        }
    }
}

/// Synchronous errors returned by the send calls.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum AmError {
    /// The translation table has no entry at this index.
    #[error("no translation table entry at index {0}; call map() first")]
    BadIndex(u16),
    /// The handler index is beyond the handler table.
    #[error("handler index {0} is outside the handler table (size {1})")]
    BadHandler(u16, usize),
    /// More than 8 arguments.
    #[error("{0} arguments given; at most 8 are allowed")]
    TooManyArgs(usize),
    /// The medium payload exceeds the configured bound.
    #[error("medium payload of {len} bytes exceeds the bound of {max} bytes; use a bulk message")]
    TooLarge {
        /// Payload length.
        len: usize,
        /// Configured bound.
        max: usize,
    },
    /// A bulk source range lies outside the local segment.
    #[error("bulk source range {start}..{end} lies outside the local segment of {segment} bytes")]
    SourceOutOfSegment {
        /// Range start.
        start: usize,
        /// Range end.
        end: usize,
        /// Segment length.
        segment: usize,
    },
    /// A bounded queue is full: retry after polling.
    #[error("would block: the send queue to this peer is full; poll and retry")]
    WouldBlock,
    /// The endpoint or handle is closed.
    #[error("the endpoint is closed")]
    Closed,
    /// A reply handler tried to send a request.
    #[error("a reply handler may not send requests")]
    RequestFromReplyHandler,
    /// The mapped endpoint belongs to another virtual network.
    #[error("endpoint {name} is in virtual network {theirs}, this endpoint is in {ours}")]
    OtherVirtualNetwork {
        /// The name being mapped.
        name: String,
        /// Our virtual network.
        ours: u32,
        /// The other's virtual network.
        theirs: u32,
    },
    /// Too many outstanding requests or gathers.
    #[error("too many outstanding requests ({0}); poll and retry")]
    TooManyRequests(usize),
    /// A transport failure.
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
}

/// Errors of a transport driver.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum TransportError {
    /// The transport cannot take more now.
    #[error("transport would block")]
    WouldBlock,
    /// An IO error, with what was being done.
    #[error("{0}")]
    Io(String),
}
