#!/usr/bin/env bash
# Look up missing names through node 1's mount of a fresh local cluster: the A/B behind the
# negative-entry note in docs/fuse.md and bench/RESULTS.md (a missing name's second look).
set -euo pipefail

usage() {
    cat <<'EOF2'
Usage: bench/missing-names.sh [OPTIONS]

Starts a fresh 3-node local cluster (xfs-node up --mount), then stats --names missing names
in one directory of the mount --rounds times over, --runs times; prints the median of the
runs in stats per second (each stat must fail with ENOENT: the run stops otherwise), then
stops the cluster.

Options:
  --bin DIR     where xfs-node and xfsam-mount are (default: target/release)
  --names N     missing names (default: 200)
  --rounds N    stats of each name per run (default: 50)
  --runs N      runs (default: 5)
  --dir DIR     scratch directory, emptied first (default: /var/tmp/xfsam-missing-names)
  -h, --help    this text
Needs root (FUSE mount).
EOF2
}

BIN=target/release NAMES=200 ROUNDS=50 RUNS=5 DIR=/var/tmp/xfsam-missing-names
while [ $# -gt 0 ]; do
    case "$1" in
        --bin) BIN=$2; shift 2 ;;
        --names) NAMES=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        --dir) DIR=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "missing-names.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
for b in xfs-node xfsam-mount; do
    [ -x "$BIN/$b" ] || { echo "missing-names.sh: no $BIN/$b: build it (cargo build --release -p xfs-node -p fuse-front) or pass --bin" >&2; exit 2; }
done
for n in "$NAMES" "$ROUNDS" "$RUNS"; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "missing-names.sh: --names, --rounds and --runs take a number of 1 or more (got $n)" >&2; exit 2; }
done

"$BIN/xfs-node" down --data "$DIR/data" >/dev/null 2>&1 || true
umount "$DIR/mnt" 2>/dev/null || true
rm -rf "$DIR"
mkdir -p "$DIR/mnt"
trap '"$BIN/xfs-node" down --data "$DIR/data" >/dev/null 2>&1 || true' EXIT
"$BIN/xfs-node" up --data "$DIR/data" --mount "$DIR/mnt" >/dev/null
python3 - "$DIR/mnt" "$NAMES" "$ROUNDS" "$RUNS" <<'PY'
import os, statistics, sys, time
mnt, names, rounds, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
d = os.path.join(mnt, "missing")
os.makedirs(d, exist_ok=True)
paths = [os.path.join(d, "name%d" % i) for i in range(names)]
rates = []
for _ in range(runs):
    t = time.perf_counter()
    for _ in range(rounds):
        for p in paths:
            try:
                os.stat(p)
                sys.exit("missing-names.sh: %s exists" % p)
            except FileNotFoundError:
                pass
    rates.append(names * rounds / (time.perf_counter() - t))
print("missing-name stats/s: median %.0f of %s" % (statistics.median(rates), ["%.0f" % r for r in rates]))
PY
