//! Ethernet II / IPv4 / UDP and ARP frames, built and parsed in user space: sans-IO, no
//! DPDK, tested on its own. The UDP payload is exactly an `am-udp` datagram (the engine's
//! wire format), so a DPDK endpoint and a kernel-socket endpoint talk to each other.
//!
//! Parsing never panics and never reads past the frame: every length is checked against
//! the bytes present, and a frame that is not what we take is returned as a [`Bad`]
//! reason for the driver to count.

use std::net::{Ipv4Addr, SocketAddrV4};

/// A MAC address.
pub type Mac = [u8; 6];
/// The broadcast MAC.
pub const BROADCAST: Mac = [0xff; 6];
/// Ethernet header bytes.
pub const ETH_LEN: usize = 14;
/// IPv4 header bytes (we send no options).
pub const IPV4_LEN: usize = 20;
/// UDP header bytes.
pub const UDP_LEN: usize = 8;
/// All header bytes before a datagram we send.
pub const HEADERS: usize = ETH_LEN + IPV4_LEN + UDP_LEN;
/// The shortest Ethernet frame (without the FCS); shorter ones are padded.
pub const MIN_FRAME: usize = 60;
/// ARP frame bytes (Ethernet + ARP for IPv4 over Ethernet), padded to [`MIN_FRAME`].
pub const ARP_FRAME: usize = MIN_FRAME;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const PROTO_UDP: u8 = 17;
/// ARP request.
pub const ARP_REQUEST: u16 = 1;
/// ARP reply.
pub const ARP_REPLY: u16 = 2;
const TTL: u8 = 64;

/// Why a received frame was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Bad {
    /// Shorter than its headers.
    Runt,
    /// Neither IPv4 nor ARP (IPv6, VLAN-tagged, LLDP, ...).
    Foreign,
    /// An IPv4 header that is not one (version, header length, total length).
    BadIpHeader,
    /// The IPv4 header checksum is wrong.
    BadIpChecksum,
    /// An IPv4 fragment (we never send any; reassembly is not done).
    Fragment,
    /// IPv4 but not UDP.
    NotUdp,
    /// The IP or UDP length claims more bytes than the frame holds, or the UDP length is
    /// smaller than its header.
    Truncated,
    /// The UDP checksum is wrong.
    BadUdpChecksum,
    /// An ARP packet that is not IPv4 over Ethernet, or is cut short.
    BadArp,
}

/// An ARP packet (IPv4 over Ethernet).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arp {
    /// [`ARP_REQUEST`] or [`ARP_REPLY`] (others are parsed and ignored by the driver).
    pub op: u16,
    /// Sender hardware address.
    pub sha: Mac,
    /// Sender protocol address.
    pub spa: Ipv4Addr,
    /// Target hardware address.
    pub tha: Mac,
    /// Target protocol address.
    pub tpa: Ipv4Addr,
}

/// A frame we take.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// A UDP datagram.
    Udp {
        /// Destination MAC.
        dst_mac: Mac,
        /// Source MAC.
        src_mac: Mac,
        /// Source address.
        src: SocketAddrV4,
        /// Destination address.
        dst: SocketAddrV4,
        /// The datagram (borrowed from the frame: no copy).
        payload: &'a [u8],
    },
    /// An ARP packet.
    Arp {
        /// Destination MAC.
        dst_mac: Mac,
        /// The packet.
        arp: Arp,
    },
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn mac(b: &[u8], at: usize) -> Mac {
    let mut m = [0u8; 6];
    m.copy_from_slice(&b[at..at + 6]);
    m
}

fn ip(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

/// The ones' complement sum of `bytes` (big-endian 16-bit words, an odd byte padded),
/// folded, added to `start`.
fn sum16(start: u32, bytes: &[u8]) -> u32 {
    // 32-bit big-endian words summed in 64 bits, folded at the end: the same ones'
    // complement sum as 16-bit words (RFC 1071), about twice as fast. A frame has at most
    // a few hundred words, far from overflowing.
    let mut s = start as u64;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        s += (w >> 32) + (w & 0xffff_ffff);
    }
    let mut rest = chunks.remainder().chunks_exact(2);
    for c in &mut rest {
        s += u16::from_be_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = rest.remainder() {
        s += (*last as u64) << 8;
    }
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u32
}

/// The IPv4 header checksum of `hdr` (its checksum field counted as it is: zero it to
/// compute one, leave it to verify — a correct header then gives 0).
pub fn ipv4_checksum(hdr: &[u8]) -> u16 {
    !(sum16(0, hdr) as u16)
}

fn pseudo_sum(src: Ipv4Addr, dst: Ipv4Addr, udp_len: usize) -> u32 {
    let mut p = [0u8; 12];
    p[0..4].copy_from_slice(&src.octets());
    p[4..8].copy_from_slice(&dst.octets());
    p[9] = PROTO_UDP;
    p[10..12].copy_from_slice(&(udp_len as u16).to_be_bytes());
    sum16(0, &p)
}

/// The UDP checksum of `udp` (header and data) between `src` and `dst`, the checksum
/// field counted as it is. Computing one: zero the field; a result of 0 is sent as 0xffff
/// (0 means "no checksum").
pub fn udp_checksum(src: Ipv4Addr, dst: Ipv4Addr, udp: &[u8]) -> u16 {
    !(sum16(pseudo_sum(src, dst, udp.len()), udp) as u16)
}

/// Addresses of a UDP frame to build.
#[derive(Clone, Copy, Debug)]
pub struct UdpAddrs {
    /// Source MAC.
    pub src_mac: Mac,
    /// Destination MAC.
    pub dst_mac: Mac,
    /// Source address.
    pub src: SocketAddrV4,
    /// Destination address.
    pub dst: SocketAddrV4,
}

/// Writes an Ethernet/IPv4/UDP frame carrying `payload` into `buf` (at least
/// `HEADERS + payload.len()` bytes, padded up to [`MIN_FRAME`] when shorter); returns
/// the frame's length. `ip_checksum`: compute the IPv4 header checksum here (false when
/// the port fills it in); `udp_checksum`: compute the UDP checksum (false sends 0, "none").
pub fn write_udp(
    buf: &mut [u8],
    a: &UdpAddrs,
    ip_id: u16,
    payload: &[u8],
    ip_checksum: bool,
    udp_checksum_on: bool,
) -> Option<usize> {
    let len = (HEADERS + payload.len()).max(MIN_FRAME);
    let ip_total = IPV4_LEN + UDP_LEN + payload.len();
    if buf.len() < len || ip_total > u16::MAX as usize {
        return None;
    }
    let f = &mut buf[..len];
    f[0..6].copy_from_slice(&a.dst_mac);
    f[6..12].copy_from_slice(&a.src_mac);
    f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    let h = &mut f[ETH_LEN..ETH_LEN + IPV4_LEN];
    h[0] = 0x45;
    h[1] = 0;
    h[2..4].copy_from_slice(&(ip_total as u16).to_be_bytes());
    h[4..6].copy_from_slice(&ip_id.to_be_bytes());
    h[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // don't fragment
    h[8] = TTL;
    h[9] = PROTO_UDP;
    h[10..12].copy_from_slice(&[0, 0]);
    h[12..16].copy_from_slice(&a.src.ip().octets());
    h[16..20].copy_from_slice(&a.dst.ip().octets());
    if ip_checksum {
        let c = ipv4_checksum(h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
    }
    let u0 = ETH_LEN + IPV4_LEN;
    let udp_len = UDP_LEN + payload.len();
    f[u0..u0 + 2].copy_from_slice(&a.src.port().to_be_bytes());
    f[u0 + 2..u0 + 4].copy_from_slice(&a.dst.port().to_be_bytes());
    f[u0 + 4..u0 + 6].copy_from_slice(&(udp_len as u16).to_be_bytes());
    f[u0 + 6..u0 + 8].copy_from_slice(&[0, 0]);
    f[HEADERS..HEADERS + payload.len()].copy_from_slice(payload);
    f[HEADERS + payload.len()..].fill(0);
    if udp_checksum_on {
        let c = match udp_checksum(*a.src.ip(), *a.dst.ip(), &f[u0..u0 + udp_len]) {
            0 => 0xffff,
            c => c,
        };
        f[u0 + 6..u0 + 8].copy_from_slice(&c.to_be_bytes());
    }
    Some(len)
}

/// Writes an ARP frame into `buf` (at least [`ARP_FRAME`] bytes); returns its length.
/// Requests go to the broadcast MAC, replies to the target's.
pub fn write_arp(buf: &mut [u8], arp: &Arp) -> Option<usize> {
    if buf.len() < ARP_FRAME {
        return None;
    }
    let f = &mut buf[..ARP_FRAME];
    let dst = if arp.op == ARP_REQUEST {
        BROADCAST
    } else {
        arp.tha
    };
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&arp.sha);
    f[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    let p = &mut f[ETH_LEN..];
    p[0..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    p[2..4].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    p[4] = 6;
    p[5] = 4;
    p[6..8].copy_from_slice(&arp.op.to_be_bytes());
    p[8..14].copy_from_slice(&arp.sha);
    p[14..18].copy_from_slice(&arp.spa.octets());
    p[18..24].copy_from_slice(&arp.tha);
    p[24..28].copy_from_slice(&arp.tpa.octets());
    p[28..].fill(0);
    Some(ARP_FRAME)
}

/// Parses a received frame. `ip_checked` is what the port found of the IPv4 header
/// checksum (`None`: not checked, so it is checked here). `verify_udp`: check a non-zero
/// UDP checksum.
pub fn parse(f: &[u8], ip_checked: Option<bool>, verify_udp: bool) -> Result<Parsed<'_>, Bad> {
    if f.len() < ETH_LEN {
        return Err(Bad::Runt);
    }
    let dst_mac = mac(f, 0);
    let src_mac = mac(f, 6);
    match be16(f, 12) {
        ETHERTYPE_ARP => {
            let p = &f[ETH_LEN..];
            if p.len() < 28
                || be16(p, 0) != 1
                || be16(p, 2) != ETHERTYPE_IPV4
                || p[4] != 6
                || p[5] != 4
            {
                return Err(Bad::BadArp);
            }
            Ok(Parsed::Arp {
                dst_mac,
                arp: Arp {
                    op: be16(p, 6),
                    sha: mac(p, 8),
                    spa: ip(p, 14),
                    tha: mac(p, 18),
                    tpa: ip(p, 24),
                },
            })
        }
        ETHERTYPE_IPV4 => {
            let h = &f[ETH_LEN..];
            if h.len() < IPV4_LEN {
                return Err(Bad::Runt);
            }
            let ihl = (h[0] & 0x0f) as usize * 4;
            if h[0] >> 4 != 4 || ihl < IPV4_LEN {
                return Err(Bad::BadIpHeader);
            }
            let total = be16(h, 2) as usize;
            if h.len() < ihl {
                return Err(Bad::Runt);
            }
            if total < ihl {
                return Err(Bad::BadIpHeader);
            }
            if total > h.len() {
                return Err(Bad::Truncated);
            }
            let ok = match ip_checked {
                Some(ok) => ok,
                None => ipv4_checksum(&h[..ihl]) == 0,
            };
            if !ok {
                return Err(Bad::BadIpChecksum);
            }
            // More-fragments flag or a fragment offset.
            if be16(h, 6) & 0x3fff != 0 {
                return Err(Bad::Fragment);
            }
            if h[9] != PROTO_UDP {
                return Err(Bad::NotUdp);
            }
            let src_ip = ip(h, 12);
            let dst_ip = ip(h, 16);
            let u = &h[ihl..total];
            if u.len() < UDP_LEN {
                return Err(Bad::Truncated);
            }
            let ulen = be16(u, 4) as usize;
            if ulen < UDP_LEN || ulen > u.len() {
                return Err(Bad::Truncated);
            }
            let u = &u[..ulen];
            if verify_udp && be16(u, 6) != 0 && udp_checksum(src_ip, dst_ip, u) != 0 {
                return Err(Bad::BadUdpChecksum);
            }
            Ok(Parsed::Udp {
                dst_mac,
                src_mac,
                src: SocketAddrV4::new(src_ip, be16(u, 0)),
                dst: SocketAddrV4::new(dst_ip, be16(u, 2)),
                payload: &u[UDP_LEN..],
            })
        }
        _ => Err(Bad::Foreign),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addrs() -> UdpAddrs {
        UdpAddrs {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src: "10.1.0.1:7000".parse().unwrap(),
            dst: "10.1.0.2:7001".parse().unwrap(),
        }
    }

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; HEADERS + payload.len() + MIN_FRAME];
        let n = write_udp(&mut b, &addrs(), 9, payload, true, true).unwrap();
        b.truncate(n);
        b
    }

    #[test]
    fn udp_round_trip_and_known_checksum() {
        let f = frame(b"hello");
        assert_eq!(f.len(), MIN_FRAME, "padded to the shortest frame");
        match parse(&f, None, true).unwrap() {
            Parsed::Udp {
                src,
                dst,
                payload,
                src_mac,
                dst_mac,
            } => {
                assert_eq!(payload, b"hello", "padding is not payload");
                assert_eq!(src, addrs().src);
                assert_eq!(dst, addrs().dst);
                assert_eq!((src_mac, dst_mac), (addrs().src_mac, addrs().dst_mac));
            }
            p => panic!("{p:?}"),
        }
        // The IPv4 header checksum of the worked example in RFC 1071's style: a header
        // whose checksum field holds the right value sums to zero.
        let hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(ipv4_checksum(&hdr), 0);
        let mut z = hdr;
        z[10] = 0;
        z[11] = 0;
        assert_eq!(ipv4_checksum(&z), 0xb861);
    }

    #[test]
    fn each_bad_frame_has_its_reason() {
        let good = frame(&[7u8; 100]);
        assert_eq!(parse(&good[..10], None, true), Err(Bad::Runt));
        let mut v6 = good.clone();
        v6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        assert_eq!(parse(&v6, None, true), Err(Bad::Foreign));
        let mut bad_ck = good.clone();
        bad_ck[ETH_LEN + 10] ^= 1;
        assert_eq!(parse(&bad_ck, None, true), Err(Bad::BadIpChecksum));
        // The port's verdict stands in for ours.
        assert!(parse(&bad_ck, Some(true), true).is_ok());
        assert_eq!(parse(&good, Some(false), true), Err(Bad::BadIpChecksum));
        let mut bad_udp = good.clone();
        bad_udp[HEADERS + 3] ^= 0x40;
        assert_eq!(parse(&bad_udp, None, true), Err(Bad::BadUdpChecksum));
        assert!(parse(&bad_udp, None, false).is_ok());
        let cut = &good[..good.len() - 1];
        assert_eq!(parse(cut, None, true), Err(Bad::Truncated));
        let mut tcp = good.clone();
        tcp[ETH_LEN + 9] = 6;
        tcp[ETH_LEN + 10] = 0;
        tcp[ETH_LEN + 11] = 0;
        let c = ipv4_checksum(&tcp[ETH_LEN..ETH_LEN + IPV4_LEN]);
        tcp[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(parse(&tcp, None, true), Err(Bad::NotUdp));
        let mut frag = good.clone();
        frag[ETH_LEN + 6] = 0x20; // more fragments
        frag[ETH_LEN + 10] = 0;
        frag[ETH_LEN + 11] = 0;
        let c = ipv4_checksum(&frag[ETH_LEN..ETH_LEN + IPV4_LEN]);
        frag[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(parse(&frag, None, true), Err(Bad::Fragment));
        let mut ihl = good.clone();
        ihl[ETH_LEN] = 0x44;
        assert_eq!(parse(&ihl, None, true), Err(Bad::BadIpHeader));
    }

    #[test]
    fn arp_round_trip() {
        let a = Arp {
            op: ARP_REQUEST,
            sha: [2, 0, 0, 0, 0, 1],
            spa: "10.1.0.1".parse().unwrap(),
            tha: [0; 6],
            tpa: "10.1.0.2".parse().unwrap(),
        };
        let mut b = [0u8; ARP_FRAME];
        assert_eq!(write_arp(&mut b, &a), Some(ARP_FRAME));
        assert_eq!(
            parse(&b, None, true),
            Ok(Parsed::Arp {
                dst_mac: BROADCAST,
                arp: a
            })
        );
        assert_eq!(parse(&b[..30], None, true), Err(Bad::BadArp));
    }

    /// The ones' complement sum 16 bits at a time, as RFC 1071 writes it.
    fn sum16_reference(bytes: &[u8]) -> u32 {
        let mut s: u64 = 0;
        for c in bytes.chunks(2) {
            s += if c.len() == 2 {
                u16::from_be_bytes([c[0], c[1]]) as u64
            } else {
                (c[0] as u64) << 8
            };
        }
        while s >> 16 != 0 {
            s = (s & 0xffff) + (s >> 16);
        }
        s as u32
    }

    proptest! {
        #[test]
        fn fast_sum_is_the_rfc_1071_sum(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            prop_assert_eq!(sum16(0, &bytes), sum16_reference(&bytes));
        }

        // Any bytes: a verdict, never a panic, and a UDP payload always inside the frame.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(Parsed::Udp { payload, .. }) = parse(&bytes, None, true) {
                prop_assert!(payload.len() + HEADERS <= bytes.len());
            }
        }

        // A valid frame with any one byte changed is dropped or still parses, never panics;
        // a changed payload byte is caught by the UDP checksum.
        #[test]
        fn corrupted_frames(payload in proptest::collection::vec(any::<u8>(), 18..300),
                            at in any::<prop::sample::Index>(), x in 1u8..) {
            let mut f = frame(&payload);
            let i = at.index(f.len());
            f[i] ^= x;
            let r = parse(&f, None, true);
            if i >= HEADERS && i < HEADERS + payload.len() {
                prop_assert_eq!(r, Err(Bad::BadUdpChecksum));
            }
        }

        #[test]
        fn any_payload_round_trips(payload in proptest::collection::vec(any::<u8>(), 0..1472)) {
            let f = frame(&payload);
            match parse(&f, None, true) {
                Ok(Parsed::Udp { payload: p, .. }) => prop_assert_eq!(p, &payload[..]),
                other => prop_assert!(false, "{:?}", other),
            }
        }
    }
}
