#!/usr/bin/env bash
# The log cleaner on a real cluster: 3 node processes on loopback with small storage files,
# a hot/cold workload that writes, overwrites and deletes several times the capacity
# through the CLI, then every file read back and compared with a local mirror, before and
# after a restart of the whole cluster. Fails on any error (ENOSPC included).
#
#   bash scripts/cleaner-test.sh            # 16 MiB per node, 5x the capacity
#   XFS_CLEAN_MB=32 XFS_CLEAN_TIMES=8 bash scripts/cleaner-test.sh
#
# Needs the debug or release build of xfs-node (XFS_NODE=path, default target/debug).
set -euo pipefail
cd "$(dirname "$0")/.."
X=${XFS_NODE:-target/debug/xfs-node}
MB=${XFS_CLEAN_MB:-16}
TIMES=${XFS_CLEAN_TIMES:-5}
PORT=${XFS_CLEAN_PORT:-7600}
[ -x "$X" ] || { echo "no $X: run cargo build -p xfs-node first" >&2; exit 1; }
DATA=$(mktemp -d /var/tmp/xfs-clean.XXXXXX)
MIRROR=$(mktemp -d /tmp/xfs-clean-mirror.XXXXXX)
cleanup() {
    "$X" down --data "$DATA" >/dev/null 2>&1 || true
    rm -rf "$DATA" "$MIRROR"
}
trap cleanup EXIT
fail() {
    echo "FAIL: $*" >&2
    "$X" status --data "$DATA" >&2 || true
    tail -n 20 "$DATA"/node*.log >&2 || true
    exit 1
}

"$X" up --data "$DATA" --storage-mb "$MB" --port "$PORT" >/dev/null
# Capacity: the stripe group's payload (data fragments of every segment the devices hold).
cap_mib=$(( 3 * MB * 2 / 3 ))
target=$(( cap_mib * TIMES * 1024 * 1024 ))
echo "cluster up: 3 x $MB MiB, 2 data + 1 parity (about $cap_mib MiB); writing $((target >> 20)) MiB"

files=24   # the first 4 are hot: 90% of the writes go to them
written=0
n=0
RANDOM=42
start=$(date +%s)
while [ "$written" -lt "$target" ]; do
    n=$((n + 1))
    if [ $((RANDOM % 10)) -lt 9 ]; then f=$((RANDOM % 4)); else f=$((4 + RANDOM % (files - 4))); fi
    if [ $((RANDOM % 10)) -eq 0 ] && [ -e "$MIRROR/f$f" ]; then
        "$X" rm --data "$DATA" "/f$f" || fail "rm /f$f (op $n)"
        rm -f "$MIRROR/f$f"
        continue
    fi
    kib=$(( (1 + RANDOM % 128) * 4 ))
    head -c $((kib * 1024)) /dev/urandom >"$MIRROR/f$f"
    "$X" put --data "$DATA" "$MIRROR/f$f" "/f$f" || fail "put /f$f of $kib KiB (op $n, $((written >> 20)) MiB written)"
    written=$((written + kib * 1024))
    if [ $((n % 100)) -eq 0 ]; then
        echo "  $n ops, $((written >> 20)) of $((target >> 20)) MiB written, $(( $(date +%s) - start )) s"
    fi
done
echo "wrote $((written >> 20)) MiB in $n ops, $(( $(date +%s) - start )) s"

verify() {
    local got
    for f in "$MIRROR"/*; do
        name=$(basename "$f")
        got=$("$X" get --data "$DATA" "/$name" - | cmp - "$f" >/dev/null 2>&1 && echo same || echo differs)
        [ "$got" = same ] || fail "/$name reads back different from what was put ($1)"
    done
    want=$(ls "$MIRROR" | sort | tr '\n' ' ')
    have=$("$X" ls --data "$DATA" / | awk '{print $NF}' | sort | tr '\n' ' ')
    [ "$want" = "$have" ] || fail "listing differs ($1): want [$want] have [$have]"
}
verify "after the workload"
status=$("$X" status --data "$DATA")
echo "$status" | grep -E "^  (space|cleaner)"
cleaned=$(echo "$status" | sed -n 's/.* \([0-9]*\) segments cleaned.*/\1/p')
[ "${cleaned:-0}" -gt 0 ] || fail "the cleaner cleaned nothing"
# The leader (node 1, first in the stripe group) dies: node 2 takes over.
pid1=$(echo "$status" | awk '$1 == "1" {print $2}')
kill -9 "$pid1"
for _ in $(seq 1 40); do
    "$X" status --data "$DATA" 2>/dev/null | grep -q "cleaner: led by node 2" && break
    sleep 0.5
done
"$X" status --data "$DATA" | grep -E "^  cleaner" | grep -q "led by node 2" \
    || fail "node 2 did not take the cleaner over after node 1 died"
echo "node 1 killed: node 2 leads the cleaner"
"$X" down --data "$DATA" >/dev/null 2>&1 || true   # node 1 is dead already
"$X" up --data "$DATA" --storage-mb "$MB" --port "$PORT" >/dev/null
verify "after down and up"
echo "PASS: $((written >> 20)) MiB (${TIMES}x the capacity) written, overwritten and deleted; $(ls "$MIRROR" | wc -l) files read back equal, also after a restart"
