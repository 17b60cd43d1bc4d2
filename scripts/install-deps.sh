#!/usr/bin/env bash
# Installs what Matchlock needs on a Debian/Ubuntu host: QEMU, the kernel source and its
# build tools, image tools, and the vhost-user vsock backend (from the Rust crate registry).
# With --test, also what the test suite needs: a local registry (docker-registry) and
# python3-venv (the RPC tests install the published Python SDK into a virtualenv), skopeo
# (the pull benchmark's independent baseline), and for the network tests iproute2 (`ip netns`)
# and curl (the harness checks its test host from the owner's namespace), and git (the workspace
# tests check with the host's git what the guest's git did); their guest image is
# built from Debian packages with apt-get and dpkg-deb, present on every Debian host.
# With --bench, also upstream virtiofsd (the Rust daemon, from the crate registry; it needs
# libseccomp-dev and libcap-ng-dev), the workspace benchmark's baseline (`matchlock-bench vfs`;
# without it the bench falls back to Debian's QEMU 7.2 C virtiofsd). Flags combine.
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v cargo >/dev/null; then
  echo "error: a Rust toolchain (cargo) is needed to build matchlock: install it with rustup" >&2
  echo "       (https://rustup.rs), then run this again" >&2
  exit 1
fi
pkgs=(qemu-system-x86 linux-source-6.1 build-essential bc flex bison libelf-dev libssl-dev
      cpio xz-utils e2fsprogs squashfs-tools-ng busybox-static)
test=0 bench=0
for a in "$@"; do
  case "$a" in
    --test) test=1 ;;
    --bench) bench=1 ;;
    *) echo "usage: $0 [--test] [--bench]" >&2; exit 2 ;;
  esac
done
if ((test)); then pkgs+=(docker-registry python3 python3-venv skopeo iproute2 curl git); fi
if ((bench)); then pkgs+=(libseccomp-dev libcap-ng-dev pkg-config); fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
  echo "installing: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! command -v vhost-device-vsock >/dev/null; then
  echo "installing vhost-device-vsock (cargo install, a few minutes)"
  cargo install --locked --quiet vhost-device-vsock@0.3.0
fi
if ((bench)) && ! command -v virtiofsd >/dev/null; then
  echo "installing virtiofsd (cargo install, a few minutes)"
  cargo install --locked --quiet virtiofsd@1.14.0
fi
