//! `am-bench`: Active Messages microbenchmarks against raw UDP (and, over RDMA, against
//! perftest's `ib_send_lat`) in the same run.

use am_core::sim::{Faults, SimNet};
use am_core::{Endpoint, EndpointName, Tag};
use am_dpdk::{DpdkConfig, DpdkTransport};
use am_rdma::{RdmaConfig, RdmaTransport};
use am_udp::{UdpConfig, UdpTransport};
use anyhow::{anyhow, bail, Context, Result};
use bench::am_side::{self, AmClient};
use bench::cases::{bandwidth_cases, latency_cases, Case, Wait};
use bench::dpdk_raw;
use bench::raw::{self, RawClient};
use bench::report::{add_ratios, markdown, Row};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

const ROWS: &str = "\
Rows: {system, transport, mode, wait, size_bytes, p50_us, p99_us, msgs_per_s, mb_per_s, ...}
with system `am`, `raw-udp` or a peer's name, mode `latency`, `bandwidth` or `rate`, wait `poll` or
`block`. `vs raw UDP` is ours over raw UDP in the same mode and wait: latency lower is
better, bandwidth and rate higher is better.";

/// am-bench: Active Messages microbenchmarks against raw UDP in the same run
///
/// Without a command (or with `local`), starts servers as child processes on loopback and
/// measures; `server` and `client` run the two sides on different machines.
#[derive(Parser)]
#[command(
    name = "am-bench",
    args_conflicts_with_subcommands = true,
    args_override_self = true,
    after_help = ROWS
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    local: LocalArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start servers as child processes on loopback and measure (the default)
    #[command(after_help = ROWS)]
    Local(LocalArgs),
    /// Serve one system; prints `listening ADDR` (dpdk: on the DPDK device SPEC, e.g.
    /// net_memif0,role=server,socket=PATH; --bind IP:PORT is its address)
    Server(ServerArgs),
    /// Measure a server started elsewhere
    #[command(after_help = ROWS)]
    Client(ClientArgs),
}

/// What to measure.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ModeArg {
    /// Round-trip latency
    Latency,
    /// Streaming bandwidth
    Bandwidth,
    /// Small-message rate
    Rate,
    /// latency, bandwidth and rate
    All,
}

/// How the sides wait.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum WaitArg {
    /// Busy-polling
    Poll,
    /// Sleeping in epoll
    Block,
    /// poll, then block
    Both,
}

/// Where `am` runs.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TransportArg {
    /// Over am-udp
    Udp,
    /// The engine alone over the in-process simulator (no syscalls)
    Sim,
    /// Over am-rdma on verbs, beside perftest's ib_send_lat on the same device (needs a
    /// device whose netdev has $AM_RDMA_ADDR, default 10.99.0.1: run it in the SoftRoCE
    /// VM, bench/run-verbs.sh)
    Rdma,
    /// Over am-dpdk on net_memif between two processes, beside a raw DPDK ping-pong (same
    /// bindings, no AM) over memif in the same run
    Dpdk,
    /// udp,sim
    All,
}

/// The system a server serves or a client measures.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SystemArg {
    /// Active Messages
    Am,
    /// Raw UDP sockets (dpdk: raw frames reflected)
    Raw,
}

/// The transport of `am-bench server`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ServerTransport {
    /// am-udp (raw: a UDP socket)
    Udp,
    /// am-rdma on verbs
    Rdma,
    /// am-dpdk on the device --dev
    Dpdk,
}

/// The options of the measuring commands (`local` and `client`).
#[derive(Args)]
struct OptsArgs {
    /// What to measure (a comma list runs several)
    #[arg(
        long,
        value_enum,
        value_name = "MODE",
        value_delimiter = ',',
        default_value = "all"
    )]
    mode: Vec<ModeArg>,
    /// Busy-polling, sleeping in epoll, or both
    #[arg(long, value_enum, default_value_t = WaitArg::Both)]
    wait: WaitArg,
    /// Where to run AM (a comma list runs several, e.g. dpdk,udp)
    #[arg(
        long,
        value_enum,
        value_name = "TRANSPORT",
        value_delimiter = ',',
        default_value = "all"
    )]
    transport: Vec<TransportArg>,
    /// Fewer sizes and samples: under a minute
    #[arg(long)]
    quick: bool,
    /// Latency samples per row [default: 20000; --quick 2000]
    #[arg(long, value_name = "N")]
    iters: Option<usize>,
    /// Round trips discarded first [default: 2000; --quick 200]
    #[arg(long, value_name = "N")]
    warmup: Option<usize>,
    /// Requests in flight in rate mode
    #[arg(long, value_name = "N", default_value_t = 32)]
    outstanding: u64,
    /// Path MTU for am-udp
    #[arg(long, value_name = "N", default_value_t = 1500)]
    mtu: usize,
    /// Let am-udp take GRO-coalesced receives (UDP_GRO): more throughput, slower small
    /// round trips
    #[arg(long)]
    gro: bool,
    /// MiB streamed per bandwidth row [default: 256; --quick 64]
    #[arg(long, value_name = "N")]
    bw_mib: Option<usize>,
    /// Skip messages larger than N bytes
    #[arg(long, value_name = "N")]
    max_size: Option<usize>,
    /// Results folder: am-bench.json, am-bench.md and latency.png
    #[arg(long, value_name = "DIR", default_value = "bench/results")]
    out: PathBuf,
    /// JSON rows [default: DIR/am-bench.json]
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct LocalArgs {
    #[command(flatten)]
    opts: OptsArgs,
    /// Skip the external peers (sockperf, ucx_perftest, fi_pingpong, qperf); without it a
    /// missing or failing peer is an error (install: apt-get install -y sockperf ucx-utils
    /// libfabric-bin qperf)
    #[arg(long)]
    no_peers: bool,
}

#[derive(Args)]
struct ClientArgs {
    /// The system the server serves
    #[arg(long, value_enum)]
    system: SystemArg,
    /// The server's address
    #[arg(long, value_name = "ADDR")]
    server: SocketAddr,
    #[command(flatten)]
    opts: OptsArgs,
}

#[derive(Args)]
struct ServerArgs {
    /// The system to serve
    #[arg(long, value_enum)]
    system: SystemArg,
    /// The transport
    #[arg(long, value_enum, default_value_t = ServerTransport::Udp)]
    transport: ServerTransport,
    /// Busy-polling or sleeping in epoll
    #[arg(long, value_parser = ["poll", "block"], default_value = "block")]
    wait: String,
    /// Address to listen on [default: 127.0.0.1:0; dpdk: required, IP:PORT]
    #[arg(long, value_name = "ADDR")]
    bind: Option<SocketAddr>,
    /// Path MTU for am-udp
    #[arg(long, value_name = "N", default_value_t = 1500)]
    mtu: usize,
    /// Let am-udp take GRO-coalesced receives (UDP_GRO)
    #[arg(long)]
    gro: bool,
    /// dpdk: the DPDK device, e.g. net_memif0,role=server,socket=PATH
    #[arg(long, value_name = "SPEC")]
    dev: Option<String>,
}

struct Opts {
    modes: Vec<String>,
    waits: Vec<Wait>,
    transports: Vec<String>,
    quick: bool,
    iters: usize,
    warmup: usize,
    outstanding: u64,
    mtu: usize,
    bw_mib: usize,
    max_size: usize,
    gro: bool,
}

fn opts(args: &OptsArgs) -> Opts {
    let quick = args.quick;
    let mut modes: Vec<String> = Vec::new();
    for m in &args.mode {
        match m {
            ModeArg::All => modes.extend(["latency".into(), "bandwidth".into(), "rate".into()]),
            ModeArg::Latency => modes.push("latency".into()),
            ModeArg::Bandwidth => modes.push("bandwidth".into()),
            ModeArg::Rate => modes.push("rate".into()),
        }
    }
    let waits = match args.wait {
        WaitArg::Both => vec![Wait::Poll, Wait::Block],
        WaitArg::Poll => vec![Wait::Poll],
        WaitArg::Block => vec![Wait::Block],
    };
    let mut transports: Vec<String> = Vec::new();
    for t in &args.transport {
        match t {
            TransportArg::All => transports.extend(["udp".into(), "sim".into()]),
            TransportArg::Udp => transports.push("udp".into()),
            TransportArg::Sim => transports.push("sim".into()),
            TransportArg::Rdma => transports.push("rdma".into()),
            TransportArg::Dpdk => transports.push("dpdk".into()),
        }
    }
    Opts {
        modes,
        waits,
        transports,
        quick,
        iters: args.iters.unwrap_or(if quick { 2000 } else { 20000 }),
        warmup: args.warmup.unwrap_or(if quick { 200 } else { 2000 }),
        outstanding: args.outstanding,
        mtu: args.mtu,
        bw_mib: args.bw_mib.unwrap_or(if quick { 64 } else { 256 }),
        max_size: args.max_size.unwrap_or(usize::MAX),
        gro: args.gro,
    }
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.command {
        Some(Cmd::Server(a)) => server(&a),
        Some(Cmd::Client(a)) => client(&a),
        Some(Cmd::Local(a)) => local(&a),
        None => local(&cli.local),
    };
    if let Err(e) = r {
        eprintln!("am-bench: {e}");
        std::process::exit(2);
    }
}

fn udp_config(mtu: usize, gro: bool) -> UdpConfig {
    UdpConfig {
        mtu,
        gro,
        ..UdpConfig::default()
    }
}

fn server(args: &ServerArgs) -> Result<()> {
    let wait = Wait::parse(&args.wait).context("--wait: poll or block")?;
    let stop = AtomicBool::new(false);
    let bind = args.bind.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)));
    match (args.transport, args.system) {
        (ServerTransport::Dpdk, _) => dpdk_server(args, wait, &stop),
        (ServerTransport::Rdma, SystemArg::Am) => {
            let cfg = RdmaConfig {
                busy_poll: wait == Wait::Poll,
                ..RdmaConfig::default()
            };
            let t = RdmaTransport::bind(bind, cfg).map_err(|e| anyhow!("rdma transport: {e}"))?;
            let mut ep = Endpoint::try_new(t, am_side::config(am_side::SERVER_TAG))?;
            am_side::make_server(&mut ep)?;
            println!("listening {}", ep.name().addr);
            let _ = std::io::stdout().flush();
            am_side::serve(&mut ep, wait, &stop)
        }
        (ServerTransport::Udp, SystemArg::Am) => {
            let t = UdpTransport::bind(bind, udp_config(args.mtu, args.gro))?;
            let mut ep = Endpoint::new(t, am_side::config(am_side::SERVER_TAG));
            am_side::make_server(&mut ep)?;
            println!("listening {}", ep.name().addr);
            let _ = std::io::stdout().flush();
            am_side::serve(&mut ep, wait, &stop)
        }
        // The raw UDP server serves over the kernel whatever --transport says (udp or rdma).
        (_, SystemArg::Raw) => {
            let sock = UdpSocket::bind(bind).map_err(|e| anyhow!("bind {bind}: {e}"))?;
            println!("listening {}", sock.local_addr()?);
            let _ = std::io::stdout().flush();
            Ok(raw::serve(sock, wait, &stop)?)
        }
    }
}

/// `am-bench server --transport dpdk`: the AM server or the raw reflector on `--dev`.
fn dpdk_server(args: &ServerArgs, wait: Wait, stop: &AtomicBool) -> Result<()> {
    let dev = args
        .dev
        .as_deref()
        .context("--transport dpdk needs --dev SPEC")?;
    let bind = match args.bind.context("--transport dpdk needs --bind IP:PORT")? {
        SocketAddr::V4(a) => a,
        other => bail!("--bind {other}: --transport dpdk needs an IPv4 address"),
    };
    match args.system {
        SystemArg::Am => {
            let mut cfg = DpdkConfig::new(bind);
            cfg.busy_poll = wait == Wait::Poll;
            cfg.mac = Some(am_dpdk::mac_for(*bind.ip()));
            let t = DpdkTransport::open(dev, cfg).map_err(|e| anyhow!("dpdk transport: {e}"))?;
            let mut ep = Endpoint::try_new(t, am_side::config(am_side::SERVER_TAG))?;
            am_side::make_server(&mut ep)?;
            println!("listening {}", ep.name().addr);
            let _ = std::io::stdout().flush();
            am_side::serve(&mut ep, wait, stop)
        }
        SystemArg::Raw => {
            let (_port, mut q) = dpdk_raw::open(dev)?;
            println!("listening {bind}");
            let _ = std::io::stdout().flush();
            dpdk_raw::serve(&mut q, stop);
            Ok(())
        }
    }
}

fn progress(msg: &str) {
    eprintln!("[am-bench] {msg}");
}

/// Latency iterations for a case: fewer for big bulks so a row takes about a second.
fn iters_for(case: Case, o: &Opts) -> (usize, usize) {
    let cap = ((256usize << 20) / case.size.max(1)).max(20);
    (o.warmup.min(cap / 10).max(2), o.iters.min(cap))
}

fn bw_total(o: &Opts) -> usize {
    o.bw_mib.max(1) << 20
}

fn measure_am<T: am_core::Transport + 'static>(
    c: &mut AmClient<T>,
    transport: &str,
    wait: Wait,
    o: &Opts,
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    if o.modes.iter().any(|m| m == "latency") {
        for case in latency_cases(o.quick)
            .into_iter()
            .filter(|c| c.size <= o.max_size)
        {
            let (w, n) = iters_for(case, o);
            let sent0 = c.endpoint().stats().packets_sent;
            let h = c.latency(case, w, n)?;
            let per_rt = (c.endpoint().stats().packets_sent - sent0) as f64 / (w + n) as f64;
            let row = Row::latency("am", transport, wait, case, &h);
            progress(&format!(
                "am {transport} {} latency {case}: p50 {:.1} us ({per_rt:.2} packets sent per round trip)",
                wait.name(),
                row.p50_us.unwrap_or(0.0)
            ));
            rows.push(row);
        }
    }
    if o.modes.iter().any(|m| m == "bandwidth") {
        for case in bandwidth_cases(o.quick)
            .into_iter()
            .filter(|c| c.size <= o.max_size)
        {
            let (msgs, bytes, secs) = c.bandwidth(case, bw_total(o))?;
            let row = Row::throughput("am", transport, "bandwidth", wait, case, msgs, bytes, secs);
            progress(&format!(
                "am {} bandwidth {case}: {:.0} MB/s",
                wait.name(),
                row.mb_per_s
            ));
            rows.push(row);
        }
    }
    if o.modes.iter().any(|m| m == "rate") {
        let dur = Duration::from_millis(if o.quick { 500 } else { 2000 });
        let (n, secs) = c.rate(o.outstanding, dur)?;
        let mut row = Row::throughput("am", transport, "rate", wait, Case::SMALL0, n, 0, secs);
        row.note = format!("{} outstanding", o.outstanding);
        progress(&format!(
            "am {} rate: {:.0} msgs/s",
            wait.name(),
            row.msgs_per_s
        ));
        rows.push(row);
    }
    Ok(rows)
}

/// Latency rows of a raw baseline `(system, transport, wait)`: one per distinct size of
/// the latency cases (at least 1 byte, at most `max_one`: one datagram or frame each way),
/// each measured by `measure(size, warmup, iters)`.
fn raw_latency_rows(
    o: &Opts,
    (system, transport, wait): (&str, &str, Wait),
    max_one: usize,
    note: &str,
    mut measure: impl FnMut(usize, usize, usize) -> Result<hdrhistogram::Histogram<u64>>,
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let mut done = Vec::new();
    for case in latency_cases(o.quick)
        .into_iter()
        .filter(|c| c.size <= o.max_size)
    {
        let size = case.size.max(1);
        if size > max_one || done.contains(&size) {
            continue;
        }
        done.push(size);
        let (w, n) = iters_for(case, o);
        let h = measure(size, w, n)?;
        let mut rc = case;
        rc.size = size;
        let mut row = Row::latency(system, transport, wait, rc, &h);
        row.note = note.into();
        progress(&format!(
            "{system} {} latency {size} B: p50 {:.2} us",
            wait.name(),
            row.p50_us.unwrap_or(0.0)
        ));
        rows.push(row);
    }
    Ok(rows)
}

fn measure_raw(server: SocketAddr, wait: Wait, o: &Opts) -> Result<Vec<Row>> {
    let mut c = RawClient::new(server, wait)?;
    let mut rows = Vec::new();
    if o.modes.iter().any(|m| m == "latency") {
        rows.extend(raw_latency_rows(
            o,
            ("raw-udp", "udp", wait),
            raw::MAX_DATAGRAM,
            "",
            |size, w, n| Ok(c.latency(size, w, n)?),
        )?);
    }
    if o.modes.iter().any(|m| m == "bandwidth") {
        let chunk_max = o.mtu - 28;
        for case in bandwidth_cases(o.quick)
            .into_iter()
            .filter(|c| c.size <= o.max_size)
        {
            let chunk = case.size.min(chunk_max);
            let (msgs, bytes, secs) = c.stream(chunk, bw_total(o))?;
            let mut row =
                Row::throughput("raw-udp", "udp", "bandwidth", wait, case, msgs, bytes, secs);
            row.note = format!("{chunk}-byte datagrams, no flow control");
            progress(&format!(
                "raw {} bandwidth {case}: {:.0} MB/s",
                wait.name(),
                row.mb_per_s
            ));
            rows.push(row);
        }
    }
    if o.modes.iter().any(|m| m == "rate") {
        let dur = Duration::from_millis(if o.quick { 500 } else { 2000 });
        let (n, secs) = c.rate(dur)?;
        let mut row = Row::throughput("raw-udp", "udp", "rate", wait, Case::SMALL0, n, 0, secs);
        row.note = "one at a time".into();
        rows.push(row);
    }
    Ok(rows)
}

fn am_udp_client(
    server: SocketAddr,
    wait: Wait,
    mtu: usize,
    gro: bool,
) -> Result<AmClient<UdpTransport>> {
    let bind = if server.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let t = UdpTransport::bind(bind, udp_config(mtu, gro))?;
    am_client_on(t, server, wait)
}

fn am_rdma_client(server: SocketAddr, wait: Wait) -> Result<AmClient<RdmaTransport>> {
    let t = RdmaTransport::bind(SocketAddr::new(server.ip(), 0), RdmaConfig::default())
        .map_err(|e| anyhow!("rdma transport: {e}"))?;
    am_client_on(t, server, wait)
}

/// A client endpoint on `t` with the server at index 0 of its translation table.
fn am_client_on<T: am_core::Transport + 'static>(
    t: T,
    server: SocketAddr,
    wait: Wait,
) -> Result<AmClient<T>> {
    let mut ep = Endpoint::try_new(t, am_side::config(Tag(1)))?;
    ep.map(
        0,
        EndpointName {
            addr: server,
            vnet: 0,
        },
        am_side::SERVER_TAG,
    )?;
    AmClient::new(ep, wait, am_side::real_pump()).map_err(anyhow::Error::msg)
}

fn client(args: &ClientArgs) -> Result<()> {
    let o = opts(&args.opts);
    let server = args.server;
    let mut rows = Vec::new();
    for &wait in &o.waits {
        match args.system {
            SystemArg::Am => rows.extend(measure_am(
                &mut am_udp_client(server, wait, o.mtu, o.gro)?,
                "udp",
                wait,
                &o,
            )?),
            SystemArg::Raw => rows.extend(measure_raw(server, wait, &o)?),
        }
    }
    finish(&args.opts, rows)
}

struct ServerProcess(Child, SocketAddr);

impl ServerProcess {
    fn start(system: &str, wait: Wait, mtu: usize, gro: bool) -> Result<ServerProcess> {
        ServerProcess::start_on(system, "udp", "127.0.0.1:0", wait, mtu, gro, &[])
    }

    fn start_on(
        system: &str,
        transport: &str,
        bind: &str,
        wait: Wait,
        mtu: usize,
        gro: bool,
        extra: &[&str],
    ) -> Result<ServerProcess> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .args([
                "server",
                "--system",
                system,
                "--transport",
                transport,
                "--bind",
                bind,
                "--wait",
                wait.name(),
                "--mtu",
                &mtu.to_string(),
            ])
            .args(gro.then_some("--gro"))
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| anyhow!("cannot start the server process: {e}"))?;
        let line = child
            .stdout
            .take()
            .and_then(|o| BufReader::new(o).lines().next())
            .and_then(Result::ok)
            .unwrap_or_default();
        let addr = line
            .strip_prefix("listening ")
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("server said {line:?}"))?;
        Ok(ServerProcess(child, addr))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sim_client() -> Result<AmClient<am_core::sim::SimTransport>> {
    let net = SimNet::new(
        1,
        Faults {
            delay: Duration::ZERO,
            ..Faults::none()
        },
    );
    let mut server = Endpoint::new(net.transport(), am_side::config(am_side::SERVER_TAG));
    am_side::make_server(&mut server)?;
    let mut ep = Endpoint::new(net.transport(), am_side::config(Tag(1)));
    ep.map(0, server.name(), am_side::SERVER_TAG)?;
    let pump: am_side::Pump<am_core::sim::SimTransport> = Box::new(move |ep, _| {
        let mut n = ep.poll(256).unwrap_or(0);
        n += server.poll(256).unwrap_or(0);
        net.advance_to(net.now());
        if n == 0 {
            // Let timers (none on a perfect network, but be safe) move on.
            net.advance_to(am_core::Time(net.now().0 + 1000));
        }
        n
    });
    AmClient::new(ep, Wait::Poll, pump).map_err(anyhow::Error::msg)
}

fn local(args: &LocalArgs) -> Result<()> {
    let o = opts(&args.opts);
    let peers = !args.no_peers;
    if peers {
        bench::peers::check_installed()?;
    }
    let started = Instant::now();
    let mut rows = Vec::new();
    if o.transports.iter().any(|t| t == "udp") {
        for &wait in &o.waits {
            let raw_server = ServerProcess::start("raw", wait, o.mtu, o.gro)?;
            progress(&format!(
                "raw-udp server at {} ({})",
                raw_server.1,
                wait.name()
            ));
            rows.extend(measure_raw(raw_server.1, wait, &o)?);
            drop(raw_server);
            let am_server = ServerProcess::start("am", wait, o.mtu, o.gro)?;
            progress(&format!("am server at {} ({})", am_server.1, wait.name()));
            rows.extend(measure_am(
                &mut am_udp_client(am_server.1, wait, o.mtu, o.gro)?,
                "udp",
                wait,
                &o,
            )?);
        }
    }
    if o.transports.iter().any(|t| t == "rdma") {
        rows.extend(measure_rdma(&o)?);
    }
    if o.transports.iter().any(|t| t == "dpdk") {
        rows.extend(measure_dpdk(&o)?);
    }
    if o.transports.iter().any(|t| t == "sim") {
        progress("am over the simulator (engine cost alone)");
        rows.extend(measure_am(&mut sim_client()?, "sim", Wait::Poll, &o)?);
    }
    if peers && o.modes.iter().any(|m| m == "latency") {
        let sizes: &[usize] = if o.quick {
            &[64, 4096]
        } else {
            &[8, 64, 1024, 4096, 8192]
        };
        rows.extend(bench::peers::run_all(sizes, &o.waits, o.quick, &progress)?);
    }
    progress(&format!("done in {:.1} s", started.elapsed().as_secs_f64()));
    finish(&args.opts, rows)
}

/// Raw DPDK ping-pong and rate over net_memif between two processes, then AM over
/// am-dpdk on net_memif for each wait mode, in this one run.
fn measure_dpdk(o: &Opts) -> Result<Vec<Row>> {
    if !am_dpdk::AVAILABLE {
        bail!(
            "--transport dpdk: this build has no DPDK: {}",
            am_dpdk::INSTALL_HINT
        );
    }
    let dir = std::env::temp_dir().join(format!("am-bench-dpdk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| anyhow!("create {}: {e}", dir.display()))?;
    let r = measure_dpdk_in(o, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    r
}

fn measure_dpdk_in(o: &Opts, dir: &std::path::Path) -> Result<Vec<Row>> {
    let server = std::net::SocketAddrV4::new([10, 3, 0, 1].into(), 9000);
    let me = std::net::SocketAddrV4::new([10, 3, 0, 2].into(), 9000);
    let mut rows = Vec::new();
    let devs = |k: usize| {
        let sock = dir.join(format!("memif{k}.sock"));
        (
            format!("net_memif{k},role=server,socket={}", sock.display()),
            format!("net_memif{k},role=client,socket={}", sock.display()),
        )
    };
    // The floor: raw frames reflected by the other process (it busy-polls).
    let (sdev, cdev) = devs(0);
    let bind = server.to_string();
    let srv = ServerProcess::start_on(
        "raw",
        "dpdk",
        &bind,
        Wait::Poll,
        o.mtu,
        false,
        &["--dev", &sdev],
    )?;
    let (port, q) = dpdk_raw::open(&cdev)?;
    dpdk_raw::wait_link(&port, Duration::from_secs(15))?;
    progress(&format!(
        "raw DPDK reflector on {} ({})",
        port.info().name,
        port.info().driver
    ));
    let mut c = dpdk_raw::RawDpdkClient::new(q, me, server);
    if o.modes.iter().any(|m| m == "latency") {
        rows.extend(raw_latency_rows(
            o,
            ("raw-dpdk", "dpdk", Wait::Poll),
            o.mtu - 28,
            "one frame each way, net_memif",
            |size, w, n| c.latency(size, w, n),
        )?);
    }
    if o.modes.iter().any(|m| m == "rate") {
        let dur = Duration::from_millis(if o.quick { 500 } else { 2000 });
        let (n, secs) = c.rate(o.outstanding as usize, dur)?;
        let mut row = Row::throughput(
            "raw-dpdk",
            "dpdk",
            "rate",
            Wait::Poll,
            Case::SMALL0,
            n,
            0,
            secs,
        );
        row.note = format!("{} frames in flight", o.outstanding);
        progress(&format!("raw dpdk rate: {:.0} frames/s", row.msgs_per_s));
        rows.push(row);
    }
    drop(c);
    drop(srv);
    for (k, &wait) in o.waits.iter().enumerate() {
        let (sdev, cdev) = devs(k + 1);
        let srv =
            ServerProcess::start_on("am", "dpdk", &bind, wait, o.mtu, false, &["--dev", &sdev])?;
        let mut cfg = DpdkConfig::new(me);
        cfg.busy_poll = wait == Wait::Poll;
        cfg.mac = Some(am_dpdk::mac_for(*me.ip()));
        let t = DpdkTransport::open(&cdev, cfg).map_err(|e| anyhow!("dpdk transport: {e}"))?;
        let start = Instant::now();
        while !t.link_up() {
            if start.elapsed() > Duration::from_secs(15) {
                bail!("the memif link to the AM server did not come up in 15 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        progress(&format!("am dpdk server at {} ({})", srv.1, wait.name()));
        rows.extend(measure_am(
            &mut am_client_on(t, srv.1, wait)?,
            "dpdk",
            wait,
            o,
        )?);
    }
    Ok(rows)
}

/// AM over verbs, then `ib_send_lat` on the same device, for each wait mode.
fn measure_rdma(o: &Opts) -> Result<Vec<Row>> {
    if let Some(why) = am_testkit::rdma::unavailable() {
        bail!(
            "--transport rdma: {why}; without RDMA hardware, benchmark in the SoftRoCE VM: \
             `bash bench/run-verbs.sh`"
        );
    }
    let ip = am_testkit::rdma::test_ip();
    let bind = format!("{ip}:0");
    let mut rows = Vec::new();
    for (i, &wait) in o.waits.iter().enumerate() {
        let server = ServerProcess::start_on("am", "rdma", &bind, wait, o.mtu, false, &[])?;
        progress(&format!("am rdma server at {} ({})", server.1, wait.name()));
        let mut c = am_rdma_client(server.1, wait)?;
        let (dev, gid) = {
            let t = c.endpoint().transport();
            (t.device_name().to_string(), t.gid_index())
        };
        rows.extend(measure_am(&mut c, "rdma", wait, o)?);
        drop(c);
        drop(server);
        // The sizes of the latency rows: 0 (ib_send_lat's least, 2 B), 64, 1 KiB, 4 KiB.
        for (j, size) in [0usize, 64, 1024, 4096]
            .into_iter()
            .filter(|&s| s <= o.max_size)
            .enumerate()
        {
            let iters = if o.quick { 2000 } else { 10000 };
            let port = 18515 + (i * 4 + j) as u16;
            let r = bench::verbs_peer::ib_send_lat(
                &dev,
                gid,
                &ip.to_string(),
                port,
                size,
                wait,
                iters,
            )?;
            progress(&format!(
                "ib_send_lat {} {} B on {dev}: round trip {:.1} us",
                wait.name(),
                size.max(2),
                r.p50_us.unwrap_or(0.0)
            ));
            rows.push(r);
        }
    }
    Ok(rows)
}

fn finish(args: &OptsArgs, mut rows: Vec<Row>) -> Result<()> {
    add_ratios(&mut rows);
    let out = &args.out;
    std::fs::create_dir_all(out).map_err(|e| anyhow!("create {}: {e}", out.display()))?;
    let json = args.json.clone().unwrap_or(out.join("am-bench.json"));
    let text = serde_json::to_string_pretty(&rows)?;
    std::fs::write(&json, text).map_err(|e| anyhow!("write {}: {e}", json.display()))?;
    let md = markdown(&rows);
    let png = out.join("latency.png");
    bench::plot::latency_png(&rows, &png)?;
    let md_path = out.join("am-bench.md");
    std::fs::write(&md_path, &md).map_err(|e| anyhow!("write {}: {e}", md_path.display()))?;
    print!("{md}");
    progress(&format!(
        "wrote {}, {} and {}",
        json.display(),
        md_path.display(),
        png.display()
    ));
    Ok(())
}
