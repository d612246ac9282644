#!/usr/bin/env bash
# setup.sh - install what building and testing this project needs on Debian 12, when
# missing: CMake and libclang (am-rdma's verbs bindings are generated and built with them;
# no RDMA libraries are needed to build), DPDK 22.11 (libdpdk-dev, dpdk-dev, pkg-config:
# am-dpdk), nftables, iproute2 and ethtool (the namespace tests),
# DejaVu Sans (am-bench's plot), losetup (the storage tests' loop devices, package
# mount), fuse3 (fusermount3) and nsenter for the mount; with --tests also the POSIX
# suites of scripts/posix-tests.sh: dbench (apt), pjdfstest and fsx (cargo install
# --locked, the versions pinned below: reinstalled when another version is found) and the
# user `tests` that pjdfstest switches to. Needs root. Idempotent and quiet when all is
# there.
set -euo pipefail
missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
dpkg-query -W -f='${db:Status-Status}' libclang-dev 2>/dev/null | grep -qx installed \
    || missing+=(libclang-dev)
# DPDK 22.11 for am-dpdk (headers and pkg-config file; dpdk-dev adds dpdk-testpmd);
# without it am-dpdk builds a stand-in and its tests fail naming these packages.
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
for p in libdpdk-dev dpdk-dev; do
    dpkg-query -W -f='${db:Status-Status}' $p 2>/dev/null | grep -qx installed || missing+=($p)
done
command -v ethtool >/dev/null 2>&1 || missing+=(ethtool)
command -v nft >/dev/null 2>&1 || missing+=(nftables)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
command -v losetup >/dev/null 2>&1 || missing+=(mount)
command -v nsenter >/dev/null 2>&1 || missing+=(util-linux)
command -v fusermount3 >/dev/null 2>&1 || missing+=(fuse3)
tests=false
[ "${1:-}" = --tests ] && tests=true
$tests && { command -v dbench >/dev/null 2>&1 || missing+=(dbench); }
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "setup.sh: missing ${missing[*]}; run as root or: apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
    echo "setup.sh: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >&2
fi
$tests || exit 0
# The versions scripts/posix-tests.sh's expected counts are for (it reads them here):
# change one only together with those counts.
PJDFSTEST_VERSION=0.2.2
FSX_VERSION=0.3.2
for tool in pjdfstest fsx; do
    case $tool in pjdfstest) want=$PJDFSTEST_VERSION ;; fsx) want=$FSX_VERSION ;; esac
    have=$("$tool" --version 2>/dev/null | awk 'NR == 1 {print $2}' || true)
    if [ "$have" != "$want" ]; then
        echo "setup.sh: cargo install --locked --force $tool --version $want (found: ${have:-none})" >&2
        cargo install --locked --force -q "$tool" --version "$want" >&2
    fi
done
if ! id tests >/dev/null 2>&1; then
    # pjdfstest's second dummy user (the first is nobody/nogroup).
    useradd -U -M -s /usr/sbin/nologin tests
fi
