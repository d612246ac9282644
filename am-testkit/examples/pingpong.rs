//! Ping-pong over Active Messages on UDP or RDMA verbs: a server and a client, as two
//! processes.
//!
//! ```text
//! pingpong server [--transport udp|rdma] [--bind 127.0.0.1:7700] [--tag 7] [--vnet 0]
//! pingpong client [--transport udp|rdma] --server 127.0.0.1:7700 [--server-tag 7] [--mode ping|all] [--count 1000] [--size 0]
//! ```
//! `--help` prints all options.

use am_core::{Config, Endpoint, ErrorCode, Msg, Tag, Transport, Undeliverable};
use am_rdma::{RdmaConfig, RdmaTransport};
use am_udp::{UdpConfig, UdpTransport};
use anyhow::{anyhow, bail, Result};
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// pingpong: Active Messages ping-pong over UDP or RDMA verbs
#[derive(Parser)]
#[command(
    name = "pingpong",
    after_help = "Exit status: 0 when every exchange was verified, 1 on a mismatch or error."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a server process (UDP: on loopback; RDMA: on $AM_RDMA_ADDR, default
    /// 10.99.0.1), run the client against it (every class, then 1000 round trips), stop
    Demo {
        /// UDP sockets or RDMA verbs
        #[arg(long, value_enum, default_value_t = Kind::Udp)]
        transport: Kind,
    },
    /// An AM endpoint: handler 1 echoes a request (args and payload) back; 2 takes a
    /// one-way message; 3 answers a bulk request with the length and FNV-1a hash of the
    /// bytes that landed
    Server(ServerArgs),
    /// Exchanges with a server: round trips with latency percentiles, or every class
    /// verified
    Client(ClientArgs),
}

/// The transport of a command.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Kind {
    /// UDP sockets
    Udp,
    /// RDMA verbs (reliable-connected queue pairs; bind to an address of the RDMA
    /// device's netdev, e.g. the SoftRoCE VM's 10.99.0.1; AM_RDMA_DEVICE picks the device)
    Rdma,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Udp => "udp",
            Kind::Rdma => "rdma",
        }
    }
}

/// The options of `server` and `client`.
#[derive(Args)]
struct Common {
    /// UDP sockets or RDMA verbs
    #[arg(long, value_enum, default_value_t = Kind::Udp)]
    transport: Kind,
    /// Spin instead of sleeping while waiting
    #[arg(long)]
    busy_poll: bool,
}

#[derive(Args)]
struct ServerArgs {
    #[command(flatten)]
    common: Common,
    /// Address to listen on (port 0 picks one)
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7700")]
    bind: SocketAddr,
    /// This endpoint's tag, the capability clients must present
    #[arg(long, value_name = "N", default_value_t = 7)]
    tag: u64,
    /// Virtual network
    #[arg(long, value_name = "N", default_value_t = 0)]
    vnet: u32,
    /// Bulk segment size in MiB
    #[arg(long, value_name = "N", default_value_t = 64)]
    segment_mib: usize,
    /// The wire protocol version this endpoint speaks (the tests give another to see it
    /// refused)
    #[arg(long, value_name = "N", default_value_t = am_core::PROTOCOL_VERSION)]
    protocol_version: u8,
    /// Print `handled SEQ` for each one-way message (handler 2)
    #[arg(long)]
    log_handled: bool,
}

#[derive(Args)]
struct ClientArgs {
    #[command(flatten)]
    common: Common,
    /// The server's address
    #[arg(long, value_name = "ADDR")]
    server: SocketAddr,
    /// The server's tag
    #[arg(long, value_name = "N", default_value_t = 7)]
    server_tag: u64,
    /// Local address (default: UDP any address of the server's family; RDMA the server's
    /// IP; any port)
    #[arg(long, value_name = "ADDR")]
    bind: Option<SocketAddr>,
    /// Virtual network
    #[arg(long, value_name = "N", default_value_t = 0)]
    vnet: u32,
    /// What to exchange
    #[arg(long, value_enum, default_value_t = Mode::Ping)]
    mode: Mode,
    /// Round trips for ping
    #[arg(long, value_name = "N", default_value_t = 1000)]
    count: usize,
    /// Medium payload for ping; 0 sends small messages
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    size: usize,
}

/// What the client exchanges.
#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    /// Round trips with latency percentiles
    Ping,
    /// Small, medium and bulk exchanges, each verified
    All,
}

fn main() {
    let r = match Cli::parse().command {
        None => {
            // No command: the help, as before.
            let _ = Cli::command().print_help();
            return;
        }
        Some(cmd) => run(cmd),
    };
    if let Err(e) = r {
        eprintln!("pingpong: {e}");
        std::process::exit(1);
    }
}

fn run(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Demo { transport } => demo(transport),
        Cmd::Server(a) => run_server(&a),
        Cmd::Client(a) => run_client(&a),
    }
}

/// Runs a server as a second process on loopback and the client against it.
fn demo(transport: Kind) -> Result<()> {
    use std::io::BufRead;
    let bind = match transport {
        Kind::Rdma => format!(
            "{}:0",
            std::env::var("AM_RDMA_ADDR").unwrap_or_else(|_| "10.99.0.1".into())
        ),
        Kind::Udp => "127.0.0.1:0".into(),
    };
    let exe = std::env::current_exe()?;
    let mut child = std::process::Command::new(&exe)
        .args(["server", "--transport", transport.name(), "--bind", &bind])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| anyhow!("cannot start the server process: {e}"))?;
    let first = child
        .stdout
        .take()
        .and_then(|o| std::io::BufReader::new(o).lines().next())
        .and_then(Result::ok)
        .unwrap_or_default();
    println!("server process {}: {first}", child.id());
    let addr = first.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut result = Ok(());
    for extra in [
        &["--mode", "all"][..],
        &["--mode", "ping", "--count", "1000"][..],
        &["--mode", "ping", "--count", "1000", "--size", "4096"][..],
    ] {
        let mut a = vec![
            "client".to_string(),
            "--transport".into(),
            transport.name().into(),
            "--server".into(),
            addr.clone(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        println!("$ pingpong {}", a.join(" "));
        result = Cli::try_parse_from(std::iter::once("pingpong".to_string()).chain(a))
            .map_err(anyhow::Error::from)
            .and_then(|cli| match cli.command {
                Some(cmd) => run(cmd),
                None => Ok(()),
            });
        if result.is_err() {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// Opens the transport `--transport` names at `--bind` and serves on it.
fn run_server(a: &ServerArgs) -> Result<()> {
    let busy_poll = a.common.busy_poll;
    match a.common.transport {
        Kind::Rdma => {
            let cfg = RdmaConfig {
                busy_poll,
                ..RdmaConfig::default()
            };
            let t = RdmaTransport::bind(a.bind, cfg).map_err(|e| anyhow!("rdma transport: {e}"))?;
            server(a, t)
        }
        Kind::Udp => {
            let cfg = UdpConfig {
                busy_poll,
                ..UdpConfig::default()
            };
            server(a, UdpTransport::bind(a.bind, cfg)?)
        }
    }
}

/// Opens the transport `--transport` names at `--bind` (or the default for the server's
/// address) and runs the client on it.
fn run_client(a: &ClientArgs) -> Result<()> {
    let busy_poll = a.common.busy_poll;
    let rdma = a.common.transport == Kind::Rdma;
    let bind = a.bind.unwrap_or_else(|| match (rdma, a.server) {
        (true, s) => SocketAddr::new(s.ip(), 0),
        (false, SocketAddr::V4(_)) => SocketAddr::from(([0, 0, 0, 0], 0)),
        (false, SocketAddr::V6(_)) => SocketAddr::from(([0u16; 8], 0)),
    });
    if rdma {
        let cfg = RdmaConfig {
            busy_poll,
            ..RdmaConfig::default()
        };
        let t = RdmaTransport::bind(bind, cfg).map_err(|e| anyhow!("rdma transport: {e}"))?;
        client(a, t)
    } else {
        let cfg = UdpConfig {
            busy_poll,
            ..UdpConfig::default()
        };
        client(a, UdpTransport::bind(bind, cfg)?)
    }
}

fn server<T: Transport>(a: &ServerArgs, t: T) -> Result<()> {
    let cfg = Config {
        tag: Tag(a.tag),
        vnet: a.vnet,
        segment_bytes: a.segment_mib << 20,
        protocol_version: a.protocol_version,
        ..Config::default()
    };
    let mut ep = Endpoint::try_new(t, cfg)?;
    am_testkit::peer::pingpong_handlers(&mut ep, a.log_handled)?;
    println!("listening {} tag {}", ep.name().addr, ep.tag().0);
    let _ = std::io::stdout().flush();
    loop {
        ep.poll(256)?;
        ep.wait(Some(Duration::from_secs(1)))?;
    }
}

type Shared<T> = Arc<Mutex<T>>;

fn client<T: Transport>(a: &ClientArgs, t: T) -> Result<()> {
    let server = a.server;
    let vnet = a.vnet;
    let mut ep = Endpoint::try_new(
        t,
        Config {
            tag: Tag(1),
            vnet,
            segment_bytes: 4 << 20,
            ..Config::default()
        },
    )?;
    ep.map(
        0,
        am_core::EndpointName { addr: server, vnet },
        Tag(a.server_tag),
    )?;
    let replies: Shared<Vec<(Vec<u64>, Vec<u8>)>> = Arc::default();
    for h in [1u16, 3] {
        let r = replies.clone();
        ep.register(h, move |_, m| {
            r.lock()
                .unwrap()
                .push((m.args.to_vec(), m.payload.to_vec()));
        })?;
    }
    let errors: Shared<Vec<Undeliverable>> = Arc::default();
    let e2 = errors.clone();
    ep.set_upcall(move |_, u| e2.lock().unwrap().push(u));

    let round = |ep: &mut Endpoint<T>, msg: Msg<'_>| -> Result<(Vec<u64>, Vec<u8>)> {
        replies.lock().unwrap().clear();
        ep.request(0, msg)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            ep.poll(64)?;
            if let Some(r) = replies.lock().unwrap().pop() {
                return Ok(r);
            }
            if let Some(u) = errors.lock().unwrap().pop() {
                bail!("request failed: {} ({:?})", u.code, u.code);
            }
            if Instant::now() > deadline {
                bail!("no reply within 10 s");
            }
            ep.wait(Some(Duration::from_millis(100)))?;
        }
    };

    match a.mode {
        Mode::Ping => {
            let (count, size) = (a.count, a.size);
            let body = vec![0xabu8; size];
            let slices = [&body[..]];
            let mut lat = Vec::with_capacity(count);
            for i in 0..count as u64 + 10 {
                let t0 = Instant::now();
                let arg = [i];
                let msg = if size == 0 {
                    Msg::small(1, &arg)
                } else {
                    Msg::medium(1, &arg, &slices)
                };
                let (a, p) = round(&mut ep, msg)?;
                if a != vec![i] || p != body {
                    bail!("echo {i} came back wrong");
                }
                if i >= 10 {
                    lat.push(t0.elapsed().as_nanos() as u64);
                }
            }
            lat.sort_unstable();
            let pct =
                |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1000.0;
            println!(
                "{count} round trips of {size} B: p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us",
                pct(0.5),
                pct(0.99),
                pct(0.999)
            );
        }
        Mode::All => {
            let (a, _) = round(&mut ep, Msg::small(1, &[]))?;
            check(a.is_empty(), "small with 0 arguments")?;
            let eight: Vec<u64> = (1..=8).collect();
            let (a, _) = round(&mut ep, Msg::small(1, &eight))?;
            check(a == eight, "small with 8 arguments")?;
            println!("small ok");
            for size in [1usize, 1024, 8192] {
                let body: Vec<u8> = (0..size).map(|i| (i * 7) as u8).collect();
                let (a, p) = round(&mut ep, Msg::medium(1, &[size as u64], &[&body]))?;
                check(a == vec![size as u64] && p == body, "medium echo")?;
            }
            println!("medium ok");
            let n = 1 << 20;
            for (i, b) in ep.segment_mut()[..n].iter_mut().enumerate() {
                *b = (i % 251) as u8;
            }
            let want = am_testkit::peer::fnv(&ep.segment()[..n]);
            let (a, _) = round(&mut ep, Msg::bulk(3, &[], &[(0, n)], 0))?;
            check(a == vec![n as u64, want], "bulk hash")?;
            println!("bulk ok");
        }
    }
    if let Some(u) = errors.lock().unwrap().first() {
        if u.code != ErrorCode::Unreachable {
            bail!("error upcall: {}", u.code);
        }
    }
    Ok(())
}

fn check(ok: bool, what: &str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        bail!("{what}: reply did not match")
    }
}
