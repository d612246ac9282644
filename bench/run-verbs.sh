#!/usr/bin/env bash
# am-bench over RDMA verbs, in the SoftRoCE VM (scripts/softroce-vm.sh): AM round trips over
# am-rdma and perftest's ib_send_lat on the same rxe0 device, in the same VM run.
#   bash bench/run-verbs.sh                       latency, poll and block (about 2 minutes)
#   bash bench/run-verbs.sh --quick               fewer samples
# Extra arguments go to am-bench (see `am-bench --help`). Results: bench/results/verbs/.
# Software RoCE under software emulation (no KVM): compare numbers only within one run.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p bench
mkdir -p bench/results/verbs
args=$(printf '%q ' "$@")
SOFTROCE_RWDIRS="${SOFTROCE_RWDIRS:-} $PWD/bench/results" bash scripts/softroce-vm.sh \
    "./target/release/am-bench --transport rdma --mode latency --no-peers --max-size 4096 --out bench/results/verbs $args"
