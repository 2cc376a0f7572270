#!/usr/bin/env bash
# Feature gates hold (the default build has no XML parser; the `ring` build has no
# aws-lc), and `ring` alone does every TLS connection: token requests, Redis, PostgreSQL.
# Needs the test servers (scripts/install-test-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
# The crate graph, one name per line. Captured before it is searched: a failing
# `cargo tree` stops the script instead of reading as "not found".
graph() {
    cargo tree -e normal,build --prefix none "$@" | sed 's/ (.*//' | sort -u
}
default_graph=$(graph)
if grep -q '^quick-xml ' <<<"$default_graph"; then
    echo "check-features: the default build pulls quick-xml (it belongs to the xml feature)" >&2
    exit 1
fi
grep -q '^reqwest ' <<<"$default_graph" # the graph was read
ring_only=(--no-default-features --features ring,redis,postgres,consent,manager,middleware,encryption,highq)
ring_graph=$(graph "${ring_only[@]}")
if grep -q '^aws-lc' <<<"$ring_graph"; then
    echo "check-features: the ring build pulls aws-lc:" >&2
    cargo tree -e normal,build "${ring_only[@]}" -i aws-lc-sys >&2
    exit 1
fi
grep -q '^ring ' <<<"$ring_graph"
tests=(
    the_builds_provider_is_installed_and_serves_token_requests
    rediss_with_a_private_ca_conforms_and_refuses_what_it_should
    postgres_over_tls_conforms_and_refuses_what_it_should
)
output=$(cargo test --no-default-features --features ring,redis,postgres,testing,conformance \
    --test tls_provider --test redis_store --test postgres_store -- --exact "${tests[@]}" 2>&1) || {
    echo "$output" >&2
    exit 1
}
echo "$output"
for name in "${tests[@]}"; do
    if ! grep -q "^test $name \.\.\. ok$" <<<"$output"; then
        echo "check-features: $name did not run and pass with ring alone" >&2
        exit 1
    fi
done
