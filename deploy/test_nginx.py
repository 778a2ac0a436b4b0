"""The README's nginx server block (deploy/nginx.conf) in front of a real broker.py.

    sh deploy/install-nginx.sh                     # Debian's nginx, service left stopped
    python3 -m unittest -v deploy/test_nginx.py    # from the repository root

One broker (`--port 0 --heartbeat 1 --origin ...`, a temporary db) and one nginx (a child
process, not a daemon) serve every test. nginx runs the documented block as it is, but for
the two port lines; its http { } block gzips event streams, as many servers' do, so the
documented block has to turn that off. SmugglingThroughNginxTests hide a POST /insert in the
body of a GET (by Content-Length, then chunked) and check it is never stored. Without nginx the
tests are skipped, or fail when CI=true.
"""
import http.client
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from pathlib import Path

HERE = Path(__file__).resolve().parent
BROKER_PY = HERE.parent / "broker.py"
SERVER_BLOCK = HERE / "nginx.conf"
NGINX = "/usr/sbin/nginx"
ORIGIN = "https://app.example.com"
# broker.py's defaults that the block's timeouts are set against.
DEFAULT_HEARTBEAT = 15
DEFAULT_REQUEST_TIMEOUT = 10

# The top-level nginx.conf the documented block is included in.
NGINX_CONF = """\
daemon off;
{user}
pid {dir}/nginx.pid;
error_log stderr notice;
events {{ worker_connections 64; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    # Compress event streams, as a server's own http {{ }} may: the block must say no.
    gzip on;
    gzip_min_length 1;
    gzip_types text/event-stream application/json;
    include {dir}/broker.conf;
}}
"""

proxy = None    # the Proxy every test goes through; set by setUpModule()


class Child:
    """A child process and a thread that collects one of its output streams line by line,
    so a test can wait for a line with a timeout."""

    def __init__(self, name, args, stream):
        self.name = name
        pipes = {"stdout": subprocess.PIPE} if stream == "stdout" else {"stderr": subprocess.PIPE}
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, text=True, **pipes)
        self.output = []
        self.lines = queue.Queue()
        threading.Thread(target=self._collect, args=(getattr(self.process, stream),),
                         daemon=True).start()

    def _collect(self, stream):
        for line in stream:
            self.output.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_for_line(self, text, timeout):
        """The first line containing text; fails if the process ends or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"{self.name}: no line with {text!r} in {timeout} s:\n"
                                     + "".join(self.output)) from None
            if line is None:
                raise AssertionError(f"{self.name} exited ({self.process.wait()}):\n"
                                     + "".join(self.output))
            if text in line:
                return line

    def stop(self, sig=signal.SIGTERM):
        """Signal the process and reap it, killing it if it takes longer than 10 s."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"{self.name} ignored {sig.name} for 10 s")


def free_port():
    """A port nothing listens on just now (bound to 0, read, closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_block(nginx_port, broker_port):
    """deploy/nginx.conf with only its listen port and upstream port changed."""
    text = SERVER_BLOCK.read_text()
    text, listens = re.subn(r"^(\s*)listen 80;$", rf"\1listen 127.0.0.1:{nginx_port};",
                            text, flags=re.MULTILINE)
    text, upstreams = re.subn(r"^(\s*)server 127\.0\.0\.1:8080;$",
                              rf"\1server 127.0.0.1:{broker_port};", text, flags=re.MULTILINE)
    if (listens, upstreams) != (1, 1) or len(re.findall(r"^\s*listen\b", text, re.MULTILINE)) != 1:
        raise AssertionError(f"{SERVER_BLOCK} changed shape: expected one `listen 80;` and one "
                             f"`server 127.0.0.1:8080;` line, replaced {listens} and {upstreams}")
    return text


class Proxy:
    """A broker.py on a free port behind an nginx running the documented server block.
    deploy/test_http2.py subclasses it: broker_args() and configure() are what differ."""

    PREFIX = "broker-nginx-"
    NGINX_CONF = NGINX_CONF

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix=self.PREFIX)
        self.broker = self.nginx = None
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def broker_args(self):
        return ["--heartbeat", "1", "--origin", ORIGIN]

    def configure(self, broker_port):
        """Choose the port(s) nginx listens on and write its server block as broker.conf."""
        self.port = free_port()
        Path(self.dir, "broker.conf").write_text(server_block(self.port, broker_port))

    def _start(self):
        self.broker = Child("broker.py", [sys.executable, str(BROKER_PY), "--port", "0",
                                          "--db", f"{self.dir}/broker.db", "--quiet",
                                          *self.broker_args()], "stdout")
        line = self.broker.wait_for_line("broker listening on", timeout=10)
        self.broker_url = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
        self.configure(int(self.broker_url.rsplit(":", 1)[1]))
        # As root, workers run as root too, so they can write the temp dir.
        user = "user root;" if os.geteuid() == 0 else ""
        Path(self.dir, "nginx.conf").write_text(self.NGINX_CONF.format(dir=self.dir, user=user))
        self.nginx = Child("nginx", [NGINX, "-p", self.dir, "-e", "stderr",
                                     "-c", f"{self.dir}/nginx.conf"], "stderr")
        # Logged once the listening socket is open.
        self.nginx.wait_for_line("start worker process", timeout=10)

    def close(self):
        try:
            if self.nginx:
                self.nginx.stop(signal.SIGTERM)     # fast shutdown: open streams are cut
        finally:
            try:
                if self.broker:
                    self.broker.stop(signal.SIGTERM)
            finally:
                shutil.rmtree(self.dir, ignore_errors=True)


def setUpModule():
    global proxy
    if not os.access(NGINX, os.X_OK):
        reason = f"{NGINX} is missing: run deploy/install-nginx.sh"
        if os.environ.get("CI") == "true":
            raise RuntimeError(reason)      # CI must run these tests, not skip them
        raise unittest.SkipTest(reason)
    proxy = Proxy()
    unittest.addModuleCleanup(proxy.close)


def call(method, path, body=None, headers=None):
    """One request through nginx: status, headers, and the body as JSON (or text if not JSON)."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        raw = response.read()
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = raw.decode("utf-8", "replace")
        return response.status, response.headers, payload
    finally:
        conn.close()


def insert(event, data):
    """POST /insert through nginx; the record it returns."""
    status, _, record = call("POST", "/insert", {"event": event, "data": data})
    if status != 200:
        raise AssertionError(f"insert {event!r}: {status} {record}")
    return record


def unique_event(test):
    """An event name no other test uses."""
    return "nginx_" + test.id().rsplit(".", 1)[-1]


class EventStream:
    """GET /events through nginx on a plain socket: the response head, then one SSE block
    at a time. nginx re-chunks the broker's chunked body, so it is de-chunked as it comes."""

    def __init__(self, headers=(), path="/events"):
        self.sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        request = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Accept: text/event-stream",
                   "Accept-Encoding: gzip", *headers]
        self.sock.sendall(("\r\n".join(request) + "\r\n\r\n").encode())
        self.raw = b""      # bytes received and not yet de-chunked
        self.body = b""     # de-chunked bytes not yet returned as blocks
        deadline = time.monotonic() + 5
        while b"\r\n\r\n" not in self.raw:
            self._receive(deadline)
        head, self.raw = self.raw.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        self.headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self.chunked = self.headers.get("transfer-encoding") == "chunked"

    def close(self):
        self.sock.close()

    def _receive(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        self.sock.settimeout(left)
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("nginx closed the stream")
        self.raw += data

    def _dechunk(self):
        if not self.chunked:
            self.body, self.raw = self.body + self.raw, b""
            return
        while b"\r\n" in self.raw:
            size_line, rest = self.raw.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                raise EOFError("the stream ended (last chunk)")
            if len(rest) < size + 2:
                return
            self.body += rest[:size]
            self.raw = rest[size + 2:]

    def next_block(self, timeout):
        """The next SSE block's lines (a block ends at a blank line), within timeout seconds."""
        deadline = time.monotonic() + timeout
        while True:
            self._dechunk()
            if b"\n\n" in self.body:
                block, self.body = self.body.split(b"\n\n", 1)
                return block.decode().split("\n")
            try:
                self._receive(deadline)
            except socket.timeout:
                raise AssertionError(f"no complete SSE block within {timeout:.1f} s; "
                                     f"have {self.body[:300]!r}") from None

    def next_record(self, timeout):
        """The next block that is not a heartbeat comment, as a dict of its fields."""
        deadline = time.monotonic() + timeout
        while True:
            block = self.next_block(max(0.0, deadline - time.monotonic()))
            if not is_comment(block):
                return fields(block)

    def record_within(self, timeout):
        """The next record if one arrives within timeout seconds, else None."""
        try:
            return self.next_record(timeout)
        except AssertionError:          # next_block's "no complete SSE block within"
            return None

    def read_through_id_only_block(self, timeout=5):
        """Records up to the id-only block that ends the backlog, and that block's id."""
        records = []
        deadline = time.monotonic() + timeout
        while True:
            record = self.next_record(max(0.0, deadline - time.monotonic()))
            if list(record) == ["id"]:
                return records, record["id"]
            if "retry" not in record:
                records.append(record)


def send_raw(data):
    """Bytes sent to nginx on a plain socket, and all it answered until it closed the connection."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return answer
            answer += chunk


def hidden_insert(event):
    """A whole POST /insert request for event, as bytes, to hide in another request's body."""
    body = json.dumps({"event": event, "data": "smuggled"}).encode()
    return (b"POST /insert HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


def is_comment(block):
    return all(line.startswith(":") for line in block)


def fields(block):
    """An SSE block's lines as {field: value}; `data` JSON-decoded, `id` an int."""
    record = {}
    for line in block:
        name, _, value = line.partition(":")
        record[name] = value[1:] if value.startswith(" ") else value
    if "id" in record:
        record["id"] = int(record["id"])
    if "data" in record:
        record["data"] = json.loads(record["data"])
    return record


def seconds(duration):
    """An nginx time such as 90, 90s, 15m or 1h, in seconds."""
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", duration).groups()     # one unit only
    return int(number) * {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400}[unit]


class StreamThroughNginxTests(unittest.TestCase):
    def setUp(self):
        self.stream = EventStream()
        self.addCleanup(self.stream.close)

    def test_stream_arrives_as_an_uncompressed_event_stream(self):
        self.assertEqual(self.stream.status, 200)
        self.assertTrue(self.stream.headers["content-type"].startswith("text/event-stream"))
        self.assertEqual(self.stream.headers.get("cache-control"), "no-cache")
        self.assertNotIn("content-encoding", self.stream.headers)    # though the client takes gzip
        self.assertEqual(self.stream.next_block(timeout=5), ["retry: 3000"])

    def test_live_record_arrives_at_once(self):
        self.stream.read_through_id_only_block()
        name = unique_event(self)
        sent = time.monotonic()
        record = insert(name, {"small": True})
        got = self.stream.next_record(timeout=1)
        self.assertEqual(got, {"id": record["id"], "event": name, "data": {"small": True}})
        self.assertLess(time.monotonic() - sent, 1)

    def test_heartbeat_comment_passes_through(self):
        self.stream.read_through_id_only_block()
        block = self.stream.next_block(timeout=3)       # the broker runs with --heartbeat 1
        self.assertTrue(is_comment(block), block)

    def test_resume_sends_only_newer_records_then_id_only_block(self):
        name = unique_event(self)
        first, second, third = (insert(name, n) for n in (1, 2, 3))
        resumed = EventStream([f"Last-Event-ID: {first['id']}"])
        self.addCleanup(resumed.close)
        records, newest = resumed.read_through_id_only_block()
        self.assertEqual(records, [{"id": r["id"], "event": name, "data": r["data"]}
                                   for r in (second, third)])
        self.assertEqual(newest, third["id"])


class InsertThroughNginxTests(unittest.TestCase):
    def test_insert_returns_the_record(self):
        name = unique_event(self)
        status, _, record = call("POST", "/insert", {"event": name, "data": {"n": 1}})
        self.assertEqual(status, 200)
        self.assertEqual(sorted(record), ["data", "event", "id", "timestamp"])
        self.assertEqual((record["event"], record["data"]), (name, {"n": 1}))

    def test_bad_insert_returns_the_brokers_json_error(self):
        status, headers, body = call("POST", "/insert", b"{not json",
                                     {"Content-Type": "application/json"})
        self.assertTrue(400 <= status < 500, status)
        self.assertTrue(headers["Content-Type"].startswith("application/json"))
        self.assertEqual(list(body), ["error"])

    def test_body_just_under_one_mib_passes_nginx(self):
        name = unique_event(self)
        status, _, record = call("POST", "/insert", {"event": name, "data": "x" * 1_000_000})
        self.assertEqual(status, 200, str(record)[:300])
        self.assertEqual(len(record["data"]), 1_000_000)

    def test_body_over_one_mib_is_refused_with_413(self):
        name = unique_event(self)
        status, _, _ = call("POST", "/insert", {"event": name, "data": "x" * 1_100_000})
        self.assertEqual(status, 413)


class SmugglingThroughNginxTests(unittest.TestCase):
    """A GET whose body is a whole POST /insert: nginx passes the body on to the broker (with a
    Content-Length, even when the client sent it chunked), and a broker that ignores a GET's body
    would read it as the next request on that upstream connection, an insert nobody sent. Either
    fix will do (the body discarded, or the connection closed): the hidden insert is never stored."""

    def setUp(self):
        self.name = unique_event(self)
        self.stream = EventStream(path=f"/events?event={self.name}")
        self.addCleanup(self.stream.close)
        self.stream.read_through_id_only_block()

    def assert_hidden_insert_not_stored(self):
        # A stored insert reaches the stream within milliseconds; a second is ample.
        self.assertIsNone(self.stream.record_within(timeout=1), "the hidden insert was stored")
        status, _, body = call("GET", f"/audit/{self.name}")
        self.assertEqual((status, body), (200, {}))

    def test_a_post_hidden_in_a_get_body_by_content_length_is_not_stored(self):
        hidden = hidden_insert(self.name)
        answer = send_raw(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(hidden), hidden))
        self.assertRegex(answer, rb"^HTTP/1\.1 \d{3} ", "nginx answered the GET")
        self.assert_hidden_insert_not_stored()

    def test_a_post_hidden_in_a_chunked_get_body_is_not_stored(self):
        hidden = hidden_insert(self.name)
        answer = send_raw(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
                          % (len(hidden), hidden))
        self.assertRegex(answer, rb"^HTTP/1\.1 \d{3} ", "nginx answered the GET")
        self.assert_hidden_insert_not_stored()


class CorsThroughNginxTests(unittest.TestCase):
    def test_preflight_and_insert_carry_the_brokers_origin(self):
        status, headers, _ = call("OPTIONS", "/insert", headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "Content-Type"})
        self.assertEqual((status, headers["Access-Control-Allow-Origin"]), (204, ORIGIN))
        status, headers, _ = call("POST", "/insert", {"event": unique_event(self), "data": 1},
                                  {"Origin": ORIGIN})
        self.assertEqual((status, headers["Access-Control-Allow-Origin"]), (200, ORIGIN))


class ServerBlockTests(unittest.TestCase):
    def setting(self, name):
        found = re.findall(rf"^\s*{name} (\S+);", SERVER_BLOCK.read_text(), re.MULTILINE)
        self.assertEqual(len(found), 1, f"one {name} line in {SERVER_BLOCK}")
        return seconds(found[0])

    def test_read_timeout_outlasts_the_default_heartbeat(self):
        self.assertGreater(self.setting("proxy_read_timeout"), DEFAULT_HEARTBEAT)

    def test_idle_upstream_connections_close_before_the_broker_times_them_out(self):
        # Else a POST may meet a connection the broker is closing.
        self.assertLess(self.setting("keepalive_timeout"), DEFAULT_REQUEST_TIMEOUT)

    def test_readme_shows_exactly_this_block(self):
        readme = (HERE.parent / "README.md").read_text()
        self.assertIn("```nginx\n" + SERVER_BLOCK.read_text().rstrip("\n") + "\n```", readme)


if __name__ == "__main__":
    unittest.main()
