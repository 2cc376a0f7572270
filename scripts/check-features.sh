#!/usr/bin/env bash
# Feature gates hold (the default build has no XML parser; the `ring` build has no
# aws-lc), and `ring` alone does every TLS connection: token requests, Redis, PostgreSQL.
# Needs the test servers (scripts/install-test-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
graph() {
    cargo tree -e normal,build --prefix none "$@" | sed 's/ (.*//' | sort -u
}
if graph | grep -q '^quick-xml '; then
    echo "check-features: the default build pulls quick-xml (it belongs to the xml feature)" >&2
    exit 1
fi
ring_only=(--no-default-features --features ring,redis,postgres,consent,manager,middleware,encryption,highq)
if graph "${ring_only[@]}" | grep -q '^aws-lc'; then
    echo "check-features: the ring build pulls aws-lc:" >&2
    cargo tree -e normal,build "${ring_only[@]}" -i aws-lc-sys >&2
    exit 1
fi
cargo test --no-default-features --features ring,redis,postgres,testing,conformance \
    --test tls_provider --test redis_store --test postgres_store -- \
    the_builds_provider rediss_with_a_private_ca postgres_over_tls
