#!/usr/bin/env bash
# One command from a fresh Debian/Ubuntu machine to a running sandbox, offline:
#   installs dependencies, builds the guest kernel (cached), matchlock and its guest runtime,
#   installs them into ~/.local/bin, builds a default image from Debian's busybox-static,
#   imports it as busybox:local, and runs a command in a sandbox.
# Usage: scripts/setup.sh [--no-run]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PATH="$HOME/.cargo/bin:$HOME/.local/bin:$PATH"
scripts/install-deps.sh
scripts/build-kernel.sh
echo "building matchlock"
cargo build --quiet --release -p matchlock-cli -p matchlock-test-support
guest=$(scripts/build-guest.sh | tail -n1)
bindir="${MATCHLOCK_BINDIR:-$HOME/.local/bin}"
mkdir -p "$bindir"
install -m 0755 target/release/matchlock "$bindir/matchlock"
install -m 0755 "$guest" "$bindir/matchlock-guest"
echo "installed $bindir/matchlock and $bindir/matchlock-guest"
if ! "$bindir/matchlock" image ls | grep -q '^busybox:local '; then
  target/release/mkimage busybox | "$bindir/matchlock" image import busybox:local
fi
if [[ "${1:-}" != "--no-run" ]]; then
  "$bindir/matchlock" run --image busybox:local -- sh -c 'echo "hello from $(hostname), a matchlock sandbox running $(uname -sr)"'
  case ":$PATH:" in *":$bindir:"*) ;; *) echo "note: add $bindir to your PATH";; esac
fi
