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

/// Encode a protocol message as AM arguments plus an optional payload.
pub fn encode<D: BlockData>(msg: &Msg<D>, payload: &mut Vec<u8>) -> [u64; 4] {
    payload.clear();
    let pair = |a: u16, b: u32| ((a as u64) << 32) | b as u64;
    match msg {
        Msg::ReadReq { block } => [1, *block, 0, 0],
        Msg::WriteReq {
            block,
            has_data,
            whole,
        } => [2, *block, *has_data as u64, *whole as u64],
        Msg::EvictReq { block } => [3, *block, 0, 0],
        Msg::RevokeAck { block } => [4, *block, 0, 0],
        Msg::ForwardFailed {
            block,
            reader,
            reader_seq,
        } => [5, *block, pair(*reader, *reader_seq), 0],
        Msg::Forward {
            block,
            seq,
            reader,
            reader_seq,
        } => [6, *block, *seq as u64, pair(*reader, *reader_seq)],
        Msg::Revoke { block, seq } => [7, *block, *seq as u64, 0],
        Msg::Grant { block, seq } => [8, *block, *seq as u64, 0],
        Msg::EvictGrant {
            block,
            seq,
            handoff,
        } => match handoff {
            Some((p, s)) => [9, *block, *seq as u64, (1 << 63) | pair(*p, *s)],
            None => [9, *block, *seq as u64, 0],
        },
        Msg::Fetch {
            block,
            to,
            seq,
            exclusive,
        } => [10, *block, pair(*to, *seq), *exclusive as u64],
        Msg::Data {
            block,
            seq,
            data,
            exclusive,
            from_cache,
        } => {
            data.encode(payload);
            [
                11,
                *block,
                *seq as u64,
                *exclusive as u64 | (*from_cache as u64) << 1,
            ]
        }
        Msg::Handoff { block, seq, data } => {
            data.encode(payload);
            [12, *block, *seq as u64, 0]
        }
        Msg::WriteBack { block, data } => {
            data.encode(payload);
            [13, *block, 0, 0]
        }
        Msg::WriteBackAck { block } => [14, *block, 0, 0],
    }
}

/// Parse a protocol message; `None` if it is not one.
pub fn decode<D: BlockData>(args: &[u64], payload: &[u8]) -> Option<Msg<D>> {
    let [kind, block, a, b] = *args else {
        return None;
    };
    let unpair = |v: u64| -> Option<(u16, u32)> {
        if v >> 48 != 0 {
            return None;
        }
        Some(((v >> 32) as u16, v as u32))
    };
    let seq = |v: u64| u32::try_from(v).ok();
    let flag = |v: u64| match v {
        0 => Some(false),
        1 => Some(true),
        _ => None,
    };
    let empty = payload.is_empty();
    Some(match kind {
        1 if empty => Msg::ReadReq { block },
        2 if empty => Msg::WriteReq {
            block,
            has_data: flag(a)?,
            whole: flag(b)?,
        },
        3 if empty => Msg::EvictReq { block },
        4 if empty => Msg::RevokeAck { block },
        5 if empty => {
            let (reader, reader_seq) = unpair(a)?;
            Msg::ForwardFailed {
                block,
                reader,
                reader_seq,
            }
        }
        6 if empty => {
            let (reader, reader_seq) = unpair(b)?;
            Msg::Forward {
                block,
                seq: seq(a)?,
                reader,
                reader_seq,
            }
        }
        7 if empty => Msg::Revoke {
            block,
            seq: seq(a)?,
        },
        8 if empty => Msg::Grant {
            block,
            seq: seq(a)?,
        },
        9 if empty => Msg::EvictGrant {
            block,
            seq: seq(a)?,
            handoff: match b {
                0 => None,
                v if v >> 63 == 1 => Some(unpair(v & !(1 << 63))?),
                _ => return None,
            },
        },
        10 if empty => {
            let (to, s) = unpair(a)?;
            Msg::Fetch {
                block,
                to,
                seq: s,
                exclusive: flag(b)?,
            }
        }
        11 if b <= 3 => Msg::Data {
            block,
            seq: seq(a)?,
            data: D::decode(payload)?,
            exclusive: b & 1 != 0,
            from_cache: b & 2 != 0,
        },
        12 => Msg::Handoff {
            block,
            seq: seq(a)?,
            data: D::decode(payload)?,
        },
        13 => Msg::WriteBack {
            block,
            data: D::decode(payload)?,
        },
        14 if empty => Msg::WriteBackAck { block },
        _ => return None,
    })
}
