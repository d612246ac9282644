#!/usr/bin/env bash
# setup.sh - install what building and testing this project needs on Debian 12, when
# missing: CMake and libclang (am-rdma's verbs bindings are generated and built with them;
# no RDMA libraries are needed to build), nftables and iproute2 (the namespace tests),
# DejaVu Sans (am-bench's plot) and losetup (the storage tests' loop devices, package
# mount). Needs root for apt. Idempotent and quiet when all is there.
set -euo pipefail
missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
dpkg-query -W -f='${db:Status-Status}' libclang-dev 2>/dev/null | grep -qx installed \
    || missing+=(libclang-dev)
command -v nft >/dev/null 2>&1 || missing+=(nftables)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
command -v losetup >/dev/null 2>&1 || missing+=(mount)
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
