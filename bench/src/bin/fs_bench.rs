//! `fs-bench`: the file system through the client API of a 3-node local cluster against
//! the same operations on a local ext4 directory on the same disk, in the same run.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use bench::report::median;
use clap::Parser;
use xfs_node::node::config::Config;
use xfs_node::node::control::{Control, FsOp, Request, Response};

/// fs-bench: the file system against local ext4 (and others), same operations, same disk
///
/// Starts a 3-node local cluster with `xfs-node up` (storage files under --data), then,
/// --runs times each: a large sequential write (1 MiB writes, then fsync), its read back
/// through the writing node (warm) and through another node (cold there), and small files
/// (create and write --files files of 1 KiB, then sync; stat each; unlink each), through node
/// 1's client API; and the same on a directory of the local file system (--ext4, on the same
/// disk). Prints one JSON line per phase and run, then medians and the ratio cluster / ext4.
/// Stops the cluster at the end.
///
/// --mounts: makes an ext4 file system on a loop device (under --work), starts a 3-node
/// cluster with its storage files there and mounts it (`xfs-node up --mount`: node 1 serves
/// the mount in its process; `xfsam-socket`: a second cluster mounted over node 1's
/// control socket), a bindfs passthrough of that ext4, JuiceFS (metadata in a Redis the
/// bench starts on 127.0.0.1:6390, `--storage file` and its cache there; `bash
/// bench/run-mounts.sh` installs it) and GlusterFS volumes with bricks there (a single
/// brick and a 2+1 disperse volume, on 127.0.0.2; glusterd started by hand if it is not
/// running), and with `--systems ...,cephfs` a one-host CephFS (`bench/ceph.sh`: one
/// monitor, manager and MDS, three OSDs on loop devices there, ceph-fuse); then, --runs times on each: fio sequential write (1 MiB blocks, --mb MiB,
/// fsync at the end), sequential read of it after dropping the caches, 4 KiB random reads
/// for --secs seconds (after dropping the caches), --files small files (create 1 KiB each
/// and syncfs, stat each, stat each again, unlink each and syncfs), `cp -a` of --tree (and
/// syncfs) and `ls -lR` of the copy after dropping the caches. Prints JSON lines and the
/// medians; writes fs-mounts.md, fs-mounts.json and fs-mounts.png (ratios to ext4) under
/// --out. Root.
#[derive(Parser)]
#[command(name = "fs-bench")]
struct Cli {
    /// The xfs-node binary (default: beside this one)
    #[arg(long = "xfs-node", value_name = "PATH")]
    xfs_node: Option<PathBuf>,
    /// The cluster's data directory
    #[arg(long, value_name = "DIR", default_value = "/var/tmp/fs-bench-cluster")]
    data: PathBuf,
    /// The local directory
    #[arg(long, value_name = "DIR", default_value = "/var/tmp/fs-bench-ext4")]
    ext4: PathBuf,
    /// Size of the large file, MiB; with --mounts the fio file size [default: 64; --mounts
    /// 1024]
    #[arg(long, value_name = "N")]
    mb: Option<usize>,
    /// Small files
    #[arg(long, value_name = "N", default_value_t = 2000)]
    files: usize,
    /// Runs
    #[arg(long, value_name = "N", default_value_t = 3)]
    runs: usize,
    /// The mounted cluster against ext4, bindfs, JuiceFS, GlusterFS and CephFS (see above)
    #[arg(long)]
    mounts: bool,
    /// The systems, comma-separated
    #[arg(
        long,
        value_name = "LIST",
        default_value = "xfsam,ext4,bindfs,juicefs,gluster,gluster-disperse",
        help_heading = "--mounts options"
    )]
    systems: String,
    /// The source tree to `cp -a` [default: the cargo registry's sources,
    /// $CARGO_HOME/registry/src]
    #[arg(long, value_name = "DIR", help_heading = "--mounts options")]
    tree: Option<PathBuf>,
    /// Random-read seconds
    #[arg(
        long,
        value_name = "N",
        default_value_t = 20,
        help_heading = "--mounts options"
    )]
    secs: u64,
    /// Where the reports go
    #[arg(
        long,
        value_name = "DIR",
        default_value = "fs-mounts",
        help_heading = "--mounts options"
    )]
    out: PathBuf,
    /// Loop device image and mount points
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/tmp/fs-bench-mounts",
        help_heading = "--mounts options"
    )]
    work: PathBuf,
}

/// The cargo registry's unpacked sources: a real source tree on any machine that built
/// this bench.
fn default_tree() -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
    home.join("registry/src")
}

fn main() {
    if let Err(e) = run(&Cli::parse()) {
        eprintln!("fs-bench: {e}");
        std::process::exit(2);
    }
}

struct Cluster {
    cfg: Config,
}

impl Cluster {
    fn call(&self, node: u16, req: Request) -> Result<Response> {
        let n = self.cfg.node(node).context("no such node")?;
        Ok(Control::connect(&n.control)?.call_ok(&req)?)
    }
    fn fs(&self, c: &mut Control, op: FsOp) -> Result<Response> {
        Ok(c.call_ok(&Request::Fs(op))?)
    }
}

fn ino(r: Response) -> Result<u64> {
    match r {
        Response::Attr(a) => Ok(a.ino),
        Response::Ino(i) => Ok(i),
        other => Err(anyhow!("unexpected {other:?}")),
    }
}

struct Results {
    rows: Vec<(String, String, f64, &'static str)>,
}

impl Results {
    fn add(&mut self, system: &str, phase: &str, run: usize, value: f64, unit: &'static str) {
        println!(
            "{{\"system\":\"{system}\",\"phase\":\"{phase}\",\"run\":{run},\"value\":{value:.1},\"unit\":\"{unit}\"}}"
        );
        self.rows.push((system.into(), phase.into(), value, unit));
    }
    /// Run `f` and record `amount` per second of it.
    fn timed(
        &mut self,
        system: &str,
        phase: &str,
        run: usize,
        amount: usize,
        unit: &'static str,
        f: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let t = Instant::now();
        f()?;
        self.add(
            system,
            phase,
            run,
            amount as f64 / t.elapsed().as_secs_f64(),
            unit,
        );
        Ok(())
    }

    fn median(&self, system: &str, phase: &str) -> Option<(f64, &'static str)> {
        let v: Vec<f64> = self
            .rows
            .iter()
            .filter(|r| r.0 == system && r.1 == phase)
            .map(|r| r.2)
            .collect();
        let unit = self.rows.iter().find(|r| r.0 == system && r.1 == phase)?.3;
        (!v.is_empty()).then(|| (median(v), unit))
    }
}

use xfs_node::fs::sim::pattern as data;

fn run(args: &Cli) -> Result<()> {
    let exe = std::env::current_exe()?;
    let xfs = args
        .xfs_node
        .clone()
        .unwrap_or_else(|| exe.with_file_name("xfs-node"));
    if !xfs.exists() {
        bail!(
            "{} not found: build it (cargo build --release -p xfs-node -p fuse-front) or give \
             --xfs-node",
            xfs.display()
        );
    }
    if args.mounts {
        let o = bench::mounts::Options {
            systems: args.systems.clone(),
            tree: args.tree.clone().unwrap_or_else(default_tree),
            mb: args.mb.unwrap_or(1024),
            files: args.files,
            runs: args.runs,
            secs: args.secs,
            out: args.out.clone(),
            work: args.work.clone(),
        };
        return bench::mounts::run(&o, xfs);
    }
    let (dir, ext4) = (&args.data, &args.ext4);
    let (mb, files, runs) = (args.mb.unwrap_or(64), args.files, args.runs);
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(ext4);
    std::fs::create_dir_all(ext4).map_err(|e| anyhow!("{}: {e}", ext4.display()))?;
    let storage_mb = (mb * runs * 4 + 256).to_string();
    eprintln!("fs-bench: starting a 3-node cluster in {}", dir.display());
    let st = Command::new(&xfs)
        .args([
            "up",
            "--nodes",
            "3",
            "--port",
            "7900",
            "--storage-mb",
            &storage_mb,
            "--data",
        ])
        .arg(dir)
        .status()
        .map_err(|e| anyhow!("{}: {e}", xfs.display()))?;
    if !st.success() {
        bail!("xfs-node up failed");
    }
    let cluster = Cluster {
        cfg: Config::load(&dir.join("cluster.toml"))?,
    };
    let r = bench(&cluster, ext4, mb, files, runs);
    let _ = Command::new(&xfs)
        .arg("down")
        .arg("--data")
        .arg(dir)
        .status();
    let _ = std::fs::remove_dir_all(ext4);
    let res = r?;
    println!("\nmedians of {runs} runs (cluster: 3 nodes on loopback, client API over node 1's control socket)");
    println!(
        "{:<28} {:>14} {:>14} {:>8}",
        "phase", "cluster", "ext4", "ratio"
    );
    for phase in [
        "seq write + fsync",
        "seq read (warm)",
        "seq read (other node)",
        "create 1 KiB files",
        "stat",
        "unlink",
    ] {
        let ext4_phase = if phase == "seq read (other node)" {
            "seq read (cold)"
        } else {
            phase
        };
        if let (Some((c, unit)), Some((e, _))) =
            (res.median("cluster", phase), res.median("ext4", ext4_phase))
        {
            println!(
                "{phase:<28} {c:>9.1} {unit:<4} {e:>9.1} {unit:<4} {:>7.2}x",
                c / e
            );
        }
    }
    Ok(())
}

fn bench(c: &Cluster, ext4: &Path, mb: usize, files: usize, runs: usize) -> Result<Results> {
    let mut res = Results { rows: Vec::new() };
    let chunk = data(1, 1 << 20);
    let small = data(2, 1024);
    let n1 = c.cfg.node(1).context("node 1")?.control.clone();
    let n2 = c.cfg.node(2).context("node 2")?.control.clone();
    let mut a = Control::connect(&n1)?;
    let mut b = Control::connect(&n2)?;
    let root = ino(c.fs(&mut a, FsOp::Root)?)?;
    let name = |i: usize| format!("f{i}").into_bytes();
    for run in 0..runs {
        eprintln!("fs-bench: run {}/{runs}", run + 1);
        // Cluster: large file. One request, its offset moved along (no copy per write).
        let f = ino(c.fs(
            &mut a,
            FsOp::Create {
                parent: root,
                name: format!("big{run}").into_bytes(),
                mode: 0o644,
                uid: 0,
                gid: 0,
            },
        )?)?;
        let mut write = Request::Fs(FsOp::Write {
            ino: f,
            offset: 0,
            data: chunk.clone(),
        });
        res.timed("cluster", "seq write + fsync", run, mb, "MB/s", || {
            for k in 0..mb {
                if let Request::Fs(FsOp::Write { offset, .. }) = &mut write {
                    *offset = (k << 20) as u64;
                }
                a.call_ok(&write)?;
            }
            c.fs(&mut a, FsOp::Fsync { ino: f }).map(drop)
        })?;
        for (who, phase) in [
            (&mut a, "seq read (warm)"),
            (&mut b, "seq read (other node)"),
        ] {
            res.timed("cluster", phase, run, mb, "MB/s", || {
                for k in 0..mb {
                    let read = FsOp::Read {
                        ino: f,
                        offset: (k << 20) as u64,
                        len: 1 << 20,
                    };
                    match c.fs(who, read)? {
                        Response::Data(d) if d.len() == 1 << 20 => {}
                        _ => bail!("short read at MiB {k}"),
                    }
                }
                Ok(())
            })?;
        }
        // Cluster: small files.
        let d = ino(c.fs(
            &mut a,
            FsOp::Mkdir {
                parent: root,
                name: format!("small{run}").into_bytes(),
                mode: 0o755,
                uid: 0,
                gid: 0,
            },
        )?)?;
        res.timed("cluster", "create 1 KiB files", run, files, "op/s", || {
            for i in 0..files {
                let create = FsOp::Create {
                    parent: d,
                    name: name(i),
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                };
                let f = ino(c.fs(&mut a, create)?)?;
                let write = FsOp::Write {
                    ino: f,
                    offset: 0,
                    data: small.clone(),
                };
                c.fs(&mut a, write)?;
            }
            c.call(1, Request::Flush).map(drop)
        })?;
        res.timed("cluster", "stat", run, files, "op/s", || {
            for i in 0..files {
                let lookup = FsOp::Lookup {
                    parent: d,
                    name: name(i),
                };
                c.fs(&mut a, lookup)?;
            }
            Ok(())
        })?;
        res.timed("cluster", "unlink", run, files, "op/s", || {
            for i in 0..files {
                let unlink = FsOp::Unlink {
                    parent: d,
                    name: name(i),
                    open: Vec::new(),
                };
                c.fs(&mut a, unlink)?;
            }
            c.call(1, Request::Flush).map(drop)
        })?;

        // ext4: the same.
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(ext4.join(format!("big{run}")))?;
        res.timed("ext4", "seq write + fsync", run, mb, "MB/s", || {
            for _ in 0..mb {
                file.write_all(&chunk)?;
            }
            Ok(file.sync_all()?)
        })?;
        let mut buf = vec![0u8; 1 << 20];
        for phase in ["seq read (warm)", "seq read (cold)"] {
            if phase == "seq read (cold)" {
                // Drop this file's pages: the next read goes to the disk.
                // SAFETY: a valid descriptor; advice only.
                unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            }
            file.seek(SeekFrom::Start(0))?;
            res.timed("ext4", phase, run, mb, "MB/s", || {
                for _ in 0..mb {
                    file.read_exact(&mut buf)?;
                }
                Ok(())
            })?;
        }
        let sd = ext4.join(format!("small{run}"));
        std::fs::create_dir_all(&sd)?;
        let path = |i: usize| sd.join(format!("f{i}"));
        res.timed("ext4", "create 1 KiB files", run, files, "op/s", || {
            for i in 0..files {
                std::fs::write(path(i), &small)?;
            }
            // SAFETY: sync(2) takes no arguments.
            unsafe { libc::sync() };
            Ok(())
        })?;
        res.timed("ext4", "stat", run, files, "op/s", || {
            for i in 0..files {
                std::fs::metadata(path(i))?;
            }
            Ok(())
        })?;
        res.timed("ext4", "unlink", run, files, "op/s", || {
            for i in 0..files {
                std::fs::remove_file(path(i))?;
            }
            // SAFETY: as above.
            unsafe { libc::sync() };
            Ok(())
        })?;
    }
    Ok(res)
}
