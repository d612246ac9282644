#!/usr/bin/env bash
# verbs-tests.sh - run the verbs tests (am-rdma's suite, the two-process tests over verbs) in
# a throw-away QEMU VM with SoftRoCE (scripts/softroce-vm.sh), with AM_RDMA_REQUIRE=1 so a
# missing device fails instead of skipping. Builds the test binaries on the host first (the
# guest runs them from the shared file system). Prints how many verbs tests ran; fails on
# zero, on fewer than expected, and on any failure. Needs root (apt, /lib/modules).
#
#   bash scripts/verbs-tests.sh            # everything
#   bash scripts/verbs-tests.sh bulk_64    # only tests whose name contains the filter
set -euo pipefail
cd "$(dirname "$0")/.."
FILTER=${1:-}
EXPECTED=9   # verbs tests in total (6 in am-rdma/tests/verbs.rs, 2 in am-udp/tests/processes.rs,
             # 1 in xfs-node/tests/cluster.rs)

echo "[verbs-tests] building the test binaries" >&2
json=$(cargo test -p am-rdma -p am-udp -p xfs-node --no-run --message-format=json 2>/dev/null)
exe_of() {
    # The executable of test target $1 (from cargo's JSON messages).
    echo "$json" | grep "\"name\":\"$1\"" | grep -o '"executable":"[^"]*"' | head -1 | cut -d'"' -f4
}
VERBS=$(exe_of verbs)
PROCS=$(exe_of processes)
CLUSTER=$(exe_of cluster)
[ -x "$VERBS" ] && [ -x "$PROCS" ] && [ -x "$CLUSTER" ] || { echo "[verbs-tests] test binaries not found" >&2; exit 1; }
VERBS=${VERBS#"$PWD/"}
PROCS=${PROCS#"$PWD/"}
CLUSTER=${CLUSTER#"$PWD/"}
# The cluster test keeps its sockets in the guest's /tmp and its storage on loop devices
# there (the shared 9p file systems take neither Unix sockets nor O_DIRECT).

LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
inner="set -e; export AM_RDMA_REQUIRE=1 RUST_BACKTRACE=1 AM_RDMA_TRACE=${AM_RDMA_TRACE:-0};
$VERBS --test-threads=1 --show-output $FILTER;
$PROCS --test-threads=1 --show-output over_verbs $FILTER;
modprobe loop 2>/dev/null || true; devs=; for i in 1 2 3; do truncate -s 64M /tmp/xfs-dev\$i; devs=\$devs\$(losetup -f --show /tmp/xfs-dev\$i),; done;
XFS_TEST_DIR=/tmp XFS_TEST_DEVICES=\${devs%,} $CLUSTER --test-threads=1 --show-output over_verbs $FILTER"
set +e
SOFTROCE_RWDIRS="${SOFTROCE_RWDIRS:-} $PWD/target" bash scripts/softroce-vm.sh "$inner" 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
set -e
ran=$(grep -c '^VERBS-TEST-RAN ' "$LOG" || true)
echo "[verbs-tests] verbs tests that ran inside the VM: $ran (exit status $rc)"
[ "$rc" = 0 ] || { echo "[verbs-tests] FAILED" >&2; exit "$rc"; }
[ "$ran" -gt 0 ] || { echo "[verbs-tests] no verbs test ran" >&2; exit 1; }
if [ -z "$FILTER" ] && [ "$ran" -lt "$EXPECTED" ]; then
    echo "[verbs-tests] only $ran of $EXPECTED verbs tests ran" >&2
    exit 1
fi
