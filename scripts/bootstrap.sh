#!/usr/bin/env bash
# Make this machine ready to run and test consumer_svc; safe to run again and again.
#
#   - system packages: rabbitmq-server (with epmd, from erlang-base) for the tests' throwaway
#     brokers, and python3-venv where python3 lacks it; installed with apt-get when root,
#     otherwise printed for you to run;
#   - .venv with the package and its [test,dev] extras, reinstalled whenever setup.py,
#     pyproject.toml, README.md or the sources change (the tests import the installed copy);
#   - a Debian 13 root with RabbitMQ 4.0 for the 4.0 tests (scripts/rabbitmq4-root.sh: made
#     once under .tmp/, ~1 min; RABBITMQ4_ROOT names an existing one). Its failure fails this.
#
# PYTHON picks the interpreter for a new .venv (default python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv

say() { printf 'bootstrap: %s\n' "$*" >&2; }

have_rabbitmq() {
    [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] && return 0
    compgen -G '/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin/rabbitmq-server' >/dev/null
}
have_epmd() { command -v epmd >/dev/null || [ -x /usr/lib/erlang/bin/epmd ]; }
have_venv_module() { "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; }

# -- system packages ---------------------------------------------------------------------
if ! command -v "$PYTHON" >/dev/null; then
    say "$PYTHON not found; install Python 3 (Debian: apt-get install python3 python3-venv)"
    exit 1
fi
missing=()
have_rabbitmq || missing+=(rabbitmq-server)
have_epmd || missing+=(erlang-base)
if [ ! -x "$VENV/bin/python" ] && ! have_venv_module; then
    missing+=(python3-venv)
fi
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        say "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    else
        say "missing system packages: ${missing[*]}. As root, run:"
        say "  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${missing[*]}"
        exit 1
    fi
fi

# -- the virtualenv ----------------------------------------------------------------------
if ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
    say "creating $VENV with $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
fi

# A fingerprint of everything that goes into the installed package and its extras.
fingerprint=$(
    {
        find setup.py pyproject.toml README.md consumer_svc twisted -type f \
            ! -path '*/__pycache__/*' ! -name 'dropin.cache' ! -name '*.pyc' -print0 2>/dev/null |
            sort -z | xargs -0 sha256sum
        "$VENV/bin/python" -c 'import sys; print(sys.version)'
    } | sha256sum | cut -d' ' -f1
)
stamp="$VENV/.consumer_svc-installed"
if [ "$(cat "$stamp" 2>/dev/null)" != "$fingerprint" ]; then
    say "installing .[test,dev] into $VENV"
    rm -f "$stamp"
    # pip always rebuilds and reinstalls a local project, but setuptools reuses build/lib,
    # where a module deleted from the sources would live on; start from a clean build/.
    rm -rf build
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check '.[test,dev]'
    # Refresh Twisted's plugin cache so `twistd consumer` is found at once.
    "$VENV/bin/python" -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
    echo "$fingerprint" >"$stamp"
fi

# -- RabbitMQ 4.0 in a Debian 13 root ------------------------------------------------------
scripts/rabbitmq4-root.sh
