//! The stand-in for the DPDK binding when the crate was built without `libdpdk` (cfg
//! `am_dpdk_missing`, set by `build.rs`): the same API, in which starting EAL, opening a
//! port and making a pool fail with [`DpdkError::Missing`] naming the packages to install.
//! Every other type holds an uninhabited value, so none of its methods can be reached.

#![allow(unsafe_code)]

use std::os::fd::RawFd;

include!("common.rs");

/// No value: the types below cannot be made without DPDK.
#[derive(Clone, Copy, Debug)]
enum Never {}

/// Always fails: DPDK is not in this build.
pub fn eal_init(_opts: &EalOptions) -> Result<(), DpdkError> {
    Err(DpdkError::Missing)
}

/// The TSC clock (never available without DPDK).
#[derive(Clone, Copy, Debug)]
pub struct TscClock(Never);

impl TscClock {
    /// `None`: no EAL to calibrate it.
    pub fn new() -> Option<TscClock> {
        None
    }
    /// Unreachable.
    pub fn ns(&self) -> u64 {
        match self.0 {}
    }
}

/// A packet buffer (none exist without DPDK).
pub struct Mbuf(Never);

impl Mbuf {
    /// Unreachable.
    pub fn data(&self) -> &[u8] {
        match self.0 {}
    }
    /// Unreachable.
    pub fn data_mut(&mut self) -> &mut [u8] {
        match self.0 {}
    }
    /// Unreachable.
    pub fn pkt_len(&self) -> usize {
        match self.0 {}
    }
    /// Unreachable.
    pub fn segments(&self) -> usize {
        match self.0 {}
    }
    /// Unreachable.
    pub fn append(&mut self, _len: usize) -> Option<&mut [u8]> {
        match self.0 {}
    }
    /// Unreachable.
    pub fn offload_ipv4_checksum(&mut self, _l2_len: u16, _l3_len: u16) {
        match self.0 {}
    }
    /// Unreachable.
    pub fn ipv4_checksum_checked(&self) -> Option<bool> {
        match self.0 {}
    }
}

/// A ring (none exist without DPDK).
pub struct Ring(Never);

impl Ring {
    /// Unreachable.
    pub fn enqueue(&self, _pkts: &mut Vec<Mbuf>) -> usize {
        match self.0 {}
    }
    /// Unreachable.
    pub fn dequeue(&self, _out: &mut Vec<Mbuf>, _max: usize) -> usize {
        match self.0 {}
    }
}

/// A port (none can be opened without DPDK).
pub struct Port(Never);

impl Port {
    /// Fails: DPDK is not in this build.
    pub fn open(_spec: &str, _ps: &PortSpec) -> Result<Port, DpdkError> {
        Err(DpdkError::Missing)
    }
    /// Fails: DPDK is not in this build.
    pub fn from_rings(_ps: &PortSpec) -> Result<(Port, Ring, Ring), DpdkError> {
        Err(DpdkError::Missing)
    }
    /// Unreachable.
    pub fn id(&self) -> u16 {
        match self.0 {}
    }
    /// Unreachable.
    pub fn info(&self) -> &PortInfo {
        match self.0 {}
    }
    /// Unreachable.
    pub fn link_up(&self) -> bool {
        match self.0 {}
    }
    /// Unreachable.
    pub fn take_queue(&mut self, _q: u16) -> Result<Queue, DpdkError> {
        match self.0 {}
    }
    /// Unreachable.
    pub fn queues(&self) -> u16 {
        match self.0 {}
    }
}

/// An Rx interrupt sleeper (none exist without DPDK).
pub struct RxSleeper(Never);

impl RxSleeper {
    /// Unreachable.
    pub fn sleep(&mut self, _timeout_ms: i32) -> (bool, bool) {
        match self.0 {}
    }
}

/// A pool (none can be made without DPDK).
pub struct MbufPool(Never);

impl MbufPool {
    /// Fails: DPDK is not in this build.
    pub fn new(_mbufs: u32) -> Result<MbufPool, DpdkError> {
        Err(DpdkError::Missing)
    }
    /// Unreachable.
    pub fn frame(&self, _bytes: &[u8]) -> Option<Mbuf> {
        match self.0 {}
    }
}

/// A queue pair (none exist without DPDK).
pub struct Queue(Never);

impl Queue {
    /// Unreachable.
    pub fn rx_burst(&mut self, _out: &mut Vec<Mbuf>, _max: usize) -> usize {
        match self.0 {}
    }
    /// Unreachable.
    pub fn tx_burst(&mut self, _pkts: &mut Vec<Mbuf>) -> usize {
        match self.0 {}
    }
    /// Unreachable.
    pub fn alloc(&self) -> Option<Mbuf> {
        match self.0 {}
    }
    /// Unreachable.
    pub fn has_rx_interrupts(&self) -> bool {
        match self.0 {}
    }
    /// Unreachable.
    pub fn rx_sleeper(&mut self, _wake_fd: RawFd) -> Result<Option<RxSleeper>, DpdkError> {
        match self.0 {}
    }
    /// Unreachable.
    pub fn rx_interrupt(&mut self, _on: bool) -> bool {
        match self.0 {}
    }
    /// Unreachable.
    pub fn link_up(&self) -> bool {
        match self.0 {}
    }
    /// Unreachable.
    pub fn restart_port(&mut self) -> Result<(), DpdkError> {
        match self.0 {}
    }
    /// Unreachable.
    pub fn stopped(&self) -> bool {
        match self.0 {}
    }
    /// Unreachable.
    pub fn rx_desc(&self) -> u16 {
        match self.0 {}
    }
    /// Unreachable.
    pub fn id(&self) -> u16 {
        match self.0 {}
    }
}
