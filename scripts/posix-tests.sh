#!/usr/bin/env bash
# posix-tests.sh - the POSIX suites on a mounted 3-node cluster (root, FUSE).
# Run `bash scripts/posix-tests.sh --help` for what it runs, checks and takes.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

usage() {
    cat <<'EOF'
Usage: bash scripts/posix-tests.sh [--only SUITES] [--help]

Starts a local 3-node cluster (`xfs-node up --mount`, release build) and runs, through
node 1's mount:
  pjdfstest      every test; its exit status, and its Summary line must be exactly
                 382 passed, 0 failed, 16 skipped, 0 expected failures, 398 total, the
                 16 skipped tests exactly the ones listed in this script
  fsx seed 1     XFS_FSX_OPS operations with the fixed seed 1
  fsx random     XFS_FSX_OPS operations with a fresh random seed (printed; replay it
                 with XFS_FSX_SEED=<seed>)
  dbench         2 clients for XFS_DBENCH_SECS seconds; its exit status and no error
                 line of its own (ERROR, failed, expected, Bad..., NT_STATUS_...)
and then through node 2's mount (`xfs-node mount --node 2`: another node's client):
  pjdfstest      the same checks
  fsx seed 1     XFS_FSX_OPS2 operations (a quarter of XFS_FSX_OPS: time)
and through both mounts at once (fsx-mounts, fs-testkit: each operation through one of
the two mounts, every read and size checked against a model after every operation):
  fsx-mounts seed 1   XFS_FSX_MOUNTS_OPS operations with the fixed seed 1
  fsx-mounts random   XFS_FSX_MOUNTS_OPS operations with a fresh random seed (printed;
                      replay it with XFS_FSX_MOUNTS_SEED=<seed>)
Each fsx-mounts must exit 0 and print its summary with exactly that many operations and
0 mismatches.
Each fsx must exit 0 and print 'All operations completed A-OK!'. pjdfstest and fsx must
be the versions scripts/setup.sh pins. Every suite runs even if one fails; at the end one
line per suite (result, counts, seconds) and 'N passed, N failed'; exit 1 if any failed
(the outputs are then kept, the path is printed). About 12 minutes on 2 cores.

Options:
  --only SUITES  run only these, comma-separated: pjdfstest, fsx, dbench (node 1's
                 mount; fsx is both fsx runs), node2 (both passes through node 2),
                 mounts (both fsx-mounts runs);
                 the others are listed as 'not run (--only)'
  --help         this text

Environment:
  XFS_FSX_OPS=100000         operations of each fsx through node 1
  XFS_FSX_OPS2=OPS/4         operations of the fsx through node 2
  XFS_FSX_SEED=<n>           the 'random' fsx's seed (replay a failed random run)
  XFS_FSX_MOUNTS_OPS=100000  operations of each fsx-mounts run (1000000 for the deep run)
  XFS_FSX_MOUNTS_SEED=<n>    the 'random' fsx-mounts run's seed
  XFS_DBENCH_SECS=20         dbench's run time
  XFS_POSIX_STORAGE_MB=<n>   each node's storage file (default from the fsx ops)
Needs: pjdfstest, fsx, dbench, fusermount3 and the user `tests`
(all from `bash scripts/setup.sh --tests`).
EOF
}

only=pjdfstest,fsx,dbench,node2,mounts
while [ $# -gt 0 ]; do
    case $1 in
    -h | --help) usage; exit 0 ;;
    --only)
        [ $# -ge 2 ] || { echo "posix-tests: --only needs a list, e.g. --only fsx,dbench" >&2; exit 2; }
        only=$2
        shift 2
        ;;
    *) echo "posix-tests: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
for s in ${only//,/ }; do
    case $s in
    pjdfstest | fsx | dbench | node2 | mounts) ;;
    *) echo "posix-tests: --only: no suite '$s' (pjdfstest, fsx, dbench, node2, mounts)" >&2; exit 2 ;;
    esac
done
selected() { [[ ",$only," == *",$1,"* ]]; }

# What pjdfstest must report. These are the numbers of pjdfstest $PJDFSTEST_VERSION (pinned
# in setup.sh) with scripts/pjdfstest.toml on this mount, as it ran on 2026-12-04 through
# node 1 and node 2 alike: "Summary: 0 failed, 16 skipped, 382 passed, 0 expected
# failures, 398 total". A new pjdfstest version, or a feature added to pjdfstest.toml,
# changes them: run this script, check each new skip or test, and update all of these
# together with the version.
pjd_want_passed=382
pjd_want_failed=0
pjd_want_skipped=16
pjd_want_xfail=0
pjd_want_total=398
# The skips: the 15 tests that need a read-only remount (allow_remount = false) or a
# second file system (no --secondary-fs), and link_count_max: LINK_MAX, which pathconf
# cannot report for any FUSE file system. Sorted.
pjd_want_skips="chmod::erofs_named
chown::erofs_named
chown::lchown::erofs_named
link::erofs_named
link::exdev_target
link::link_count_max
mkdir::erofs_new_file
mkfifo::erofs_new_file
open::erofs_named
open::erofs_new_file
rename::erofs_named
rename::exdev_target
rmdir::erofs_named
symlink::erofs_new_file
truncate::erofs_named
unlink::erofs_named"

need() {
    command -v "$1" >/dev/null 2>&1 || { echo "posix-tests: missing $1: $2" >&2; exit 1; }
}
need pjdfstest "bash scripts/setup.sh --tests"
need fsx "bash scripts/setup.sh --tests"
need dbench "apt-get install -y dbench (or bash scripts/setup.sh --tests)"
need fusermount3 "apt-get install -y fuse3 (or bash scripts/setup.sh --tests)"
id tests >/dev/null 2>&1 || {
    echo "posix-tests: pjdfstest needs a user 'tests': useradd -U -M -s /usr/sbin/nologin tests" >&2
    exit 1
}
[ "$(id -u)" = 0 ] || { echo "posix-tests: run as root (FUSE mounts, pjdfstest's users)" >&2; exit 1; }
# The versions the counts above are for: the ones setup.sh pins (one place for both).
for tool in pjdfstest fsx; do
    var=$(echo "$tool" | tr a-z A-Z)_VERSION
    want=$(sed -n "s/^$var=\([0-9.]*\)$/\1/p" scripts/setup.sh)
    [ -n "$want" ] || { echo "posix-tests: scripts/setup.sh pins no $var" >&2; exit 1; }
    have=$("$tool" --version 2>/dev/null | awk 'NR == 1 {print $2}')
    if [ "$have" != "$want" ]; then
        echo "posix-tests: $tool is version ${have:-unknown}, this script's checks are for $want:" \
            "bash scripts/setup.sh --tests (or cargo install --locked --force $tool --version $want)" >&2
        exit 1
    fi
done

number() { # VARIABLE VALUE
    [[ $2 =~ ^[0-9]+$ ]] || { echo "posix-tests: $1=$2: want a number (see --help)" >&2; exit 2; }
}
ops=${XFS_FSX_OPS:-100000}
number XFS_FSX_OPS "$ops"
ops2=${XFS_FSX_OPS2:-$(((ops + 3) / 4))}
number XFS_FSX_OPS2 "$ops2"
seed=${XFS_FSX_SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}
number XFS_FSX_SEED "$seed"
dbench_secs=${XFS_DBENCH_SECS:-20}
number XFS_DBENCH_SECS "$dbench_secs"
mops=${XFS_FSX_MOUNTS_OPS:-100000}
number XFS_FSX_MOUNTS_OPS "$mops"
mseed=${XFS_FSX_MOUNTS_SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}
number XFS_FSX_MOUNTS_SEED "$mseed"
[ "$mseed" != 0 ] || mseed=1 # fsx-mounts takes 0 as 'pick one'
cargo build --release -q -p xfs-node -p fuse-front -p fs-testkit
X=$root/target/release/xfs-node
FSX_MOUNTS=$root/target/release/fsx-mounts
work=$(mktemp -d /var/tmp/xfs-posix.XXXXXX)
logs=$(mktemp -d /var/tmp/xfs-posix-logs.XXXXXX)
chmod 755 "$work" # pjdfstest switches to other users: they must reach the mounts
mnt=$work/mnt
mnt2=$work/mnt2
mkdir -p "$mnt" "$mnt2"
keep_logs=false
cleanup() {
    "$X" down --data "$work/cluster" >/dev/null 2>&1 || true
    umount -l "$mnt" 2>/dev/null || true
    umount -l "$mnt2" 2>/dev/null || true
    rm -rf "$work"
    $keep_logs || rm -rf "$logs"
}
trap cleanup EXIT

# fsx's mapped writes msync (fsync) every time, and each fsync seals a segment: give the
# nodes room for the log of every fsx run (about 1.3 GB per 100,000 operations before
# cleaning; the storage files are sparse).
all_ops=$((2 * ops + ops2 + 2 * mops))
storage=${XFS_POSIX_STORAGE_MB:-$((4096 * ((all_ops + 99999) / 100000)))}
"$X" up --data "$work/cluster" --port 7900 --storage-mb "$storage" \
    --mount "$mnt" --allow-other
if selected node2 || selected mounts; then
    "$X" mount --data "$work/cluster" --node 2 --allow-other "$mnt2"
fi

results=()
npass=0
nfail=0
# record NAME PASS|FAIL SECONDS DETAIL
record() {
    results+=("$(printf '%-26s %-4s %4s s  %s' "$1" "$2" "$3" "$4")")
    # One line per suite that scripts/test.sh counts.
    if [ "$2" = PASS ]; then echo "check: $1: ok ($4)"; else echo "check: $1: FAILED ($4)"; fi
    if [ "$2" = PASS ]; then npass=$((npass + 1)); else nfail=$((nfail + 1)); fi
}
not_run() { results+=("$(printf '%-26s %-4s %6s  %s' "$1" - - "not run (--only $only)")"); }

# pjdfstest NAME DIR: run every test in DIR (a fresh directory on a mount).
pjd() {
    local name=$1 dir=$2 out="$logs/$3" t0=$SECONDS rc=0 problems=() text summary
    mkdir "$dir" 2>"$out" || { cat "$out" >&2; record "$name" FAIL 0 "cannot create $dir"; return; }
    (cd "$dir" && NO_COLOR=1 pjdfstest -c "$root/scripts/pjdfstest.toml" -p "$dir") \
        >"$out" 2>&1 || rc=$?
    local secs=$((SECONDS - t0))
    text=$(sed 's/\x1b\[[0-9;]*m//g' "$out")
    [ "$rc" = 0 ] || problems+=("exit status $rc")
    summary=$(grep '^Summary:' <<<"$text" || true)
    local re='^Summary: ([0-9]+) failed, ([0-9]+) skipped, ([0-9]+) passed, ([0-9]+) expected failures, ([0-9]+) total$'
    local counts="no Summary line"
    if [[ $(grep -c '^Summary:' <<<"$text" || true) == 1 && $summary =~ $re ]]; then
        local f=${BASH_REMATCH[1]} s=${BASH_REMATCH[2]} p=${BASH_REMATCH[3]}
        local x=${BASH_REMATCH[4]} t=${BASH_REMATCH[5]}
        counts="$p passed, $f failed, $s skipped, $x expected failures, $t total"
        [ "$p" = "$pjd_want_passed" ] || problems+=("$p passed, want $pjd_want_passed")
        [ "$f" = "$pjd_want_failed" ] || problems+=("$f failed, want $pjd_want_failed")
        [ "$s" = "$pjd_want_skipped" ] || problems+=("$s skipped, want $pjd_want_skipped")
        [ "$x" = "$pjd_want_xfail" ] || problems+=("$x expected failures, want $pjd_want_xfail")
        [ "$t" = "$pjd_want_total" ] || problems+=("$t total, want $pjd_want_total")
    else
        problems+=("not one Summary line of the expected form (got: ${summary:-none})")
    fi
    local skips
    skips=$(awk 'NF == 2 && $2 == "skipped" {print $1}' <<<"$text" | sort)
    if [ "$skips" != "$pjd_want_skips" ]; then
        local extra missing
        extra=$(comm -23 <(echo "$skips") <(echo "$pjd_want_skips") | tr '\n' ' ')
        missing=$(comm -13 <(echo "$skips") <(echo "$pjd_want_skips") | tr '\n' ' ')
        problems+=("skipped tests differ: skipped but should run: [${extra% }]; expected skips that ran or are gone: [${missing% }]")
    fi
    local failed
    failed=$(awk '$NF == "FAILED" || $NF == "UNEXPECTEDLY" {print $1}' <<<"$text" | tr '\n' ' ')
    [ -z "$failed" ] || problems+=("failed: ${failed% }")
    if [ ${#problems[@]} = 0 ]; then
        record "$name" PASS "$secs" "$counts; the $pjd_want_skipped expected skips"
    else
        grep -A4 'FAILED\|UNEXPECTEDLY' <<<"$text" | grep -v '^ *[0-9]*: \|^ *at ' | head -60 >&2 || true
        [ -n "$summary" ] || tail -20 "$out" >&2
        local why
        why=$(printf '%s; ' "${problems[@]}")
        why=${why%; }
        echo "posix-tests: $name FAILED: $why (output: $out)" >&2
        record "$name" FAIL "$secs" "$why"
    fi
}

# fsx_run NAME FILE OPS SEED HOW-TO-REPLAY
fsx_run() {
    local name=$1 file=$2 n=$3 s=$4 replay=$5 out="$logs/$(basename "$2").out" t0=$SECONDS rc=0
    local problems=()
    (cd "$logs" && fsx -N "$n" -S "$s" -P "$logs" "$file") >"$out" 2>&1 || rc=$?
    local secs=$((SECONDS - t0))
    [ "$rc" = 0 ] || problems+=("exit status $rc")
    grep -qx 'All operations completed A-OK!' "$out" \
        || problems+=("no 'All operations completed A-OK!' line")
    if [ ${#problems[@]} = 0 ]; then
        record "$name" PASS "$secs" "$n operations A-OK, seed $s"
    else
        tail -40 "$out" >&2
        local why
        why=$(printf '%s; ' "${problems[@]}")
        why=${why%; }
        echo "posix-tests: $name FAILED: $why; seed $s, replay: $replay (output and fsx's logs: $logs)" >&2
        record "$name" FAIL "$secs" "$why; seed $s; replay: $replay"
    fi
}

# fsx_mounts_run NAME FILE OPS SEED HOW-TO-REPLAY: fsx-mounts over node 1's and node 2's
# mounts.
fsx_mounts_run() {
    local name=$1 file=$2 n=$3 s=$4 replay=$5 out="$logs/$2.out" t0=$SECONDS rc=0
    local problems=()
    "$FSX_MOUNTS" --ops "$n" --seed "$s" --file "$file" --progress-every 0 "$mnt" "$mnt2" \
        >"$out" 2>&1 || rc=$?
    local secs=$((SECONDS - t0))
    [ "$rc" = 0 ] || problems+=("exit status $rc")
    local summary
    summary=$(grep -E "^fsx-mounts: seed $s: [0-9]+ operations, 0 mismatches " "$out" || true)
    [[ $summary =~ ^fsx-mounts:\ seed\ $s:\ $n\ operations,\ 0\ mismatches ]] \
        || problems+=("no summary line with $n operations and 0 mismatches (got: ${summary:-none})")
    if [ ${#problems[@]} = 0 ]; then
        record "$name" PASS "$secs" "${summary#fsx-mounts: }"
    else
        tail -40 "$out" >&2
        local why
        why=$(printf '%s; ' "${problems[@]}")
        why=${why%; }
        echo "posix-tests: $name FAILED: $why; seed $s, replay: $replay (output: $out)" >&2
        record "$name" FAIL "$secs" "$why; seed $s; replay: $replay"
    fi
}

# dbench_run NAME DIR
dbench_run() {
    local name=$1 dir=$2 out="$logs/dbench.out" t0=$SECONDS rc=0 problems=()
    mkdir "$dir" 2>"$out" || { cat "$out" >&2; record "$name" FAIL 0 "cannot create $dir"; return; }
    dbench -D "$dir" -t "$dbench_secs" 2 >"$out" 2>&1 || rc=$?
    local secs=$((SECONDS - t0))
    [ "$rc" = 0 ] || problems+=("exit status $rc")
    # dbench 4.00's own error lines ("[N] open X failed for handle N (...)", "(N) ERROR:
    # handle N was not found", "[N] unlink X failed (...) - expected NT_STATUS_OK",
    # "wrote N bytes, expected to write N", "Badly formed status", "Child failed with
    # status N", "FAILED TO START"): read from its binary, and seen with an op made to fail.
    # Not one of them: "failed to create barrier semaphore", which dbench 4.00 prints when
    # semget() returns semaphore id 0 (`if (!(barrier = semget(...)))`: a valid id, the
    # first set of a fresh IPC namespace); a real semget failure shows as "failed to
    # initialize the barrier semaphore" next, and that still counts.
    local errors
    errors=$(grep -E 'ERROR|[Ff]ailed|FAILED|expected|Bad|NT_STATUS_' "$out" \
        | grep -vx 'failed to create barrier semaphore *' || true)
    [ -z "$errors" ] || problems+=("$(grep -c . <<<"$errors") error lines: $(head -3 <<<"$errors" | paste -sd "|")")
    grep -q '^dbench version 4.00 ' "$out" || problems+=("not dbench 4.00 (its error lines may differ)")
    local tput
    tput=$(grep -E '^Throughput [0-9.]+ MB/sec +2 clients' "$out" || true)
    [ -n "$tput" ] || problems+=("no 'Throughput ... 2 clients' line")
    if [ ${#problems[@]} = 0 ]; then
        record "$name" PASS "$secs" "2 clients, $dbench_secs s, no error line: $(echo "$tput" | tr -s ' ')"
    else
        [ -z "$errors" ] || echo "$errors" | head -20 >&2
        tail -20 "$out" >&2
        local why
        why=$(printf '%s; ' "${problems[@]}")
        why=${why%; }
        echo "posix-tests: $name FAILED: $why (output: $out)" >&2
        record "$name" FAIL "$secs" "$why"
    fi
}

t_all=$SECONDS
replay_seed1="XFS_FSX_OPS=$ops bash scripts/posix-tests.sh --only fsx (the same seed 1)"
replay_random="XFS_FSX_SEED=$seed XFS_FSX_OPS=$ops bash scripts/posix-tests.sh --only fsx"
if selected pjdfstest; then pjd "pjdfstest (node 1)" "$mnt/pjd" pjdfstest-node1.out; else not_run "pjdfstest (node 1)"; fi
if selected fsx; then
    fsx_run "fsx seed 1 (node 1)" "$mnt/fsx-seed1.dat" "$ops" 1 "$replay_seed1"
    echo "posix-tests: fsx random seed $seed${XFS_FSX_SEED:+ (from XFS_FSX_SEED)}; replay: $replay_random"
    fsx_run "fsx random (node 1)" "$mnt/fsx-random.dat" "$ops" "$seed" "$replay_random"
else
    not_run "fsx seed 1 (node 1)"
    not_run "fsx random (node 1)"
fi
if selected dbench; then dbench_run "dbench (node 1)" "$mnt/dbench"; else not_run "dbench (node 1)"; fi
if selected node2; then
    pjd "pjdfstest (node 2)" "$mnt2/pjd2" pjdfstest-node2.out
    fsx_run "fsx seed 1 (node 2)" "$mnt2/fsx-node2-seed1.dat" "$ops2" 1 \
        "XFS_FSX_OPS=$ops XFS_FSX_OPS2=$ops2 bash scripts/posix-tests.sh --only node2"
else
    not_run "pjdfstest (node 2)"
    not_run "fsx seed 1 (node 2)"
fi
if selected mounts; then
    fsx_mounts_run "fsx-mounts seed 1" fsx-mounts-seed1.dat "$mops" 1 \
        "XFS_FSX_MOUNTS_OPS=$mops bash scripts/posix-tests.sh --only mounts (the same seed 1)"
    m_replay="XFS_FSX_MOUNTS_SEED=$mseed XFS_FSX_MOUNTS_OPS=$mops bash scripts/posix-tests.sh --only mounts"
    echo "posix-tests: fsx-mounts random seed $mseed${XFS_FSX_MOUNTS_SEED:+ (from XFS_FSX_MOUNTS_SEED)}; replay: $m_replay"
    fsx_mounts_run "fsx-mounts random" fsx-mounts-random.dat "$mops" "$mseed" "$m_replay"
else
    not_run "fsx-mounts seed 1"
    not_run "fsx-mounts random"
fi

echo "posix-tests: results ($((SECONDS - t_all)) s in all)"
for r in "${results[@]}"; do echo "  $r"; done
if [ "$nfail" -gt 0 ]; then
    keep_logs=true
    echo "posix-tests: outputs kept in $logs"
fi
echo "posix-tests: $npass passed, $nfail failed"
[ "$nfail" = 0 ]
