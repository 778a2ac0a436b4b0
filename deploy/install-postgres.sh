#!/bin/sh
# Install what test_postgres.py (and deploy/test_nodes.py, bench_broker.py --db postgres) need:
# PostgreSQL's server programs (Debian's postgresql package) and psycopg 3 in the virtual
# environment .venv/ at the repository root. Safe to run again: each step is skipped when its
# result is already there. The tests start their own server (initdb, pg_ctl) on a free port,
# so the package's system service is kept from starting (and stopped if it did start).
set -eu

cd "$(dirname "$0")/.."

if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 && ! command -v pg_ctl >/dev/null; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    POLICY=/usr/sbin/policy-rc.d      # exit 101: invoke-rc.d starts no service during the install
    if [ ! -e "$POLICY" ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
        $SUDO chmod 755 "$POLICY"
        trap '$SUDO rm -f "$POLICY"' EXIT
    fi
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q --no-install-recommends postgresql
    $SUDO service postgresql stop >/dev/null 2>&1 || true
fi

if ! .venv/bin/python -c "import psycopg" 2>/dev/null; then
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/pip install -q "psycopg[binary]>=3.2"
fi

ls -d /usr/lib/postgresql/*/bin 2>/dev/null || command -v pg_ctl
.venv/bin/python -c "import psycopg; print('psycopg', psycopg.__version__)"
