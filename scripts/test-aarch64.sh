#!/usr/bin/env bash
# The workspace on 64-bit ARM (aarch64: Apple silicon under Linux, AWS Graviton, Ampere)
# from an x86-64 Linux machine: clippy with warnings denied for the aarch64 target, then the
# library crates' tests cross-compiled and run under QEMU's user-mode emulation. On ARM only
# the `portable` kernel set exists (im2col + GEMM convolutions, the `gemm` crate's NEON
# micro-kernels, plain-loop fused ops), so this is the check that the x86-64-only code is
# fenced off and that the portable path computes what the tests expect there.
#
#   scripts/test-aarch64.sh                 # clippy, then every library crate's tests
#   scripts/test-aarch64.sh -p tau-kernels  # clippy, then the tests of the named crates
#
# Needs: rustup (adds the target), a cross linker and QEMU. On Debian or Ubuntu:
#   apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
# The tests of tau-resnet and xtask start the CLI binary as a child process, which QEMU's
# user mode does not follow without binfmt_misc, so they are left out by default. Under
# emulation the library tests take about 25 minutes on 2 cores (most of it tau-model's
# CUDA-comparison and ResNet tests, which run their CPU halves).
set -euo pipefail
cd "$(dirname "$0")/.."

target=aarch64-unknown-linux-gnu
sysroot=/usr/aarch64-linux-gnu
missing=()
command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu)
[[ -d "$sysroot/lib" ]] || missing+=(libc6-dev-arm64-cross)
command -v qemu-aarch64 >/dev/null || missing+=(qemu-user)
if ((${#missing[@]})); then
    echo "error: missing ${missing[*]}; on Debian or Ubuntu: apt-get install ${missing[*]}" >&2
    exit 1
fi
rustup target list --installed | grep -qx "$target" || rustup target add "$target"

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L $sysroot"
# C code of dependencies (ring, behind the hub client) for the target.
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc

cargo clippy --release --target "$target" --workspace --all-targets -- -D warnings
if (($#)); then
    cargo test --release --target "$target" "$@"
else
    cargo test --release --target "$target" --workspace --exclude tau-resnet --exclude xtask
fi
