//! Names, tags, time, configuration and counters of the Active Messages layer.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// The wire protocol version this build speaks.
pub const PROTOCOL_VERSION: u8 = 1;
/// At most this many `u64` arguments per message.
pub const MAX_ARGS: usize = 8;

/// A point in time in nanoseconds since an arbitrary origin chosen by the driver.
///
/// The engine never reads a clock: drivers pass `Time` in (the UDP driver from a monotonic
/// clock, the simulator from its virtual clock).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Time(pub u64);

impl Time {
    /// `self + d`, saturating.
    pub fn plus(self, d: Duration) -> Time {
        Time(self.0.saturating_add(d.as_nanos() as u64))
    }
    /// Nanoseconds since `earlier`, zero if `earlier` is later.
    pub fn since_ns(self, earlier: Time) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// An endpoint's 64-bit tag: the capability a sender must present.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Tag(pub u64);

/// The global name of an endpoint: the transport address of its socket (or queue pair)
/// and the virtual network it belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointName {
    /// Transport address.
    pub addr: SocketAddr,
    /// Virtual network id.
    pub vnet: u32,
}

impl fmt::Display for EndpointName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/vnet{}", self.addr, self.vnet)
    }
}

/// Configuration of an endpoint. Every queue has a stated bound here.
#[derive(Clone, Debug)]
pub struct Config {
    /// Virtual network this endpoint joins.
    pub vnet: u32,
    /// This endpoint's tag.
    pub tag: Tag,
    /// Handler table size.
    pub handlers: usize,
    /// Translation table size.
    pub translations: usize,
    /// Bulk segment size in bytes.
    pub segment_bytes: usize,
    /// Largest medium payload (default 8 KiB).
    pub max_medium_bytes: usize,
    /// Packets in flight per peer that this endpoint accepts (its receive window, at most
    /// 256: the selective-ack bitmap covers that many).
    pub recv_window_packets: u32,
    /// Packets in flight that this endpoint accepts from all peers together; divided among
    /// the active peers so several bulk senders are paced together (rate matching).
    pub recv_budget_packets: u32,
    /// Bytes in flight that this endpoint accepts from all peers together (keep it under
    /// the transport's receive buffer; the UDP driver's is 8 MiB).
    pub recv_budget_bytes: usize,
    /// Messages queued per peer before a send returns `WouldBlock`.
    pub send_queue_messages: usize,
    /// Outstanding requests (including gather members) before `TooManyRequests`.
    pub max_outstanding_requests: usize,
    /// A peer that acknowledges nothing for this long is declared unreachable (default 2 s).
    pub unreachable_timeout: Duration,
    /// A request without a reply for this long is returned as `Unreachable` (default 5 s).
    pub request_timeout: Duration,
    /// How long an acknowledgement may wait for data to carry it (delayed ack); an
    /// acknowledgement leaves at once after 8 packets or on a gap. Keep it well under
    /// `min_rto`.
    pub ack_delay: Duration,
    /// Smallest retransmission timeout.
    pub min_rto: Duration,
    /// Largest retransmission timeout (after backoff).
    pub max_rto: Duration,
    /// Capacity of the cross-thread handle queue.
    pub handle_queue: usize,
    /// Protocol version spoken (tests only: to show that another version is refused).
    #[doc(hidden)]
    pub protocol_version: u8,
    /// Test-only: deliver duplicates (switches duplicate suppression off) so the
    /// conformance suite can show it catches the fault.
    #[doc(hidden)]
    pub testing_disable_dedup: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            vnet: 0,
            tag: Tag(0),
            handlers: 64,
            translations: 256,
            segment_bytes: 1 << 20,
            max_medium_bytes: 8 * 1024,
            recv_window_packets: 256,
            recv_budget_packets: 1024,
            recv_budget_bytes: 4 << 20,
            send_queue_messages: 1024,
            max_outstanding_requests: 4096,
            unreachable_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            ack_delay: Duration::from_micros(500),
            min_rto: Duration::from_millis(10),
            max_rto: Duration::from_millis(200),
            handle_queue: 1024,
            protocol_version: PROTOCOL_VERSION,
            testing_disable_dedup: false,
        }
    }
}

/// Counters of one endpoint. Every drop is counted here.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Datagrams handed to the transport (first sends and retransmissions).
    pub packets_sent: u64,
    /// Datagrams received.
    pub packets_received: u64,
    /// Bytes handed to the transport.
    pub bytes_sent: u64,
    /// Data packets retransmitted.
    pub retransmits: u64,
    /// Bytes retransmitted.
    pub bytes_retransmitted: u64,
    /// Duplicate data packets suppressed.
    pub duplicates_dropped: u64,
    /// Data packets that arrived ahead of a gap and were buffered.
    pub reordered: u64,
    /// Packets dropped because they did not parse (garbage, truncated, bad magic).
    pub malformed_dropped: u64,
    /// Packets dropped because they named another incarnation or an unknown connection.
    pub stale_dropped: u64,
    /// Packets dropped beyond the receive window.
    pub window_dropped: u64,
    /// Messages dropped because they carried the wrong tag.
    pub bad_tag_dropped: u64,
    /// Messages dropped for other reasons (no handler, other vnet, segment bounds...).
    pub messages_rejected: u64,
    /// Handlers run for requests and one-way messages.
    pub messages_handled: u64,
    /// Reply handlers run (or gather members filled).
    pub replies_handled: u64,
    /// Requests sent (including delegated ones and gather members).
    pub requests_sent: u64,
    /// Replies sent.
    pub replies_sent: u64,
    /// Requests passed on by delegation.
    pub delegations: u64,
    /// Messages returned through the error upcall.
    pub upcalls: u64,
    /// Connections established (handshakes completed).
    pub handshakes: u64,
    /// Connections torn down because the peer was unreachable or restarted.
    pub connection_failures: u64,
}

impl Stats {
    /// Adds every counter of `o` to this one (totals over several endpoints).
    pub fn add(&mut self, o: &Stats) {
        self.packets_sent += o.packets_sent;
        self.packets_received += o.packets_received;
        self.bytes_sent += o.bytes_sent;
        self.retransmits += o.retransmits;
        self.bytes_retransmitted += o.bytes_retransmitted;
        self.duplicates_dropped += o.duplicates_dropped;
        self.reordered += o.reordered;
        self.malformed_dropped += o.malformed_dropped;
        self.stale_dropped += o.stale_dropped;
        self.window_dropped += o.window_dropped;
        self.bad_tag_dropped += o.bad_tag_dropped;
        self.messages_rejected += o.messages_rejected;
        self.messages_handled += o.messages_handled;
        self.replies_handled += o.replies_handled;
        self.requests_sent += o.requests_sent;
        self.replies_sent += o.replies_sent;
        self.delegations += o.delegations;
        self.upcalls += o.upcalls;
        self.handshakes += o.handshakes;
        self.connection_failures += o.connection_failures;
    }
}
