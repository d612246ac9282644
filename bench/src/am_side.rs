//! Our side: an AM server (echo, sink, report handlers) and a client that measures it.

use crate::cases::{Case, Class, Wait};
use am_core::{AmError, Config, Endpoint, Msg, Tag, Transport};
use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Handler: reply with the same class and size.
pub const ECHO: u16 = 1;
/// Handler: count a one-way message.
pub const SINK: u16 = 2;
/// Handler: reply with `[messages, bytes]` counted and reset.
pub const REPORT: u16 = 3;
/// The server's tag.
pub const SERVER_TAG: Tag = Tag(0xbe4c);
/// Segment size on both sides (holds a 16 MiB bulk twice).
pub const SEGMENT: usize = 32 << 20;

/// The endpoint configuration both sides use.
pub fn config(tag: Tag) -> Config {
    Config {
        tag,
        segment_bytes: SEGMENT,
        ..Config::default()
    }
}

/// Installs the server's handlers on `ep`.
pub fn make_server<T: Transport>(ep: &mut Endpoint<T>) -> Result<(), AmError> {
    let counts = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    ep.register(ECHO, |ctx, mut m| {
        let Some(t) = m.token.take() else { return };
        let _ = match m.bulk {
            Some((_, len)) => {
                let src = [(0usize, len)];
                ctx.reply(t, Msg::bulk(ECHO, m.args, &src, 0))
            }
            None if m.payload.is_empty() => ctx.reply(t, Msg::small(ECHO, m.args)),
            None => {
                let slices = [m.payload];
                ctx.reply(t, Msg::medium(ECHO, m.args, &slices))
            }
        };
    })?;
    let c = counts.clone();
    ep.register(SINK, move |_, m| {
        c.0.fetch_add(1, Ordering::Relaxed);
        let n = m.bulk.map_or(m.payload.len(), |(_, l)| l);
        c.1.fetch_add(n as u64, Ordering::Relaxed);
    })?;
    ep.register(REPORT, move |ctx, mut m| {
        let msgs = counts.0.swap(0, Ordering::Relaxed);
        let bytes = counts.1.swap(0, Ordering::Relaxed);
        if let Some(t) = m.token.take() {
            let _ = ctx.reply(t, Msg::small(REPORT, &[msgs, bytes]));
        }
    })?;
    Ok(())
}

/// Runs a server endpoint until `stop`.
pub fn serve<T: Transport>(ep: &mut Endpoint<T>, wait: Wait, stop: &AtomicBool) -> Result<()> {
    while !stop.load(Ordering::Relaxed) {
        let n = ep.poll(256)?;
        if n == 0 && wait == Wait::Block {
            ep.wait(Some(Duration::from_millis(100)))?;
        }
    }
    Ok(())
}

/// Drives progress while the client waits: polls (and for the simulator, the server too).
pub type Pump<T> = Box<dyn FnMut(&mut Endpoint<T>, Wait) -> usize>;

/// The pump of a client over a real transport: poll, and in blocking mode sleep in `wait`
/// when there was nothing to do.
pub fn real_pump<T: Transport + 'static>() -> Pump<T> {
    Box::new(|ep, wait| {
        let n = ep.poll(256).unwrap_or(0);
        if n == 0 && wait == Wait::Block {
            let _ = ep.wait(Some(Duration::from_millis(10)));
        }
        n
    })
}

#[derive(Default)]
struct State {
    replies: AtomicU64,
    report: Mutex<Option<(u64, u64)>>,
    /// The first message the layer returned (the server is unreachable, say).
    failed: Mutex<Option<String>>,
    /// Set with `failed`, so the hot loop checks an atomic, not a mutex.
    any_failed: AtomicBool,
}

/// A client measuring one server.
pub struct AmClient<T: Transport> {
    ep: Endpoint<T>,
    state: Arc<State>,
    wait: Wait,
    pump: Pump<T>,
}

const GIVE_UP: Duration = Duration::from_secs(20);

impl<T: Transport> AmClient<T> {
    /// A client on `ep` whose translation table index 0 is the server.
    pub fn new(mut ep: Endpoint<T>, wait: Wait, pump: Pump<T>) -> Result<AmClient<T>, AmError> {
        let state = Arc::new(State::default());
        let s = state.clone();
        ep.register(ECHO, move |_, _| {
            s.replies.fetch_add(1, Ordering::Relaxed);
        })?;
        let s = state.clone();
        ep.set_upcall(move |_, u| {
            if let Ok(mut g) = s.failed.lock() {
                g.get_or_insert(format!("{} (sending to {})", u.code, u.dest));
            }
            s.any_failed.store(true, Ordering::Relaxed);
        });
        let s = state.clone();
        ep.register(REPORT, move |_, m| {
            if let Ok(mut g) = s.report.lock() {
                *g = Some((m.args[0], m.args[1]));
            }
        })?;
        Ok(AmClient {
            ep,
            state,
            wait,
            pump,
        })
    }

    fn check_failed(&self) -> Result<()> {
        if !self.state.any_failed.load(Ordering::Relaxed) {
            return Ok(());
        }
        match self.state.failed.lock().ok().and_then(|g| g.clone()) {
            Some(e) => Err(anyhow!("a message came back: {e}")),
            None => Ok(()),
        }
    }

    fn pump_until(&mut self, mut done: impl FnMut(&State) -> bool) -> Result<()> {
        let start = Instant::now();
        let mut turn = 0u32;
        while !done(&self.state) {
            (self.pump)(&mut self.ep, self.wait);
            self.check_failed()?;
            turn = turn.wrapping_add(1);
            // The clock is looked at now and then: where it is slow to read (an emulated
            // HPET) it would otherwise dominate the loop.
            if turn.is_multiple_of(1024) && start.elapsed() > GIVE_UP {
                bail!("no progress for {GIVE_UP:?}: is the server running?");
            }
        }
        Ok(())
    }

    fn send(
        &mut self,
        case: Case,
        handler: u16,
        request: bool,
        body: &[u8],
    ) -> Result<(), AmError> {
        let args8: [u64; 8] = [1, 2, 3, 4, 5, 6, 7, 8];
        let slices = [&body[..case.size.min(body.len())]];
        let src = [(0usize, case.size)];
        let msg = match case.class {
            Class::Small0 => Msg::small(handler, &[]),
            Class::Small8 => Msg::small(handler, &args8),
            Class::Medium => Msg::medium(handler, &[], &slices),
            Class::Bulk => Msg::bulk(handler, &[], &src, SEGMENT as u64 / 2),
        };
        if request {
            self.ep.request(0, msg).map(|_| ())
        } else {
            self.ep.send(0, msg).map(|_| ())
        }
    }

    /// Round trips of `case` (the server echoes the same class and size).
    pub fn latency(&mut self, case: Case, warmup: usize, iters: usize) -> Result<Histogram<u64>> {
        let body = vec![0x5au8; case.size.min(64 << 10)];
        let mut h = Histogram::<u64>::new(3)?;
        for i in 0..warmup + iters {
            let before = self.state.replies.load(Ordering::Relaxed);
            let t0 = Instant::now();
            self.send(case, ECHO, true, &body)?;
            self.pump_until(|s| s.replies.load(Ordering::Relaxed) > before)?;
            if i >= warmup {
                let _ = h.record(t0.elapsed().as_nanos() as u64);
            }
        }
        Ok(h)
    }

    /// Streams one-way `case` messages totalling at least `total` bytes (or 1000
    /// messages for small ones); returns (messages, bytes) the server counted and seconds
    /// until its report arrived.
    pub fn bandwidth(&mut self, case: Case, total: usize) -> Result<(u64, u64, f64)> {
        let body = vec![0xa5u8; case.size.min(64 << 10)];
        let count = total.div_ceil(case.size.max(1)).max(8);
        let start = Instant::now();
        let mut sent = 0;
        while sent < count {
            match self.send(case, SINK, false, &body) {
                Ok(()) => sent += 1,
                Err(AmError::WouldBlock) => {
                    (self.pump)(&mut self.ep, self.wait);
                    self.check_failed()?;
                }
                Err(e) => return Err(e.into()),
            }
            if start.elapsed() > GIVE_UP * 3 {
                bail!("bandwidth run did not finish");
            }
        }
        if let Ok(mut g) = self.state.report.lock() {
            *g = None;
        }
        loop {
            match self.send(Case::SMALL0, REPORT, true, &[]) {
                Ok(()) => break,
                Err(AmError::WouldBlock) => {
                    (self.pump)(&mut self.ep, self.wait);
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.pump_until(|s| s.report.lock().map(|g| g.is_some()).unwrap_or(true))?;
        let secs = start.elapsed().as_secs_f64();
        let (msgs, bytes) = self
            .state
            .report
            .lock()
            .ok()
            .and_then(|g| *g)
            .context("no report")?;
        Ok((msgs, bytes, secs))
    }

    /// Small requests with `outstanding` in flight for `dur`: (replies, seconds).
    pub fn rate(&mut self, outstanding: u64, dur: Duration) -> Result<(u64, f64)> {
        let base = self.state.replies.load(Ordering::Relaxed);
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < dur {
            let done = self.state.replies.load(Ordering::Relaxed) - base;
            while sent - done < outstanding {
                match self.send(Case::SMALL0, ECHO, true, &[]) {
                    Ok(()) => sent += 1,
                    Err(AmError::WouldBlock) => break,
                    Err(e) => return Err(e.into()),
                }
            }
            (self.pump)(&mut self.ep, self.wait);
            self.check_failed()?;
        }
        let secs = start.elapsed().as_secs_f64();
        let done = self.state.replies.load(Ordering::Relaxed) - base;
        // Drain the rest so the next measurement starts clean.
        self.pump_until(|s| s.replies.load(Ordering::Relaxed) - base >= sent)?;
        Ok((done, secs))
    }

    /// The endpoint (for its counters).
    pub fn endpoint(&self) -> &Endpoint<T> {
        &self.ep
    }
}
