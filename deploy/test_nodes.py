"""deploy/nginx-nodes.conf: nginx in front of two broker.py nodes on one PostgreSQL database,
and a node killed under a browser's open EventSource.

    sh deploy/install-nginx.sh                         # Debian's nginx
    sh deploy/install-postgres.sh                      # PostgreSQL's server programs, psycopg in .venv/
    sh demo/install-browser.sh                         # Debian's chromium, playwright in .venv/
    .venv/bin/python -m unittest -v deploy/test_nodes.py

One PostgreSQL server (test_postgres.PostgresServer) serves every test, each cluster on a new
database. A Cluster is two nodes (`python broker.py --port 0 --db URL --heartbeat 1 --static
FOLDER`, the folder holding this file's PAGE) and an nginx (a child process, as in
deploy/test_nginx.py, whose helpers it uses) running the block as it is, but for its listen port
and the nodes' addresses. FailoverTests kill the node serving Chromium's EventSource while
records are published through nginx: the browser reconnects, through nginx, to the other node
with Last-Event-ID and misses nothing. NodesTests check that inserts through nginx go to both
nodes and that either node streams what the other stored. RetryTests put a node that fails
after reading a request first in the upstream: a GET goes on to the next node, a POST does not.
ServerBlockTests read the file: nginx.conf's stream settings kept, timeouts against heartbeats.
Without nginx, Chromium, PostgreSQL, psycopg or playwright the tests are skipped, or fail when
CI=true.
"""
import http.client
import itertools
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import unittest
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
import test_nginx                          # deploy/ is not a package: import it by path
from test_broker import EventStream, Remote, call, metric, subscribers, wait_until
from test_http2 import CHROMIUM, IN_CI, start_chromium
from test_nginx import Child, free_port, seconds
from test_postgres import PostgresServer   # in the repository root, as test_broker

try:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout, sync_playwright
except ImportError as err:          # reported by setUpModule: a skip, or under CI a failure
    sync_playwright = None
    PLAYWRIGHT_IMPORT_ERROR = err

BROKER_PY = ROOT / "broker.py"
SERVER_BLOCK = HERE / "nginx-nodes.conf"
PLAIN_BLOCK = HERE / "nginx.conf"
NGINX = "/usr/sbin/nginx"
DEFAULT_HEARTBEAT = 15      # broker.py's default --heartbeat, which proxy_read_timeout must outlast
PUBLISH_EVERY = 0.025       # seconds between the test's inserts
RETRY_AFTER = 0.05          # ... and before an insert that failed is sent again
WAIT = 15                   # seconds any one condition may take to come true
WAIT_MS = WAIT * 1000

# The top-level nginx.conf of deploy/test_nginx.py, but for an access log that names each
# request's node (or nodes, when nginx passed it on) and the Last-Event-ID it carried.
NGINX_CONF = test_nginx.NGINX_CONF.replace(
    "    access_log {dir}/access.log;\n",
    "    log_format nodes '$request_method $uri $status \"$http_last_event_id\" $upstream_addr';\n"
    "    access_log {dir}/access.log nodes;\n")
assert "log_format nodes" in NGINX_CONF, "deploy/test_nginx.py's access_log line changed"
LOG_LINE = re.compile(r'(\S+) (\S+) (\d+) "([^"]*)" (.*)')

# The page the nodes serve: one EventSource, and what it received, for the test to read.
PAGE = """\
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>One EventSource through nginx</title>
<style>body { font: 16px system-ui, sans-serif; margin: 2em; }</style>
</head>
<body>
<p>The stream is <span id="status">connecting</span>; <span id="count">0</span> records received.</p>
<script>
const EVENTS = new URLSearchParams(location.search).getAll("event");
const received = [];     // {id, event, data} of every message, in the order it came
const opened = [];       // the last id received when each connection opened (null: none yet)
const failed = [];       // ... and when each one failed; the browser then reconnects by itself
const statusLine = document.getElementById("status");
const count = document.getElementById("count");

function lastId() {
  return received.length ? received[received.length - 1].id : null;
}

function keep(msg) {
  received.push({id: Number(msg.lastEventId), event: msg.type, data: msg.data});
  count.textContent = received.length;
}

const source = new EventSource("/events");
for (const name of EVENTS) source.addEventListener(name, keep);
source.addEventListener("open", () => { opened.push(lastId()); statusLine.textContent = "live"; });
source.addEventListener("error", () => { failed.push(lastId()); statusLine.textContent = "reconnecting"; });
</script>
</body>
</html>
"""

postgres = None     # the PostgresServer every cluster has a database on; set by setUpModule()
static = None       # the folder the nodes serve, holding PAGE as nodes.html
browser = None      # one Chromium for every test; each test opens its own context


def unavailable(reason):
    """Skip the module, or fail it under CI, where a missing tool must not pass quietly."""
    install = ("run `sh deploy/install-nginx.sh`, `sh deploy/install-postgres.sh` and "
               "`sh demo/install-browser.sh`")
    if IN_CI:
        raise RuntimeError(f"{reason} (CI=true, so this fails instead of skipping; {install})")
    raise unittest.SkipTest(f"{reason}; {install}")


def setUpModule():
    global postgres, static, browser
    if sync_playwright is None:
        unavailable(f"playwright is not importable ({PLAYWRIGHT_IMPORT_ERROR})")
    for path in (NGINX, CHROMIUM):
        if not os.access(path, os.X_OK):
            unavailable(f"{path} is missing")
    missing = PostgresServer.missing()
    if missing:
        unavailable(missing)
    static = tempfile.mkdtemp(prefix="broker-nodes-page-")
    unittest.addModuleCleanup(shutil.rmtree, static, ignore_errors=True)
    Path(static, "nodes.html").write_text(PAGE)
    postgres = PostgresServer()
    unittest.addModuleCleanup(postgres.close)
    browser = start_chromium(unavailable)


def wait_for(what, predicate):
    """Return once predicate() is true; else fail after WAIT seconds, saying what was awaited
    (what may be a function, called then)."""
    try:
        wait_until(predicate, timeout=WAIT)
    except AssertionError:
        raise AssertionError(f"{what() if callable(what) else what}: not within {WAIT} s") from None


def end(child, sig=signal.SIGTERM):
    """Stop a Child, then close its pipe once the thread reading it has read to the end."""
    child.stop(sig)
    while child.lines.get(timeout=WAIT) is not None:
        pass
    (child.process.stdout or child.process.stderr).close()


def server_block(nginx_port, node_ports):
    """deploy/nginx-nodes.conf with only its listen port and its nodes' ports changed."""
    text = SERVER_BLOCK.read_text()
    text, listens = re.subn(r"^(\s*)listen 80;", rf"\1listen 127.0.0.1:{nginx_port};",
                            text, flags=re.MULTILINE)
    servers = re.compile(r"^(\s*server 127\.0\.0\.1:)\d+(?=[ ;])", re.MULTILINE)
    found = len(servers.findall(text))
    if (listens, found) != (1, len(node_ports)):
        raise AssertionError(f"{SERVER_BLOCK} changed shape: expected one `listen 80;` line and "
                             f"{len(node_ports)} `server 127.0.0.1:PORT` lines, found {listens} "
                             f"and {found}")
    ports = iter(node_ports)
    return servers.sub(lambda match: f"{match.group(1)}{next(ports)}", text)


class Node:
    """python broker.py --port 0 --db URL --heartbeat 1, a child process serving the page."""

    def __init__(self, name, db_url):
        self.child = Child(name, [sys.executable, str(BROKER_PY), "--port", "0", "--db", db_url,
                                  "--heartbeat", "1", "--quiet", "--static", static], "stdout")
        self.url = self.port = None

    def wait_until_listening(self):
        line = self.child.wait_for_line("broker listening on", timeout=WAIT)
        self.url = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def subscribers(self):
        return subscribers(Remote(self.url))

    def inserts(self):
        """The inserts this node has committed itself (broker_inserts_total)."""
        return metric(Remote(self.url), "broker_inserts_total")

    def stop(self, sig=signal.SIGTERM):
        if not self.child.process.stdout.closed:
            end(self.child, sig)


class Nginx:
    """An nginx running deploy/nginx-nodes.conf in front of the given ports, in a folder of its own."""

    def __init__(self, node_ports):
        self.dir = tempfile.mkdtemp(prefix="broker-nodes-nginx-")
        self.child = None
        try:
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            self.log = Path(self.dir, "access.log")
            Path(self.dir, "broker.conf").write_text(server_block(self.port, node_ports))
            user = "user root;" if os.geteuid() == 0 else ""    # as test_nginx.Proxy
            Path(self.dir, "nginx.conf").write_text(NGINX_CONF.format(dir=self.dir, user=user))
            self.child = Child("nginx", [NGINX, "-p", self.dir, "-e", "stderr",
                                         "-c", f"{self.dir}/nginx.conf"], "stderr")
            self.child.wait_for_line("start worker process", timeout=WAIT)
        except BaseException:
            self.close()
            raise

    def log_lines(self, until):
        """The access log as (method, path, status, Last-Event-ID, nodes) tuples, once
        until(lines) is true; nginx logs a request when it ends."""
        lines = []

        def read():
            nonlocal lines
            text = self.log.read_text() if self.log.exists() else ""
            lines = [LOG_LINE.fullmatch(line).groups() for line in text.splitlines()]
            return until(lines)
        try:
            wait_until(read, timeout=WAIT)
        except AssertionError:
            raise AssertionError("the access log did not show it:\n" + self.log.read_text()) from None
        return lines

    def close(self):
        try:
            if self.child:
                end(self.child)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class Cluster:
    """Two nodes on a new database, both started at once, and an nginx in front of them."""

    def __init__(self):
        self.nodes, self.nginx = [], None
        try:
            db_url = postgres.new_database()
            self.nodes = [Node(f"node {n}", db_url) for n in (1, 2)]
            for node in self.nodes:
                node.wait_until_listening()
            self.nginx = Nginx([node.port for node in self.nodes])
        except BaseException:
            self.close()
            raise

    def close(self):
        try:
            if self.nginx:
                self.nginx.close()
        finally:
            for node in self.nodes:
                node.stop()


def post(url, event, data):
    """POST /insert; (status, the record or the error). A connection that fails is status None."""
    try:
        status, answer, _ = call(Remote(url), "POST", "/insert", {"event": event, "data": data})
        return status, answer
    except (OSError, http.client.HTTPException) as error:
        return None, repr(error)


def insert(url, event, data):
    """POST /insert; the record it returns."""
    status, answer = post(url, event, data)
    if status != 200:
        raise AssertionError(f"insert {event!r} at {url}: {status} {answer}")
    return answer


class Publisher(threading.Thread):
    """Inserts a `tick` through nginx every PUBLISH_EVERY seconds until stop(), its data the
    tick's number and attempt. An insert answered other than 200 may or may not have been
    stored (nginx does not send it on, and a node may die after its commit), so it is kept as
    unsure and the tick is sent again as a new attempt."""

    def __init__(self, url):
        super().__init__(name="publisher", daemon=True)
        self.url = url
        self.acked = []         # the records answered 200, in the order sent
        self.unsure = []        # the data of the attempts that were not
        self.failures = []      # what each of those got
        self._stopping = threading.Event()

    def run(self):
        for number in itertools.count(1):
            for attempt in itertools.count(1):
                data = {"n": number, "attempt": attempt}
                status, answer = post(self.url, "tick", data)
                if status == 200:
                    self.acked.append(answer)
                    break
                self.unsure.append(data)
                self.failures.append(f"{status} {answer}")
                if len(self.failures) > 100 or self._stopping.wait(RETRY_AFTER):
                    return
            if self._stopping.wait(PUBLISH_EVERY):
                return

    def stop(self):
        self._stopping.set()
        self.join(timeout=WAIT)


def next_record(stream, timeout=5):
    """The next record on a test_broker.EventStream, within timeout seconds (its read_message()
    would wait for ever, as the heartbeat comments keep coming)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        block = stream.read_block()
        if "data" in block:
            return {"id": int(block["id"]), "event": block["event"], "data": json.loads(block["data"])}
    raise AssertionError(f"no record within {timeout} s")


def tick(record):
    """A message of the page, or a record, as (id, event, data)."""
    data = record["data"]
    return record["id"], record["event"], json.loads(data) if isinstance(data, str) else data


class FailoverTests(unittest.TestCase):
    def setUp(self):
        self.cluster = Cluster()
        self.addCleanup(self.cluster.close)
        self.context = browser.new_context()
        self.addCleanup(self.context.close)
        self.page_errors = []

    def open_page(self, *events):
        page = self.context.new_page()
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        query = "&".join(f"event={name}" for name in events)
        page.goto(f"{self.cluster.nginx.url}/nodes.html?{query}", timeout=WAIT_MS)
        return page

    def wait_for_page(self, page, what, expression):
        """Wait until expression is true in page; else fail, saying what the page has."""
        try:
            page.wait_for_function(expression, timeout=WAIT_MS)
            return
        except PlaywrightTimeout:
            pass
        has = page.evaluate("({opened, failed, count: received.length, last: received.slice(-3)})")
        self.fail(f"{what}: not within {WAIT} s; the page has {has}")

    def serving_node(self):
        """The node whose /healthz counts the page's stream, once one does and the other not."""
        counts = []

        def one_stream():
            counts[:] = [node.subscribers() for node in self.cluster.nodes]
            return sorted(counts) == [0, 1]
        wait_for(lambda: f"one stream, on one node (subscribers: {counts})", one_stream)
        return counts.index(1)

    def test_a_killed_nodes_browser_stream_resumes_on_the_other_node_and_misses_nothing(self):
        nginx, nodes = self.cluster.nginx, self.cluster.nodes
        synced = [insert(nginx.url, name, {"name": name}) for name in ("first", "second")]
        publisher = Publisher(nginx.url)
        publisher.start()
        self.addCleanup(publisher.stop)
        wait_for(lambda: f"5 ticks published (failed: {publisher.failures})",
                 lambda: len(publisher.acked) >= 5)

        page = self.open_page("first", "second", "tick")
        self.wait_for_page(page, "the page's first 20 records", "received.length >= 20")
        serving = self.serving_node()
        killed, survivor = nodes[serving], nodes[1 - serving]
        killed.stop(signal.SIGKILL)

        self.wait_for_page(page, "the stream reconnected", "opened.length >= 2")   # retry: 3000 ms
        wait_for("the stream counted on the other node", lambda: survivor.subscribers() == 1)
        published = len(publisher.acked)
        wait_for(lambda: f"20 more ticks published (failed: {publisher.failures})",
                 lambda: len(publisher.acked) >= published + 20)
        publisher.stop()
        self.assertFalse(publisher.is_alive(), "the publisher did not stop")
        newest = call(Remote(survivor.url), "GET", "/healthz")[1]["last_id"]     # acknowledged or not
        self.wait_for_page(page, f"the newest record, id {newest}",
                           f"received.length && received[received.length - 1].id >= {newest}")
        received = [tick(message) for message in page.evaluate("received")]
        opened, failed, ready_state = page.evaluate("[opened, failed, source.readyState]")

        # An insert fails only when its node dies with it, and nginx answers 502 (not sent on).
        self.assertTrue(all(failure.startswith("502 ") for failure in publisher.failures),
                        publisher.failures)
        # One connection to each node: the first failed once, at the kill, and the browser
        # reconnected by itself and is still connected.
        self.assertEqual(len(opened), 2, f"opened at {opened}, failed at {failed}")
        self.assertEqual(failed, [opened[1]], f"opened at {opened}, failed at {failed}")
        self.assertEqual(ready_state, 1, "EventSource.OPEN")

        # The sync: the latest of each event, then live ticks, each id once, in increasing
        # order, without a gap at the sync/live boundary, at the reconnection or anywhere.
        ids = [record[0] for record in received]
        self.assertEqual(ids, sorted(set(ids)), "ids not strictly increasing")
        self.assertEqual(received[:2], [tick(record) for record in synced])
        ticks = received[2:]
        self.assertEqual({event for _, event, _ in ticks}, {"tick"})
        self.assertEqual(ids[2:], list(range(ids[2], ids[-1] + 1)), "a gap in the ids")
        first_tick = ids[2]
        self.assertGreaterEqual(first_tick, publisher.acked[4]["id"],
                                "ticks were stored before the page connected, so its sync held one")

        # Every insert acknowledged since, as it was acknowledged; the rest are the unsure ones.
        acked = {record["id"]: tick(record) for record in publisher.acked}
        missing = [id for id in acked if id >= first_tick and id not in ids]
        self.assertEqual(missing, [], "acknowledged records the page never received")
        for record in ticks:
            if record[0] in acked:
                self.assertEqual(record, acked[record[0]])
            else:
                self.assertIn(record[2], publisher.unsure, f"{record} was never sent")
        self.assertGreater(ids[-1], opened[1] + 20, "too few records after the reconnection")

        # The page has exactly what the database has, from its first tick to the newest.
        status, stored, _ = call(Remote(survivor.url), "GET", "/audit/tick")
        self.assertEqual(status, 200)
        self.assertEqual(ids[-1], newest)
        self.assertEqual([data for _, _, data in ticks], list(stored.values())[-len(ticks):])

        # Through nginx: the first stream was the killed node's, with no Last-Event-ID; the
        # second came back with the id the page had last received, and went to the survivor
        # (nginx may have tried the dead node first).
        self.context.close()
        streams = [line for line in nginx.log_lines(
            until=lambda lines: sum(line[1] == "/events" for line in lines) == 2) if line[1] == "/events"]
        self.assertEqual([line[:4] for line in streams],
                         [("GET", "/events", "200", "-"), ("GET", "/events", "200", str(opened[1]))])
        self.assertEqual(streams[0][4], killed.address)
        self.assertTrue(streams[1][4].endswith(survivor.address), streams[1])

    def tearDown(self):
        self.assertEqual(self.page_errors, [], "uncaught JavaScript errors")


class NodesTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.cluster = Cluster()
        cls.addClassCleanup(cls.cluster.close)

    def test_inserts_through_nginx_alternate_between_the_nodes(self):
        nodes = self.cluster.nodes
        before = [node.inserts() for node in nodes]
        records = [insert(self.cluster.nginx.url, "alternate", n) for n in range(6)]
        self.assertEqual([node.inserts() - count for node, count in zip(nodes, before)], [3, 3])
        for node in nodes:
            status, stored, _ = call(Remote(node.url), "GET", "/audit/alternate")
            self.assertEqual((status, list(stored.values())), (200, list(range(6))))
            status, health, _ = call(Remote(node.url), "GET", "/healthz")
            self.assertEqual((status, health["store"]), (200, "postgresql"))
            self.assertGreaterEqual(health["last_id"], records[-1]["id"])

    def test_a_stream_on_either_node_receives_what_the_other_stored(self):
        for listening, inserting in itertools.permutations(self.cluster.nodes):
            name = f"from_{inserting.port}_to_{listening.port}"
            with EventStream(Remote(listening.url), f"/events?event={name}") as stream:
                self.assertEqual(stream.read_sync()[0], [])
                record = insert(inserting.url, name, {"via": inserting.port})
                self.assertEqual(next_record(stream), {"id": record["id"], "event": name,
                                                       "data": {"via": inserting.port}})


class HangUpNode:
    """A node that fails once a request has reached it: it reads the whole request, then closes
    the connection without an answer, as a node killed during an insert's commit would."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.requests = []      # the request line of each request read
        threading.Thread(target=self._serve, name="hang-up-node", daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return          # closed
            with conn:
                try:
                    conn.settimeout(WAIT)
                    self.requests.append(self._read_request(conn))
                except (OSError, ValueError):
                    pass

    @staticmethod
    def _read_request(conn):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                raise ValueError("closed before the headers ended")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        while len(body) < (int(length.group(1)) if length else 0):
            chunk = conn.recv(65536)
            if not chunk:
                raise ValueError("closed before the body ended")
            body += chunk
        return head.split(b"\r\n")[0].decode()

    def close(self):
        self.sock.close()


class RetryTests(unittest.TestCase):
    """nginx in front of a node that fails after reading a request, then a real one."""

    @classmethod
    def setUpClass(cls):
        cls.failing = HangUpNode()
        cls.addClassCleanup(cls.failing.close)
        cls.node = Node("node", postgres.new_database()).wait_until_listening()
        cls.addClassCleanup(cls.node.stop)

    def setUp(self):
        self.failing.requests.clear()
        self.nginx = Nginx([self.failing.port, self.node.port])     # each test starts afresh
        self.addCleanup(self.nginx.close)

    def test_a_get_that_reached_a_failing_node_is_sent_on_to_the_next(self):
        answers = [call(Remote(self.nginx.url), "GET", "/healthz")[:2] for _ in range(2)]
        self.assertEqual([status for status, _ in answers], [200, 200], answers)
        self.assertIn("GET /healthz HTTP/1.1", self.failing.requests)
        lines = self.nginx.log_lines(until=lambda lines: len(lines) == 2)
        self.assertIn(f"127.0.0.1:{self.failing.port}, {self.node.address}", [line[4] for line in lines])

    def test_a_post_that_reached_a_failing_node_is_answered_502_and_not_sent_again(self):
        answers = []
        while len(answers) < 4 and 502 not in [status for status, _ in answers]:
            answers.append(post(self.nginx.url, "sent_once", len(answers)))
        statuses = [status for status, _ in answers]
        self.assertEqual(statuses.count(502), 1, answers)
        self.assertEqual(self.failing.requests, ["POST /insert HTTP/1.1"])
        status, stored, _ = call(Remote(self.node.url), "GET", "/audit/sent_once")
        self.assertEqual(list(stored.values()), [n for n, status in enumerate(statuses) if status == 200])


class ServerBlockTests(unittest.TestCase):
    def settings(self, path):
        lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
        return [" ".join(line.split()) for line in lines if line]

    def test_keeps_the_stream_settings_of_nginx_conf(self):
        differ = ("upstream ", "server 127.0.0.1:", "proxy_pass ", "proxy_read_timeout ",
                  "proxy_send_timeout ")
        nodes = self.settings(SERVER_BLOCK)
        missing = [line for line in self.settings(PLAIN_BLOCK)
                   if line not in nodes and not line.startswith(differ)]
        self.assertEqual(missing, [], f"lines of {PLAIN_BLOCK.name} not in {SERVER_BLOCK.name}")

    def test_read_timeout_outlasts_the_default_heartbeat_a_few_times(self):
        found = [line.split()[1].rstrip(";") for line in self.settings(SERVER_BLOCK)
                 if line.startswith("proxy_read_timeout ")]
        self.assertEqual(len(found), 1)
        self.assertGreaterEqual(seconds(found[0]), 3 * DEFAULT_HEARTBEAT)

    def test_a_post_is_never_sent_to_a_second_node(self):
        for line in self.settings(SERVER_BLOCK):
            self.assertNotIn("non_idempotent", line)


if __name__ == "__main__":
    unittest.main()
