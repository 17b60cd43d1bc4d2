#!/usr/bin/env bash
# Builds the guest kernel (PVH-bootable vmlinux) from Debian's linux-source-6.1 and
# guest/kernel/x86_64.config, everything built in. The result is cached under
#   ${XDG_CACHE_HOME:-~/.cache}/matchlock/kernels/6.1-<sha256(config)[:16]>/vmlinux
# which is exactly where `matchlock` looks for it, so it is built once per machine and config.
# Usage: scripts/build-kernel.sh [--print-path]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
config="$root/guest/kernel/x86_64.config"
hash=$(sha256sum "$config" | cut -c1-16)
cache="${XDG_CACHE_HOME:-$HOME/.cache}/matchlock/kernels/6.1-$hash"
if [[ "${1:-}" == "--print-path" ]]; then echo "$cache/vmlinux"; exit 0; fi
if [[ -s "$cache/vmlinux" ]]; then
  echo "guest kernel: cached at $cache/vmlinux"
  exit 0
fi
src_tar=/usr/src/linux-source-6.1.tar.xz
if [[ ! -f "$src_tar" ]]; then
  echo "error: $src_tar missing; install it with: apt-get install linux-source-6.1" >&2
  exit 1
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/matchlock-kernel.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "guest kernel: extracting $src_tar (one-time, ~7 minutes on 2 cores in total)"
tar -C "$work" -xf "$src_tar"
cd "$work"/linux-source-6.1
make -s ARCH=x86_64 tinyconfig
KCONFIG_CONFIG=.config scripts/kconfig/merge_config.sh -m -O . .config "$config" >/dev/null
make -s ARCH=x86_64 olddefconfig
# Every option the fragment sets to y must have survived olddefconfig; a silent drop
# (a missing dependency) would give a kernel that boots but lacks a device we rely on.
missing=0
while IFS= read -r line; do
  opt=${line%%=*}
  if ! grep -qx "$line" .config; then echo "warning: $opt=y did not survive olddefconfig" >&2; missing=1; fi
done < <(grep -E '^CONFIG_[A-Z0-9_]+=y' "$config")
# Options the fragment turns off are security properties (e.g. VSOCKETS_LOOPBACK lets a guest
# command reach the agent): one that some dependency turned back on fails the build.
while IFS= read -r opt; do
  if grep -qE "^$opt=[ym]" .config; then echo "error: $opt must stay off but olddefconfig enabled it" >&2; exit 1; fi
done < <(sed -nE 's/^# (CONFIG_[A-Z0-9_]+) is not set$/\1/p' "$config")
echo "guest kernel: compiling with -j$(nproc)"
make -s ARCH=x86_64 -j"$(nproc)" vmlinux 2>&1 | grep -vE '^\s*$' | tail -n 20 || true
[[ -s vmlinux ]] || { echo "error: kernel build produced no vmlinux" >&2; exit 1; }
mkdir -p "$cache.tmp"
cp vmlinux "$cache.tmp/vmlinux"
cp .config "$cache.tmp/config"
make -s kernelversion > "$cache.tmp/version"
rm -rf "$cache"; mv "$cache.tmp" "$cache"
echo "guest kernel: built $(cat "$cache/version") at $cache/vmlinux (missing-options=$missing)"
