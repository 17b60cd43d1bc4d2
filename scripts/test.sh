#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and component tests, end-to-end tests that boot
# real VMs (under TCG where there is no usable KVM), a bounded fuzzing run of every fuzz
# target (FUZZ_SECONDS each, default 30), and (as root) the
# unprivileged-user end-to-end checks. Run scripts/setup.sh (or install-deps.sh and
# build-kernel.sh) once first.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PATH="$HOME/.cargo/bin:$PATH"
log=$(mktemp /tmp/matchlock-test.XXXXXX.log)
fail() { echo "error: $*" >&2; exit 1; }
echo "== fmt"; cargo fmt --all --check || fail "cargo fmt --check found unformatted code"
echo "== clippy"; cargo clippy --quiet --workspace --all-targets -- -D warnings || fail "clippy"
echo "== guest runtime and kernel"
MATCHLOCK_GUEST_INIT=$(scripts/build-guest.sh | tail -n1) || fail "guest build"
MATCHLOCK_KERNEL=$(scripts/build-kernel.sh --print-path)
export MATCHLOCK_GUEST_INIT MATCHLOCK_KERNEL
[[ -s "$MATCHLOCK_KERNEL" ]] || fail "guest kernel missing: run scripts/build-kernel.sh"
cargo build --quiet -p matchlock-cli -p matchlock-test-support || fail "build"
echo "== network test image (built once per machine, cached in ~/.cache/matchlock/test-images)"
cargo run --quiet -p matchlock-test-support --bin mkimage -- nettest || fail "nettest image (needs apt-get, dpkg-deb and the Debian mirror)"
echo "== python SDK (matchlock==0.2.17 from PyPI, for the RPC compatibility tests)"
scripts/python-sdk-venv.sh >/dev/null || fail "python SDK virtualenv (needs python3-venv and PyPI)"
echo "== tests"
# Test HOMEs live here; whatever a failed test leaves running is stopped afterwards.
MATCHLOCK_TEST_TMP=$(mktemp -d /tmp/matchlock-tests.XXXXXX); export MATCHLOCK_TEST_TMP
cleanup_test_homes() {
  pkill -TERM -f -- "$MATCHLOCK_TEST_TMP/" 2>/dev/null || true
  sleep 1
  pkill -KILL -f -- "$MATCHLOCK_TEST_TMP/" 2>/dev/null || true
  rm -rf "$MATCHLOCK_TEST_TMP"
}
trap cleanup_test_homes EXIT
cargo test --workspace --no-fail-fast -- --test-threads="${MATCHLOCK_TEST_THREADS:-2}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
if [[ $(id -u) -eq 0 ]]; then
  echo "== unprivileged user end-to-end"
  scripts/unprivileged-e2e.sh 2>&1 | tee -a "$log"
  [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
fi
echo "== fuzzing (${FUZZ_SECONDS:-30} s per target)"
fuzz/run.sh || status=1
passed=$(grep -Eo '[0-9]+ passed' "$log" | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' "$log" | awk '{s+=$1} END {print s+0}')
echo "total: $passed passed, $failed failed"
[[ $status -eq 0 && $failed -eq 0 ]]
