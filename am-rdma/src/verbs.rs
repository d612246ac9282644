//! The verbs layer: every `unsafe` of `am-rdma` is in this module.
//!
//! Invariants the rest of the crate relies on (and that the code here keeps):
//! 1. Memory registered with the device outlives its registration and every queue pair
//!    that may touch it. Receive slabs and send rings are [`OwnedRegion`]s: a boxed buffer
//!    that never moves, dropped after its memory region (field order). The endpoint's
//!    segment is a [`ForeignRegion`]: `am_core::Endpoint` drops its transport (which holds
//!    every queue pair and the region) before the segment, and never resizes it.
//! 2. A receive buffer handed to the device is not read until its completion arrives and
//!    not handed out again before that ([`Qp::post_recv`] takes a slot index that the
//!    caller tracks as posted).
//! 3. A send slot is not rewritten before the send that used it completes (the caller's
//!    ring accounting); inline sends are copied by the provider at post time.
//! 4. Raw CQ and channel handles are used only while the [`Device`] that owns them lives.
//! 5. Work-request scatter lists are checked against their region before posting, so the
//!    device never reads outside registered memory.
//! 6. The file-descriptor helpers in [`fd`] pass only live buffers to system calls and own
//!    every descriptor they create.

use rdma_mummy_sys::{
    ibv_ack_cq_events, ibv_cq, ibv_get_cq_event, ibv_poll_cq, ibv_post_recv, ibv_post_send, ibv_qp,
    ibv_recv_wr, ibv_req_notify_cq, ibv_send_flags, ibv_send_wr, ibv_sge, ibv_wc, ibv_wr_opcode,
    rdma_t,
};
use sideway::ibverbs::address::{AddressHandleAttribute, Gid};
use sideway::ibverbs::completion::{
    BasicCompletionQueue, CompletionChannel, GenericCompletionQueue,
};
use sideway::ibverbs::device::{DeviceInfo, DeviceList};
use sideway::ibverbs::device_context::{DeviceContext, Mtu};
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{BasicQueuePair, QueuePair, QueuePairAttribute, QueuePairState};
use sideway::ibverbs::AccessFlags;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::os::fd::{AsRawFd, RawFd};
use std::ptr;
use std::sync::Arc;

/// Work-completion opcodes we act on (from `ibv_wc_opcode`).
pub mod opcode {
    /// A SEND we posted completed.
    pub const SEND: u32 = 0;
    /// An RDMA WRITE we posted completed.
    pub const RDMA_WRITE: u32 = 1;
    /// A SEND arrived in a posted receive.
    pub const RECV: u32 = 128;
    /// An RDMA WRITE with immediate consumed a posted receive.
    pub const RECV_RDMA_WITH_IMM: u32 = 129;
}

fn io_err(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

/// One work completion, copied out of the CQ.
#[derive(Clone, Copy, Debug)]
pub struct Wc {
    /// The caller's work-request id.
    pub wr_id: u64,
    /// 0 = success (`IBV_WC_SUCCESS`).
    pub status: u32,
    /// See [`opcode`]; undefined when `status != 0`.
    pub opcode: u32,
    /// Bytes received (receives only).
    pub byte_len: u32,
    /// Immediate data (receives with immediate only), host order.
    pub imm: u32,
}

/// An opened device with one protection domain, one completion channel and one CQ that
/// every queue pair of the transport shares.
pub struct Device {
    // Drop order: CQ before channel before PD before context (all Arc-counted anyway).
    cq: Arc<BasicCompletionQueue>,
    channel: Arc<CompletionChannel>,
    pd: Arc<ProtectionDomain>,
    _ctx: Arc<DeviceContext>,
    /// Device name (`rxe0`).
    pub name: String,
    /// Port number (1).
    pub port: u8,
    /// GID index whose GID is the transport's IP address.
    pub gid_index: u8,
    /// That GID.
    pub gid: Gid,
    /// Active path MTU.
    pub mtu: Mtu,
    /// The port's LID (0 on RoCE).
    pub lid: u16,
}

/// The GID of an IP address on RoCE: IPv4 mapped into IPv6.
pub fn gid_of(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Names of the verbs devices present (empty when there are none or no rdma-core).
pub fn device_names() -> Vec<String> {
    match DeviceList::new() {
        Ok(list) => list.iter().map(|d| d.name()).collect(),
        Err(_) => Vec::new(),
    }
}

impl Device {
    /// Opens device `name` (or the first one) and finds the GID of `ip` on port 1.
    pub fn open(name: Option<&str>, ip: IpAddr, cqe: u32) -> io::Result<Device> {
        let list = DeviceList::new().map_err(|e| {
            io_err(
                "no RDMA verbs devices (install rdma-core; for SoftRoCE run `rdma link add rxe0 type rxe netdev <if>`)",
                e,
            )
        })?;
        let dev = match name {
            Some(n) => list.iter().find(|d| d.name() == n),
            None => list.iter().next(),
        }
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "RDMA device {} not found (present: {:?})",
                    name.unwrap_or("(any)"),
                    list.iter().map(|d| d.name()).collect::<Vec<_>>()
                ),
            )
        })?;
        let dev_name = dev.name();
        let ctx = dev.open().map_err(|e| io_err("ibv_open_device", e))?;
        let port = 1u8;
        let pattr = ctx
            .query_port(port)
            .map_err(|e| io_err("ibv_query_port", e))?;
        let want = Gid::from(Ipv6Addr::from(gid_of(ip)));
        let mut found = None;
        for idx in 0..32u32 {
            match ctx.query_gid(port, idx) {
                Ok(g) if Ipv6Addr::from(g) == Ipv6Addr::from(want) => {
                    found = Some(idx as u8);
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let gid_index = found.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "device {dev_name} has no GID for {ip}: bind the transport to an address of the \
                     netdev the device sits on (SoftRoCE: the dummy0 address, e.g. 10.99.0.1)"
                ),
            )
        })?;
        let pd = ctx.alloc_pd().map_err(|e| io_err("ibv_alloc_pd", e))?;
        let channel = ctx
            .create_comp_channel()
            .map_err(|e| io_err("ibv_create_comp_channel", e))?;
        channel
            .set_nonblocking(true)
            .map_err(|e| io_err("completion channel O_NONBLOCK", e))?;
        let mut b = ctx.create_cq_builder();
        b.setup_cqe(cqe).setup_comp_channel(&channel, 0);
        let cq = b.build().map_err(|e| io_err("ibv_create_cq", e))?;
        Ok(Device {
            cq,
            channel,
            pd,
            name: dev_name,
            port,
            gid_index,
            gid: want,
            mtu: pattr.active_mtu(),
            lid: pattr.lid(),
            _ctx: ctx,
        })
    }

    /// The completion channel's fd (readable when an armed CQ got a completion).
    pub fn channel_fd(&self) -> RawFd {
        self.channel.as_raw_fd()
    }

    /// Copies up to `max` completions into `out`; returns how many. No allocation: a
    /// fixed array of work completions is filled by the provider.
    pub fn poll(&self, out: &mut Vec<Wc>, max: usize) -> io::Result<usize> {
        const BATCH: usize = 32;
        // Not initialised: this runs on every turn of a busy loop, and the provider writes
        // the entries it returns.
        let mut wcs = [std::mem::MaybeUninit::<ibv_wc>::uninit(); BATCH];
        let want = max.clamp(1, BATCH) as i32;
        // SAFETY: the CQ is valid while `self.cq` lives (invariant 4); `wcs` has room for
        // `want` entries (MaybeUninit<T> has T's layout).
        let n = unsafe {
            use sideway::ibverbs::completion::CompletionQueue;
            ibv_poll_cq(self.cq.cq().as_ptr(), want, wcs.as_mut_ptr().cast())
        };
        if n < 0 {
            return Err(io_err("ibv_poll_cq", io::Error::from_raw_os_error(-n)));
        }
        for slot in &wcs[..(n as usize).min(BATCH)] {
            // SAFETY: ibv_poll_cq wrote the first `n` entries.
            let wc = unsafe { slot.assume_init_ref() };
            out.push(Wc {
                wr_id: wc.wr_id,
                status: wc.status,
                opcode: wc.opcode,
                byte_len: wc.byte_len,
                // SAFETY: reading a u32 union field is valid for any bits.
                imm: unsafe { wc.imm_data_invalidated_rkey_union.imm_data },
            });
        }
        Ok(n as usize)
    }

    /// Arms the CQ: the next solicited completion (a receive of a SEND or WRITE with
    /// immediate posted with the solicited flag, as all of ours are) makes the channel fd
    /// readable. Send completions do not wake a sleeping loop: it reaps them when it wakes.
    pub fn arm(&self) -> io::Result<()> {
        // SAFETY: the CQ handle is valid while `self.cq` lives (invariant 4).
        let rc = unsafe {
            use sideway::ibverbs::completion::CompletionQueue;
            ibv_req_notify_cq(self.cq.cq().as_ptr(), 1)
        };
        if rc != 0 {
            return Err(io_err(
                "ibv_req_notify_cq",
                io::Error::from_raw_os_error(rc),
            ));
        }
        Ok(())
    }

    /// Consumes and acknowledges the channel's pending events (non-blocking fd).
    pub fn drain_events(&self) {
        let mut n = 0u32;
        loop {
            let mut cq: *mut ibv_cq = ptr::null_mut();
            let mut ctx: *mut std::ffi::c_void = ptr::null_mut();
            // SAFETY: valid channel (invariant 4); out-pointers are valid locals. The fd is
            // non-blocking, so this returns -1 (EAGAIN) when no event is pending.
            let rc = unsafe {
                ibv_get_cq_event(self.channel.comp_channel().as_ptr(), &mut cq, &mut ctx)
            };
            if rc != 0 {
                break;
            }
            n += 1;
        }
        if n > 0 {
            // SAFETY: acknowledges events we consumed from this CQ.
            unsafe {
                use sideway::ibverbs::completion::CompletionQueue;
                ibv_ack_cq_events(self.cq.cq().as_ptr(), n);
            }
        }
    }

    /// Registers the endpoint's segment for local access and remote write.
    pub fn register_segment(&self, seg: am_core::SegmentMemory) -> io::Result<ForeignRegion> {
        // SAFETY: a SegmentMemory carries its maker's promise that the memory is valid,
        // does not move and outlives the transport (invariant 1): the transport owns
        // every queue pair and this region.
        let mr = unsafe {
            self.pd.reg_mr(
                seg.ptr() as usize,
                seg.len().max(1),
                AccessFlags::LocalWrite | AccessFlags::RemoteWrite,
            )
        }
        .map_err(|e| {
            io_err(
                "ibv_reg_mr (raise `ulimit -l`: registered memory is locked)",
                e,
            )
        })?;
        Ok(ForeignRegion {
            mr,
            ptr: seg.ptr() as u64,
            len: seg.len(),
        })
    }

    /// Allocates and registers `len` bytes of our own (local access only).
    pub fn register_owned(&self, len: usize) -> io::Result<OwnedRegion> {
        let mut buf = vec![0u8; len.max(1)].into_boxed_slice();
        // SAFETY: `buf` is a boxed slice that never moves and is dropped after `mr`
        // (field order of OwnedRegion).
        let mr = unsafe {
            self.pd.reg_mr(
                buf.as_mut_ptr() as usize,
                buf.len(),
                AccessFlags::LocalWrite,
            )
        }
        .map_err(|e| {
            io_err(
                "ibv_reg_mr (raise `ulimit -l`: registered memory is locked)",
                e,
            )
        })?;
        Ok(OwnedRegion { mr, buf })
    }

    /// A new RC queue pair on the shared CQ, in state INIT.
    pub fn create_qp(&self, send_depth: u32, recv_depth: u32, max_inline: u32) -> io::Result<Qp> {
        let cq = GenericCompletionQueue::from(self.cq.clone());
        let mut b = self.pd.create_qp_builder();
        b.setup_max_send_wr(send_depth)
            .setup_max_recv_wr(recv_depth)
            .setup_max_send_sge(MAX_SGE as u32)
            .setup_max_recv_sge(1)
            .setup_max_inline_data(max_inline)
            .setup_send_cq(cq.clone())
            .setup_recv_cq(cq);
        let mut qp = b.build().map_err(|e| io_err("ibv_create_qp", e))?;
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::Init)
            .setup_pkey_index(0)
            .setup_port(self.port)
            .setup_access_flags(AccessFlags::LocalWrite | AccessFlags::RemoteWrite);
        qp.modify(&attr)
            .map_err(|e| io_err("modify QP to INIT", e))?;
        Ok(Qp { qp })
    }
}

/// Every send is signalled (its completion frees its ring slot) and solicited (its arrival
/// wakes the peer's loop).
const WAKE: u32 = ibv_send_flags::IBV_SEND_SIGNALED.0 | ibv_send_flags::IBV_SEND_SOLICITED.0;

/// The most scatter entries one RDMA WRITE takes (bulk source ranges).
pub const MAX_SGE: usize = 16;

/// Memory we own, registered for local access (receive slabs, send rings).
pub struct OwnedRegion {
    mr: Arc<MemoryRegion>,
    buf: Box<[u8]>,
}

impl OwnedRegion {
    /// The bytes (read a receive slot only after its completion: invariant 2).
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }
    /// The bytes, for filling a send slot whose previous send completed (invariant 3).
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
    fn sge(&self, off: usize, len: usize) -> Option<ibv_sge> {
        (off.checked_add(len)? <= self.buf.len()).then(|| ibv_sge {
            addr: self.buf.as_ptr() as u64 + off as u64,
            length: len as u32,
            lkey: self.mr.lkey(),
        })
    }
}

/// The endpoint's segment, registered for remote write.
pub struct ForeignRegion {
    mr: Arc<MemoryRegion>,
    ptr: u64,
    len: usize,
}

// SAFETY: the region is only a registration handle plus an address; the memory itself is
// owned by the endpoint, which is Send and uses it from one thread at a time.
unsafe impl Send for ForeignRegion {}

impl ForeignRegion {
    /// Remote key, base address and length to give a peer whose tag checked out.
    pub fn grant(&self) -> (u32, u64, u64) {
        (self.mr.rkey(), self.ptr, self.len as u64)
    }
    fn sge(&self, off: usize, len: usize) -> Option<ibv_sge> {
        (off.checked_add(len)? <= self.len).then(|| ibv_sge {
            addr: self.ptr + off as u64,
            length: len as u32,
            lkey: self.mr.lkey(),
        })
    }
}

/// What a peer told us about its queue pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteQp {
    /// Queue pair number.
    pub qpn: u32,
    /// Its first packet sequence number.
    pub psn: u32,
    /// Its GID.
    pub gid: [u8; 16],
    /// Its LID (0 on RoCE).
    pub lid: u16,
}

/// An RC queue pair.
pub struct Qp {
    qp: BasicQueuePair,
}

/// Local ACK timeout exponent: 4.096 us x 2^16 = 268 ms per try. With [`RETRY_CNT`] 7 a
/// peer that stops acknowledging surfaces as a retry-exceeded completion after 8 tries,
/// about 2.1 s, in step with the engine's 2 s unreachable timeout (which, with the WRITE
/// completions reported as progress, catches the same peer from above). The timeout only
/// paces recovery from a lost tail packet (a gap is NAKed and resent at once) and must
/// exceed the worst queueing delay of the fabric: a spurious timeout resends everything
/// unacknowledged, up to a window of packets, so on a loaded switch or an emulated device
/// (rxe under TCG, where a 64 MiB bulk takes seconds) a short timeout turns load into
/// retransmission storms. Before: 14 (67 ms) and 6 retries (0.5 s), which left no room for
/// a loaded fabric; rdma_cm's and NCCL's defaults are longer still (~1 s and ~4 s per try).
pub const QP_TIMEOUT: u8 = 16;
/// Transport retries (the most the field holds; 7 is not "for ever" here, only for RNR).
pub const RETRY_CNT: u8 = 7;
/// Receiver-not-ready retries: below 7 (7 retries for ever).
pub const RNR_RETRY: u8 = 6;
/// Minimum RNR NAK timer code (14 = 1.28 ms).
pub const MIN_RNR_TIMER: u8 = 14;

impl Qp {
    /// Our queue pair number.
    pub fn qpn(&self) -> u32 {
        self.qp.qp_number()
    }

    /// INIT -> RTR -> RTS towards `remote`; `psn` is our first send PSN.
    pub fn connect(&mut self, dev: &Device, remote: &RemoteQp, psn: u32) -> io::Result<()> {
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToReceive)
            .setup_path_mtu(dev.mtu)
            .setup_dest_qp_num(remote.qpn)
            .setup_rq_psn(remote.psn)
            .setup_max_dest_read_atomic(0)
            .setup_min_rnr_timer(MIN_RNR_TIMER);
        let mut ah = AddressHandleAttribute::new();
        ah.setup_dest_lid(remote.lid)
            .setup_port(dev.port)
            .setup_service_level(0)
            .setup_grh_src_gid_index(dev.gid_index)
            .setup_grh_dest_gid(&Gid::from(Ipv6Addr::from(remote.gid)))
            .setup_grh_hop_limit(64);
        attr.setup_address_vector(&ah);
        self.qp
            .modify(&attr)
            .map_err(|e| io_err("modify QP to RTR", e))?;
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToSend)
            .setup_sq_psn(psn)
            .setup_timeout(QP_TIMEOUT)
            .setup_retry_cnt(RETRY_CNT)
            .setup_rnr_retry(RNR_RETRY)
            .setup_max_read_atomic(0);
        self.qp
            .modify(&attr)
            .map_err(|e| io_err("modify QP to RTS", e))?;
        Ok(())
    }

    fn raw(&self) -> *mut ibv_qp {
        // SAFETY: the handle is valid while `self.qp` lives (invariant 4).
        unsafe { self.qp.qp().as_ptr() }
    }

    /// Posts one send work request (no allocation: the request and its scatter list live on
    /// the stack for the call; the provider copies them, and inline data, at post time).
    fn post_one(&mut self, wr: &mut ibv_send_wr) -> io::Result<()> {
        let mut bad: *mut ibv_send_wr = ptr::null_mut();
        // SAFETY: `wr` and its scatter list are valid for the call; every sge points into
        // registered memory or, with IBV_SEND_INLINE, into memory the provider copies now
        // (invariants 1, 3, 5).
        let rc = unsafe { ibv_post_send(self.raw(), wr, &mut bad) };
        if rc != 0 {
            return Err(io_err("ibv_post_send", io::Error::from_raw_os_error(rc)));
        }
        Ok(())
    }

    /// Posts a receive of slot `slot` (`slot_len` bytes at `slot * slot_len`) of `slab`.
    /// The caller marks the slot posted until its completion (invariant 2).
    pub fn post_recv(
        &mut self,
        wr_id: u64,
        slab: &OwnedRegion,
        slot: usize,
        slot_len: usize,
    ) -> io::Result<()> {
        let mut sge = slab
            .sge(slot * slot_len, slot_len)
            .ok_or_else(|| io::Error::other("receive slot outside its slab"))?;
        let mut wr = ibv_recv_wr {
            wr_id,
            next: ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
        };
        let mut bad: *mut ibv_recv_wr = ptr::null_mut();
        // SAFETY: the sge lies inside the registered slab (checked above); invariant 2.
        let rc = unsafe { ibv_post_recv(self.raw(), &mut wr, &mut bad) };
        if rc != 0 {
            return Err(io_err("ibv_post_recv", io::Error::from_raw_os_error(rc)));
        }
        Ok(())
    }

    /// Posts a signalled SEND of `parts`, copied inline by the provider.
    pub fn post_send_inline(&mut self, wr_id: u64, parts: &[&[u8]; 2]) -> io::Result<()> {
        let mut sges = [
            ibv_sge {
                addr: parts[0].as_ptr() as u64,
                length: parts[0].len() as u32,
                lkey: 0,
            },
            ibv_sge {
                addr: parts[1].as_ptr() as u64,
                length: parts[1].len() as u32,
                lkey: 0,
            },
        ];
        let mut wr = send_wr(wr_id, WAKE | ibv_send_flags::IBV_SEND_INLINE.0);
        wr.opcode = ibv_wr_opcode::IBV_WR_SEND;
        wr.sg_list = sges.as_mut_ptr();
        wr.num_sge = 2;
        self.post_one(&mut wr)
    }

    /// Posts a signalled SEND of `len` bytes at `off` of `ring` (invariant 3 is the
    /// caller's).
    pub fn post_send(
        &mut self,
        wr_id: u64,
        ring: &OwnedRegion,
        off: usize,
        len: usize,
    ) -> io::Result<()> {
        let mut sge = ring
            .sge(off, len)
            .ok_or_else(|| io::Error::other("send slot outside its ring"))?;
        let mut wr = send_wr(wr_id, WAKE);
        wr.opcode = ibv_wr_opcode::IBV_WR_SEND;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        self.post_one(&mut wr)
    }

    /// Posts a signalled RDMA WRITE of `src` ranges of `seg` to `raddr` under `rkey`; with
    /// `imm`, a WRITE with immediate (it consumes a receive at the peer and completes
    /// there).
    pub fn post_write(
        &mut self,
        wr_id: u64,
        seg: &ForeignRegion,
        src: &[(usize, usize)],
        rkey: u32,
        raddr: u64,
        imm: Option<u32>,
    ) -> io::Result<()> {
        let mut sges = [ibv_sge {
            addr: 0,
            length: 0,
            lkey: 0,
        }; MAX_SGE];
        let mut n = 0;
        for &(off, len) in src.iter().filter(|r| r.1 > 0) {
            if n == MAX_SGE {
                return Err(io::Error::other(format!(
                    "bulk source has more than {MAX_SGE} ranges; RDMA WRITE takes at most {MAX_SGE}"
                )));
            }
            sges[n] = seg
                .sge(off, len)
                .ok_or_else(|| io::Error::other("bulk source outside the segment"))?;
            n += 1;
        }
        // A plain WRITE completes only here: signalled, without the solicited bit (that
        // wakes the peer, and only a WRITE with immediate gives it a completion).
        let flags = match imm {
            Some(_) => WAKE,
            None => ibv_send_flags::IBV_SEND_SIGNALED.0,
        };
        let mut wr = send_wr(wr_id, flags);
        wr.opcode = match imm {
            Some(imm) => {
                wr.imm_data_invalidated_rkey_union.imm_data = imm;
                ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM
            }
            None => ibv_wr_opcode::IBV_WR_RDMA_WRITE,
        };
        wr.sg_list = sges.as_mut_ptr();
        wr.num_sge = n as i32;
        wr.wr.rdma = rdma_t {
            remote_addr: raddr,
            rkey,
        };
        self.post_one(&mut wr)
    }
}

/// A zeroed send work request with `wr_id` and `flags`.
fn send_wr(wr_id: u64, flags: u32) -> ibv_send_wr {
    // SAFETY: ibv_send_wr is a plain C struct (integers, raw pointers, unions of those):
    // all-zero is a valid value.
    let mut wr: ibv_send_wr = unsafe { std::mem::MaybeUninit::zeroed().assume_init() };
    wr.wr_id = wr_id;
    wr.send_flags = flags;
    wr
}
