#!/usr/bin/env bash
# Installs the cacher release for this runner's OS and arch from $CACHER_RELEASE_URL
# into the tool cache, checked against the release's checksums.txt, once per release
# URL and runner; puts it on PATH for the next steps (GITHUB_PATH) and this one
# (prints the directory). A download that fails is an error of the cache (the caller
# decides whether that fails the job); a checksum that does not match always is.
set -euo pipefail

url=${CACHER_RELEASE_URL:?release-url is required}
url=${url%/}
case "${RUNNER_OS:-Linux}" in
  Linux) os=linux ;;
  macOS) os=darwin ;;
  *) echo "::error::cacher has no release for ${RUNNER_OS}" >&2; exit 3 ;;
esac
case "${RUNNER_ARCH:-X64}" in
  X64) arch=amd64 ;;
  ARM64) arch=arm64 ;;
  *) echo "::error::cacher has no release for ${RUNNER_ARCH}" >&2; exit 3 ;;
esac
name="cacher-$os-$arch"
sha256() { if command -v sha256sum >/dev/null; then sha256sum "$1"; else shasum -a 256 "$1"; fi | cut -d' ' -f1; }
id=$(printf '%s' "$url" | { if command -v sha256sum >/dev/null; then sha256sum; else shasum -a 256; fi; } | cut -c1-16)
dir="${RUNNER_TOOL_CACHE:-$HOME/.cache}/cacher/$id/$os-$arch"
if [ ! -x "$dir/cacher" ]; then
  mkdir -p "$dir"
  tmp=$(mktemp "$dir/.download.XXXXXX")
  trap 'rm -f "$tmp"' EXIT
  if ! curl -fsSL --retry 3 "$url/$name" -o "$tmp" ||
     ! sums=$(curl -fsSL --retry 3 "$url/checksums.txt"); then
    echo "cannot download $name or checksums.txt from $url" >&2
    exit 2
  fi
  want=$(printf '%s\n' "$sums" | awk -v f="$name" '$2 == f || $2 == "*" f { print $1 }')
  got=$(sha256 "$tmp")
  if [ -z "$want" ] || [ "$want" != "$got" ]; then
    echo "::error::$name from $url does not match its checksums.txt (want ${want:-nothing}, got $got)" >&2
    exit 3
  fi
  chmod +x "$tmp"
  mv "$tmp" "$dir/cacher"
fi
if [ -n "${GITHUB_PATH:-}" ]; then echo "$dir" >> "$GITHUB_PATH"; fi
echo "$dir"
