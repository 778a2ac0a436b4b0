#!/bin/sh
# Install what demo/test_demo.py needs: Debian's Chromium at /usr/bin/chromium and a
# virtual environment .venv/ (at the repository root) holding the Playwright package.
# Safe to run again: each step is skipped when its result is already there.
# Playwright drives the system browser; never run `playwright install` (it downloads one).
set -eu

cd "$(dirname "$0")/.."

if [ ! -x /usr/bin/chromium ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
fi

if ! .venv/bin/python -c "import playwright" 2>/dev/null; then
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/pip install -q playwright
fi

/usr/bin/chromium --version 2>/dev/null  # its launcher script warns on stderr; harmless
.venv/bin/python -c "import importlib.metadata as m; print('playwright', m.version('playwright'))"
