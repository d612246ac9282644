#!/usr/bin/env bash
# Installs the peer tools and runs am-bench with them, in one run.
#   bash bench/run.sh            full run (a few minutes)
#   bash bench/run.sh --quick    under a minute
# Extra arguments go to am-bench (see `am-bench --help`). Results: bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for t in sockperf:sockperf ucx_perftest:ucx-utils fi_pingpong:libfabric-bin qperf:qperf; do
    command -v "${t%%:*}" >/dev/null 2>&1 || need+=("${t##*:}")
done
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
cargo build --release -p bench
exec ./target/release/am-bench "$@"
