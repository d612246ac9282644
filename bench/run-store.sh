#!/usr/bin/env bash
# The fragment store against fio on the same loop device, in one run (issue 7's benchmark).
#   bash bench/run-store.sh            3 alternating runs of each, 2 GiB device
#   RUNS=5 SIZE=4G bash bench/run-store.sh
# Same block size (1 MiB fragments / --bs=1M), queue depth 16 and flush cadence (an
# fdatasync every 16 writes, as the store's durability needs) for both. The loop device
# uses --direct-io=on so that the page cache does not inflate either side. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
SIZE=${SIZE:-2G}
command -v fio >/dev/null || { echo "installing fio"; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio; }
command -v losetup >/dev/null || { echo "losetup missing: apt-get install mount (util-linux)"; exit 1; }
[ "$(id -u)" = 0 ] || { echo "run as root (losetup)"; exit 1; }
cargo build --release -q -p bench --bin store-bench
img=/var/tmp/xfs-store-bench.img
rm -f "$img"; truncate -s "$SIZE" "$img"
dev=$(losetup --find --show --direct-io=on "$img")
trap 'losetup -d "$dev"; rm -f "$img"' EXIT
bytes=$(( $(blockdev --getsize64 "$dev") * 95 / 100 / 1048576 ))M
out=bench/results/store-bench.jsonl
mkdir -p bench/results; : > "$out"
fio_bw() { # fio's bandwidth in MB/s (terse v3: field 7 read KB/s, 48 write KB/s)
    local rw=$1; shift
    fio --name=b --filename="$dev" --ioengine=io_uring --direct=1 --rw="$rw" --bs=1M \
        --iodepth=16 --size="$bytes" "$@" --output-format=terse --terse-version=3 |
        awk -F';' -v rw="$rw" '{ printf "%.1f\n", (rw == "write" ? $48 : $7) * 1024 / 1e6 }'
}
for i in $(seq "$RUNS"); do
    echo "run $i/$RUNS on $dev ($SIZE)" >&2
    ./target/release/store-bench --device "$dev" --fragment 1048576 --depth 16 --sync-every 16 --bytes $((${bytes%M} * 1048576)) 2>/dev/null >> "$out"
    echo "{\"phase\":\"fio-write\",\"mb_per_s\":$(fio_bw write --fdatasync=16)}" >> "$out"
    echo "{\"phase\":\"fio-read\",\"mb_per_s\":$(fio_bw read)}" >> "$out"
done
python3 - "$out" <<'PY'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1])]
med = lambda p: statistics.median(r["mb_per_s"] for r in rows if r["phase"] == p)
print("| phase | fragment store MB/s | fio MB/s | ratio |")
print("|---|---|---|---|")
for p in ("write", "read"):
    s, f = med(p), med("fio-" + p)
    print(f"| sequential {p}, 1 MiB, qd16{', fdatasync every 16' if p == 'write' else ''} | {s:.0f} | {f:.0f} | {s / f:.2f}x |")
PY
