"""GET /metrics of a real broker.py, read with the prometheus_client package's own parser.

    make test-metrics                                        # makes .venv/ with prometheus_client
    .venv/bin/python -m unittest -v deploy/test_metrics.py   # from the repository root, once it is there

Two brokers run as `python broker.py --port 0 --db <temp file> --quiet` subprocesses: an open one,
and one with `--subscribe-token` and `--keep-versions 2`. Every scrape goes through
prometheus_client.parser.text_string_to_metric_families, the parser Prometheus' own Python client
ships, and every line of it must be a sample that parser returns. The tests check the families and
their types, then that each counter moves by exactly what the test did (inserts, refusals, a
stream's sync and a live record, pruning), and that no event name reaches the exposition.
prometheus_client is a test-only dependency: broker.py never imports it. Without it the tests are
skipped, or fail when CI=true. With BROKER_TEST_WORKERS=N (make test-metrics runs both), each broker
runs with --workers N: every scrape, whichever worker answers it, counts the whole broker.
"""
import http.client
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import unittest
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from test_nginx import Child    # deploy/ is not a package: import it by path

try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError as err:      # reported by setUpModule: a skip, or under CI a failure
    text_string_to_metric_families = None
    PROMETHEUS_IMPORT_ERROR = err

BROKER_PY = HERE.parent / "broker.py"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
WORKERS = os.environ.get("BROKER_TEST_WORKERS")   # set: every broker runs with --workers this many
TOKEN = "metrics-test-subscribe-token"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SETTLE = 5.0        # seconds a counter updated off the request's thread has to show the change

# Every documented family, by the name the parser gives it (a counter's without `_total`).
FAMILIES = {
    "broker_inserts": "counter",
    "broker_inserts_refused": "counter",
    "broker_records_delivered": "counter",
    "broker_streams_opened": "counter",
    "broker_streams_dropped": "counter",
    "broker_records_pruned": "counter",
    "broker_commit_duration_seconds": "histogram",
    "broker_commit_rows": "histogram",
    "broker_streams_open": "gauge",
    "broker_newest_id": "gauge",
    "broker_database_bytes": "gauge",
    "broker_database_up": "gauge",
    "process_cpu_seconds": "counter",
    "process_max_fds": "gauge",
    "process_virtual_memory_bytes": "gauge",
    "process_resident_memory_bytes": "gauge",
    "process_start_time_seconds": "gauge",
    "process_open_fds": "gauge",
}
LABELS = {"status", "le"}       # the only label names: a refusal's status, a bucket's bound

used_event_names = set()        # every event name any test sent, for the no-label check
plain = guarded = None          # the two BrokerProcesses; set by setUpModule()


class BrokerProcess:
    """`python broker.py --port 0 --db <temp file> --quiet [args]` in a subprocess, and requests to it."""

    def __init__(self, *args):
        self.dir = tempfile.mkdtemp(prefix="broker-metrics-")
        workers = ["--workers", WORKERS] if WORKERS else []
        self.child = Child("broker.py", [sys.executable, str(BROKER_PY), "--port", "0",
                                         "--db", f"{self.dir}/broker.db", "--quiet", *workers, *args], "stdout")
        try:
            line = self.child.wait_for_line("broker listening on", timeout=10)
            self.port = int(re.search(r"http://127\.0\.0\.1:(\d+)", line).group(1))
        except BaseException:
            self.close()
            raise

    def close(self):
        try:
            self.child.stop(signal.SIGTERM)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def call(self, method, path, body=None, headers=None):
        """One request: status, headers, and the body as JSON (or text if it is not JSON)."""
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = raw.decode("utf-8", "replace")
        return response.status, response.headers, payload

    def insert(self, body):
        """POST /insert of one record or a batch; what the broker stored."""
        items = body if isinstance(body, list) else [body]
        used_event_names.update(item["event"] for item in items)
        status, _, stored = self.call("POST", "/insert", body)
        if status != 200:
            raise AssertionError(f"insert {body!r}: {status} {stored}")
        return stored

    def scrape(self, headers=None, path="/metrics"):
        """GET /metrics, checked as a whole and parsed."""
        status, response_headers, text = self.call("GET", path, headers=headers)
        if status != 200:
            raise AssertionError(f"GET {path}: {status} {text}")
        if response_headers["Content-Type"] != CONTENT_TYPE:
            raise AssertionError(f"GET {path}: Content-Type {response_headers['Content-Type']!r}")
        return Scrape(text)

    def wait_for(self, name, expected, labels=None, headers=None):
        """The scrape in which sample name (with labels) first equals expected, within SETTLE
        seconds; fails with the last value seen otherwise."""
        deadline = time.monotonic() + SETTLE
        while True:
            scrape = self.scrape(headers)
            if scrape.value(name, labels) == expected or time.monotonic() > deadline:
                return scrape
            time.sleep(0.05)


class Scrape:
    """One exposition: its text, its families by name, and its samples by (name, labels)."""

    def __init__(self, text):
        self.text = text
        self.families = list(text_string_to_metric_families(text))     # raises on a bad line
        self.by_name = {family.name: family for family in self.families}
        self.samples = {}
        for family in self.families:
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key in self.samples:
                    raise AssertionError(f"sample {key} twice in:\n{text}")
                self.samples[key] = sample.value

    def value(self, name, labels=None, default=None):
        """The value of sample name with exactly these labels; default when it is absent."""
        return self.samples.get((name, tuple(sorted((labels or {}).items()))), default)

    def sample_lines(self):
        return [line for line in self.text.split("\n") if line and not line.startswith("#")]


def setUpModule():
    global plain, guarded
    if text_string_to_metric_families is None:
        reason = f"prometheus_client is missing ({PROMETHEUS_IMPORT_ERROR}): run `make test-metrics`"
        if IN_CI:
            raise RuntimeError(f"{reason} (CI=true, so this fails instead of skipping)")
        raise unittest.SkipTest(reason)
    plain = BrokerProcess()
    unittest.addModuleCleanup(plain.close)
    guarded = BrokerProcess("--subscribe-token", TOKEN, "--keep-versions", "2")
    unittest.addModuleCleanup(guarded.close)


def unique_event(test, suffix=""):
    """An event name no other test uses, and that appears nowhere in an exposition by chance."""
    return "metricsprobe_" + test.id().rsplit(".", 1)[-1] + suffix


class Stream:
    """GET /events over http.client (which undoes the chunking), read a line at a time."""

    def __init__(self, broker, path="/events"):
        self.conn = http.client.HTTPConnection("127.0.0.1", broker.port, timeout=5)
        self.conn.request("GET", path, headers={"Accept": "text/event-stream"})
        self.response = self.conn.getresponse()
        if self.response.status != 200:
            raise AssertionError(f"GET {path}: {self.response.status} {self.response.read()!r}")

    def close(self):
        self.conn.close()

    def next_block(self):
        """The next SSE block as {field: value}, heartbeat comments skipped; `id` an int."""
        block = {}
        while True:
            line = self.response.readline().decode()
            if not line:
                raise AssertionError("the stream ended")
            line = line.rstrip("\n")
            if line == "" and block:
                if "id" in block:
                    block["id"] = int(block["id"])
                return block
            if line and not line.startswith(":"):
                name, _, value = line.partition(":")
                block[name] = value[1:] if value.startswith(" ") else value

    def read_sync(self):
        """The records of the sync, up to the id-only block that ends it, and that block's id."""
        records = []
        while True:
            block = self.next_block()
            if list(block) == ["id"]:
                return records, block["id"]
            if "retry" not in block:
                records.append(block)


class ExpositionTests(unittest.TestCase):
    """The exposition's shape, as the parser sees it."""

    @classmethod
    def setUpClass(cls):
        name = "metricsprobe_exposition"
        plain.insert({"event": name, "data": 1})        # so the histograms have an observation
        plain.insert([{"event": name, "data": 2}, {"event": name, "data": 3}])
        cls.scrape = plain.scrape()

    def test_every_sample_line_is_a_sample_of_the_parser(self):
        lines = self.scrape.sample_lines()
        self.assertEqual(len(lines), len(self.scrape.samples), self.scrape.text)
        self.assertTrue(self.scrape.text.endswith("\n"))
        for line in self.scrape.text.split("\n"):
            if line.startswith("#"):
                self.assertRegex(line, r"^# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* \S")

    def test_every_documented_family_with_its_type(self):
        found = {family.name: family.type for family in self.scrape.families}
        self.assertEqual(len(found), len(self.scrape.families), "a family declared twice")
        for name, kind in FAMILIES.items():
            with self.subTest(family=name):
                self.assertEqual(found.get(name), kind)
                self.assertTrue(self.scrape.by_name[name].documentation, "no HELP text")
        for name, kind in found.items():
            self.assertIn(kind, ("counter", "gauge", "histogram"), name)

    def test_counters_are_named_total_and_not_negative(self):
        for family in self.scrape.families:
            if family.type != "counter":
                continue
            for sample in family.samples:
                with self.subTest(sample=sample.name):
                    self.assertEqual(sample.name, family.name + "_total")
                    self.assertGreaterEqual(sample.value, 0)

    def test_histograms_have_cumulative_buckets_up_to_inf_a_sum_and_a_count(self):
        for name in ("broker_commit_duration_seconds", "broker_commit_rows"):
            with self.subTest(histogram=name):
                samples = self.scrape.by_name[name].samples
                buckets = [s for s in samples if s.name == name + "_bucket"]
                bounds = [float(s.labels["le"]) for s in buckets]
                counts = [s.value for s in buckets]
                self.assertEqual(buckets[-1].labels["le"], "+Inf")
                self.assertEqual(bounds, sorted(set(bounds)))            # strictly increasing
                self.assertEqual(counts, sorted(counts))                 # cumulative
                self.assertEqual({s.name for s in samples},
                                 {name + "_bucket", name + "_sum", name + "_count"})
                self.assertEqual(self.scrape.value(name + "_count"), counts[-1])
                self.assertGreaterEqual(counts[-1], 2)
                self.assertGreater(self.scrape.value(name + "_sum"), 0)

    def test_gauges_are_one_sample_without_labels(self):
        for family in self.scrape.families:
            if family.type == "gauge":
                self.assertEqual([(s.name, s.labels) for s in family.samples], [(family.name, {})])

    def test_only_status_and_le_labels(self):
        for family in self.scrape.families:
            for sample in family.samples:
                self.assertLessEqual(set(sample.labels), LABELS, sample)
                if "status" in sample.labels:
                    self.assertEqual(family.name, "broker_inserts_refused")
                    self.assertRegex(sample.labels["status"], r"^[1-5][0-9][0-9]$")

    def test_process_figures(self):
        value = self.scrape.value
        self.assertGreater(value("process_resident_memory_bytes"), 0)
        self.assertGreaterEqual(value("process_virtual_memory_bytes"), value("process_resident_memory_bytes"))
        self.assertGreater(value("process_open_fds"), 0)
        self.assertGreaterEqual(value("process_max_fds"), value("process_open_fds"))
        self.assertGreater(value("process_cpu_seconds_total"), 0)
        # Started by setUpModule moments ago (and /proc's boot time is whole seconds).
        self.assertLess(abs(value("process_start_time_seconds") - time.time()), 60)

    def test_database_bytes_is_the_size_on_disk(self):
        size = self.scrape.value("broker_database_bytes")
        self.assertGreater(size, 0)
        on_disk = sum(os.path.getsize(f"{plain.dir}/broker.db{suffix}") for suffix in ("", "-wal")
                      if os.path.exists(f"{plain.dir}/broker.db{suffix}"))
        self.assertLessEqual(abs(size - on_disk), 1 << 20)     # a commit or checkpoint may fall between


class CounterTests(unittest.TestCase):
    """Each counter moves by exactly what the test did. Tests on one broker run one at a time,
    and each waits until its streams are closed, so nothing else moves them meanwhile."""

    def setUp(self):
        self.before = plain.wait_for("broker_streams_open", 0)
        self.assertEqual(self.before.value("broker_streams_open"), 0, "a stream is still open")

    def moved(self, after, name, labels=None):
        return after.value(name, labels, 0) - self.before.value(name, labels, 0)

    def test_a_single_insert_and_a_batch_count_each_record_and_one_commit_each(self):
        name = unique_event(self)
        single = plain.insert({"event": name, "data": {"n": 0}})
        batch = plain.insert([{"event": f"{name}_{n}", "data": {"n": n}} for n in range(1, 4)])
        after = plain.scrape()
        self.assertEqual(self.moved(after, "broker_inserts_total"), 4)
        self.assertEqual(self.moved(after, "broker_commit_rows_count"), 2)
        self.assertEqual(self.moved(after, "broker_commit_rows_sum"), 4)
        self.assertEqual(self.moved(after, "broker_commit_rows_bucket", {"le": "1"}), 1)     # the single
        self.assertEqual(self.moved(after, "broker_commit_rows_bucket", {"le": "2"}), 1)
        self.assertEqual(self.moved(after, "broker_commit_rows_bucket", {"le": "5"}), 2)     # the batch of 3
        self.assertEqual(self.moved(after, "broker_commit_rows_bucket", {"le": "+Inf"}), 2)
        self.assertEqual(self.moved(after, "broker_commit_duration_seconds_count"), 2)
        self.assertGreater(self.moved(after, "broker_commit_duration_seconds_sum"), 0)
        self.assertEqual([r["id"] for r in batch], [single["id"] + 1, single["id"] + 2, single["id"] + 3])
        self.assertEqual(after.value("broker_newest_id"), batch[-1]["id"])
        self.assertGreater(after.value("broker_database_bytes"), 0)
        self.assertEqual(self.moved(after, "broker_records_delivered_total"), 0)    # no stream open

    def test_refused_inserts_count_by_status_and_store_nothing(self):
        name = unique_event(self)
        used_event_names.add(name)
        bad_json = plain.call("POST", "/insert", b'{"event": "' + name.encode() + b'", "data": ',
                              {"Content-Type": "application/json"})
        wrong_type = plain.call("POST", "/insert", json.dumps({"event": name, "data": 1}).encode(),
                                {"Content-Type": "text/plain"})
        self.assertEqual([bad_json[0], wrong_type[0]], [400, 415])
        after = plain.scrape()
        self.assertEqual(self.moved(after, "broker_inserts_refused_total", {"status": "400"}), 1)
        self.assertEqual(self.moved(after, "broker_inserts_refused_total", {"status": "415"}), 1)
        self.assertEqual(self.moved(after, "broker_inserts_total"), 0)
        self.assertEqual(self.moved(after, "broker_commit_rows_count"), 0)
        self.assertEqual(after.value("broker_newest_id"), self.before.value("broker_newest_id"))

    def test_a_stream_counts_its_sync_and_each_live_record(self):
        name = unique_event(self)
        plain.insert([{"event": name, "data": 1}, {"event": name + "_other", "data": 2}])
        before_stream = plain.scrape()
        stream = Stream(plain)
        self.addCleanup(stream.close)
        synced, newest = stream.read_sync()
        self.assertIn(name, [r["event"] for r in synced])
        self.assertEqual(newest, before_stream.value("broker_newest_id"))
        during = plain.scrape()
        self.assertEqual(self.moved(during, "broker_streams_opened_total"), 1)
        self.assertEqual(during.value("broker_streams_open"), 1)
        self.assertEqual(during.value("broker_records_delivered_total"),
                         before_stream.value("broker_records_delivered_total") + len(synced))

        record = plain.insert({"event": name, "data": 3})
        self.assertEqual(stream.next_block()["id"], record["id"])
        # The fan-out thread counts a live record after writing it: the count may trail the bytes.
        expected = before_stream.value("broker_records_delivered_total") + len(synced) + 1
        live = plain.wait_for("broker_records_delivered_total", expected)
        self.assertEqual(live.value("broker_records_delivered_total"), expected)
        self.assertEqual(live.value("broker_newest_id"), record["id"])
        self.assertEqual(live.value("broker_streams_open"), 1)

        stream.close()
        closed = plain.wait_for("broker_streams_open", 0)
        self.assertEqual(closed.value("broker_streams_open"), 0)
        self.assertEqual(self.moved(closed, "broker_streams_opened_total"), 1)
        self.assertEqual(self.moved(closed, "broker_streams_dropped_total"), 0)   # a hang-up, not a drop

    def test_a_filtered_stream_counts_only_the_records_it_sends(self):
        name = unique_event(self)
        plain.insert([{"event": name, "data": 1}, {"event": name + "_skipped", "data": 2}])
        base = plain.scrape().value("broker_records_delivered_total")
        stream = Stream(plain, f"/events?event={name}")
        self.addCleanup(stream.close)
        synced, _ = stream.read_sync()
        self.assertEqual([r["event"] for r in synced], [name])
        plain.insert([{"event": name + "_skipped", "data": 3}, {"event": name, "data": 4}])
        self.assertEqual(stream.next_block()["data"], "4")
        after = plain.wait_for("broker_records_delivered_total", base + 2)
        self.assertEqual(after.value("broker_records_delivered_total"), base + 2)
        stream.close()
        plain.wait_for("broker_streams_open", 0)

    def test_no_label_or_line_carries_an_event_name(self):
        name = unique_event(self)
        plain.insert({"event": name, "data": "x"})
        plain.insert([{"event": name + "_batch", "data": 1}])
        plain.call("POST", "/insert", {"event": name + "_refused"}, {})     # "data" is missing: 400
        used_event_names.add(name + "_refused")
        stream = Stream(plain, f"/events?event={name}")
        self.addCleanup(stream.close)
        stream.read_sync()
        self.assertEqual(plain.call("GET", f"/audit/{name}")[0], 200)
        text = plain.scrape().text
        stream.close()
        plain.wait_for("broker_streams_open", 0)
        self.assertTrue(used_event_names)
        for event in sorted(used_event_names):
            self.assertNotIn(event, text)


class GuardedBrokerTests(unittest.TestCase):
    """The broker run with --subscribe-token and --keep-versions 2."""

    AUTH = {"Authorization": f"Bearer {TOKEN}"}

    def test_metrics_without_the_token_is_a_401_json_error(self):
        for headers, path in [({}, "/metrics"), ({"Authorization": "Bearer wrong"}, "/metrics"),
                              ({}, "/metrics?access_token=wrong"),
                              ({"Authorization": f"Basic {TOKEN}"}, "/metrics")]:
            with self.subTest(headers=headers, path=path):
                status, response_headers, body = guarded.call("GET", path, headers=headers)
                self.assertEqual(status, 401)
                self.assertTrue(response_headers["Content-Type"].startswith("application/json"))
                self.assertEqual(list(body), ["error"])
                self.assertEqual(response_headers["WWW-Authenticate"], "Bearer")
                self.assertNotIn("broker_", json.dumps(body))

    def test_metrics_with_the_token_in_the_header_or_the_query(self):
        for headers, path in [(self.AUTH, "/metrics"), ({}, f"/metrics?access_token={TOKEN}")]:
            with self.subTest(path=path):
                scrape = guarded.scrape(headers, path)        # checks the status and Content-Type
                self.assertEqual({f.name: f.type for f in scrape.families if f.name in FAMILIES}, FAMILIES)
                self.assertNotIn(TOKEN, scrape.text)

    def test_keep_versions_prunes_all_but_the_newest_two(self):
        name = unique_event(self)
        before = guarded.scrape(self.AUTH)
        records = [guarded.insert({"event": name, "data": n}) for n in range(5)]
        expected = before.value("broker_records_pruned_total") + 3
        after = guarded.wait_for("broker_records_pruned_total", expected, headers=self.AUTH)
        self.assertEqual(after.value("broker_records_pruned_total"), expected)
        self.assertEqual(after.value("broker_inserts_total"), before.value("broker_inserts_total") + 5)
        self.assertEqual(after.value("broker_newest_id"), records[-1]["id"])
        status, _, audit = guarded.call("GET", f"/audit/{name}", headers=self.AUTH)
        self.assertEqual(status, 200)
        self.assertEqual(audit, {f"{name}_v_{r['timestamp']}": r["data"] for r in records[3:]})
        self.assertNotIn(name, after.text)


if __name__ == "__main__":
    unittest.main()
