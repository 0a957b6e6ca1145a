#!/usr/bin/env bash
# The project's test command: installs Garage when it is missing, then runs the whole
# suite. The test harness (tests/util/garage.rs) starts its own single-node Garage on
# loopback with random ports and a temp dir, and the node dies with the test process.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

if ! command -v garage >/dev/null 2>&1; then
  echo "scripts/test.sh: garage not found; building it (about 9 minutes)" >&2
  cargo install garage --locked --version 2.5.0
fi

cargo test "$@"
