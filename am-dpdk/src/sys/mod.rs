//! The binding to DPDK 22.11: the only module of the crate with `unsafe`.
//!
//! `build.rs` generates `ffi` with bindgen from an allowlist of DPDK's API (EAL start,
//! mbuf pools, ethdev set-up, the ring PMD's `rte_eth_from_rings`, virtual devices, Rx
//! interrupts) and compiles `shim.c`, out-of-line copies of the `static inline` fast-path
//! functions (`rte_eth_rx_burst`, `rte_eth_tx_burst`, `rte_pktmbuf_alloc`, ring bursts,
//! mbuf field access). Above it this module offers a small safe API:
//!
//! * [`eal_init`] starts EAL once per process (`--no-huge --no-pci --no-shconf`, see
//!   [`EalOptions`]); later calls return the first call's outcome.
//! * [`Port`] configures and starts one ethdev (a virtual device made with `rte_vdev_init`,
//!   or a ring pair made here) with one Rx/Tx queue pair and one mbuf pool per queue.
//! * [`Queue`] is one queue pair: `rx_burst`, `tx_burst`, `alloc`. It is `Send` but not
//!   `Sync`: one thread (one shard loop) owns it, so the fast path takes no lock.
//! * [`Mbuf`] owns one packet buffer and frees it when dropped.
//!
//! Invariants the `unsafe` blocks rely on:
//! * every DPDK call but `rte_eal_init` happens after EAL started (a [`Port`] exists only
//!   after [`eal_init`] succeeded, and [`Queue`]s and [`Mbuf`]s only through a port);
//! * ports are never stopped or closed and pools never freed while the process lives: an
//!   mbuf of one port's pool may sit in another port's ring (the test switch moves them),
//!   and a queue may outlive the `Port` value it came from;
//! * a queue id is handed out once per port ([`Port::take_queue`]), so no two threads poll
//!   or transmit on one queue;
//! * an [`Mbuf`] is a non-null pointer DPDK gave us and owns it: dropping frees it once,
//!   handing it to `tx_burst` or a ring gives it away (it is forgotten, not freed).

#![allow(unsafe_code)]

#[allow(
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    dead_code,
    missing_docs,
    unreachable_pub,
    unnecessary_transmutes,
    clippy::all
)]
mod ffi {
    include!(concat!(env!("OUT_DIR"), "/dpdk.rs"));
}

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

include!("common.rs");

/// `RTE_ETH_TX_OFFLOAD_IPV4_CKSUM` (`RTE_BIT64(1)` in rte_ethdev.h).
const TX_OFFLOAD_IPV4_CKSUM: u64 = 1 << 1;
/// `RTE_ETH_RX_OFFLOAD_IPV4_CKSUM` (`RTE_BIT64(1)`).
const RX_OFFLOAD_IPV4_CKSUM: u64 = 1 << 1;
/// `RTE_MBUF_DEFAULT_BUF_SIZE`: 2048 bytes of data room and 128 of headroom.
const MBUF_BUF_SIZE: u16 = 2048 + 128;

fn strerror(code: i32) -> String {
    // SAFETY: rte_strerror returns a pointer to a static or thread-local NUL-terminated
    // string for any code.
    unsafe {
        let p = ffi::rte_strerror(code);
        if p.is_null() {
            return format!("error {code}");
        }
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

/// The error of a call that returned a negative errno (`ret < 0`) or set `rte_errno`.
fn call_err(what: impl Into<String>, ret: i32) -> DpdkError {
    let code = if ret < 0 {
        -ret
    } else {
        // SAFETY: reads the calling thread's rte_errno.
        unsafe { ffi::am_shim_errno() }
    };
    DpdkError::Call {
        what: what.into(),
        code,
        msg: strerror(code),
    }
}

static EAL: Mutex<Option<Result<(), String>>> = Mutex::new(None);

/// Starts EAL for this process, once: `--no-huge --no-pci --no-shconf --no-telemetry`,
/// `-m` from the options, and the main lcore allowed on every CPU (`--lcores 0@(0-N)`:
/// EAL pins its calling thread, and a test process must not pin itself to one core).
/// Devices are not given here but made later by [`Port::open`]. A second call returns
/// the first one's outcome; its options are ignored.
pub fn eal_init(opts: &EalOptions) -> Result<(), DpdkError> {
    let mut g = EAL.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(r) = g.as_ref() {
        return r.clone().map_err(DpdkError::Invalid);
    }
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1);
    let mut args: Vec<String> = vec![
        "am-dpdk".into(),
        "--no-huge".into(),
        "--no-pci".into(),
        "--no-shconf".into(),
        "--no-telemetry".into(),
        "-m".into(),
        opts.mem_mb.to_string(),
        "--lcores".into(),
        format!("0@(0-{})", cpus - 1),
        "--log-level".into(),
        "*:warning".into(),
    ];
    args.extend(opts.extra.iter().cloned());
    let c: Vec<CString> = match args.iter().map(|a| CString::new(a.as_str())).collect() {
        Ok(c) => c,
        Err(_) => {
            return Err(DpdkError::Invalid(
                "an EAL argument holds a NUL byte".into(),
            ))
        }
    };
    // EAL keeps pointers into argv: leak it (once per process).
    let c: &'static [CString] = Box::leak(c.into_boxed_slice());
    let argv: &'static mut [*mut libc::c_char] = Box::leak(
        c.iter()
            .map(|s| s.as_ptr() as *mut libc::c_char)
            .collect::<Vec<_>>()
            .into_boxed_slice(),
    );
    // SAFETY: argv holds argc valid NUL-terminated strings that live forever; EAL is not
    // started yet (guarded by the mutex).
    let ret = unsafe { ffi::rte_eal_init(argv.len() as i32, argv.as_mut_ptr()) };
    let r = if ret < 0 {
        Err(format!(
            "rte_eal_init({}): {}",
            args[1..].join(" "),
            call_err("EAL", ret)
        ))
    } else {
        Ok(())
    };
    *g = Some(r.clone());
    r.map_err(DpdkError::Invalid)
}

/// A clock on the CPU's time-stamp counter at the rate EAL calibrated: nanoseconds since
/// it was made, without a system call or vDSO call per reading (the engine reads the
/// time on every poll).
#[derive(Clone, Copy, Debug)]
pub struct TscClock {
    t0: u64,
    /// Nanoseconds per cycle, as a 32.32 fixed-point number.
    mult: u128,
}

impl TscClock {
    /// A clock starting now; `None` where EAL has no TSC rate or the CPU is not x86_64.
    pub fn new() -> Option<TscClock> {
        // SAFETY: EAL started (a port exists before any transport makes a clock).
        let hz = unsafe { ffi::rte_get_tsc_hz() };
        if hz == 0 || !cfg!(target_arch = "x86_64") {
            return None;
        }
        Some(TscClock {
            t0: am_os::tsc::rdtsc(),
            mult: (1_000_000_000u128 << 32) / hz as u128,
        })
    }
    /// Nanoseconds since the clock was made.
    pub fn ns(&self) -> u64 {
        ((am_os::tsc::rdtsc().wrapping_sub(self.t0) as u128 * self.mult) >> 32) as u64
    }
}

/// One packet buffer, owned; freed when dropped.
#[repr(transparent)]
pub struct Mbuf(NonNull<ffi::rte_mbuf>);

// SAFETY: an mbuf is plain memory owned by whoever holds the pointer; mempools are
// multi-producer/multi-consumer, so it may be freed from any thread.
unsafe impl Send for Mbuf {}

impl Mbuf {
    /// The bytes of the first segment.
    pub fn data(&self) -> &[u8] {
        // SAFETY: the mbuf is valid and owned (invariant); data_len bytes from its data
        // pointer are initialised packet data that nothing else writes while we own it.
        unsafe {
            let p = ffi::am_shim_data(self.0.as_ptr());
            let n = ffi::am_shim_data_len(self.0.as_ptr()) as usize;
            std::slice::from_raw_parts(p, n)
        }
    }
    /// The bytes of the first segment, to edit in place.
    pub fn data_mut(&mut self) -> &mut [u8] {
        // SAFETY: as `data`, and `&mut self` makes this the only view of the bytes.
        unsafe {
            let p = ffi::am_shim_data(self.0.as_ptr());
            let n = ffi::am_shim_data_len(self.0.as_ptr()) as usize;
            std::slice::from_raw_parts_mut(p, n)
        }
    }
    /// The packet's total length over all segments.
    pub fn pkt_len(&self) -> usize {
        // SAFETY: valid, owned mbuf.
        unsafe { ffi::am_shim_pkt_len(self.0.as_ptr()) as usize }
    }
    /// Segments in the packet.
    pub fn segments(&self) -> usize {
        // SAFETY: valid, owned mbuf.
        unsafe { ffi::am_shim_nb_segs(self.0.as_ptr()) as usize }
    }
    /// Appends `len` bytes to the packet and returns them to fill; `None` when the buffer
    /// has no room.
    pub fn append(&mut self, len: usize) -> Option<&mut [u8]> {
        let len = u16::try_from(len).ok()?;
        // SAFETY: valid, owned mbuf; rte_pktmbuf_append returns null or a pointer to `len`
        // writable bytes inside its data room.
        unsafe {
            let p = ffi::am_shim_append(self.0.as_ptr(), len);
            if p.is_null() {
                None
            } else {
                Some(std::slice::from_raw_parts_mut(p, len as usize))
            }
        }
    }
    /// Asks the port to fill in the IPv4 header checksum (only where the port offers it).
    pub fn offload_ipv4_checksum(&mut self, l2_len: u16, l3_len: u16) {
        // SAFETY: valid, owned mbuf; sets its offload fields.
        unsafe { ffi::am_shim_tx_ipv4_cksum(self.0.as_ptr(), l2_len, l3_len) }
    }
    /// What the port found of the IPv4 header checksum: `None` not checked, `Some(ok)`.
    pub fn ipv4_checksum_checked(&self) -> Option<bool> {
        // SAFETY: valid, owned mbuf.
        match unsafe { ffi::am_shim_rx_ip_cksum(self.0.as_ptr()) } {
            1 => Some(true),
            2 => Some(false),
            _ => None,
        }
    }
}

impl Drop for Mbuf {
    fn drop(&mut self) {
        // SAFETY: we own this mbuf (invariant) and free it exactly once.
        unsafe { ffi::am_shim_free(self.0.as_ptr()) }
    }
}

/// Takes `n` pointers DPDK wrote into `v`'s spare capacity as owned mbufs.
///
/// # Safety
/// The first `n` slots of `v`'s spare capacity hold valid mbuf pointers given to us.
unsafe fn adopt(v: &mut Vec<Mbuf>, n: usize) {
    v.set_len(v.len() + n);
}

/// A mempool of packet buffers. Never freed (see the module's invariants).
#[derive(Clone, Copy)]
struct Pool(NonNull<ffi::rte_mempool>);

// SAFETY: DPDK mempools are thread-safe (multi-producer/multi-consumer rings).
unsafe impl Send for Pool {}

static NAMES: AtomicU32 = AtomicU32::new(0);

fn unique(prefix: &str) -> CString {
    let n = NAMES.fetch_add(1, Ordering::Relaxed);
    // The name has no NUL: digits and a fixed ASCII prefix.
    CString::new(format!("{prefix}{n}")).unwrap_or_default()
}

impl Pool {
    fn new(mbufs: u32) -> Result<Pool, DpdkError> {
        let name = unique("amp");
        // SAFETY: EAL started (a Port is being built); the name is a valid C string.
        let p = unsafe {
            ffi::rte_pktmbuf_pool_create(
                name.as_ptr(),
                mbufs,
                0,
                0,
                MBUF_BUF_SIZE,
                ffi::rte_socket_id() as i32,
            )
        };
        NonNull::new(p).map(Pool).ok_or_else(|| {
            call_err(
                format!("rte_pktmbuf_pool_create({mbufs} mbufs; raise AM_DPDK_MEM_MB?)"),
                0,
            )
        })
    }
}

/// A DPDK ring of mbufs (the two ends of a [`Port::from_rings`] port).
pub struct Ring(NonNull<ffi::rte_ring>);

// SAFETY: rings are created multi-producer/multi-consumer (flags 0), safe from any thread.
unsafe impl Send for Ring {}
// SAFETY: as above: every operation is a lock-free multi-producer/consumer one.
unsafe impl Sync for Ring {}

impl Ring {
    fn new(size: u32) -> Result<Ring, DpdkError> {
        let name = unique("amr");
        // SAFETY: EAL started; valid name; flags 0 = MP/MC.
        let r =
            unsafe { ffi::rte_ring_create(name.as_ptr(), size, ffi::rte_socket_id() as i32, 0) };
        NonNull::new(r)
            .map(Ring)
            .ok_or_else(|| call_err("rte_ring_create", 0))
    }
    /// Moves mbufs from the front of `pkts` into the ring; returns how many went (the
    /// rest stay in `pkts`).
    pub fn enqueue(&self, pkts: &mut Vec<Mbuf>) -> usize {
        // SAFETY: Mbuf is a transparent non-null mbuf pointer, so the Vec's buffer is an
        // array of `len` mbuf pointers; the ring takes ownership of the first n, which we
        // then forget.
        let n = unsafe {
            ffi::am_shim_ring_enqueue_burst(
                self.0.as_ptr(),
                pkts.as_mut_ptr() as *mut *mut ffi::rte_mbuf,
                pkts.len() as u32,
            )
        } as usize;
        pkts.drain(..n).for_each(std::mem::forget);
        n
    }
    /// Takes up to `max` mbufs from the ring into `out`.
    pub fn dequeue(&self, out: &mut Vec<Mbuf>, max: usize) -> usize {
        out.reserve(max);
        // SAFETY: the spare capacity holds `max` pointer slots; the ring writes n valid
        // mbuf pointers it hands over to us.
        unsafe {
            let n = ffi::am_shim_ring_dequeue_burst(
                self.0.as_ptr(),
                out.as_mut_ptr().add(out.len()) as *mut *mut ffi::rte_mbuf,
                max as u32,
            ) as usize;
            adopt(out, n);
            n
        }
    }
}

/// A started ethdev. Queues are taken from it one by one.
pub struct Port {
    id: u16,
    info: PortInfo,
    pools: Vec<Pool>,
    intr_fds: Vec<Option<RawFd>>,
    taken: Vec<Arc<AtomicBool>>,
    rx_desc: u16,
}

impl Port {
    /// Opens the device `spec` (`NAME[,ARGS]`, for example
    /// `net_memif0,role=server,socket=/tmp/am.sock` or `net_af_packet0,iface=veth0`):
    /// made with `rte_vdev_init` unless a port of that name exists. Starts EAL with the
    /// default options first if nobody did.
    pub fn open(spec: &str, ps: &PortSpec) -> Result<Port, DpdkError> {
        eal_init(&EalOptions::default())?;
        let (name, args) = spec.split_once(',').unwrap_or((spec, ""));
        let cname = CString::new(name)
            .map_err(|_| DpdkError::Invalid(format!("device name {name:?} holds a NUL")))?;
        let cargs = CString::new(args)
            .map_err(|_| DpdkError::Invalid(format!("device args {args:?} hold a NUL")))?;
        let mut id = 0u16;
        // SAFETY: EAL started; valid C strings and out-pointer.
        let found = unsafe { ffi::rte_eth_dev_get_port_by_name(cname.as_ptr(), &mut id) } == 0;
        if !found {
            // SAFETY: EAL started; valid C strings.
            let r = unsafe { ffi::rte_vdev_init(cname.as_ptr(), cargs.as_ptr()) };
            if r < 0 {
                return Err(call_err(
                    format!("rte_vdev_init({spec}) (is the device name a DPDK virtual device, net_ring/net_memif/net_af_packet..., and are its arguments right?)"),
                    r,
                ));
            }
            // SAFETY: as above.
            let r = unsafe { ffi::rte_eth_dev_get_port_by_name(cname.as_ptr(), &mut id) };
            if r != 0 {
                return Err(call_err(
                    format!("no port named {name} after creating it"),
                    r,
                ));
            }
        }
        let mut port = Self::start(id, ps)?;
        port.info.restart_on_link_down =
            port.info.driver == "net_memif" && args.contains("role=client") && ps.queues == 1;
        Ok(port)
    }

    /// A port over two new rings (the ring PMD's `rte_eth_from_rings`): what it transmits
    /// lands in the returned Tx ring, what is put in the returned Rx ring it receives. One
    /// queue pair.
    pub fn from_rings(ps: &PortSpec) -> Result<(Port, Ring, Ring), DpdkError> {
        eal_init(&EalOptions::default())?;
        let size = (ps.rx_desc.max(ps.tx_desc) as u32)
            .next_power_of_two()
            .max(64)
            * 2;
        let rx = Ring::new(size)?;
        let tx = Ring::new(size)?;
        let name = unique("net_ring_am");
        let mut rxp = [rx.0.as_ptr()];
        let mut txp = [tx.0.as_ptr()];
        // SAFETY: EAL started; arrays of one valid ring each; the rings are never freed.
        let r = unsafe {
            ffi::rte_eth_from_rings(
                name.as_ptr(),
                rxp.as_mut_ptr(),
                1,
                txp.as_mut_ptr(),
                1,
                ffi::rte_socket_id(),
            )
        };
        if r < 0 {
            return Err(call_err("rte_eth_from_rings", r));
        }
        let port = Self::start(
            r as u16,
            &PortSpec {
                queues: 1,
                ..ps.clone()
            },
        )?;
        Ok((port, rx, tx))
    }

    fn start(id: u16, ps: &PortSpec) -> Result<Port, DpdkError> {
        if ps.queues == 0 {
            return Err(DpdkError::Invalid("a port needs at least one queue".into()));
        }
        let (info, driver) = Self::device_info(id)?;
        if ps.queues > info.max_rx_queues.min(info.max_tx_queues) {
            return Err(DpdkError::Invalid(format!(
                "port {id} ({driver}) has at most {} queue pairs, {} asked",
                info.max_rx_queues.min(info.max_tx_queues),
                ps.queues
            )));
        }
        let tx_ipv4_checksum = info.tx_offload_capa & TX_OFFLOAD_IPV4_CKSUM != 0;
        let rx_ipv4_checksum = info.rx_offload_capa & RX_OFFLOAD_IPV4_CKSUM != 0;
        let rx_interrupts = Self::configure(id, ps, &info, &driver)?;
        let pools = Self::setup_queues(id, ps)?;
        // SAFETY: configured port with its queues set up.
        let r = unsafe { ffi::rte_eth_dev_start(id) };
        if r != 0 {
            return Err(call_err(
                format!("rte_eth_dev_start(port {id}, {driver})"),
                r,
            ));
        }
        // Promiscuous so frames to our own (configured) MAC arrive on every PMD; we filter
        // by MAC ourselves. Not every PMD has it: ignore a refusal.
        // SAFETY: started port.
        let _ = unsafe { ffi::rte_eth_promiscuous_enable(id) };
        let mut mac = ffi::rte_ether_addr::default();
        // SAFETY: valid port, valid out-struct.
        let _ = unsafe { ffi::rte_eth_macaddr_get(id, &mut mac) };
        let intr_fds = Self::rx_interrupt_fds(id, ps.queues, rx_interrupts);
        let rx_interrupts = intr_fds.iter().all(|f| f.is_some());
        Ok(Port {
            id,
            info: PortInfo {
                name: Self::name_of(id),
                driver,
                mac: mac.addr_bytes,
                tx_ipv4_checksum,
                rx_ipv4_checksum,
                rx_interrupts,
                restart_on_link_down: false,
            },
            pools,
            intr_fds,
            taken: (0..ps.queues)
                .map(|_| Arc::new(AtomicBool::new(false)))
                .collect(),
            rx_desc: ps.rx_desc,
        })
    }

    /// The device's capabilities and its driver's name.
    fn device_info(id: u16) -> Result<(ffi::rte_eth_dev_info, String), DpdkError> {
        let mut info = ffi::rte_eth_dev_info::default();
        // SAFETY: valid port id (just found or made), valid out-struct.
        let r = unsafe { ffi::rte_eth_dev_info_get(id, &mut info) };
        if r != 0 {
            return Err(call_err("rte_eth_dev_info_get", r));
        }
        let driver = if info.driver_name.is_null() {
            String::new()
        } else {
            // SAFETY: the driver name is a static NUL-terminated string of the PMD.
            unsafe { CStr::from_ptr(info.driver_name) }
                .to_string_lossy()
                .into_owned()
        };
        Ok((info, driver))
    }

    /// Configures the port's queue pairs and offloads; returns whether it took Rx
    /// interrupts.
    fn configure(
        id: u16,
        ps: &PortSpec,
        info: &ffi::rte_eth_dev_info,
        driver: &str,
    ) -> Result<bool, DpdkError> {
        let mut conf = ffi::rte_eth_conf::default();
        if info.tx_offload_capa & TX_OFFLOAD_IPV4_CKSUM != 0 {
            conf.txmode.offloads |= TX_OFFLOAD_IPV4_CKSUM;
        }
        if info.rx_offload_capa & RX_OFFLOAD_IPV4_CKSUM != 0 {
            conf.rxmode.offloads |= RX_OFFLOAD_IPV4_CKSUM;
        }
        // Rx interrupts where the PMD takes them: configure with them, else without. The
        // virtual devices used here have none (ring, memif, af_packet, null, af_xdp: EAL
        // only logs an error when asked), so they are not asked.
        let no_interrupts = [
            "net_ring",
            "net_memif",
            "net_af_packet",
            "net_null",
            "net_af_xdp",
        ];
        if ps.rx_interrupts && !no_interrupts.contains(&driver) {
            conf.intr_conf.set_rxq(1);
            // SAFETY: valid port and conf.
            if unsafe { ffi::rte_eth_dev_configure(id, ps.queues, ps.queues, &conf) } == 0 {
                return Ok(true);
            }
        }
        conf.intr_conf.set_rxq(0);
        // SAFETY: valid port and conf.
        let r = unsafe { ffi::rte_eth_dev_configure(id, ps.queues, ps.queues, &conf) };
        if r != 0 {
            return Err(call_err(
                format!("rte_eth_dev_configure(port {id}, {driver})"),
                r,
            ));
        }
        Ok(false)
    }

    /// Sets up each queue pair, with a mempool of its own for the Rx side.
    fn setup_queues(id: u16, ps: &PortSpec) -> Result<Vec<Pool>, DpdkError> {
        // SAFETY: EAL started.
        let socket = unsafe { ffi::rte_socket_id() };
        let mut pools = Vec::new();
        for q in 0..ps.queues {
            let pool = Pool::new(ps.mbufs)?;
            // SAFETY: configured port, queue < queues, default queue conf (null), the pool
            // outlives the port (never freed).
            let r = unsafe {
                ffi::rte_eth_rx_queue_setup(
                    id,
                    q,
                    ps.rx_desc,
                    socket,
                    std::ptr::null(),
                    pool.0.as_ptr(),
                )
            };
            if r != 0 {
                return Err(call_err(
                    format!("rte_eth_rx_queue_setup(port {id}, queue {q})"),
                    r,
                ));
            }
            // SAFETY: as above.
            let r =
                unsafe { ffi::rte_eth_tx_queue_setup(id, q, ps.tx_desc, socket, std::ptr::null()) };
            if r != 0 {
                return Err(call_err(
                    format!("rte_eth_tx_queue_setup(port {id}, queue {q})"),
                    r,
                ));
            }
            pools.push(pool);
        }
        Ok(pools)
    }

    /// Each queue's Rx interrupt fd; all `None` unless every queue has one.
    fn rx_interrupt_fds(id: u16, queues: u16, rx_interrupts: bool) -> Vec<Option<RawFd>> {
        let fds: Vec<Option<RawFd>> = (0..queues)
            .map(|q| {
                if !rx_interrupts {
                    return None;
                }
                // SAFETY: started port with Rx interrupts configured.
                let fd = unsafe { ffi::rte_eth_dev_rx_intr_ctl_q_get_fd(id, q) };
                (fd >= 0).then_some(fd)
            })
            .collect();
        if fds.iter().all(|f| f.is_some()) {
            fds
        } else {
            vec![None; queues as usize]
        }
    }

    /// The port's device name (`port<id>` where DPDK has none).
    fn name_of(id: u16) -> String {
        let mut name_buf = [0 as libc::c_char; 64];
        // SAFETY: valid port and a 64-byte buffer (RTE_ETH_NAME_MAX_LEN).
        if unsafe { ffi::rte_eth_dev_get_name_by_port(id, name_buf.as_mut_ptr()) } == 0 {
            // SAFETY: DPDK wrote a NUL-terminated name into the buffer.
            unsafe { CStr::from_ptr(name_buf.as_ptr()) }
                .to_string_lossy()
                .into_owned()
        } else {
            format!("port{id}")
        }
    }

    /// The port's id.
    pub fn id(&self) -> u16 {
        self.id
    }

    /// What the port offers.
    pub fn info(&self) -> &PortInfo {
        &self.info
    }

    /// Whether the link is up (a memif peer connected, say).
    pub fn link_up(&self) -> bool {
        let mut link = ffi::rte_eth_link::default();
        // SAFETY: started port, valid out-struct.
        let r = unsafe { ffi::rte_eth_link_get_nowait(self.id, &mut link) };
        r == 0 && link.link_status() == 1
    }

    /// Takes queue pair `q` for one thread to own; it is free again when that [`Queue`]
    /// is dropped (an endpoint restarted on the same queue).
    pub fn take_queue(&mut self, q: u16) -> Result<Queue, DpdkError> {
        let Some(t) = self.taken.get(q as usize) else {
            return Err(DpdkError::Invalid(format!(
                "port {} has no queue {q}",
                self.info.name
            )));
        };
        if t.swap(true, Ordering::AcqRel) {
            return Err(DpdkError::Invalid(format!(
                "queue {q} of port {} is taken",
                self.info.name
            )));
        }
        Ok(Queue {
            stopped: false,
            taken: t.clone(),
            rx_desc: self.rx_desc,
            port: self.id,
            queue: q,
            pool: self.pools[q as usize],
            intr_fd: self.intr_fds[q as usize],
        })
    }

    /// Queue pairs of the port.
    pub fn queues(&self) -> u16 {
        self.taken.len() as u16
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        self.taken.store(false, Ordering::Release);
    }
}

/// Sleeps until a queue's Rx interrupt or a wake-up fd fires (see [`Queue::rx_sleeper`]).
pub struct RxSleeper {
    epoll: am_os::Epoll,
    wake_fd: RawFd,
    _wake: Box<ffi::rte_epoll_event>,
}

// SAFETY: the epoll set and the event record are used only by the owner of the queue.
unsafe impl Send for RxSleeper {}

impl RxSleeper {
    /// Sleeps up to `timeout_ms`; returns (an Rx interrupt came, the wake fd fired).
    pub fn sleep(&mut self, timeout_ms: i32) -> (bool, bool) {
        let mut evs = [
            ffi::rte_epoll_event::default(),
            ffi::rte_epoll_event::default(),
        ];
        // SAFETY: our epoll set, room for two events.
        let n =
            unsafe { ffi::rte_epoll_wait(self.epoll.as_raw_fd(), evs.as_mut_ptr(), 2, timeout_ms) };
        let (mut rx, mut wake) = (false, false);
        for e in evs.iter().take(n.max(0) as usize) {
            if e.fd == self.wake_fd {
                wake = true;
            } else {
                rx = true;
            }
        }
        (rx, wake)
    }
}

/// A pool of mbufs of its own (for frames made outside any queue: a test switch's copies).
pub struct MbufPool(Pool);

impl MbufPool {
    /// A pool of `mbufs` buffers (starts EAL if nobody did).
    pub fn new(mbufs: u32) -> Result<MbufPool, DpdkError> {
        eal_init(&EalOptions::default())?;
        Pool::new(mbufs).map(MbufPool)
    }
    /// An empty mbuf holding `bytes`; `None` when the pool is empty or they do not fit.
    pub fn frame(&self, bytes: &[u8]) -> Option<Mbuf> {
        // SAFETY: valid pool (never freed); the result is null or an mbuf we now own.
        let mut m = NonNull::new(unsafe { ffi::am_shim_alloc(self.0 .0.as_ptr()) }).map(Mbuf)?;
        m.append(bytes.len())?.copy_from_slice(bytes);
        Some(m)
    }
}

/// One Rx/Tx queue pair of a port and its mbuf pool; owned by one thread.
pub struct Queue {
    stopped: bool,
    taken: Arc<AtomicBool>,
    rx_desc: u16,
    port: u16,
    queue: u16,
    pool: Pool,
    intr_fd: Option<RawFd>,
}

impl Queue {
    /// Receives up to `max` packets into `out`; returns how many.
    pub fn rx_burst(&mut self, out: &mut Vec<Mbuf>, max: usize) -> usize {
        if self.stopped {
            return 0;
        }
        let max = max.min(u16::MAX as usize);
        out.reserve(max);
        // SAFETY: started port, our own queue (one owner: &mut self), room for `max`
        // pointers in the spare capacity; the PMD hands over n valid mbufs.
        unsafe {
            let n = ffi::am_shim_rx_burst(
                self.port,
                self.queue,
                out.as_mut_ptr().add(out.len()) as *mut *mut ffi::rte_mbuf,
                max as u16,
            ) as usize;
            adopt(out, n);
            n
        }
    }

    /// Transmits from the front of `pkts`; returns how many the port took (removed from
    /// `pkts`; the rest stay for a later try).
    pub fn tx_burst(&mut self, pkts: &mut Vec<Mbuf>) -> usize {
        if self.stopped {
            return 0;
        }
        let len = pkts.len().min(u16::MAX as usize);
        // SAFETY: started port, our own queue; Mbuf is a transparent mbuf pointer so the
        // Vec is an array of them; the PMD takes ownership of the first n, forgotten here.
        let n = unsafe {
            ffi::am_shim_tx_burst(
                self.port,
                self.queue,
                pkts.as_mut_ptr() as *mut *mut ffi::rte_mbuf,
                len as u16,
            )
        } as usize;
        pkts.drain(..n).for_each(std::mem::forget);
        n
    }

    /// A fresh empty mbuf from this queue's pool; `None` when the pool is empty.
    pub fn alloc(&self) -> Option<Mbuf> {
        // SAFETY: valid pool (never freed); the result is null or an mbuf we now own.
        NonNull::new(unsafe { ffi::am_shim_alloc(self.pool.0.as_ptr()) }).map(Mbuf)
    }

    /// Whether the port gives this queue Rx interrupts.
    pub fn has_rx_interrupts(&self) -> bool {
        self.intr_fd.is_some()
    }

    /// An epoll set holding this queue's Rx interrupt and `wake_fd` (an eventfd another
    /// thread writes), for [`RxSleeper::sleep`]; `None` when the port has no Rx interrupts.
    /// DPDK's own epoll wrapper reads (clears) the interrupt fd as its kind needs.
    pub fn rx_sleeper(&mut self, wake_fd: RawFd) -> Result<Option<RxSleeper>, DpdkError> {
        if self.intr_fd.is_none() {
            return Ok(None);
        }
        let epoll =
            am_os::Epoll::new().map_err(|e| DpdkError::Invalid(format!("epoll_create1: {e}")))?;
        let epfd = epoll.as_raw_fd();
        // SAFETY: started port with Rx interrupts; DPDK adds the queue's interrupt fd to our
        // epoll set with an event record of its own (kept in the port's interrupt handle).
        let r = unsafe {
            ffi::rte_eth_dev_rx_intr_ctl_q(self.port, self.queue, epfd, 1, std::ptr::null_mut())
        };
        if r != 0 {
            return Err(call_err("rte_eth_dev_rx_intr_ctl_q(ADD)", r));
        }
        let mut wake = Box::new(ffi::rte_epoll_event::default());
        wake.epdata.event = libc::EPOLLIN as u32;
        // SAFETY: valid epoll fd and wake fd; DPDK keeps a pointer to `wake` in the epoll
        // set, and the box lives in the returned RxSleeper as long as the set does.
        let r = unsafe { ffi::rte_epoll_ctl(epfd, libc::EPOLL_CTL_ADD, wake_fd, &mut *wake) };
        if r != 0 {
            return Err(call_err("rte_epoll_ctl(ADD wake fd)", r));
        }
        Ok(Some(RxSleeper {
            epoll,
            wake_fd,
            _wake: wake,
        }))
    }

    /// Arms (`true`) or disarms the Rx interrupt of this queue.
    pub fn rx_interrupt(&mut self, on: bool) -> bool {
        if self.intr_fd.is_none() {
            return false;
        }
        // SAFETY: started port with Rx interrupts configured, our own queue.
        let r = unsafe {
            if on {
                ffi::rte_eth_dev_rx_intr_enable(self.port, self.queue)
            } else {
                ffi::rte_eth_dev_rx_intr_disable(self.port, self.queue)
            }
        };
        r == 0
    }

    /// Whether the port's link is up.
    pub fn link_up(&self) -> bool {
        let mut link = ffi::rte_eth_link::default();
        // SAFETY: started port, valid out-struct.
        let r = unsafe { ffi::rte_eth_link_get_nowait(self.port, &mut link) };
        r == 0 && link.link_status() == 1
    }

    /// Stops and starts the port again (its queues and pools stay): a `net_memif` client
    /// connects only when its port starts, so after its server restarted this is how it
    /// reconnects. Only for a port with this one queue: others' queues would stop too.
    /// Until it starts again, bursts on the queue do nothing (DPDK must not be asked to
    /// poll a stopped port).
    pub fn restart_port(&mut self) -> Result<(), DpdkError> {
        // SAFETY: a configured port; the caller owns its only queue, so nobody else polls
        // it while it is stopped.
        unsafe {
            if !self.stopped {
                let r = ffi::rte_eth_dev_stop(self.port);
                if r != 0 {
                    return Err(call_err("rte_eth_dev_stop", r));
                }
                self.stopped = true;
            }
            let r = ffi::rte_eth_dev_start(self.port);
            if r != 0 {
                return Err(call_err("rte_eth_dev_start", r));
            }
        }
        self.stopped = false;
        Ok(())
    }

    /// True while a [`Queue::restart_port`] has not started the port again.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Receive descriptors of the queue.
    pub fn rx_desc(&self) -> u16 {
        self.rx_desc
    }

    /// The queue's number on its port.
    pub fn id(&self) -> u16 {
        self.queue
    }
}
