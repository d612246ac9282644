//! Result rows, ratios against the raw baseline, JSON and Markdown.

use crate::cases::{Case, Class, Wait};
use hdrhistogram::Histogram;
use serde::Serialize;

/// One measured row. `system` is `am` (ours), `raw-udp` (plain sockets) or a peer tool's
/// name; `mode` is `latency`, `bandwidth` or `rate`; `wait` is `poll` or `block`.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Who was measured.
    pub system: String,
    /// `udp`, `sim`, ...
    pub transport: String,
    /// `latency`, `bandwidth` or `rate`.
    pub mode: String,
    /// `poll` or `block`.
    pub wait: Wait,
    /// Message class.
    pub class: Class,
    /// Payload bytes.
    pub size_bytes: usize,
    /// Median round trip (latency mode).
    pub p50_us: Option<f64>,
    /// 99th percentile.
    pub p99_us: Option<f64>,
    /// 99.9th percentile.
    pub p999_us: Option<f64>,
    /// Largest.
    pub max_us: Option<f64>,
    /// Messages per second.
    pub msgs_per_s: f64,
    /// Payload megabytes (10^6 bytes) per second.
    pub mb_per_s: f64,
    /// Samples or messages measured.
    pub samples: u64,
    /// Ours divided by raw UDP in the same mode and wait (latency: p50 ratio, lower is
    /// better; bandwidth and rate: throughput ratio, higher is better).
    pub vs_raw: Option<f64>,
    /// A remark (a missing baseline, a flag).
    pub note: String,
}

impl Row {
    /// A latency row from a histogram of round trips in nanoseconds.
    pub fn latency(
        system: &str,
        transport: &str,
        wait: Wait,
        case: Case,
        h: &Histogram<u64>,
    ) -> Row {
        let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        let mut r = Row::latency_p50(system, transport, wait, case, us(0.5), Some(us(0.99)));
        r.p999_us = Some(us(0.999));
        r.max_us = Some(h.max() as f64 / 1000.0);
        r.samples = h.len();
        r
    }

    /// A latency row from a median round trip in microseconds (and a 99th percentile, when
    /// the tool prints one), as the peers report it.
    pub fn latency_p50(
        system: &str,
        transport: &str,
        wait: Wait,
        case: Case,
        p50_us: f64,
        p99_us: Option<f64>,
    ) -> Row {
        let per_s = if p50_us > 0.0 { 1e6 / p50_us } else { 0.0 };
        Row {
            system: system.into(),
            transport: transport.into(),
            mode: "latency".into(),
            wait,
            class: case.class,
            size_bytes: case.size,
            p50_us: Some(p50_us),
            p99_us,
            p999_us: None,
            max_us: None,
            msgs_per_s: per_s,
            mb_per_s: per_s * case.size as f64 * 2.0 / 1e6,
            samples: 0,
            vs_raw: None,
            note: String::new(),
        }
    }

    /// A throughput row.
    #[allow(clippy::too_many_arguments)]
    pub fn throughput(
        system: &str,
        transport: &str,
        mode: &str,
        wait: Wait,
        case: Case,
        msgs: u64,
        bytes: u64,
        secs: f64,
    ) -> Row {
        let secs = secs.max(1e-9);
        Row {
            system: system.into(),
            transport: transport.into(),
            mode: mode.into(),
            wait,
            class: case.class,
            size_bytes: case.size,
            p50_us: None,
            p99_us: None,
            p999_us: None,
            max_us: None,
            msgs_per_s: msgs as f64 / secs,
            mb_per_s: bytes as f64 / secs / 1e6,
            samples: msgs,
            vs_raw: None,
            note: String::new(),
        }
    }
}

/// The median of `v` (the upper one of an even count); `v` must not be empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Fills `vs_raw` for every row (ours and the peers') that has a raw-udp row of the same
/// mode, wait and size (rate: the raw one-at-a-time rate), and flags raw UDP latency rows
/// more than 15% slower than sockperf in the same wait mode: then the baseline, not we,
/// needs work.
pub fn add_ratios(rows: &mut [Row]) {
    let raws: Vec<Row> = rows
        .iter()
        .filter(|r| r.system == "raw-udp")
        .cloned()
        .collect();
    let sockperf: Vec<Row> = rows
        .iter()
        .filter(|r| r.system == "sockperf")
        .cloned()
        .collect();
    for r in rows
        .iter_mut()
        .filter(|r| r.system == "raw-udp" && r.mode == "latency")
    {
        let peer = sockperf
            .iter()
            .find(|s| s.wait == r.wait && s.size_bytes == r.size_bytes);
        if let Some((x, y)) = peer.and_then(|s| Some((r.p50_us?, s.p50_us?))) {
            if x > 1.15 * y {
                r.note = format!(
                    "FLAG: raw UDP {:.0}% slower than sockperf ({y:.1} us)",
                    (x / y - 1.0) * 100.0
                );
            }
        }
    }
    let verbs: Vec<Row> = rows
        .iter()
        .filter(|r| r.system == "ib_send_lat")
        .cloned()
        .collect();
    for r in rows
        .iter_mut()
        .filter(|r| r.system == "am" && r.transport == "rdma" && r.mode == "latency")
    {
        // Over verbs the baseline is perftest's SEND ping-pong on the same device.
        let base = verbs
            .iter()
            .find(|b| b.wait == r.wait && b.size_bytes == r.size_bytes);
        match base.and_then(|b| Some((r.p50_us?, b.p50_us?))) {
            Some((x, y)) => {
                r.vs_raw = Some(x / y);
                r.note = "vs ib_send_lat round trip (2 x one-way), same device".into();
            }
            None => r.note = "no ib_send_lat row of this size".into(),
        }
    }
    let raw_dpdk: Vec<Row> = rows
        .iter()
        .filter(|r| r.system == "raw-dpdk")
        .cloned()
        .collect();
    for r in rows
        .iter_mut()
        .filter(|r| r.system == "am" && r.transport == "dpdk")
    {
        // Over DPDK the baseline is the raw frame ping-pong (or rate, same window) on the
        // same kind of device in the same run; it busy-polls, so both waits compare to it.
        let base = raw_dpdk.iter().find(|b| {
            b.mode == r.mode && (r.mode == "rate" || b.size_bytes == r.size_bytes.max(1))
        });
        match base {
            Some(b) if r.mode == "latency" => {
                if let (Some(x), Some(y)) = (r.p50_us, b.p50_us) {
                    r.vs_raw = Some(x / y);
                    r.note = "vs raw DPDK frame round trip, net_memif".into();
                }
            }
            Some(b) => {
                r.vs_raw = Some(r.msgs_per_s / b.msgs_per_s.max(1e-9));
                r.note = "vs raw DPDK frames echoed, same window".into();
            }
            None => r.note = "no raw DPDK baseline of this shape".into(),
        }
    }
    for r in rows.iter_mut().filter(|r| {
        r.system != "raw-udp"
            && r.system != "raw-dpdk"
            && r.transport != "sim"
            && r.transport != "rdma"
            && r.transport != "dpdk"
            && r.system != "ib_send_lat"
    }) {
        let base = raws.iter().find(|b| {
            b.mode == r.mode
                && b.wait == r.wait
                && (r.mode == "rate" || b.size_bytes == r.size_bytes.max(1))
        });
        match base {
            Some(b) if r.mode == "latency" => {
                if let (Some(x), Some(y)) = (r.p50_us, b.p50_us) {
                    r.vs_raw = Some(x / y);
                }
            }
            Some(b) if r.mode == "bandwidth" => r.vs_raw = Some(r.mb_per_s / b.mb_per_s.max(1e-9)),
            Some(b) => r.vs_raw = Some(r.msgs_per_s / b.msgs_per_s.max(1e-9)),
            None => {
                if r.note.is_empty() && r.system == "am" {
                    r.note = "no raw baseline of this size".into();
                }
            }
        }
    }
}

fn opt(v: Option<f64>) -> String {
    v.map_or("—".into(), |x| format!("{x:.1}"))
}

/// A Markdown table of the rows.
pub fn markdown(rows: &[Row]) -> String {
    let mut s = String::from(
        "| system | transport | mode | wait | message | p50 us | p99 us | p99.9 us | max us | msgs/s | MB/s | vs raw UDP | note |\n\
         |---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        let case = Case {
            class: r.class,
            size: r.size_bytes,
        };
        let label = if r.system == "raw-udp" && r.class == Class::Small0 {
            "datagram/1 B".to_string()
        } else if r.system == "raw-udp" {
            format!("datagram/{}", crate::cases::human(r.size_bytes))
        } else {
            case.to_string()
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.1} | {} | {} |\n",
            r.system,
            r.transport,
            r.mode,
            r.wait.name(),
            label,
            opt(r.p50_us),
            opt(r.p99_us),
            opt(r.p999_us),
            opt(r.max_us),
            r.msgs_per_s,
            r.mb_per_s,
            r.vs_raw.map_or("—".into(), |x| format!("{x:.2}x")),
            r.note
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lat(system: &str, wait: Wait, size: usize, p50: f64) -> Row {
        let mut h = Histogram::<u64>::new(3).unwrap();
        h.record((p50 * 1000.0) as u64).unwrap();
        Row::latency(
            system,
            "udp",
            wait,
            Case {
                class: Class::Medium,
                size,
            },
            &h,
        )
    }

    #[test]
    fn ratios_and_the_honesty_flag() {
        let mut rows = vec![
            lat("raw-udp", Wait::Poll, 64, 10.0),
            lat("sockperf", Wait::Poll, 64, 5.0),
            lat("am", Wait::Poll, 64, 12.0),
            lat("raw-udp", Wait::Block, 64, 50.0),
            lat("sockperf", Wait::Block, 64, 48.0),
            lat("am", Wait::Block, 4096, 60.0),
        ];
        add_ratios(&mut rows);
        assert!(rows[0].note.starts_with("FLAG"), "{}", rows[0].note);
        assert!(
            rows[3].note.is_empty(),
            "4% slower is within the 15% allowance"
        );
        let am = rows[2].vs_raw.unwrap();
        assert!((am - 1.2).abs() < 0.01, "{am}");
        assert!((rows[1].vs_raw.unwrap() - 0.5).abs() < 0.01);
        assert_eq!(rows[5].vs_raw, None);
        assert_eq!(rows[5].note, "no raw baseline of this size");
        let md = markdown(&rows);
        assert_eq!(md.lines().count(), 2 + rows.len());
        assert!(md.contains("1.20x"));
    }
}
