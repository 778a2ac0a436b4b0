#!/bin/sh
# Install what deploy/test_nginx.py and deploy/test_http2.py need: Debian's nginx at
# /usr/sbin/nginx, and the openssl command (test_http2.py makes a self-signed certificate).
# Safe to run again: nothing happens when both are already there.
# The tests run their own nginx as a child process on free ports, so the package's
# system service is kept from starting (and stopped and disabled if it did start):
# it would otherwise hold port 80 for as long as the machine runs.
set -eu

if [ -x /usr/sbin/nginx ] && command -v openssl >/dev/null; then
    /usr/sbin/nginx -v
    exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive

# invoke-rc.d asks /usr/sbin/policy-rc.d before starting a service; exit 101 means
# "not now". Put one in place for the install unless the machine already has one.
POLICY=/usr/sbin/policy-rc.d
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
    $SUDO chmod 755 "$POLICY"
    trap '$SUDO rm -f "$POLICY"' EXIT
fi

$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends nginx openssl

# In case a service manager started it anyway.
if [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now nginx >/dev/null 2>&1 || true
else
    $SUDO update-rc.d nginx disable >/dev/null 2>&1 || true
    $SUDO service nginx stop >/dev/null 2>&1 || true
fi

/usr/sbin/nginx -v
