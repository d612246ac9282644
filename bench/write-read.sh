#!/usr/bin/env bash
# Write and cold-read one file through node 1's mount of a fresh local cluster, with the
# manager map and N-chance count set in its config: the A/B behind the write-path notes in
# bench/RESULTS.md (the hop to a manager, N-chance handoffs of written blocks).
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: bench/write-read.sh [OPTIONS]

Starts a fresh 3-node local cluster (xfs-node up --mount), writes a file of --mb MiB with
dd (1 MiB blocks, fsync at the end) --runs times, then drops the kernel's caches and reads
the last file back, then reads it at random (fio, 4 KiB, 8 s, 4 jobs, the kernel's caches
dropped first); prints MiB/s or IOPS of each and the nodes' cache counters; stops the
cluster.

Options:
  --bin DIR        where xfs-node and xfsam-mount are (default: target/release)
  --map LIST       the manager map's entries, e.g. "1" or "1, 2, 3" (default: "1, 2, 3")
  --n-chance N     cluster.n_chance (default: 2)
  --hand-off-written true|false
                   cluster.hand_off_written (default: true)
  --mb N           file size in MiB (default: 256)
  --runs N         writes (default: 3)
  --dir DIR        scratch directory, emptied first (default: /var/tmp/xfsam-write-read)
  -h, --help       this text
Needs root (FUSE mount, drop_caches).
EOF
}

BIN=target/release MAP="1, 2, 3" NCHANCE=2 WRITTEN=true MB=256 RUNS=3 DIR=/var/tmp/xfsam-write-read
while [ $# -gt 0 ]; do
    case "$1" in
        --bin) BIN=$2; shift 2 ;;
        --map) MAP=$2; shift 2 ;;
        --n-chance) NCHANCE=$2; shift 2 ;;
        --hand-off-written) WRITTEN=$2; shift 2 ;;
        --mb) MB=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        --dir) DIR=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "write-read.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
X=$BIN/xfs-node
[ -x "$X" ] || { echo "write-read.sh: no $X (build with cargo build --release, or pass --bin)" >&2; exit 2; }

D=$DIR/data M=$DIR/mnt
"$X" down --data "$D" >/dev/null 2>&1 || true
rm -rf "$DIR"; mkdir -p "$D" "$M"
trap '"$X" down --data "$D" >/dev/null 2>&1 || true' EXIT
# Write the config, then start again from empty images with the map and count changed.
"$X" up --data "$D" --storage-mb $((MB * 4 + 256)) >/dev/null
"$X" down --data "$D" >/dev/null
rm -f "$D"/*.img "$D"/*.log
python3 - "$D/cluster.toml" "$MAP" "$NCHANCE" "$WRITTEN" <<'PY'
import re, sys
path, entries, n, written = sys.argv[1:]
s = open(path).read()
s, k = re.subn(r'(\[manager_map\][^\[]*?entries = )\[[^\]]*\]', lambda m: m.group(1) + '[' + entries + ']', s, flags=re.S)
s = re.sub(r'\nhand_off_written = \w+', '', s)
s, j = re.subn(r'n_chance = \d+', 'n_chance = ' + n + '\nhand_off_written = ' + written, s)
if k != 1 or j != 1:
    sys.exit("write-read.sh: cluster.toml has no manager map or n_chance to set")
open(path, 'w').write(s)
PY
"$X" up --data "$D" --storage-mb $((MB * 4 + 256)) --mount "$M" >/dev/null
head -c $((MB << 20)) /dev/urandom > "$DIR/src"
rate() { python3 -c "import sys; print(round($MB / ($2 - $1)))"; }
for i in $(seq "$RUNS"); do
    s=$(date +%s.%N)
    dd if="$DIR/src" of="$M/w$i" bs=1M conv=fsync status=none
    e=$(date +%s.%N)
    echo "map [$MAP] n_chance $NCHANCE hand_off_written $WRITTEN: write $i: $(rate "$s" "$e") MiB/s"
done
sync; echo 3 > /proc/sys/vm/drop_caches
s=$(date +%s.%N)
dd if="$M/w$RUNS" of=/dev/null bs=1M status=none
e=$(date +%s.%N)
L="map [$MAP] n_chance $NCHANCE hand_off_written $WRITTEN"
echo "$L: cold read: $(rate "$s" "$e") MiB/s"
cmp -s "$DIR/src" "$M/w$RUNS" || { echo "write-read.sh: the file read back differs" >&2; exit 1; }
sync; echo 3 > /proc/sys/vm/drop_caches
iops=$(fio --name=r --filename="$M/w$RUNS" --rw=randread --bs=4k --numjobs=4 --time_based \
    --runtime=8 --group_reporting --output-format=json | python3 -c \
    'import json, sys; print(round(json.load(sys.stdin)["jobs"][0]["read"]["iops"]))')
echo "$L: random 4 KiB reads: $iops IOPS"
"$X" status --data "$D" --counters | awk '
    /handoffs_taken/ {h += $3} /peer_reads/ {p += $3} /storage_reads/ {r += $3}
    /cached_blocks/ {c = c " " $3}
    END {print "counters: handoffs_taken " h ", peer_reads " p ", storage_reads " r ", cached_blocks per node" c}'
