//! The raw UDP baseline: plain sockets, the same shapes and wait modes as ours.
//!
//! Datagrams start with one byte saying what to do: `E` echo it back, `S` count it
//! (streaming), `R` report the count and reset.

use crate::cases::Wait;
use hdrhistogram::Histogram;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Largest UDP payload over IPv4.
pub const MAX_DATAGRAM: usize = 65_507;

fn recv(
    sock: &UdpSocket,
    buf: &mut [u8],
    wait: Wait,
    stop: &AtomicBool,
) -> io::Result<(usize, SocketAddr)> {
    loop {
        match sock.recv_from(buf) {
            Ok(x) => return Ok(x),
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                if stop.load(Ordering::Relaxed) {
                    return Err(io::Error::new(io::ErrorKind::Interrupted, "stopped"));
                }
                if wait == Wait::Poll {
                    std::hint::spin_loop();
                }
            }
            Err(e) => return Err(e),
        }
    }
}

fn set_wait(sock: &UdpSocket, wait: Wait) -> io::Result<()> {
    match wait {
        Wait::Poll => sock.set_nonblocking(true),
        Wait::Block => {
            sock.set_nonblocking(false)?;
            sock.set_read_timeout(Some(Duration::from_millis(200)))
        }
    }
}

/// Serves echo/count/report until `stop`.
pub fn serve(sock: UdpSocket, wait: Wait, stop: &AtomicBool) -> io::Result<()> {
    set_wait(&sock, wait)?;
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    let (mut msgs, mut bytes) = (0u64, 0u64);
    loop {
        let (n, from) = match recv(&sock, &mut buf, wait, stop) {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        };
        match buf.first() {
            Some(b'E') => {
                sock.send_to(&buf[..n], from)?;
            }
            Some(b'S') => {
                msgs += 1;
                bytes += n as u64;
            }
            Some(b'R') => {
                let mut r = [0u8; 17];
                r[0] = b'r';
                r[1..9].copy_from_slice(&msgs.to_le_bytes());
                r[9..17].copy_from_slice(&bytes.to_le_bytes());
                sock.send_to(&r, from)?;
                msgs = 0;
                bytes = 0;
            }
            _ => {}
        }
    }
}

/// A raw UDP client bound near `server`.
pub struct RawClient {
    sock: UdpSocket,
    server: SocketAddr,
    wait: Wait,
    buf: Vec<u8>,
}

impl RawClient {
    /// Connects (in the UDP sense) to `server`.
    pub fn new(server: SocketAddr, wait: Wait) -> io::Result<RawClient> {
        let bind = if server.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let sock = UdpSocket::bind(bind)?;
        set_wait(&sock, wait)?;
        Ok(RawClient {
            sock,
            server,
            wait,
            buf: vec![0u8; MAX_DATAGRAM + 1],
        })
    }

    fn roundtrip(&mut self, msg: &[u8]) -> io::Result<()> {
        self.sock.send_to(msg, self.server)?;
        let mut sent_at = Instant::now();
        let start = sent_at;
        loop {
            match self.sock.recv_from(&mut self.buf) {
                Ok((n, _)) if n == msg.len() => return Ok(()),
                Ok(_) => continue,
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut =>
                {
                    if start.elapsed() > Duration::from_secs(5) {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("the raw UDP server at {} does not answer", self.server),
                        ));
                    }
                    // A lost datagram: send again (loopback rarely loses).
                    if sent_at.elapsed() > Duration::from_millis(200) {
                        self.sock.send_to(msg, self.server)?;
                        sent_at = Instant::now();
                    }
                    if self.wait == Wait::Poll {
                        std::hint::spin_loop();
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Round trips of `size`-byte datagrams (at least 1): a histogram in nanoseconds.
    pub fn latency(
        &mut self,
        size: usize,
        warmup: usize,
        iters: usize,
    ) -> io::Result<Histogram<u64>> {
        let mut msg = vec![0u8; size.clamp(1, MAX_DATAGRAM)];
        msg[0] = b'E';
        let mut h = Histogram::<u64>::new(3).map_err(io::Error::other)?;
        for i in 0..warmup + iters {
            let t0 = Instant::now();
            self.roundtrip(&msg)?;
            if i >= warmup {
                let _ = h.record(t0.elapsed().as_nanos() as u64);
            }
        }
        Ok(h)
    }

    /// One-at-a-time round trips of 8-byte datagrams for `dur`: (messages, seconds).
    pub fn rate(&mut self, dur: Duration) -> io::Result<(u64, f64)> {
        let mut msg = [0u8; 8];
        msg[0] = b'E';
        let start = Instant::now();
        let mut n = 0;
        while start.elapsed() < dur {
            self.roundtrip(&msg)?;
            n += 1;
        }
        Ok((n, start.elapsed().as_secs_f64()))
    }

    /// Streams `total` bytes as `chunk`-byte datagrams as fast as the socket takes them;
    /// returns (datagrams, bytes) the server counted and the seconds until it answered.
    pub fn stream(&mut self, chunk: usize, total: usize) -> io::Result<(u64, u64, f64)> {
        let mut msg = vec![0u8; chunk.clamp(1, MAX_DATAGRAM)];
        msg[0] = b'S';
        let count = total.div_ceil(msg.len());
        let start = Instant::now();
        self.sock.set_nonblocking(false)?;
        for _ in 0..count {
            self.sock.send_to(&msg, self.server)?;
        }
        // Ask for the count until it comes (a report can be lost too).
        self.sock
            .set_read_timeout(Some(Duration::from_millis(100)))?;
        let asked = Instant::now();
        let answer = loop {
            if asked.elapsed() > Duration::from_secs(5) {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the raw UDP server at {} does not report", self.server),
                ));
            }
            self.sock.send_to(b"R", self.server)?;
            match self.sock.recv_from(&mut self.buf) {
                Ok((17, _)) if self.buf[0] == b'r' => break &self.buf[1..17],
                Ok(_) => continue,
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut =>
                {
                    continue
                }
                Err(e) => return Err(e),
            }
        };
        let secs = start.elapsed().as_secs_f64();
        let msgs = u64::from_le_bytes(answer[..8].try_into().map_err(io::Error::other)?);
        let bytes = u64::from_le_bytes(answer[8..16].try_into().map_err(io::Error::other)?);
        set_wait(&self.sock, self.wait)?;
        Ok((msgs, bytes, secs))
    }
}
