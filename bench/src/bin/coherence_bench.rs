//! `coherence-bench`: events per second of the coherence protocol, the state machine alone
//! and the per-core shard loops over AM on UDP, with the scaling from 1 to N shards.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use bench::coherence::{loops, pure, Throughput};
use bench::report::median;
use clap::Parser;

/// coherence-bench: events per second of the coherence protocol
///
/// Measures (1) the pure state machine on one thread (4 clients, a manager and a storage
/// server exchanging messages through an in-memory queue) and (2) the per-core shard loops:
/// two nodes with N shards each, every shard its own AM endpoint on UDP loopback, thread s
/// running shard s of both nodes, busy-polling. An event is a protocol message handled or a
/// user operation started. Each figure is the median of --runs runs; the scaling row divides
/// N shards' events/s by 1 shard's, measured in the same run.
#[derive(Parser)]
#[command(name = "coherence-bench")]
struct Cli {
    /// Shard counts for the loops, comma separated
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "1,2",
        value_parser = |s: &str| s.trim().parse::<usize>()
    )]
    shards: Vec<usize>,
    /// Runs per configuration [default: 5; --quick 3]
    #[arg(long, value_name = "N")]
    runs: Option<usize>,
    /// Measured seconds per loop run [default: 2; --quick 0.5]
    #[arg(long, value_name = "S")]
    seconds: Option<f64>,
    /// Operations per pure state-machine run [default: 2000000; --quick 300000]
    #[arg(long, value_name = "N")]
    ops: Option<u64>,
    /// Also write the results as JSON
    #[arg(long, value_name = "PATH")]
    json: Option<String>,
    /// --runs 3 --seconds 0.5 --ops 300000
    #[arg(long)]
    quick: bool,
}

fn main() {
    if let Err(e) = run(&Cli::parse()) {
        eprintln!("coherence-bench: {e}");
        std::process::exit(2);
    }
}

fn run(args: &Cli) -> Result<()> {
    let quick = args.quick;
    let runs: usize = args.runs.unwrap_or(if quick { 3 } else { 5 });
    let seconds: f64 = args.seconds.unwrap_or(if quick { 0.5 } else { 2.0 });
    let ops: u64 = args.ops.unwrap_or(if quick { 300_000 } else { 2_000_000 });
    let shards = &args.shards;
    if runs == 0 || shards.contains(&0) {
        bail!("--runs and every --shards value must be at least 1");
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("coherence-bench: {cores} cores, {runs} runs per row");

    eprintln!("pure state machine: {runs} runs of {ops} operations");
    let mut pure_eps = Vec::new();
    let mut pure_last = None;
    for r in 0..runs {
        let t = pure(4, 64, 4, ops, r as u64);
        eprintln!("  run {}: {:.2} M events/s", r + 1, t.events_per_s() / 1e6);
        pure_eps.push(t.events_per_s());
        pure_last = Some(t);
    }
    let pure_med = median(pure_eps);
    let per_op = pure_last.map_or(0.0, |t: Throughput| t.events as f64 / t.ops.max(1) as f64);

    let mut rows = Vec::new();
    for n in shards {
        eprintln!("shard loops, {n} shard(s) per node: {runs} runs of {seconds} s");
        let (mut v, mut net, mut opsv) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..runs {
            let t = loops(
                *n,
                8,
                Duration::from_millis(300),
                Duration::from_secs_f64(seconds),
            )
            .map_err(|e| anyhow!("shard loops with {n} shards: {e}"))?;
            eprintln!(
                "  run {}: {:.3} M events/s, {:.0} ops/s, {:.0} network messages/s",
                r + 1,
                t.events_per_s() / 1e6,
                t.ops as f64 / t.seconds,
                t.remote as f64 / t.seconds
            );
            v.push(t.events_per_s());
            net.push(t.remote as f64 / t.seconds);
            opsv.push(t.ops as f64 / t.seconds);
        }
        rows.push((*n, median(v), median(net), median(opsv)));
    }
    let base = rows.first().map_or(1.0, |r| r.1);
    println!();
    println!("| what | threads | events/s (median) | events/s per thread | operations/s | network messages/s | vs first loop row |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| state machine alone ({per_op:.1} events per operation) | 1 | {:.2} M | {:.2} M | {:.2} M | | |",
        pure_med / 1e6,
        pure_med / 1e6,
        pure_med / per_op.max(1.0) / 1e6
    );
    for (n, eps, net, ops) in &rows {
        println!(
            "| shard loops, AM over UDP loopback, {n} shard(s) x 2 nodes | {n} | {:.3} M | {:.3} M | {:.0} k | {:.0} k | {:.2}x |",
            eps / 1e6,
            eps / *n as f64 / 1e6,
            ops / 1e3,
            net / 1e3,
            eps / base
        );
    }
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "cores": cores,
            "runs": runs,
            "pure_events_per_s": pure_med,
            "pure_events_per_op": per_op,
            "loops": rows.iter().map(|(n, e, net, ops)| serde_json::json!({"shards": n, "events_per_s": e, "network_messages_per_s": net, "ops_per_s": ops, "vs_first": e / base})).collect::<Vec<_>>(),
        });
        std::fs::write(
            path,
            serde_json::to_string_pretty(&json).unwrap_or_default(),
        )
        .map_err(|e| anyhow!("writing {path}: {e}"))?;
    }
    Ok(())
}
