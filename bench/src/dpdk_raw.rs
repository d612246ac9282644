//! Raw DPDK ping-pong: the floor under `am-dpdk`. The same bindings (`am_dpdk::sys`) and
//! the same frames (`am_dpdk::frame`), no Active Messages: the server sends every frame
//! it receives straight back (addresses swapped, same mbuf), the client times round trips
//! of one frame, or keeps a window of frames in flight for the packet rate.

use am_dpdk::frame::{self, UdpAddrs};
use am_dpdk::mac_for;
use am_dpdk::sys::{Mbuf, Port, PortSpec, Queue};
use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Opens `dev` with one queue and waits up to 15 s for its link (a memif peer).
pub fn open(dev: &str) -> Result<(Port, Queue)> {
    let mut port = Port::open(dev, &PortSpec::default())?;
    let q = port.take_queue(0)?;
    Ok((port, q))
}

/// Waits until the port's link is up.
pub fn wait_link(port: &Port, limit: Duration) -> Result<()> {
    let start = Instant::now();
    while !port.link_up() {
        if start.elapsed() > limit {
            bail!(
                "the link of {} did not come up in {limit:?}: is the server running?",
                port.info().name
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Sends every received frame back with its Ethernet, IPv4 and UDP addresses swapped
/// (checksums stay valid: the swaps keep the sums), until `stop`.
pub fn serve(q: &mut Queue, stop: &AtomicBool) {
    let mut rx: Vec<Mbuf> = Vec::with_capacity(64);
    let mut turn = 0u32;
    while turn & 1023 != 0 || !stop.load(Ordering::Relaxed) {
        turn = turn.wrapping_add(1);
        if q.rx_burst(&mut rx, 32) == 0 {
            continue;
        }
        for m in rx.iter_mut() {
            swap(m);
        }
        while !rx.is_empty() {
            if q.tx_burst(&mut rx) == 0 {
                std::hint::spin_loop();
            }
        }
    }
}

fn swap(m: &mut Mbuf) {
    let d = m.data_mut();
    if d.len() < frame::HEADERS {
        return;
    }
    let mut h = [0u8; frame::HEADERS];
    h.copy_from_slice(&d[..frame::HEADERS]);
    d[0..6].copy_from_slice(&h[6..12]);
    d[6..12].copy_from_slice(&h[0..6]);
    d[26..30].copy_from_slice(&h[30..34]);
    d[30..34].copy_from_slice(&h[26..30]);
    d[34..36].copy_from_slice(&h[36..38]);
    d[36..38].copy_from_slice(&h[34..36]);
}

/// A raw client on one queue.
pub struct RawDpdkClient {
    q: Queue,
    addrs: UdpAddrs,
    rx: Vec<Mbuf>,
    tx: Vec<Mbuf>,
}

impl RawDpdkClient {
    /// A client at `me` talking to `server` (MACs made from the addresses, as the AM
    /// server's).
    pub fn new(q: Queue, me: SocketAddrV4, server: SocketAddrV4) -> RawDpdkClient {
        RawDpdkClient {
            q,
            addrs: UdpAddrs {
                src_mac: mac_for(*me.ip()),
                dst_mac: mac_for(*server.ip()),
                src: me,
                dst: server,
            },
            rx: Vec::with_capacity(64),
            tx: Vec::with_capacity(64),
        }
    }

    /// Builds one frame of `payload` bytes in a fresh mbuf (as the AM driver does).
    fn frame(&mut self, payload: &[u8]) -> Result<Mbuf> {
        let mut m = self.q.alloc().context("mbuf pool empty")?;
        let buf = m
            .append((frame::HEADERS + payload.len()).max(frame::MIN_FRAME))
            .context("frame too large")?;
        frame::write_udp(buf, &self.addrs, 0, payload, true, true).context("frame")?;
        Ok(m)
    }

    fn send(&mut self, m: Mbuf) {
        self.tx.push(m);
        while !self.tx.is_empty() {
            self.q.tx_burst(&mut self.tx);
        }
    }

    /// Round trips of one frame carrying `size` bytes: a histogram in nanoseconds.
    pub fn latency(&mut self, size: usize, warmup: usize, iters: usize) -> Result<Histogram<u64>> {
        let payload = vec![0x5au8; size];
        let mut h = Histogram::<u64>::new(3)?;
        for i in 0..warmup + iters {
            let t0 = Instant::now();
            let m = self.frame(&payload)?;
            self.send(m);
            let mut spins = 0u64;
            loop {
                self.rx.clear();
                if self.q.rx_burst(&mut self.rx, 32) > 0 {
                    break;
                }
                spins += 1;
                if spins.is_multiple_of(1 << 20) && t0.elapsed() > Duration::from_secs(5) {
                    bail!("the raw DPDK server does not answer");
                }
            }
            self.rx.clear();
            if i >= warmup {
                let _ = h.record(t0.elapsed().as_nanos() as u64);
            }
        }
        Ok(h)
    }

    /// Frames echoed per second with `window` frames in flight, for `dur`:
    /// (frames, seconds).
    pub fn rate(&mut self, window: usize, dur: Duration) -> Result<(u64, f64)> {
        let payload = [0u8; 8];
        let mut in_flight = 0usize;
        let mut done = 0u64;
        let start = Instant::now();
        let mut last = Instant::now();
        let mut turn = 0u32;
        loop {
            turn = turn.wrapping_add(1);
            if turn.is_multiple_of(256) {
                if start.elapsed() >= dur {
                    break;
                }
                if last.elapsed() > Duration::from_secs(5) {
                    bail!("the raw DPDK server stopped answering");
                }
            }
            while in_flight < window {
                let m = self.frame(&payload)?;
                self.tx.push(m);
                in_flight += 1;
            }
            while !self.tx.is_empty() {
                self.q.tx_burst(&mut self.tx);
            }
            self.rx.clear();
            let n = self.q.rx_burst(&mut self.rx, 64);
            if n > 0 {
                last = Instant::now();
            }
            in_flight -= n.min(in_flight);
            done += n as u64;
            self.rx.clear();
        }
        // Drain what is still in flight so the next measurement starts clean.
        let t = Instant::now();
        while in_flight > 0 && t.elapsed() < Duration::from_millis(200) {
            self.rx.clear();
            in_flight -= self.q.rx_burst(&mut self.rx, 64).min(in_flight);
        }
        self.rx.clear();
        Ok((done, start.elapsed().as_secs_f64()))
    }
}
