#!/usr/bin/env bash
# Builds every fuzz target (CI runs this so they never rot). The stable toolchain compiles
# and links them without sanitizer instrumentation; for real fuzzing use cargo-fuzz on
# nightly:  cd fuzz && cargo +nightly fuzz run guest_frame -- -max_total_time=60
set -euo pipefail
cd "$(dirname "$0")"
cargo build --quiet --bins
echo "fuzz targets built: $(sed -n 's/^name = "\(.*\)"/\1/p' Cargo.toml | grep -v matchlock-fuzz | tr '\n' ' ')"
