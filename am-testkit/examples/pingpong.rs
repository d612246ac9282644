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
use am_testkit::cli::Args;
use am_udp::{UdpConfig, UdpTransport};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const HELP: &str = "\
pingpong: Active Messages ping-pong over UDP or RDMA verbs

USAGE:
  pingpong demo [--transport rdma]     start a server process (UDP: on loopback; RDMA: on
                                       $AM_RDMA_ADDR, default 10.99.0.1), run the client
                                       against it (every class, then 1000 round trips), stop
  pingpong server [OPTIONS]
  pingpong client --server ADDR [OPTIONS]

COMMON OPTIONS:
  --transport udp|rdma     UDP sockets (default) or RDMA verbs (reliable-connected queue
                           pairs; bind to an address of the RDMA device's netdev, e.g. the
                           SoftRoCE VM's 10.99.0.1; AM_RDMA_DEVICE picks the device)

SERVER OPTIONS:
  --bind ADDR              address to listen on (default 127.0.0.1:7700; port 0 picks one)
  --tag N                  this endpoint's tag, the capability clients must present (default 7)
  --vnet N                 virtual network (default 0)
  --segment-mib N          bulk segment size in MiB (default 64)
  --log-handled            print `handled SEQ` for each one-way message (handler 2)

  Handlers: 1 echoes a request (args and payload) back; 2 takes a one-way message;
  3 answers a bulk request with the length and FNV-1a hash of the bytes that landed.

CLIENT OPTIONS:
  --server ADDR            the server's address (required)
  --server-tag N           the server's tag (default 7)
  --bind ADDR              local address (default: UDP any address of the server's family;
                           RDMA the server's IP; any port)
  --vnet N                 virtual network (default 0)
  --mode ping|all          ping: round trips with latency percentiles (default);
                           all: small, medium and bulk exchanges, each verified
  --count N                round trips for ping (default 1000)
  --size BYTES             medium payload for ping; 0 sends small messages (default 0)
  --busy-poll              spin instead of sleeping while waiting

Exit status: 0 when every exchange was verified, 1 on a mismatch or error.
";

fn main() {
    let args = Args::from_env();
    if args.flag("--help") || args.flag("-h") || args.0.is_empty() {
        print!("{HELP}");
        return;
    }
    let r = match args.0[0].as_str() {
        "demo" => demo(&args),
        "server" | "client" => run(&args),
        other => Err(format!(
            "unknown command {other:?}; use `server` or `client` (see --help)"
        )),
    };
    if let Err(e) = r {
        eprintln!("pingpong: {e}");
        std::process::exit(1);
    }
}

/// Runs a server as a second process on loopback and the client against it.
fn demo(args: &Args) -> Result<(), String> {
    use std::io::BufRead;
    let transport = args.value("--transport").unwrap_or_else(|| "udp".into());
    let bind = match transport.as_str() {
        "rdma" => format!(
            "{}:0",
            std::env::var("AM_RDMA_ADDR").unwrap_or_else(|_| "10.99.0.1".into())
        ),
        _ => "127.0.0.1:0".into(),
    };
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = std::process::Command::new(&exe)
        .args(["server", "--transport", &transport, "--bind", &bind])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the server process: {e}"))?;
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
            transport.clone(),
            "--server".into(),
            addr.clone(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        println!("$ pingpong {}", a.join(" "));
        result = run(&Args(a));
        if result.is_err() {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// Opens the transport `--transport` names at `bind` and runs the command on it.
fn run(args: &Args) -> Result<(), String> {
    let is_server = args.0[0] == "server";
    let rdma = match args.value("--transport").as_deref().unwrap_or("udp") {
        "udp" => false,
        "rdma" => true,
        t => return Err(format!("--transport {t:?}: use udp or rdma")),
    };
    let busy_poll = args.flag("--busy-poll");
    let bind: SocketAddr = if is_server {
        args.parse("--bind", "127.0.0.1:7700".parse().unwrap())?
    } else {
        let server = server_addr(args)?;
        let default = match (rdma, server.is_ipv4()) {
            (true, _) => SocketAddr::new(server.ip(), 0),
            (false, true) => "0.0.0.0:0".parse().unwrap(),
            (false, false) => "[::]:0".parse().unwrap(),
        };
        args.parse("--bind", default)?
    };
    if rdma {
        let cfg = RdmaConfig {
            busy_poll,
            ..RdmaConfig::default()
        };
        let t = RdmaTransport::bind(bind, cfg).map_err(|e| format!("rdma transport: {e}"))?;
        if is_server {
            server(args, t)
        } else {
            client(args, t)
        }
    } else {
        let cfg = UdpConfig {
            busy_poll,
            ..UdpConfig::default()
        };
        let t = UdpTransport::bind(bind, cfg).map_err(|e| e.to_string())?;
        if is_server {
            server(args, t)
        } else {
            client(args, t)
        }
    }
}

fn server_addr(args: &Args) -> Result<SocketAddr, String> {
    args.value("--server")
        .ok_or("--server ADDR is required; see --help")?
        .parse()
        .map_err(|e| format!("--server: {e}"))
}

fn server<T: Transport>(args: &Args, t: T) -> Result<(), String> {
    let cfg = Config {
        tag: Tag(args.parse("--tag", 7u64)?),
        vnet: args.parse("--vnet", 0u32)?,
        segment_bytes: args.parse("--segment-mib", 64usize)? << 20,
        protocol_version: args.parse("--protocol-version", am_core::PROTOCOL_VERSION)?,
        ..Config::default()
    };
    let mut ep = Endpoint::try_new(t, cfg).map_err(|e| e.to_string())?;
    am_testkit::peer::pingpong_handlers(&mut ep, args.flag("--log-handled"))
        .map_err(|e| e.to_string())?;
    println!("listening {} tag {}", ep.name().addr, ep.tag().0);
    let _ = std::io::stdout().flush();
    loop {
        ep.poll(256).map_err(|e| e.to_string())?;
        ep.wait(Some(Duration::from_secs(1)))
            .map_err(|e| e.to_string())?;
    }
}

type Shared<T> = Arc<Mutex<T>>;

fn client<T: Transport>(args: &Args, t: T) -> Result<(), String> {
    let server = server_addr(args)?;
    let vnet = args.parse("--vnet", 0u32)?;
    let mut ep = Endpoint::try_new(
        t,
        Config {
            tag: Tag(1),
            vnet,
            segment_bytes: 4 << 20,
            ..Config::default()
        },
    )
    .map_err(|e| e.to_string())?;
    ep.map(
        0,
        am_core::EndpointName { addr: server, vnet },
        Tag(args.parse("--server-tag", 7u64)?),
    )
    .map_err(|e| e.to_string())?;
    let replies: Shared<Vec<(Vec<u64>, Vec<u8>)>> = Arc::default();
    for h in [1u16, 3] {
        let r = replies.clone();
        ep.register(h, move |_, m| {
            r.lock()
                .unwrap()
                .push((m.args.to_vec(), m.payload.to_vec()));
        })
        .map_err(|e| e.to_string())?;
    }
    let errors: Shared<Vec<Undeliverable>> = Arc::default();
    let e2 = errors.clone();
    ep.set_upcall(move |_, u| e2.lock().unwrap().push(u));

    let round = |ep: &mut Endpoint<T>, msg: Msg<'_>| -> Result<(Vec<u64>, Vec<u8>), String> {
        replies.lock().unwrap().clear();
        ep.request(0, msg).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            ep.poll(64).map_err(|e| e.to_string())?;
            if let Some(r) = replies.lock().unwrap().pop() {
                return Ok(r);
            }
            if let Some(u) = errors.lock().unwrap().pop() {
                return Err(format!("request failed: {} ({:?})", u.code, u.code));
            }
            if Instant::now() > deadline {
                return Err("no reply within 10 s".into());
            }
            ep.wait(Some(Duration::from_millis(100)))
                .map_err(|e| e.to_string())?;
        }
    };

    match args.value("--mode").as_deref().unwrap_or("ping") {
        "ping" => {
            let count: usize = args.parse("--count", 1000)?;
            let size: usize = args.parse("--size", 0)?;
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
                    return Err(format!("echo {i} came back wrong"));
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
        "all" => {
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
        m => return Err(format!("unknown mode {m:?}; use ping or all")),
    }
    if let Some(u) = errors.lock().unwrap().first() {
        if u.code != ErrorCode::Unreachable {
            return Err(format!("error upcall: {}", u.code));
        }
    }
    Ok(())
}

fn check(ok: bool, what: &str) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(format!("{what}: reply did not match"))
    }
}
