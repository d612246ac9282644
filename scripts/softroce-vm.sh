#!/usr/bin/env bash
# softroce-vm.sh - run a command inside a throw-away QEMU VM (TCG, no KVM needed) that boots
# Debian 12's stock kernel with SoftRoCE (rdma_rxe) loaded and device rxe0 on a dummy netdev
# (dummy0, 10.99.0.1; GID index 1 = ::ffff:10.99.0.1; verbs and rdma_cm both work).
#
#   softroce-vm.sh 'ib_send_lat -d rxe0 -x 1 & sleep 2; ib_send_lat -d rxe0 -x 1 10.99.0.1'
#   softroce-vm.sh 'rping -s -a 10.99.0.1 -C 10 & sleep 2; rping -c -a 10.99.0.1 -v -C 10'
#   softroce-vm.sh ./target/debug/deps/mytests-abc123 --test-threads=1
#
# One argument  -> run by `bash -c` in the guest (shell syntax allowed).
# Several args  -> run as an argv (each quoted).
# The guest sees the host's / read-only (9p) with a throw-away overlay on /tmp, /etc, /var, /home,
# ...; its cwd is the host's cwd; it runs as root. Exit status = the inner command's exit status
# (125 if the VM died before the command finished; 124 if VM_TIMEOUT hit).
# Idempotent: apt packages, virtme-ng, the kernel image and its modules are installed only if missing.
#
# Env knobs: SOFTROCE_DIR (/tmp/softroce) VM_MEM (3G) VM_CPUS (2) VM_TIMEOUT (1800 s)
#            RXE_NETDEV (dummy0 = create dummy0 with RXE_ADDR (10.99.0.1/24) and put rxe0 on it; any
#            existing guest netdev e.g. lo also accepted, but rdma_cm fails on lo; "none" = no rxe0)
#            SOFTROCE_RWDIRS (space-separated host dirs the guest may write to, e.g. "$PWD/target")
#            VM_KVM (0; 1 = try KVM - fails on this host) VNG_VERSION (1.42)
set -euo pipefail

WORK=${SOFTROCE_DIR:-/tmp/softroce}
VM_MEM=${VM_MEM:-3G}
VM_CPUS=${VM_CPUS:-2}
VM_TIMEOUT=${VM_TIMEOUT:-1800}
RXE_NETDEV=${RXE_NETDEV:-dummy0}
RXE_ADDR=${RXE_ADDR:-10.99.0.1/24}
VNG_VERSION=${VNG_VERSION:-1.42}
PKGS=(qemu-system-x86 rdma-core ibverbs-utils libibverbs-dev librdmacm-dev rdmacm-utils perftest
      kmod busybox-static cpio cmake libclang-dev iproute2 file)

log() { echo "[softroce-vm] $*" >&2; }
[ $# -ge 1 ] || { echo "usage: $0 'command to run inside the VM'" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "$0: must run as root (apt, /lib/modules)" >&2; exit 2; }
mkdir -p "$WORK"

setup() {
  # 1. Debian packages
  local missing=() p
  for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    timeout 530 apt-get -o DPkg::Lock::Timeout=300 update -qq
    DEBIAN_FRONTEND=noninteractive timeout 530 apt-get -o DPkg::Lock::Timeout=300 install -y -qq "${missing[@]}" >&2
  fi
  # 2. virtme-ng (pip; Debian's system python needs --break-system-packages, pyenv/venv python does not)
  if ! command -v vng >/dev/null; then
    log "pip install virtme-ng==$VNG_VERSION"
    python3 -m pip --version >/dev/null 2>&1 || \
      DEBIAN_FRONTEND=noninteractive timeout 530 apt-get -o DPkg::Lock::Timeout=300 install -y -qq python3-pip >&2
    timeout 300 python3 -m pip install -q "virtme-ng==$VNG_VERSION" \
      || timeout 300 python3 -m pip install -q --break-system-packages "virtme-ng==$VNG_VERSION"
    hash -r; command -v vng >/dev/null || { log "vng not on PATH after pip install"; exit 2; }
  fi
  # 3. the kernel linux-image-amd64 currently points at (e.g. linux-image-6.1.0-56-amd64)
  local kpkg
  kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
  [ -n "$kpkg" ] || { log "cannot resolve linux-image-amd64"; exit 2; }
  KVER=${kpkg#linux-image-}
  if [ ! -f "$WORK/kroot/boot/vmlinuz-$KVER" ]; then
    log "downloading $kpkg"
    (cd "$WORK" && rm -f "${kpkg}"_*.deb && timeout 300 apt-get download "$kpkg" >&2 \
      && rm -rf kroot.tmp && dpkg -x "${kpkg}"_*.deb kroot.tmp && rm -rf kroot && mv kroot.tmp kroot)
  fi
  # 4. its modules must be in the host's /lib/modules: the guest's / is the host's /
  if [ ! -f "/lib/modules/$KVER/modules.dep" ] || \
     [ ! -e "/lib/modules/$KVER/kernel/drivers/infiniband/sw/rxe/rdma_rxe.ko" ]; then
    log "installing modules for $KVER into /lib/modules"
    mkdir -p /lib/modules
    cp -a "$WORK/kroot/lib/modules/$KVER" /lib/modules/
    depmod "$KVER"
  fi
  echo "$KVER" > "$WORK/kver"
}

# serialise setup between concurrent invocations
exec 9>"$WORK/.setup.lock"
flock 9
setup
flock -u 9
KVER=$(cat "$WORK/kver")

# Per-run dir, writable from the guest: holds the inner script and the exit status file.
RUN=$(mktemp -d "$WORK/run.XXXXXX")
trap 'rm -rf "$RUN"' EXIT
if [ $# -eq 1 ]; then CMD=$1; else CMD=$(printf '%q ' "$@"); fi
{
  echo '#!/bin/bash'
  echo 'ulimit -l unlimited 2>/dev/null || true   # default in guest is 8192 KiB'
  if [ "$RXE_NETDEV" != none ]; then
    echo "modprobe rdma_rxe || exit 126"
    if [ "$RXE_NETDEV" = dummy0 ]; then   # rdma_cm cannot resolve routes over lo (ENODEV); a dummy netdev works
      echo "modprobe dummy && ip link add dummy0 type dummy && ip addr add $RXE_ADDR dev dummy0 || exit 126"
    fi
    echo "ip link set $RXE_NETDEV up"
    echo "rdma link add rxe0 type rxe netdev $RXE_NETDEV || exit 126"
  fi
  echo "cd $(printf '%q' "$PWD") 2>/dev/null || true"
  echo "bash -c $(printf '%q' "$CMD")"
  echo "rc=\$?; echo \$rc > $RUN/status; exit \$rc"
} > "$RUN/inner.sh"
chmod +x "$RUN/inner.sh"

VNG_ARGS=(-r "$WORK/kroot/boot/vmlinuz-$KVER" --memory "$VM_MEM" --cpus "$VM_CPUS" --rwdir="$RUN")
[ "${VM_KVM:-0}" = 1 ] || VNG_ARGS+=(--disable-kvm)
for d in ${SOFTROCE_RWDIRS:-}; do VNG_ARGS+=(--rwdir="$d"); done

set +e
# vng hands qemu "-chardev file,path=/proc/self/fd/1" (and fd/2): qemu opens them with O_TRUNC, so if
# our stdout/stderr is a regular file (CI log, `> log`) earlier content is wiped. Feed it pipes instead.
timeout -k 15 "$VM_TIMEOUT" vng "${VNG_ARGS[@]}" --exec "$RUN/inner.sh" </dev/null 2> >(cat >&2) | cat
vrc=${PIPESTATUS[0]}
wait 2>/dev/null || true   # let the stderr relay flush
set -e
if [ -s "$RUN/status" ]; then
  rc=$(cat "$RUN/status")
  [ "$rc" = "$vrc" ] || log "note: vng exited $vrc, inner command exited $rc"
  exit "$rc"
fi
[ "$vrc" = 124 ] && { log "VM timed out after ${VM_TIMEOUT}s"; exit 124; }
log "VM ended (vng rc=$vrc) without the command reporting a status"
exit 125
