//! The other process of the two-process DPDK tests: an Active Messages server on a DPDK
//! device, or a frame switch between the queues of a `net_memif` port.
//!
//! ```text
//! dpdk_peer demo
//! dpdk_peer server --dev net_memif0,role=server,socket=/tmp/am.sock --bind 10.0.0.1:7000
//! dpdk_peer client --dev net_memif0,role=client,socket=/tmp/am.sock --bind 10.0.0.2:7000 --server 10.0.0.1:7000
//! dpdk_peer switch --dev net_memif0,role=server,socket=/tmp/am.sock --queues 12
//! ```
//! `--help` prints all options.

use am_core::{Config, Endpoint, Msg, Tag};
use am_dpdk::frame::{Mac, BROADCAST};
use am_dpdk::sys::{Mbuf, MbufPool, Port, PortSpec};
use am_dpdk::{DpdkConfig, DpdkTransport};
use anyhow::{anyhow, bail, Result};
use clap::{Args, Parser, Subcommand};
use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddrV4;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// dpdk_peer: the second process of am-dpdk's tests
#[derive(Parser)]
#[command(
    name = "dpdk_peer",
    after_help = "A device (--dev) is a DPDK virtual device, NAME[,ARGS]: \
                  net_memif0,role=server,socket=PATH.\n\
                  Prints `ready` (switch) or `listening ADDR tag N` (server) once the port is \
                  started."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a server process on net_memif, run the client against it (small, medium and a
    /// 64 MiB bulk, each verified, then 10000 round trips), stop
    Demo {
        /// Round trips to time
        #[arg(long, value_name = "N", default_value_t = 10000)]
        count: u64,
    },
    /// Verify small, medium and bulk exchanges with a server, then time N round trips
    Client(ClientArgs),
    /// An AM endpoint: handler 1 echoes a request (args and payload), 2 takes a one-way
    /// message, 3 answers a bulk request with the length and FNV-1a hash of the bytes
    Server(ServerArgs),
    /// A learning Ethernet switch between the N queue pairs of the device: each queue is
    /// one node of the other process (am_testkit::dpdk::Fabric::Queues)
    Switch(SwitchArgs),
}

/// The DPDK device of a command.
#[derive(Args)]
struct Dev {
    /// A DPDK virtual device, NAME[,ARGS]: net_memif0,role=server,socket=PATH
    #[arg(long, value_name = "SPEC")]
    dev: String,
}

/// The endpoint options of `server` and `client`.
#[derive(Args)]
struct PeerArgs {
    #[command(flatten)]
    dev: Dev,
    /// This endpoint's IPv4 address and UDP port
    #[arg(long, value_name = "IP:PORT")]
    bind: SocketAddrV4,
    /// The MAC to use (default: made from the address), aa:bb:cc:dd:ee:ff
    #[arg(long, value_name = "MAC", value_parser = parse_mac)]
    mac: Option<Mac>,
    /// Spin while waiting instead of sleeping (lowest latency, a core busy)
    #[arg(long)]
    busy_poll: bool,
}

#[derive(Args)]
struct ServerArgs {
    #[command(flatten)]
    ep: PeerArgs,
    /// This endpoint's tag, the capability clients must present
    #[arg(long, value_name = "N", default_value_t = 7)]
    tag: u64,
    /// Bulk segment size in MiB
    #[arg(long, value_name = "N", default_value_t = 64)]
    segment_mib: usize,
    /// Print `handled SEQ` for each one-way message (handler 2)
    #[arg(long)]
    log_handled: bool,
    /// Exit after N seconds; it also exits when its parent does
    #[arg(long, value_name = "N", default_value_t = 600)]
    seconds: u64,
}

#[derive(Args)]
struct ClientArgs {
    #[command(flatten)]
    ep: PeerArgs,
    /// The server's IPv4 address and UDP port
    #[arg(long, value_name = "IP:PORT")]
    server: SocketAddrV4,
    /// The server's tag
    #[arg(long, value_name = "N", default_value_t = 7)]
    server_tag: u64,
    /// Round trips to time
    #[arg(long, value_name = "N", default_value_t = 10000)]
    count: u64,
}

#[derive(Args)]
struct SwitchArgs {
    #[command(flatten)]
    dev: Dev,
    /// Queue pairs of the device, one per node of the other process
    #[arg(long, value_name = "N", default_value_t = 12)]
    queues: u16,
    /// Exit after N seconds; it also exits when its parent does
    #[arg(long, value_name = "N", default_value_t = 600)]
    seconds: u64,
}

fn main() {
    let r = match Cli::parse().command {
        Cmd::Server(a) => server(&a),
        Cmd::Switch(a) => switch(&a),
        Cmd::Client(a) => client(&a),
        Cmd::Demo { count } => demo(count),
    };
    if let Err(e) = r {
        eprintln!("dpdk_peer: {e}");
        std::process::exit(2);
    }
}

/// Exits when the time is up or the parent is gone (the test that started us died).
struct Lifetime {
    until: Instant,
    parent: libc::pid_t,
    checked: Instant,
}

impl Lifetime {
    fn new(seconds: u64) -> Lifetime {
        Lifetime {
            until: Instant::now() + Duration::from_secs(seconds),
            // SAFETY: getppid has no preconditions.
            parent: unsafe { libc::getppid() },
            checked: Instant::now(),
        }
    }
    fn over(&mut self) -> bool {
        let now = Instant::now();
        if now - self.checked < Duration::from_millis(100) {
            return false;
        }
        self.checked = now;
        // SAFETY: getppid has no preconditions.
        now >= self.until || unsafe { libc::getppid() } != self.parent
    }
}

fn parse_mac(s: &str) -> Result<Mac> {
    let v: Vec<u8> = s
        .split(':')
        .map(|x| u8::from_str_radix(x, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| anyhow!("--mac {s}: use aa:bb:cc:dd:ee:ff"))?;
    v.try_into().map_err(|_| anyhow!("--mac {s}: six bytes"))
}

/// The transport of `server` and `client`: `--dev` at `--bind`, `--mac` or one made from
/// the address, `--busy-poll`.
fn open_transport(a: &PeerArgs) -> Result<DpdkTransport> {
    let mut cfg = DpdkConfig::new(a.bind);
    cfg.busy_poll = a.busy_poll;
    cfg.mac = Some(a.mac.unwrap_or_else(|| am_dpdk::mac_for(*a.bind.ip())));
    Ok(DpdkTransport::open(&a.dev.dev, cfg)?)
}

fn server(a: &ServerArgs) -> Result<()> {
    let t = open_transport(&a.ep)?;
    let cfg = Config {
        tag: Tag(a.tag),
        segment_bytes: a.segment_mib << 20,
        ..Config::default()
    };
    let mut ep = Endpoint::try_new(t, cfg)?;
    am_testkit::peer::pingpong_handlers(&mut ep, a.log_handled)?;
    println!("listening {} tag {}", ep.name().addr, ep.tag().0);
    let _ = std::io::stdout().flush();
    let mut life = Lifetime::new(a.seconds);
    while !life.over() {
        ep.poll(256)?;
        ep.wait(Some(Duration::from_millis(50)))?;
    }
    Ok(())
}

fn demo(count: u64) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("dpdk-peer-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| anyhow!("create {}: {e}", dir.display()))?;
    let sock = dir.join("memif.sock");
    let exe = std::env::current_exe()?;
    let mut child = std::process::Command::new(exe)
        .args(["server", "--busy-poll", "--bind", "10.0.0.1:7000", "--dev"])
        .arg(format!("net_memif0,role=server,socket={}", sock.display()))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| anyhow!("cannot start the server process: {e}"))?;
    let line = child
        .stdout
        .take()
        .and_then(|o| std::io::BufRead::lines(std::io::BufReader::new(o)).next())
        .and_then(Result::ok)
        .unwrap_or_default();
    println!("server process {}: {line}", child.id());
    let dev = format!("net_memif0,role=client,socket={}", sock.display());
    let count = count.to_string();
    let r = Cli::try_parse_from([
        "dpdk_peer",
        "client",
        "--dev",
        &dev,
        "--bind",
        "10.0.0.2:7000",
        "--server",
        "10.0.0.1:7000",
        "--busy-poll",
        "--count",
        &count,
    ])
    .map_err(anyhow::Error::from)
    .and_then(|cli| match cli.command {
        Cmd::Client(a) => client(&a),
        _ => bail!("not the client"),
    });
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    r
}

/// An answer: its arguments and payload.
type Answer = (Vec<u64>, Vec<u8>);

fn client(a: &ClientArgs) -> Result<()> {
    let (server, count) = (a.server, a.count);
    let t = open_transport(&a.ep)?;
    let start = Instant::now();
    while !t.link_up() {
        if start.elapsed() > Duration::from_secs(15) {
            bail!("the link did not come up in 15 s: is the server running?");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    println!(
        "port {} ({}) up, wait: {}",
        t.port_info().name,
        t.port_info().driver,
        t.wait_mode()
    );
    let mut ep = Endpoint::try_new(
        t,
        Config {
            tag: Tag(1),
            segment_bytes: (64 << 20) + (1 << 20),
            ..Config::default()
        },
    )?;
    ep.map(
        0,
        am_core::EndpointName {
            addr: std::net::SocketAddr::V4(server),
            vnet: 0,
        },
        Tag(a.server_tag),
    )?;
    let got: Arc<Mutex<Vec<Answer>>> = Arc::default();
    for h in [1u16, 3] {
        let g = got.clone();
        ep.register(h, move |_, m| {
            if let Ok(mut v) = g.lock() {
                v.push((m.args.to_vec(), m.payload.to_vec()));
            }
        })?;
    }
    let failed: Arc<Mutex<Option<String>>> = Arc::default();
    let f = failed.clone();
    ep.set_upcall(move |_, u| {
        if let Ok(mut g) = f.lock() {
            g.get_or_insert(format!("{} (to {})", u.code, u.dest));
        }
    });
    let wait_for = |ep: &mut Endpoint<DpdkTransport>, n: usize| -> Result<()> {
        let t0 = Instant::now();
        while got.lock().map(|v| v.len()).unwrap_or(0) < n {
            ep.poll(256)?;
            if let Some(e) = failed.lock().ok().and_then(|g| g.clone()) {
                bail!("a message came back: {e}");
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("no answer in 30 s");
            }
        }
        Ok(())
    };
    ep.request(0, Msg::small(1, &[1, 2, 3]))?;
    wait_for(&mut ep, 1)?;
    let medium: Vec<u8> = (0..6000u32).map(|i| (i * 7) as u8).collect();
    ep.request(0, Msg::medium(1, &[4], &[&medium]))?;
    wait_for(&mut ep, 2)?;
    let bulk: Vec<u8> = (0..64u32 << 20).map(|i| (i ^ (i >> 11)) as u8).collect();
    ep.segment_mut()[..bulk.len()].copy_from_slice(&bulk);
    let t0 = Instant::now();
    ep.request(0, Msg::bulk(3, &[], &[(0, bulk.len())], 0))?;
    wait_for(&mut ep, 3)?;
    let bulk_time = t0.elapsed();
    let v = got.lock().map(|v| v.clone()).unwrap_or_default();
    let ok = v[0] == (vec![1, 2, 3], vec![])
        && v[1] == (vec![4], medium)
        && v[2].0 == vec![bulk.len() as u64, am_testkit::peer::fnv(&bulk)];
    if !ok {
        bail!("an answer differs from what was sent");
    }
    println!(
        "small ok, medium ok, bulk 64 MiB ok ({:.0} MB/s)",
        bulk.len() as f64 / bulk_time.as_secs_f64() / 1e6
    );
    let mut rtts = Vec::with_capacity(count as usize);
    for i in 0..count {
        let t0 = Instant::now();
        ep.request(0, Msg::small(1, &[i]))?;
        wait_for(&mut ep, 4 + i as usize)?;
        rtts.push(t0.elapsed().as_nanos() as u64);
    }
    rtts.sort_unstable();
    if let (Some(&p50), Some(&p99)) = (rtts.get(rtts.len() / 2), rtts.get(rtts.len() * 99 / 100)) {
        println!(
            "{count} round trips: p50 {:.2} us, p99 {:.2} us",
            p50 as f64 / 1000.0,
            p99 as f64 / 1000.0
        );
    }
    Ok(())
}

fn switch(a: &SwitchArgs) -> Result<()> {
    let queues = a.queues;
    let spec = PortSpec {
        queues,
        mbufs: 2047,
        ..PortSpec::default()
    };
    let mut port = Port::open(&a.dev.dev, &spec)?;
    let mut qs = (0..queues)
        .map(|q| port.take_queue(q))
        .collect::<Result<Vec<_>, _>>()?;
    let pool = MbufPool::new(4095)?;
    println!("ready");
    let _ = std::io::stdout().flush();
    let mut life = Lifetime::new(a.seconds);
    let mut table: HashMap<Mac, usize> = HashMap::new();
    let mut rx: Vec<Mbuf> = Vec::new();
    let mut out: Vec<Vec<Mbuf>> = (0..queues).map(|_| Vec::new()).collect();
    let (mut idle, mut dropped) = (0u32, 0u64);
    while !life.over() {
        let mut moved = 0;
        for (i, q) in qs.iter_mut().enumerate() {
            rx.clear();
            moved += q.rx_burst(&mut rx, 64);
            for m in rx.drain(..) {
                let d = m.data();
                if d.len() < 14 {
                    continue;
                }
                let mut dst = [0u8; 6];
                let mut src = [0u8; 6];
                dst.copy_from_slice(&d[..6]);
                src.copy_from_slice(&d[6..12]);
                table.insert(src, i);
                match table.get(&dst) {
                    Some(&j) if dst != BROADCAST && j != i => out[j].push(m),
                    Some(_) if dst != BROADCAST => {}
                    _ => {
                        // Broadcast or unknown: flood to every other queue.
                        for (j, o) in out.iter_mut().enumerate() {
                            if j != i {
                                if let Some(c) = pool.frame(m.data()) {
                                    o.push(c);
                                }
                            }
                        }
                    }
                }
            }
        }
        for (j, o) in out.iter_mut().enumerate() {
            if !o.is_empty() {
                qs[j].tx_burst(o);
                // A queue whose node is gone (not polling) fills up: drop what it refused.
                dropped += o.len() as u64;
                o.clear();
            }
        }
        if moved == 0 {
            idle += 1;
            if idle > 1000 {
                std::thread::sleep(Duration::from_micros(50));
            }
        } else {
            idle = 0;
        }
    }
    eprintln!("dpdk_peer switch: exiting, {dropped} frames dropped");
    Ok(())
}
