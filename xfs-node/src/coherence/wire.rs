//! The coherence messages on the wire: [`Msg`] encoded into an Active Messages medium
//! payload and parsed back ([`encode`], [`decode`]), with the block content as it travels
//! ([`BlockData`]). Input from the network is never trusted: a bad payload is an error,
//! not a panic.

use super::*;

/// Block content as it travels: encoded into a medium payload and parsed back (never
/// trusted: a bad payload is an error, not a panic).
pub trait BlockData: Clone + Debug + Default + Send + Patch + 'static {
    /// Append the encoding.
    fn encode(&self, out: &mut Vec<u8>);
    /// Parse, or `None` if the bytes are not a valid encoding.
    fn decode(bytes: &[u8]) -> Option<Self>;
}

impl BlockData for u8 {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(*self);
    }
    fn decode(bytes: &[u8]) -> Option<Self> {
        match bytes {
            [b] => Some(*b),
            _ => None,
        }
    }
}

impl BlockData for u64 {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn decode(bytes: &[u8]) -> Option<Self> {
        Some(u64::from_le_bytes(bytes.try_into().ok()?))
    }
}

impl BlockData for Vec<u8> {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self);
    }
    fn decode(bytes: &[u8]) -> Option<Self> {
        Some(bytes.to_vec())
    }
}

/// A coherence message's kind: the first AM argument of its encoding ([`encode`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
#[allow(missing_docs)]
pub enum MsgKind {
    ReadReq = 1,
    WriteReq = 2,
    EvictReq = 3,
    RevokeAck = 4,
    ForwardFailed = 5,
    Forward = 6,
    Revoke = 7,
    Grant = 8,
    EvictGrant = 9,
    Fetch = 10,
    Data = 11,
    Handoff = 12,
    WriteBack = 13,
    WriteBackAck = 14,
    Skip = 15,
}

impl MsgKind {
    /// The kind a message's first argument names, if any.
    pub fn from_wire(v: u64) -> Option<MsgKind> {
        [
            MsgKind::ReadReq,
            MsgKind::WriteReq,
            MsgKind::EvictReq,
            MsgKind::RevokeAck,
            MsgKind::ForwardFailed,
            MsgKind::Forward,
            MsgKind::Revoke,
            MsgKind::Grant,
            MsgKind::EvictGrant,
            MsgKind::Fetch,
            MsgKind::Data,
            MsgKind::Handoff,
            MsgKind::WriteBack,
            MsgKind::WriteBackAck,
            MsgKind::Skip,
        ]
        .into_iter()
        .find(|k| *k as u64 == v)
    }
}

/// Encode a protocol message as AM arguments plus an optional payload.
pub fn encode<D: BlockData>(msg: &Msg<D>, payload: &mut Vec<u8>) -> [u64; 4] {
    payload.clear();
    match msg {
        Msg::ReadReq { block } => [MsgKind::ReadReq as u64, *block, 0, 0],
        Msg::WriteReq {
            block,
            has_data,
            whole,
        } => [
            MsgKind::WriteReq as u64,
            *block,
            *has_data as u64,
            *whole as u64,
        ],
        Msg::EvictReq { block, keep } => [MsgKind::EvictReq as u64, *block, *keep as u64, 0],
        Msg::RevokeAck { block } => [MsgKind::RevokeAck as u64, *block, 0, 0],
        Msg::ForwardFailed {
            block,
            reader,
            reader_seq,
        } => [
            MsgKind::ForwardFailed as u64,
            *block,
            pair(*reader, *reader_seq),
            0,
        ],
        Msg::Forward {
            block,
            seq,
            reader,
            reader_seq,
        } => [
            MsgKind::Forward as u64,
            *block,
            *seq as u64,
            pair(*reader, *reader_seq),
        ],
        Msg::Revoke { block, seq } => [MsgKind::Revoke as u64, *block, *seq as u64, 0],
        Msg::Grant { block, seq } => [MsgKind::Grant as u64, *block, *seq as u64, 0],
        Msg::EvictGrant {
            block,
            seq,
            handoff,
        } => match handoff {
            Some((p, s)) => [
                MsgKind::EvictGrant as u64,
                *block,
                *seq as u64,
                (1 << 63) | pair(*p, *s),
            ],
            None => [MsgKind::EvictGrant as u64, *block, *seq as u64, 0],
        },
        Msg::Fetch {
            block,
            to,
            seq,
            exclusive,
        } => [
            MsgKind::Fetch as u64,
            *block,
            pair(*to, *seq),
            *exclusive as u64,
        ],
        Msg::Data {
            block,
            seq,
            data,
            exclusive,
            from_cache,
        } => {
            data.encode(payload);
            [
                MsgKind::Data as u64,
                *block,
                *seq as u64,
                *exclusive as u64 | (*from_cache as u64) << 1,
            ]
        }
        Msg::Handoff { block, seq, data } => {
            data.encode(payload);
            [MsgKind::Handoff as u64, *block, *seq as u64, 0]
        }
        Msg::WriteBack { block, data } => {
            data.encode(payload);
            [MsgKind::WriteBack as u64, *block, 0, 0]
        }
        Msg::WriteBackAck { block } => [MsgKind::WriteBackAck as u64, *block, 0, 0],
        Msg::Skip { block, seq } => [MsgKind::Skip as u64, *block, *seq as u64, 0],
    }
}

/// Parse a protocol message; `None` if it is not one.
pub fn decode<D: BlockData>(args: &[u64], payload: &[u8]) -> Option<Msg<D>> {
    let [kind, block, a, b] = *args else {
        return None;
    };
    let empty = payload.is_empty();
    Some(match MsgKind::from_wire(kind)? {
        MsgKind::ReadReq if empty => Msg::ReadReq { block },
        MsgKind::WriteReq if empty => Msg::WriteReq {
            block,
            has_data: flag(a)?,
            whole: flag(b)?,
        },
        MsgKind::EvictReq if empty => Msg::EvictReq {
            block,
            keep: flag(a)?,
        },
        MsgKind::RevokeAck if empty => Msg::RevokeAck { block },
        MsgKind::ForwardFailed if empty => {
            let (reader, reader_seq) = unpair(a)?;
            Msg::ForwardFailed {
                block,
                reader,
                reader_seq,
            }
        }
        MsgKind::Forward if empty => {
            let (reader, reader_seq) = unpair(b)?;
            Msg::Forward {
                block,
                seq: seq(a)?,
                reader,
                reader_seq,
            }
        }
        MsgKind::Revoke if empty => Msg::Revoke {
            block,
            seq: seq(a)?,
        },
        MsgKind::Grant if empty => Msg::Grant {
            block,
            seq: seq(a)?,
        },
        MsgKind::EvictGrant if empty => Msg::EvictGrant {
            block,
            seq: seq(a)?,
            handoff: unpair_handoff(b)?,
        },
        MsgKind::Fetch if empty => {
            let (to, s) = unpair(a)?;
            Msg::Fetch {
                block,
                to,
                seq: s,
                exclusive: flag(b)?,
            }
        }
        MsgKind::Data if b <= 3 => Msg::Data {
            block,
            seq: seq(a)?,
            data: D::decode(payload)?,
            exclusive: b & 1 != 0,
            from_cache: b & 2 != 0,
        },
        MsgKind::Handoff => Msg::Handoff {
            block,
            seq: seq(a)?,
            data: D::decode(payload)?,
        },
        MsgKind::WriteBack => Msg::WriteBack {
            block,
            data: D::decode(payload)?,
        },
        MsgKind::WriteBackAck if empty => Msg::WriteBackAck { block },
        MsgKind::Skip if empty => Msg::Skip {
            block,
            seq: seq(a)?,
        },
        // A known kind whose arguments or payload do not fit it.
        _ => return None,
    })
}

/// A node and a sequence number in one argument (the node in bits 32..48).
#[inline]
fn pair(a: u16, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

/// The node and number [`pair`] put in `v`; `None` if `v` is not such a pair.
#[inline]
fn unpair(v: u64) -> Option<(u16, u32)> {
    if v >> 48 != 0 {
        return None;
    }
    Some(((v >> 32) as u16, v as u32))
}

/// An `EvictGrant`'s handoff: 0 for none, else a [`pair`] with the top bit set; `None`
/// if `v` is neither.
#[inline]
fn unpair_handoff(v: u64) -> Option<Option<(u16, u32)>> {
    match v {
        0 => Some(None),
        v if v >> 63 == 1 => Some(Some(unpair(v & !(1 << 63))?)),
        _ => None,
    }
}

/// A sequence number; `None` if `v` does not fit one.
#[inline]
fn seq(v: u64) -> Option<u32> {
    u32::try_from(v).ok()
}

/// A boolean flag (0 or 1); `None` for any other value.
#[inline]
fn flag(v: u64) -> Option<bool> {
    match v {
        0 => Some(false),
        1 => Some(true),
        _ => None,
    }
}
