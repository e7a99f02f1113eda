#!/usr/bin/env bash
# The workspace type-checked and linted for macOS on Apple silicon (aarch64-apple-darwin)
# from a Linux machine: clippy with warnings denied over every target, without and with
# the `metal` feature. Nothing is linked or run (that needs a Mac: the GitHub workflow's
# `macos` job), but every cfg(target_os = "macos") path and the Metal build's Rust code is
# compiled. The one C dependency (ring, behind the hub client) is "compiled" by a stand-in
# that turns each of its C files into an empty Mach-O object: `cargo check` never links
# them, and without Apple's SDK its C sources cannot be compiled here.
#
#   scripts/check-macos.sh
#
# Needs: rustup (adds the target), clang and llvm-ar. On Debian or Ubuntu:
#   apt-get install clang llvm
set -euo pipefail
cd "$(dirname "$0")/.."

target=aarch64-apple-darwin
command -v clang >/dev/null || { echo "error: clang is missing; on Debian or Ubuntu: apt-get install clang" >&2; exit 1; }
ar=$(command -v llvm-ar || compgen -c llvm-ar- | sort -V | tail -1 || true)
[[ -n "$ar" ]] || { echo "error: llvm-ar is missing; on Debian or Ubuntu: apt-get install llvm" >&2; exit 1; }
rustup target list --installed | grep -qx "$target" || rustup target add "$target"

stub=$(mktemp -d)
trap 'rm -rf "$stub"' EXIT
cat > "$stub/cc" <<'CC'
#!/bin/sh
# An empty translation unit compiled into the object the build asked for.
out=""
prev=""
for a in "$@"; do
    [ "$prev" = "-o" ] && out="$a"
    prev="$a"
done
[ -n "$out" ] || exec clang --target=arm64-apple-macos11 "$@"
exec clang --target=arm64-apple-macos11 -x c -c /dev/null -o "$out"
CC
chmod +x "$stub/cc"
export CC_aarch64_apple_darwin="$stub/cc" AR_aarch64_apple_darwin="$ar"

cargo clippy --release --target "$target" --workspace --all-targets -- -D warnings
cargo clippy --release --target "$target" -p tau-resnet --features metal --all-targets -- -D warnings
echo "aarch64-apple-darwin: clippy clean, without and with metal"
