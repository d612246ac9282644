//! `fsx-mounts`: fsx over several mounts of one cluster (see `fs_testkit::fsx`).

use clap::Parser;
use fs_testkit::fsx::{run, FsxConfig};
use std::path::PathBuf;

/// Random operations on one file, each through one of several mounts (each mount a
/// different node of one cluster), every read and size checked against a model after
/// every operation. Exit status: 0 clean, 1 a mismatch or a failed call (printed with
/// the seed, the operation and the ones before it), 2 bad arguments.
#[derive(Parser)]
#[command(name = "fsx-mounts")]
struct Args {
    /// Operations to run.
    #[arg(long, default_value_t = 100_000)]
    ops: u64,
    /// Seed (a run is replayed by its seed); 0 or absent: a fresh one, printed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The file's name inside each mount (created or emptied at the start).
    #[arg(long, default_value = "fsx-mounts.data")]
    file: String,
    /// The file never grows past this many bytes.
    #[arg(long, default_value_t = 256 * 1024)]
    max_file_bytes: u64,
    /// The longest read or write, bytes.
    #[arg(long, default_value_t = 64 * 1024)]
    max_op_bytes: u64,
    /// A progress line every this many operations (0: none).
    #[arg(long, default_value_t = 10_000)]
    progress_every: u64,
    /// The mounts (directories), two or more, each of a different node.
    #[arg(required = true, num_args = 2..)]
    mounts: Vec<PathBuf>,
}

fn main() {
    let a = Args::parse();
    let seed = if a.seed != 0 {
        a.seed
    } else {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        (t ^ (std::process::id() as u64) << 32) | 1
    };
    eprintln!(
        "fsx-mounts: seed {seed}, {} operations over {} mounts (replay: --seed {seed})",
        a.ops,
        a.mounts.len()
    );
    let cfg = FsxConfig {
        mounts: a.mounts,
        file: a.file,
        ops: a.ops,
        seed,
        max_file_bytes: a.max_file_bytes.max(4096),
        max_op_bytes: a.max_op_bytes.max(1),
        progress_every: a.progress_every,
    };
    match run(&cfg) {
        Ok(r) => println!("fsx-mounts: seed {seed}: {}", r.summary()),
        Err(e) => {
            eprintln!("fsx-mounts: MISMATCH: {e}");
            std::process::exit(1);
        }
    }
}
