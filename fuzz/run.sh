#!/usr/bin/env bash
# Fuzzes every target (or those named) for FUZZ_SECONDS each (default 30) with libFuzzer, on
# the stable toolchain, and fails if any target crashes, leaks past the RSS limit or hangs.
#
# How it fuzzes on stable: libfuzzer-sys builds libFuzzer itself (C++, with the system
# compiler) and the code under test is instrumented by LLVM's SanitizerCoverage pass, which
# stable rustc runs with `-Cpasses=sancov-module` plus `-Cllvm-args` (the same flags
# cargo-fuzz passes, minus `-Zsanitizer=address`, which needs nightly). So this is real
# coverage-guided, mutational fuzzing, without AddressSanitizer: memory errors in `unsafe`
# or C code are caught only when they crash. Panics (including debug assertions and integer
# overflow checks, both enabled here) abort and count as crashes. `--target` keeps the flags
# off build scripts and proc macros (they would not link).
#
# Corpora: the committed seeds (fuzz/seeds/<target>, real samples of each format) are read
# only; new inputs go to a scratch corpus (FUZZ_CORPUS_DIR, default a temp dir). Crash
# inputs are written to FUZZ_ARTIFACTS (default fuzz/artifacts/<target>/) and named in the
# error; reproduce with: fuzz/target/x86_64-unknown-linux-gnu/release/<target> <crash file>
#
# Before fuzzing, the `selftest_crash` target is run on an input that makes it panic; the run
# fails unless that is detected, so a harness that could not see crashes cannot pass.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
export PATH="$HOME/.cargo/bin:$PATH"
seconds=${FUZZ_SECONDS:-30}
triple=$(rustc -vV | sed -n 's/^host: //p')
all_targets=(guest_frame guest_mux image_archive rpc_request oci_manifest docker_auth guest_net intercept_stream)
targets=("$@")
((${#targets[@]})) || targets=("${all_targets[@]}")
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
echo "fuzz: building ${targets[*]} (instrumented, release)"
# Always fuzz/target: an exported CARGO_TARGET_DIR (e.g. a worktree's) must neither receive
# the instrumented build nor leave this script looking for the binaries elsewhere.
cargo build --quiet --release --locked --target "$triple" --target-dir "$here/target" --bins
bin=$here/target/$triple/release
scratch=$(mktemp -d /tmp/matchlock-fuzz.XXXXXX)
trap 'rm -rf "$scratch"' EXIT

# The harness must report a panic as a failure.
printf 'crash' >"$scratch/crash-input"
if "$bin/selftest_crash" -artifact_prefix="$scratch/" "$scratch/crash-input" >"$scratch/selftest.log" 2>&1; then
  cat "$scratch/selftest.log" >&2
  echo "error: fuzz selftest: a panicking target was not reported as a crash" >&2
  exit 1
fi
grep -q "deliberate crash" "$scratch/selftest.log" || {
  cat "$scratch/selftest.log" >&2
  echo "error: fuzz selftest failed for another reason than its panic" >&2
  exit 1
}

failed=()
for t in "${targets[@]}"; do
  [[ -x "$bin/$t" ]] || { echo "error: no fuzz target $t" >&2; exit 1; }
  corpus=${FUZZ_CORPUS_DIR:-$scratch/corpus}/$t
  artifacts=${FUZZ_ARTIFACTS:-$here/artifacts}/$t
  mkdir -p "$corpus" "$artifacts"
  log=$scratch/$t.log
  seeds=()
  [[ -d "$here/seeds/$t" ]] && seeds=("$here/seeds/$t")
  set +e
  "$bin/$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
    -print_final_stats=1 -artifact_prefix="$artifacts/" "$corpus" "${seeds[@]}" >"$log" 2>&1
  rc=$?
  set -e
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  cov=$(grep -Eo "cov: [0-9]+" "$log" | tail -n1 | cut -d" " -f2 || true)
  if ((rc != 0)); then
    tail -n 40 "$log" >&2
    echo "fuzz: $t FAILED (exit $rc); crash input(s): $(ls "$artifacts")" >&2
    failed+=("$t")
  else
    echo "fuzz: $t ok: ${runs:-?} executions in ${seconds}s, coverage ${cov:-?} edges, corpus $(ls "$corpus" | wc -l) inputs"
  fi
done
if ((${#failed[@]})); then
  echo "error: fuzz targets crashed: ${failed[*]}" >&2
  exit 1
fi
