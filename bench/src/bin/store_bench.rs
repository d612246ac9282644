//! `store-bench`: sequential write and read bandwidth of the fragment store (io_uring,
//! O_DIRECT, registered buffers) on a device. `bench/run-store.sh` runs it beside fio on the
//! same loop device with the same block size, queue depth and flush cadence.

use std::time::Instant;

use anyhow::{bail, Result};
use clap::Parser;
use xfs_node::storage::fragment::{FragmentId, FragmentStore};
use xfs_node::storage::uring::{UringOptions, UringStore};

/// store-bench: sequential bandwidth of the fragment store on a device
///
/// Writes fragments to fill the store (or --bytes), syncing every --sync-every fragments as
/// a writer that acknowledges only durable data does, then reads them all back; prints one
/// JSON line per phase with MB/s of fragment data. Everything on the device is overwritten.
#[derive(Parser)]
#[command(name = "store-bench")]
struct Cli {
    /// Block device or file
    #[arg(long, value_name = "PATH")]
    device: String,
    /// Fragment size
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 20)]
    fragment: usize,
    /// Requests in flight
    #[arg(long, value_name = "N", default_value_t = 16)]
    depth: u32,
    /// fdatasync after every N fragments
    #[arg(long, value_name = "N", default_value_t = 16)]
    sync_every: usize,
    /// Data to write (default: as much as fits)
    #[arg(long, value_name = "N")]
    bytes: Option<u64>,
}

fn main() {
    if let Err(e) = run(&Cli::parse()) {
        eprintln!("store-bench: {e}");
        std::process::exit(2);
    }
}

fn run(args: &Cli) -> Result<()> {
    let (fragment, depth, sync_every) = (args.fragment, args.depth, args.sync_every);
    if sync_every == 0 {
        bail!("--sync-every must be at least 1");
    }
    let mut store = UringStore::open(
        &args.device,
        UringOptions {
            fragment_bytes: fragment,
            depth,
            create_bytes: None,
        },
    )?;
    // Start empty.
    let old = store.list()?;
    store.delete(&old)?;
    store.sync()?;
    let fit = store.free_slots()?;
    let count = match args.bytes {
        Some(bytes) => (bytes as usize / fragment).min(fit),
        None => fit,
    };
    let data: Vec<u8> = (0..fragment).map(|i| (i * 7 + 3) as u8).collect();
    let ids: Vec<FragmentId> = (0..count as u64)
        .map(|s| FragmentId {
            segment: s,
            index: 0,
        })
        .collect();

    let t = Instant::now();
    for chunk in ids.chunks(sync_every) {
        let batch: Vec<(FragmentId, &[u8])> =
            chunk.iter().map(|id| (*id, data.as_slice())).collect();
        store.write(&batch)?;
        store.sync()?;
    }
    let w = t.elapsed().as_secs_f64();
    let bytes = (count * fragment) as f64;
    println!(
        "{{\"phase\":\"write\",\"mb_per_s\":{:.1},\"fragments\":{count},\"fragment_bytes\":{fragment},\"depth\":{depth},\"sync_every\":{sync_every}}}",
        bytes / w / 1e6
    );

    let t = Instant::now();
    let mut checked = 0usize;
    for chunk in ids.chunks(depth as usize) {
        for r in store.read(chunk) {
            let d = r?;
            checked += (d.len() == fragment) as usize;
        }
    }
    let r = t.elapsed().as_secs_f64();
    if checked != count {
        bail!("read back {checked} of {count} fragments whole");
    }
    println!(
        "{{\"phase\":\"read\",\"mb_per_s\":{:.1},\"fragments\":{count},\"fragment_bytes\":{fragment},\"depth\":{depth}}}",
        bytes / r / 1e6
    );
    let s = store.stats();
    eprintln!(
        "store-bench: {count} fragments of {fragment} bytes; max in flight {}",
        s.max_in_flight
    );
    Ok(())
}
