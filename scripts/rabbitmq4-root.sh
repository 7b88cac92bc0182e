#!/usr/bin/env bash
# A Debian 13 root with RabbitMQ 4.0 in it, for the tests' 4.0 nodes (consumer_svc/testing/rabbitmq.py);
# safe to run again and again, and quick once the root is ready.
#
# Debian 13's rabbitmq-server (4.0.x) needs a newer glibc than this Debian 12 host has, so the
# tests run it chrooted into a debootstrap'ed trixie root (shared/notes/rabbitmq-4.md):
#
#   .tmp/debian13-root        the root (~500 MB), made once and then reused
#   .tmp/debian13-root.ready  stamp written last: without it a half-made root is redone
#
# RABBITMQ4_ROOT=/some/root uses an existing root instead; it is only checked, never changed.
# Fails with one line on stderr when the root cannot be had (not root, no network): the 4.0
# tests must not be skipped silently.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf 'rabbitmq4-root: %s\n' "$*" >&2; }
fail() {
    say "FAILED: $*"
    exit 1
}

# The same check consumer_svc/testing/rabbitmq.py makes before it starts a 4.0 node.
usable() { compgen -G "$1/usr/lib/rabbitmq/lib/rabbitmq_server-4.0.*/sbin/rabbitmq-server" >/dev/null; }

if [ -n "${RABBITMQ4_ROOT:-}" ]; then
    usable "$RABBITMQ4_ROOT" ||
        fail "RABBITMQ4_ROOT=$RABBITMQ4_ROOT has no RabbitMQ 4.0 (usr/lib/rabbitmq/lib/rabbitmq_server-4.0.*)"
    exit 0
fi

ROOT=$PWD/.tmp/debian13-root
STAMP=$ROOT.ready
RECIPE="trixie minbase rabbitmq-server v1" # change it to have every cached root redone
if [ "$(cat "$STAMP" 2>/dev/null)" = "$RECIPE" ] && usable "$ROOT"; then
    exit 0
fi

[ "$(id -u)" -eq 0 ] || fail "building $ROOT needs root (debootstrap, chroot, mount); or set RABBITMQ4_ROOT"

# Never delete through a mount: a bind-mounted /dev or /proc inside the root is the host's.
if awk -v r="$ROOT" '$5 == r || index($5, r "/") == 1 { found = 1 } END { exit !found }' /proc/self/mountinfo; then
    fail "something is mounted under $ROOT; unmount it first (findmnt | grep $ROOT)"
fi

started=$(date +%s)
log=$PWD/.tmp/debian13-root.log
mkdir -p .tmp
: >"$log"
if ! command -v debootstrap >/dev/null; then
    say "installing debootstrap"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap; } \
        >>"$log" 2>&1 || fail "apt-get install debootstrap failed (network?); see $log"
fi

rm -f "$STAMP"
rm -rf --one-file-system "$ROOT"
say "debootstrap --variant=minbase trixie $ROOT (once, ~1 min; log in $log)"
debootstrap --variant=minbase trixie "$ROOT" >>"$log" 2>&1 ||
    fail "debootstrap trixie failed (network? see $log)"

say "installing rabbitmq-server in $ROOT"
# /proc and /dev are bound in a private mount namespace, so they vanish with this command.
# shellcheck disable=SC2016
unshare --mount --propagation private sh -ec '
    mount --bind /proc "$1/proc"
    mount --bind /dev "$1/dev"
    exec chroot "$1" sh -ec "
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rabbitmq-server
        apt-get clean
    "' sh "$ROOT" >>"$log" 2>&1 ||
    fail "installing rabbitmq-server in $ROOT failed (network? see $log)"
# The package starts nothing in a chroot (no init), but make sure: nothing may run from here.
usable "$ROOT" || fail "rabbitmq-server 4.0 not found in $ROOT after the install (see $log)"
echo "$RECIPE" >"$STAMP"
say "ready in $(($(date +%s) - started)) s: $(basename "$ROOT"/usr/lib/rabbitmq/lib/rabbitmq_server-*)"
