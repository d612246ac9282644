//! `coherence-bench`: events per second of the coherence protocol, the state machine alone
//! and the per-core shard loops over AM on UDP, with the scaling from 1 to N shards.

use std::time::Duration;

use am_testkit::cli::{tool_main, Args};
use bench::coherence::{loops, pure, Throughput};
use bench::report::median;

const HELP: &str = "\
coherence-bench: events per second of the coherence protocol

USAGE:
  coherence-bench [OPTIONS]

Measures (1) the pure state machine on one thread (4 clients, a manager and a storage
server exchanging messages through an in-memory queue) and (2) the per-core shard loops:
two nodes with N shards each, every shard its own AM endpoint on UDP loopback, thread s
running shard s of both nodes, busy-polling. An event is a protocol message handled or a
user operation started. Each figure is the median of --runs runs; the scaling row divides
N shards' events/s by 1 shard's, measured in the same run.

OPTIONS:
  --shards LIST     shard counts for the loops, comma separated (default 1,2)
  --runs N          runs per configuration (default 5)
  --seconds S       measured seconds per loop run (default 2)
  --ops N           operations per pure state-machine run (default 2000000)
  --json PATH       also write the results as JSON
  --quick           --runs 3 --seconds 0.5 --ops 300000
  -h, --help        this text
";

fn main() {
    tool_main("coherence-bench", HELP, run);
}

fn run(args: &Args) -> Result<(), String> {
    let quick = args.flag("--quick");
    let runs: usize = args.parse("--runs", if quick { 3 } else { 5 })?;
    let seconds: f64 = args.parse("--seconds", if quick { 0.5 } else { 2.0 })?;
    let ops: u64 = args.parse("--ops", if quick { 300_000 } else { 2_000_000 })?;
    let shards: Vec<usize> = args
        .value("--shards")
        .unwrap_or_else(|| "1,2".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<usize>()
                .map_err(|e| format!("--shards {s}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    if runs == 0 || shards.contains(&0) {
        return Err("--runs and every --shards value must be at least 1".into());
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
    for n in &shards {
        eprintln!("shard loops, {n} shard(s) per node: {runs} runs of {seconds} s");
        let (mut v, mut net, mut opsv) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..runs {
            let t = loops(
                *n,
                8,
                Duration::from_millis(300),
                Duration::from_secs_f64(seconds),
            )
            .map_err(|e| format!("shard loops with {n} shards: {e}"))?;
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
    if let Some(path) = args.value("--json") {
        let json = serde_json::json!({
            "cores": cores,
            "runs": runs,
            "pure_events_per_s": pure_med,
            "pure_events_per_op": per_op,
            "loops": rows.iter().map(|(n, e, net, ops)| serde_json::json!({"shards": n, "events_per_s": e, "network_messages_per_s": net, "ops_per_s": ops, "vs_first": e / base})).collect::<Vec<_>>(),
        });
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&json).unwrap_or_default(),
        )
        .map_err(|e| format!("writing {path}: {e}"))?;
    }
    Ok(())
}
