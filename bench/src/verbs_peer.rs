//! The verbs baseline: perftest's `ib_send_lat` on the same device, in the same run. It
//! prints one-way latency (half a SEND ping-pong); the row doubles its typical value to a
//! round trip and says so.

use crate::cases::{Case, Wait};
use crate::report::Row;
use anyhow::{anyhow, Context, Result};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Runs `ib_send_lat` server and client on `dev` (GID index `gid`, server address `ip`) for
/// `size` bytes; `Wait::Block` adds `-e` (sleep on completion events).
pub fn ib_send_lat(
    dev: &str,
    gid: u8,
    ip: &str,
    port: u16,
    size: usize,
    wait: Wait,
    iters: usize,
) -> Result<Row> {
    let mut args = vec![
        "-d".to_string(),
        dev.into(),
        "-x".into(),
        gid.to_string(),
        "-F".into(),
        "-p".into(),
        port.to_string(),
        "-s".into(),
        size.max(2).to_string(),
        "-n".into(),
        iters.to_string(),
    ];
    if wait == Wait::Block {
        args.push("-e".into());
    }
    let mut server = Command::new("ib_send_lat")
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| anyhow!("cannot start ib_send_lat (apt-get install perftest): {e}"))?;
    std::thread::sleep(Duration::from_millis(500));
    let out = Command::new("ib_send_lat").args(&args).arg(ip).output();
    let _ = server.kill();
    let _ = server.wait();
    let out = out.map_err(|e| anyhow!("ib_send_lat client: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // The result line: #bytes #iterations t_min t_max t_typical t_avg t_stdev p99 p99.9
    let line = text
        .lines()
        .find(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 9 && f[0].parse::<usize>().is_ok() && f[4].parse::<f64>().is_ok()
        })
        .with_context(|| {
            format!(
                "ib_send_lat printed no result: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let f: Vec<f64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    let (typical, p99) = (f[4], f[7]);
    let case = if size == 0 {
        Case::SMALL0
    } else {
        Case::medium(size)
    };
    let mut r = Row::latency_p50(
        "ib_send_lat",
        "rdma",
        wait,
        case,
        2.0 * typical,
        Some(2.0 * p99),
    );
    r.note = format!("2 x one-way t_typical {typical:.2} us ({} B)", size.max(2));
    Ok(r)
}
