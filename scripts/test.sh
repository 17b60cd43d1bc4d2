#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and component tests, and end-to-end tests
# that boot real VMs (under TCG where there is no usable KVM). Needs scripts/setup.sh (or
# at least install-deps.sh and build-kernel.sh) to have run once.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PATH="$HOME/.cargo/bin:$PATH"
echo "== fmt"; cargo fmt --all --check
echo "== clippy"; cargo clippy --quiet --workspace --all-targets -- -D warnings
echo "== guest runtime"
MATCHLOCK_GUEST_INIT=$(scripts/build-guest.sh | tail -n1); export MATCHLOCK_GUEST_INIT
MATCHLOCK_KERNEL=$(scripts/build-kernel.sh --print-path); export MATCHLOCK_KERNEL
[[ -s "$MATCHLOCK_KERNEL" ]] || { echo "guest kernel missing: run scripts/build-kernel.sh" >&2; exit 1; }
echo "== tests"
cargo test --workspace --no-fail-fast -- --test-threads="${MATCHLOCK_TEST_THREADS:-2}" 2>&1 | tee /tmp/matchlock-test.log
status=${PIPESTATUS[0]}
passed=$(grep -Eo '[0-9]+ passed' /tmp/matchlock-test.log | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' /tmp/matchlock-test.log | awk '{s+=$1} END {print s+0}')
echo "total: $passed passed, $failed failed"
exit "$status"
