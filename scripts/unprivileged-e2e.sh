#!/usr/bin/env bash
# End-to-end checks run as an ordinary user (users will not run matchlock as root): import an
# image, run commands, detach/exec/kill/rm, gc. Called by scripts/test.sh when it runs as
# root (CI); it creates the user `mltest` if needed. Prints "N passed, M failed".
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
user=${MATCHLOCK_TEST_USER:-mltest}
if [[ $(id -u) -ne 0 ]]; then echo "unprivileged-e2e: must start as root to create/switch to $user" >&2; exit 1; fi
id "$user" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$user"
share=$(mktemp -d /tmp/matchlock-unpriv.XXXXXX)
chmod 0755 "$share"
install -m 0755 "$root/target/debug/matchlock" "$share/matchlock"
install -m 0755 "${MATCHLOCK_GUEST_INIT:?}" "$share/matchlock-guest"
install -m 0644 "${MATCHLOCK_KERNEL:?}" "$share/vmlinux"
"$root/target/debug/mkimage" busybox > "$share/busybox.tar"; chmod 0644 "$share/busybox.tar"
vsock=$(command -v vhost-device-vsock); install -m 0755 "$vsock" "$share/vhost-device-vsock"
uhome=$(mktemp -d /tmp/matchlock-unpriv-home.XXXXXX); chown "$user" "$uhome"
as_user() {
  runuser -u "$user" -- env -i HOME="$uhome" PATH="$share:/usr/bin:/bin" \
    MATCHLOCK_KERNEL="$share/vmlinux" MATCHLOCK_QUIET_ACCEL=1 "$@"
}
pass=0; fail=0
check() { # name, expected substring, command...
  local name=$1 want=$2; shift 2
  local out; out=$(as_user "$@" 2>&1); local rc=$?
  if [[ $rc -eq 0 && "$out" == *"$want"* ]]; then pass=$((pass+1)); echo "ok   $name"
  else fail=$((fail+1)); echo "FAIL $name (rc=$rc): $out"; fi
}
check_exact() { # name, expected stdout (whole, without the trailing newline), command...
  local name=$1 want=$2; shift 2
  local errf; errf=$(mktemp)
  local out; out=$(as_user "$@" 2>"$errf"); local rc=$?
  if [[ $rc -eq 0 && "$out" == "$want" ]]; then pass=$((pass+1)); echo "ok   $name"
  else fail=$((fail+1)); echo "FAIL $name (rc=$rc): stdout=[$out] stderr=[$(cat "$errf")], want [$want]"; fi
  rm -f "$errf"
}
check_exact "runs as non-root" "$(id -u "$user")" id -u
check "image import" "Imported: busybox:local" sh -c "matchlock image import busybox:local < $share/busybox.tar"
check "run" "hello-unprivileged" matchlock run --image busybox:local -- echo hello-unprivileged
check_exact "guest root is root inside" "0" matchlock run --image busybox:local -- id -u
id=$(as_user matchlock run --image busybox:local -d 2>&1 | tail -n1)
check "detach + exec" "from-exec" matchlock exec "$id" -- echo from-exec
check "kill" "Killed" matchlock kill "$id"
for _ in $(seq 1 100); do as_user matchlock list --running | grep -q "$id" || break; sleep 0.1; done
check "rm" "Removed" matchlock rm "$id"
check "gc" "Reconciled" matchlock gc
# Volumes are made without root (mke2fs found outside PATH in /usr/sbin) and persist.
check "volume create" "Created volume uvol (32.0 MB)" matchlock volume create uvol --size 32
check "volume write" "" matchlock run --image busybox:local --no-network --disk @uvol:/data -- sh -c 'echo unpriv > /data/f'
check_exact "volume persists" "unpriv" matchlock run --image busybox:local --no-network --disk @uvol:/data:ro -- cat /data/f
check "volume cp" "Copied volume uvol to uvol2" matchlock volume cp uvol uvol2
check "volume rm" "Removed volume uvol2" sh -c "matchlock volume rm uvol2 && matchlock volume rm uvol"
check "no file left owned by root in HOME" "" sh -c "test -z \"\$(find $uhome -user root)\""
rm -rf "$share" "$uhome"
echo "unprivileged: $pass passed, $fail failed"
[[ $fail -eq 0 ]]
