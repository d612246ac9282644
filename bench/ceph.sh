#!/usr/bin/env bash
# A one-host CephFS for `fs-bench --mounts --systems cephfs`: Debian 12's ceph 16.2, set up
# by hand (no cephadm, no containers): one monitor and one manager on 127.0.0.1, three
# BlueStore OSDs on loop devices (image files under DIR, so on the bench's disk), one MDS,
# a file system with 3x replicated data and metadata pools (one host: the OSD is the
# failure domain), mounted with ceph-fuse (this kernel has no ceph module). Cephx is off:
# a benchmark on loopback, as the other peers. Root.
#   bash bench/ceph.sh up DIR MOUNTPOINT [OSD_GB]    set up and mount (prints progress)
#   bash bench/ceph.sh down DIR [MOUNTPOINT]        unmount, stop every daemon, free the loops
# Logs: DIR/log/. Installs ceph, ceph-mds and ceph-fuse if missing.
set -euo pipefail

usage() {
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-2}"
}

[ $# -ge 1 ] || usage
case "$1" in
-h | --help) usage 0 ;;
esac
cmd=$1
dir=${2:?"the data directory (see --help)"}
conf=$dir/ceph.conf

down() {
    local mnt=${1:-}
    if [ -n "$mnt" ] && mountpoint -q "$mnt"; then
        umount -l "$mnt" || true
    fi
    pkill -f "ceph-fuse .*-c $conf" 2>/dev/null || true
    for d in ceph-mds ceph-osd ceph-mgr ceph-mon; do
        pkill -f "$d .*-c $conf" 2>/dev/null || true
    done
    # Wait for the daemons to let go of the loop devices.
    for _ in $(seq 50); do
        pgrep -f "ceph-(mon|mgr|osd|mds|fuse) .*-c $conf" >/dev/null || break
        sleep 0.2
    done
    pkill -9 -f "ceph-(mon|mgr|osd|mds|fuse) .*-c $conf" 2>/dev/null || true
    if [ -d "$dir" ]; then
        for img in "$dir"/osd*.img; do
            [ -e "$img" ] || continue
            for l in $(losetup -j "$img" -O NAME -n 2>/dev/null); do
                losetup -d "$l" || true
            done
        done
    fi
}

if [ "$cmd" = down ]; then
    down "${3:-}"
    exit 0
fi
[ "$cmd" = up ] || usage
mnt=${3:?"the mount point (see --help)"}
osd_gb=${4:-4}

missing=()
for t in ceph-mon:ceph-mon ceph-osd:ceph-osd ceph-mgr:ceph-mgr ceph-mds:ceph-mds \
         ceph-fuse:ceph-fuse ceph:ceph-common monmaptool:ceph-base uuidgen:uuid-runtime; do
    command -v "${t%%:*}" >/dev/null 2>&1 || missing+=("${t##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "ceph.sh: installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

down "$mnt"
rm -rf "$dir"
mkdir -p "$dir"/{log,run,mon/ceph-a,mgr/ceph-x,mds/ceph-a} "$mnt"
fsid=$(uuidgen)
cat >"$conf" <<EOF
[global]
fsid = $fsid
mon_host = v2:127.0.0.1:3300/0
public_network = 127.0.0.0/8
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
osd_pool_default_size = 3
osd_pool_default_min_size = 2
osd_crush_chooseleaf_type = 0
mon_allow_pool_delete = true
mon_allow_pool_size_one = true
run_dir = $dir/run
admin_socket = $dir/run/\$name.asok
log_file = $dir/log/\$name.log
pid_file = $dir/run/\$name.pid
mon_data = $dir/mon/ceph-\$id
mgr_data = $dir/mgr/ceph-\$id
mds_data = $dir/mds/ceph-\$id
osd_data = $dir/osd\$id
keyring = $dir/keyring
osd_objectstore = bluestore
osd_memory_target = 1073741824
bluestore_cache_autotune = true
mgr_disabled_modules = dashboard restful prometheus
EOF
echo "ceph.sh: monitor"
ceph-authtool --create-keyring "$dir/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
monmaptool --create --fsid "$fsid" --addv a '[v2:127.0.0.1:3300]' "$dir/monmap" >/dev/null
ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/keyring"
ceph-mon -c "$conf" -i a 2>>"$dir/log/start.log"
ceph -c "$conf" --connect-timeout 30 mon stat >/dev/null
echo "ceph.sh: manager"
ceph-mgr -c "$conf" -i x 2>>"$dir/log/start.log"
for i in 0 1 2; do
    echo "ceph.sh: OSD $i (${osd_gb} GiB loop device)"
    truncate -s "${osd_gb}G" "$dir/osd$i.img"
    loop=$(losetup -f --show "$dir/osd$i.img")
    uuid=$(uuidgen)
    id=$(ceph -c "$conf" osd new "$uuid")
    mkdir -p "$dir/osd$id"
    ln -s "$loop" "$dir/osd$id/block"
    ceph-osd -c "$conf" -i "$id" --mkfs --osd-uuid "$uuid" >/dev/null 2>&1 ||
        { echo "ceph.sh: ceph-osd --mkfs failed (see $dir/log/osd.$id.log)" >&2; exit 1; }
    ceph-osd -c "$conf" -i "$id" 2>>"$dir/log/start.log"
done
echo "ceph.sh: metadata server and file system"
ceph-mds -c "$conf" -i a >>"$dir/log/start.log" 2>&1
ceph -c "$conf" osd pool create cephfs_data 32 >/dev/null 2>&1
ceph -c "$conf" osd pool create cephfs_metadata 16 >/dev/null 2>&1
ceph -c "$conf" fs new cephfs cephfs_metadata cephfs_data >/dev/null 2>&1
# Every placement group active and clean ("49 pgs: 49 active+clean; ...").
clean() { ceph -c "$conf" pg stat 2>/dev/null | grep -Eq '^([0-9]+) pgs: \1 active\+clean;'; }
for _ in $(seq 120); do
    ceph -c "$conf" mds stat 2>/dev/null | grep -q 'up:active' && clean && break
    sleep 1
done
ceph -c "$conf" mds stat | grep -q 'up:active' ||
    { echo "ceph.sh: the MDS did not become active (see $dir/log/)" >&2; exit 1; }
clean || { echo "ceph.sh: placement groups not clean: $(ceph -c "$conf" pg stat)" >&2; exit 1; }
echo "ceph.sh: ceph-fuse on $mnt"
ceph-fuse -c "$conf" "$mnt" >>"$dir/log/start.log" 2>&1
mountpoint -q "$mnt" || { echo "ceph.sh: ceph-fuse did not mount $mnt" >&2; exit 1; }
echo "ceph.sh: up ($(ceph -c "$conf" osd stat))"
