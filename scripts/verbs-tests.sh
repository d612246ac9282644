#!/usr/bin/env bash
# verbs-tests.sh - run the verbs tests (am-rdma's suite, the two-process tests over verbs, the
# cluster over verbs) in a throw-away QEMU VM with SoftRoCE (scripts/softroce-vm.sh), with
# AM_RDMA_REQUIRE=1 so a missing device fails instead of skipping. Builds the test binaries
# on the host first (the guest runs them from the shared file system). Every binary runs even
# when an earlier one fails; the script prints each test's result and the totals, and fails
# on any failure, on a binary that did not finish, and when fewer verbs tests ran than the
# binaries list (`--list`, with the same filters). Needs root (apt, /lib/modules).
#
#   bash scripts/verbs-tests.sh            # everything
#   bash scripts/verbs-tests.sh bulk_64    # only tests whose name contains the filter
#   bash scripts/verbs-tests.sh --help
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
-h | --help)
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
esac
FILTER=${1:-}

echo "[verbs-tests] building the test binaries" >&2
json=$(cargo test -p am-rdma -p am-testkit -p xfs-node --no-run --message-format=json 2>/dev/null)
exe_of() {
    # The executable of test target $1 (from cargo's JSON messages), relative to the checkout.
    local e
    e=$(echo "$json" | grep "\"name\":\"$1\"" | grep -o '"executable":"[^"]*"' | head -1 | cut -d'"' -f4)
    [ -x "$e" ] || { echo "[verbs-tests] test binary $1 not found" >&2; exit 1; }
    echo "${e#"$PWD/"}"
}
# binary | the filter that picks its verbs tests ("" = all of them)
SUITES=("$(exe_of verbs)|" "$(exe_of processes)|over_verbs" "$(exe_of cluster)|over_verbs")

# The expected tests: what each binary lists under its filter and the user's.
expected=()
for s in "${SUITES[@]}"; do
    bin=${s%%|*} sel=${s#*|}
    while IFS= read -r t; do
        [ -n "$t" ] || continue
        [[ -z "$FILTER" || "$t" == *"$FILTER"* ]] && expected+=("$t")
    done < <("$bin" --list ${sel:+"$sel"} 2>/dev/null | sed -n 's/: test$//p')
done
echo "[verbs-tests] ${#expected[@]} verbs tests to run${FILTER:+ (filter '$FILTER')}" >&2
[ "${#expected[@]}" -gt 0 ] || { echo "[verbs-tests] no test matches '$FILTER'" >&2; exit 1; }

# Inside the guest: every binary, each one's exit status reported (no set -e).
inner="export AM_RDMA_REQUIRE=1 RUST_BACKTRACE=1 AM_RDMA_TRACE=${AM_RDMA_TRACE:-0}; failed=0
run() { local bin=\$1; shift; \"\$bin\" --test-threads=1 --show-output \"\$@\"; local rc=\$?;
        echo \"VERBS-BINARY \$bin exit \$rc\"; [ \$rc = 0 ] || failed=1; }
run ${SUITES[0]%%|*} $FILTER
run ${SUITES[1]%%|*} over_verbs $FILTER
modprobe loop 2>/dev/null || true; devs=; for i in 1 2 3; do truncate -s 64M /tmp/xfs-dev\$i; devs=\$devs\$(losetup -f --show /tmp/xfs-dev\$i),; done
XFS_TEST_DIR=/tmp XFS_TEST_DEVICES=\${devs%,} run ${SUITES[2]%%|*} over_verbs $FILTER
exit \$failed"

LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
set +e
SOFTROCE_RWDIRS="${SOFTROCE_RWDIRS:-} $PWD/target" bash scripts/softroce-vm.sh "$inner" 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
set -e

# Each expected test: ran (printed VERBS-TEST-RAN) and passed (libtest's "... ok").
passed=0 failed=0 missing=0
echo "[verbs-tests] results:"
for t in "${expected[@]}"; do
    if grep -q "^test $t \.\.\. ok$" "$LOG" && grep -Eq "^VERBS-TEST-RAN $t( |$)" "$LOG"; then
        result=ok passed=$((passed + 1))
    elif grep -q "^test $t \.\.\. ok$" "$LOG"; then
        result="SKIPPED (passed without a device)" missing=$((missing + 1))
    elif grep -q "^test $t \.\.\. FAILED$" "$LOG"; then
        result=FAILED failed=$((failed + 1))
    else
        result="DID NOT RUN" missing=$((missing + 1))
    fi
    echo "[verbs-tests]   $result  $t"
    # The line scripts/test.sh counts.
    if [ "$result" = ok ]; then echo "check: verbs $t: ok"; else echo "check: verbs $t: FAILED ($result)"; fi
done
binaries=$(grep -c '^VERBS-BINARY ' "$LOG" || true)
echo "[verbs-tests] ${#expected[@]} expected: $passed passed, $failed failed, $missing did not run;" \
    "$binaries of ${#SUITES[@]} binaries finished (VM exit status $rc)"
[ "$rc" = 0 ] && [ "$failed" = 0 ] && [ "$missing" = 0 ] && [ "$passed" = "${#expected[@]}" ] &&
    [ "$binaries" = "${#SUITES[@]}" ] || { echo "[verbs-tests] FAILED" >&2; exit 1; }
echo "[verbs-tests] PASS"
