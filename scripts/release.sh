#!/usr/bin/env bash
# Builds the release binaries the README's install line downloads:
#   dist/cacher-linux-amd64, dist/cacher-linux-arm64    fully static (musl)
#   dist/cacher-darwin-amd64, dist/cacher-darwin-arm64  Mach-O, no system frameworks
# stripped, with the version and git commit embedded, and dist/checksums.txt in the
# format `sha256sum -c` reads. Cross-linking (C code such as zstd included) is done by
# cargo-zigbuild with zig from the `ziglang` Python package; both, and the Rust
# targets, are installed when missing. Both are pinned: zig's libc is what the static
# binaries link, and its `malloc` decides how fast they are (docs/benchmarks.md, "The
# static release"), so another zig is a change to measure, not an upgrade to take
# silently.
#
# Usage: scripts/release.sh [NAME...]   (NAME: linux-amd64 linux-arm64 darwin-amd64
#                                        darwin-arm64; default all four)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

declare -A triple=(
  [linux-amd64]=x86_64-unknown-linux-musl
  [linux-arm64]=aarch64-unknown-linux-musl
  [darwin-amd64]=x86_64-apple-darwin
  [darwin-arm64]=aarch64-apple-darwin
)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(linux-amd64 linux-arm64 darwin-amd64 darwin-arm64)
max_bytes=$((20 * 1024 * 1024))

for name in "${names[@]}"; do
  [ -n "${triple[$name]:-}" ] || { echo "release.sh: unknown target $name" >&2; exit 2; }
done

# Prerequisites.
installed=$(rustup target list --installed)
for name in "${names[@]}"; do
  grep -qx "${triple[$name]}" <<<"$installed" || rustup target add "${triple[$name]}"
done
zig_version=0.17.1
zigbuild_version=0.24.1
[ "$(python3 -m ziglang version 2>/dev/null)" = "$zig_version" ] ||
  python3 -m pip install -q "ziglang==$zig_version"
[ "$(cargo-zigbuild --version 2>/dev/null)" = "cargo-zigbuild $zigbuild_version" ] ||
  cargo install cargo-zigbuild --locked --version "$zigbuild_version"

mkdir -p dist
for name in "${names[@]}"; do
  t=${triple[$name]}
  echo "release.sh: building $name ($t)" >&2
  cargo zigbuild --release --locked --target "$t"
  cp "target/$t/release/cacher" "dist/cacher-$name"
  size=$(stat -c %s "dist/cacher-$name")
  if [ "$size" -ge "$max_bytes" ]; then
    echo "release.sh: dist/cacher-$name is $size bytes, over the 20 MB limit" >&2
    exit 1
  fi
done

(cd dist && sha256sum cacher-* >checksums.txt)
ls -l dist >&2
