#!/usr/bin/env bash
# The full test suite: installs the test servers' Debian packages when missing, then runs
# every test with every feature, then checks the feature gates and TLS with `ring` alone.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-test-deps.sh
cargo test --all-features
bash scripts/check-features.sh
