//! The storage protocol on the wire: handler indexes, request kinds ([`Op`], the first
//! argument of a request), reply statuses ([`Status`], the first argument of a reply) and
//! the encoding of fragment ids.

use super::super::fragment::{FragmentId, StoreError};

/// Handler index of storage requests on the server.
pub const SERVER_HANDLER: u16 = 2;
/// Handler index of storage replies on the client.
pub const CLIENT_HANDLER: u16 = 3;

/// Fragment ids a `list` reply carries at the most.
pub(super) const LIST_PAGE: usize = 500;
/// Bytes of one encoded fragment id (segment u64, index u16, little-endian).
const ID_BYTES: usize = 10;

/// A request's kind: `[op, ...]` to [`SERVER_HANDLER`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Op {
    /// `[Hello, depth]`: ask for a window of `depth` fragment slots; the reply is
    /// `[status, window base, fragment bytes, server depth]`.
    Hello = 1,
    /// `[Put, segment, index, slot]` with the fragment as a bulk into the window's slot;
    /// the reply is `[status, slot, free slots after it]`.
    Put = 2,
    /// `[Sync]`: make what was put durable.
    Sync = 3,
    /// `[Get, segment, index, slot]`: the fragment comes back as a bulk into the client's
    /// read slot; `[Get, segment, index, slot, offset, len]`: only that range of it (the
    /// server checks the whole fragment), to the start of the slot.
    Get = 4,
    /// `[Delete]` with the encoded ids as payload.
    Delete = 5,
    /// `[Stat]`: the reply is `[status, free slots, fragment bytes]`.
    Stat = 6,
    /// `[List, segment, index, after?]`: a page of the stored ids after the given one.
    List = 7,
}

impl Op {
    /// The kind a request's first argument names, if any.
    pub fn from_wire(v: u64) -> Option<Op> {
        [
            Op::Hello,
            Op::Put,
            Op::Sync,
            Op::Get,
            Op::Delete,
            Op::Stat,
            Op::List,
        ]
        .into_iter()
        .find(|o| *o as u64 == v)
    }
}

/// A reply's status: its first argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Status {
    /// Done.
    Ok = 0,
    /// The device is full.
    NoSpace = 1,
    /// A fragment larger than the server's.
    TooLarge = 2,
    /// No such fragment.
    NotFound = 3,
    /// A checksum mismatch on the server.
    Corrupt = 4,
    /// A device error on the server.
    Io = 5,
    /// Refused: no window, a put outside the sender's window, an unknown request, a
    /// configuration problem.
    Refused = 6,
    /// Refused at `hello`: a newer generation of the same client identity connected.
    Fenced = 7,
}

impl Status {
    /// The status that reports `e`.
    pub fn of(e: &StoreError) -> Status {
        match e {
            StoreError::NoSpace { .. } => Status::NoSpace,
            StoreError::TooLarge { .. } => Status::TooLarge,
            StoreError::NotFound(_) => Status::NotFound,
            StoreError::Corrupt { .. } => Status::Corrupt,
            StoreError::Io { .. } => Status::Io,
            StoreError::Config(_) => Status::Refused,
        }
    }

    /// The status a reply's first argument names (an unknown value reads as `Refused`).
    pub fn from_wire(v: u64) -> Status {
        [
            Status::Ok,
            Status::NoSpace,
            Status::TooLarge,
            Status::NotFound,
            Status::Corrupt,
            Status::Io,
            Status::Fenced,
        ]
        .into_iter()
        .find(|s| *s as u64 == v)
        .unwrap_or(Status::Refused)
    }

    /// The error a failed request on fragment `id` of storage server `server` reports.
    pub fn error(self, id: FragmentId, server: &str) -> StoreError {
        match self {
            Status::NoSpace => StoreError::NoSpace { free: 0, needed: 1 },
            Status::TooLarge => StoreError::TooLarge { len: 0, max: 0 },
            Status::NotFound => StoreError::NotFound(id),
            Status::Corrupt => StoreError::Corrupt {
                id,
                why: "checksum mismatch on the storage server",
            },
            Status::Io => StoreError::Io {
                path: server.to_string(),
                source: std::io::Error::other("device error on the storage server"),
            },
            Status::Fenced => StoreError::Config(format!(
                "storage server {server} fenced this client: a newer generation of it connected"
            )),
            Status::Ok | Status::Refused => {
                StoreError::Config(format!("storage server {server} refused the request"))
            }
        }
    }
}

/// Fragment ids as a payload.
pub(super) fn encode_ids(ids: &[FragmentId]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(ids.len() * ID_BYTES);
    for f in ids {
        bytes.extend_from_slice(&f.segment.to_le_bytes());
        bytes.extend_from_slice(&f.index.to_le_bytes());
    }
    bytes
}

/// Fragment ids from a payload (a trailing partial id is ignored).
pub(super) fn decode_ids(bytes: &[u8]) -> Vec<FragmentId> {
    bytes
        .chunks_exact(ID_BYTES)
        .map(|c| FragmentId {
            segment: u64::from_le_bytes(c[..8].try_into().unwrap_or([0; 8])),
            index: u16::from_le_bytes([c[8], c[9]]),
        })
        .collect()
}
