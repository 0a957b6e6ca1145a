#!/usr/bin/env bash
# The project's test command. Installs what the tests need when it is missing: Garage,
# moto and fusepy (PyPI), and as root Debian's docker.io, docker-registry, libfuse2,
# qemu-user-static and file. Builds the release binaries (scripts/release.sh; CACHER_SKIP_RELEASE=1 skips
# it), starts dockerd and a registry on 127.0.0.1:5000 when they are not running, runs
# the whole suite against Garage, then the plain, dir, warm-path, docker, fault, crash,
# concurrency, gc, bad-input, soak, TLS, soft-failure and GitHub-action tests again
# against moto, and stops what it started. The test harness (tests/util/server.rs)
# starts its own S3 server on loopback with random ports and a temp dir. Arguments go
# to the Garage run.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
started=()
cleanup() {
  for pid in "${started[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

if ! command -v garage >/dev/null 2>&1; then
  echo "scripts/test.sh: garage not found; building it (about 9 minutes)" >&2
  cargo install garage --locked --version 2.5.0
fi

moto_version=5.2.5
if ! python3 -c "import moto, sys; sys.exit(moto.__version__ != '$moto_version')" 2>/dev/null; then
  python3 -m pip install -q "moto[server]==$moto_version"
fi

# fusepy and libfuse2 for the case-insensitive filesystem of tests/util/casefold_fs.py.
if ! python3 -c "import fuse" >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libfuse2 >/dev/null
  fi
  python3 -m pip install -q fusepy
fi

if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker-registry >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-registry >/dev/null
  else
    echo "scripts/test.sh: dockerd or docker-registry missing and cannot install them; docker tests will say SKIPPED" >&2
  fi
fi

if command -v dockerd >/dev/null 2>&1 && ! docker info >/dev/null 2>&1; then
  dockerd >/tmp/cacher-test-dockerd.log 2>&1 &
  started+=($!)
  for _ in $(seq 1 120); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
fi

if command -v docker-registry >/dev/null 2>&1 \
  && ! curl -sf http://127.0.0.1:5000/v2/ >/dev/null 2>&1; then
  registry_dir=$(mktemp -d)
  cat >"$registry_dir/config.yml" <<YAML
version: 0.1
storage:
  filesystem:
    rootdirectory: $registry_dir/data
http:
  addr: 127.0.0.1:5000
YAML
  docker-registry serve "$registry_dir/config.yml" >"$registry_dir/log" 2>&1 &
  started+=($!)
  for _ in $(seq 1 40); do curl -sf http://127.0.0.1:5000/v2/ >/dev/null 2>&1 && break; sleep 0.25; done
fi

# The release binaries, so tests/release.rs checks them and tests/recipes.rs installs the
# static linux-amd64 one as the CI recipes do (about 15 minutes from cold on 2 cores).
if [ "${CACHER_SKIP_RELEASE:-0}" != 1 ]; then
  if ! command -v qemu-aarch64-static >/dev/null 2>&1 || ! command -v file >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static file >/dev/null
    fi
  fi
  scripts/release.sh
fi

cargo test "$@"
# Modules whose tests hold on any S3 server; config and shipping need Garage's
# credential checks (moto accepts any secret), keys and file_store need no server.
CACHER_TEST_SERVER=moto cargo test --test tests -- \
  plain:: dir:: warm:: docker:: concurrency:: crash:: faults:: gc:: bad_input:: soak:: tls:: \
  soft:: actions:: signed::
