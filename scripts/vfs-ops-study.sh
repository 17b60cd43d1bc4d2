#!/usr/bin/env bash
# Per-operation cost of the workspace server vs. upstream virtiofsd (issue 10; method and
# results in docs/testing.md, "Workspace file I/O").
#
# The wall-clock bench (`matchlock-bench vfs`) swings 2-5x on a loaded 2-core host. This
# study measures quantities the host's load does not change, for each row of that bench
# (write/read 64 MiB, create/stat/unlink 2,000 files, `git status` of a 10,000-file tree
# the host's git committed), on two sandboxes of the `nettest` image sharing one host
# directory: "ours" (the owner's in-process server) and "vfsd" (upstream virtiofsd through
# the bench knob MATCHLOCK_DEV_VHOST_USER_FS_SOCKET):
#   count   FUSE requests per row, by opcode: ours from fuse-backend-rs's per-request trace
#           line (MATCHLOCK_LOG=...sync_io=trace, read from the owner's stderr), virtiofsd
#           from its `--log-level debug` "Received request" lines;
#   cpu     server CPU per row: ours the vhost-user threads (`vring_worker`, `vfs`,
#           `vfs-accept`) from /proc/PID/task/TID/schedstat, virtiofsd the whole process;
#           both also as utime+stime of the process (/proc/PID/stat);
#   strace  host syscalls per row: `strace -c` on the same threads.
# `count` boots its own pair (the trace lines cost syscalls and CPU); `cpu` and `strace`
# share a pair without logging. Divide by the `count` figures for per-request values.
# Each row is one `matchlock exec` (the bench runs all rows in one script), so the guest's
# 1 s entry/attribute timeouts may expire between rows: the same for both sides.
#
# Usage: scripts/vfs-ops-study.sh [count] [cpu] [strace]   (default: all three)
# Needs: root; target/release/matchlock (CARGO_PROFILE_RELEASE_LTO=off cargo build
# --release -p matchlock-cli), the guest (scripts/build-guest.sh) and kernel
# (scripts/build-kernel.sh); virtiofsd (scripts/install-deps.sh --bench); git; strace for
# `strace`; the nettest image archive the e2e tests build in
# ~/.cache/matchlock/test-images. Everything runs in a temporary HOME, removed at exit.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
modes=("$@")
[ ${#modes[@]} -eq 0 ] && modes=(count cpu strace)
for m in "${modes[@]}"; do
  case "$m" in count | cpu | strace) ;; *) echo "usage: $0 [count] [cpu] [strace]" >&2; exit 2 ;; esac
done
bin=${MATCHLOCK_BIN:-$root/target/release/matchlock}
export MATCHLOCK_GUEST_INIT=${MATCHLOCK_GUEST_INIT:-$root/target/x86_64-unknown-linux-gnu/release/matchlock-guest}
export MATCHLOCK_KERNEL=${MATCHLOCK_KERNEL:-$("$root/scripts/build-kernel.sh" --print-path)}
image=$(ls -t "${XDG_CACHE_HOME:-$HOME/.cache}"/matchlock/test-images/nettest-*.tar 2>/dev/null | head -n1)
virtiofsd=${VIRTIOFSD:-$(command -v virtiofsd || echo "$HOME/.cargo/bin/virtiofsd")}
for f in "$bin" "$MATCHLOCK_GUEST_INIT" "$MATCHLOCK_KERNEL" "$image" "$virtiofsd"; do
  [ -f "$f" ] || { echo "missing: ${f:-the nettest image (run the e2e tests once)}" >&2; exit 1; }
done

work=$(mktemp -d /tmp/ml-vfs-ops-XXXXXX)
export HOME=$work/home XDG_CACHE_HOME=$work/home/.cache
mkdir -p "$XDG_CACHE_HOME"
share=$work/share
sock=$work/vfsd.sock
vpid=""
cleanup() {
  "$bin" kill --all >/dev/null 2>&1 || true
  "$bin" rm --stopped >/dev/null 2>&1 || true
  "$bin" gc >/dev/null 2>&1 || true
  if [ -n "$vpid" ]; then kill "$vpid" 2>/dev/null || true; wait "$vpid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# The host's git builds and commits each side's tree before any guest looks into it.
for side in ours vfsd; do
  r=$share/$side/repo
  for d in $(seq 0 99); do
    mkdir -p "$r/d$d"
    for f in $(seq 0 99); do echo "file $d $f" >"$r/d$d/f$f"; done
  done
  g=(git -C "$r" -c user.name=study -c user.email=study@invalid)
  GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null "${g[@]}" init -q .
  GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null "${g[@]}" add .
  GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null "${g[@]}" commit -q -m tree
done
"$bin" image import nettest:study <"$image" >/dev/null

run_d() { "$bin" run -d --privileged --image nettest:study --disk-size 2048 --workspace /workspace -v "$share:/workspace:host_fs"; }
owner_pid() { "$bin" list | awk -v id="$1" '$1 == id { print $NF }'; }

# start LOG(0|1): a fresh pair; sets ours, vfsd, opid.
start() {
  cleanup_pair
  local vlog=error mlog=warn
  if [ "$1" = 1 ]; then vlog=debug; mlog=warn,fuse_backend_rs::api::server::sync_io=trace; fi
  "$virtiofsd" --socket-path "$sock" --shared-dir "$share" --cache auto --sandbox chroot \
    --log-level "$vlog" 2>"$work/vfsd.log" </dev/null >/dev/null &
  vpid=$!
  for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
  ours=$(MATCHLOCK_LOG=$mlog run_d)
  opid=$(owner_pid "$ours")
  vfsd=$(MATCHLOCK_DEV_VHOST_USER_FS_SOCKET=$sock MATCHLOCK_LOG=warn run_d)
}
cleanup_pair() {
  "$bin" kill --all >/dev/null 2>&1 || true
  "$bin" rm --stopped >/dev/null 2>&1 || true
  if [ -n "$vpid" ]; then kill "$vpid" 2>/dev/null || true; wait "$vpid" 2>/dev/null || true; fi
  vpid=""
  rm -f "$sock"
}

ex() { "$bin" exec "$1" sh -c "$2" >/dev/null; }
# The server's threads: ours its vhost-user threads, virtiofsd all of its own.
tids() {
  local pid=$1 t
  if [ "$2" = vfsd ]; then ls "/proc/$pid/task"; return; fi
  for t in /proc/"$pid"/task/*; do
    case "$(cat "$t/comm")" in vring_worker | vfs | vfs-accept) basename "$t" ;; esac
  done
}
sched_ns() {
  local pid=$1 s=0 t a
  shift
  for t in "$@"; do read -r a _ <"/proc/$pid/task/$t/schedstat"; s=$((s + a)); done
  echo "$s"
}
proc_ms() { awk -v hz="$(getconf CLK_TCK)" '{ print int(($14 + $15) * 1000 / hz) }' "/proc/$1/stat"; }

rows=(write read create stat unlink git)
# side mode: the rows on one side, in the bench's order.
side_rows() {
  local side=$1 mode=$2 id pid log pat d row c0 c1 p0 p1 t0 t1 off sp
  if [ "$side" = ours ]; then id=$ours pid=$opid log=/proc/$opid/fd/2 pat='new req [A-Za-z]*'
  else id=$vfsd pid=$vpid log=$work/vfsd.log pat='opcode=[A-Za-z]*'; fi
  mapfile -t ts < <(tids "$pid" "$side")
  d=/workspace/$side
  declare -A cmd=(
    [write]="cd $d/scratch && dd if=/dev/zero of=big bs=1M count=64 conv=fsync 2>/dev/null"
    [read]="cd $d/scratch && dd if=big of=/dev/null bs=1M 2>/dev/null"
    [create]="cd $d/scratch && touch \$(seq -f m/f%g 0 1999)"
    [stat]="cd $d/scratch && stat -c %i \$(seq -f m/f%g 0 1999)"
    [unlink]="cd $d/scratch && rm -f \$(seq -f m/f%g 0 1999)"
    [git]="cd $d/repo && git status --porcelain"
  )
  declare -A before=(
    [write]="cd $d && rm -rf scratch && mkdir scratch && sync && echo 3 > /proc/sys/vm/drop_caches"
    [read]="sync && echo 3 > /proc/sys/vm/drop_caches"
    [create]="cd $d/scratch && rm big && mkdir m"
    [git]="cd $d/scratch && rmdir m"
  )
  # The guest's first `git status` refreshes the index, the second warms the caches.
  ex "$id" "cd $d/repo && git status --porcelain >/dev/null && git status --porcelain >/dev/null"
  for row in "${rows[@]}"; do
    [ -n "${before[$row]:-}" ] && ex "$id" "${before[$row]}"
    case $mode in
      count)
        off=$(stat -L -c %s "$log")
        ex "$id" "${cmd[$row]}"
        sleep 0.3
        tail -c +$((off + 1)) "$log" | { grep -o "$pat" || true; } | sed 's/.*[ =]//' | sort | uniq -c | sort -rn |
          awk -v s="$side" -v r="$row" '{ n += $1; l = l " " $2 "=" $1 } END { printf "%-5s %-7s requests %6d:%s\n", s, r, n, l }'
        ;;
      cpu)
        p0=$(proc_ms "$pid"); c0=$(sched_ns "$pid" "${ts[@]}"); t0=$(date +%s%N)
        ex "$id" "${cmd[$row]}"
        t1=$(date +%s%N); sleep 0.3
        c1=$(sched_ns "$pid" "${ts[@]}"); p1=$(proc_ms "$pid")
        printf "%-5s %-7s server threads %5d ms CPU, process %5d ms, guest wall %5d ms\n" \
          "$side" "$row" $(((c1 - c0) / 1000000)) $((p1 - p0)) $(((t1 - t0) / 1000000))
        ;;
      strace)
        local args=()
        if [ "$side" = ours ]; then for t in "${ts[@]}"; do args+=(-p "$t"); done
        else args=(-f -p "$pid"); fi
        strace -c -o "$work/strace" "${args[@]}" 2>/dev/null &
        sp=$!; sleep 1
        ex "$id" "${cmd[$row]}"
        sleep 0.3; kill -INT "$sp"; wait "$sp" || true
        awk -v s="$side" -v r="$row" '$NF == "total" { t = $4 } NR > 2 && $1 ~ /^[0-9.]+$/ && $NF != "total" { l = l " " $NF "=" $4 }
          END { printf "%-5s %-7s syscalls %6d:%s\n", s, r, t, l }' "$work/strace"
        ;;
    esac
  done
}

booted=""
for mode in "${modes[@]}"; do
  want=0; [ "$mode" = count ] && want=1
  if [ "$booted" != "$want" ]; then start "$want"; booted=$want; fi
  echo "# $mode ($(date -u +%H:%M:%S) UTC, load $(cut -d' ' -f1-3 /proc/loadavg))"
  side_rows ours "$mode"
  side_rows vfsd "$mode"
done
