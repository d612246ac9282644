//! `clean-bench`: write amplification and foreground throughput of the log cleaner under a
//! hot/cold workload at several disk utilisations, cost-benefit against greedy, and
//! against the same writes on an empty device (no cleaning) as the throughput baseline.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use bench::report::median;
use clap::Parser;
use xfs_node::coherence::NodeId;
use xfs_node::storage::cleaner::{
    self, CleanerConfig, Command, Group, GroupError, Leader, Policy, Reply,
};
use xfs_node::storage::fragment::SharedStore;
use xfs_node::storage::log::{Log, SegmentReader, StripeGroup, SUMMARY_BYTES};
use xfs_node::storage::uring::{UringOptions, UringStore};

/// clean-bench: the log cleaner's write amplification and foreground throughput
///
/// One log striped over three io_uring stores (2 data + 1 parity, files in --dir), a cleaner
/// leader on its own thread, and a writer that first fills --util of the capacity with 4 KiB
/// blocks, then overwrites them (90% of the writes to 10% of the blocks) until it has
/// written --times the capacity, fsyncing every two segments' worth of blocks. Each
/// utilisation runs with the cost-benefit and the greedy policy, and once more on devices
/// large enough that the cleaner never runs (the throughput baseline). Medians of --runs
/// runs.
#[derive(Parser)]
#[command(name = "clean-bench")]
struct Cli {
    /// Where the device files go (not tmpfs: O_DIRECT)
    #[arg(long, value_name = "DIR", default_value = "/var/tmp")]
    dir: String,
    /// Size of each device file, MiB
    #[arg(long, value_name = "N", default_value_t = 48)]
    mb: u64,
    /// Disk utilisations, comma-separated, each between 0.05 and 0.95
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "0.5,0.75,0.9",
        value_parser = utilisation
    )]
    util: Vec<f64>,
    /// Overwrite phase writes X times the capacity
    #[arg(long, value_name = "X", default_value_t = 2.0)]
    times: f64,
    /// Runs per configuration
    #[arg(long, value_name = "N", default_value_t = 3)]
    runs: usize,
    /// The cleaner's share of the time
    #[arg(long, value_name = "X", default_value_t = 0.3)]
    share: f64,
    /// Write clean-bench.{md,json} there
    #[arg(long, value_name = "DIR", default_value = "bench/results")]
    out: String,
}

/// One value of `--util`.
fn utilisation(u: &str) -> Result<f64> {
    let v = u
        .trim()
        .parse::<f64>()
        .map_err(|e| anyhow!("--util {u}: {e}"))?;
    if (0.05..=0.95).contains(&v) {
        Ok(v)
    } else {
        Err(anyhow!("--util {v}: use values between 0.05 and 0.95"))
    }
}

fn main() {
    if let Err(e) = run(&Cli::parse()) {
        eprintln!("clean-bench: {e}");
        std::process::exit(2);
    }
}

type Shared = SharedStore<UringStore>;

type SharedLog = Arc<Mutex<Option<Log<Shared>>>>;

struct Local {
    log: SharedLog,
    reader: Mutex<Option<SegmentReader<Shared>>>,
}

impl Group for &Local {
    fn call(&mut self, writer: NodeId, cmd: &Command) -> Result<Reply, GroupError> {
        Ok(cleaner::run(&self.log, &self.reader, writer, cmd))
    }
}

#[derive(Clone, Debug, serde::Serialize)]
struct Outcome {
    util: f64,
    policy: String,
    user_mib_s: f64,
    write_amplification: f64,
    segments_cleaned: u64,
    cleaned_utilisation: f64,
    enospc: bool,
}

fn lock<X>(m: &Mutex<X>) -> std::sync::MutexGuard<'_, X> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One run: fill `util` of the capacity, then overwrite `times` the capacity, hot/cold.
fn one(
    dir: &str,
    mb: u64,
    util: f64,
    times: f64,
    cfg: Option<CleanerConfig>,
    seed: u64,
) -> Result<Outcome> {
    let stores: Vec<Shared> = (0..3)
        .map(|i| {
            let path = format!("{dir}/clean-bench-{}-{i}.img", std::process::id());
            let _ = std::fs::remove_file(&path);
            let s = UringStore::open(
                &path,
                UringOptions {
                    fragment_bytes: 64 * 1024,
                    depth: 16,
                    create_bytes: Some(mb << 20),
                },
            );
            let _ = std::fs::remove_file(&path); // the open file stays until dropped
            s.map(|s| SharedStore(Arc::new(Mutex::new(s))))
                .map_err(|e| anyhow!("{path}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let group = StripeGroup {
        id: 0,
        servers: vec![1, 2, 3],
        parity: 1,
    };
    let log = Log::new(1, group.clone(), stores.iter().cloned().map(Some).collect())?;
    let slots = lock(&stores[0].0).slots() as u64;
    let payload = (2 * 64 * 1024 - SUMMARY_BYTES) as u64;
    // Capacity in blocks: the baseline run uses the same numbers of blocks as the run
    // with cleaning at this utilisation, on devices 8x larger.
    let capacity_blocks = slots * (payload / 4096);
    let local = Arc::new(Local {
        log: Arc::new(Mutex::new(Some(log))),
        reader: Mutex::new(
            SegmentReader::new(group, stores.iter().cloned().map(Some).collect()).ok(),
        ),
    });
    let blocks = ((capacity_blocks as f64) * util) as u64;
    let scale = if cfg.is_none() { 8 } else { 1 };
    let live_blocks = blocks / scale;
    let total = (capacity_blocks as f64 * times) as u64 / scale;
    let stop = Arc::new(AtomicBool::new(false));
    let clock = Arc::new(AtomicU64::new(0));
    {
        let c = clock.clone();
        if let Some(l) = lock(&local.log).as_mut() {
            l.set_clock(Box::new(move || c.load(Ordering::Relaxed)));
        }
    }
    let policy = cfg.as_ref().map(|c| c.policy);
    let cleaner_thread = cfg.map(|cfg| {
        let (local, stop, clock) = (local.clone(), stop.clone(), clock.clone());
        std::thread::spawn(move || {
            let mut leader = Leader::new(cfg.clone());
            let mut traced = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let now = clock.load(Ordering::Relaxed);
                let n = leader.round(&mut &*local, &[1], now, &mut |d| {
                    std::thread::sleep(cfg.pause(d))
                });
                if n == 0 {
                    std::thread::sleep(Duration::from_millis(2));
                }
                if std::env::var_os("CLEAN_BENCH_TRACE").is_some()
                    && traced.elapsed() > Duration::from_secs(1)
                {
                    traced = Instant::now();
                    let d = lock(&local.log)
                        .as_ref()
                        .map(|l| l.describe())
                        .unwrap_or_default();
                    eprintln!("{:?}\n  {d}", leader.status);
                }
            }
            leader.status
        })
    });
    let mut x = seed | 1;
    let mut rnd = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let block = vec![0x5au8; 4096];
    let mut enospc = false;
    // fsync every two segments' worth of blocks (a partial segment per fsync would waste
    // space that is not the cleaner's to win back).
    let sync_every = 2 * (payload / 4096);
    let write = |b: u64| -> Result<()> {
        let mut g = lock(&local.log);
        let l = g.as_mut().context("no log")?;
        Ok(l.write(b, &block)?)
    };
    // Fill, sequentially.
    for b in 0..live_blocks {
        write(b)?;
        if b % sync_every == sync_every - 1 {
            lock(&local.log).as_mut().context("no log")?.fsync()?;
        }
    }
    if let Some(l) = lock(&local.log).as_mut() {
        l.checkpoint()?;
    }
    // Overwrite, hot/cold: 90% of the writes to the first 10% of the blocks.
    let hot = (live_blocks / 10).max(1);
    let t = Instant::now();
    let mut done = 0u64;
    while done < total {
        let b = if rnd(10) < 9 {
            rnd(hot)
        } else {
            hot + rnd(live_blocks - hot)
        };
        write(b)?;
        done += 1;
        if done.is_multiple_of(sync_every) {
            clock.store(done, Ordering::Relaxed);
            // A full device: wait for the cleaner (up to 30 s), as the node's writers do.
            let mut waited = 0;
            loop {
                let r = lock(&local.log).as_mut().context("no log")?.fsync();
                match r {
                    Ok(()) => break,
                    Err(e) if e.to_string().contains("ENOSPC") && waited < 3000 => {
                        std::thread::sleep(Duration::from_millis(10));
                        waited += 1;
                    }
                    Err(e) => {
                        enospc = e.to_string().contains("ENOSPC");
                        if !enospc {
                            return Err(e.into());
                        }
                        break;
                    }
                }
            }
            if enospc {
                break;
            }
        }
    }
    let secs = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let status = cleaner_thread.map(|h| h.join().unwrap_or_default());
    let (moved, cleaned, moved_blocks) = status.as_ref().map_or((0, 0, 0), |s| {
        (s.bytes_moved, s.segments_cleaned, s.blocks_moved)
    });
    let user = done * 4096;
    Ok(Outcome {
        util,
        policy: match policy {
            None => "none (empty device)".into(),
            Some(Policy::CostBenefit) => "cost-benefit".into(),
            Some(Policy::Greedy) => "greedy".into(),
        },
        user_mib_s: user as f64 / secs / (1 << 20) as f64,
        write_amplification: (user + moved) as f64 / user as f64,
        segments_cleaned: cleaned,
        cleaned_utilisation: if cleaned == 0 {
            0.0
        } else {
            (moved_blocks * 4096) as f64 / (cleaned * payload) as f64
        },
        enospc,
    })
}

fn run(args: &Cli) -> Result<()> {
    let (dir, out) = (&args.dir, &args.out);
    let (mb, times, runs, share) = (args.mb, args.times, args.runs, args.share);
    let utils = &args.util;
    let mut table = Vec::new();
    let mut all = Vec::new();
    for util in utils {
        let mut rows: Vec<(String, Vec<Outcome>)> = Vec::new();
        for policy in [None, Some(Policy::CostBenefit), Some(Policy::Greedy)] {
            let mut v = Vec::new();
            for r in 0..runs {
                let cfg = policy.map(|p| CleanerConfig {
                    policy: p,
                    share,
                    idle_ms: u64::MAX,
                    ..CleanerConfig::default()
                });
                // The baseline: the same blocks on devices 8x larger (no cleaning).
                let o = one(
                    dir,
                    if policy.is_none() { mb * 8 } else { mb },
                    *util,
                    times,
                    cfg,
                    7 + r as u64,
                )?;
                eprintln!(
                    "util {util}: {}: {:.1} MiB/s, write amplification {:.2}, {} segments cleaned{}",
                    o.policy,
                    o.user_mib_s,
                    o.write_amplification,
                    o.segments_cleaned,
                    if o.enospc { ", ENOSPC" } else { "" }
                );
                v.push(o);
            }
            rows.push((v[0].policy.clone(), v));
        }
        let base = median(rows[0].1.iter().map(|o| o.user_mib_s).collect());
        for (name, v) in &rows {
            let mibs = median(v.iter().map(|o| o.user_mib_s).collect());
            let wa = median(v.iter().map(|o| o.write_amplification).collect());
            let cu = median(v.iter().map(|o| o.cleaned_utilisation).collect());
            let cleaned = median(v.iter().map(|o| o.segments_cleaned as f64).collect());
            let enospc = v.iter().filter(|o| o.enospc).count();
            table.push(format!(
                "| {:.0}% | {name} | {mibs:.1} | {:.2}x | {wa:.2} | {cleaned:.0} | {:.0}% | {enospc} |",
                util * 100.0,
                mibs / base,
                cu * 100.0
            ));
        }
        all.extend(rows.into_iter().flat_map(|(_, v)| v));
    }
    let md = format!(
        "| utilisation | policy | foreground MiB/s | vs empty device | write amplification | segments cleaned | cleaned segments' utilisation | runs with ENOSPC |\n|---|---|---:|---:|---:|---:|---:|---:|\n{}\n",
        table.join("\n")
    );
    println!("{md}");
    std::fs::create_dir_all(out).map_err(|e| anyhow!("{out}: {e}"))?;
    std::fs::write(format!("{out}/clean-bench.md"), &md)?;
    std::fs::write(
        format!("{out}/clean-bench.json"),
        serde_json::to_string_pretty(&all).unwrap_or_default(),
    )?;
    Ok(())
}
