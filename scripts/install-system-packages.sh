#!/usr/bin/env bash
# Install the Debian packages the test suite needs that pip cannot provide.
#
# Chromium, for the browser tests of /docs and /status (tests/browser); Redis,
# for the shared rate-limit, quota and slot tests (tests/integration/
# test_redis_limits.py, test_quotas_redis.py, test_queueing.py); Prometheus,
# which scrapes the gateway in tests/integration/test_prometheus.py; and
# PostgreSQL, for the key and usage tests against a real server
# (tests/integration/test_keys.py starts a throwaway cluster). The script is
# idempotent: it runs `apt-get update` and `apt-get install` only when a package
# is missing, says what it does, and uses sudo only when not root.
set -euo pipefail

# package name -> a file that proves it is installed
declare -A PACKAGES=(
    [chromium]=/usr/bin/chromium
    [redis-server]=/usr/bin/redis-server
    [prometheus]=/usr/bin/prometheus
    [postgresql]=/usr/lib/postgresql/15/bin/initdb
)

say() { printf '>> %s\n' "$*"; }
fail() {
    printf 'install-system-packages: %s\n' "$*" >&2
    exit 1
}

missing=()
for package in "${!PACKAGES[@]}"; do
    if [[ -x "${PACKAGES[$package]}" ]]; then
        say "$package: present (${PACKAGES[$package]})"
    else
        missing+=("$package")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    say "system packages: nothing to install"
    exit 0
fi

command -v apt-get >/dev/null 2>&1 ||
    fail "apt-get not found: install ${missing[*]} with this system's package manager."

sudo=()
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 ||
        fail "not root and sudo is missing: run as root to install ${missing[*]}."
    sudo=(sudo)
fi

say "installing ${missing[*]} with apt-get (missing)"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q ||
    fail "apt-get update failed: check the network and the apt sources."
"${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" ||
    fail "apt-get install ${missing[*]} failed (see apt's message above)."

for package in "${missing[@]}"; do
    [[ -x "${PACKAGES[$package]}" ]] ||
        fail "$package was installed but ${PACKAGES[$package]} is still missing."
    say "$package: installed (${PACKAGES[$package]})"
done
