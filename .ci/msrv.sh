#!/usr/bin/env bash
# The Rust version prestop claims to build with (rust-version in Cargo.toml) and the one
# Dockerfile.example builds with (its RUST_VERSION) must be the toolchain this CI builds and
# tests with: a machine here has exactly one toolchain and cannot fetch another, so that is
# the only version a run can vouch for. (clippy's incompatible_msrv lint also refuses any
# standard-library API newer than rust-version, but no lint sees newer syntax.) When the
# toolchain moves, test on it and move both claims with it.
set -euo pipefail
cd "$(dirname "$0")/.."

toolchain=$(rustc --version | awk '{ split($2, v, "."); print v[1] "." v[2] }')
claimed=$(sed -n 's/^rust-version = "\([0-9.]*\)"$/\1/p' Cargo.toml)
image=$(sed -n 's/^ARG RUST_VERSION=\([0-9.]*\)$/\1/p' Dockerfile.example)
status=0
for pair in "Cargo.toml rust-version:$claimed" "Dockerfile.example RUST_VERSION:$image"; do
    what=${pair%:*} version=${pair##*:}
    if [[ $version != "$toolchain" ]]; then
        echo "msrv: $what is '${version:-missing}', but CI builds and tests with Rust $toolchain" >&2
        status=1
    fi
done
((status == 0)) && echo "msrv: Cargo.toml and Dockerfile.example both claim Rust $toolchain, the toolchain tested here"
exit $status
