#!/usr/bin/env bash
# Install the benchmark's system tools (nginx, wrk) from Debian's packages.
#
# Idempotent: does nothing when both are on PATH, and runs `apt-get update` only
# when something is missing. Uses sudo only when not already root.
set -euo pipefail

missing=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)

if [ ${#missing[@]} -eq 0 ]; then
    echo ">> bench tools present: nginx, wrk"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
else
    echo "bench/install-tools.sh: need root (or sudo) to install: ${missing[*]}" >&2
    exit 1
fi

echo ">> installing ${missing[*]} from Debian's packages"
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
# nginx-light would do, but `nginx` is the package every Debian release has.
"${as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The Debian package starts a system-wide nginx on port 80; the benchmark runs
# its own on a loopback port, so stop the service where systemd/sysv runs it.
if command -v service >/dev/null 2>&1; then
    "${as_root[@]}" service nginx stop >/dev/null 2>&1 || true
fi
echo ">> installed ${missing[*]}"
