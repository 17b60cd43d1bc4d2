#!/usr/bin/env bash
# Builds the static guest runtime (PID 1 of every VM). There is no musl target on our
# machines, so it is glibc with +crt-static. RUSTFLAGS only reaches target artifacts because
# --target is explicit (build scripts and proc-macros stay dynamic).
# Prints the path of the binary on its last line.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --release -p matchlock-guest --target x86_64-unknown-linux-gnu >&2
echo "$root/target/x86_64-unknown-linux-gnu/release/matchlock-guest"
