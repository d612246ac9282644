//! The wire format: packets of the connection layer and message frames inside them.
//!
//! All integers are little-endian. Every packet starts with a fixed 24-byte header whose
//! first four bytes (magic, version) never change between versions, so a peer of another
//! version can always be told so. Network input is parsed here and never trusted: every
//! length is checked against the buffer, and a failure is a [`WireError`], never a panic.

use crate::types::MAX_ARGS;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// First two bytes of every packet ("AM").
pub const MAGIC: u16 = 0x4d41;
/// Length of the common header.
pub const COMMON_LEN: usize = 24;
/// Length of a DATA packet's header (common + seq, ack, window).
pub const DATA_HDR_LEN: usize = COMMON_LEN + 20;
/// Length of a FIRST frame header, without arguments and token.
pub const FIRST_HDR_LEN: usize = 64;
/// Length of an encoded reply token.
pub const TOKEN_LEN: usize = 19 + 24;
/// Length of a CONT frame header.
pub const CONT_HDR_LEN: usize = 8;
/// Words in the selective-acknowledgement bitmap (256 packets beyond the cumulative ack).
pub const SACK_WORDS: usize = 4;

/// Packet kinds.
pub mod kind {
    /// Open a connection.
    pub const HELLO: u8 = 1;
    /// Accept a connection.
    pub const HELLO_ACK: u8 = 2;
    /// Refuse a connection (other version or other virtual network).
    pub const REFUSED: u8 = 3;
    /// Sequenced data.
    pub const DATA: u8 = 4;
    /// Acknowledgement.
    pub const ACK: u8 = 5;
    /// "I have no connection with that incarnation."
    pub const RESET: u8 = 6;
}

/// Reasons carried by REFUSED.
pub mod refuse {
    /// Protocol version differs (the header names the refuser's version).
    pub const VERSION: u8 = 1;
    /// Virtual network differs.
    pub const VNET: u8 = 2;
}

/// Parse failures of network input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Shorter than its header says.
    #[error("truncated packet")]
    Truncated,
    /// Wrong magic number.
    #[error("bad magic")]
    BadMagic,
    /// Unknown packet or frame kind.
    #[error("unknown kind {0}")]
    UnknownKind(u8),
    /// A field holds an impossible value.
    #[error("bad field {0}")]
    BadField(&'static str),
}

/// The fields every packet carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Common {
    /// Sender's protocol version.
    pub version: u8,
    /// Packet kind (see [`kind`]).
    pub kind: u8,
    /// Sender's virtual network.
    pub vnet: u32,
    /// Sender's incarnation.
    pub src_inc: u64,
    /// Receiver's incarnation as the sender knows it (0 = unknown).
    pub dst_inc: u64,
}

/// A parsed packet, borrowing the datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    /// HELLO or HELLO_ACK, with the sender's receive window and the first sequence number
    /// it will send on this connection.
    Hello {
        /// Header.
        common: Common,
        /// Receive window in packets.
        window: u32,
        /// The sender's next sequence number: everything below it is history.
        start_seq: u64,
    },
    /// REFUSED with a reason.
    Refused {
        /// Header.
        common: Common,
        /// See [`refuse`].
        reason: u8,
    },
    /// DATA: one frame with a sequence number, piggybacking an acknowledgement.
    Data {
        /// Header.
        common: Common,
        /// Sequence number of this packet.
        seq: u64,
        /// Next sequence number the sender expects from us.
        ack: u64,
        /// Sender's receive window.
        window: u32,
        /// The frame.
        frame: &'a [u8],
    },
    /// ACK: cumulative acknowledgement, window and selective bitmap.
    Ack {
        /// Header.
        common: Common,
        /// Next expected sequence number.
        ack: u64,
        /// Receive window.
        window: u32,
        /// Bit i of word w: packet `ack + 1 + 64*w + i` was received.
        sack: [u64; SACK_WORDS],
    },
    /// RESET: the sender has no connection for the incarnation `echo` we addressed.
    Reset {
        /// Header.
        common: Common,
        /// The `dst_inc` of the packet that caused the reset.
        echo: u64,
    },
}

fn u16_at(b: &[u8], o: usize) -> Result<u16, WireError> {
    b.get(o..o + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or(WireError::Truncated)
}
fn u32_at(b: &[u8], o: usize) -> Result<u32, WireError> {
    b.get(o..o + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(WireError::Truncated)
}
fn u64_at(b: &[u8], o: usize) -> Result<u64, WireError> {
    let s = b.get(o..o + 8).ok_or(WireError::Truncated)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Ok(u64::from_le_bytes(a))
}
fn u8_at(b: &[u8], o: usize) -> Result<u8, WireError> {
    b.get(o).copied().ok_or(WireError::Truncated)
}

/// Parses only the common header (used to answer a peer of another version).
pub fn parse_common(b: &[u8]) -> Result<Common, WireError> {
    if u16_at(b, 0)? != MAGIC {
        return Err(WireError::BadMagic);
    }
    Ok(Common {
        version: u8_at(b, 2)?,
        kind: u8_at(b, 3)?,
        vnet: u32_at(b, 4)?,
        src_inc: u64_at(b, 8)?,
        dst_inc: u64_at(b, 16)?,
    })
}

/// Parses a packet.
pub fn parse_packet(b: &[u8]) -> Result<Packet<'_>, WireError> {
    let common = parse_common(b)?;
    let c = COMMON_LEN;
    Ok(match common.kind {
        kind::HELLO | kind::HELLO_ACK => Packet::Hello {
            common,
            window: u32_at(b, c)?,
            start_seq: u64_at(b, c + 4)?,
        },
        kind::REFUSED => Packet::Refused {
            common,
            reason: u8_at(b, c)?,
        },
        kind::DATA => {
            if b.len() < DATA_HDR_LEN {
                return Err(WireError::Truncated);
            }
            Packet::Data {
                common,
                seq: u64_at(b, c)?,
                ack: u64_at(b, c + 8)?,
                window: u32_at(b, c + 16)?,
                frame: &b[DATA_HDR_LEN..],
            }
        }
        kind::ACK => {
            let mut sack = [0u64; SACK_WORDS];
            for (i, w) in sack.iter_mut().enumerate() {
                *w = u64_at(b, c + 12 + 8 * i)?;
            }
            Packet::Ack {
                common,
                ack: u64_at(b, c)?,
                window: u32_at(b, c + 8)?,
                sack,
            }
        }
        kind::RESET => Packet::Reset {
            common,
            echo: u64_at(b, c)?,
        },
        k => return Err(WireError::UnknownKind(k)),
    })
}

/// Writes the common header.
pub fn put_common(out: &mut Vec<u8>, c: &Common) {
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.push(c.version);
    out.push(c.kind);
    out.extend_from_slice(&c.vnet.to_le_bytes());
    out.extend_from_slice(&c.src_inc.to_le_bytes());
    out.extend_from_slice(&c.dst_inc.to_le_bytes());
}

/// Encodes a packet (for DATA, `frame` must already be encoded; see [`put_first`]).
pub fn encode_packet(out: &mut Vec<u8>, p: &Packet<'_>) {
    match p {
        Packet::Hello {
            common,
            window,
            start_seq,
        } => {
            put_common(out, common);
            out.extend_from_slice(&window.to_le_bytes());
            out.extend_from_slice(&start_seq.to_le_bytes());
        }
        Packet::Refused { common, reason } => {
            put_common(out, common);
            out.push(*reason);
        }
        Packet::Data {
            common,
            seq,
            ack,
            window,
            frame,
        } => {
            put_data_header(out, common, *seq, *ack, *window);
            out.extend_from_slice(frame);
        }
        Packet::Ack {
            common,
            ack,
            window,
            sack,
        } => {
            put_common(out, common);
            out.extend_from_slice(&ack.to_le_bytes());
            out.extend_from_slice(&window.to_le_bytes());
            for w in sack {
                out.extend_from_slice(&w.to_le_bytes());
            }
        }
        Packet::Reset { common, echo } => {
            put_common(out, common);
            out.extend_from_slice(&echo.to_le_bytes());
        }
    }
}

/// Writes a DATA packet header; the frame follows.
pub fn put_data_header(out: &mut Vec<u8>, c: &Common, seq: u64, ack: u64, window: u32) {
    put_common(out, c);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&ack.to_le_bytes());
    out.extend_from_slice(&window.to_le_bytes());
}

/// Frame kinds inside DATA.
pub mod frame {
    /// The first (or only) fragment of a message, with the full message header.
    pub const FIRST: u8 = 1;
    /// A continuation fragment.
    pub const CONT: u8 = 2;
}

/// What a message is, from the connection's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MsgKind {
    /// A message that expects no reply.
    Oneway = 0,
    /// A request: the handler gets a reply token.
    Request = 1,
    /// A reply to an outstanding request.
    Reply = 2,
    /// An undeliverable message coming back to its sender.
    Bounce = 3,
}

impl MsgKind {
    fn from_u8(v: u8) -> Result<MsgKind, WireError> {
        Ok(match v {
            0 => MsgKind::Oneway,
            1 => MsgKind::Request,
            2 => MsgKind::Reply,
            3 => MsgKind::Bounce,
            _ => return Err(WireError::BadField("message kind")),
        })
    }
}

/// Message classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// Handler + arguments.
    Small = 0,
    /// Arguments + payload delivered in a layer-owned buffer.
    Medium = 1,
    /// Arguments + payload placed in the receiver's segment.
    Bulk = 2,
}

impl Class {
    fn from_u8(v: u8) -> Result<Class, WireError> {
        Ok(match v {
            0 => Class::Small,
            1 => Class::Medium,
            2 => Class::Bulk,
            _ => return Err(WireError::BadField("class")),
        })
    }
}

/// A reply token as carried by a delegated request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenWire {
    /// The original requester's address.
    pub addr: SocketAddr,
    /// The requester's tag.
    pub tag: u64,
    /// The requester's request id.
    pub req_id: u64,
    /// The requester's incarnation.
    pub inc: u64,
}

/// The header of a FIRST frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsgHeader {
    /// What the message is.
    pub kind: MsgKind,
    /// Its class (for a bounce: the original class).
    pub class: Class,
    /// Handler index at the receiver.
    pub handler: u16,
    /// Bounce code (0 otherwise).
    pub code: u8,
    /// For a bounce: the kind of the original message.
    pub orig_kind: MsgKind,
    /// Tag the receiver must have.
    pub dst_tag: u64,
    /// The sender's own tag (so a reply can name it).
    pub src_tag: u64,
    /// Request id (request: the requester's id; reply: the id answered).
    pub req_id: u64,
    /// Payload bytes in this message across all fragments.
    pub total_len: u32,
    /// For a bounce of a bulk message: its length.
    pub orig_len: u32,
    /// Bulk: offset in the receiver's segment.
    pub bulk_off: u64,
    /// Reply: the requester incarnation the token was made for.
    pub token_inc: u64,
    /// The sender's message id (echoed back by a bounce).
    pub msg_id: u64,
    /// Number of arguments.
    pub nargs: u8,
}

/// A parsed frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    /// First fragment.
    First {
        /// Header.
        hdr: MsgHeader,
        /// Arguments (`hdr.nargs` of them are valid).
        args: [u64; MAX_ARGS],
        /// Delegated reply token, if any.
        token: Option<TokenWire>,
        /// Payload bytes of this fragment.
        payload: &'a [u8],
    },
    /// Continuation fragment.
    Cont {
        /// Offset of this fragment in the message payload.
        frag_off: u32,
        /// Its bytes.
        payload: &'a [u8],
    },
}

fn put_addr(out: &mut Vec<u8>, a: &SocketAddr) {
    match a.ip() {
        IpAddr::V4(v4) => {
            out.push(4);
            let mut ip = [0u8; 16];
            ip[..4].copy_from_slice(&v4.octets());
            out.extend_from_slice(&ip);
        }
        IpAddr::V6(v6) => {
            out.push(6);
            out.extend_from_slice(&v6.octets());
        }
    }
    out.extend_from_slice(&a.port().to_le_bytes());
}

fn addr_at(b: &[u8], o: usize) -> Result<SocketAddr, WireError> {
    let fam = u8_at(b, o)?;
    let ip = b.get(o + 1..o + 17).ok_or(WireError::Truncated)?;
    let port = u16_at(b, o + 17)?;
    let ip = match fam {
        4 => IpAddr::V4(Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3])),
        6 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(ip);
            IpAddr::V6(Ipv6Addr::from(a))
        }
        _ => return Err(WireError::BadField("address family")),
    };
    Ok(SocketAddr::new(ip, port))
}

/// Writes a FIRST frame header with its arguments and optional token; the payload follows.
pub fn put_first(out: &mut Vec<u8>, h: &MsgHeader, args: &[u64], token: Option<&TokenWire>) {
    debug_assert!(args.len() <= MAX_ARGS && args.len() == h.nargs as usize);
    out.push(frame::FIRST);
    out.push(h.kind as u8);
    out.push(h.class as u8);
    out.push(h.nargs);
    out.extend_from_slice(&h.handler.to_le_bytes());
    out.push(h.code);
    out.push(u8::from(token.is_some()) | ((h.orig_kind as u8) << 4));
    for v in [h.dst_tag, h.src_tag, h.req_id] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&h.total_len.to_le_bytes());
    out.extend_from_slice(&h.orig_len.to_le_bytes());
    out.extend_from_slice(&h.bulk_off.to_le_bytes());
    out.extend_from_slice(&h.token_inc.to_le_bytes());
    out.extend_from_slice(&h.msg_id.to_le_bytes());
    for a in args {
        out.extend_from_slice(&a.to_le_bytes());
    }
    if let Some(t) = token {
        put_addr(out, &t.addr);
        out.extend_from_slice(&t.tag.to_le_bytes());
        out.extend_from_slice(&t.req_id.to_le_bytes());
        out.extend_from_slice(&t.inc.to_le_bytes());
    }
}

/// Writes a CONT frame header; the payload follows.
pub fn put_cont(out: &mut Vec<u8>, frag_off: u32) {
    out.extend_from_slice(&[frame::CONT, 0, 0, 0]);
    out.extend_from_slice(&frag_off.to_le_bytes());
}

/// Parses a frame.
pub fn parse_frame(b: &[u8]) -> Result<Frame<'_>, WireError> {
    match u8_at(b, 0)? {
        frame::FIRST => {
            let nargs = u8_at(b, 3)?;
            if nargs as usize > MAX_ARGS {
                return Err(WireError::BadField("nargs"));
            }
            let flags = u8_at(b, 7)?;
            let hdr = MsgHeader {
                kind: MsgKind::from_u8(u8_at(b, 1)?)?,
                class: Class::from_u8(u8_at(b, 2)?)?,
                nargs,
                handler: u16_at(b, 4)?,
                code: u8_at(b, 6)?,
                orig_kind: MsgKind::from_u8(flags >> 4)?,
                dst_tag: u64_at(b, 8)?,
                src_tag: u64_at(b, 16)?,
                req_id: u64_at(b, 24)?,
                total_len: u32_at(b, 32)?,
                orig_len: u32_at(b, 36)?,
                bulk_off: u64_at(b, 40)?,
                token_inc: u64_at(b, 48)?,
                msg_id: u64_at(b, 56)?,
            };
            let mut args = [0u64; MAX_ARGS];
            let mut o = FIRST_HDR_LEN;
            for a in args.iter_mut().take(nargs as usize) {
                *a = u64_at(b, o)?;
                o += 8;
            }
            let token = if flags & 1 != 0 {
                let t = TokenWire {
                    addr: addr_at(b, o)?,
                    tag: u64_at(b, o + 19)?,
                    req_id: u64_at(b, o + 27)?,
                    inc: u64_at(b, o + 35)?,
                };
                o += TOKEN_LEN;
                Some(t)
            } else {
                None
            };
            let payload = b.get(o..).ok_or(WireError::Truncated)?;
            if payload.len() > hdr.total_len as usize {
                return Err(WireError::BadField("payload longer than total_len"));
            }
            Ok(Frame::First {
                hdr,
                args,
                token,
                payload,
            })
        }
        frame::CONT => {
            let frag_off = u32_at(b, 4)?;
            let payload = b.get(CONT_HDR_LEN..).ok_or(WireError::Truncated)?;
            Ok(Frame::Cont { frag_off, payload })
        }
        k => Err(WireError::UnknownKind(k)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn common(kind: u8) -> Common {
        Common {
            version: 1,
            kind,
            vnet: 7,
            src_inc: 11,
            dst_inc: 13,
        }
    }

    #[test]
    fn packets_round_trip() {
        let pkts = vec![
            Packet::Hello {
                common: common(kind::HELLO),
                window: 9,
                start_seq: 77,
            },
            Packet::Refused {
                common: common(kind::REFUSED),
                reason: refuse::VERSION,
            },
            Packet::Data {
                common: common(kind::DATA),
                seq: 5,
                ack: 6,
                window: 7,
                frame: b"xyz",
            },
            Packet::Ack {
                common: common(kind::ACK),
                ack: 3,
                window: 4,
                sack: [1, 2, 3, u64::MAX],
            },
            Packet::Reset {
                common: common(kind::RESET),
                echo: 99,
            },
        ];
        for p in pkts {
            let mut out = Vec::new();
            encode_packet(&mut out, &p);
            assert_eq!(parse_packet(&out).unwrap(), p);
        }
    }

    proptest! {
        #[test]
        fn first_frame_round_trips(kind in 0u8..4, class in 0u8..3, handler: u16, nargs in 0usize..=8,
                                   tags: (u64, u64, u64), lens: (u32, u32, u64, u64),
                                   v6: bool, port: u16, payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let args: Vec<u64> = (0..nargs as u64).map(|i| i * 31 + tags.0).collect();
            let hdr = MsgHeader {
                kind: MsgKind::from_u8(kind).unwrap(), class: Class::from_u8(class).unwrap(), handler,
                code: 3, orig_kind: MsgKind::Reply, dst_tag: tags.0, src_tag: tags.1, req_id: tags.2,
                total_len: payload.len() as u32 + lens.0 % 1000, orig_len: lens.1, bulk_off: lens.2,
                token_inc: lens.3, msg_id: tags.0 ^ 5, nargs: nargs as u8,
            };
            let addr: SocketAddr = if v6 { SocketAddr::new("fe80::1".parse().unwrap(), port) }
                                   else { SocketAddr::new("10.1.2.3".parse().unwrap(), port) };
            let token = TokenWire { addr, tag: tags.1, req_id: tags.2, inc: lens.3 };
            let mut out = Vec::new();
            put_first(&mut out, &hdr, &args, Some(&token));
            out.extend_from_slice(&payload);
            match parse_frame(&out).unwrap() {
                Frame::First { hdr: h2, args: a2, token: t2, payload: p2 } => {
                    prop_assert_eq!(h2, hdr);
                    prop_assert_eq!(&a2[..nargs], &args[..]);
                    prop_assert_eq!(t2, Some(token));
                    prop_assert_eq!(p2, &payload[..]);
                }
                f => prop_assert!(false, "wrong frame {:?}", f),
            }
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_packet(&bytes);
            let _ = parse_frame(&bytes);
        }
    }
}
