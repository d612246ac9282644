//! The `Transport` trait: what a driver provides to the engine.
//!
//! A transport moves datagrams; it states in [`Capabilities`] what it does itself so the
//! engine adds only what is missing (an RDMA RC queue pair is reliable and ordered; UDP is
//! neither). Drivers own all IO: sockets, clocks, epoll, eventfds.

use crate::error::TransportError;
use crate::types::Time;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// What a transport provides itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Datagrams arrive exactly once and in order, or the transport reports the peer failed
    /// (RDMA RC). When false the engine adds sequencing, acknowledgement, retransmission
    /// and duplicate suppression.
    pub reliable: bool,
    /// The transport can place bulk data in the remote segment itself (RDMA WRITE). When
    /// false the engine fragments bulk data and reassembles it in place.
    pub bulk_placement: bool,
    /// The largest datagram the path carries (path MTU less IP and UDP headers).
    pub max_datagram: usize,
    /// The most datagrams one peer may have in flight towards this transport (an RDMA
    /// queue pair's posted receives); the engine never advertises a larger window.
    /// `u32::MAX`: no limit of the transport's own.
    pub max_window: u32,
}

/// Which sources wake [`Transport::wait`]. Timers always wake it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventMask {
    /// Wake when a datagram arrives.
    pub network: bool,
    /// Wake when another thread sends through a handle.
    pub handle: bool,
}

impl Default for EventMask {
    fn default() -> Self {
        EventMask {
            network: true,
            handle: true,
        }
    }
}

/// Wakes a sleeping endpoint from another thread (an eventfd write for real drivers).
pub trait Notify: Send + Sync {
    /// Wakes the endpoint's `wait`.
    fn notify(&self);
}

/// One datagram to send.
#[derive(Clone, Debug)]
pub struct Transmit {
    /// Destination.
    pub to: SocketAddr,
    /// Bytes.
    pub bytes: Vec<u8>,
    /// Only with [`Capabilities::bulk_placement`]: the datagram is the header of a bulk
    /// message whose data the transport must place in the receiver's segment itself. The
    /// receiving transport delivers the header only once the data is in place.
    pub bulk: Option<BulkWrite>,
}

/// Bulk data for the transport to place (RDMA WRITE with immediate).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BulkWrite {
    /// The tag the message presents to its destination. The transport places data only at
    /// a peer that accepted this tag; otherwise it sends the header alone and the receiving
    /// engine rejects the message (`BadTag`).
    pub tag: u64,
    /// Source ranges `(offset, len)` in the sender's segment.
    pub src: Vec<(usize, usize)>,
    /// Offset in the receiver's segment.
    pub dst_offset: u64,
    /// Total length.
    pub len: usize,
}

/// The endpoint memory a transport may register with its device: the segment. Holding one
/// means its maker promised (see [`SegmentMemory::new`]) that the memory stays valid and
/// never moves for as long as the transport it is given to lives.
#[derive(Clone, Copy, Debug)]
pub struct SegmentMemory {
    ptr: *mut u8,
    len: usize,
}

impl SegmentMemory {
    /// Describes `len` bytes at `ptr`.
    ///
    /// # Safety
    /// `ptr..ptr + len` must be valid for reads and writes, must not move, and must outlive
    /// the transport this is given to (`Endpoint` keeps its segment in a buffer it never
    /// resizes and drops its transport first). Others may write into it concurrently only
    /// as the transport's device does: while the endpoint does not read that range.
    #[allow(unsafe_code)]
    pub unsafe fn new(ptr: *mut u8, len: usize) -> SegmentMemory {
        SegmentMemory { ptr, len }
    }
    /// Start of the segment.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }
    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True for an empty segment.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A datagram driver.
pub trait Transport {
    /// What the transport provides itself.
    fn capabilities(&self) -> Capabilities;
    /// The address peers use to reach this transport.
    fn local_addr(&self) -> SocketAddr;
    /// The current time.
    fn now(&self) -> Time;
    /// Randomness for incarnation numbers and jitter.
    fn seed(&self) -> u64;
    /// Sends datagrams from the front of `batch`; returns how many it took. Fewer than all
    /// means the transport would block; the engine keeps the rest and tries again.
    fn send_batch(&mut self, batch: &[Transmit]) -> Result<usize, TransportError>;
    /// Receives up to `max` datagrams without blocking, calling `deliver` for each; returns
    /// how many.
    fn recv_batch(
        &mut self,
        max: usize,
        deliver: &mut dyn FnMut(SocketAddr, &[u8]),
    ) -> Result<usize, TransportError>;
    /// Sleeps until a source in `mask` is ready or `timeout` passes (`None`: no limit).
    fn wait(&mut self, timeout: Option<Duration>, mask: EventMask) -> Result<(), TransportError>;
    /// A waker that other threads may use.
    fn notifier(&self) -> Arc<dyn Notify>;
    /// Tells the transport its endpoint's tag and segment, once, before any other call but
    /// `capabilities`, `local_addr`, `now`, `seed` and `notifier`. A transport with
    /// [`Capabilities::bulk_placement`] registers the segment here and grants remote access
    /// only to peers that present `tag`.
    fn attach(&mut self, tag: u64, segment: SegmentMemory) -> Result<(), TransportError> {
        let _ = (tag, segment);
        Ok(())
    }
    /// Peers the transport has seen fail (a queue pair error); the endpoint returns what is
    /// outstanding to them through the error upcall as `Unreachable`.
    fn take_failed(&mut self, failed: &mut dyn FnMut(SocketAddr)) {
        let _ = failed;
    }
    /// Peers towards which a [`Capabilities::reliable`] transport made progress since the
    /// last call (a send completed: the peer's device took the data), though the peer's
    /// engine has not acknowledged it yet, with the transport's time of the report (read
    /// only when there is something to report). The engine counts this as life: a bulk that
    /// takes longer than [`crate::Config::unreachable_timeout`] to cross a slow or loaded
    /// link is not declared unreachable while it moves. Transports that leave
    /// reliability to the engine keep the default (report nothing).
    fn take_progress(&mut self, progressed: &mut dyn FnMut(SocketAddr, Time)) {
        let _ = progressed;
    }
}
