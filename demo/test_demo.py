"""Browser tests for demo/index.html and demo/inspector.html, in headless Chromium through Playwright.

    sh demo/install-browser.sh                        # Debian's chromium, and .venv/ with playwright
    .venv/bin/python -m unittest -v demo/test_demo.py

Each test class runs the real `python broker.py --static demo` in a subprocess (so a test can stop
it and start it again on the same port and database) and drives the system browser at
/usr/bin/chromium; Playwright never downloads one. Without the browser or playwright the tests
are skipped, except under CI (CI=true), where that is a failure. TokenTests starts its broker
with --jwt-secret and opens the pages with ?token=. Writes docs/demo.png and docs/inspector.png,
the screenshots the README shows.
"""
import itertools
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import unittest
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError as err:          # reported by setUpModule: a skip, or under CI a failure
    sync_playwright = None
    PLAYWRIGHT_IMPORT_ERROR = err

ROOT = Path(__file__).resolve().parent.parent
BROKER_PY = ROOT / "broker.py"
DOCS = ROOT / "docs"
CHROMIUM = "/usr/bin/chromium"
# We run as root, so no sandbox; the rest stop Chromium calling out to the network, which this
# machine has not (without them, its connections were refused here).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SHOWN = 2_000          # ms: a name typed in one window shows in another within this
RECONNECT = 15_000     # ms: EventSource waits a few seconds between attempts
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_counter = itertools.count(1)
browser = None


def start_chromium(unavailable):
    """Debian's Chromium driven by Playwright, both closed at the module's cleanup."""
    playwright = sync_playwright().start()
    unittest.addModuleCleanup(playwright.stop)
    try:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    except Exception as err:
        unavailable(f"Chromium did not start: {err}")
    unittest.addModuleCleanup(browser.close)
    return browser


def unavailable(reason):
    """Skip the module, or fail it under CI, where a missing browser must not pass quietly."""
    if IN_CI:
        raise RuntimeError(f"{reason} (CI=true, so this fails instead of skipping; "
                           "run `sh demo/install-browser.sh`)")
    raise unittest.SkipTest(f"{reason}; run `sh demo/install-browser.sh`")


def setUpModule():
    global browser
    if sync_playwright is None:
        unavailable(f"playwright is not importable ({PLAYWRIGHT_IMPORT_ERROR})")
    if not BROKER_PY.exists():
        unavailable(f"{BROKER_PY} does not exist")
    if not os.access(CHROMIUM, os.X_OK):
        unavailable(f"{CHROMIUM} is missing (Debian's chromium package)")
    browser = start_chromium(unavailable)


def unique_event(test):
    """An event name no other test uses."""
    return f"{test._testMethodName}-{next(_counter)}"


def call(url, method="GET", path="/", body=None, token=None):
    """One HTTP request to the broker: (status, decoded JSON)."""
    data = None if body is None else json.dumps(body).encode()
    headers = {} if body is None else {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url + path, data=data, method=method, headers=headers)
    try:
        with NO_PROXY.open(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read())


def publish(url, event, data, token=None):
    """POST /insert and return the record, as any other publisher would."""
    status, record = call(url, "POST", "/insert", {"event": event, "data": data}, token)
    assert status == 200, (status, record)
    return record


def make_token(secret, publish=(), subscribe=()):
    """A JWT for `broker.py --jwt-secret secret`, made as a user would: `broker.py token`."""
    command = [sys.executable, str(BROKER_PY), "token", "--secret", secret]
    command += [f"--publish={pattern}" for pattern in publish]
    command += [f"--subscribe={pattern}" for pattern in subscribe]
    return subprocess.run(command, check=True, capture_output=True, text=True, timeout=30).stdout.strip()


def with_query(path, **params):
    """path with ?name=value (or &name=value) added, each value percent-encoded."""
    return f"{path}{'&' if '?' in path else '?'}{urllib.parse.urlencode(params)}"


class BrokerProcess:
    """`python broker.py --static demo` in a subprocess, which a test may stop and start again."""

    def __init__(self, db, port=0, args=()):
        self.db, self.port, self.args, self.process, self.url = db, port, list(args), None, None

    def start(self):
        """Start the broker and return once it has printed its `broker listening on` line."""
        command = [sys.executable, str(BROKER_PY), "--port", str(self.port), "--db", self.db,
                   "--quiet", "--static", "demo", *self.args]
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            ready = selector.select(timeout=15)
        line = self.process.stdout.readline() if ready else ""
        found = re.search(r"http://[^\s]+:(\d+)", line)
        if not found:
            self.stop()
            raise RuntimeError(f"broker.py printed {line!r} instead of its listening line")
        self.url, self.port = found.group(0), int(found.group(1))
        return self

    def stop(self):
        """SIGTERM, then wait for the process to end; safe to call twice."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError("broker.py did not stop within 10 s of SIGTERM")
        if self.process:
            self.process.stdout.close()


class BrowserTestCase(unittest.TestCase):
    """One fresh broker (its own database) and one browser context per class."""

    viewport = {"width": 1000, "height": 700}
    broker_args = ()

    @classmethod
    def setUpClass(cls):
        folder = tempfile.TemporaryDirectory()
        cls.addClassCleanup(folder.cleanup)
        cls.broker = BrokerProcess(os.path.join(folder.name, "broker.db"), args=cls.broker_args).start()
        cls.addClassCleanup(cls.broker.stop)
        cls.context = browser.new_context(viewport=cls.viewport)
        cls.addClassCleanup(cls.context.close)

    def setUp(self):
        self.dialogs, self.page_errors = [], []

    def open(self, path):
        """A new tab on the broker's own page, remembering dialogs and uncaught errors."""
        page = self.context.new_page()
        self.addCleanup(page.close)
        page.on("dialog", lambda dialog: (self.dialogs.append(dialog.message), dialog.dismiss()))
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        page.goto(path if "://" in path else self.broker.url + path)
        return page

    def tearDown(self):
        self.assertEqual(self.page_errors, [], "uncaught JavaScript errors")
        self.assertEqual(self.dialogs, [], "the page opened a dialog")


class NameDemoTests(BrowserTestCase):
    def type_name(self, page, name):
        page.get_by_label("Your name").press_sequentially(name, delay=10)

    def test_a_name_typed_in_one_window_shows_in_the_other(self):
        first, second = self.open("/index.html"), self.open("/index.html")
        expect(second.locator("#status")).to_have_text("live")
        name = f"Grace {next(_counter)}"
        self.type_name(first, name)
        expect(second.locator("#name")).to_have_text(name, timeout=SHOWN)
        expect(first.locator("#name")).to_have_text(name, timeout=SHOWN)

    def test_the_name_is_still_shown_after_a_reload(self):
        first, second = self.open("/index.html"), self.open("/index.html")
        name = f"Katherine {next(_counter)}"
        self.type_name(first, name)
        expect(second.locator("#name")).to_have_text(name, timeout=SHOWN)
        second.reload()
        expect(second.locator("#name")).to_have_text(name, timeout=SHOWN)
        expect(second.locator("#status")).to_have_text("live")

    def test_a_name_that_looks_like_html_is_shown_as_text(self):
        first, second = self.open("/index.html"), self.open("/index.html")
        name = f"<img src=x onerror=alert({next(_counter)})>"
        self.type_name(first, name)
        expect(second.locator("#name")).to_have_text(name, timeout=SHOWN)
        self.assertEqual(second.locator("#name img").count(), 0)
        # tearDown checks that no alert() dialog fired.

    def test_the_page_works_opened_from_a_file_with_broker_in_the_query(self):
        page = self.open(f"{(ROOT / 'demo' / 'index.html').as_uri()}?broker={self.broker.url}")
        expect(page.locator("#status")).to_have_text("live")
        name = f"Hedy {next(_counter)}"
        self.type_name(page, name)
        expect(page.locator("#name")).to_have_text(name, timeout=SHOWN)
        self.assertEqual(call(self.broker.url, path="/audit/user")[1].popitem()[1], {"user": name})


class ReconnectTests(BrowserTestCase):
    """Each test stops the class's broker and starts it again on the same port and database."""

    def setUp(self):
        super().setUp()
        if self.broker.process.poll() is not None:       # an earlier test failed while it was down
            self.broker.start()

    def test_the_page_reconnects_when_the_broker_comes_back(self):
        page = self.open("/index.html")
        status, name = page.locator("#status"), page.locator("#name")
        publish(self.broker.url, "user", {"user": "Before the restart"})
        expect(name).to_have_text("Before the restart", timeout=SHOWN)
        expect(status).to_have_text("live")

        self.broker.stop()
        expect(status).to_have_text("reconnecting", timeout=RECONNECT)
        page.get_by_label("Your name").fill("Nobody hears this")
        expect(page.locator("#error")).to_contain_text("Could not reach the broker", timeout=SHOWN)

        self.broker.start()    # same port, same database
        publish(self.broker.url, "user", {"user": "After the restart"})
        expect(status).to_have_text("live", timeout=RECONNECT)
        expect(name).to_have_text("After the restart", timeout=SHOWN)
        page.get_by_label("Your name").fill("Back again")
        expect(name).to_have_text("Back again", timeout=SHOWN)
        expect(page.locator("#error")).to_have_text("")

    def test_the_inspector_resumes_after_the_broker_restarts(self):
        page = self.open("/inspector.html")
        event = unique_event(self)
        row = page.locator("#rows tr").filter(has=page.get_by_role("button", name=event, exact=True))
        publish(self.broker.url, event, "before")
        expect(row.locator("td.data")).to_have_text('"before"')
        self.broker.stop()
        expect(page.locator("#status")).to_have_text("reconnecting", timeout=RECONNECT)
        self.broker.start()
        publish(self.broker.url, event, "after")
        expect(page.locator("#status")).to_have_text("live", timeout=RECONNECT)
        expect(row.locator("td.data")).to_have_text('"after"', timeout=SHOWN)


class InspectorTests(BrowserTestCase):
    def setUp(self):
        super().setUp()
        self.page = self.open("/inspector.html")
        expect(self.page.locator("#status")).to_have_text("live")

    def row(self, event):
        return self.page.locator("#rows tr").filter(has=self.page.get_by_role("button", name=event, exact=True))

    def insert(self, event, data_text):
        self.page.get_by_label("Event name").fill(event)
        self.page.get_by_label("Data (JSON)").fill(data_text)
        self.page.get_by_role("button", name="Insert", exact=True).click()

    def test_an_event_published_over_http_appears_in_the_table(self):
        event = unique_event(self)
        record = publish(self.broker.url, event, {"celsius": 21.5})
        row = self.row(event)
        expect(row.locator("td.data")).to_have_text(json.dumps({"celsius": 21.5}, indent=2))
        expect(row.locator("td.num")).to_have_text(str(record["id"]))
        expect(row.locator("td.time")).to_have_text(re.compile(r"^\d\d:\d\d:\d\d$"))
        self.assertGreaterEqual(int(self.page.locator("#count").text_content()), 1)

    def test_a_changed_event_updates_its_row_and_flashes(self):
        event = unique_event(self)
        publish(self.broker.url, event, 1)
        expect(self.row(event).locator("td.data")).to_have_text("1")
        record = publish(self.broker.url, event, 2)
        expect(self.row(event).locator("td.data")).to_have_text("2")
        expect(self.row(event).locator("td.num")).to_have_text(str(record["id"]))
        expect(self.row(event)).to_have_class(re.compile(r"\bflash\b"))
        expect(self.row(event)).to_have_count(1)

    def test_the_history_lists_every_version_newest_first(self):
        event = unique_event(self)
        for version in range(1, 4):
            publish(self.broker.url, event, {"version": version})
        self.row(event).get_by_role("button").click()
        items = self.page.locator("#history li pre")
        expect(items).to_have_text([json.dumps({"version": v}, indent=2) for v in (3, 2, 1)])
        expect(self.page.locator("#history-title")).to_have_text(f"History of {event}")
        expect(self.page.locator("#history li time").first).to_have_text(
            re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}$"))
        publish(self.broker.url, event, {"version": 4})      # the open history follows new versions
        expect(items).to_have_count(4)
        expect(items.first).to_have_text(json.dumps({"version": 4}, indent=2))

    def test_the_history_of_a_name_with_reserved_characters(self):
        event = f"a/b?c#d %e {unique_event(self)}"
        publish(self.broker.url, event, "odd")
        self.row(event).get_by_role("button").click()
        expect(self.page.locator("#history li pre")).to_have_text(['"odd"'])

    def test_data_that_is_not_json_is_reported_without_sending(self):
        inserts = []
        self.page.on("request", lambda request: "/insert" in request.url and inserts.append(request))
        self.insert(unique_event(self), '{"unclosed": ')
        expect(self.page.locator("#insert-message")).to_contain_text("not valid JSON")
        expect(self.page.get_by_label("Data (JSON)")).to_have_attribute("aria-invalid", "true")
        self.assertEqual(inserts, [])

    def test_a_refused_insert_shows_the_brokers_own_message(self):
        event = "x" * 256
        status, body = call(self.broker.url, "POST", "/insert", {"event": event, "data": {}})
        self.assertEqual(status, 400)
        self.insert(event, "{}")
        expect(self.page.locator("#insert-message")).to_have_text(f"The broker refused it: {body['error']}")

    def test_a_valid_insert_appears_in_the_table(self):
        event = unique_event(self)
        self.insert(event, '{"ok": true, "list": [1, 2]}')
        expect(self.page.locator("#insert-message")).to_contain_text(f"Inserted {event} as id ")
        expect(self.row(event).locator("td.data")).to_have_text(
            json.dumps({"ok": True, "list": [1, 2]}, indent=2))

    def test_a_json_array_with_no_event_name_is_inserted_as_a_batch(self):
        first, second = unique_event(self), unique_event(self)
        self.insert("", json.dumps([{"event": first, "data": 1}, {"event": second, "data": [2]}]))
        expect(self.page.locator("#insert-message")).to_have_text(re.compile(r"^Inserted 2 events as ids \d+–\d+\.$"))
        expect(self.row(first).locator("td.data")).to_have_text("1")
        expect(self.row(second).locator("td.data")).to_have_text(json.dumps([2], indent=2))
        first_id, last_id = map(int, re.findall(r"\d+", self.page.locator("#insert-message").text_content())[1:])
        self.assertEqual(last_id, first_id + 1)
        self.assertEqual(self.row(second).locator("td.num").text_content(), str(last_id))

    def test_a_refused_batch_shows_which_item_and_inserts_nothing(self):
        kept = unique_event(self)
        batch = [{"event": kept, "data": 1}, {"event": "", "data": 2}]
        status, body = call(self.broker.url, "POST", "/insert", batch)
        self.assertEqual(status, 400)
        self.assertTrue(body["error"].startswith("item 1: "), body)
        self.insert("", json.dumps(batch))
        expect(self.page.locator("#insert-message")).to_have_text(f"The broker refused it: {body['error']}")
        self.assertEqual(call(self.broker.url, path=f"/audit/{kept}"), (200, {}))     # all or none

    def stream_queries(self):
        """The query of each GET /events the page sends from now on, as parse_qs reads it."""
        queries = []
        self.page.on("request", lambda request: urllib.parse.urlsplit(request.url).path == "/events"
                     and queries.append(urllib.parse.parse_qs(urllib.parse.urlsplit(request.url).query)))
        return queries

    def test_the_filter_asks_the_broker_for_matching_events_only(self):
        # The only test of this class that uses these names, so the table holds exactly these.
        queries = self.stream_queries()
        names = self.page.locator("#rows tr:not(.empty) td.name")
        publish(self.broker.url, "chat.a", "a")
        publish(self.broker.url, "chat.b", "b")
        publish(self.broker.url, "user", {"n": 1})
        expect(self.row("user")).to_be_visible()

        self.page.get_by_label("Filter").fill("chat.*")
        expect(names).to_have_text(["chat.a", "chat.b"])
        expect(self.page.locator("#shown")).to_have_text("2 events match the filter")
        expect(self.page.locator("#status")).to_have_text("live")
        self.assertEqual(queries[-1], {"match": ["chat.*"]})      # the broker filters, not the page

        publish(self.broker.url, "user", {"n": 2})
        record = publish(self.broker.url, "chat.c", "c")
        # The stream is in id order: once chat.c is shown, the newer user (older id) was skipped.
        expect(self.row("chat.c").locator("td.num")).to_have_text(str(record["id"]))
        expect(names).to_have_text(["chat.a", "chat.b", "chat.c"])
        expect(self.row("user")).to_have_count(0)

        self.page.get_by_label("Filter").fill("")
        expect(self.row("user").locator("td.data")).to_have_text(json.dumps({"n": 2}, indent=2))
        for name in ("chat.a", "chat.b", "chat.c"):
            expect(self.row(name)).to_be_visible()
        self.assertEqual(queries[-1], {})
        expect(self.page.locator("#shown")).to_have_text(re.compile(r"^\d+ events$"))

    def test_the_filter_takes_several_patterns_and_exact_names(self):
        prefix = unique_event(self)
        for suffix in ("one", "two", "three", "ten"):
            publish(self.broker.url, f"{prefix}.{suffix}", suffix)
        queries = self.stream_queries()
        self.page.get_by_label("Filter").fill(f"{prefix}.t?o,  {prefix}.one")
        expect(self.page.locator("#rows tr:not(.empty) td.name")).to_have_text([f"{prefix}.one", f"{prefix}.two"])
        self.assertEqual(queries[-1], {"match": [f"{prefix}.t?o", f"{prefix}.one"]})
        self.page.get_by_label("Filter").fill(f"{prefix}.[!o]*n")
        expect(self.page.locator("#rows tr:not(.empty) td.name")).to_have_text([f"{prefix}.ten"])

    def test_a_filter_matching_nothing_says_so_and_waits(self):
        prefix = unique_event(self)
        self.page.get_by_label("Filter").fill(f"{prefix}.*")
        expect(self.page.locator("#empty")).to_have_text("No event matches the filter yet.")
        expect(self.page.locator("#status")).to_have_text("live")
        publish(self.broker.url, f"{prefix}.late", "here")
        expect(self.page.locator("#rows tr:not(.empty) td.name")).to_have_text([f"{prefix}.late"])
        expect(self.page.locator("#empty")).to_be_hidden()

    def test_a_filter_the_broker_refuses_shows_its_message_beside_the_box(self):
        pattern = "x" * 300
        status, body = call(self.broker.url, path=with_query("/events", match=pattern))
        self.assertEqual(status, 400)
        self.page.get_by_label("Filter").fill(pattern)
        expect(self.page.locator("#filter-message")).to_have_text(f"The broker refused the filter: {body['error']}")
        expect(self.page.locator("#status")).to_have_text("filter refused")
        expect(self.page.get_by_label("Filter")).to_have_attribute("aria-invalid", "true")
        event = unique_event(self)
        self.page.get_by_label("Filter").fill(event)
        expect(self.page.locator("#status")).to_have_text("live")
        expect(self.page.locator("#filter-message")).to_have_text("")
        publish(self.broker.url, event, 1)
        expect(self.row(event)).to_be_visible()

    def test_match_in_the_pages_address_fills_the_filter(self):
        prefix = unique_event(self)
        publish(self.broker.url, f"{prefix}.in", 1)
        publish(self.broker.url, f"{prefix}-out", 2)
        page = self.open(with_query("/inspector.html", match=f"{prefix}.*"))
        expect(page.get_by_label("Filter")).to_have_value(f"{prefix}.*")
        expect(page.locator("#rows tr:not(.empty) td.name")).to_have_text([f"{prefix}.in"])


class TokenTests(BrowserTestCase):
    """A broker started with --jwt-secret: the pages take their token from ?token=."""

    SECRET = "demo-test-secret"
    broker_args = ("--jwt-secret", SECRET)

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.admin = make_token(cls.SECRET, publish=["*"], subscribe=["*"])
        cls.chat = make_token(cls.SECRET, publish=["chat.*"], subscribe=["chat.*"])
        cls.user = make_token(cls.SECRET, publish=["user"], subscribe=["user"])
        cls.user_reader = make_token(cls.SECRET, subscribe=["user"])

    def open_with_token(self, path, token):
        page = self.open(with_query(path, token=token))
        self.addCleanup(self.assert_token_not_shown, page, token)
        return page

    def assert_token_not_shown(self, page, token):
        if not page.is_closed():         # assertNotIn would print the whole page
            self.assertFalse(token in page.locator("body").text_content(), "the page shows its token")

    def row(self, page, event):
        return page.locator("#rows tr").filter(has=page.get_by_role("button", name=event, exact=True))

    def insert(self, page, event, data_text):
        page.get_by_label("Event name").fill(event)
        page.get_by_label("Data (JSON)").fill(data_text)
        page.get_by_role("button", name="Insert", exact=True).click()

    def test_the_inspector_shows_only_the_events_its_token_allows(self):
        page = self.open_with_token("/inspector.html", self.chat)
        expect(page.locator("#status")).to_have_text("live")
        publish(self.broker.url, "secret", {"pin": 1234}, self.admin)
        record = publish(self.broker.url, "chat.room", {"text": "hello"}, self.admin)
        # The stream is in id order: once chat.room is shown, secret (older) has been skipped.
        expect(self.row(page, "chat.room").locator("td.num")).to_have_text(str(record["id"]))
        expect(self.row(page, "secret")).to_have_count(0)

        page.reload()                      # the sync, too, holds only what the token allows
        expect(page.locator("#status")).to_have_text("live")
        expect(self.row(page, "chat.room").locator("td.num")).to_have_text(str(record["id"]))
        expect(self.row(page, "secret")).to_have_count(0)
        self.assertNotIn("1234", page.locator("#rows").text_content())

        self.row(page, "chat.room").get_by_role("button").click()     # GET /audit with the token
        expect(page.locator("#history li pre")).to_have_text([json.dumps({"text": "hello"}, indent=2)])

    def test_the_inspector_shows_the_brokers_message_for_a_forbidden_insert(self):
        page = self.open_with_token("/inspector.html", self.chat)
        expect(page.locator("#status")).to_have_text("live")
        status, body = call(self.broker.url, "POST", "/insert", {"event": "secret", "data": {}}, self.chat)
        self.assertEqual(status, 403)
        self.insert(page, "secret", "{}")
        expect(page.locator("#insert-message")).to_have_text(f"The broker refused it: {body['error']}")

        self.insert(page, "chat.lobby", '{"text": "hi"}')
        expect(page.locator("#insert-message")).to_contain_text("Inserted chat.lobby as id ")
        expect(self.row(page, "chat.lobby").locator("td.data")).to_have_text(json.dumps({"text": "hi"}, indent=2))

    def test_the_inspector_links_to_the_demo_with_the_same_broker_and_token(self):
        page = self.open_with_token(with_query("/inspector.html", broker=self.broker.url), self.chat)
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(page.locator("#demo").get_attribute("href")).query)
        self.assertEqual(query, {"broker": [self.broker.url], "token": [self.chat]})

    def test_the_inspector_without_a_token_says_it_is_not_allowed(self):
        page = self.open("/inspector.html")
        status, body = call(self.broker.url, path="/events")
        self.assertEqual(status, 401)
        expect(page.locator("#status")).to_have_text("not allowed")
        expect(page.locator("#notice")).to_contain_text(f"The broker refused the stream: {body['error']}.")

    def test_the_inspector_with_a_token_signed_by_another_secret_says_why(self):
        forged = make_token("another secret", subscribe=["*"])
        page = self.open_with_token("/inspector.html", forged)
        expect(page.locator("#status")).to_have_text("not allowed")
        expect(page.locator("#notice")).to_have_text(
            "The broker refused the stream: the bearer token is not valid: signature does not match.")

    def test_a_name_typed_in_one_window_shows_in_another_with_the_same_token(self):
        first = self.open_with_token("/index.html", self.user)
        second = self.open_with_token("/index.html", self.user)
        expect(second.locator("#status")).to_have_text("live")
        name = f"Barbara {next(_counter)}"
        first.get_by_label("Your name").press_sequentially(name, delay=10)
        expect(second.locator("#name")).to_have_text(name, timeout=SHOWN)
        expect(first.locator("#error")).to_have_text("")
        self.assertEqual(call(self.broker.url, path="/audit/user", token=self.admin)[1].popitem()[1], {"user": name})
        second.reload()
        expect(second.locator("#name")).to_have_text(name, timeout=SHOWN)

    def test_a_token_that_may_only_subscribe_shows_the_brokers_message_when_typing(self):
        publish(self.broker.url, "user", {"user": "Frances"}, self.admin)
        page = self.open_with_token("/index.html", self.user_reader)
        expect(page.locator("#status")).to_have_text("live")
        expect(page.locator("#name")).to_have_text("Frances", timeout=SHOWN)
        status, body = call(self.broker.url, "POST", "/insert", {"event": "user", "data": {}}, self.user_reader)
        self.assertEqual(status, 403)
        page.get_by_label("Your name").fill("Mallory")
        expect(page.locator("#error")).to_have_text(f"The broker refused the name: {body['error']}")
        expect(page.locator("#name")).to_have_text("Frances")

    def test_a_stream_refused_to_the_name_demo_says_it_is_not_allowed(self):
        page = self.open_with_token("/index.html", self.chat)       # chat.* only: not "user"
        status, body = call(self.broker.url, path=with_query("/events", event="user", access_token=self.chat))
        self.assertEqual(status, 403)
        expect(page.locator("#status")).to_have_text("not allowed")
        expect(page.locator("#notice")).to_have_text(f"The broker refused the stream: {body['error']}.")

    def test_the_name_demo_links_to_the_inspector_with_the_same_token(self):
        page = self.open_with_token("/index.html", self.user)
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(page.locator("#inspector").get_attribute("href")).query)
        self.assertEqual(query, {"token": [self.user]})


class ScreenshotTests(BrowserTestCase):
    """The pictures in the README, taken from a broker holding a few plausible events."""

    viewport = {"width": 1200, "height": 760}

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        url = cls.broker.url
        for name in ("Ada", "Ada Byron", "Ada King"):
            publish(url, "user", {"user": name})
        publish(url, "deploy", {"service": "api", "version": "1.4.2", "ok": True})
        publish(url, "temperature", {"room": "kitchen", "celsius": 20.5})
        publish(url, "temperature", {"room": "kitchen", "celsius": 21.5})
        publish(url, "order", {"number": 1042, "items": 3, "total": "27.50"})
        DOCS.mkdir(exist_ok=True)

    def test_writes_docs_demo_png(self):
        page = self.open("/index.html")
        page.set_viewport_size({"width": 720, "height": 480})
        expect(page.locator("#status")).to_have_text("live")
        page.get_by_label("Your name").fill("Ada Lovelace")
        expect(page.locator("#name")).to_have_text("Ada Lovelace", timeout=SHOWN)
        page.screenshot(path=DOCS / "demo.png", animations="disabled")

    def test_writes_docs_inspector_png(self):
        page = self.open("/inspector.html")
        expect(page.locator("#rows tr:not(.empty)")).to_have_count(4)
        page.get_by_role("button", name="user", exact=True).click()
        expect(page.locator("#history-message")).to_have_text(re.compile(r"^\d+ versions, newest first"))
        page.screenshot(path=DOCS / "inspector.png", animations="disabled")


if __name__ == "__main__":
    unittest.main()
