"""deploy/nginx-http2.conf (HTTPS and HTTP/2 in front of broker.py) with the demo open in 8 tabs.

    sh deploy/install-nginx.sh                         # Debian's nginx and openssl
    sh demo/install-browser.sh                         # Debian's chromium, and .venv/ with playwright
    .venv/bin/python -m unittest -v deploy/test_http2.py

A browser opens at most 6 HTTP/1.1 connections to one host and an EventSource holds one for as
long as it is open, so with the demo in 8 tabs, tabs 7 and 8 never synced and an insert from tab 1
waited behind the streams. Over HTTP/2 all of them share one connection. One broker (`--static
demo`, a temporary db) and one nginx (a child process, as in deploy/test_nginx.py, whose helpers
it uses) serve every test; nginx runs the block as it is, but for its two ports and its certificate,
a self-signed one for 127.0.0.1 made with the openssl command. Playwright drives Debian's Chromium,
one browser context (one set of connections) per test. Http11Tests shows the limit itself, on
the broker without nginx. Without nginx, openssl, Chromium or playwright the tests are skipped, or
fail when CI=true.
"""
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import time
import unittest
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "demo"))
import test_nginx                          # deploy/ is not a package: import it by path
from test_demo import CHROMIUM, start_chromium
from test_nginx import free_port

try:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout, expect, sync_playwright
except ImportError as err:          # reported by setUpModule: a skip, or under CI a failure
    sync_playwright = None
    PLAYWRIGHT_IMPORT_ERROR = err

ROOT = HERE.parent
BROKER_PY = ROOT / "broker.py"
DEMO = ROOT / "demo"
SERVER_BLOCK = HERE / "nginx-http2.conf"
PLAIN_BLOCK = HERE / "nginx.conf"
NGINX = "/usr/sbin/nginx"
OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TABS = 8
SHOWN = 5_000          # ms: a name typed in one tab shows in the others within this
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# The top-level nginx.conf of deploy/test_nginx.py, but for an access log that names each request's
# connection and protocol, so a test can tell what travelled over HTTP/2, and on how many
# connections.
NGINX_CONF = test_nginx.NGINX_CONF.replace(
    "    access_log {dir}/access.log;\n",
    "    log_format requests '$connection $server_protocol $request_method $uri $status';\n"
    "    access_log {dir}/access.log requests;\n")
assert "log_format requests" in NGINX_CONF, "deploy/test_nginx.py's access_log line changed"

proxy = None        # the Proxy every test goes through; set by setUpModule()
browser = None      # one Chromium for every test; each test opens its own context


def unavailable(reason):
    """Skip the module, or fail it under CI, where a missing tool must not pass quietly."""
    if IN_CI:
        raise RuntimeError(f"{reason} (CI=true, so this fails instead of skipping; run "
                           "`sh deploy/install-nginx.sh` and `sh demo/install-browser.sh`)")
    raise unittest.SkipTest(f"{reason}; run `sh deploy/install-nginx.sh` and "
                            "`sh demo/install-browser.sh`")


def make_certificate(folder):
    """A self-signed certificate for 127.0.0.1 and its key, as cert.pem and key.pem in folder."""
    subprocess.run([OPENSSL, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", f"{folder}/key.pem", "-out", f"{folder}/cert.pem"],
                   check=True, capture_output=True, timeout=30)


def server_block(port, plain_port, broker_port, folder):
    """deploy/nginx-http2.conf with only its two listen ports, its upstream port and its
    certificate paths changed."""
    text = SERVER_BLOCK.read_text()
    for pattern, replacement in [
            (r"listen 443 ssl http2;", f"listen 127.0.0.1:{port} ssl http2;"),
            (r"listen 80;", f"listen 127.0.0.1:{plain_port};"),
            (r"server 127\.0\.0\.1:8080;", f"server 127.0.0.1:{broker_port};"),
            (r"ssl_certificate \S+;", f"ssl_certificate {folder}/cert.pem;"),
            (r"ssl_certificate_key \S+;", f"ssl_certificate_key {folder}/key.pem;")]:
        text, count = re.subn(rf"^(\s*){pattern}(?=\s*(#.*)?$)", lambda m: m.group(1) + replacement,
                              text, flags=re.MULTILINE)
        if count != 1:
            raise AssertionError(f"{SERVER_BLOCK} changed shape: expected one line matching "
                                 f"{pattern!r}, found {count}")
    listens = len(re.findall(r"^\s*listen\b", text, re.MULTILINE))
    if listens != 2:
        raise AssertionError(f"{SERVER_BLOCK} changed shape: {listens} listen lines, expected 2")
    return text


class Proxy(test_nginx.Proxy):
    """A broker.py serving demo/ on a free port, behind an nginx running deploy/nginx-http2.conf
    with a self-signed certificate."""

    PREFIX = "broker-http2-"
    NGINX_CONF = NGINX_CONF

    def broker_args(self):
        return ["--static", str(DEMO)]

    def configure(self, broker_port):
        self.log = Path(self.dir, "access.log")
        make_certificate(self.dir)
        self.port = free_port()
        self.plain_port = free_port()
        while self.plain_port == self.port:
            self.plain_port = free_port()
        Path(self.dir, "broker.conf").write_text(
            server_block(self.port, self.plain_port, broker_port, self.dir))
        self.url = f"https://127.0.0.1:{self.port}"

    def log_lines(self, offset, until, timeout=5):
        """The access log from byte offset on, as (connection, protocol, method, path, status)
        tuples, once until(lines) is true; nginx logs a request when it ends."""
        deadline = time.monotonic() + timeout
        while True:
            with open(self.log, "rb") as log:
                log.seek(offset)
                lines = [tuple(line.split()) for line in log.read().decode().splitlines()]
            if until(lines):
                return lines
            if time.monotonic() > deadline:
                raise AssertionError(f"the access log did not show it in {timeout} s:\n"
                                     + "\n".join(" ".join(line) for line in lines))
            time.sleep(0.05)


def setUpModule():
    global proxy, browser
    if sync_playwright is None:
        unavailable(f"playwright is not importable ({PLAYWRIGHT_IMPORT_ERROR})")
    for path in (NGINX, OPENSSL, CHROMIUM):
        if not os.access(path, os.X_OK):
            unavailable(f"{path} is missing")
    proxy = Proxy()
    unittest.addModuleCleanup(proxy.close)
    browser = start_chromium(unavailable)


def publish(url, event, data):
    """POST /insert straight to the broker (not through nginx); the record it returns."""
    request = urllib.request.Request(f"{url}/insert", method="POST",
                                     data=json.dumps({"event": event, "data": data}).encode(),
                                     headers={"Content-Type": "application/json"})
    with NO_PROXY.open(request, timeout=10) as response:
        return json.loads(response.read())


def names_stored(url):
    """Every name the demo's `user` event has held, from the broker's GET /audit/user."""
    with NO_PROXY.open(f"{url}/audit/user", timeout=10) as response:
        return [data["user"] for data in json.loads(response.read()).values()]


class TabsTestCase(unittest.TestCase):
    """A fresh browser context (its own connections) per test, the demo's name set before."""

    def setUp(self):
        self.context = browser.new_context(ignore_https_errors=True)    # the self-signed cert
        self.addCleanup(self.context.close)
        self.page_errors = []
        self.before = f"Before {self.id()}"
        publish(proxy.broker_url, "user", {"user": self.before})

    def open(self, url):
        """A new tab on url, remembering uncaught errors; fails if it does not load in 10 s."""
        page = self.context.new_page()
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        try:
            page.goto(url, timeout=10_000)
            return page
        except PlaywrightTimeout:
            pass
        self.fail(f"{url} did not load in 10 s (tab {len(self.context.pages)}; over HTTP/1.1 "
                  "the browser's 6 connections to the host are taken by open streams)")

    def type_name(self, page, name):
        page.get_by_label("Your name").fill(name)
        page.get_by_label("Your name").press("Enter")      # sends at once, not after the debounce

    def tearDown(self):
        self.assertEqual(self.page_errors, [], "uncaught JavaScript errors")


class Http2Tests(TabsTestCase):
    def test_eight_tabs_are_live_and_an_insert_from_tab_1_reaches_them_all(self):
        offset = proxy.log.stat().st_size
        tabs = [self.open(f"{proxy.url}/index.html") for _ in range(TABS)]
        for tab in tabs:                                     # each received the sync
            expect(tab.locator("#status")).to_have_text("live", timeout=SHOWN)
            expect(tab.locator("#name")).to_have_text(self.before, timeout=SHOWN)
            self.assertEqual(tab.evaluate(
                "performance.getEntriesByType('navigation')[0].nextHopProtocol"), "h2")

        name = f"Grace from tab 1 of {TABS}"
        self.type_name(tabs[0], name)
        for tab in tabs:
            expect(tab.locator("#name")).to_have_text(name, timeout=SHOWN)
        expect(tabs[0].locator("#error")).to_have_text("")
        self.assertEqual(names_stored(proxy.broker_url)[-1], name)

        # The streams are logged once they end: every request was HTTP/2, on one connection.
        self.context.close()
        lines = proxy.log_lines(offset, until=lambda lines: sum(
            line[3] == "/events" for line in lines) == TABS)
        self.assertEqual({line[1] for line in lines}, {"HTTP/2.0"}, lines)
        self.assertEqual(sum(line[2:4] == ("POST", "/insert") for line in lines), 1, lines)
        self.assertEqual(len({line[0] for line in lines}), 1, f"more than one connection: {lines}")

    def test_plain_http_is_sent_to_https(self):
        conn = http.client.HTTPConnection("127.0.0.1", proxy.plain_port, timeout=10)
        self.addCleanup(conn.close)
        conn.request("GET", "/index.html?broker=x")
        response = conn.getresponse()
        self.assertEqual((response.status, response.headers["Location"]),
                         (301, "https://127.0.0.1/index.html?broker=x"))


class Http11Tests(TabsTestCase):
    """The limit itself: the demo pages, opened from files, reach the broker over HTTP/1.1."""

    def test_over_http_1_1_tabs_7_and_8_and_an_insert_wait_until_a_tab_closes(self):
        page = f"{(DEMO / 'index.html').as_uri()}?broker={proxy.broker_url}"
        tabs = [self.open(page) for _ in range(TABS)]
        for tab in tabs[:6]:
            expect(tab.locator("#status")).to_have_text("live", timeout=SHOWN)
            expect(tab.locator("#name")).to_have_text(self.before, timeout=SHOWN)

        name = "Grace from tab 1, over HTTP/1.1"
        with tabs[0].expect_request("**/insert"):                # sent, so queued from here on
            self.type_name(tabs[0], name)
        # A name published after it reaches the 6 streams that have a connection; an insert
        # that had one too would have been stored long before.
        publish(proxy.broker_url, "user", {"user": "Meanwhile"})
        for tab in tabs[:6]:
            expect(tab.locator("#name")).to_have_text("Meanwhile", timeout=SHOWN)
        self.assertNotIn(name, names_stored(proxy.broker_url))
        for tab in tabs[6:]:
            expect(tab.locator("#status")).to_have_text("connecting", timeout=1)
            expect(tab.locator("#name")).to_have_text("Nobody has said yet.", timeout=1)

        for tab in tabs[1:6]:                                    # free 5 connections
            tab.close()
        for tab in (tabs[0], *tabs[6:]):
            expect(tab.locator("#name")).to_have_text(name, timeout=SHOWN)
            expect(tab.locator("#status")).to_have_text("live", timeout=SHOWN)
        self.assertEqual(names_stored(proxy.broker_url)[-1], name)


class ServerBlockTests(unittest.TestCase):
    def test_keeps_every_setting_of_nginx_conf(self):
        def settings(path):
            lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
            return [" ".join(line.split()) for line in lines if line]
        missing = [line for line in settings(PLAIN_BLOCK) if line not in settings(SERVER_BLOCK)]
        self.assertEqual(missing, [], f"lines of {PLAIN_BLOCK.name} not in {SERVER_BLOCK.name}")


if __name__ == "__main__":
    unittest.main()
