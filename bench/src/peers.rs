//! The real peers, run in the same run and tabulated beside ours: sockperf, ucx_perftest
//! (UCP active messages over TCP), fi_pingpong (libfabric over UDP and over TCP with
//! RxM) and qperf. Each is started as a server and a client on loopback; its output is
//! parsed into a [`Row`] of round-trip latency (tools that print one-way latency are
//! doubled, and the row says so).

use crate::cases::{Case, Class, Wait};
use crate::report::Row;
use anyhow::{anyhow, bail, Context, Result};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The Debian packages that hold the peers.
pub const PACKAGES: &str = "sockperf ucx-utils libfabric-bin qperf";

/// Checks that every peer tool is installed; the error names the packages.
pub fn check_installed() -> Result<()> {
    let missing: Vec<&str> = ["sockperf", "ucx_perftest", "fi_pingpong", "qperf"]
        .into_iter()
        .filter(|t| {
            !Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {t}"))
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(anyhow!(
            "peer tools missing: {}; install them with `apt-get install -y {PACKAGES}` \
             (or `bash bench/run.sh`, which does), or pass --no-peers",
            missing.join(", ")
        ))
    }
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn server(cmd: &str, args: &[String], env: &[(&str, &str)]) -> Result<Server> {
    let mut c = Command::new(cmd);
    c.args(args).stdout(Stdio::null()).stderr(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    let child = c.spawn().map_err(|e| anyhow!("cannot start {cmd}: {e}"))?;
    std::thread::sleep(Duration::from_millis(400));
    Ok(Server(child))
}

fn client(cmd: &str, args: &[String], env: &[(&str, &str)], limit: Duration) -> Result<String> {
    let mut c = Command::new("timeout");
    c.arg(limit.as_secs().max(1).to_string())
        .arg(cmd)
        .args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let Output {
        status,
        stdout,
        stderr,
    } = c.output().map_err(|e| anyhow!("cannot run {cmd}: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr)
    );
    if status.success() {
        Ok(text)
    } else {
        Err(anyhow!(
            "{cmd} {} failed ({status}): {}",
            args.join(" "),
            text.lines().last().unwrap_or("")
        ))
    }
}

fn row(
    system: &str,
    transport: &str,
    wait: Wait,
    size: usize,
    p50: f64,
    p99: Option<f64>,
    note: &str,
) -> Row {
    let class = if size == 0 {
        Class::Small0
    } else {
        Class::Medium
    };
    let mut r = Row::latency_p50(system, transport, wait, Case { class, size }, p50, p99);
    r.note = note.into();
    r
}

/// The number after `key` on the first line containing it.
fn number_after(text: &str, key: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.contains(key))?;
    let rest = &line[line.find(key)? + key.len()..];
    rest.split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .find(|s| !s.is_empty())
        .and_then(|s| s.parse().ok())
}

fn port(base: u16) -> u16 {
    base + (std::process::id() % 1000) as u16
}

/// sockperf ping-pong (UDP), round trip (`--full-rtt`); `--nonblocked` busy-polls.
pub fn sockperf(wait: Wait, size: usize, secs: u64) -> Result<Row> {
    let p = port(21000).to_string();
    let mut common = vec!["-i".to_string(), "127.0.0.1".into(), "-p".into(), p];
    if wait == Wait::Poll {
        common.push("--nonblocked".into());
    }
    let mut sargs = vec!["server".to_string()];
    sargs.extend(common.clone());
    let _s = server("sockperf", &sargs, &[])?;
    let mut cargs = vec!["ping-pong".to_string()];
    cargs.extend(common);
    cargs.extend([
        "-m".into(),
        size.max(14).to_string(),
        "-t".into(),
        secs.to_string(),
        "--full-rtt".into(),
    ]);
    let out = client("sockperf", &cargs, &[], Duration::from_secs(secs + 20))?;
    let p50 =
        number_after(&out, "percentile 50.000 =").context("sockperf: no median in its output")?;
    let p99 = number_after(&out, "percentile 99.000 =");
    let note = if size < 14 {
        "sockperf's smallest message is 14 B"
    } else {
        ""
    };
    Ok(row("sockperf", "udp", wait, size, p50, p99, note))
}

/// ucx_perftest ucp_am_lat over TCP (UCX_TLS=tcp); UCX polls, and prints one-way latency.
pub fn ucx(size: usize, iters: usize) -> Result<Row> {
    let p = port(22000).to_string();
    let env = [("UCX_TLS", "tcp")];
    let _s = server("ucx_perftest", &["-p".to_string(), p.clone()], &env)?;
    let args = vec![
        "127.0.0.1".to_string(),
        "-p".into(),
        p,
        "-t".into(),
        "ucp_am_lat".into(),
        "-s".into(),
        size.max(1).to_string(),
        "-n".into(),
        iters.to_string(),
    ];
    let out = client("ucx_perftest", &args, &env, Duration::from_secs(60))?;
    // "Final:  <iters>  <p50>  <avg>  <overall> ..." (one-way microseconds)
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("Final:"))
        .context("ucx_perftest: no Final line")?;
    let nums: Vec<f64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let one_way = *nums.get(1).context("ucx_perftest: no median")?;
    Ok(row(
        "ucx_perftest",
        "tcp",
        Wait::Poll,
        size,
        one_way * 2.0,
        None,
        "ucp_am_lat, UCX_TLS=tcp; one-way median x2",
    ))
}

/// fi_pingpong over a libfabric provider; prints one-way time per transfer (average).
pub fn fi_pingpong(provider: &str, size: usize, iters: usize) -> Result<Row> {
    let p = port(23000).to_string();
    let mut common = vec![
        "-p".to_string(),
        provider.into(),
        "-I".into(),
        iters.to_string(),
        "-S".into(),
        size.max(1).to_string(),
        "-B".into(),
        p.clone(),
    ];
    if provider.contains("rxm") {
        common.extend(["-e".into(), "rdm".into()]);
    }
    let _s = server("fi_pingpong", &common, &[])?;
    let mut cargs = common.clone();
    let i = cargs.iter().position(|a| a == "-B").unwrap_or(0);
    cargs[i] = "-P".into();
    cargs.push("127.0.0.1".into());
    let out = client("fi_pingpong", &cargs, &[], Duration::from_secs(60))?;
    // bytes #sent #ack total time MB/sec usec/xfer Mxfers/sec
    let line = out
        .lines()
        .rev()
        .find(|l| {
            l.split_whitespace()
                .next()
                .and_then(|w| w.parse::<usize>().ok())
                .is_some()
        })
        .context("fi_pingpong: no result line")?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let per_xfer: f64 = words
        .get(6)
        .and_then(|w| w.parse().ok())
        .context("fi_pingpong: no usec/xfer")?;
    let name = if provider == "udp" {
        "fi_pingpong-udp"
    } else {
        "fi_pingpong-tcp-rxm"
    };
    let transport = if provider == "udp" { "udp" } else { "tcp" };
    Ok(row(
        name,
        transport,
        Wait::Poll,
        size,
        per_xfer * 2.0,
        None,
        "average one-way per transfer x2",
    ))
}

/// qperf udp_lat (blocking); prints one-way average latency.
pub fn qperf(size: usize, secs: u64) -> Result<Row> {
    let p = port(24000).to_string();
    let _s = server("qperf", &["-lp".to_string(), p.clone()], &[])?;
    let args = vec![
        "127.0.0.1".to_string(),
        "-lp".into(),
        p,
        "-m".into(),
        size.max(1).to_string(),
        "-t".into(),
        secs.to_string(),
        "udp_lat".into(),
    ];
    let out = client("qperf", &args, &[], Duration::from_secs(secs + 20))?;
    let v = number_after(&out, "latency").context("qperf: no latency")?;
    let us = if out.contains(" ms") {
        v * 1000.0
    } else if out.contains(" ns") {
        v / 1000.0
    } else {
        v
    };
    Ok(row(
        "qperf",
        "udp",
        Wait::Block,
        size,
        us * 2.0,
        None,
        "udp_lat; average one-way x2",
    ))
}

/// Runs every peer at `sizes`; a peer that fails at one size (fi_pingpong's udp provider
/// takes no 4 KiB message) is reported in the progress log and has no row there; a peer
/// that fails at every size is an error.
pub fn run_all(
    sizes: &[usize],
    waits: &[Wait],
    quick: bool,
    progress: &dyn Fn(&str),
) -> Result<Vec<Row>> {
    let secs = if quick { 1 } else { 3 };
    let iters = if quick { 5_000 } else { 20_000 };
    let mut rows = Vec::new();
    type Job<'a> = (String, Box<dyn Fn(usize) -> Result<Row> + 'a>);
    let mut jobs: Vec<Job<'_>> = Vec::new();
    for &w in waits {
        jobs.push((
            format!("sockperf {}", w.name()),
            Box::new(move |s| sockperf(w, s, secs)),
        ));
    }
    if waits.contains(&Wait::Poll) {
        jobs.push(("ucx_perftest".into(), Box::new(move |s| ucx(s, iters))));
        jobs.push((
            "fi_pingpong udp".into(),
            Box::new(move |s| fi_pingpong("udp", s, iters)),
        ));
        jobs.push((
            "fi_pingpong tcp;ofi_rxm".into(),
            Box::new(move |s| fi_pingpong("tcp;ofi_rxm", s, iters)),
        ));
    }
    if waits.contains(&Wait::Block) {
        jobs.push(("qperf".into(), Box::new(move |s| qperf(s, secs))));
    }
    for (name, job) in jobs {
        let start = Instant::now();
        let mut ok = 0;
        let mut last_err = String::new();
        for &s in sizes {
            match job(s) {
                Ok(r) => {
                    progress(&format!(
                        "{name} {s} B: round trip {:.1} us",
                        r.p50_us.unwrap_or(0.0)
                    ));
                    rows.push(r);
                    ok += 1;
                }
                Err(e) => {
                    progress(&format!("{name} {s} B: {e}"));
                    last_err = e.to_string();
                }
            }
        }
        if ok == 0 {
            bail!("peer {name} could not be run: {last_err}");
        }
        progress(&format!(
            "{name}: {ok} of {} sizes in {:.1} s",
            sizes.len(),
            start.elapsed().as_secs_f64()
        ));
    }
    Ok(rows)
}
