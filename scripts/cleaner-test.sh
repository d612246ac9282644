#!/usr/bin/env bash
# cleaner-test.sh - the log cleaner on a real cluster; `--help` says what it does.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
    cat <<'EOF'
Usage: bash scripts/cleaner-test.sh [--help]

The log cleaner on a real cluster: 3 node processes on loopback with small storage files.
1. A hot/cold workload writes, overwrites and deletes several times the capacity through
   the CLI (any error fails, ENOSPC included); every file is read back and compared with
   a local mirror; the cleaner must have cleaned segments.
2. The cluster restarts with a slow cleaner (cleaner.share = 0.01: it sleeps 99 times as
   long as it works, so a round of 8 segments takes seconds; idle after 1 s, segments up
   to 95% live cleaned: it keeps cleaning) and node 1, the leader, is killed (-9) WHILE a
   round is in progress. In progress means: since the last round the leader reported
   (the `cleaner:` line of `xfs-node status`), the nodes' storage files were read (their
   read_bytes in /proc/PID/io: with no client traffic only the cleaner's moves read
   segments), and node 1 never logged the end of that round (its log prints one
   'N segments cleaned (' line per round that cleaned, just before it reports it).
   Before the kill every file is read back (what the first restart recovered).
3. Node 2 must take the cleaner over; the cluster is restarted and every file read back.

Environment:
  XFS_CLEAN_MB=16      each node's storage, MiB
  XFS_CLEAN_TIMES=5    how many times the capacity the workload writes
  XFS_CLEAN_PORT=7600  first UDP port
  XFS_NODE=target/debug/xfs-node   the xfs-node to run (cargo build -p xfs-node)
Takes about 2 minutes (debug build).
EOF
}
case ${1:-} in
-h | --help) usage; exit 0 ;;
"") ;;
*) echo "cleaner-test: unknown argument '$1' (see --help)" >&2; exit 2 ;;
esac

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
# Each check passed prints `check: cleaner NAME: ok` (scripts/test.sh counts these lines);
# the first that fails prints `check: cleaner: FAILED (why)` and ends the script.
check() { echo "check: cleaner $1: ok"; }
fail() {
    echo "check: cleaner: FAILED ($*)"
    echo "FAIL: $*" >&2
    "$X" status --data "$DATA" >&2 || true
    tail -n 20 "$DATA"/node*.log >&2 || true
    exit 1
}
t_start=$SECONDS

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
    check "every file reads back equal $1"
}
verify "after the workload"
status=$("$X" status --data "$DATA")
echo "$status" | grep -E "^  (space|cleaner)"
cleaned=$(echo "$status" | sed -n 's/.* \([0-9]*\) segments cleaned.*/\1/p')
[ "${cleaned:-0}" -gt 0 ] || fail "the cleaner cleaned nothing"
check "cleaned segments ($cleaned)"

# A slow cleaner that keeps cleaning, so that node 1 can be killed inside a round.
"$X" down --data "$DATA" >/dev/null
cfg=$DATA/cluster.toml
sed -i 's/^share = .*/share = 0.01/; s/^idle_ms = .*/idle_ms = 1000/; s/^idle_utilisation = .*/idle_utilisation = 0.95/' "$cfg"
for kv in "share = 0.01" "idle_ms = 1000" "idle_utilisation = 0.95"; do
    grep -qx "$kv" "$cfg" || fail "cannot set cleaner.$kv in $cfg (has its [cleaner] section changed?)"
done
"$X" up --data "$DATA" --storage-mb "$MB" --port "$PORT" >/dev/null
verify "after a restart"
pid() { tr -d ' \n' <"$DATA/node$1.pid"; }
pids=("$(pid 1)" "$(pid 2)" "$(pid 3)")
# Bytes the three nodes have read from their storage files (O_DIRECT: real reads).
reads() {
    local sum=0 p r
    for p in "${pids[@]}"; do
        r=$(awk '$1 == "read_bytes:" {print $2}' "/proc/$p/io") || fail "no /proc/$p/io (node died?)"
        sum=$((sum + r))
    done
    echo "$sum"
}
cleaner_line() { "$X" status --data "$DATA" | grep '^  cleaner:' || true; }
rounds_logged() { grep -c 'cleaner of stripe group 0: [0-9]* segments cleaned (' "$DATA/node1.log" || true; }
# Wait for reads after the last round node 1 reported (a deadline only against a hang).
base_line=""
deadline=$((SECONDS + 300))
while :; do
    [ "$SECONDS" -lt "$deadline" ] || fail "no cleaning round seen in 300 s (last: $base_line)"
    line=$(cleaner_line)
    [[ $line == *"led by node 1"* ]] || { sleep 0.2; continue; }
    if [ "$line" != "$base_line" ]; then
        # A round ended (or the leader reported something else): start again from here.
        base_line=$line
        base_reads=$(reads)
        base_logged=$(rounds_logged)
        continue
    fi
    kill_reads=$(reads)
    [ "$kill_reads" -gt "$base_reads" ] && break
    sleep 0.2
done
kill -9 "${pids[0]}"
killed_logged=$(rounds_logged)
echo "node 1 killed; its last report: ${base_line#  cleaner: }"
# Started: segments were read after node 1's last report. Not finished: node 1 logged no
# end of a round after that report.
[ "$kill_reads" -gt "$base_reads" ] \
    || fail "no round in progress at the kill: no segment was read since node 1's last report"
[ "$killed_logged" = "$base_logged" ] \
    || fail "no round in progress at the kill: node 1 logged the end of a round after its last report ($base_logged then $killed_logged rounds logged): $(tail -n 1 "$DATA/node1.log")"
check "the leader killed inside a round"
echo "the kill came inside a round: $(( (kill_reads - base_reads) >> 10 )) KiB of segments read since node 1's last report, and it never logged that round's end"
deadline=$((SECONDS + 120))
until cleaner_line | grep -q "led by node 2"; do
    [ "$SECONDS" -lt "$deadline" ] || fail "node 2 did not take the cleaner over within 120 s of node 1's death"
    sleep 0.5
done
check "node 2 took the cleaner over"
echo "node 2 leads the cleaner: $(cleaner_line | sed 's/^  cleaner: //')"
"$X" down --data "$DATA" >/dev/null 2>&1 || true   # node 1 is dead already
"$X" up --data "$DATA" --storage-mb "$MB" --port "$PORT" >/dev/null
verify "after the kill, down and up"
echo "PASS: $((written >> 20)) MiB (${TIMES}x the capacity) written, overwritten and deleted; the leader killed inside a cleaning round, node 2 took over; $(ls "$MIRROR" | wc -l) files read back equal, also after a restart ($((SECONDS - t_start)) s)"
