"""Tests for broker.py: real servers on port 0, real sockets, real SQLite files.

    python3 -m unittest -v test_broker
"""
import base64
import contextlib
import hashlib
import hmac
import http.client
import itertools
import json
import os
import random
import resource
import re
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.parse

import broker
from broker import Broker

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 5          # seconds any single read may wait before a test fails
NOT_A_DATABASE = b"These are my notes, not an SQLite file.\n" * 200
_names = itertools.count()


def unique_event(test, suffix=""):
    """An event name no other test uses, so tests sharing a broker never see each other's records."""
    return f"{test.id().rsplit('.', 1)[-1]}-{next(_names)}{suffix}"


def temp_db(test_class):
    folder = tempfile.TemporaryDirectory()
    test_class.addClassCleanup(folder.cleanup)
    return os.path.join(folder.name, "broker.db")


def new_db(test_class):
    """A new, empty database for test_class: an SQLite file, or with test_class.POSTGRES set
    (test_postgres.py), a database on that PostgreSQL server."""
    postgres = getattr(test_class, "POSTGRES", None)
    return postgres.new_database() if postgres else temp_db(test_class)


def start_broker(test_class, **options):
    """A broker for test_class: embedded, or with test_class.WORKERS set, python broker.py
    --workers N (the same tests, run against several processes); on SQLite, or on PostgreSQL
    with test_class.POSTGRES set."""
    if getattr(test_class, "POSTGRES", None):
        options.setdefault("db", new_db(test_class))
    if getattr(test_class, "WORKERS", None):
        flags = [f"--{name.replace('_', '-')}={value}" for name, value in options.items()]
        server = WorkerBroker(test_class.addClassCleanup, test_class.WORKERS, "--quiet", *flags)
        server.publish_token, server.subscribe_token = options.get("publish_token"), options.get("subscribe_token")
        if "jwt_secret" in options:
            server.token = broker.make_jwt(options["jwt_secret"], publish=["*"], subscribe=["*"])
        return server
    options.setdefault("db", new_db(test_class))
    started = Broker(port=0, quiet=True, **options).start()
    test_class.addClassCleanup(started.stop)
    return started


def address(server):
    parts = urllib.parse.urlsplit(server.url)
    return parts.hostname, parts.port


class Remote:
    """A broker in another process, known by its URL: enough for call(), insert() and EventStream."""

    def __init__(self, url):
        self.url = url


def call(server, method, path, body=None, headers=None, timeout=TIMEOUT):
    """One HTTP request; return (status, JSON body or None, headers)."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
    connection = http.client.HTTPConnection(*address(server), timeout=timeout)
    try:
        connection.request(method, path, body, headers or {})
        response = connection.getresponse()
        payload = response.read()
    finally:
        connection.close()
    parsed = json.loads(payload) if payload and "json" in response.getheader("Content-Type", "") else None
    return response.status, parsed, response.headers


def insert(server, body, content_type="application/json"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return call(server, "POST", "/insert", data, {"Content-Type": content_type})


def raw(server, request, timeout=TIMEOUT):
    """Send bytes http.client would not send; return everything the server answers until it closes."""
    with socket.create_connection(address(server), timeout=timeout) as sock:
        sock.sendall(request)
        received = b""
        while True:
            data = sock.recv(65536)
            if not data:
                return received
            received += data


def status_of(response):
    return int(response.split(b" ", 2)[1])


def body_of(response):
    return json.loads(response.split(b"\r\n\r\n", 1)[1])


class EventStream:
    """A raw-socket /events client: de-chunks the body and splits it into SSE blocks."""

    def __init__(self, server, path="/events", headers=None, timeout=TIMEOUT, sock=None):
        self.sock = sock or socket.create_connection(address(server), timeout=timeout)
        lines = [f"GET {path} HTTP/1.1", f"Host: {server.url[7:]}"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self._buffer = b""
        head = self._read_until(b"\r\n\r\n")
        status_line, *header_lines = head.decode().split("\r\n")
        self.status = int(status_line.split()[1])
        self.version = status_line.split()[0]
        self.headers = dict(line.split(": ", 1) for line in header_lines)
        self.body = b""        # de-chunked bytes not yet split into blocks
        self.ended = False

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _read_until(self, marker):
        while marker not in self._buffer:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("server closed the stream")
            self._buffer += data
        found, self._buffer = self._buffer.split(marker, 1)
        return found

    def _read_exactly(self, size):
        while len(self._buffer) < size:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("server closed the stream")
            self._buffer += data
        found, self._buffer = self._buffer[:size], self._buffer[size:]
        return found

    def read_chunk(self):
        size = int(self._read_until(b"\r\n"), 16)
        data = self._read_exactly(size)
        self._read_exactly(2)
        if size == 0:
            self.ended = True
        return data

    def read_raw_block(self):
        """The next SSE block, as the bytes before its blank line."""
        while b"\n\n" not in self.body:
            if self.ended:
                raise EOFError("stream ended")
            self.body += self.read_chunk()
        block, self.body = self.body.split(b"\n\n", 1)
        return block

    def read_block(self):
        """The next block as a dict of its fields; a comment is {"comment": text}."""
        fields = {}
        for line in self.read_raw_block().decode().split("\n"):
            if line.startswith(":"):
                fields["comment"] = line[1:].strip()
            else:
                name, _, value = line.partition(": ")
                fields[name] = value
        return fields

    def read_message(self):
        """The next block that is a record, skipping retry, comments and id-only blocks."""
        while True:
            block = self.read_block()
            if "data" in block:
                return {"id": int(block["id"]), "event": block["event"], "data": json.loads(block["data"])}

    def read_sync(self):
        """The records of the sync (or resume) and the id of the id-only block that ends it."""
        records = []
        while True:
            block = self.read_block()
            if "data" in block:
                records.append({"id": int(block["id"]), "event": block["event"], "data": json.loads(block["data"])})
            elif "id" in block:
                return records, int(block["id"])


def wait_until(predicate, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def subscribers(server):
    return call(server, "GET", "/healthz")[1]["subscribers"]


METRICS_COUNTED = ["broker_inserts_total", 'broker_inserts_refused_total{status="400"}',
                   'broker_inserts_refused_total{status="415"}', "broker_streams_opened_total",
                   "broker_records_delivered_total", "broker_commit_rows_sum"]


def metric(server, name):
    """One sample of GET /metrics (name with its labels, as written), or 0 when absent."""
    connection = http.client.HTTPConnection(*address(server), timeout=TIMEOUT)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample == name:
            return float(value)
    return 0


def run_broker_process(test, *args):
    """python broker.py --port 0 --quiet ... in a subprocess, stopped at cleanup; (process, Remote)."""
    process = subprocess.Popen([sys.executable, os.path.join(HERE, "broker.py"), "--port", "0", "--quiet", *args],
                               stdout=subprocess.PIPE)
    test.addCleanup(process.wait)
    test.addCleanup(process.terminate)
    test.addCleanup(process.stdout.close)
    return process, Remote(process.stdout.readline().decode().split()[3])


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as status:
        kib = next(line for line in status if line.startswith("VmRSS:")).split()[1]
    return int(kib) / 1024


def insert_request(event, data):
    body = json.dumps({"event": event, "data": data}).encode()
    return (b"POST /insert HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


class InsertTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.broker = start_broker(cls, max_body=65536)

    def test_insert_returns_the_stored_record(self):
        name = unique_event(self)
        before = time.time_ns() // 1000
        status, record, _ = insert(self.broker, {"event": name, "data": {"name": "Ada"}, "other": 1})
        self.assertEqual(status, 200)
        self.assertEqual(set(record), {"id", "event", "timestamp", "data"})
        self.assertEqual((record["event"], record["data"]), (name, {"name": "Ada"}))
        self.assertGreaterEqual(record["timestamp"], before)
        self.assertEqual(self.broker.audit(name), {f"{name}_v_{record['timestamp']}": {"name": "Ada"}})

    def test_any_json_value_is_data(self):
        for data in [None, 0, -1.5, "text", [], [1, "two"], {"nested": {"deep": [True]}}, "ünïcödé ✓ \u2028"]:
            with self.subTest(data=data):
                status, record, _ = insert(self.broker, {"event": unique_event(self), "data": data})
                self.assertEqual((status, record["data"]), (200, data))

    def test_content_type_with_charset_is_accepted(self):
        body = json.dumps({"event": unique_event(self), "data": 1}).encode()
        status, _, _ = insert(self.broker, body, "application/json; charset=utf-8")
        self.assertEqual(status, 200)

    def assert_refused(self, status, body, expected_status, expected_error):
        self.assertEqual(status, expected_status)
        self.assertIn(expected_error, body["error"])

    def test_bad_bodies_are_400_and_store_nothing(self):
        name = unique_event(self)
        cases = [
            (b"\xff\xfe{}", "not valid UTF-8"),
            (b'{"event": "a", "data": 1, "x": "\\ud800"}', "lone surrogate"),
            (b'{"event": "a", "data": 1, "\\udc00": 2}', "lone surrogate"),
            (b'{"event": "a", "data": 1, "x": [{"y": "\\ud800"}]}', "lone surrogate"),
            (b"{not json", "not valid JSON"),
            (b"", "not valid JSON"),
            (b"[1, 2]", "must be a JSON object"),
            (b'"text"', "must be a JSON object"),
            (json.dumps({"data": 1}).encode(), '"event" is missing'),
            (json.dumps({"event": 5, "data": 1}).encode(), '"event" must be a string'),
            (json.dumps({"event": "", "data": 1}).encode(), '"event" must not be empty'),
            (json.dumps({"event": "x" * 256, "data": 1}).encode(), "at most 255 characters"),
            (json.dumps({"event": "a\nb", "data": 1}).encode(), "control characters"),
            (json.dumps({"event": "a\x00b", "data": 1}).encode(), "control characters"),
            (json.dumps({"event": "a\x1fb", "data": 1}).encode(), "control characters"),
            (json.dumps({"event": "a\x7fb", "data": 1}).encode(), "control characters"),
            (b'{"event": "\\ud800", "data": 1}', "lone surrogate"),
            (json.dumps({"event": name}).encode(), '"data" is missing'),
            (b'{"event": "%s", "data": NaN}' % name.encode(), "NaN and Infinity are not valid JSON"),
            (b'{"event": "%s", "data": [Infinity]}' % name.encode(), "NaN and Infinity are not valid JSON"),
            (b'{"event": "%s", "data": {"a": -Infinity}}' % name.encode(), "NaN and Infinity are not valid JSON"),
            (b'{"event": "%s", "data": 1e999}' % name.encode(), "NaN and Infinity are not valid JSON"),
            (b'{"event": "%s", "data": 1, "ignored": NaN}' % name.encode(), "NaN and Infinity are not valid JSON"),
            (b'{"event": "%s", "data": {"k": "\\udc00"}}' % name.encode(), "lone surrogate"),
            (b'{"event": "%s", "data": %s}' % (name.encode(), b"[" * 30000 + b"]" * 30000), "nested too deeply"),
        ]
        last_id = call(self.broker, "GET", "/healthz")[1]["last_id"]
        for body, error in cases:
            with self.subTest(body=body[:40], error=error):
                status, answer, headers = insert(self.broker, body)
                self.assert_refused(status, answer, 400, error)
                self.assertEqual(headers["Content-Type"], "application/json")
        self.assertEqual(call(self.broker, "GET", "/healthz")[1]["last_id"], last_id)
        self.assertEqual(self.broker.audit(name), {})

    def test_event_of_255_characters_is_accepted(self):
        status, record, _ = insert(self.broker, {"event": "é" * 255, "data": 1})
        self.assertEqual((status, record["event"]), (200, "é" * 255))

    def test_wrong_content_type_is_415(self):
        for content_type in ["text/plain", "application/x-www-form-urlencoded", ""]:
            with self.subTest(content_type=content_type):
                body = json.dumps({"event": unique_event(self), "data": 1}).encode()
                status, answer, _ = insert(self.broker, body, content_type)
                self.assert_refused(status, answer, 415, "Content-Type must be application/json")

    def test_missing_content_length_is_411(self):
        response = raw(self.broker, b"POST /insert HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                    b"Transfer-Encoding: chunked\r\n\r\n5\r\n{}{}{\r\n0\r\n\r\n")
        self.assertEqual(status_of(response), 411)
        self.assertEqual(body_of(response),
                         {"error": "Transfer-Encoding is not supported; send the body with Content-Length"})

    def test_oversized_body_is_413_without_reading_it(self):
        # Only the headers are sent: the answer must come without the server waiting for the body.
        with socket.create_connection(address(self.broker), timeout=TIMEOUT) as sock:
            sock.sendall(b"POST /insert HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100000000\r\n\r\n")
            response = b""
            while not response.endswith(b"}"):
                response += sock.recv(65536)
        self.assertEqual(status_of(response), 413)
        self.assertIn(b"Connection: close", response)
        self.assertEqual(body_of(response), {"error": "body is larger than 65536 bytes"})

    def test_connection_stays_usable_after_a_refusal(self):
        connection = http.client.HTTPConnection(*address(self.broker), timeout=TIMEOUT)
        self.addCleanup(connection.close)
        statuses = []
        for body, content_type in [(b"{bad", "application/json"), (b'{"event":"x","data":1}', "text/plain"),
                                   (json.dumps({"event": unique_event(self), "data": 2}).encode(), "application/json")]:
            connection.request("POST", "/insert", body, {"Content-Type": content_type})
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
        self.assertEqual(statuses, [400, 415, 200])

    def test_ids_and_timestamps_strictly_increase_under_concurrent_publishers(self):
        name = unique_event(self)
        records, errors = [], []

        def publish_many(worker):
            connection = http.client.HTTPConnection(*address(self.broker), timeout=TIMEOUT)
            try:
                for n in range(40):
                    connection.request("POST", "/insert", json.dumps({"event": name, "data": [worker, n]}),
                                       {"Content-Type": "application/json"})
                    response = connection.getresponse()
                    records.append(json.loads(response.read()))
            except Exception as error:      # reported below, in the test's own thread
                errors.append(error)
            finally:
                connection.close()

        threads = [threading.Thread(target=publish_many, args=(w,)) for w in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(errors, [])
        records.sort(key=lambda r: r["id"])
        self.assertEqual(len(records), 320)
        timestamps = [r["timestamp"] for r in records]
        self.assertEqual(timestamps, sorted(set(timestamps)))
        self.assertEqual(len({r["id"] for r in records}), 320)
        history = self.broker.audit(name)
        self.assertEqual(list(history), [f"{name}_v_{ts}" for ts in timestamps])


class EventsTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.broker = start_broker(cls)

    def subscribe(self, path="/events", headers=None):
        stream = EventStream(self.broker, path, headers)
        self.addCleanup(stream.close)
        return stream

    def test_stream_headers(self):
        stream = self.subscribe()
        self.assertEqual(stream.version, "HTTP/1.1")
        self.assertEqual(stream.status, 200)
        self.assertEqual(stream.headers["Content-Type"], "text/event-stream")
        self.assertEqual(stream.headers["Cache-Control"], "no-cache")
        self.assertEqual(stream.headers["Transfer-Encoding"], "chunked")
        self.assertEqual(stream.headers["X-Accel-Buffering"], "no")

    def test_framing_byte_for_byte(self):
        name = unique_event(self)
        record = self.broker.publish(name, {"a": [1, "é"]})
        stream = self.subscribe(f"/events?event={name}")
        self.assertEqual(stream.read_raw_block(), b"retry: 3000")
        self.assertEqual(stream.read_raw_block(),
                         b'id: %d\nevent: %s\ndata: {"a":[1,"\xc3\xa9"]}' % (record["id"], name.encode()))
        self.assertEqual(stream.read_raw_block(), b"id: %d" % self.broker.hub.newest)
        live = self.broker.publish(name, "two")
        self.assertEqual(stream.read_raw_block(), b'id: %d\nevent: %s\ndata: "two"' % (live["id"], name.encode()))

    def test_sync_sends_latest_of_each_event_in_id_order_then_live(self):
        a, b = unique_event(self), unique_event(self)
        self.broker.publish(a, 1)
        self.broker.publish(b, 1)
        latest_a = self.broker.publish(a, 2)
        stream = self.subscribe(f"/events?event={a}&event={b}")
        records, cursor = stream.read_sync()
        self.assertEqual([(r["event"], r["data"]) for r in records], [(b, 1), (a, 2)])
        self.assertEqual(cursor, self.broker.hub.newest)
        self.assertGreaterEqual(cursor, latest_a["id"])
        live = self.broker.publish(b, 3)
        self.assertEqual(stream.read_message(), {"id": live["id"], "event": b, "data": 3})

    def test_unfiltered_sync_holds_every_event(self):
        names = [unique_event(self) for _ in range(3)]
        for n, name in enumerate(names):
            self.broker.publish(name, n)
        records, _ = self.subscribe().read_sync()
        events = [r["event"] for r in records]
        self.assertTrue(set(names) <= set(events))
        self.assertEqual(len(events), len(set(events)))
        self.assertEqual([r["id"] for r in records], sorted(r["id"] for r in records))

    def test_full_sync_is_fresh_after_every_insert(self):
        name = unique_event(self)
        for n in range(3):
            self.broker.publish(name, n)
            for _ in range(2):              # the second stream is served the shared sync
                with EventStream(self.broker) as stream:
                    records, cursor = stream.read_sync()
                self.assertEqual({r["event"]: r["data"] for r in records}[name], n)
                self.assertEqual(cursor, self.broker.hub.newest)

    def test_filter_limits_sync_and_live(self):
        wanted, other = unique_event(self), unique_event(self)
        self.broker.publish(other, 0)
        stream = self.subscribe(f"/events?event={urllib.parse.quote(wanted)}")
        self.assertEqual(stream.read_sync()[0], [])
        self.broker.publish(other, 1)
        record = self.broker.publish(wanted, 2)
        self.assertEqual(stream.read_message()["id"], record["id"])

    def test_bad_filter_is_400(self):
        status, body, _ = call(self.broker, "GET", "/events?event=")
        self.assertEqual((status, body), (400, {"error": '"event" must not be empty'}))

    def test_resume_by_header_sends_every_newer_record(self):
        name = unique_event(self)
        first = self.broker.publish(name, 1)
        self.broker.publish(name, 2)
        self.broker.publish(name, 3)
        stream = self.subscribe(f"/events?event={name}", {"Last-Event-ID": str(first["id"])})
        records, cursor = stream.read_sync()
        self.assertEqual([r["data"] for r in records], [2, 3])
        self.assertEqual(cursor, self.broker.hub.newest)

    def test_resume_by_query(self):
        name = unique_event(self)
        first = self.broker.publish(name, 1)
        self.broker.publish(name, 2)
        for key in ("lastEventId", "last_event_id"):
            with self.subTest(key=key):
                stream = self.subscribe(f"/events?event={name}&{key}={first['id']}")
                self.assertEqual([r["data"] for r in stream.read_sync()[0]], [2])

    def test_header_wins_over_query(self):
        name = unique_event(self)
        first = self.broker.publish(name, 1)
        second = self.broker.publish(name, 2)
        self.broker.publish(name, 3)
        stream = self.subscribe(f"/events?event={name}&lastEventId={first['id']}",
                                {"Last-Event-ID": str(second["id"])})
        self.assertEqual([r["data"] for r in stream.read_sync()[0]], [3])

    def test_bad_or_future_last_event_id_gets_a_full_sync(self):
        name = unique_event(self)
        self.broker.publish(name, 1)
        self.broker.publish(name, 2)
        for value in ("abc", "-1", "1.5", str(self.broker.hub.newest + 1000)):
            with self.subTest(value=value):
                stream = self.subscribe(f"/events?event={name}", {"Last-Event-ID": value})
                self.assertEqual([r["data"] for r in stream.read_sync()[0]], [2])

    def test_resume_at_the_newest_id_replays_nothing(self):
        name = unique_event(self)
        self.broker.publish(name, 1)
        stream = self.subscribe(f"/events?event={name}", {"Last-Event-ID": str(self.broker.hub.newest)})
        self.assertEqual(stream.read_sync()[0], [])
        record = self.broker.publish(name, 2)
        self.assertEqual(stream.read_message()["id"], record["id"])

    def test_subscribers_joining_during_inserts_end_with_exactly_the_final_state(self):
        names = [unique_event(self) for _ in range(5)]
        query = "&".join(f"event={n}" for n in names)
        done = threading.Event()

        def publish_all():
            for n in range(300):
                self.broker.publish(names[n % 5], n)
            done.set()

        publisher = threading.Thread(target=publish_all)
        publisher.start()
        streams = []
        while not done.is_set() or len(streams) < 3:
            streams.append(self.subscribe(f"/events?{query}"))
        publisher.join()
        final = self.broker.hub.newest
        expected = {names[n % 5]: n for n in range(295, 300)}
        for stream in streams:
            state, ids = {}, []
            records, cursor = stream.read_sync()
            while cursor < final:
                record = records.pop(0) if records else stream.read_message()
                ids.append(record["id"])
                state[record["event"]] = record["data"]
                cursor = max(cursor, record["id"])
            for record in records:
                ids.append(record["id"])
                state[record["event"]] = record["data"]
            self.assertEqual(ids, sorted(set(ids)), "ids must strictly increase: no duplicate")
            self.assertEqual(state, expected)
        self.assertGreater(len(streams), 3)

    def test_live_stream_has_no_gap_while_inserts_run(self):
        name = unique_event(self)
        stream = self.subscribe(f"/events?event={name}")
        stream.read_sync()
        published = [self.broker.publish(name, n)["id"] for n in range(200)]
        self.assertEqual([stream.read_message()["id"] for _ in published], published)

    def test_no_gap_when_the_writer_falls_behind_the_ring(self):
        name = unique_event(self)
        stream = self.subscribe(f"/events?event={name}")
        stream.read_sync()
        ring = broker.RING_RECORDS
        broker.RING_RECORDS = 2       # every batch larger than this is read back from the database
        self.addCleanup(setattr, broker, "RING_RECORDS", ring)
        published = []
        threads = [threading.Thread(target=lambda: published.extend(
            self.broker.publish(name, n)["id"] for n in range(50))) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual([stream.read_message()["id"] for _ in published], sorted(published))

    def test_heartbeat_after_silence(self):
        quick = Broker(db=":memory:", port=0, quiet=True, heartbeat=0.2).start()
        self.addCleanup(quick.stop)
        stream = EventStream(quick)
        self.addCleanup(stream.close)
        stream.read_sync()
        started = time.monotonic()
        self.assertEqual(stream.read_block(), {"comment": "keep-alive"})
        self.assertGreaterEqual(time.monotonic() - started, 0.1)

    def test_non_reading_subscriber_does_not_stall_others(self):
        name = unique_event(self)
        stalled = socket.create_connection(address(self.broker))
        self.addCleanup(stalled.close)
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.sendall(f"GET /events?event={name} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        reader = self.subscribe(f"/events?event={name}")
        reader.read_sync()
        big = "x" * 100_000
        published = [self.broker.publish(name, [n, big])["id"] for n in range(60)]   # 6 MB: far past any buffer
        self.assertEqual([reader.read_message()["id"] for _ in published], published)

    def test_http_1_0_client_gets_an_unchunked_stream(self):
        name = unique_event(self)
        self.broker.publish(name, 1)
        with socket.create_connection(address(self.broker), timeout=TIMEOUT) as sock:
            sock.sendall(f"GET /events?event={name} HTTP/1.0\r\n\r\n".encode())
            received = b""
            while not received.endswith(b"\n\nid: %d\n\n" % self.broker.hub.newest):
                received += sock.recv(65536)
            live = self.broker.publish(name, 2)
            while not received.endswith(b"\n\n") or b"data: 2" not in received:
                received += sock.recv(65536)
        head, body = received.split(b"\r\n\r\n", 1)
        self.assertNotIn(b"Transfer-Encoding", head)
        self.assertIn(b"Connection: close", head)
        self.assertTrue(body.startswith(b"retry: 3000\n\nid: "), body)
        self.assertTrue(body.endswith(b"id: %d\nevent: %s\ndata: 2\n\n" % (live["id"], name.encode())))

    def test_disconnected_subscriber_is_released(self):
        own = start_broker(type(self))      # other tests' streams would move the count
        stream = EventStream(own)
        stream.read_sync()
        self.assertEqual(subscribers(own), 1)
        stream.close()
        wait_until(lambda: subscribers(own) == 0)
        self.assertEqual(own.publish("after", 1)["data"], 1)


def sign(claims, secret, alg="HS256"):
    """A JWT made here, independently of broker.make_jwt, with any header alg."""
    def encode(data):
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    signing_input = f"{encode(json.dumps({'alg': alg}).encode())}.{encode(json.dumps(claims).encode())}"
    return signing_input + "." + encode(hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest())


class MatchTests(unittest.TestCase):
    """?match= patterns: shell-style, beside exact ?event= names, in the sync, resume and live."""

    @classmethod
    def setUpClass(cls):
        cls.broker = start_broker(cls, jwt_secret="match-secret")
        cls.token = broker.make_jwt("match-secret", ["*"], ["*"])

    def stream(self, query, headers=None):
        stream = EventStream(self.broker, f"/events?{query}&access_token={self.token}", headers)
        self.addCleanup(stream.close)
        return stream

    def publish(self, event, data):
        return self.broker.publish(event, data)["id"]

    def test_patterns_and_names_choose_the_sync_the_resume_and_live(self):
        room = unique_event(self)
        first = self.publish(f"{room}.chat.a", 1)
        self.publish(f"{room}.chat.b", 2)
        self.publish(f"{room}.user", 3)
        self.publish(f"{room}.other", 4)
        query = urllib.parse.urlencode([("match", f"{room}.chat.*"), ("event", f"{room}.user")])
        records, _ = self.stream(query).read_sync()
        self.assertEqual([r["data"] for r in records], [1, 2, 3])
        resumed = self.stream(query, {"Last-Event-ID": str(first)})
        self.assertEqual([r["data"] for r in resumed.read_sync()[0]], [2, 3])
        self.publish(f"{room}.other", 5)
        self.publish(f"{room}.chat.c", 6)
        self.assertEqual(resumed.read_message()["data"], 6)

    def test_event_stays_an_exact_name(self):
        name = unique_event(self)
        self.publish(name + "*", "literal")
        self.publish(name + "x", "other")
        records, _ = self.stream(urllib.parse.urlencode({"event": name + "*"})).read_sync()
        self.assertEqual([r["data"] for r in records], ["literal"])
        records, _ = self.stream(urllib.parse.urlencode({"match": name + "[x]"})).read_sync()
        self.assertEqual([r["data"] for r in records], ["other"])

    def test_the_token_still_cuts_what_a_pattern_reveals(self):
        room = unique_event(self)
        self.publish(f"{room}.public", 1)
        self.publish(f"{room}.secret", 2)
        token = broker.make_jwt("match-secret", subscribe=[f"{room}.pub*"])
        with EventStream(self.broker, f"/events?match={room}.*&access_token={token}") as stream:
            self.assertEqual([r["data"] for r in stream.read_sync()[0]], [1])
            self.publish(f"{room}.secret", 3)
            self.publish(f"{room}.public", 4)
            self.assertEqual(stream.read_message()["data"], 4)

    def test_bad_patterns_are_400(self):
        for query, error in [("match=", '"match" must not be empty'),
                             ("match=a%01", '"match" must not hold control characters'),
                             ("&".join(["match=a"] * 60 + ["event=b"] * 41), "at most 100 event and match filters")]:
            with self.subTest(query=query[:20]):
                status, body, _ = call(self.broker, "GET", f"/events?{query}&access_token={self.token}")
                self.assertEqual(status, 400)
                self.assertIn(error, body["error"])

    def test_the_client_subscribes_by_pattern(self):
        room = unique_event(self)
        self.publish(f"{room}.chat.a", 1)
        self.publish(f"{room}.user", 2)
        records = self.broker.subscribe(match=[f"{room}.chat.*"], timeout=TIMEOUT, token=self.token)
        self.addCleanup(records.close)
        self.assertEqual(next(records)["data"], 1)
        self.publish(f"{room}.user", 3)
        self.publish(f"{room}.chat.b", 4)
        self.assertEqual(next(records)["data"], 4)


class BatchInsertTests(unittest.TestCase):
    """POST /insert with an array: one transaction, all or none, consecutive ids in array order."""

    @classmethod
    def setUpClass(cls):
        cls.broker = start_broker(cls, jwt_secret="batch-secret")
        cls.token = broker.make_jwt("batch-secret", ["*"], ["*"])

    def post(self, body, token=None):
        return call(self.broker, "POST", "/insert", body, {"Authorization": f"Bearer {token or self.token}"})

    def test_a_batch_is_stored_in_order_and_reaches_subscribers_as_one_write(self):
        name = unique_event(self)
        stream = EventStream(self.broker, f"/events?event={name}&access_token={self.token}")
        self.addCleanup(stream.close)
        stream.read_sync()
        status, records, _ = self.post([{"event": name, "data": n} for n in range(100)])
        self.assertEqual(status, 200)
        ids = [r["id"] for r in records]
        self.assertEqual(ids, list(range(ids[0], ids[0] + 100)))
        self.assertEqual([r["data"] for r in records], list(range(100)))
        chunk = stream.read_chunk()              # the whole batch in one write
        self.assertEqual(chunk.count(b"\n\n"), 100)
        stream.body += chunk
        self.assertEqual([stream.read_message()["id"] for _ in range(100)], ids)

    def test_one_bad_item_stores_nothing_and_names_its_index(self):
        name = unique_event(self)
        for items, status, error in [
                ([{"event": name, "data": 1}, {"event": name}], 400, 'item 1: "data" is missing'),
                ([{"event": name, "data": 1}, 7], 400, 'item 1: must be a JSON object {"event": ..., "data": ...}'),
                ([{"event": name, "data": 1}, {"event": "", "data": 2}], 400, 'item 1: "event" must not be empty'),
                ([{"event": name, "data": n} for n in range(1001)], 400, "a batch holds at most 1000 records")]:
            with self.subTest(error=error):
                self.assertEqual(self.post(items)[:2], (status, {"error": error}))
        token = broker.make_jwt("batch-secret", [name])
        status, body, _ = self.post([{"event": name, "data": 1}, {"event": "elsewhere", "data": 2}], token)
        self.assertEqual((status, body), (403, {"error": "item 1: the token does not allow publishing 'elsewhere'"}))
        self.assertEqual(self.broker.audit(name), {})

    def test_an_empty_batch_stores_nothing(self):
        self.assertEqual(self.post([])[:2], (200, []))

    def test_publish_many_in_process_and_by_the_client(self):
        name = unique_event(self)
        records = self.broker.publish_many([(name, 1), (name, 2)])
        self.assertEqual([r["data"] for r in records], [1, 2])
        self.assertEqual(records[1]["id"], records[0]["id"] + 1)
        sent = broker.publish_many(self.broker.url, [(name, 3), (name + "b", 4)], token=self.token)
        self.assertEqual([(r["event"], r["data"]) for r in sent], [(name, 3), (name + "b", 4)])
        with self.assertRaises(broker.RequestError) as raised:
            self.broker.publish_many([(name, 5), ("", 6)])
        self.assertEqual(raised.exception.message, 'item 1: "event" must not be empty')
        self.assertEqual(list(self.broker.audit(name).values()), [1, 2, 3])


class RetentionTests(unittest.TestCase):
    """--keep-versions and --keep-days: old versions go, the latest of each event stays."""

    def wait_for_versions(self, server, event, count):
        wait_until(lambda: len(server.audit(event)) == count, timeout=TIMEOUT * 2)
        return list(server.audit(event).values())

    def test_keep_versions_keeps_the_newest_and_never_reuses_ids(self):
        with Broker(db=new_db(type(self)), port=0, quiet=True, keep_versions=3) as server:
            records = server.publish_many([("e", n) for n in range(10)]) + [server.publish("f", "only")]
            self.assertEqual(self.wait_for_versions(server, "e", 3), [7, 8, 9])
            self.assertEqual(server.latest(), {"e": 9, "f": "only"})
            with EventStream(server, headers={"Last-Event-ID": "0"}) as stream:      # resume: what remains
                self.assertEqual([r["data"] for r in stream.read_sync()[0]], [7, 8, 9, "only"])
            self.assertEqual(server.publish("e", 10)["id"], records[-1]["id"] + 1)
            self.assertEqual(self.wait_for_versions(server, "e", 3), [8, 9, 10])
            self.assertEqual(metric(server, "broker_records_pruned_total"), 8)

    def test_keep_versions_prunes_an_existing_history_at_start(self):
        db = new_db(type(self))
        with Broker(db=db, port=0, quiet=True) as server:
            server.publish_many([("e", n) for n in range(600)])
            server.publish_many([("e", n) for n in range(600, 1200)])
        with Broker(db=db, port=0, quiet=True, keep_versions=2) as server:
            self.assertEqual(self.wait_for_versions(server, "e", 2), [1198, 1199])

    def test_keep_days_prunes_an_existing_history_at_start(self):
        db = new_db(type(self))
        with Broker(db=db, port=0, quiet=True) as server:
            server.publish_many([("e", 1), ("e", 2)])
        with Broker(db=db, port=0, quiet=True, keep_days=1e-9) as server:      # no insert needed
            self.assertEqual(self.wait_for_versions(server, "e", 1), [2])

    def test_keep_days_drops_old_versions_but_not_the_latest(self):
        with Broker(db=new_db(type(self)), port=0, quiet=True, keep_days=1 / 86400) as server:  # one second
            server.publish_many([("e", 1), ("e", 2), ("lonely", 3)])
            wait_until(lambda: server.audit("e") and len(server.audit("e")) == 1, timeout=TIMEOUT * 2)
            self.assertEqual(list(server.audit("e").values()), [2])
            self.assertEqual(server.latest(), {"e": 2, "lonely": 3})

    def test_the_file_stops_growing_under_a_steady_load(self):
        db = new_db(type(self))
        with Broker(db=db, port=0, quiet=True, sync="normal", keep_versions=10) as server:
            def load(rounds):
                for _ in range(rounds):
                    server.publish_many([(f"e{n % 20}", "x" * 2000) for n in range(1000)])
                    for n in range(20):
                        self.wait_for_versions(server, f"e{n}", 10)
                return server.store.size_bytes()         # the file and its write-ahead log
            settled = load(5)
            self.assertLess(load(20), settled * 1.2)        # 20,000 more versions in freed pages


class MetricsTests(unittest.TestCase):
    """GET /metrics: counters that move by exactly what a client did (format: deploy/test_metrics.py)."""

    @classmethod
    def setUpClass(cls):
        cls.broker = start_broker(cls, max_body=65536)

    def test_counters_move_by_what_clients_did(self):
        before = {name: metric(self.broker, name) for name in METRICS_COUNTED}
        name = unique_event(self)
        self.broker.publish_many([(name, 1), (name, 2)])
        insert(self.broker, {"event": name, "data": 3})
        insert(self.broker, b"{bad")
        insert(self.broker, {"event": name, "data": 4}, content_type="text/plain")
        with EventStream(self.broker, f"/events?event={name}") as stream:
            self.assertEqual(len(stream.read_sync()[0]), 1)
            wait_until(lambda: metric(self.broker, "broker_streams_open") == 1)
            self.broker.publish(name, 5)
            stream.read_message()
        after = {name: metric(self.broker, name) for name in METRICS_COUNTED}
        self.assertEqual({name: after[name] - before[name] for name in METRICS_COUNTED}, {
            "broker_inserts_total": 4, 'broker_inserts_refused_total{status="400"}': 1,
            'broker_inserts_refused_total{status="415"}': 1, "broker_streams_opened_total": 1,
            "broker_records_delivered_total": 2, "broker_commit_rows_sum": 4})
        self.assertEqual(metric(self.broker, "broker_newest_id"), self.broker.hub.newest)
        self.assertGreater(metric(self.broker, "process_resident_memory_bytes"), 0)

    def test_a_refusal_of_an_absolute_form_insert_is_counted(self):
        counted = 'broker_inserts_refused_total{status="415"}'
        before = metric(self.broker, counted)
        host, port = address(self.broker)
        response = raw(self.broker, f"POST http://{host}:{port}/insert HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
                                    "Content-Length: 2\r\nConnection: close\r\n\r\n{}".encode())
        self.assertEqual(status_of(response), 415)
        self.assertEqual(metric(self.broker, counted) - before, 1)

    def test_the_subscribe_token_guards_it(self):
        with Broker(db=":memory:", port=0, quiet=True, subscribe_token="read") as server:
            self.assertEqual(call(server, "GET", "/metrics")[0], 401)
            status, _, headers = call(server, "GET", "/metrics", headers={"Authorization": "Bearer read"})
            self.assertEqual((status, headers["Content-Type"]), (200, "text/plain; version=0.0.4; charset=utf-8"))


class SyncSnapshotTests(unittest.TestCase):
    """The sync is the latest of each event as of its id-only block P, however long it takes."""

    @classmethod
    def setUpClass(cls):
        cls.broker = start_broker(cls, sync="normal")

    def test_sync_longer_than_a_page_is_a_snapshot_while_every_event_changes(self):
        # 2,000 events of 10 kB: a sync of 20 MB, many pages, more than the sockets buffer. The
        # client reads nothing until every event has a newer version: the pages the server
        # reads after that must still hold each event as it was at the id-only block.
        prefix = unique_event(self)
        names = [f"{prefix}-{n}" for n in range(2000)]
        first = {name: self.broker.publish(name, "x" * 10000)["id"] for name in names}
        newest = self.broker.hub.newest
        stream = EventStream(self.broker)
        self.addCleanup(stream.close)
        filtered = EventStream(self.broker, "/events?" + urllib.parse.urlencode([("event", n) for n in names[-100:]]))
        self.addCleanup(filtered.close)
        updates = [self.broker.publish(name, "new") for name in names]
        records, block = stream.read_sync()
        self.assertEqual(block, newest)
        synced = {r["event"]: r["id"] for r in records if r["event"].startswith(prefix + "-")}
        self.assertEqual(synced, first)
        self.assertEqual([r["id"] for r in records], sorted(r["id"] for r in records))
        self.assertEqual([stream.read_message()["id"] for _ in updates], [u["id"] for u in updates])
        records, block = filtered.read_sync()
        self.assertEqual(({r["event"]: r["id"] for r in records}, block),
                         ({name: first[name] for name in names[-100:]}, newest))


class TokenTests(unittest.TestCase):
    """Fixed tokens: --publish-token and --subscribe-token."""

    @classmethod
    def setUpClass(cls):
        cls.broker = start_broker(cls, publish_token="pub-secret", subscribe_token="sub-secret")

    def assert_unauthorized(self, status, body, headers):
        self.assertEqual(status, 401)
        self.assertTrue(headers["WWW-Authenticate"].startswith("Bearer"))
        self.assertIn("error", body)

    def test_insert_needs_the_publish_token(self):
        body = json.dumps({"event": unique_event(self), "data": 1})
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer sub-secret"},
                        {"Authorization": "Basic pub-secret"}):
            with self.subTest(headers=headers):
                self.assert_unauthorized(*call(self.broker, "POST", "/insert", body,
                                               {"Content-Type": "application/json", **headers}))
        status, record, _ = call(self.broker, "POST", "/insert", body,
                                 {"Content-Type": "application/json", "Authorization": "Bearer pub-secret"})
        self.assertEqual(status, 200)
        self.assertEqual(call(self.broker, "GET", "/healthz")[1]["last_id"], record["id"])

    def test_events_and_audit_need_the_subscribe_token(self):
        for path in ("/events", "/audit/user", "/events?access_token=wrong", "/audit/user?access_token=pub-secret"):
            with self.subTest(path=path):
                self.assert_unauthorized(*call(self.broker, "GET", path))
        self.assertEqual(call(self.broker, "GET", "/audit/user", headers={"Authorization": "Bearer sub-secret"})[0], 200)
        self.assertEqual(call(self.broker, "GET", "/audit/user?access_token=sub-secret")[0], 200)
        with EventStream(self.broker, "/events?access_token=sub-secret") as by_query:
            self.assertEqual(by_query.status, 200)
        with EventStream(self.broker, headers={"Authorization": "Bearer sub-secret"}) as by_header:
            self.assertEqual(by_header.status, 200)

    def test_healthz_and_preflight_stay_open(self):
        self.assertEqual(call(self.broker, "GET", "/healthz")[0], 200)
        self.assertEqual(call(self.broker, "OPTIONS", "/insert")[0], 204)

    def test_client_functions_send_the_token(self):
        name = unique_event(self)
        with self.assertRaises(broker.RequestError) as refused:
            broker.publish_to(self.broker.url, name, 1)
        self.assertEqual(refused.exception.status, 401)
        record = broker.publish_to(self.broker.url, name, 1, token="pub-secret")
        records = broker.subscribe(self.broker.url, [name], timeout=TIMEOUT, token="sub-secret")
        self.addCleanup(records.close)
        self.assertEqual(next(records)["id"], record["id"])


class JwtTests(unittest.TestCase):
    """--jwt-secret: HS256 tokens whose claims name the events a bearer may publish and read."""
    SECRET = "jwt-secret"

    @classmethod
    def setUpClass(cls):
        cls.broker = start_broker(cls, jwt_secret=cls.SECRET)
        cls.secret = cls.broker.publish("secret", "hidden")
        cls.user = cls.broker.publish("user", {"name": "Ada"})
        cls.room = cls.broker.publish("chat.room", "hello")

    def token(self, publish=(), subscribe=(), **options):
        return broker.make_jwt(self.SECRET, publish, subscribe, **options)

    def insert_as(self, token, event):
        return call(self.broker, "POST", "/insert", json.dumps({"event": event, "data": 1}),
                    {"Content-Type": "application/json", "Authorization": f"Bearer {token}"})

    def test_publisher_may_insert_only_the_events_its_token_allows(self):
        token = self.token(publish=["chat.*"])
        self.assertEqual(self.insert_as(token, "chat.lobby")[0], 200)
        status, body, _ = self.insert_as(token, "user")
        self.assertEqual((status, body), (403, {"error": "the token does not allow publishing 'user'"}))
        self.assertEqual(self.insert_as(self.token(subscribe=["*"]), "chat.lobby")[0], 403)

    def test_bad_tokens_are_401(self):
        publish_all = {"broker": {"publish": ["*"]}}
        cases = [
            ("expired", sign({**publish_all, "exp": time.time() - 10}, self.SECRET), "it has expired"),
            ("not yet valid", sign({**publish_all, "nbf": time.time() + 3600}, self.SECRET), "not valid yet"),
            ("wrong signature", sign(publish_all, "another-secret"), "signature does not match"),
            ("alg none", sign(publish_all, self.SECRET, alg="none"), "alg must be HS256"),
            ("alg none, unsigned", sign(publish_all, self.SECRET, alg="none").rsplit(".", 1)[0] + ".", "alg must be HS256"),
            ("alg HS512", sign(publish_all, self.SECRET, alg="HS512"), "alg must be HS256"),
            ("exp NaN", sign({**publish_all, "exp": float("nan")}, self.SECRET), "exp and nbf must be numbers"),
            ("garbage", "not.a.jwt", "not a JWT"),
            ("two parts", "abc.def", "not a JWT"),
        ]
        for case, token, reason in cases:
            with self.subTest(case=case):
                status, body, headers = self.insert_as(token, "chat.x")
                self.assertEqual(status, 401)
                self.assertIn(reason, body["error"])
                self.assertEqual(headers["WWW-Authenticate"], 'Bearer error="invalid_token"')
        self.assertEqual(call(self.broker, "GET", "/audit/user")[0], 401)
        self.assertEqual(self.insert_as(sign({**publish_all, "exp": time.time() + 60}, self.SECRET), "chat.x")[0], 200)

    def test_subscriber_sees_only_allowed_events_in_sync_resume_and_live(self):
        token = self.token(subscribe=["chat.*", "user"])
        with EventStream(self.broker, f"/events?access_token={token}") as stream:
            records, _ = stream.read_sync()
            self.assertNotIn("secret", {r["event"] for r in records})
            self.assertTrue({"user", "chat.room"} <= {r["event"] for r in records})
            self.broker.publish("secret", "still hidden")
            live = self.broker.publish("chat.room", "live")
            self.assertEqual(stream.read_message()["id"], live["id"])
        resume = {"Authorization": f"Bearer {token}", "Last-Event-ID": str(self.secret["id"] - 1)}
        with EventStream(self.broker, headers=resume) as resumed:
            events = [r["event"] for r in resumed.read_sync()[0]]
            self.assertNotIn("secret", events)
            self.assertEqual(events[:2], ["user", "chat.room"])

    def test_a_token_nested_too_deeply_to_parse_is_401(self):
        header = base64.urlsafe_b64encode(b"[" * 20000 + b"]" * 20000).rstrip(b"=").decode()
        claims = base64.urlsafe_b64encode(b"{}").rstrip(b"=").decode()
        status, body, headers = call(self.broker, "GET", "/audit/user", headers={"Authorization": f"Bearer {header}.{claims}.x"})
        self.assertEqual((status, body), (401, {"error": "the bearer token is not valid: not a JWT"}))
        self.assertEqual(headers["WWW-Authenticate"], 'Bearer error="invalid_token"')

    def test_asking_for_a_forbidden_event_is_403(self):
        token = self.token(subscribe=["chat.*"])
        status, body, _ = call(self.broker, "GET", f"/events?event=secret&access_token={token}")
        self.assertEqual((status, body), (403, {"error": "the token does not allow subscribing to 'secret'"}))
        self.assertEqual(call(self.broker, "GET", f"/audit/secret?access_token={token}")[0], 403)
        self.assertEqual(call(self.broker, "GET", f"/audit/chat.room?access_token={token}")[:2][0], 200)
        no_reading = self.token(publish=["*"])
        self.assertEqual(call(self.broker, "GET", f"/events?access_token={no_reading}")[0], 403)

    def test_token_command_prints_a_token_the_broker_accepts(self):
        output = subprocess.run([sys.executable, os.path.join(HERE, "broker.py"), "token", "--secret", self.SECRET,
                                 "--publish", "chat.*", "--subscribe", "user", "--expires", "60"],
                                capture_output=True, text=True, timeout=TIMEOUT, check=True).stdout.strip()
        self.assertEqual(broker.verify_jwt(output, self.SECRET), {"publish": ["chat.*"], "subscribe": ["user"]})
        self.assertEqual(self.insert_as(output, "chat.cli")[0], 200)


class FaultTests(unittest.TestCase):
    """Crashes, full or read-only disks, and files that are not ours."""

    def test_every_acknowledged_insert_survives_kill_9(self):
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        db = os.path.join(folder.name, "broker.db")
        process = subprocess.Popen([sys.executable, os.path.join(HERE, "broker.py"), "--port", "0", "--db", db,
                                    "--quiet"], stdout=subprocess.PIPE)
        self.addCleanup(process.kill)
        self.addCleanup(process.stdout.close)
        host, port = urllib.parse.urlsplit(process.stdout.readline().decode().split()[3])[1].split(":")
        acknowledged, enough = [], threading.Event()

        def publish_until_killed(worker):
            connection = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
            try:
                for n in itertools.count():
                    connection.request("POST", "/insert", json.dumps({"event": f"w{worker}", "data": n}),
                                       {"Content-Type": "application/json"})
                    response = connection.getresponse()
                    if response.status == 200:
                        acknowledged.append(json.loads(response.read()))
                    if len(acknowledged) >= 400:
                        enough.set()
            except (OSError, http.client.HTTPException):
                return            # the server died under us: that is the point
            finally:
                connection.close()

        threads = [threading.Thread(target=publish_until_killed, args=(w,)) for w in range(8)]
        for thread in threads:
            thread.start()
        self.assertTrue(enough.wait(TIMEOUT * 4))
        process.send_signal(signal.SIGKILL)
        for thread in threads:
            thread.join(TIMEOUT)
        process.wait(TIMEOUT)
        with Broker(db=db, port=0, quiet=True) as restarted:
            stored = {}
            for worker in range(8):
                for key, value in restarted.audit(f"w{worker}").items():
                    stored[(f"w{worker}", value)] = int(key.rsplit("_v_", 1)[1])
        missing = [r for r in acknowledged if stored.get((r["event"], r["data"])) != r["timestamp"]]
        self.assertGreaterEqual(len(acknowledged), 400)
        self.assertEqual(missing, [])

    def test_a_foreign_sqlite_database_is_refused_untouched(self):
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        path = os.path.join(folder.name, "app.db")
        with sqlite3.connect(path) as other:
            other.execute("CREATE TABLE notes (text TEXT)")
            other.execute("INSERT INTO notes VALUES ('keep me')")
        other.close()
        with open(path, "rb") as file:
            before = file.read()
        result = subprocess.run([sys.executable, os.path.join(HERE, "broker.py"), "--port", "0", "--db", path],
                                capture_output=True, text=True, timeout=TIMEOUT)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr.count("\n"), 1)
        self.assertIn("is not a broker.py database", result.stderr)
        with open(path, "rb") as file:
            self.assertEqual(file.read(), before)
        self.assertEqual(sorted(os.listdir(folder.name)), ["app.db"])

    def small_disk(self, size="2m"):
        """A real, tiny filesystem (tmpfs) this test can fill up."""
        folder = tempfile.mkdtemp()
        self.addCleanup(os.rmdir, folder)
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder],
                                 capture_output=True, text=True)
        if mounted.returncode != 0:
            self.skip_unless_ci(f"needs root to mount a tmpfs: {mounted.stderr.strip()}")
        self.addCleanup(subprocess.run, ["umount", "-l", folder], check=True)
        return folder

    def skip_unless_ci(self, reason):
        if os.environ.get("CI"):
            self.fail(reason)
        self.skipTest(reason)

    def test_read_only_database_gives_503_and_recovers(self):
        # Root writes any file, so the broker runs as nobody, from a copy nobody can read.
        if os.geteuid() != 0:
            self.skip_unless_ci("needs root to run the broker as another user")
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        os.chmod(folder.name, 0o777)
        shutil.copy(os.path.join(HERE, "broker.py"), folder.name)
        db = os.path.join(folder.name, "broker.db")
        with Broker(db=db, port=0, quiet=True) as first:
            first.publish("before", 1)
        os.chmod(db, 0o444)
        python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
        try:
            process = subprocess.Popen([python, os.path.join(folder.name, "broker.py"), "--port", "0", "--db", db,
                                        "--quiet"], stdout=subprocess.PIPE, user="nobody")
        except (OSError, KeyError) as error:         # no such user, or a Python it may not run
            self.skip_unless_ci(f"cannot run {python} as nobody: {error}")
        self.addCleanup(process.wait)
        self.addCleanup(process.terminate)
        self.addCleanup(process.stdout.close)
        url = process.stdout.readline().decode().split()[3]
        read_only = Remote(url)
        status, body, _ = insert(read_only, {"event": "during", "data": 2})
        self.assertEqual((status, body), (503, {"error": "the database refused the write: attempt to write a readonly database"}))
        with EventStream(read_only) as reader:              # reading goes on
            self.assertEqual([r["data"] for r in reader.read_sync()[0]], [1])
        for name in os.listdir(folder.name):                # the -wal and -shm files too
            os.chmod(os.path.join(folder.name, name), 0o666)
        status, record, _ = insert(read_only, {"event": "after", "data": 3})
        self.assertEqual((status, record["data"]), (200, 3))
        self.assertEqual(call(read_only, "GET", "/audit/during")[1], {})

    def test_reads_keep_working_at_the_file_size_limit_and_writes_recover(self):
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        db = os.path.join(folder.name, "broker.db")
        process, server = run_broker_process(self, "--db", db)
        self.assertEqual(insert(server, {"event": "w", "data": 1})[0], 200)
        limit = min(os.path.getsize(db + suffix) for suffix in ("", "-wal"))
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (limit, hard))    # as a full quota does (EFBIG)
        for size in (100, 500000, 100):          # the later ones reopen the file first
            status, body, _ = insert(server, {"event": "w", "data": "x" * size})
            self.assertEqual(status, 503)
            self.assertIn("the database refused the write", body["error"])
            self.assert_reads_work(server, "w", [1])
        resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (soft, hard))
        status, record, _ = insert(server, {"event": "w", "data": 2})
        self.assertEqual(status, 200)
        self.assert_reads_work(server, "w", [1, 2])

    def assert_reads_work(self, server, event, history):
        with EventStream(server) as reader:
            records, _ = reader.read_sync()
        self.assertEqual([r["data"] for r in records if r["event"] == event], history[-1:])
        status, versions, _ = call(server, "GET", f"/audit/{event}")
        self.assertEqual((status, list(versions.values())), (200, history))
        with EventStream(server, headers={"Last-Event-ID": "0"}) as reader:
            records, _ = reader.read_sync()
        self.assertEqual([r["data"] for r in records if r["event"] == event], history)

    def test_full_disk_gives_503_and_recovers(self):
        folder = self.small_disk()
        disk = start_broker(type(self), db=os.path.join(folder, "broker.db"))
        self.addCleanup(disk.stop)
        stream = EventStream(disk)
        self.addCleanup(stream.close)
        stream.read_sync()
        filler = os.path.join(folder, "filler")
        with open(filler, "wb") as file:
            try:
                while True:
                    file.write(b"\0" * 65536)
                    file.flush()
            except OSError:
                pass                                     # the disk is full now
        statuses = [insert(disk, {"event": "fill", "data": "x" * 20000})[0] for _ in range(5)]
        self.assertIn(503, statuses)
        refused = disk.hub.newest
        self.assert_reads_work(disk, "fill", ["x" * 20000] * statuses.count(200))
        os.remove(filler)
        status, record, _ = insert(disk, {"event": "after", "data": 1})
        self.assertEqual(status, 200)
        received = stream.read_message()
        while received["event"] == "fill":               # those stored before the disk filled
            self.assertLessEqual(received["id"], refused)
            received = stream.read_message()
        self.assertEqual(received["id"], record["id"])
        self.assertEqual(len(disk.audit("fill")), statuses.count(200))


class MemoryTests(unittest.TestCase):
    """Records of about 1 MB (the default --max-body): a slow reader of a resume, an audit or a
    live stream that fell behind costs the broker about one page, however far behind it is."""
    RECORDS = 60
    DATA = "x" * 1000000
    GROWTH_MIB = 40

    def start(self):
        process, server = run_broker_process(self, "--db", new_db(type(self)), "--sync", "normal", "--write-timeout", "60")
        self.publish_many(server, self.RECORDS)
        return process, server

    def publish_many(self, server, count):
        connection = http.client.HTTPConnection(*address(server), timeout=TIMEOUT * 4)
        self.addCleanup(connection.close)
        for _ in range(count):
            connection.request("POST", "/insert", json.dumps({"event": "big", "data": self.DATA}),
                               {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            self.assertEqual(response.status, 200)

    def slow_reader(self, server, request):
        """A socket that asked for request and reads 64 KiB every 0.1 s from a small buffer."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.settimeout(TIMEOUT)
        sock.connect(address(server))
        self.addCleanup(sock.close)
        sock.sendall(request)
        return sock

    def growth_while_reading(self, process, readers, seconds=3.0):
        """The broker's largest RSS growth while readers read slowly, in MiB; and bytes read."""
        start = rss_mib(process.pid)
        peak, received = start, 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for sock in readers:
                received += len(sock.recv(65536))
            peak = max(peak, rss_mib(process.pid))
            time.sleep(0.1)
        return peak - start, received

    def test_slow_resumes_of_large_records(self):
        process, server = self.start()
        readers = [self.slow_reader(server, b"GET /events HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 0\r\n\r\n")
                   for _ in range(3)]
        growth, received = self.growth_while_reading(process, readers)
        self.assertGreater(received, 3 * 65536)
        self.assertLess(growth, self.GROWTH_MIB)

    def test_slow_audits_of_large_records(self):
        process, server = self.start()
        readers = [self.slow_reader(server, b"GET /audit/big HTTP/1.1\r\nHost: x\r\n\r\n") for _ in range(2)]
        growth, received = self.growth_while_reading(process, readers)
        self.assertGreater(received, 2 * 65536)
        self.assertLess(growth, self.GROWTH_MIB)

    def test_live_subscribers_catching_up_from_the_database(self):
        process, server = self.start()
        readers = [self.slow_reader(server, b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n") for _ in range(4)]
        wait_until(lambda: subscribers(server) == 4)
        self.publish_many(server, 40)       # 40 MB: past the ring, so they catch up from the database
        growth, received = self.growth_while_reading(process, readers)
        self.assertGreater(received, 4 * 65536)
        self.assertLess(growth, self.GROWTH_MIB)
        self.assertEqual(subscribers(server), 4)


class FramingTests(unittest.TestCase):
    """Where one request ends: bodies on methods that take none, Transfer-Encoding, Expect, HEAD."""

    @classmethod
    def setUpClass(cls):
        cls.broker = start_broker(cls, max_body=65536)

    def test_a_body_on_a_method_that_takes_none_never_becomes_a_request(self):
        for method, path in [("GET", "/healthz"), ("HEAD", "/healthz"), ("OPTIONS", "/insert"),
                             ("GET", "/audit/x"), ("DELETE", "/insert")]:
            with self.subTest(method=method, path=path):
                name = unique_event(self)
                hidden = insert_request(name, "smuggled")
                response = raw(self.broker, f"{method} {path} HTTP/1.1\r\nHost: x\r\n"
                                            f"Content-Length: {len(hidden)}\r\n\r\n".encode() + hidden
                               + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                self.assertNotIn(name.encode(), response)
                self.assertEqual(response.count(b"HTTP/1.1 "), 2)      # the request's and the next one's
                self.assertEqual(self.broker.audit(name), {})

    def test_transfer_encoding_is_refused_on_every_method_and_the_connection_closed(self):
        for method, path in [("GET", "/healthz"), ("POST", "/insert"), ("GET", "/events")]:
            with self.subTest(method=method):
                name = unique_event(self)
                hidden = insert_request(name, "smuggled")
                response = raw(self.broker, f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                            "Transfer-Encoding: chunked\r\n\r\n".encode()
                               + b"%x\r\n%s\r\n0\r\n\r\n" % (len(hidden), hidden) + hidden)
                self.assertEqual(status_of(response), 411)
                self.assertIn(b"Connection: close", response)
                self.assertEqual(response.count(b"HTTP/1.1 "), 1)
                self.assertEqual(self.broker.audit(name), {})

    def test_100_continue_is_sent_only_to_a_request_that_passed_its_checks(self):
        for headers, status in [("Content-Type: text/plain\r\nContent-Length: 20", 415),
                                ("Content-Type: application/json\r\nContent-Length: 70000", 413)]:
            with self.subTest(status=status), socket.create_connection(address(self.broker), timeout=TIMEOUT) as sock:
                sock.sendall(f"POST /insert HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n{headers}\r\n\r\n".encode())
                response = sock.recv(65536)
                self.assertEqual(status_of(response), status)
        with socket.create_connection(address(self.broker), timeout=TIMEOUT) as sock:
            request = insert_request(unique_event(self), 1)
            head, body = request.split(b"\r\n\r\n", 1)
            sock.sendall(head + b"\r\nExpect: 100-continue\r\n\r\n")
            self.assertEqual(sock.recv(65536), b"HTTP/1.1 100 Continue\r\n\r\n")
            sock.sendall(body)
            self.assertEqual(status_of(sock.recv(65536)), 200)

    def test_head_is_answered_as_get_without_a_body(self):
        self.broker.publish("head", 1)
        for path, content_type in [("/events", "text/event-stream"), ("/healthz", "application/json"),
                                   ("/audit/head", "application/json")]:
            with self.subTest(path=path):
                response = raw(self.broker, f"HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                head, _, body = response.partition(b"\r\n\r\n")
                self.assertEqual(status_of(response), 200)
                self.assertIn(f"Content-Type: {content_type}".encode(), head)
                self.assertEqual(body, b"")
        self.assertEqual(subscribers(self.broker), 0)

    def test_http_0_9_request_is_400(self):
        response = raw(self.broker, b"GET /healthz\r\n")
        self.assertEqual(status_of(response), 400)
        self.assertIn("Bad request syntax", body_of(response)["error"])


class FuzzTests(unittest.TestCase):
    """Seeded random requests: every answer is well-formed HTTP, the server stays up, and
    nothing invalid is stored."""
    SEED = 20261129
    STATUS_LINE = re.compile(rb"^HTTP/1\.[01] ([2-5][0-9][0-9]) [^\r\n]*\r\n")
    INTERIM = re.compile(rb"^HTTP/1\.1 100 [^\r\n]*\r\n\r\n")
    PIECES = [b'"', b"{", b"}", b"[", b"]", b",", b":", b"NaN", b"-Infinity", b"1e999", b'"\\ud800"', b"\\u0000",
              b"\x00", b"\x7f", b"\xff", b"\xc3", "é".encode(), b'"event"', b'"data"', b"null", b"\n", b" ", b"0"]

    @classmethod
    def setUpClass(cls):
        cls.broker = start_broker(cls, max_body=4096, request_timeout=2)
        cls.random = random.Random(cls.SEED)

    def answer(self, request):
        """The final response's status and bytes (after any 100 Continue; a stream's head only)."""
        response = b""
        with socket.create_connection(address(self.broker), timeout=TIMEOUT) as sock:
            sock.sendall(request)
            while True:
                data = sock.recv(65536)
                response += data
                while self.INTERIM.match(response):
                    response = self.INTERIM.sub(b"", response, count=1)
                head = response.split(b"\r\n\r\n", 1)[0]
                if not data or (b"\r\n\r\n" in response and b"text/event-stream" in head):
                    break
        match = self.STATUS_LINE.match(response)
        self.assertIsNotNone(match, f"not an HTTP response to {request[:80]!r}: {response[:80]!r}")
        return int(match.group(1)), response

    def mutated_body(self):
        body = bytearray(json.dumps({"event": self.random.choice(["fuzz", "fuzz.a", "", "f" * 256]),
                                     "data": self.random.choice([1, "x", [1, 2], {"k": None}])}).encode())
        for _ in range(self.random.randint(0, 4)):
            position = self.random.randint(0, len(body))
            if self.random.random() < 0.5:
                body[position:position] = self.random.choice(self.PIECES)
            else:
                del body[position:position + self.random.randint(1, 3)]
        return bytes(body)

    def test_random_insert_bodies(self):
        accepted = 0
        for _ in range(1500):
            body = self.mutated_body()
            content_type = self.random.choice([b"application/json", b"application/json; charset=utf-8", b"text/plain"])
            status, response = self.answer(b"POST /insert HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                           b"Content-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
                                           % (content_type, len(body), body))
            self.assertIn(status, (200, 400, 415))
            if status == 200:
                accepted += 1
            else:
                self.assertIn("error", body_of(response))
        self.assert_only_valid_records_stored(accepted)

    def test_random_request_lines_and_headers(self):
        methods = [b"GET", b"POST", b"PUT", b"HEAD", b"OPTIONS", b"DELETE", b"G\x00T", b"", b"PATCH", b"BREW"]
        paths = [b"/insert", b"/events?event=%ff", b"/audit/%", b"/audit/a%00b", b"/healthz", b"*", b"/" + b"a" * 9000,
                 b"/events?lastEventId=-1&event=", b"/audit/x?since=99999999999999999999999", b"http://[::1/x", b""]
        versions = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1", b"FOO", b""]
        headers = [b"Content-Length: -1", b"Content-Length: abc", b"Transfer-Encoding: gzip", b"X: \xff\xfe",
                   b"no colon here", b"Last-Event-ID: \x00", b"Expect: 100-continue", b"Accept: text/event-stream",
                   b"Authorization: Bearer " + b"a" * 3000, b": empty name", b"Host:"]
        for _ in range(600):
            line = b" ".join(part for part in (self.random.choice(methods), self.random.choice(paths),
                                               self.random.choice(versions)) if part)
            chosen = self.random.sample(headers, self.random.randint(0, 3))
            request = line + b"\r\n" + b"".join(h + b"\r\n" for h in chosen) + b"Connection: close\r\n\r\n"
            status, response = self.answer(request)
            self.assertGreaterEqual(status, 200)
            if status >= 400 and not line.startswith(b"HEAD "):
                self.assertIn(b'{"error":', response)
        self.assertEqual(call(self.broker, "GET", "/healthz")[0], 200)

    def assert_only_valid_records_stored(self, accepted):
        self.assertEqual(call(self.broker, "GET", "/healthz")[0], 200)
        with EventStream(self.broker, headers={"Last-Event-ID": "0"}) as everything:
            records, _ = everything.read_sync()
        self.assertEqual(len(records), accepted)
        self.assertGreater(accepted, 50)          # the mutations leave many bodies valid
        for record in records:
            self.assertEqual(broker.check_event_name(record["event"]), record["event"])
            self.assertEqual(broker.encode_data(record["data"]), json.dumps(record["data"], separators=(",", ":"),
                                                                             ensure_ascii=False))


class LimitTests(unittest.TestCase):
    """Hostile or careless clients: too many, too slow to send, too slow to read."""

    def test_beyond_max_clients_a_browser_is_told_to_retry_and_others_get_503(self):
        limited = start_broker(type(self), max_clients=2)
        streams = [EventStream(limited) for _ in range(2)]
        for stream in streams:
            self.addCleanup(stream.close)
            stream.read_sync()
        with EventStream(limited, headers={"Accept": "text/event-stream"}) as refused:
            self.assertEqual(refused.status, 200)
            self.assertEqual(refused.read_raw_block(), b"retry: 5000")
            with self.assertRaises(EOFError):
                refused.read_raw_block()
        status, body, headers = call(limited, "GET", "/events")
        self.assertEqual((status, headers["Retry-After"]), (503, "5"))
        self.assertIn("too many subscribers", body["error"])
        record = limited.publish("still-served", 1)
        self.assertEqual(streams[0].read_message()["id"], record["id"])
        streams[1].close()
        wait_until(lambda: subscribers(limited) == 1)
        with EventStream(limited) as again:
            self.assertEqual(again.read_sync()[0][-1]["id"], record["id"])

    def test_a_client_sending_its_request_slowly_is_dropped(self):
        patient = start_broker(type(self), request_timeout=0.5)
        slow = socket.create_connection(address(patient), timeout=TIMEOUT)
        self.addCleanup(slow.close)
        started = time.monotonic()
        for byte in itertools.cycle(b"GET /healthz HTTP/1.1\r\nX-Slow: aaaa"):   # a header that never ends
            if select.select([slow], [], [], 0.05)[0]:
                break                                   # the server answered or hung up
            self.assertLess(time.monotonic() - started, 5, "the slow client is still connected")
            slow.send(bytes([byte]))                    # a byte at a time beats any per-read timeout
            self.assertEqual(call(patient, "GET", "/healthz")[0], 200)     # others are served meanwhile
        self.assertGreater(time.monotonic() - started, 0.4)
        try:
            self.assertNotIn(b"200 OK", slow.recv(65536))
        except ConnectionResetError:
            pass

    def test_a_subscriber_that_stops_reading_is_dropped_after_the_write_timeout(self):
        strict = start_broker(type(self), write_timeout=0.5)
        stalled = socket.create_connection(address(strict))
        self.addCleanup(stalled.close)
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        reader = EventStream(strict)
        self.addCleanup(reader.close)
        reader.read_sync()
        wait_until(lambda: subscribers(strict) == 2)
        big = "x" * 100_000
        published = [strict.publish("big", [n, big])["id"] for n in range(40)]   # 4 MB: past its buffers
        self.assertEqual([reader.read_message()["id"] for _ in published], published)
        wait_until(lambda: subscribers(strict) == 1)
        later = strict.publish("after", 1)
        self.assertEqual(reader.read_message()["id"], later["id"])


class AuditTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.broker = start_broker(cls)

    def test_audit_lists_versions_oldest_first(self):
        name = unique_event(self)
        records = [self.broker.publish(name, n) for n in range(3)]
        status, body, headers = call(self.broker, "GET", f"/audit/{name}")
        self.assertEqual(status, 200)
        self.assertEqual(headers["Content-Type"], "application/json")
        self.assertEqual(list(body.items()), [(f"{name}_v_{r['timestamp']}", r["data"]) for r in records])

    def test_audit_matches_the_name_exactly(self):
        name = unique_event(self)
        self.broker.publish(name, "short")
        self.broker.publish(name + "name", "longer")
        self.broker.publish("x" + name, "prefixed")
        status, body, _ = call(self.broker, "GET", f"/audit/{name}")
        self.assertEqual((status, list(body.values())), (200, ["short"]))

    def test_unknown_event_is_an_empty_object(self):
        self.assertEqual(call(self.broker, "GET", f"/audit/{unique_event(self)}")[:2], (200, {}))

    def test_name_is_percent_decoded(self):
        name = unique_event(self, " a/b?é")
        self.broker.publish(name, 1)
        status, body, _ = call(self.broker, "GET", "/audit/" + urllib.parse.quote(name, safe=""))
        self.assertEqual((status, list(body.values())), (200, [1]))

    def test_since_and_limit_page_through_history(self):
        name = unique_event(self)
        records = [self.broker.publish(name, n) for n in range(1203)]   # more than one database page
        pages, since = [], 0
        while True:
            _, body, _ = call(self.broker, "GET", f"/audit/{name}?since={since}&limit=400")
            if not body:
                break
            pages.append(list(body.values()))
            since = int(list(body)[-1].rsplit("_v_", 1)[1])
        self.assertEqual([len(p) for p in pages], [400, 400, 400, 3])
        self.assertEqual(sum(pages, []), list(range(1203)))
        _, everything, _ = call(self.broker, "GET", f"/audit/{name}")
        self.assertEqual(list(everything), [f"{name}_v_{r['timestamp']}" for r in records])

    def test_since_is_exclusive(self):
        name = unique_event(self)
        first = self.broker.publish(name, 1)
        self.broker.publish(name, 2)
        status, body, _ = call(self.broker, "GET", f"/audit/{name}?since={first['timestamp']}")
        self.assertEqual((status, list(body.values())), (200, [2]))

    def test_integers_beyond_64_bits_are_400_or_a_full_sync(self):
        name = unique_event(self)
        self.broker.publish(name, 1)
        for value in ("99999999999999999999", "9223372036854775808", "9" * 5000):
            with self.subTest(digits=len(value)):
                status, body, _ = call(self.broker, "GET", f"/audit/{name}?since={value}")
                self.assertEqual(status, 400)
                self.assertIn("since must be a non-negative integer", body["error"])
                with EventStream(self.broker, f"/events?event={name}", {"Last-Event-ID": value}) as stream:
                    self.assertEqual([r["data"] for r in stream.read_sync()[0]], [1])
        self.assertEqual(call(self.broker, "GET", f"/audit/{name}?since=9223372036854775807")[:2], (200, {}))

    def test_bad_paging_values_are_400(self):
        for query in ("since=-1", "since=abc", "limit=1.5", "limit=", "limit=-3"):
            with self.subTest(query=query):
                status, body, _ = call(self.broker, "GET", f"/audit/user?{query}")
                self.assertEqual(status, 400)
                self.assertIn("must be a non-negative integer", body["error"])

    def test_bad_names_are_400(self):
        for path in ("/audit/", "/audit/%ff", "/audit/a%0Ab"):
            with self.subTest(path=path):
                status, body, _ = call(self.broker, "GET", path)
                self.assertEqual(status, 400)
                self.assertIn("error", body)


class CorsTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.open = start_broker(cls)
        cls.closed = start_broker(cls, origin="https://app.example.com")

    def test_every_response_allows_the_origin(self):
        for path, method in [("/healthz", "GET"), ("/nowhere", "GET"), ("/insert", "GET"), ("/audit/x", "GET")]:
            with self.subTest(path=path):
                _, _, headers = call(self.open, method, path)
                self.assertEqual(headers["Access-Control-Allow-Origin"], "*")
                self.assertIsNone(headers["Vary"])
        stream = EventStream(self.open)
        self.addCleanup(stream.close)
        self.assertEqual(stream.headers["Access-Control-Allow-Origin"], "*")

    def test_configured_origin_varies_by_origin(self):
        _, _, headers = call(self.closed, "GET", "/healthz")
        self.assertEqual(headers["Access-Control-Allow-Origin"], "https://app.example.com")
        self.assertEqual(headers["Vary"], "Origin")

    def test_preflight_on_any_path(self):
        for path in ("/insert", "/events", "/anything"):
            with self.subTest(path=path):
                status, _, headers = call(self.open, "OPTIONS", path)
                self.assertEqual(status, 204)
                self.assertEqual(headers["Access-Control-Allow-Methods"], "GET, POST, OPTIONS")
                self.assertEqual(headers["Access-Control-Allow-Headers"], "Content-Type, Authorization, Last-Event-ID")
                self.assertEqual(headers["Access-Control-Max-Age"], "3600")
                self.assertEqual(headers["Access-Control-Allow-Origin"], "*")


class RoutingTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.broker = start_broker(cls)

    def test_healthz_reports_subscribers_and_last_id(self):
        record = self.broker.publish(unique_event(self), 1)
        status, body, _ = call(self.broker, "GET", "/healthz")
        self.assertEqual(status, 200)
        workers = getattr(self, "WORKERS", 1)
        self.assertEqual(body.pop("worker", None) in range(1, workers + 1), workers > 1)   # which one answered
        self.assertEqual(body, {"status": "ok", "store": "postgresql" if getattr(self, "POSTGRES", None) else "sqlite",
                                "subscribers": 0, "last_id": record["id"], "workers": workers})
        with EventStream(self.broker) as stream:
            stream.read_sync()
            self.assertEqual(call(self.broker, "GET", "/healthz")[1]["subscribers"], 1)

    def test_unknown_path_is_404_json(self):
        status, body, _ = call(self.broker, "GET", "/nowhere")
        self.assertEqual((status, body), (404, {"error": "no such endpoint: /nowhere"}))

    def test_wrong_method_is_405_with_allow(self):
        for method, path, allow in [("GET", "/insert", "POST, OPTIONS"), ("POST", "/events", "GET, HEAD, OPTIONS"),
                                    ("DELETE", "/audit/x", "GET, HEAD, OPTIONS"), ("PUT", "/healthz", "GET, HEAD, OPTIONS")]:
            with self.subTest(method=method, path=path):
                status, body, headers = call(self.broker, method, path)
                self.assertEqual(status, 405)
                self.assertEqual(headers["Allow"], allow)
                self.assertIn(f"{method} is not allowed", body["error"])

    def test_garbled_request_line_is_400_json(self):
        response = raw(self.broker, b"NONSENSE\r\n\r\n")
        self.assertTrue(response.startswith(b"HTTP/1.1 400 "), response)
        self.assertIn("error", body_of(response))

    def test_oversized_header_and_too_many_headers_are_431(self):
        long_line = b"GET /healthz HTTP/1.1\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n"
        many = b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % n for n in range(120)) + b"\r\n"
        for request in (long_line, many):
            response = raw(self.broker, request)
            self.assertEqual(status_of(response), 431)
            self.assertIn("error", body_of(response))

    def test_unparsable_target_is_400(self):
        response = raw(self.broker, b"GET http://[x/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertEqual((status_of(response), body_of(response)), (400, {"error": "the request target is not a valid URL"}))

    def test_server_keeps_serving_after_garbage(self):
        for junk in (b"\x00\x01\x02\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"GET " + b"a" * 70000 + b" HTTP/1.1\r\n\r\n"):
            with self.subTest(junk=junk[:20]):
                self.assertGreaterEqual(status_of(raw(self.broker, junk)), 400)
        self.assertEqual(call(self.broker, "GET", "/healthz")[0], 200)


class StaticTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        folder = tempfile.TemporaryDirectory()
        cls.addClassCleanup(folder.cleanup)
        cls.root = os.path.join(folder.name, "site")
        os.makedirs(os.path.join(cls.root, "sub"))
        with open(os.path.join(cls.root, "index.html"), "w") as file:
            file.write("<h1>home</h1>")
        with open(os.path.join(cls.root, "sub", "page.js"), "w") as file:
            file.write("let x = 1;")
        with open(os.path.join(folder.name, "secret.txt"), "w") as file:
            file.write("TOP-SECRET")
        os.symlink(os.path.join(folder.name, "secret.txt"), os.path.join(cls.root, "link.txt"))
        os.makedirs(os.path.join(cls.root, "linked"))
        os.symlink(os.path.join(folder.name, "secret.txt"), os.path.join(cls.root, "linked", "index.html"))
        cls.broker = start_broker(cls, static=cls.root)

    def fetch(self, path, method="GET"):
        connection = http.client.HTTPConnection(*address(self.broker), timeout=TIMEOUT)
        try:
            connection.request(method, path)
            response = connection.getresponse()
            return response.status, response.getheader("Content-Type"), response.read()
        finally:
            connection.close()

    def test_serves_files_and_index(self):
        self.assertEqual(self.fetch("/"), (200, "text/html; charset=utf-8", b"<h1>home</h1>"))
        status, content_type, body = self.fetch("/sub/page.js")
        self.assertEqual((status, body), (200, b"let x = 1;"))
        self.assertIn("javascript", content_type)

    def test_head_sends_no_body(self):
        self.assertEqual(self.fetch("/index.html", "HEAD"), (200, "text/html; charset=utf-8", b""))

    def test_api_routes_still_win(self):
        self.assertEqual(self.fetch("/healthz")[0], 200)

    def test_never_serves_outside_the_folder(self):
        for path in ("/../secret.txt", "/sub/../../secret.txt", "/%2e%2e/secret.txt", "/..%2fsecret.txt",
                     "/link.txt", "/missing.html", "/%00", "/linked/", "/linked"):
            with self.subTest(path=path):
                response = raw(self.broker, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                self.assertEqual(status_of(response), 404)
                self.assertNotIn(b"TOP-SECRET", response)


class PersistenceTests(unittest.TestCase):
    def test_restart_on_the_same_file_keeps_everything(self):
        db = new_db(type(self))
        with Broker(db=db, port=0, quiet=True) as first:
            a = first.publish("a", 1)
            b = first.publish("b", {"x": 2})
            a2 = first.publish("a", 3)
        with Broker(db=db, port=0, quiet=True) as second:
            self.assertEqual(second.latest(), {"a": 3, "b": {"x": 2}})
            self.assertEqual(list(second.audit("a").values()), [1, 3])
            with EventStream(second) as stream:
                records, cursor = stream.read_sync()
            self.assertEqual([r["id"] for r in records], [b["id"], a2["id"]])
            self.assertEqual(cursor, a2["id"])
            after = second.publish("a", 4)
            self.assertGreater(after["id"], a2["id"])
            self.assertGreater(after["timestamp"], a2["timestamp"])
        self.assertLess(a["id"], b["id"])


class EmbeddingTests(unittest.TestCase):
    def test_context_manager_publish_latest_audit(self):
        with Broker(db=":memory:", port=0, quiet=True) as embedded:
            self.assertRegex(embedded.url, r"^http://127\.0\.0\.1:\d+$")
            self.assertNotEqual(embedded.url.rsplit(":", 1)[1], "0")
            record = embedded.publish("user", {"name": "Ada"})
            self.assertEqual((record["id"], record["event"], record["data"]), (1, "user", {"name": "Ada"}))
            self.assertEqual(embedded.latest(), {"user": {"name": "Ada"}})
            status, body, _ = call(embedded, "GET", "/audit/user")
            self.assertEqual(embedded.audit("user"), body)
            self.assertEqual(status, 200)
        with self.assertRaises(OSError):
            call(embedded, "GET", "/healthz")

    def test_run_serves_in_the_foreground_until_sigterm(self):
        db = temp_db(type(self))
        process = subprocess.Popen([sys.executable, "-c", f"import broker; broker.run(port=0, db={db!r}, quiet=True)"],
                                   cwd=HERE, stdout=subprocess.PIPE)
        self.addCleanup(process.kill)
        self.addCleanup(process.stdout.close)
        url = process.stdout.readline().decode().split()[3]
        self.assertEqual(broker.publish_to(url, "run", 1)["data"], 1)
        self.assertEqual(call(Remote(url), "OPTIONS", "/events")[2]["Access-Control-Allow-Origin"], "*")
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(timeout=5), 0)

    def test_two_brokers_are_independent(self):
        with Broker(db=":memory:", port=0, quiet=True) as one, Broker(db=":memory:", port=0, quiet=True) as two:
            one.publish("only-one", 1)
            self.assertNotEqual(one.url, two.url)
            self.assertEqual(two.latest(), {})
            self.assertEqual(call(two, "GET", "/healthz")[1]["last_id"], 0)

    def test_publish_raises_value_error_with_the_http_message(self):
        with Broker(db=":memory:", port=0, quiet=True) as embedded:
            for event, data in [("", 1), ("ok", float("nan")), (7, 1), ("ok", {1, 2}), ("a\nb", 1)]:
                with self.subTest(event=event, data=data):
                    with self.assertRaises(ValueError) as raised:
                        embedded.publish(event, data)
                    if not isinstance(data, set):
                        status, body, _ = insert(embedded, json.dumps({"event": event, "data": data}).encode())
                        self.assertEqual((status, body["error"]), (400, str(raised.exception)))
            self.assertEqual(embedded.latest(), {})

    def test_stop_is_idempotent_and_start_returns_self(self):
        embedded = Broker(db=":memory:", port=0, quiet=True)
        self.assertIs(embedded.start(), embedded)
        embedded.stop()
        embedded.stop()

    def test_stop_ends_open_streams(self):
        embedded = Broker(db=":memory:", port=0, quiet=True).start()
        stream = EventStream(embedded)
        self.addCleanup(stream.close)
        stream.read_sync()
        embedded.stop()
        with self.assertRaises(EOFError):
            stream.read_block()

    def test_ipv6_host_gets_a_bracketed_url(self):
        try:
            embedded = Broker(host="::1", db=":memory:", port=0, quiet=True).start()
        except OSError as error:
            self.skipTest(f"no IPv6 loopback here: {error}")
        self.addCleanup(embedded.stop)
        self.assertRegex(embedded.url, r"^http://\[::1\]:\d+$")
        self.assertEqual(broker.publish_to(embedded.url, "six", 6)["data"], 6)

    def test_unknown_option_is_a_type_error(self):
        with self.assertRaises(TypeError):
            Broker(colour="blue")

    def test_bad_option_value_is_a_value_error(self):
        with self.assertRaises(ValueError):
            Broker(port=70000)


class ClientTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.broker = start_broker(cls)

    def test_publish_to_returns_the_record(self):
        name = unique_event(self)
        record = broker.publish_to(self.broker.url, name, {"n": 1})
        self.assertEqual((record["event"], record["data"]), (name, {"n": 1}))
        self.assertEqual(self.broker.latest()[name], {"n": 1})

    def test_publish_to_raises_the_server_message(self):
        with self.assertRaises(broker.RequestError) as raised:
            broker.publish_to(self.broker.url, "", 1)
        self.assertEqual((raised.exception.status, raised.exception.message), (400, '"event" must not be empty'))

    def test_subscribe_yields_sync_then_live(self):
        name = unique_event(self)
        first = self.broker.publish(name, 1)
        records = self.broker.subscribe(events=[name], timeout=TIMEOUT)
        self.addCleanup(records.close)
        self.assertEqual(next(records), {"id": first["id"], "event": name, "data": 1})
        second = self.broker.publish(name, 2)
        self.assertEqual(next(records), {"id": second["id"], "event": name, "data": 2})

    def test_subscribe_times_out_when_nothing_comes(self):
        records = broker.subscribe(self.broker.url, events=[unique_event(self)], timeout=0.3)
        self.addCleanup(records.close)
        with self.assertRaises(TimeoutError):
            next(records)

    def test_subscribe_resumes_after_the_server_restarts(self):
        db = temp_db(type(self))
        first = Broker(db=db, port=0, quiet=True).start()
        port = address(first)[1]
        first.publish("a", 1)
        records = broker.subscribe(first.url, timeout=TIMEOUT)
        self.addCleanup(records.close)
        self.assertEqual(next(records)["data"], 1)
        first.publish("a", 2)
        self.assertEqual(next(records)["data"], 2)
        first.stop()
        with Broker(db=db, port=port, quiet=True) as second:
            second.publish("a", 3)
            second.publish("b", 4)
            self.assertEqual([next(records)["data"], next(records)["data"]], [3, 4])

    def test_parser_follows_the_event_stream_rules(self):
        parser = broker.EventStreamParser()
        stream = (b": comment\r\nretry: 1500\r\nid: 7\r\nevent: note\r\ndata: {\"a\":\r\ndata: 1}\r\n\r\n"
                  b"data:no-space\rdata:  two spaces\r\rid: 9\n\nevent: x\ndata: \xc3\xa9\n\n")
        records = []
        for n in range(len(stream)):        # byte by byte: every split point, CR LF halves included
            records += parser.feed(stream[n:n + 1])
        self.assertEqual(records, [
            {"id": 7, "event": "note", "data": {"a": 1}},
            {"id": 7, "event": "message", "data": "no-space\n two spaces"},
            {"id": 9, "event": "x", "data": "é"},
        ])
        self.assertEqual((parser.retry, parser.last_event_id), (1.5, "9"))

    def test_parser_takes_the_last_event_id_only_from_a_complete_record(self):
        parser = broker.EventStreamParser("6")
        self.assertEqual(parser.feed(b'id: 7\nevent: e\ndata: {"v":'), [])
        self.assertEqual(parser.last_event_id, "6")
        self.assertEqual(parser.feed(b'1}\n\nid: 8\n\n'), [{"id": 7, "event": "e", "data": {"v": 1}}])
        self.assertEqual(parser.last_event_id, "8")        # an id-only block moves it too

    def test_subscribe_never_yields_a_record_cut_by_a_drop_and_then_gets_it_whole(self):
        # The client reads nothing for longer than --write-timeout: the broker drops it in the
        # middle of a 97 kB record. It must reconnect from the last whole record.
        with Broker(db=temp_db(type(self)), port=0, quiet=True, write_timeout=0.5, heartbeat=0.2) as server:
            records = server.subscribe(timeout=TIMEOUT)
            self.addCleanup(records.close)
            sent = [server.publish("big", {"n": 0, "pad": "p" * 97000})]
            self.assertEqual(next(records)["data"]["n"], 0)
            sent += [server.publish("big", {"n": n, "pad": "p" * 97000}) for n in range(1, 120)]
            wait_until(lambda: subscribers(server) == 0)        # dropped while not reading
            received = [next(records) for _ in sent[1:]]
        self.assertEqual([(r["id"], r["data"]) for r in received], [(s["id"], s["data"]) for s in sent[1:]])


class ThreadPoolTests(unittest.TestCase):
    def test_idle_threads_are_reused_then_retire(self):
        threads = broker.ThreadPool(idle_seconds=0.3)
        used = []
        for _ in range(20):
            finished = threading.Event()
            threads.submit(lambda: (used.append(threading.current_thread()), finished.set()))
            self.assertTrue(finished.wait(TIMEOUT))
            time.sleep(0.01)              # let the thread report itself idle before the next job
        self.assertLessEqual(len(set(used)), 3)
        wait_until(lambda: not any(thread.is_alive() for thread in used))

    def test_a_job_promised_as_the_idle_wait_ends_still_runs(self):
        threads = broker.ThreadPool(idle_seconds=0.01)
        ran = []
        for n in range(100):              # submit around the moment idle threads give up
            threads.submit(ran.append, n)
            time.sleep(0.001 * (n % 20))
        wait_until(lambda: len(ran) == 100)
        self.assertEqual(sorted(ran), list(range(100)))


class WorkerBroker:
    """python broker.py --workers N in a subprocess, on a real SQLite file; its access log kept.
    Its publish(), publish_many(), audit(), subscribe() and hub.newest go over HTTP, so the
    tests written for an embedded Broker run against it too."""

    def __init__(self, add_cleanup, workers, *args):
        folder = tempfile.TemporaryDirectory()
        add_cleanup(folder.cleanup)
        self.log_path = os.path.join(folder.name, "access.log")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, os.path.join(HERE, "broker.py"), "--port", "0", "--workers", str(workers),
                 "--db", os.path.join(folder.name, "broker.db"), *args], stdout=subprocess.PIPE, stderr=log)
        add_cleanup(self.stop)
        self.line = self.process.stdout.readline().decode()
        self.url = self.line.split()[3]
        self.hub = self
        self.publish_token = self.subscribe_token = self.token = None             # what publish() and audit() send, as an embedded Broker needs none

    @property
    def newest(self):
        """The newest id, from the id-only block of a sync: a sync holds every acknowledged insert."""
        with EventStream(self, "/events?event=-") as stream:
            return stream.read_sync()[1]

    def publish(self, event, data):
        return broker.publish_to(self.url, event, data, token=self.token or self.publish_token)

    def publish_many(self, items):
        return broker.publish_many(self.url, items, token=self.token or self.publish_token)

    def audit(self, event, since=0, limit=None):
        query = urllib.parse.urlencode({"since": since, **({"limit": limit} if limit is not None else {})})
        status, body, _ = call(self, "GET", f"/audit/{urllib.parse.quote(event, safe='')}?{query}",
                               headers=broker.bearer(self.token or self.subscribe_token))
        if status != 200:
            raise broker.RequestError(status, body["error"])
        return body

    def subscribe(self, events=None, last_event_id=None, timeout=None, token=None, match=None):
        return broker.subscribe(self.url, events, last_event_id, timeout, token, match)

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait()
        self.process.stdout.close()

    def worker_pids(self):
        """{worker number: pid} of the running workers, read from /proc."""
        with open(f"/proc/{self.process.pid}/task/{self.process.pid}/children") as file:
            pids = [int(pid) for pid in file.read().split()]
        numbers = {}
        for pid in pids:
            with contextlib.suppress(OSError):       # gone, or a zombie
                with open(f"/proc/{pid}/environ", "rb") as file:
                    seat = [v for v in file.read().split(b"\0") if v.startswith(b"BROKER_WORKER_SEAT=")]
                if seat:                              # else forked, not yet the worker it will run
                    numbers[json.loads(seat[0].split(b"=", 1)[1])["number"]] = pid
        return numbers

    def cpu_seconds(self):
        """User and system CPU of the supervisor and its workers so far."""
        total = 0.0
        for pid in [self.process.pid, *self.worker_pids().values()]:
            with open(f"/proc/{pid}/stat") as file:
                fields = file.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total


def streams_on_every_worker(server, workers, path="/events", headers=None):
    """Open /events streams until each of the workers serves one; return them all."""
    streams, seen = [], set()
    for _ in range(200):
        stream = EventStream(server, path, headers)
        streams.append(stream)
        seen.add(stream.headers["Broker-Worker"])
        if len(seen) == workers:
            return streams
    raise AssertionError(f"200 streams landed on workers {sorted(seen)} only")


def publishers_on_every_worker(server, workers):
    """Keep-alive connections, one on each worker (known by the Broker-Worker header)."""
    found = {}
    for _ in range(200):
        connection = http.client.HTTPConnection(*address(server), timeout=TIMEOUT)
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        number = json.loads(response.read())["worker"]
        if number in found:
            connection.close()
        else:
            found[number] = connection
        if len(found) == workers:
            return found
    raise AssertionError(f"200 connections landed on workers {sorted(found)} only")


class WorkersTests(unittest.TestCase):
    """python broker.py --workers 3: one broker of several processes, the contract unchanged."""

    @classmethod
    def setUpClass(cls):
        cls.broker = WorkerBroker(cls.addClassCleanup, 3)

    def test_prints_one_line_once_every_worker_is_ready(self):
        self.assertRegex(self.broker.line, r"^broker listening on http://127\.0\.0\.1:\d+ \(db .*broker\.db, 3 workers\)\n$")
        self.assertEqual(sorted(self.broker.worker_pids()), [1, 2, 3])

    def test_connections_land_on_several_workers_and_say_which(self):
        streams = streams_on_every_worker(self.broker, 3)
        try:
            status, health, headers = call(self.broker, "GET", "/healthz")
            self.assertEqual((health["workers"], str(health["worker"])), (3, headers["Broker-Worker"]))
            self.assertGreaterEqual(health["subscribers"], len(streams))    # every worker's streams
        finally:
            for stream in streams:
                stream.close()
        with open(self.broker.log_path) as log:
            served_by = set(re.findall(r"^127\.0\.0\.1 worker-(\d) - \[.*\] \"GET /events", log.read(), re.M))
        self.assertEqual(served_by, {"1", "2", "3"})

    def test_publishers_and_subscribers_on_every_worker_get_every_record_once_in_order(self):
        name = unique_event(self)
        streams = streams_on_every_worker(self.broker, 3, f"/events?match={name}*")
        publishers = publishers_on_every_worker(self.broker, 3)
        acknowledged = []

        def publish(number, connection):
            for n in range(20):
                connection.request("POST", "/insert", json.dumps({"event": f"{name}-{number}", "data": n}),
                                   {"Content-Type": "application/json"})
                response = connection.getresponse()
                acknowledged.append(json.loads(response.read())["id"])

        threads = [threading.Thread(target=publish, args=item) for item in publishers.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(len(set(acknowledged)), 60)
        for stream in streams:
            with stream:
                self.assertEqual(stream.read_sync()[0], [])
                received = [stream.read_message() for _ in range(60)]
                self.assertEqual([r["id"] for r in received], sorted(acknowledged))
                for number in publishers:
                    self.assertEqual([r["data"] for r in received if r["event"] == f"{name}-{number}"], list(range(20)))
        for connection in publishers.values():
            connection.close()

    def test_resume_on_another_worker_sends_only_newer_records(self):
        name = unique_event(self)
        first = insert(self.broker, {"event": name, "data": 1})[1]
        with EventStream(self.broker, f"/events?event={name}") as stream:
            self.assertEqual(stream.read_sync()[0][0]["id"], first["id"])
            served_by = stream.headers["Broker-Worker"]
        later = [insert(self.broker, {"event": name, "data": n})[1]["id"] for n in range(2, 6)]
        for _ in range(200):
            stream = EventStream(self.broker, f"/events?event={name}", {"Last-Event-ID": str(first["id"])})
            with stream:
                if stream.headers["Broker-Worker"] != served_by:
                    records, _ = stream.read_sync()
                    self.assertEqual([r["id"] for r in records], later)
                    return
        self.fail("no stream landed on another worker")

    def test_a_sync_anywhere_holds_what_any_worker_acknowledged_before(self):
        name = unique_event(self)
        publishers = publishers_on_every_worker(self.broker, 3)
        idle = []                         # connected beforehand, so a GET follows an answer at once
        for _ in range(60):
            sock = socket.create_connection(address(self.broker), timeout=TIMEOUT)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            idle.append((json.loads(sock.recv(65536).split(b"\r\n\r\n", 1)[1])["worker"], sock))
        synced_by = set()
        for n in range(30):
            number, connection = list(publishers.items())[n % 3]
            elsewhere = next(item for item in idle if item[0] != number)
            idle.remove(elsewhere)
            connection.request("POST", "/insert", json.dumps({"event": name, "data": n}),
                               {"Content-Type": "application/json"})
            self.assertEqual(connection.getresponse().read()[:6], b'{"id":')
            with EventStream(self.broker, f"/events?event={name}", sock=elsewhere[1]) as stream:
                self.assertEqual([r["data"] for r in stream.read_sync()[0]], [n])
                synced_by.add(stream.headers["Broker-Worker"])
        self.assertGreater(len(synced_by), 1)
        self.assertEqual(sorted(call(self.broker, "GET", f"/audit/{name}")[1].values()), list(range(30)))
        for connection in publishers.values():
            connection.close()
        for _, sock in idle:
            sock.close()

    def test_a_bad_insert_is_refused_by_any_worker_and_nothing_is_stored(self):
        name = unique_event(self)
        for _ in range(6):
            status, body, _ = insert(self.broker, [{"event": name, "data": 1}, {"event": "", "data": 2}])
            self.assertEqual((status, body["error"][:7]), (400, "item 1:"))
        self.assertEqual(call(self.broker, "GET", f"/audit/{name}")[1], {})


class WorkerLifeTests(unittest.TestCase):
    """Workers that die, a supervisor that stops, options refused before any worker starts."""

    def test_a_killed_worker_is_replaced_and_its_streams_resume_on_the_others(self):
        server = WorkerBroker(self.addCleanup, 3)
        name = unique_event(self)
        streams = streams_on_every_worker(server, 3, f"/events?event={name}")
        for stream in streams:
            stream.read_sync()
        victim = streams[-1].headers["Broker-Worker"]
        old_pid = server.worker_pids()[int(victim)]
        sent = [insert(server, {"event": name, "data": n})[1]["id"] for n in range(5)]
        delivered = metric(server, "broker_records_delivered_total")
        os.kill(old_pid, signal.SIGKILL)
        wait_until(lambda: not os.path.exists(f"/proc/{old_pid}"))     # reaped: its sockets are closed
        sent += [insert(server, {"event": name, "data": n})[1]["id"] for n in range(5, 30)]    # meanwhile
        for stream in streams:
            with stream:
                received = []
                try:
                    while len(received) < 30:
                        received.append(stream.read_message()["id"])
                except (EOFError, ConnectionResetError):
                    self.assertEqual(stream.headers["Broker-Worker"], victim)
                    self.assertEqual(received, sent[:len(received)])
                    with EventStream(server, f"/events?event={name}",
                                     {"Last-Event-ID": str(received[-1] if received else sent[0] - 1)}) as again:
                        received += [r["id"] for r in again.read_sync()[0]]
                self.assertEqual(received, sent)
        wait_until(lambda: call(server, "GET", "/healthz")[1]["workers"] == 3, timeout=10)
        self.assertNotEqual(server.worker_pids().get(int(victim)), old_pid)
        self.assertGreaterEqual(metric(server, "broker_records_delivered_total"), delivered)   # kept, not reset
        with open(server.log_path) as log:
            self.assertRegex(log.read(), rf"worker {victim} was killed by SIGKILL; starting another in [\d.]+ s")

    def test_workers_killed_one_by_one_under_load_lose_nothing_and_repeat_nothing(self):
        server = WorkerBroker(self.addCleanup, 3, "--quiet")
        name = unique_event(self)
        acknowledged, stop = [], threading.Event()

        def publish():
            connection = None
            for n in itertools.count():
                if stop.is_set():
                    return
                try:
                    connection = connection or http.client.HTTPConnection(*address(server), timeout=TIMEOUT)
                    connection.request("POST", "/insert", json.dumps({"event": name, "data": n}),
                                       {"Content-Type": "application/json"})
                    response = connection.getresponse()
                    body = json.loads(response.read())
                    if response.status == 200:
                        acknowledged.append(body["id"])
                except (OSError, http.client.HTTPException, ValueError):
                    connection = None          # its worker died: a new connection lands on another

        def read(got, last):            # live from the start, through every kill, until the last insert
            for record in server.subscribe(events=[name], timeout=TIMEOUT * 2):
                got.append(record["id"])
                if last and got[-1] >= last[0]:
                    return

        received, last = [[] for _ in range(4)], []
        readers = [threading.Thread(target=read, args=(got, last)) for got in received]
        for thread in readers:
            thread.start()
        wait_until(lambda: call(server, "GET", "/healthz")[1]["subscribers"] == 4)
        publishers = [threading.Thread(target=publish) for _ in range(3)]
        for thread in publishers:
            thread.start()
        for number in (1, 2, 3, 1):
            wait_until(lambda: number in server.worker_pids(), timeout=10)
            time.sleep(0.3)
            os.kill(server.worker_pids()[number], signal.SIGKILL)
        time.sleep(0.3)
        stop.set()
        for thread in publishers:
            thread.join()
        last.append(max(acknowledged))
        server.publish(name, "last")     # a reader that has everything already ends on this one
        for thread, got in zip(readers, received):
            thread.join(TIMEOUT * 3)
            self.assertEqual(got, sorted(set(got)))           # in order, nothing twice
            self.assertEqual(set(acknowledged) - set(got), set())

    def test_a_worker_that_keeps_dying_is_restarted_ever_more_slowly(self):
        server = WorkerBroker(self.addCleanup, 2)
        for _ in range(3):
            pid = server.worker_pids()[2]
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: server.worker_pids().get(2, pid) != pid, timeout=10)
        with open(server.log_path) as log:
            delays = re.findall(r"worker 2 was killed by SIGKILL; starting another in ([\d.]+) s", log.read())
        self.assertEqual(delays, ["0.1", "0.2", "0.4"])
        self.assertEqual(call(server, "GET", "/healthz")[0], 200)

    def test_a_stuck_worker_holds_up_the_others_no_longer_than_the_link_timeout(self):
        server = WorkerBroker(self.addCleanup, 2)
        publishers = publishers_on_every_worker(server, 2)
        publishers[2].close()
        connection = publishers[1]
        connection.sock.settimeout(broker.LINK_TIMEOUT + TIMEOUT)     # without the link timeout: forever
        stuck = server.worker_pids()[2]
        os.kill(stuck, signal.SIGSTOP)              # it reads no commit: the writer's sends fill its link
        self.addCleanup(lambda: stuck in server.worker_pids().values() and os.kill(stuck, signal.SIGCONT))
        for n in range(40):
            connection.request("POST", "/insert", json.dumps({"event": "big", "data": "x" * 65536}),
                               {"Content-Type": "application/json"})
            self.assertEqual(connection.getresponse().read()[:6], b'{"id":')
        connection.close()
        os.kill(stuck, signal.SIGCONT)              # it finds its link closed, stops, and is replaced
        wait_until(lambda: server.worker_pids().get(2, stuck) != stuck, timeout=10)
        wait_until(lambda: call(server, "GET", "/healthz")[1]["workers"] == 2)

    def test_sigterm_stops_every_worker_and_exits_0(self):
        server = WorkerBroker(self.addCleanup, 3)
        pids = list(server.worker_pids().values())
        stream = EventStream(server)
        self.addCleanup(stream.close)
        server.process.send_signal(signal.SIGTERM)
        self.assertEqual(server.process.wait(timeout=15), 0)
        for pid in pids:
            self.assertFalse(os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z")

    def test_the_supervisor_killed_mid_insert_loses_nothing_acknowledged_and_its_workers_stop(self):
        server = WorkerBroker(self.addCleanup, 2)
        pids = list(server.worker_pids().values())
        acknowledged, answers = [], []

        def publish(connection):
            for n in itertools.count():
                try:
                    connection.request("POST", "/insert", json.dumps({"event": "kill", "data": n}),
                                       {"Content-Type": "application/json"})
                    response = connection.getresponse()
                    body = json.loads(response.read())
                except (OSError, http.client.HTTPException, ValueError):
                    return
                if response.status != 200:
                    answers.append((response.status, body["error"]))
                    return
                acknowledged.append(body["id"])

        threads = [threading.Thread(target=publish, args=(connection,))
                   for connection in publishers_on_every_worker(server, 2).values()]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(acknowledged) > 200)
        server.process.kill()
        for thread in threads:
            thread.join(TIMEOUT)
        wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in pids), timeout=10)
        with contextlib.closing(sqlite3.connect(os.path.join(os.path.dirname(server.log_path), "broker.db"))) as db:
            stored = {row[0] for row in db.execute("SELECT id FROM records")}
        self.assertTrue(set(acknowledged) <= stored, set(acknowledged) - stored)
        for status, error in answers:     # an insert caught in flight: 503, and said to be in doubt
            self.assertEqual((status, error[:26]), (503, "the writer process is gone"))

    def test_idle_workers_use_almost_no_cpu(self):
        server = WorkerBroker(self.addCleanup, 4)
        time.sleep(1.0)                  # past start-up
        before, started = server.cpu_seconds(), time.monotonic()
        time.sleep(4.0)
        share = (server.cpu_seconds() - before) / (time.monotonic() - started)
        self.assertLess(share, 0.01)     # of one core, for the supervisor and four workers together

    def test_max_clients_counts_the_streams_of_every_worker(self):
        server = WorkerBroker(self.addCleanup, 2, "--max-clients", "4")
        streams = [EventStream(server) for _ in range(4)]
        self.addCleanup(lambda: [stream.close() for stream in streams])
        self.assertEqual([stream.status for stream in streams], [200] * 4)
        refused_by = set()
        for _ in range(200):
            with EventStream(server) as refused:
                self.assertEqual(refused.status, 503)
                refused_by.add(refused.headers["Broker-Worker"])
            if len(refused_by) == 2:
                break
        self.assertEqual(refused_by, {"1", "2"})
        self.assertEqual(call(server, "GET", "/healthz")[1]["subscribers"], 4)
        streams.pop().close()
        wait_until(lambda: call(server, "GET", "/healthz")[1]["subscribers"] == 3)
        streams.append(EventStream(server))
        self.assertEqual(streams[-1].status, 200)

    def test_a_bad_option_is_one_line_before_any_worker_starts(self):
        for args, message in [(["--workers", "0"], "argument --workers: '0': must be 1 to 256, or auto"),
                              (["--workers", "two"], "argument --workers: 'two':"),
                              (["--workers", "2", "--db", ":memory:"], "argument --workers: needs a database file")]:
            result = subprocess.run([sys.executable, os.path.join(HERE, "broker.py"), "--port", "0", *args],
                                    capture_output=True, timeout=30)
            self.assertEqual(result.returncode, 2)
            self.assertEqual(len(result.stderr.splitlines()), 1)
            self.assertIn(message, result.stderr.decode())

    def test_a_port_in_use_is_refused_even_when_its_holder_shares_it(self):
        server = WorkerBroker(self.addCleanup, 2)       # its workers listen with SO_REUSEPORT
        port = str(urllib.parse.urlsplit(server.url).port)
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        for workers in ("2", "1"):
            result = subprocess.run([sys.executable, os.path.join(HERE, "broker.py"), "--port", port, "--db",
                                     os.path.join(folder.name, "other.db"), "--workers", workers],
                                    capture_output=True, timeout=30)
            self.assertEqual((result.returncode, result.stderr.decode().count("\n")), (1, 1))
            self.assertIn("Address already in use", result.stderr.decode())

    def test_embedding_keeps_one_process(self):
        with self.assertRaisesRegex(ValueError, "command-line feature"):
            Broker(workers=2)
        with Broker(db=":memory:", port=0, quiet=True, workers=1) as server:
            self.assertEqual(call(server, "GET", "/healthz")[1]["workers"], 1)


# The endpoint tests once more, against python broker.py --workers 3 (start_broker() reads WORKERS).
for _tests in (InsertTests, EventsTests, MatchTests, BatchInsertTests, AuditTests, TokenTests, JwtTests,
               CorsTests, RoutingTests, FramingTests, MetricsTests):
    globals()["Worker" + _tests.__name__] = type("Worker" + _tests.__name__, (_tests,), {"WORKERS": 3})
del _tests


class CommandLineTests(unittest.TestCase):
    def run_broker(self, *args, env=None):
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        with open(os.path.join(folder.name, "notes.txt"), "wb") as file:
            file.write(NOT_A_DATABASE)
        process = subprocess.Popen([sys.executable, os.path.join(HERE, "broker.py"), *args],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=folder.name,
                                   env={**os.environ, **(env or {})})
        self.addCleanup(process.kill)
        self.addCleanup(process.stdout.close)
        self.addCleanup(process.stderr.close)
        return process, folder.name

    def test_prints_its_url_and_exits_0_on_sigterm_with_a_stream_open(self):
        process, folder = self.run_broker("--port", "0")
        line = process.stdout.readline().decode()
        self.assertRegex(line, r"^broker listening on http://127\.0\.0\.1:\d+ \(db \./tmp/broker\.db\)\n$")
        url = line.split()[3]
        self.assertTrue(os.path.exists(os.path.join(folder, "tmp", "broker.db")))
        status, record = self.insert_via(url)
        self.assertEqual(status, 200)
        stream = socket.create_connection(urllib.parse.urlsplit(url)[1].split(":"), timeout=TIMEOUT)
        self.addCleanup(stream.close)
        stream.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"200 OK", stream.recv(65536))
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(timeout=5), 0)
        self.assertLess(time.monotonic() - started, 2.5)

    def insert_via(self, url):
        parts = urllib.parse.urlsplit(url)
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=TIMEOUT)
        try:
            connection.request("POST", "/insert", json.dumps({"event": "cli", "data": 1}),
                               {"Content-Type": "application/json"})
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    def test_access_log_never_shows_an_access_token(self):
        process, _ = self.run_broker("--port", "0", "--subscribe-token", "tok-12345")
        url = process.stdout.readline().decode().split()[3]
        parts = urllib.parse.urlsplit(url)
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=TIMEOUT)
        connection.request("GET", "/audit/user?access_token=tok-12345&limit=1")
        response = connection.getresponse()
        response.read()
        self.assertEqual(response.status, 200)
        connection.request("GET", "/index.html?token=tok-12345")
        connection.getresponse().read()
        for query in ("access_tok%65n=tok-12345", "x=1&access%5Ftoken=tok-12345"):
            connection.request("GET", f"/audit/user?{query}")      # read as access_token: accepted
            response = connection.getresponse()
            response.read()
            self.assertEqual(response.status, 200)
        connection.close()
        raw(Remote(url), b"GET /\x1b[31mred\rfake HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(timeout=5), 0)
        log = process.stderr.read().decode()
        self.assertIn("/audit/user?access_token=[redacted]&limit=1", log)
        self.assertIn("/index.html?token=[redacted]", log)
        self.assertIn("/audit/user?access_tok%65n=[redacted]", log)
        self.assertIn("/audit/user?x=1&access%5Ftoken=[redacted]", log)
        self.assertNotIn("tok-12345", log)
        self.assertIn("GET /\\x1b[31mred\\x0dfake HTTP/1.1", log)
        self.assertNotIn("\x1b", log)

    def test_environment_sets_options_and_flags_win(self):
        process, folder = self.run_broker("--db", "flag.db", env={"BROKER_DB": "env.db", "PORT": "0"})
        self.assertIn("(db flag.db)", process.stdout.readline().decode())
        process.send_signal(signal.SIGINT)
        self.assertEqual(process.wait(timeout=5), 0)
        self.assertTrue(os.path.exists(os.path.join(folder, "flag.db")))
        self.assertFalse(os.path.exists(os.path.join(folder, "env.db")))

    def test_help_documents_every_flag(self):
        output = subprocess.run([sys.executable, os.path.join(HERE, "broker.py"), "--help"],
                                capture_output=True, text=True, timeout=TIMEOUT).stdout
        for name, env, *_ in broker.OPTIONS:
            self.assertIn("--" + name.replace("_", "-"), output)
            if env:
                self.assertIn(env, output)

    def test_bad_values_are_one_line_errors_with_exit_2(self):
        a_file = os.path.join(HERE, "broker.py")
        for args, env, complaint in [
            (["--port", "70000"], {}, "--port"),
            (["--port", "http"], {}, "--port"),
            (["--heartbeat", "-1"], {}, "--heartbeat"),
            (["--max-body", "0"], {}, "--max-body"),
            (["--sync", "sometimes"], {}, "--sync"),
            (["--db", os.path.join(a_file, "sub", "x.db")], {}, "--db"),
            (["--static", "/no/such/folder"], {}, "--static"),
            ([], {"PORT": "eighty"}, "PORT"),
            (["--no-such-flag"], {}, "unrecognized"),
        ]:
            with self.subTest(args=args, env=env):
                result = subprocess.run([sys.executable, a_file, *args], capture_output=True, text=True,
                                        timeout=TIMEOUT, env={**os.environ, **env})
                self.assertEqual(result.returncode, 2)
                self.assertEqual(result.stdout, "")
                self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
                self.assertIn(complaint, result.stderr)

    def test_a_file_that_is_not_a_database_is_refused_untouched(self):
        process, folder = self.run_broker("--port", "0", "--db", "notes.txt")
        self.assertEqual(process.wait(timeout=5), 1)
        self.assertEqual(process.stderr.read().decode(), "broker.py: error: notes.txt is not an SQLite database; refusing to touch it\n")
        with open(os.path.join(folder, "notes.txt"), "rb") as file:
            self.assertEqual(file.read(), NOT_A_DATABASE)

    def test_port_in_use_is_an_error(self):
        with Broker(db=":memory:", port=0, quiet=True) as taken:
            process, _ = self.run_broker("--port", str(address(taken)[1]))
            self.assertEqual(process.wait(timeout=5), 1)
            self.assertIn("Address already in use", process.stderr.read().decode())


if __name__ == "__main__":
    unittest.main()
