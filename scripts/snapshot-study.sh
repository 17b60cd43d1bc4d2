#!/usr/bin/env bash
# Snapshot-boot study (issue 11, item 4; results in docs/snapshots.md).
#
# Measures, in one run on this machine, cold boot to first exec vs. restore from saved state
# to first exec, for a microvm started with matchlock's QEMU command line (qemu.rs) except
# for two changes the study is about:
#   - guest RAM is `memory-backend-file,share=on` on /dev/shm (matchlock: memfd), so a
#     snapshot with the `x-ignore-shared` capability does not copy RAM into the stream;
#   - the host channel is a virtio-serial port on a unix-socket chardev instead of
#     vhost-user-vsock (which QEMU 7.2 refuses to migrate; the script shows the error).
# The guest is busybox in an initramfs whose /init answers one-line requests on the port
# (`x` runs /bin/true and replies, `t` prints the guest clock, `r` 16 random bytes, `h` the
# hostname). Nothing here touches the network; everything lives in a temporary directory
# and one /dev/shm file per VM, removed at exit.
#
# Usage: scripts/snapshot-study.sh [--runs N] [--memory MIB]
# Needs: qemu-system-x86_64, busybox (static), cpio, python3, vhost-device-vsock (for the
# blocker check only); the kernel from scripts/build-kernel.sh.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
runs=5
mem=256
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs=$2; shift 2 ;;
    --memory) mem=$2; shift 2 ;;
    *) echo "usage: $0 [--runs N] [--memory MIB]" >&2; exit 2 ;;
  esac
done
kernel=${MATCHLOCK_KERNEL:-$("$root/scripts/build-kernel.sh" --print-path)}
busybox=$(command -v busybox)
file "$busybox" | grep -q 'statically linked' || { echo "busybox must be static" >&2; exit 1; }

work=$(mktemp -d /tmp/snapshot-study.XXXXXX)
shm=$(mktemp -d /dev/shm/snapshot-study.XXXXXX)
trap '[ -n "${STUDY_KEEP:-}" ] || rm -rf "$work" "$shm"' EXIT

# Guest: busybox + an /init that serves the port. Writes only answer a request, so the
# guest never writes to a port whose host side is not connected.
mkdir -p "$work/root/bin" "$work/root/dev" "$work/root/proc"
cp "$busybox" "$work/root/bin/busybox"
cat >"$work/root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t devtmpfs dev /dev 2>/dev/null
hostname cold-booted
port=
while [ -z "$port" ]; do
  for p in /dev/vport*p1; do [ -e "$p" ] && port=$p; done
  [ -z "$port" ] && usleep 1000
done
echo "init: port open at $(cut -d" " -f1 /proc/uptime) s" >/dev/ttyS0
exec 3<>"$port"
# read returns EOF while the host end is not connected (virtio_console), e.g. right after
# a restore, before the new host connects: wait for it instead of exiting (PID 1 must live).
while :; do
while read -r cmd arg seed <&3; do
  case "$cmd" in
    p) echo pong >&3 ;;
    x) /bin/true; echo "done $?" >&3 ;;
    t) echo "clock $(date +%s) uptime $(cut -d' ' -f1 /proc/uptime)" >&3 ;;
    r) echo "rand $(head -c16 /dev/urandom | od -An -tx1 | tr -d ' \n')" >&3 ;;
    h) echo "host $(hostname)" >&3 ;;
    s) date -s "@$arg" >/dev/null; echo "$seed" >/dev/urandom; hostname "vm-${seed%"${seed#??????}"}"
       echo "set" >&3 ;;
    d) echo "disk $(head -c4 /dev/vda)" >&3 ;;
    f) blockdev --flushbufs /dev/vda; echo "flushed $?" >&3 ;;
    *) echo "unknown" >&3 ;;
  esac
done
usleep 1000
done
EOF
chmod +x "$work/root/init"
(cd "$work/root" && find . | cpio -o -H newc --quiet | gzip -1 >"$work/initramfs.gz")
# The disk the snapshot was taken with starts "AAAA"; restores get their own disk files.
{ printf AAAA; head -c $((1024 * 1024 - 4)) /dev/zero; } >"$work/disk.raw"

export STUDY_WORK="$work" STUDY_SHM="$shm" STUDY_KERNEL="$kernel" STUDY_RUNS="$runs" STUDY_MEM="$mem"
export STUDY_VSOCK_BIN=${MATCHLOCK_VHOST_VSOCK:-$(command -v vhost-device-vsock || echo "$HOME/.cargo/bin/vhost-device-vsock")}
echo "# $(date -u +%FT%TZ) $(uptime)"
echo "# $(qemu-system-x86_64 --version | head -n1); kernel $kernel; memory ${mem} MiB; runs $runs"
# Not `exec`: the EXIT trap above must run to remove the RAM files.
python3 "$root/scripts/snapshot_study.py"
