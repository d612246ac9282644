//! Clocks for event loops: the time-stamp counter, a clock calibrated against it, and the
//! kernel's coarse monotonic clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Reads the time-stamp counter (0 on CPUs other than x86_64, where callers must not use
/// it: [`TscClock::new`] and DPDK's clock check the architecture).
#[cfg(target_arch = "x86_64")]
#[inline]
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no preconditions on x86_64.
    #[allow(unused_unsafe)]
    unsafe {
        std::arch::x86_64::_rdtsc()
    }
}

/// Reads the time-stamp counter (0 on CPUs other than x86_64).
#[cfg(not(target_arch = "x86_64"))]
#[inline]
pub fn rdtsc() -> u64 {
    0
}

/// Reads `CLOCK_MONOTONIC_COARSE` (jiffies, no hardware access: cheap even where the
/// clocksource is an emulated HPET), in nanoseconds. For a driver's own timers.
#[inline]
pub fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; CLOCK_MONOTONIC_COARSE always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// How long the one calibration of the process takes.
const CALIBRATION: Duration = Duration::from_millis(20);

/// (tsc, instant, ns per tick) when the kernel does not time with the TSC itself (and
/// `AM_CLOCK=os` does not ask for the OS clock), measured once per process.
fn calibration() -> Option<(u64, Instant, f64)> {
    static CAL: OnceLock<Option<(u64, Instant, f64)>> = OnceLock::new();
    *CAL.get_or_init(|| {
        if !cfg!(target_arch = "x86_64") {
            return None;
        }
        let cs = std::fs::read_to_string(
            "/sys/devices/system/clocksource/clocksource0/current_clocksource",
        )
        .unwrap_or_default();
        let os_asked = ["AM_CLOCK", "AM_RDMA_CLOCK"]
            .iter()
            .any(|k| std::env::var(k).is_ok_and(|v| v == "os"));
        if cs.trim() == "tsc" || os_asked {
            return None;
        }
        let (t0, i0) = (rdtsc(), Instant::now());
        std::thread::sleep(CALIBRATION);
        let (t1, i1) = (rdtsc(), Instant::now());
        let ns = i1.duration_since(i0).as_nanos() as f64;
        (t1 > t0).then(|| (t0, i0, ns / (t1 - t0) as f64))
    })
}

/// A cheap monotonic clock for an event loop: the time-stamp counter, calibrated once per
/// process against `CLOCK_MONOTONIC`, where the kernel's clocksource is not the TSC (an
/// emulated HPET costs microseconds per read, and the loop reads the clock on every turn;
/// perftest times with the TSC for the same reason). Elsewhere `Instant`, which is then
/// as cheap. `AM_CLOCK=os` forces `Instant`.
pub struct TscClock {
    origin: Instant,
    tsc: Option<(u64, f64)>,
    last: AtomicU64,
}

impl TscClock {
    /// Calibrates (about 20 ms, once per process) when the TSC is worth it.
    pub fn new() -> TscClock {
        let origin = Instant::now();
        TscClock {
            origin,
            tsc: calibration().map(|(t0, i0, ns_per_tick)| {
                // Express the origin in ticks.
                let since = origin.saturating_duration_since(i0).as_nanos() as f64;
                (t0 + (since / ns_per_tick) as u64, ns_per_tick)
            }),
            last: AtomicU64::new(0),
        }
    }

    /// Nanoseconds since this clock was made; never goes backwards.
    #[inline]
    pub fn now_ns(&self) -> u64 {
        let t = match self.tsc {
            Some((t0, ns_per_tick)) => (rdtsc().saturating_sub(t0) as f64 * ns_per_tick) as u64,
            None => self.origin.elapsed().as_nanos() as u64,
        };
        // fetch_max keeps it monotonic even if two threads read at once.
        let last = self.last.fetch_max(t, Ordering::Relaxed);
        t.max(last)
    }

    /// True when the TSC is in use.
    pub fn uses_tsc(&self) -> bool {
        self.tsc.is_some()
    }
}

impl Default for TscClock {
    fn default() -> Self {
        TscClock::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clocks_move_forward_at_about_the_rate_of_instant() {
        let c = TscClock::new();
        let (a, i) = (c.now_ns(), Instant::now());
        std::thread::sleep(Duration::from_millis(30));
        let (b, j) = (c.now_ns(), Instant::now());
        let real = j.duration_since(i).as_nanos() as f64;
        let seen = b.saturating_sub(a) as f64;
        // Counted, not timed: the ratio of two clocks over one interval, whatever its length.
        assert!(
            (0.5..2.0).contains(&(seen / real)),
            "TscClock ({}) measured {seen} ns over {real} ns of Instant",
            if c.uses_tsc() { "tsc" } else { "os" }
        );
        let (x, y) = (coarse_now_ns(), coarse_now_ns());
        assert!(y >= x, "coarse clock went backwards");
        assert!(x > 0);
    }
}
