//! An fsx over several mounts: random operations on one file, each through a randomly
//! chosen mount (each mount a different node of one cluster), one operation at a time,
//! every read and every size checked against an in-memory model right after the
//! operation. A mount that serves stale pages, a size another node's kernel still caches,
//! an append that lands where its kernel thought the end was, or a write that overwrote
//! another node's, shows as a mismatch naming the operation, the seed and the last
//! operations before it.
//!
//! Operations: read and mmap read; write inside the file, write past its end (a hole),
//! append (`O_APPEND`), truncate, fallocate (extend, keep size, and punch hole where the
//! file system supports it), mmap write + msync, fsync, close and reopen.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;

/// What a run does.
#[derive(Clone, Debug)]
pub struct FsxConfig {
    /// One directory per mount (each a different node's mount of one cluster).
    pub mounts: Vec<PathBuf>,
    /// The file's name inside each mount.
    pub file: String,
    /// Operations to run.
    pub ops: u64,
    /// The random generator's seed (a run is replayed by its seed).
    pub seed: u64,
    /// The file never grows past this many bytes.
    pub max_file_bytes: u64,
    /// The longest read or write, bytes.
    pub max_op_bytes: u64,
    /// A progress line every this many operations (0: none).
    pub progress_every: u64,
}

/// What a run did, per kind of operation.
#[derive(Clone, Debug, Default)]
pub struct FsxReport {
    /// Operations run (and checked).
    pub ops: u64,
    /// Of which: reads, mmap reads, writes, writes past the end, appends, truncates,
    /// fallocates, punched holes, mmap writes, fsyncs, reopens.
    pub counts: [u64; KINDS],
    /// The whole file read back and compared (every 1,000 operations and at the end).
    pub full_checks: u64,
    /// Operations the file system refused as unsupported (then not tried again): their names.
    pub unsupported: Vec<&'static str>,
}

/// The kinds of operation.
const KINDS: usize = 11;
const NAMES: [&str; KINDS] = [
    "read",
    "mmap_read",
    "write",
    "write_past_end",
    "append",
    "truncate",
    "fallocate",
    "punch_hole",
    "mmap_write",
    "fsync",
    "reopen",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    MmapRead,
    Write,
    WritePastEnd,
    Append,
    Truncate,
    Fallocate,
    PunchHole,
    MmapWrite,
    Fsync,
    Reopen,
}

impl FsxReport {
    /// One line: the operations by kind.
    pub fn summary(&self) -> String {
        let by_kind: Vec<String> = NAMES
            .iter()
            .zip(self.counts)
            .map(|(n, c)| format!("{n} {c}"))
            .collect();
        format!(
            "{} operations, 0 mismatches ({}; full checks {}{})",
            self.ops,
            by_kind.join(", "),
            self.full_checks,
            if self.unsupported.is_empty() {
                String::new()
            } else {
                format!("; unsupported: {}", self.unsupported.join(", "))
            }
        )
    }
}

/// xorshift64*: small, seeded, the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// One mount's open descriptors of the file.
struct Handles {
    rw: File,
    append: File,
}

/// A run of fsx over the mounts of `cfg` (see the module docs). An error names the
/// operation that found a mismatch (or failed), the seed, and the last operations.
pub fn run(cfg: &FsxConfig) -> Result<FsxReport, String> {
    if cfg.mounts.len() < 2 {
        return Err("fsx-mounts needs at least two mounts (of two nodes)".into());
    }
    let mut fsx = Fsx::new(cfg)?;
    for n in 1..=cfg.ops {
        fsx.step(n).map_err(|e| fsx.failure(n, &e))?;
        if n % 1000 == 0 {
            fsx.full_check().map_err(|e| fsx.failure(n, &e))?;
        }
        if cfg.progress_every > 0 && n % cfg.progress_every == 0 {
            eprintln!(
                "fsx-mounts: {n} of {} operations, file {} bytes",
                cfg.ops,
                fsx.model.len()
            );
        }
    }
    fsx.full_check().map_err(|e| fsx.failure(cfg.ops, &e))?;
    Ok(fsx.report)
}

struct Fsx<'a> {
    cfg: &'a FsxConfig,
    rng: Rng,
    model: Vec<u8>,
    handles: Vec<Handles>,
    report: FsxReport,
    /// The last operations, for a failure's report.
    recent: VecDeque<String>,
    punch_supported: bool,
}

fn path(cfg: &FsxConfig, m: usize) -> PathBuf {
    cfg.mounts[m].join(&cfg.file)
}

fn open(cfg: &FsxConfig, m: usize) -> Result<Handles, String> {
    let p = path(cfg, m);
    let rw = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .map_err(|e| format!("open {}: {e}", p.display()))?;
    let append = OpenOptions::new()
        .append(true)
        .custom_flags(0)
        .open(&p)
        .map_err(|e| format!("open {} with O_APPEND: {e}", p.display()))?;
    Ok(Handles { rw, append })
}

impl<'a> Fsx<'a> {
    fn new(cfg: &'a FsxConfig) -> Result<Fsx<'a>, String> {
        let first = path(cfg, 0);
        File::create(&first).map_err(|e| format!("create {}: {e}", first.display()))?;
        let handles = (0..cfg.mounts.len())
            .map(|m| open(cfg, m))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Fsx {
            cfg,
            rng: Rng(cfg.seed.max(1)),
            model: Vec::new(),
            handles,
            report: FsxReport::default(),
            recent: VecDeque::new(),
            punch_supported: true,
        })
    }

    fn failure(&self, n: u64, e: &str) -> String {
        let mut s = format!(
            "operation {n} of seed {}: {e}\nthe last operations (newest last):\n",
            self.cfg.seed
        );
        for r in &self.recent {
            s.push_str("  ");
            s.push_str(r);
            s.push('\n');
        }
        s.push_str(&format!(
            "replay: fsx-mounts --seed {} --ops {n} {}",
            self.cfg.seed,
            self.cfg
                .mounts
                .iter()
                .map(|m| m.display().to_string())
                .collect::<Vec<_>>()
                .join(" ")
        ));
        s
    }

    fn note(&mut self, n: u64, m: usize, what: String) {
        if self.recent.len() == 20 {
            self.recent.pop_front();
        }
        self.recent
            .push_back(format!("{n}: mount {} {what}", m + 1));
    }

    fn pick_kind(&mut self) -> Kind {
        match self.rng.below(100) {
            0..=17 => Kind::Read,
            18..=24 => Kind::MmapRead,
            25..=42 => Kind::Write,
            43..=47 => Kind::WritePastEnd,
            48..=59 => Kind::Append,
            60..=65 => Kind::Truncate,
            66..=70 => Kind::Fallocate,
            71..=74 => Kind::PunchHole,
            75..=84 => Kind::MmapWrite,
            85..=91 => Kind::Fsync,
            _ => Kind::Reopen,
        }
    }

    /// A length for a read or write: mostly small, sometimes up to the limit.
    fn length(&mut self) -> u64 {
        if self.rng.below(4) == 0 {
            1 + self.rng.below(self.cfg.max_op_bytes)
        } else {
            1 + self.rng.below(self.cfg.max_op_bytes.min(4096))
        }
    }

    fn data(&mut self, n: u64, len: u64) -> Vec<u8> {
        // Never all zeros, so a write that did not land cannot pass for a hole.
        let salt = self.rng.next();
        (0..len)
            .map(|i| (((n.wrapping_mul(31) ^ salt).wrapping_add(i) % 255) + 1) as u8)
            .collect()
    }

    fn size(&self) -> u64 {
        self.model.len() as u64
    }

    fn step(&mut self, n: u64) -> Result<(), String> {
        let m = self.rng.below(self.handles.len() as u64) as usize;
        let mut kind = self.pick_kind();
        if kind == Kind::PunchHole && !self.punch_supported {
            kind = Kind::Write;
        }
        if matches!(kind, Kind::MmapRead | Kind::MmapWrite) && self.model.is_empty() {
            kind = Kind::Write;
        }
        let idx = kind as usize;
        match kind {
            Kind::Read => self.read(n, m)?,
            Kind::MmapRead => self.mmap_read(n, m)?,
            Kind::Write => {
                let off = self.rng.below(self.size() + 1);
                self.write(n, m, off)?
            }
            Kind::WritePastEnd => {
                let off = self.size() + 1 + self.rng.below(64 * 1024);
                self.write(n, m, off)?
            }
            Kind::Append => self.append(n, m)?,
            Kind::Truncate => self.truncate(n, m)?,
            Kind::Fallocate => self.fallocate(n, m)?,
            Kind::PunchHole => self.punch_hole(n, m)?,
            Kind::MmapWrite => self.mmap_write(n, m)?,
            Kind::Fsync => {
                self.note(n, m, "fsync".into());
                self.handles[m]
                    .rw
                    .sync_all()
                    .map_err(|e| format!("fsync: {e}"))?
            }
            Kind::Reopen => {
                self.note(n, m, "close and reopen".into());
                self.handles[m] = open(self.cfg, m)?;
            }
        }
        self.report.counts[idx] += 1;
        self.report.ops += 1;
        // Whatever any node did, every node sees the size next.
        let s = self.rng.below(self.handles.len() as u64) as usize;
        let size = self.handles[s]
            .rw
            .metadata()
            .map_err(|e| format!("fstat on mount {}: {e}", s + 1))?
            .len();
        if size != self.size() {
            return Err(format!(
                "mount {} says the file has {size} bytes; the model says {}",
                s + 1,
                self.size()
            ));
        }
        Ok(())
    }

    fn compare(
        &self,
        what: &str,
        m: usize,
        off: u64,
        got: &[u8],
        want_len: u64,
    ) -> Result<(), String> {
        let end = (off + want_len).min(self.size());
        let want: &[u8] = if off >= self.size() {
            &[]
        } else {
            &self.model[off as usize..end as usize]
        };
        if got == want {
            return Ok(());
        }
        let at = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        Err(format!(
            "{what} of {want_len} bytes at {off} on mount {}: {} bytes read, {} expected; first \
             difference at file offset {} (read {:?}, expected {:?})",
            m + 1,
            got.len(),
            want.len(),
            off + at as u64,
            got.get(at),
            want.get(at)
        ))
    }

    fn read(&mut self, n: u64, m: usize) -> Result<(), String> {
        let off = self.rng.below(self.size() + 1);
        let len = self.length();
        self.note(n, m, format!("read {len} at {off}"));
        let mut buf = vec![0u8; len as usize];
        let mut got = 0;
        loop {
            let r = self.handles[m]
                .rw
                .read_at(&mut buf[got..], off + got as u64)
                .map_err(|e| format!("read: {e}"))?;
            if r == 0 {
                break;
            }
            got += r;
            if got == buf.len() {
                break;
            }
        }
        self.compare("read", m, off, &buf[..got], len)
            .map_err(|e| format!("{e}{}", self.second_look(m, off, len)))
    }

    /// After a mismatched read: what the same descriptor reads after an `fstat` (which
    /// refreshes the size the kernel caches), and what a fresh descriptor reads, to tell
    /// a stale kernel cache from a wrong answer of the node.
    fn second_look(&self, m: usize, off: u64, len: u64) -> String {
        let read = |f: &File| {
            let mut b = vec![0u8; len as usize];
            f.read_at(&mut b, off).map(|n| {
                b.truncate(n);
                b
            })
        };
        let size = self.handles[m].rw.metadata().map(|md| md.len());
        let again = read(&self.handles[m].rw);
        let fresh = File::open(path(self.cfg, m)).and_then(|f| read(&f));
        let verdict = |r: &io::Result<Vec<u8>>| match r {
            Ok(b) => match self.compare("", m, off, b, len) {
                Ok(()) => "right".to_string(),
                Err(_) => format!("wrong ({} bytes)", b.len()),
            },
            Err(e) => format!("failed: {e}"),
        };
        format!(
            "\n  second look: fstat says {size:?}; the same descriptor then reads {}; a fresh \
             descriptor reads {}",
            verdict(&again),
            verdict(&fresh)
        )
    }

    fn write(&mut self, n: u64, m: usize, off: u64) -> Result<(), String> {
        let len = self
            .length()
            .min(self.cfg.max_file_bytes.saturating_sub(off));
        if len == 0 {
            let to = self.rng.below(self.cfg.max_file_bytes / 2);
            return self.truncate_to(n, m, to);
        }
        self.note(n, m, format!("write {len} at {off} (size {})", self.size()));
        let data = self.data(n, len);
        self.handles[m]
            .rw
            .write_all_at(&data, off)
            .map_err(|e| format!("write: {e}"))?;
        let end = (off + len) as usize;
        if self.model.len() < end {
            self.model.resize(end, 0);
        }
        self.model[off as usize..end].copy_from_slice(&data);
        Ok(())
    }

    fn append(&mut self, n: u64, m: usize) -> Result<(), String> {
        let len = self
            .length()
            .min(self.cfg.max_file_bytes.saturating_sub(self.size()));
        if len == 0 {
            let to = self.rng.below(self.cfg.max_file_bytes / 2);
            return self.truncate_to(n, m, to);
        }
        self.note(n, m, format!("append {len} (size {})", self.size()));
        let data = self.data(n, len);
        let w = io::Write::write(&mut self.handles[m].append, &data)
            .map_err(|e| format!("append: {e}"))?;
        if w != data.len() {
            return Err(format!("append: {w} of {} bytes written", data.len()));
        }
        self.model.extend_from_slice(&data);
        Ok(())
    }

    fn truncate(&mut self, n: u64, m: usize) -> Result<(), String> {
        let to = if self.rng.below(2) == 0 {
            self.rng.below(self.size() + 1)
        } else {
            self.rng.below(self.cfg.max_file_bytes + 1)
        };
        self.truncate_to(n, m, to)
    }

    fn truncate_to(&mut self, n: u64, m: usize, to: u64) -> Result<(), String> {
        self.note(n, m, format!("truncate to {to} (size {})", self.size()));
        self.handles[m]
            .rw
            .set_len(to)
            .map_err(|e| format!("truncate: {e}"))?;
        self.model.resize(to as usize, 0);
        Ok(())
    }

    fn fallocate(&mut self, n: u64, m: usize) -> Result<(), String> {
        let off = self.rng.below(self.size() + 1);
        let len = self
            .length()
            .min(self.cfg.max_file_bytes.saturating_sub(off))
            .max(1);
        let keep = self.rng.below(2) == 0;
        let mode = if keep { libc::FALLOC_FL_KEEP_SIZE } else { 0 };
        self.note(
            n,
            m,
            format!(
                "fallocate {len} at {off}{} (size {})",
                if keep { " keep size" } else { "" },
                self.size()
            ),
        );
        sys::fallocate(&self.handles[m].rw, mode, off, len)
            .map_err(|e| format!("fallocate: {e}"))?;
        if !keep && off + len > self.size() {
            self.model.resize((off + len) as usize, 0);
        }
        Ok(())
    }

    fn punch_hole(&mut self, n: u64, m: usize) -> Result<(), String> {
        let off = self.rng.below(self.size() + 1);
        let len = self.length();
        self.note(
            n,
            m,
            format!("punch hole {len} at {off} (size {})", self.size()),
        );
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match sys::fallocate(&self.handles[m].rw, mode, off, len) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                self.punch_supported = false;
                self.report.unsupported.push("punch_hole");
                return Ok(());
            }
            Err(e) => return Err(format!("punch hole: {e}")),
        }
        let end = (off + len).min(self.size());
        if off < end {
            self.model[off as usize..end as usize].fill(0);
        }
        Ok(())
    }

    /// A page-aligned range inside the file: (offset, length).
    fn mapped_range(&mut self) -> (u64, u64) {
        let page = 4096;
        let off = self.rng.below(self.size()) / page * page;
        let len = self.length().min(self.size() - off).max(1);
        (off, len)
    }

    /// As a program does before it maps a file: `fstat` on the descriptor (which must
    /// give the model's size) so the mount's kernel knows the size the mapping relies on
    /// (a fault past the size the kernel caches is SIGBUS).
    fn size_before_mapping(&self, m: usize) -> Result<(), String> {
        let size = self.handles[m]
            .rw
            .metadata()
            .map_err(|e| format!("fstat before mmap on mount {}: {e}", m + 1))?
            .len();
        if size != self.size() {
            return Err(format!(
                "before mmap, mount {} says the file has {size} bytes; the model says {}",
                m + 1,
                self.size()
            ));
        }
        Ok(())
    }

    fn mmap_read(&mut self, n: u64, m: usize) -> Result<(), String> {
        self.size_before_mapping(m)?;
        let (off, len) = self.mapped_range();
        self.note(
            n,
            m,
            format!("mmap read {len} at {off} (size {})", self.size()),
        );
        let got = sys::mapped(&self.handles[m].rw, off, len, None)
            .map_err(|e| format!("mmap read: {e}"))?;
        self.compare("mmap read", m, off, &got, len)
    }

    fn mmap_write(&mut self, n: u64, m: usize) -> Result<(), String> {
        self.size_before_mapping(m)?;
        let (off, len) = self.mapped_range();
        self.note(
            n,
            m,
            format!("mmap write {len} at {off} + msync (size {})", self.size()),
        );
        let data = self.data(n, len);
        sys::mapped(&self.handles[m].rw, off, len, Some(&data))
            .map_err(|e| format!("mmap write: {e}"))?;
        self.model[off as usize..(off + len) as usize].copy_from_slice(&data);
        Ok(())
    }

    /// The whole file, read through a random mount, against the model.
    fn full_check(&mut self) -> Result<(), String> {
        let m = self.rng.below(self.handles.len() as u64) as usize;
        let got = std::fs::read(path(self.cfg, m))
            .map_err(|e| format!("read the whole file on mount {}: {e}", m + 1))?;
        self.report.full_checks += 1;
        self.compare("whole-file read", m, 0, &got, self.size())
    }
}

/// The system calls std does not offer: fallocate and mmap.
mod sys {
    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;

    pub(super) fn fallocate(f: &File, mode: i32, off: u64, len: u64) -> io::Result<()> {
        // SAFETY: a plain system call on a descriptor we own.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Map `[off, off + len)` of `f` shared (`off` page-aligned, the range inside the
    /// file); write `data` there and msync it, or read it. Returns what the mapping held
    /// (after the write, if any).
    pub(super) fn mapped(f: &File, off: u64, len: u64, data: Option<&[u8]>) -> io::Result<Vec<u8>> {
        let prot = libc::PROT_READ | if data.is_some() { libc::PROT_WRITE } else { 0 };
        // SAFETY: a fresh shared mapping of a range inside the file (no SIGBUS); nothing
        // else aliases it; it is unmapped before returning.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                prot,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                off as i64,
            );
            if p == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            let bytes = std::slice::from_raw_parts_mut(p as *mut u8, len as usize);
            let mut r = Ok(());
            if let Some(d) = data {
                bytes.copy_from_slice(d);
                if libc::msync(p, len as usize, libc::MS_SYNC) < 0 {
                    r = Err(io::Error::last_os_error());
                }
            }
            let out = bytes.to_vec();
            libc::munmap(p, len as usize);
            r.map(|_| out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tool on two directories of one local file system (the same file under two
    /// paths, as two mounts of one cluster show it): it runs clean; and a model it cannot
    /// match (a file changed behind its back) is caught, naming the seed.
    #[test]
    fn runs_clean_on_one_file_system_and_catches_a_change_behind_its_back() {
        let base = std::env::temp_dir().join(format!("fsx-mounts-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        let link = base.join("alias");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&base, &link).unwrap();
        let cfg = FsxConfig {
            mounts: vec![base.clone(), link.clone()],
            file: "f".into(),
            ops: 3000,
            seed: 7,
            max_file_bytes: 64 * 1024,
            max_op_bytes: 16 * 1024,
            progress_every: 0,
        };
        let r = run(&cfg).unwrap();
        assert_eq!(r.ops, 3000);
        assert!(
            r.counts.iter().all(|c| *c > 0),
            "every kind ran: {:?}",
            r.counts
        );
        assert!(r.full_checks >= 3);

        // A change behind the tool's back: the next check names it.
        let mut fsx = Fsx::new(&cfg).unwrap();
        for n in 1..=200 {
            fsx.step(n).unwrap();
        }
        if fsx.model.is_empty() {
            fsx.append(201, 0).unwrap();
        }
        std::fs::OpenOptions::new()
            .write(true)
            .open(base.join("f"))
            .unwrap()
            .write_all_at(b"\0", 0)
            .unwrap();
        fsx.model[0] = fsx.model[0].max(1);
        let e = fsx
            .full_check()
            .map_err(|e| fsx.failure(202, &e))
            .unwrap_err();
        assert!(e.contains("first difference at file offset 0"), "{e}");
        assert!(
            e.contains("seed 7") && e.contains("replay: fsx-mounts --seed 7"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&base);
    }
}
