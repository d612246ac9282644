//! `store-bench`: sequential write and read bandwidth of the fragment store (io_uring,
//! O_DIRECT, registered buffers) on a device. `bench/run-store.sh` runs it beside fio on the
//! same loop device with the same block size, queue depth and flush cadence.

use std::time::Instant;

use am_testkit::cli::{tool_main, Args};
use xfs_node::storage::fragment::{FragmentId, FragmentStore};
use xfs_node::storage::uring::{UringOptions, UringStore};

const HELP: &str = "\
store-bench: sequential bandwidth of the fragment store on a device

USAGE:
  store-bench --device PATH [OPTIONS]

Writes fragments to fill the store (or --bytes), syncing every --sync-every fragments as a
writer that acknowledges only durable data does, then reads them all back; prints one JSON
line per phase with MB/s of fragment data. Everything on the device is overwritten.

OPTIONS:
  --device PATH       block device or file (required)
  --fragment BYTES    fragment size (default 1048576)
  --depth N           requests in flight (default 16)
  --sync-every N      fdatasync after every N fragments (default 16)
  --bytes N           data to write (default: as much as fits)
  -h, --help          this text
";

fn main() {
    tool_main("store-bench", HELP, run);
}

fn run(args: &Args) -> Result<(), String> {
    let device = args
        .value("--device")
        .ok_or("--device PATH is required (see --help)")?;
    let fragment: usize = args.parse("--fragment", 1 << 20)?;
    let depth: u32 = args.parse("--depth", 16)?;
    let sync_every: usize = args.parse("--sync-every", 16)?;
    if sync_every == 0 {
        return Err("--sync-every must be at least 1".into());
    }
    let mut store = UringStore::open(
        &device,
        UringOptions {
            fragment_bytes: fragment,
            depth,
            create_bytes: None,
        },
    )
    .map_err(|e| e.to_string())?;
    // Start empty.
    let old = store.list().map_err(|e| e.to_string())?;
    store.delete(&old).map_err(|e| e.to_string())?;
    store.sync().map_err(|e| e.to_string())?;
    let fit = store.free_slots().map_err(|e| e.to_string())?;
    let count = match args.value("--bytes") {
        Some(_) => (args.parse::<u64>("--bytes", 0)? as usize / fragment).min(fit),
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
        store.write(&batch).map_err(|e| e.to_string())?;
        store.sync().map_err(|e| e.to_string())?;
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
            let d = r.map_err(|e| e.to_string())?;
            checked += (d.len() == fragment) as usize;
        }
    }
    let r = t.elapsed().as_secs_f64();
    if checked != count {
        return Err(format!("read back {checked} of {count} fragments whole"));
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
