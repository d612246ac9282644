#!/usr/bin/env bash
# test.sh - every test of the project, on a fresh Debian 12 machine with a Rust toolchain:
# installs what the tests need (scripts/setup.sh --tests: apt packages, pjdfstest and fsx
# at pinned versions, the user `tests`), then runs each suite in turn, even when an earlier
# one fails:
#   cargo     cargo test --workspace --no-fail-fast (every crate's unit, simulation,
#             namespace, loop-device, cluster and FUSE-mount tests)
#   posix     scripts/posix-tests.sh (pjdfstest, fsx, dbench on a mounted cluster)
#   cleaner   scripts/cleaner-test.sh (5x the capacity through a 3-node cluster)
#   verbs     scripts/verbs-tests.sh (the verbs tests in a SoftRoCE VM)
# Each suite's log goes to target/test-logs/SUITE.log; its tail is shown when it fails.
# Ends with one line `N passed, M failed` (cargo's tests counted one by one, each script's
# checks as that script reports them) and exits non-zero on any failure. Needs root.
#
#   bash scripts/test.sh                    # everything (what .ci/run runs)
#   bash scripts/test.sh cargo              # only the listed suites, e.g. `cargo posix`
#   XFS_TEST_SKIP=verbs bash scripts/test.sh  # all but the listed suites
#   bash scripts/test.sh --help
# Faster subsets while developing: `cargo test -p CRATE [--test NAME] [FILTER]`; the
# deep checks behind variables are listed in README.md under "Useful knobs".
set -uo pipefail
cd "$(dirname "$0")/.."
ALL=(cargo posix cleaner verbs)
case "${1:-}" in
-h | --help)
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
esac
suites=("$@")
[ ${#suites[@]} -gt 0 ] || suites=("${ALL[@]}")
for s in "${suites[@]}"; do
    [[ " ${ALL[*]} " == *" $s "* ]] || {
        echo "test.sh: unknown suite '$s' (suites: ${ALL[*]})" >&2
        exit 2
    }
done
[ "$(id -u)" = 0 ] || { echo "test.sh: run as root (FUSE mounts, namespaces, loop devices, apt)" >&2; exit 2; }
command -v cargo >/dev/null 2>&1 || {
    echo "test.sh: no cargo: install a Rust toolchain first (https://rustup.rs)" >&2
    exit 2
}

t0=$SECONDS
echo "==> setup (scripts/setup.sh --tests)"
bash scripts/setup.sh --tests || { echo "test.sh: setup failed (see above)" >&2; exit 1; }

logs=target/test-logs
mkdir -p "$logs"
passed=0 failed=0
lines=()

# cargo's per-binary `test result: ok. P passed; F failed; ...` lines, summed.
cargo_counts() {
    awk '/^test result:/ { for (i = 1; i <= NF; i++) {
            if ($(i) ~ /^passed;?$/) p += $(i - 1); if ($(i) ~ /^failed;?$/) f += $(i - 1) } }
         END { print p + 0, f + 0 }' "$1"
}
# A suite script's own checks: its lines `check: NAME: ok|FAILED ...`.
script_counts() {
    awk '/^check: .*: ok/ { p++ } /^check: .*: FAILED/ { f++ } END { print p + 0, f + 0 }' "$1"
}

run_suite() {
    local s=$1 log=$logs/$1.log t=$SECONDS rc p f
    echo "==> $s (log: $log)"
    case $s in
    cargo) cargo test --workspace --no-fail-fast >"$log" 2>&1 ;;
    posix) bash scripts/posix-tests.sh >"$log" 2>&1 ;;
    cleaner) bash scripts/cleaner-test.sh >"$log" 2>&1 ;;
    verbs) bash scripts/verbs-tests.sh >"$log" 2>&1 ;;
    esac
    rc=$?
    if [ "$s" = cargo ]; then
        read -r p f < <(cargo_counts "$log")
    else
        read -r p f < <(script_counts "$log")
    fi
    # A suite that fails without a failed check (a build error, a crash, a missing tool)
    # counts as one failure; one that passes without a single check counts as one too.
    if [ $rc != 0 ] && [ "$f" = 0 ]; then f=1; fi
    if [ $rc = 0 ] && [ "$p" = 0 ]; then
        echo "test.sh: suite $s passed without reporting a single check" >>"$log"
        f=1 rc=1
    fi
    passed=$((passed + p)) failed=$((failed + f))
    local verdict=ok
    if [ $rc != 0 ]; then
        verdict="FAILED (exit $rc)"
        echo "---- last lines of $log ----"
        grep -E '^(test .* FAILED|---- .* stdout ----|check: .*FAILED|error)' "$log" | head -40
        tail -30 "$log"
        echo "----"
    fi
    lines+=("$(printf '%-8s %-18s %5d passed, %d failed, %4d s' "$s" "$verdict" "$p" "$f" $((SECONDS - t)))")
    echo "<== ${lines[-1]}"
}

for s in "${suites[@]}"; do
    [[ ",${XFS_TEST_SKIP:-}," == *",$s,"* ]] && { echo "==> $s skipped (XFS_TEST_SKIP)"; continue; }
    run_suite "$s"
done
echo
printf '%s\n' "${lines[@]}"
echo "$passed passed, $failed failed ($((SECONDS - t0)) s)"
[ "$failed" = 0 ]
