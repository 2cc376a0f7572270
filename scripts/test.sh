#!/usr/bin/env bash
# The full test suite: installs the test servers' Debian packages when missing, then runs
# every test with every feature.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-test-deps.sh
cargo test --all-features
