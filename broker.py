#!/usr/bin/env python3
"""broker.py - a real-time, zero-code API server on the Python standard library alone.

    python broker.py                      # serve on http://127.0.0.1:8080, db ./tmp/broker.db
    curl -N localhost:8080/events         # listen: the latest of every event, then live
    curl localhost:8080/insert -H 'Content-Type: application/json' \\
         -d '{"event": "user", "data": {"name": "Ada"}}'

    from broker import Broker             # or embed it, e.g. in a test harness
    with Broker(db=":memory:", port=0) as b: b.publish("user", {"name": "Ada"})

Endpoints: POST /insert, GET /events, GET /audit/{event}, GET /healthz, GET /metrics. Python 3.9+.

In file order: OPTIONS and small helpers (JSON, validation, JWT); Record and EventFilter; the
stores: Store (what both share: group commit), then SQLiteStore, the SQLite file (one write
connection, read connections, pages bounded in bytes), and PostgresStore, one database for several
nodes (ids in commit order from a counter row, a follower thread for the other nodes' commits), and
open_store(); Hub, the newest id and a ring of recent records encoded once; BodyWriter, a body sent
with blocking writes; StreamCounts and Fanout, the one thread writing every live stream; Pruner,
history retention; Watchdog and ThreadPool (request deadlines, reused threads); Metrics (and
SharedMetrics, one row per process), for GET /metrics; Server; HTTPHandler, HTTP without the
broker, and Handler, the endpoints; Broker, what main() and embedding programs use; the processes
of --workers (Link, CommitLink in a worker, CommitServer in the supervisor, SharedStreamCounts,
Supervisor); the client (publish_to, subscribe, EventStreamParser); main() and run().
"""
__all__ = ["Broker", "RequestError", "main", "publish_many", "publish_to", "run", "subscribe"]

import argparse
import base64
import bisect
import codecs
import collections
import contextlib
import fcntl
import fnmatch
import functools
import hashlib
import hmac
import http.client
import http.server
import json
import marshal
import math
import mimetypes
import mmap
import os
import queue
import re
import resource
import select
import selectors
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import typing
import urllib.parse


def port_number(text):
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError("must be 0 to 65535")
    return port


def positive_number(convert):
    def positive(text):
        value = convert(text)
        if not value > 0:
            raise ValueError("must be greater than 0")
        return value
    positive.__name__ = f"positive {convert.__name__}"
    return positive


def sync_mode(text):
    if text.lower() not in ("full", "normal"):
        raise ValueError("must be full or normal")
    return text.lower()


def worker_count(text):
    if str(text).lower() == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    count = int(text)
    if not 1 <= count <= MAX_WORKERS:
        raise ValueError(f"must be 1 to {MAX_WORKERS}, or auto")
    return count


# Every setting, once: flags, environment and Broker(**kwargs) all read this table.
#   name               env var                   default            convert                     help
OPTIONS = [
    ("host",            "HOST",                   "127.0.0.1",       str,                        "address to bind (0.0.0.0 to expose)"),
    ("port",            "PORT",                   8080,              port_number,                "port; 0 picks a free one"),
    ("db",              "BROKER_DB",              "./tmp/broker.db", str,                        "SQLite file (:memory: keeps nothing), or postgresql://user:password@host:port/dbname"),
    ("origin",          "BROKER_ORIGIN",          "*",               str,                        "the CORS origin allowed"),
    ("heartbeat",       "BROKER_HEARTBEAT",       15.0,              positive_number(float),     "seconds of silence before a keep-alive comment"),
    ("max_body",        "BROKER_MAX_BODY",        1048576,           positive_number(int),       "largest accepted /insert body, in bytes"),
    ("static",          "BROKER_STATIC",          None,              str,                        "also serve this folder's files at / (GET/HEAD)"),
    ("sync",            "BROKER_SYNC",            "full",            sync_mode,                  "full: an insert survives power loss; normal: only a crash"),
    ("request_timeout", "BROKER_REQUEST_TIMEOUT", 10.0,              positive_number(float),     "seconds a client may take to send a request"),
    ("write_timeout",   "BROKER_WRITE_TIMEOUT",   30.0,              positive_number(float),     "seconds a subscriber may read nothing before it is dropped"),
    ("max_clients",     "BROKER_MAX_CLIENTS",     None,              positive_number(int),       "most open /events streams (default: what the open-file limit allows)"),
    ("publish_token",   "BROKER_PUBLISH_TOKEN",   None,              str,                        "POST /insert needs Authorization: Bearer <this>"),
    ("subscribe_token", "BROKER_SUBSCRIBE_TOKEN", None,              str,                        "/events and /audit need it (or ?access_token=)"),
    ("jwt_secret",      "BROKER_JWT_SECRET",      None,              str,                        "accept HS256 JWTs signed with this; their claims say which events"),
    ("keep_versions",   "BROKER_KEEP_VERSIONS",   None,              positive_number(int),       "keep only the newest N versions of each event (default: every one)"),
    ("keep_days",       "BROKER_KEEP_DAYS",       None,              positive_number(float),     "drop versions older than D days (default: never); the latest of each event stays"),
    ("workers",         "BROKER_WORKERS",         1,                 worker_count,               "processes serving the port, auto: one per core (command line only)"),
    ("quiet",           None,                     False,             bool,                       "no access log"),
]

RETRY_MS = 3000            # the reconnect delay a browser is told to use
FULL_RETRY_MS = 5000       # ... and when --max-clients streams are open already
PAGE_BYTES = 256 << 10     # a read for a client holds about this much data (or one larger record)
PAGE_ROWS = 1000           # ... and at most this many rows
RING_RECORDS = 8192        # recent frames kept in memory for the fan-out writer and joining streams
RING_BYTES = 16 << 20      # ... and their size at most (a record may be up to --max-body)
SYNC_CACHE_BYTES = 1 << 20 # a full sync up to this size is kept for the next stream to connect
WRITE_BYTES = 64 << 10     # a sync or an audit goes out in writes of about this size
CATCH_UP_PAGES = 4         # ring pages the fan-out writer sends one lagging stream per turn
PRUNE_ROWS = 2000          # old versions deleted per transaction (about 15 ms), so an insert never waits long
PRUNE_PAUSE = 0.5          # seconds between pruning passes, so a busy broker prunes in batches
MAX_FILTERS = 100          # ?event= and ?match= values per stream (SQLite binds each one)
MAX_BATCH_RECORDS = 1000   # records in one POST /insert array
MAX_EVENT_NAME = 255
CONTROL_CHARS = re.compile("[\x00-\x1f\x7f]")
LINE_END = re.compile("\r\n|\r|\n")
TOKEN_PARAMETERS = ("access_token", "token")                    # ?token= is the demo pages' own
QUERY_PARAMETER = re.compile(r"([?&;])([^=&;\s\"]*)=([^&;\s\"]*)")
LOG_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7f, 0xa0)]}
LOG_ESCAPES[ord("\\")] = "\\\\"
MAX_INT64 = (1 << 63) - 1  # SQLite's largest integer
MAX_WORKERS = 256
LINK_TIMEOUT = 5.0         # seconds a worker or the writer may leave the other's messages unread
INVALID_TOKEN = 'Bearer error="invalid_token"'
NOTHING = re.compile("(?!)")       # the regex of a token that allows no event
NOT_FINITE = "NaN and Infinity are not valid JSON (browsers cannot parse them)"
HTTP_VERSION = re.compile(r"HTTP/(\d{1,10})\.(\d{1,10})")
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")     # RFC 9110 token: no spaces, no colon
MAX_LINE = 65536           # bytes in a request or header line, as http.server allows
MAX_HEADERS = 100


class RequestError(ValueError):
    """A client mistake: raised anywhere, rendered as JSON {"error": message} in one place."""

    def __init__(self, status, message, headers=()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)


class StoreError(Exception):
    """The database cannot do it now (read-only, disk full, unreachable, closing): a 503."""


def now_us():
    return time.time_ns() // 1000


# Built once: json.dumps and json.loads given options build a new encoder or decoder per call.
COMPACT_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
DATA_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def json_bytes(value):
    return COMPACT_JSON.encode(value).encode()


KEEP_ALIVE = b": keep-alive\n\n"
END_OF_STREAM = b"0\r\n\r\n"


def chunk(payload):
    """One HTTP/1.1 chunk; never call it with b"" (an empty chunk ends the response)."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def body_part(payload, chunked):
    """payload as the next piece of a response body: a chunk, or as is for an HTTP/1.0 client."""
    return chunk(payload) if chunked and payload else payload


def check_event_name(name, field='"event"'):
    """Return name if it can be an event name (it goes verbatim into an SSE line), else raise."""
    if not isinstance(name, str):
        raise RequestError(400, f'{field} must be a string')
    if not name:
        raise RequestError(400, f'{field} must not be empty')
    if len(name) > MAX_EVENT_NAME:
        raise RequestError(400, f'{field} must be at most {MAX_EVENT_NAME} characters')
    if CONTROL_CHARS.search(name):
        raise RequestError(400, f'{field} must not hold control characters (U+0000-U+001F, U+007F)')
    if not is_valid_unicode(name):
        raise RequestError(400, f'{field} holds a lone surrogate, which is not valid Unicode')
    return name


def is_valid_unicode(text):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def encode_data(value):
    """Return value as compact JSON text that every browser's JSON.parse accepts."""
    try:
        text = DATA_JSON.encode(value)
    except ValueError:
        raise RequestError(400, NOT_FINITE) from None
    except RecursionError:
        raise RequestError(400, '"data" is nested too deeply') from None
    except TypeError as error:
        raise RequestError(400, f'"data" is not JSON: {error}') from None
    if not is_valid_unicode(text):
        raise RequestError(400, '"data" holds a lone surrogate, which is not valid Unicode')
    return text


def reject_constant(name):
    raise RequestError(400, NOT_FINITE)


def parse_insert(body):
    """Return ([(event, data as compact JSON text)], is_batch) from an /insert body: one object,
    or an array of up to MAX_BATCH_RECORDS of them; or raise RequestError."""
    doc = parse_json_body(body)
    if isinstance(doc, dict):
        return [parse_record(doc)], False
    if not isinstance(doc, list):
        raise RequestError(400, 'body must be a JSON object {"event": ..., "data": ...} or an array of them')
    if len(doc) > MAX_BATCH_RECORDS:
        raise RequestError(400, f"a batch holds at most {MAX_BATCH_RECORDS} records")
    rows = []
    for index, item in enumerate(doc):
        try:
            rows.append(parse_record(item))
        except RequestError as error:
            raise RequestError(400, f"item {index}: {error.message}") from None
    return rows, True


BODY_JSON = json.JSONDecoder(parse_constant=reject_constant)


def parse_json_body(body):
    try:
        doc = BODY_JSON.decode(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise RequestError(400, "body is not valid UTF-8") from None
    except RequestError:
        raise
    except RecursionError:
        raise RequestError(400, "body is nested too deeply") from None
    except ValueError as error:
        raise RequestError(400, f"body is not valid JSON: {error}") from None
    return doc


def parse_record(doc):
    """(event, data as compact JSON text) from one {"event", "data"} object, or raise RequestError."""
    if not isinstance(doc, dict):
        raise RequestError(400, 'must be a JSON object {"event": ..., "data": ...}')
    if "event" not in doc:
        raise RequestError(400, '"event" is missing')
    event = check_event_name(doc["event"])
    if "data" not in doc:
        raise RequestError(400, '"data" is missing')
    check_ignored_keys(doc)
    return event, encode_data(doc["data"])


def check_ignored_keys(doc):
    """Keys besides event and data are ignored, but a lone surrogate in them is still a 400."""
    if len(doc) <= 2:
        return
    try:
        text = json.dumps({key: value for key, value in doc.items() if key not in ("event", "data")},
                          ensure_ascii=False)
    except RecursionError:
        raise RequestError(400, "body is nested too deeply") from None
    if not is_valid_unicode(text):
        raise RequestError(400, "body holds a lone surrogate, which is not valid Unicode")


def int64(text):
    """The non-negative integer text spells, if it fits SQLite's 64 bits; else None."""
    if not (text.isascii() and text.isdigit()):
        return None
    digits = text.lstrip("0") or "0"
    return int(digits) if len(digits) <= 19 and int(digits) <= MAX_INT64 else None   # int() refuses 4,300+ digits


def non_negative_int(text, name):
    value = int64(text)
    if value is None:
        raise RequestError(400, f"{name} must be a non-negative integer of at most 63 bits")
    return value


def redact_tokens(text):
    """text with the value of every ?access_token= and ?token= hidden, however its name is escaped."""
    def hide(match):
        named = urllib.parse.unquote_plus(match[2]) in TOKEN_PARAMETERS      # as parse_qs reads it
        return f"{match[1]}{match[2]}=[redacted]" if named else match[0]
    return QUERY_PARAMETER.sub(hide, text)


def same_secret(given, expected):
    """Compare in constant time (hashing first hides the length too)."""
    return hmac.compare_digest(hashlib.sha256(given.encode()).digest(), hashlib.sha256(expected.encode()).digest())


@functools.lru_cache(maxsize=1024)
def patterns_regex(patterns):
    """One regex for a tuple of shell-style patterns (*, ? and [...]), the one syntax of ?match=
    and of JWT claims; an empty tuple matches nothing."""
    if not patterns:
        return NOTHING
    return re.compile("|".join(fnmatch.translate(pattern) for pattern in patterns))


def sql_match(patterns, event):
    """SQL broker_match(patterns, event): patterns are joined by newlines, which no name holds."""
    return patterns_regex(tuple(patterns.split("\n"))).fullmatch(event) is not None


def b64url_encode(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text):
    if not re.fullmatch("[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_jwt(secret, publish=(), subscribe=(), expires_in=None, now=None):
    """An HS256 JWT whose claims allow publishing and subscribing to these event patterns."""
    now = time.time() if now is None else now
    claims = {"iat": int(now), "broker": {"publish": list(publish), "subscribe": list(subscribe)}}
    if expires_in is not None:
        claims["exp"] = int(now + expires_in)
    signing_input = b64url_encode(json_bytes({"alg": "HS256", "typ": "JWT"})) + "." + b64url_encode(json_bytes(claims))
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64url_encode(signature)


def verify_jwt(token, secret, now=None):
    """{"publish": [...], "subscribe": [...]} from a valid HS256 JWT; RequestError 401 otherwise."""
    def refuse(reason):
        return RequestError(401, f"the bearer token is not valid: {reason}", [("WWW-Authenticate", INVALID_TOKEN)])
    parts = token.split(".")
    if len(parts) != 3:
        raise refuse("not a JWT")
    try:
        header, claims = (json.loads(b64url_decode(part)) for part in parts[:2])
        signature = b64url_decode(parts[2])
    except (ValueError, RecursionError):
        raise refuse("not a JWT") from None
    if not isinstance(header, dict) or header.get("alg") != "HS256":
        raise refuse("alg must be HS256")
    expected = hmac.new(secret.encode(), f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(expected, signature):
        raise refuse("signature does not match")
    if not isinstance(claims, dict):
        raise refuse("claims are not an object")
    now = time.time() if now is None else now
    if not all(is_finite_number(claims.get(name, 0)) for name in ("exp", "nbf")):
        raise refuse("exp and nbf must be numbers")
    if "exp" in claims and now >= claims["exp"]:
        raise refuse("it has expired")
    if "nbf" in claims and now < claims["nbf"]:
        raise refuse("it is not valid yet")
    grants = claims.get("broker")
    return {action: granted_patterns(grants, action) for action in ("publish", "subscribe")}


def is_finite_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def granted_patterns(grants, action):
    """The event-name patterns a token's "broker" claim grants for action; malformed: none."""
    patterns = grants.get(action) if isinstance(grants, dict) else None
    return [p for p in patterns if isinstance(p, str)] if isinstance(patterns, list) else []


class Record(typing.NamedTuple):
    """One stored version of an event; data is its compact JSON text, as stored."""
    id: int
    event: str
    timestamp: int
    data: str

    def to_dict(self):
        return {"id": self.id, "event": self.event, "timestamp": self.timestamp,
                "data": json.loads(self.data)}

    def to_json(self):
        return b'{"id":%d,"event":%s,"timestamp":%d,"data":%s}' % (
            self.id, json_bytes(self.event), self.timestamp, self.data.encode())

    def to_sse(self):
        return b"id: %d\nevent: %s\ndata: %s\n\n" % (self.id, self.event.encode(), self.data.encode())


class EventFilter(typing.NamedTuple):
    """Which events a stream gets: those its ?event= names or its ?match= patterns choose (both
    None: every event), of those its token allows (None: all)."""
    names: typing.Optional[frozenset] = None
    patterns: typing.Optional[tuple] = None
    allowed: typing.Optional[re.Pattern] = None

    def matches(self, event):
        return self.chooses(event) and (self.allowed is None or self.allowed.fullmatch(event) is not None)

    def chooses(self, event):
        if self.names is None and self.patterns is None:
            return True
        return ((self.names is not None and event in self.names)
                or (self.patterns is not None and patterns_regex(self.patterns).fullmatch(event) is not None))

    def is_chosen(self):
        """True when the stream named events or patterns (the database can skip the others)."""
        return self.names is not None or self.patterns is not None


EVERYTHING = EventFilter()


class PendingInsert:
    """An insert request (one record, or a batch stored all or none) waiting for the transaction
    that holds it. records and error are written by the committer before it releases wake."""
    __slots__ = ("rows", "records", "error", "wake")

    def __init__(self, rows):
        self.rows = rows              # [(event, data as JSON text)]
        self.records = self.error = None
        self.wake = threading.Lock()  # held until its batch committed, or until it is to commit next
        self.wake.acquire()


class Store:
    """What both stores share. Group commit: the first caller to find no commit in flight
    becomes the committer and writes, in one transaction, every insert queued so far
    (self._queue and self._committing, guarded by self._queue_lock); the others wait on their
    own wake lock, so a commit wakes only the inserters it holds, and the next one queued, which
    commits next. A store implements _write(rows) -> records and _committed(records), and keeps
    its write connection in self._db (guarded by self._lock) and its idle read connections in
    self._readers (guarded by self._readers_lock).

    Two callbacks: on_commit(records, seconds) after each commit of this process, with the
    seconds it took (the metrics count there); on_records(records) with every record committed,
    by this process or another, in id order (the hub learns of them there)."""

    MAX_BATCH = 1000

    def __init__(self, on_commit=None, on_records=None):
        self._queue_lock = threading.Lock()
        self._queue = []                      # PendingInserts not yet in a transaction
        self._committing = False
        self._on_commit = on_commit or (lambda records, seconds: None)
        self._on_records = on_records or (lambda records: None)
        self._lock = threading.Lock()
        self._db = None                       # the write connection
        self._readers_lock = threading.Lock()
        self._readers = []                    # idle read connections
        self._closed = False

    def close(self):
        with self._lock, self._readers_lock:
            self._closed = True
            if self._db is not None:
                self._db.close()
            for db in self._readers:
                db.close()
            self._readers = []

    def _check_open(self):
        if self._closed:
            raise StoreError("the broker is shutting down")

    def insert(self, event, data):
        """Store one record and return it once the transaction holding it has committed."""
        return self.insert_many([(event, data)])[0]

    def insert_many(self, rows):
        """Store [(event, data)] in one transaction, all or none, with consecutive ids; return
        the records once it has committed."""
        pending = PendingInsert(rows)
        with self._queue_lock:
            self._queue.append(pending)
            leads, self._committing = not self._committing, True
        if not leads:
            pending.wake.acquire()            # its batch committed, or it commits the next one
        if pending.records is None and pending.error is None:
            self._commit_until_done(pending)
        if pending.error:
            raise pending.error
        return pending.records

    def _commit_until_done(self, pending):
        """As the committer: write batches until pending's is done, wake the inserters of each,
        then hand the turn to the next one queued."""
        while pending.records is None and pending.error is None:
            with self._queue_lock:
                batch = self._take_batch()    # others queue up while this batch is written
            self.commit(batch)
            for waiting in batch:
                if waiting is not pending:
                    waiting.wake.release()
        with self._queue_lock:
            if self._queue:
                self._queue[0].wake.release()
            else:
                self._committing = False

    def _take_batch(self):
        """The queued inserts for one transaction: about MAX_BATCH rows, and at least one insert."""
        rows = taken = 0
        while taken < len(self._queue) and (taken == 0 or rows + len(self._queue[taken].rows) <= self.MAX_BATCH):
            rows += len(self._queue[taken].rows)
            taken += 1
        batch, self._queue = self._queue[:taken], self._queue[taken:]
        return batch

    def commit(self, batch):
        """Write batch (PendingInserts) in one transaction; each gets its records or its error.
        Only one thread at a time may call it: records reach subscribers in id order."""
        started = time.perf_counter()
        try:
            records = self._write([row for pending in batch for row in pending.rows])
        except Exception as error:
            if not isinstance(error, StoreError):
                traceback.print_exc()                  # a bug: still answer every waiter
            for pending in batch:
                pending.error = StoreError(str(error))     # one each: every waiter raises its own
            return
        start = 0
        for pending in batch:
            pending.records = records[start:start + len(pending.rows)]
            start += len(pending.rows)
        self._on_commit(records, time.perf_counter() - started)
        self._committed(records)      # still the only committer of this process


class SQLiteStore(Store):
    """The SQLite file: the default store. Knows SQL, knows nothing of HTTP. A worker of
    --workers opens it with writes=False, to read: the supervisor's CommitServer commits for
    every worker, so every commit is this process's or comes through the CommitLink.

    self._lock guards every use of the write connection; inserts are group-committed
    (Store). Reads go through connections of their own (self._readers, guarded by
    self._readers_lock), so they never wait for a commit and keep working while writes fail;
    a :memory: database has only the one connection, so there reads take self._lock too.
    """

    NAME = "sqlite"
    SHARED = False                   # one process commits to it (the supervisor, for workers)
    SCHEMA = """
        CREATE TABLE IF NOT EXISTS records (
            id        INTEGER PRIMARY KEY AUTOINCREMENT,  -- ids are SSE cursors: never reuse one
            event     TEXT NOT NULL,
            timestamp INTEGER NOT NULL,                   -- microseconds, strictly increasing
            data      TEXT NOT NULL                       -- compact JSON
        );
        CREATE UNIQUE INDEX IF NOT EXISTS records_by_event_time ON records (event, timestamp);
        CREATE TABLE IF NOT EXISTS latest (                -- the sync reads this, not the history
            event TEXT PRIMARY KEY,
            id    INTEGER NOT NULL
        ) WITHOUT ROWID;
        CREATE INDEX IF NOT EXISTS latest_by_id ON latest (id);
        CREATE TRIGGER IF NOT EXISTS records_keep_latest AFTER INSERT ON records BEGIN
            INSERT OR REPLACE INTO latest (event, id) VALUES (new.event, new.id);
        END;
    """
    # The latest record of each event as of ?2 whose id is above ?1. The latest table only
    # knows the newest version; an event updated after ?2 is looked up in its history (its
    # versions newer than ?2 are few: they were committed while this sync was being read).
    # CROSS JOIN and l.id keep SQLite reading latest in its id order, never the whole history.
    LATEST_AS_OF = """
        SELECT l.id, r.event, r.timestamp, r.data FROM latest AS l CROSS JOIN records AS r ON r.id = l.id
         WHERE l.id > ?1 AND l.id <= ?2 {filter}
        UNION ALL
        SELECT r.id, r.event, r.timestamp, r.data FROM latest AS l CROSS JOIN records AS r
            ON r.id = (SELECT v.id FROM records AS v WHERE v.event = l.event AND v.id <= ?2
                        ORDER BY v.timestamp DESC LIMIT 1)
         WHERE l.id > ?2 AND r.id > ?1 {filter}
        ORDER BY 1"""
    AFTER = "SELECT id, event, timestamp, data FROM records WHERE id > ?1 AND id <= ?2 {filter} ORDER BY id"
    ROWS_PER_STATEMENT = 300         # rows in one INSERT: 900 parameters, under old SQLite's 999
    IDLE_READERS = 8                 # read connections kept open between reads
    APPLICATION_ID = 0x42726B72      # "Brkr" in the file header: this file is a broker.py database

    def __init__(self, path, sync="full", on_commit=None, on_records=None, writes=True):
        super().__init__(on_commit, on_records)
        self._path, self._sync = path, sync
        self._reopen = False                  # a write failed: the next one starts afresh
        if writes:                            # else none: a worker's writer commits for it
            self._db = self._connect()
            self._last_ts = self._newest_timestamp()

    def _connect(self):
        db = self._open()
        try:
            self._claim_file(db)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self._sync.upper()}")
            db.executescript(self.SCHEMA)
        except (sqlite3.Error, StoreError):
            db.close()
            raise
        return db

    def _open(self):
        db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        db.create_function("broker_match", 2, sql_match, deterministic=True)
        return db

    def _claim_file(self, db):
        """Mark a new database as ours; refuse, before writing anything, one that is not."""
        try:
            application_id = db.execute("PRAGMA application_id").fetchone()[0]
        except sqlite3.DatabaseError as error:
            if "not a database" not in str(error):
                raise
            raise StoreError(f"{self._path} is not an SQLite database; refusing to touch it") from None
        if application_id == self.APPLICATION_ID:
            return
        if application_id != 0 or db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise StoreError(f"{self._path} is not a broker.py database (it holds other data); refusing to touch it")
        db.execute(f"PRAGMA application_id={self.APPLICATION_ID}")

    def newest_id(self):
        with self._reading() as db:
            return db.execute("SELECT max(id) FROM records").fetchone()[0] or 0

    def follow(self, after_id):
        """Every commit is this process's (or comes through a worker's CommitLink): on_records
        gets each as it commits."""

    def _committed(self, records):
        self._on_records(records)     # one committer: in id order

    def _write(self, rows):
        with self._lock:
            if self._closed:
                raise StoreError("the broker is shutting down")
            if self._reopen:
                self._reconnect()
            ts = self._last_ts
            stamped, records = [], []
            for event, data in rows:
                ts = max(now_us(), ts + 1)        # a tie is bumped: timestamps are unique keys
                stamped.append((event, ts, data))
            try:
                self._db.execute("BEGIN IMMEDIATE")
                for start in range(0, len(stamped), self.ROWS_PER_STATEMENT):
                    part = stamped[start:start + self.ROWS_PER_STATEMENT]
                    cursor = self._db.execute("INSERT INTO records (event, timestamp, data) VALUES "
                                              + ",".join(["(?, ?, ?)"] * len(part)), [v for row in part for v in row])
                    first = cursor.lastrowid - len(part) + 1     # one statement's rows take consecutive ids
                    records += [Record(first + n, *row) for n, row in enumerate(part)]
                self._db.execute("COMMIT")
            except BaseException as error:
                self._roll_back()
                if isinstance(error, sqlite3.Error):
                    raise StoreError(f"the database refused the write: {error}") from None
                raise
            self._last_ts = ts
            return records

    def _roll_back(self):
        # A connection that failed to write (disk full, file made read-only) is replaced
        # before the next write: SQLite keeps a file it opened read-only that way for good.
        self._reopen = self._path != ":memory:"
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def _reconnect(self):
        self._db.close()        # first: SQLite would hand the new connection the old file handle
        try:
            self._db = self._connect()
        except (sqlite3.Error, StoreError) as error:
            self._db = self._open()
            raise StoreError(f"the database refused the write: {error}") from None
        self._reopen = False

    def prune_versions(self, events, keep):
        """Delete the oldest versions of each event beyond its newest keep, at most PRUNE_ROWS in
        all; return how many. The newest version, which the sync reads, always stays."""
        return self._delete([(
            "DELETE FROM records WHERE id IN (SELECT id FROM records WHERE event = ?1 AND timestamp <"
            " (SELECT timestamp FROM records WHERE event = ?1 ORDER BY timestamp DESC LIMIT 1 OFFSET ?2)"
            " ORDER BY timestamp LIMIT ?3)", (event, keep - 1)) for event in events])

    def prune_older(self, before_ts):
        """Delete up to PRUNE_ROWS versions older than before_ts that are not the latest of their
        event; return how many. Timestamps grow with ids, so the old ones come first by id."""
        return self._delete([(
            "DELETE FROM records WHERE id IN (SELECT id FROM records WHERE id < coalesce("
            " (SELECT id FROM records WHERE timestamp >= ?1 ORDER BY id LIMIT 1),"
            " (SELECT max(id) + 1 FROM records)) AND id NOT IN (SELECT id FROM latest) ORDER BY id LIMIT ?3)",
            (before_ts, 0))])

    def _delete(self, statements):
        deleted = 0
        with self._lock:
            self._check_open()
            try:
                self._db.execute("BEGIN IMMEDIATE")
                for sql, (first, second) in statements:
                    if deleted < PRUNE_ROWS:
                        deleted += self._db.execute(sql, (first, second, PRUNE_ROWS - deleted)).rowcount
                self._db.execute("COMMIT")
            except sqlite3.Error as error:
                self._roll_back()
                raise StoreError(f"the database refused the write: {error}") from None
        return deleted

    def event_names(self, after=""):
        """A page of the event names above after, in order."""
        return [name for name, in self._page("SELECT event FROM latest WHERE event > ? ORDER BY event", (after,))]

    def size_bytes(self):
        """The database's size on disk (its file and write-ahead log)."""
        if self._path == ":memory:":
            with self._reading() as db:
                return db.execute("PRAGMA page_count").fetchone()[0] * db.execute("PRAGMA page_size").fetchone()[0]
        return sum(os.path.getsize(self._path + suffix) for suffix in ("", "-wal")
                   if os.path.exists(self._path + suffix))

    def latest(self, after_id, upto_id, wants=None):
        """A page of the latest record of each event (of those wants chooses, if given) as of
        upto_id, if its id is above after_id, in id order: the sync is exactly this, however
        inserts run meanwhile. Only the latest table is scanned, never the history."""
        return self._records(self.LATEST_AS_OF, "l.event", after_id, upto_id, wants)

    def after(self, after_id, upto_id, wants=None):
        """A page of the records (of the events wants chooses, if given) with an id in
        (after_id, upto_id], in id order."""
        return self._records(self.AFTER, "event", after_id, upto_id, wants)

    def _records(self, sql, column, after_id, upto_id, wants):
        params, tests = (after_id, upto_id), []      # ?1 and ?2 are the ids
        if wants is not None and wants.names:
            names = tuple(wants.names)
            tests.append(f"{column} IN ({','.join(f'?{n}' for n in range(3, 3 + len(names)))})")
            params += names
        if wants is not None and wants.patterns:
            tests.append(f"broker_match(?{len(params) + 1}, {column})")
            params += ("\n".join(wants.patterns),)
        chosen = wants is not None and wants.is_chosen()
        sql = sql.format(filter=f"AND ({' OR '.join(tests) or '0'})" if chosen else "")
        return [Record(*row) for row in self._page(sql, params)]

    def audit(self, event, since=0, limit=PAGE_ROWS):
        """A page of (timestamp, data) of event's versions after since, oldest first; at most limit rows."""
        return self._page("SELECT timestamp, data FROM records WHERE event = ? AND timestamp > ?"
                          " ORDER BY timestamp", (event, since), min(limit, PAGE_ROWS))

    def _page(self, sql, params, max_rows=PAGE_ROWS):
        """The first rows of sql (data last in each) up to PAGE_BYTES of data, at least one row.

        Every read for a client goes through here, so a reader holds one page at a time,
        however large the records or far behind it is."""
        rows, size = [], 0
        with self._reading() as db:
            try:
                cursor = db.execute(f"{sql} LIMIT {int(max_rows)}", params)
                for row in cursor:
                    rows.append(row)
                    size += len(row[-1])
                    if size >= PAGE_BYTES:
                        break
                cursor.close()
            except sqlite3.Error as error:
                raise StoreError(f"the database cannot be read: {error}") from None
        return rows

    @contextlib.contextmanager
    def _reading(self):
        """A connection to read with: an idle read connection, or a new one."""
        if self._path == ":memory:":
            with self._lock:
                self._check_open()
                yield self._db
            return
        with self._readers_lock:
            self._check_open()
            db = self._readers.pop() if self._readers else None
        if db is None:
            db = self._connect_reader()
        try:
            yield db
        except BaseException:
            db.close()             # it may be mid-statement or broken: never reuse it
            raise
        with self._readers_lock:
            if not self._closed and len(self._readers) < self.IDLE_READERS:
                self._readers.append(db)
                db = None
        if db is not None:
            db.close()

    def _connect_reader(self):
        try:
            db = self._open()
            db.execute("PRAGMA query_only=1")
            db.execute("PRAGMA cache_size=-256")     # KiB: one per concurrent reader, and the OS caches the file too
        except sqlite3.Error as error:
            raise StoreError(f"the database cannot be read: {error}") from None
        return db

    def _newest_timestamp(self):
        row = self._db.execute("SELECT timestamp FROM records ORDER BY id DESC LIMIT 1").fetchone()
        return row[0] if row else 0


class PostgresStore(Store):
    """PostgreSQL, for several broker nodes (processes or machines) on one database: the same
    surface as SQLiteStore, and SQL that differs lives here. psycopg 3 is imported here, and
    only when a postgresql:// URL asks for it.

    Ids and timestamps come from one counter row, which every inserting statement updates
    first: the next insert, on any node, waits for that row until this one has committed. So
    ids are given in commit order without gaps, and no record ever becomes visible below an id
    already seen (with a sequence, 42 could commit before 41, and a reader past 42 would skip
    41). Timestamps follow the database's clock, bumped past the last one given, so they grow
    strictly whatever the nodes' clocks say. Group commit (Store) makes it one round trip per batch.

    Every record reaches on_records in id order, whoever committed it: this node's right after
    they commit (any other node's before them read first), the others' through the follower
    thread, which a NOTIFY wakes (sent by the inserting statement, so it arrives at commit) to
    read id > last from the database, never trusting what a notification says. It also reads
    every FOLLOW_CHECK seconds: notifications are coalesced, and lost while its connection is
    down. self._publish_lock guards self._published and each hand-over to on_records (reads
    and writes run outside it, so a node's inserts and its follower do not take turns).
    self._lock guards the write connection; at most MAX_READERS read connections are in use.
    """

    NAME = "postgresql"
    SHARED = True                    # other processes commit to it: follow() learns of their commits
    TABLES = ("broker_records", "broker_latest", "broker_counter")
    MARK = "broker.py"               # each table's comment: a table without it is not ours
    SCHEMA = [
        """CREATE TABLE IF NOT EXISTS broker_records (
            id        bigint PRIMARY KEY,              -- from broker_counter: SSE cursors, never reused
            event     text COLLATE "C" NOT NULL,
            timestamp bigint NOT NULL,                 -- microseconds, strictly increasing
            data      text NOT NULL,                   -- compact JSON, as stored
            UNIQUE (event, timestamp))""",
        """CREATE TABLE IF NOT EXISTS broker_latest (  -- the sync reads this, not the history
            event text COLLATE "C" PRIMARY KEY,
            id    bigint NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS broker_latest_by_id ON broker_latest (id)",
        """CREATE TABLE IF NOT EXISTS broker_counter ( -- one row: the last id and timestamp given
            one     boolean PRIMARY KEY DEFAULT true CHECK (one),
            last_id bigint NOT NULL,
            last_ts bigint NOT NULL)""",
        "INSERT INTO broker_counter (last_id, last_ts) VALUES (0, 0) ON CONFLICT DO NOTHING",
        "COMMENT ON TABLE broker_records IS 'broker.py'",
        "COMMENT ON TABLE broker_latest IS 'broker.py'",
        "COMMENT ON TABLE broker_counter IS 'broker.py'",
    ]
    # One statement, so one round trip and its own transaction: take n ids and timestamps from
    # the counter (the row stays locked until commit), store the rows, point latest at them,
    # and notify the other nodes, which hear of it once it commits.
    INSERT = """
        WITH taken AS (
            UPDATE broker_counter
               SET last_id = last_id + %(n)s,
                   last_ts = greatest(last_ts + 1, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint) + %(n)s - 1
            RETURNING last_id - %(n)s AS before_id, last_ts - %(n)s AS before_ts),
        batch AS (
            SELECT before_id + r.n AS id, r.event, before_ts + r.n AS timestamp, r.data
              FROM taken, unnest(%(events)s::text[], %(datas)s::text[]) WITH ORDINALITY AS r (event, data, n)),
        stored AS (
            INSERT INTO broker_records (id, event, timestamp, data) SELECT id, event, timestamp, data FROM batch),
        newest AS (
            INSERT INTO broker_latest (event, id) SELECT DISTINCT ON (event) event, id FROM batch ORDER BY event, id DESC
            ON CONFLICT (event) DO UPDATE SET id = excluded.id)
        SELECT before_id, before_ts, pg_notify('broker_records', (before_id + %(n)s)::text) FROM taken"""
    # As SQLiteStore.LATEST_AS_OF: the latest of each event as of upto, if above after.
    LATEST_AS_OF = """
        SELECT l.id, r.event, r.timestamp, r.data FROM broker_latest AS l JOIN broker_records AS r ON r.id = l.id
         WHERE l.id > %(after)s AND l.id <= %(upto)s {filter}
        UNION ALL
        SELECT r.id, r.event, r.timestamp, r.data FROM broker_latest AS l CROSS JOIN LATERAL (
            SELECT v.id, v.event, v.timestamp, v.data FROM broker_records AS v
             WHERE v.event = l.event AND v.id <= %(upto)s ORDER BY v.timestamp DESC LIMIT 1) AS r
         WHERE l.id > %(upto)s AND r.id > %(after)s {filter}
        ORDER BY 1"""
    AFTER = """SELECT id, event, timestamp, data FROM broker_records
                WHERE id > %(after)s AND id <= %(upto)s {filter} ORDER BY id"""
    CHANNEL = "broker_records"
    SCHEMA_LOCK = 0x42726B72         # advisory lock keys: "Brkr", while a node creates the tables
    PRUNE_LOCK = 0x42726B73          # ... and while a node prunes: one at a time
    MAX_READERS = 8                  # read connections in use at once; each is a server process
    FOLLOW_CHECK = 1.0               # seconds the follower waits for a notification before reading anyway
    RETRY_PAUSE = 0.5                # seconds between the follower's attempts to reconnect
    GAP_WAIT = 0.005                 # seconds a commit waits for the follower to pass on the ids before it
    ANSWER_SECONDS = 5.0             # a statement unanswered this long (a frozen server, a silent network)
                                     # has its connection cut: an insert answers well inside --request-timeout
    CONNECT_OPTIONS = {              # unless the URL says otherwise: an insert fails well inside
        "connect_timeout": "3",      # --request-timeout when the server is gone or unreachable
        "tcp_user_timeout": "5000", "keepalives_idle": "10", "keepalives_interval": "5", "keepalives_count": "3",
        "application_name": "broker.py"}

    def __init__(self, url, sync="full", on_commit=None, on_records=None, writes=True):
        super().__init__(on_commit, on_records)
        try:
            import psycopg
        except ImportError:
            raise ImportError('the PostgreSQL store needs psycopg 3: pip install "psycopg[binary]"') from None
        if tuple(int(part) for part in re.findall(r"\d+", psycopg.__version__)[:2]) < (3, 2):
            raise ImportError(f'the PostgreSQL store needs psycopg 3.2 or newer, not {psycopg.__version__}:'
                              ' pip install -U "psycopg[binary]"')
        self._psycopg = psycopg
        self._url, self._sync = url, sync
        self._read_slots = threading.BoundedSemaphore(self.MAX_READERS)
        self._publish_lock = threading.Lock()
        self._passed = threading.Condition(self._publish_lock)     # notified when _published grows
        self._published = None                # the last id passed to on_records; None: not following
        self._deleted = 0                     # rows pruned since the last VACUUM
        self._unanswered = Watchdog(self.ANSWER_SECONDS)
        self._db = self._connect(writes=True)
        self._writer_pid = self._db.info.backend_pid     # the server process whose NOTIFYs are ours
        try:
            self._create_schema(self._db)
        except BaseException:
            self._db.close()
            raise
        if not writes:
            self._db.close()
            self._db = None
        self._unanswered.start()

    def close(self):
        self._unanswered.stop()
        super().close()

    @contextlib.contextmanager
    def _answered_in_time(self, db):
        """Cut db's connection if the statements run inside take over ANSWER_SECONDS: libpq
        would wait for the server as long as TCP keeps the connection up."""
        sock = socket.socket(fileno=os.dup(db.fileno()))     # the same connection: shut down, it ends
        self._unanswered.watch(sock)
        try:
            yield db
        finally:
            self._unanswered.release(sock)
            sock.close()

    def _connect(self, writes=False):
        psycopg = self._psycopg
        try:
            options = psycopg.conninfo.conninfo_to_dict(self._url)
            db = psycopg.connect(**{**self.CONNECT_OPTIONS, **options}, autocommit=True)
            if writes:
                # The INSERT's plan never changes: PostgreSQL would plan it anew each time.
                db.execute("SET plan_cache_mode TO force_generic_plan")
                db.prepare_threshold = 0
            if writes and self._sync == "normal":    # a commit need not wait for the disk: lost only if PostgreSQL crashes
                db.execute("SET synchronous_commit TO off")
        except psycopg.Error as error:
            raise StoreError(f"cannot connect to PostgreSQL at {shown_db(self._url)}: {one_line(error)}") from None
        return db

    def _create_schema(self, db):
        """Create the tables, once, however many nodes start at once; refuse, before writing
        anything, tables of our names that are not ours."""
        try:
            with db.transaction():
                db.execute("SELECT pg_advisory_xact_lock(%s)", (self.SCHEMA_LOCK,))
                for table in self.TABLES:
                    found, mark = db.execute("SELECT to_regclass(%s) IS NOT NULL, obj_description(to_regclass(%s), 'pg_class')",
                                             (table, table)).fetchone()
                    if found and mark != self.MARK:
                        raise StoreError(f"the database at {shown_db(self._url)} has a table {table} that is not"
                                         " broker.py's; refusing to touch it")
                encoding = db.execute("SHOW server_encoding").fetchone()[0]
                if encoding != "UTF8":
                    raise StoreError(f"the database at {shown_db(self._url)} is encoded {encoding}; broker.py needs"
                                     " UTF8 (CREATE DATABASE ... ENCODING 'UTF8')")
                for statement in self.SCHEMA:
                    db.execute(statement)
        except self._psycopg.Error as error:
            raise StoreError(f"cannot set up the database at {shown_db(self._url)}: {one_line(error)}") from None

    def newest_id(self):
        with self._reading() as db:
            return db.execute("SELECT last_id FROM broker_counter").fetchone()[0]

    def follow(self, after_id):
        """From now on, pass on_records every record committed after after_id, by any node, in
        id order."""
        with self._publish_lock:
            self._published = after_id
        threading.Thread(target=self._follow, name="broker-follower", daemon=True).start()

    def _follow(self):
        listener = None
        while not self._closed:
            try:
                if listener is None:
                    listener = self._connect()
                    listener.execute(f"LISTEN {self.CHANNEL}")     # before reading: nothing slips between
                self._catch_up()
                for notice in listener.notifies(timeout=self.FOLLOW_CHECK):
                    if notice.pid != self._writer_pid:
                        break                 # another node's commit (this one's passed on already)
            except Exception as error:
                if not isinstance(error, (self._psycopg.Error, StoreError)):
                    traceback.print_exc()     # a bug: keep following all the same
                if listener is not None:
                    listener.close()
                    listener = None
                time.sleep(self.RETRY_PAUSE)  # the database is down: the next attempt catches up
        if listener is not None:
            listener.close()

    def _catch_up(self):
        """Pass on every record committed after the last passed on, a page at a time, each read
        without holding self._publish_lock (a commit may pass on some of them meanwhile)."""
        while True:
            with self._publish_lock:
                after = self._published
            records = self.after(after, MAX_INT64)
            if not records:
                return
            with self._publish_lock:
                self._pass_on([record for record in records if record.id > self._published])

    def _committed(self, records):
        with self._passed:
            if self._published is None:
                return                        # not following yet
            # Other nodes' commits just before this one go first: the follower, woken by their
            # notifications, is most likely reading them already; else they are read here.
            self._passed.wait_for(lambda: self._published >= records[0].id - 1, self.GAP_WAIT)
            if records[-1].id <= self._published:
                return                        # the follower passed these on too
            try:
                for missing in record_pages(self.after, self._published, records[0].id - 1):
                    self._pass_on(missing)
            except StoreError:
                return                        # unreadable for now: the follower passes them all on
            self._pass_on([record for record in records if record.id > self._published])   # its page may end inside

    def _pass_on(self, records):
        """Hand on_records the records that follow the last passed on (call with
        self._publish_lock held)."""
        if records:
            self._on_records(records)
            self._published = records[-1].id
            self._passed.notify_all()

    def _write(self, rows):
        with self._lock:
            self._check_open()
            if not is_usable(self._db):
                if self._db is not None:
                    self._db.close()
                self._db = self._connect(writes=True)    # or a refusal: the insert is not sent
                self._writer_pid = self._db.info.backend_pid
            try:
                with self._answered_in_time(self._db):
                    before_id, before_ts, _ = self._db.execute(self.INSERT, {
                        "n": len(rows), "events": [event for event, _ in rows], "datas": [data for _, data in rows],
                    }).fetchone()
            except self._psycopg.Error as error:
                raise self._write_error(error) from None
        return [Record(before_id + n, event, before_ts + n, data) for n, (event, data) in enumerate(rows, 1)]

    def _write_error(self, error):
        if self._db.closed or isinstance(error, self._psycopg.OperationalError):
            self._db.close()                  # reconnect before the next write
            return StoreError(f"the database connection failed: {one_line(error)}; the insert may or may not be stored")
        return StoreError(f"the database refused the write: {one_line(error)}")

    def prune_versions(self, events, keep):
        """As SQLiteStore.prune_versions."""
        return self._delete([(
            "DELETE FROM broker_records WHERE id IN (SELECT id FROM broker_records WHERE event = %(first)s"
            " AND timestamp < (SELECT timestamp FROM broker_records WHERE event = %(first)s"
            " ORDER BY timestamp DESC LIMIT 1 OFFSET %(second)s) ORDER BY timestamp LIMIT %(limit)s)",
            (event, keep - 1)) for event in events])

    def prune_older(self, before_ts):
        """As SQLiteStore.prune_older."""
        return self._delete([(
            "DELETE FROM broker_records WHERE id IN (SELECT id FROM broker_records WHERE id < coalesce("
            " (SELECT id FROM broker_records WHERE timestamp >= %(first)s ORDER BY id LIMIT 1),"
            " (SELECT max(id) + 1 FROM broker_records)) AND id NOT IN (SELECT id FROM broker_latest)"
            " ORDER BY id LIMIT %(limit)s)", (before_ts, 0))])

    def _delete(self, statements):
        deleted = 0
        with self._lock:
            self._check_open()
            try:
                if not is_usable(self._db):
                    if self._db is not None:
                        self._db.close()
                    self._db = self._connect(writes=True)
                with self._answered_in_time(self._db), self._db.transaction():
                    if not self._db.execute("SELECT pg_try_advisory_xact_lock(%s)", (self.PRUNE_LOCK,)).fetchone()[0]:
                        return 0              # another node prunes now
                    for sql, (first, second) in statements:
                        if deleted < PRUNE_ROWS:
                            deleted += self._db.execute(sql, {"first": first, "second": second,
                                                              "limit": PRUNE_ROWS - deleted}).rowcount
            except self._psycopg.Error as error:
                self._db.close()
                raise StoreError(f"the database refused the write: {one_line(error)}") from None
        self._deleted += deleted
        if self._deleted >= PRUNE_ROWS:
            self._vacuum()
        return deleted

    def _vacuum(self):
        """Let new rows reuse the space of deleted ones now, not at autovacuum's next visit (a
        minute away, say): once a tenth of the rows left, at least PRUNE_ROWS, were deleted."""
        db = self._connect()                  # not the write connection: inserts go on meanwhile
        try:                                  # (nor a read one: it may take longer than ANSWER_SECONDS)
            rows = db.execute("SELECT reltuples FROM pg_class WHERE oid = 'broker_records'::regclass").fetchone()[0]
            if self._deleted >= rows / 10:
                db.execute("VACUUM (SKIP_LOCKED) broker_records")
                self._deleted = 0
        except self._psycopg.Error as error:
            raise StoreError(f"the database refused to vacuum: {one_line(error)}") from None
        finally:
            db.close()

    def event_names(self, after=""):
        """A page of the event names above after, in order."""
        return [name for name, in self._page("SELECT event FROM broker_latest WHERE event > %(after)s ORDER BY event",
                                             {"after": after}, order="event", size="event")]

    def size_bytes(self):
        """The tables' size on disk, indexes included."""
        with self._reading() as db:
            return int(db.execute("SELECT sum(pg_total_relation_size(t)) FROM unnest(%s::regclass[]) AS t",
                                  (list(self.TABLES),)).fetchone()[0])

    def latest(self, after_id, upto_id, wants=None):
        """As SQLiteStore.latest."""
        return self._records(self.LATEST_AS_OF, "l.event", after_id, upto_id, wants)

    def after(self, after_id, upto_id, wants=None):
        """As SQLiteStore.after."""
        return self._records(self.AFTER, "event", after_id, upto_id, wants)

    def _records(self, sql, column, after_id, upto_id, wants):
        # The database skips the events not chosen when it can: ?match= patterns with [...] are
        # left to write_records, which checks every record it sends anyway.
        params, tests = {"after": after_id, "upto": upto_id}, []
        if wants is not None and wants.names:
            tests.append(f"{column} = ANY(%(names)s)")
            params["names"] = sorted(wants.names)
        likes = [like_pattern(pattern) for pattern in (wants.patterns if wants is not None and wants.patterns else ())]
        if likes and None not in likes:
            tests.append(f"{column} LIKE ANY(%(likes)s)")
            params["likes"] = likes
        chosen = wants is not None and wants.is_chosen() and None not in likes
        sql = sql.format(filter=f"AND ({' OR '.join(tests) or 'false'})" if chosen else "")
        return [Record(*row) for row in self._page(sql, params, order="id")]

    def audit(self, event, since=0, limit=PAGE_ROWS):
        """As SQLiteStore.audit."""
        return self._page("SELECT timestamp, data FROM broker_records WHERE event = %(event)s AND timestamp > %(since)s"
                          " ORDER BY timestamp", {"event": event, "since": since}, order="timestamp",
                          max_rows=min(limit, PAGE_ROWS))

    def _page(self, sql, params, order, size="data", max_rows=PAGE_ROWS):
        """The first rows of sql (ordered by its column order) up to PAGE_BYTES of its column
        size, at least one row: the server counts the bytes, and sends no more."""
        paged = (f"SELECT * FROM (SELECT page.*, sum(octet_length(page.{size})) OVER (ORDER BY page.{order}"
                 f" ROWS UNBOUNDED PRECEDING) - octet_length(page.{size}) AS bytes_before FROM ({sql} LIMIT {int(max_rows)})"
                 f" AS page) AS sized WHERE bytes_before < {PAGE_BYTES} ORDER BY {order}")
        with self._reading() as db:
            return [row[:-1] for row in db.execute(paged, params)]

    @contextlib.contextmanager
    def _reading(self):
        """A connection to read with: an idle one, or a new one, at most MAX_READERS at once."""
        with self._read_slots:
            with self._readers_lock:
                self._check_open()
                db = self._readers.pop() if self._readers else None
            if not is_usable(db):
                if db is not None:
                    db.close()
                db = self._connect()
            try:
                with self._answered_in_time(db):
                    yield db
            except BaseException as error:
                db.close()             # it may be mid-statement or broken: never reuse it
                if isinstance(error, self._psycopg.Error):
                    raise StoreError(f"the database cannot be read: {one_line(error)}") from None
                raise
            with self._readers_lock:
                if not self._closed and not db.closed:
                    self._readers.append(db)
                    db = None
            if db is not None:
                db.close()


def is_usable(db):
    """False for no connection, a closed one, or one the server has written to while it was idle:
    that is its goodbye (PostgreSQL restarting, an idle timeout), so no statement is sent on it."""
    if db is None or db.closed:
        return False
    idle = select.poll()              # not select(): a busy broker's descriptors pass 1024
    idle.register(db.fileno(), select.POLLIN)
    return not idle.poll(0)


def is_postgres_url(db):
    return db.startswith(("postgresql://", "postgres://"))


def open_store(db, sync="full", on_commit=None, on_records=None, writes=True):
    """The store --db names: PostgreSQL for a postgresql:// URL, else an SQLite file (or :memory:)."""
    return (PostgresStore if is_postgres_url(db) else SQLiteStore)(db, sync, on_commit, on_records, writes)


def shown_db(db):
    """--db as printed and logged: a URL's password hidden."""
    if not is_postgres_url(db):
        return db
    return re.sub(r"(password=)[^&]*", r"\1***", re.sub(r"^(\w+://[^:@/]*):[^@/]*@", r"\1:***@", db))


def one_line(error):
    return " ".join(str(error).split())


def like_pattern(pattern):
    """A ?match= pattern as SQL LIKE, or None if it has a [...], which LIKE lacks."""
    if "[" in pattern:
        return None
    return "".join({"*": "%", "?": "_", "%": "\\%", "_": "\\_", "\\": "\\\\"}.get(c, c) for c in pattern)


class Frame(typing.NamedTuple):
    id: int
    event: str
    data: bytes        # the record's SSE message, encoded once for every stream


class Hub:
    """Committed records on their way to subscribers.

    self.changed guards newest, closed, quiet, the count of waiters and the ring of recent
    frames. The committer notifies it after each commit (publish; not while quiet, when only
    a waiter in wait_until() would care) and Broker.stop() after close(); the fan-out writer
    and wait_until() wait on it.
    """

    def __init__(self, newest_id):
        self.changed = threading.Condition()
        self.newest = newest_id
        self.closed = False
        self.quiet = False          # set by the fan-out writer while it has no stream to write
        self._waiting = 0           # threads in wait_until()
        self._ring = collections.deque()
        self._ring_bytes = 0
        self._floor = newest_id     # records up to here may be missing from the ring
        self._sync = (None, None)   # (newest id, (the full sync's messages then, how many))

    def publish(self, records):
        frames = [Frame(r.id, r.event, r.to_sse()) for r in records]
        with self.changed:
            for frame in frames:
                self._ring.append(frame)
                self._ring_bytes += len(frame.data)
            while len(self._ring) > RING_RECORDS or self._ring_bytes > RING_BYTES:
                evicted = self._ring.popleft()
                self._ring_bytes -= len(evicted.data)
                self._floor = evicted.id
            self.newest = frames[-1].id
            if not self.quiet or self._waiting:
                self.changed.notify_all()

    def close(self):
        with self.changed:
            self.closed = True
            self.changed.notify_all()

    def wait_until(self, newest_id, timeout=LINK_TIMEOUT):
        """Wait until newest reaches newest_id (committed by another worker, and on its way to
        this one); return newest."""
        with self.changed:
            self._waiting += 1
            self.changed.wait_for(lambda: self.newest >= newest_id or self.closed, timeout)
            self._waiting -= 1
            return self.newest

    def cached_sync(self, newest):
        """(the full sync's messages as of newest, how many), if a stream built them already."""
        with self.changed:
            return self._sync[1] if self._sync[0] == newest else None

    def cache_sync(self, newest, messages):
        with self.changed:
            if newest == self.newest:
                self._sync = (newest, messages)

    def covers(self, cursor):
        """True if every record after cursor is in the ring (call with self.changed held)."""
        return cursor >= self._floor

    def frames_after(self, cursor, upto, max_bytes=PAGE_BYTES):
        """The first frames in (cursor, upto], about max_bytes of them (None: all), or None if
        some have left the ring (call with self.changed held)."""
        if not self.covers(cursor):
            return None
        newer = []
        for frame in reversed(self._ring):
            if frame.id <= cursor:
                break
            if frame.id <= upto:
                newer.append(frame)
        if max_bytes is None:
            return newer[::-1]
        page, size = [], 0
        while newer and size < max_bytes:
            page.append(newer.pop())
            size += len(page[-1].data)
        return page


class BodyWriter:
    """A response body of unknown length on a blocking socket: small pieces gathered into one
    chunk (or raw bytes for an HTTP/1.0 client) per write of about WRITE_BYTES, the head going
    out with the first; a piece that large goes out as it is, never copied into a chunk."""

    def __init__(self, sock, chunked, head=b"", head_only=False):
        self.sock, self.chunked, self.head_only = sock, chunked, head_only
        self.started = False          # some bytes went out: no other response can be sent now
        self._owed = head             # bytes due before the next ones: the head, a chunk's end
        self._parts, self._size = [], 0

    def write(self, payload):
        if not payload or self.head_only:
            return
        if len(payload) < WRITE_BYTES:
            self._parts.append(payload)
            self._size += len(payload)
            if self._size >= WRITE_BYTES:
                self.flush()
            return
        self.flush()
        if self.chunked:
            self._send(b"%x\r\n" % len(payload))
            self._send(payload)
            self._owed = b"\r\n"
        else:
            self._send(payload)

    def flush(self):
        self._send(self._take_parts())

    def end(self):
        self._send(self._take_parts() + (END_OF_STREAM if self.chunked and not self.head_only else b""))

    def _take_parts(self):
        data, self._parts, self._size = b"".join(self._parts), [], 0
        return body_part(data, self.chunked)

    def _send(self, data):
        data, self._owed = self._owed + data, b""
        if data:
            self.started = True
            self.sock.sendall(data)


class Subscriber:
    """One /events socket owned by the fan-out writer; only the writer's thread touches it.

    cursor is the id of the last record handed to the socket (or in pending, the unsent end
    of the last payload). A subscriber whose socket is full keeps no queue: it is skipped
    until it can write again, then catches up from its cursor.
    """
    __slots__ = ("sock", "fd", "wants", "chunked", "encoding", "cursor", "pending", "last_write", "stuck_since")

    def __init__(self, sock, wants, chunked, cursor):
        self.sock, self.fd, self.wants, self.chunked, self.cursor = sock, sock.fileno(), wants, chunked, cursor
        self.encoding = (wants, chunked)     # streams with equal encodings get the same bytes
        self.pending = None
        self.last_write = time.monotonic()
        self.stuck_since = None


class StreamCounts:
    """How many /events streams are open, and the limit on them (--max-clients). In one
    process, a count guarded by self._lock; SharedStreamCounts adds up every worker's."""

    def __init__(self, limit):
        self.limit = limit
        self._lock = threading.Lock()
        self._open = 0

    def open(self):
        """Count a new stream, unless limit streams are open already; return whether it was."""
        with self._lock:
            if self._open >= self.limit:
                return False
            self._open += 1
            return True

    def close(self):
        with self._lock:
            self._open -= 1

    def total(self):
        return self._open

    def workers(self):
        return 1


class Fanout:
    """The one thread that writes live records to every /events socket.

    A connection thread writes the headers and the sync, then hands its socket over (join);
    from then on only this thread writes it, non-blocking, so a stalled reader stalls nobody.
    This thread reads the database only when it has itself fallen behind the ring: a stream
    that has is handed to a connection thread (submit) to catch up, then joins again.
    self._joining is guarded by hub.changed; self._owned is only ever changed by single set
    operations (atomic); the rest belongs to the writer thread. streams counts the open streams.
    """

    def __init__(self, hub, store, heartbeat, write_timeout, submit, metrics, streams):
        self.hub = hub
        self.store = store
        self.metrics = metrics
        self.streams = streams
        self.heartbeat = heartbeat
        self.write_timeout = write_timeout
        self._submit = submit         # runs a function on a connection thread
        self._joining = []
        self._owned = set()           # sockets handed over, so the server must not close them
        self._subs = {}               # fd -> Subscriber
        self._behind = set()          # Subscribers waiting for their socket to take more
        self._sent = hub.newest       # every record up to here went to every subscriber not behind
        self._selector = selectors.DefaultSelector()
        self._thread = threading.Thread(target=self._run, name="broker-fanout", daemon=True)

    def start(self):
        self._thread.start()

    def join(self, timeout=None):
        self._thread.join(timeout)

    def owns(self, sock):
        return sock in self._owned

    def catch_up_and_join(self, sock, body, wants, cursor):
        """On a connection thread: write (blocking, a page at a time) the records committed after
        cursor until the ring holds the rest, then hand sock over. False if the broker stopped."""
        while True:
            body.flush()
            if self.join_stream(sock, wants, body.chunked, cursor):
                return True
            if self.hub.closed:
                body.end()
                return False
            with self.hub.changed:
                newest = self.hub.newest
            for records in record_pages(self.store.after, cursor, newest, wants):
                self.metrics.add("broker_records_delivered_total", write_records(body, records, wants))
            cursor = newest

    def join_stream(self, sock, wants, chunked, cursor):
        """Hand sock over once the ring holds every record after cursor; else return False."""
        with self.hub.changed:
            if self.hub.closed or not self.hub.covers(cursor):
                return False
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._owned.add(sock)
            self._joining.append(Subscriber(sock, wants, chunked, cursor))
            self.hub.changed.notify_all()
            return True

    def _run(self):
        next_check = time.monotonic() + self._check_interval()
        while True:
            with self.hub.changed:
                self.hub.quiet = not self._subs     # with no stream to write, a commit need not wake this thread
                if self.hub.newest <= self._sent and not self._joining and not self.hub.closed:
                    self.hub.changed.wait(self._wait_time(next_check))
                if self.hub.closed:
                    break
                newest = self.hub.newest
                batch = self.hub.frames_after(self._sent, newest, max_bytes=None) if self._subs else []   # one write
                joining, self._joining = self._joining, []
            now = time.monotonic()
            if batch is None:
                self._broadcast_from_store(newest, now)
            else:
                if batch:
                    self._broadcast(batch, now)
                self._sent = newest
            for sub in joining:
                self._add(sub, now)
            self._poll(now)
            if now >= next_check:
                self._check_idle_and_stuck(now)
                next_check = now + self._check_interval()
        self._close_all()

    def _check_interval(self):
        return min(self.heartbeat / 4, self.write_timeout / 4, 1.0)

    def _wait_time(self, next_check):
        # Sockets are polled between waits: often while some stream is behind, else for hang-ups.
        if self._behind:
            return 0.02
        return max(0.0, min(next_check - time.monotonic(), 0.5))

    def _broadcast_from_store(self, newest, now):
        # This thread fell so far behind that the ring moved on: the database has every record,
        # and every stream that is not behind needs the same ones.
        try:
            for records in record_pages(self.store.after, self._sent, newest):
                self._broadcast([Frame(r.id, r.event, r.to_sse()) for r in records], now)
                self._sent = records[-1].id
        except StoreError:
            time.sleep(0.1)     # unreadable for now (or closing): try again, not in a busy loop

    def _broadcast(self, frames, now):
        payloads = {}     # encoded once per distinct (EventFilter, chunked) in this batch
        last_id, delivered = frames[-1].id, 0
        for sub in list(self._subs.values()):
            if sub in self._behind:
                continue      # it catches up from its cursor when its socket can take more
            encoded = payloads.get(sub.encoding)
            if encoded is None:
                encoded = payloads[sub.encoding] = self._encode(frames, sub)
            sub.cursor = last_id
            if encoded[0]:
                self._send(sub, encoded[0], now)
                delivered += encoded[1]
        self.metrics.add("broker_records_delivered_total", delivered)

    @staticmethod
    def _encode(frames, sub):
        """(the frames sub wants as one piece of its body, how many records that is)."""
        chosen = frames if sub.wants == EVERYTHING else [f for f in frames if sub.wants.matches(f.event)]
        return body_part(b"".join(f.data for f in chosen), sub.chunked), len(chosen)

    def _add(self, sub, now):
        self._subs[sub.fd] = sub
        self._selector.register(sub.sock, selectors.EVENT_READ, sub)
        self._fall_behind(sub, now)      # its cursor may be before self._sent: catch up first
        self._catch_up(sub, now)

    def _send(self, sub, payload, now):
        """Write payload, or as much as the socket takes; keep the rest as sub.pending."""
        try:
            written = sub.sock.send(payload)
        except BlockingIOError:
            written = 0
        except OSError:
            self._drop(sub)
            return
        if written:
            sub.last_write = now
            sub.stuck_since = None
        if written < len(payload):
            sub.pending = memoryview(payload)[written:]
            if sub.stuck_since is None:
                sub.stuck_since = now
            self._fall_behind(sub, now)

    def _fall_behind(self, sub, now):
        if sub not in self._behind:
            self._behind.add(sub)
            self._selector.modify(sub.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, sub)

    def _catch_up(self, sub, now):
        """Send what sub missed while its socket was full, a page at a time from the ring, until
        it is level, full again, or has had CATCH_UP_PAGES (the others wait meanwhile)."""
        for _ in range(CATCH_UP_PAGES):
            if sub.pending is not None:
                pending, sub.pending = sub.pending, None
                self._send(sub, pending, now)
            if sub.pending is not None or self._subs.get(sub.fd) is not sub:
                return        # full again (wait until it can take more), or dropped
            if sub.cursor >= self._sent:
                self._behind.discard(sub)
                self._selector.modify(sub.sock, selectors.EVENT_READ, sub)
                return
            with self.hub.changed:
                frames = self.hub.frames_after(sub.cursor, self._sent)
            if frames is None:
                self._hand_off(sub)
                return
            sub.cursor = frames[-1].id
            payload, count = self._encode(frames, sub)
            if payload:
                self._send(sub, payload, now)
                self.metrics.add("broker_records_delivered_total", count)

    def _hand_off(self, sub):
        """sub fell behind the ring: a connection thread catches it up from the database, so
        this thread never waits on a read for one stream while the others wait on it."""
        del self._subs[sub.fd]
        self._behind.discard(sub)
        self._selector.unregister(sub.sock)       # still in self._owned: the server must not close it
        self._submit(self._rejoin, sub.sock, sub.wants, sub.chunked, sub.cursor)

    def _rejoin(self, sock, wants, chunked, cursor):
        joined = False
        try:
            sock.settimeout(self.write_timeout)        # blocking now; dropped if it stalls that long
            joined = self.catch_up_and_join(sock, BodyWriter(sock, chunked), wants, cursor)
        except socket.timeout:
            self.metrics.add("broker_streams_dropped_total")
        except (OSError, StoreError):
            pass
        if not joined:
            self._drop_socket(sock)

    def _poll(self, now):
        for key, mask in self._selector.select(0):
            sub = key.data
            if self._subs.get(sub.fd) is not sub:
                continue      # dropped earlier in this loop
            if mask & selectors.EVENT_READ and not self._still_connected(sub):
                self._drop(sub)
            elif mask & selectors.EVENT_WRITE:
                self._catch_up(sub, now)

    def _still_connected(self, sub):
        try:
            return sub.sock.recv(4096) != b""   # a client has nothing to say; EOF means gone
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False

    def _check_idle_and_stuck(self, now):
        for sub in list(self._subs.values()):
            if sub.stuck_since is not None and now - sub.stuck_since >= self.write_timeout:
                self._drop(sub)            # it resumes by id if it ever reads again
                self.metrics.add("broker_streams_dropped_total")
            elif sub not in self._behind and now - sub.last_write >= self.heartbeat:
                self._send(sub, body_part(KEEP_ALIVE, sub.chunked), now)

    def _drop(self, sub):
        if self._subs.get(sub.fd) is sub:
            del self._subs[sub.fd]
            self._behind.discard(sub)
            self._selector.unregister(sub.sock)
            self._drop_socket(sub.sock)

    def _drop_socket(self, sock):
        self._owned.discard(sock)
        sock.close()
        self.streams.close()

    def _close_all(self):
        for sub in list(self._subs.values()):
            if sub.chunked and sub not in self._behind:
                try:
                    sub.sock.send(END_OF_STREAM)
                except OSError:
                    pass
            self._drop(sub)
        with self.hub.changed:
            joining, self._joining = self._joining, []
        for sub in joining:
            self._drop_socket(sub.sock)
        self._selector.close()


class Pruner:
    """Deletes old versions in the background (--keep-versions, --keep-days), PRUNE_ROWS per
    transaction and a pass at most every PRUNE_PAUSE seconds, so inserts never wait long.
    self._lock guards self._touched, the events inserted since the last pass."""

    def __init__(self, store, keep_versions, keep_days, metrics):
        self.store, self.keep_versions, self.keep_days, self.metrics = store, keep_versions, keep_days, metrics
        self._lock = threading.Lock()
        self._touched = set()
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="broker-pruner", daemon=True)

    def start(self):
        if self.keep_versions or self.keep_days:
            self._thread.start()

    def stop(self):
        self._stopped = True
        self._wake.set()

    def note(self, records):
        """Called after each commit: these events may now hold more versions than they keep."""
        if self.keep_versions:
            with self._lock:
                self._touched.update(record.event for record in records)
        if self.keep_versions or self.keep_days:
            self._wake.set()

    def _age_check_interval(self):
        # Without inserts, records still age past --keep-days: look again now and then.
        return min(60.0, self.keep_days * 86400 / 4) if self.keep_days else None

    def _run(self):
        if self.keep_versions:
            self._prune_every_event()
        while not self._stopped:
            self._wake.clear()        # before the pass: what is noted during it wakes the next
            try:
                self._prune()
            except StoreError:
                pass                  # the database refuses writes now: the next pass tries again
            time.sleep(PRUNE_PAUSE)
            self._wake.wait(self._age_check_interval())

    def _prune(self):
        with self._lock:
            touched, self._touched = self._touched, set()
        if touched:
            self._repeat(self.store.prune_versions, sorted(touched), self.keep_versions)
        if self.keep_days:
            self._repeat(self.store.prune_older, now_us() - int(self.keep_days * 86400e6))

    def _prune_every_event(self):
        after = ""
        while not self._stopped:
            try:
                names = self.store.event_names(after)
                if not names:
                    return
                self._repeat(self.store.prune_versions, names, self.keep_versions)
            except StoreError:
                return
            after = names[-1]

    def _repeat(self, prune, *args):
        """prune(*args) until a batch deletes fewer than PRUNE_ROWS, yielding to writers between."""
        while not self._stopped:
            deleted = prune(*args)
            self.metrics.add("broker_records_pruned_total", deleted)
            if deleted < PRUNE_ROWS:
                return
            time.sleep(0.002)         # let waiting inserts take the write lock


class Watchdog:
    """Cuts connections whose request has not arrived in time, so a client that sends slowly
    (or nothing) holds its thread no longer than that. self._lock guards self._deadlines."""

    def __init__(self, timeout):
        self.timeout = timeout
        self._lock = threading.Lock()
        self._deadlines = {}          # socket -> time.monotonic() by which its request must be read
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="broker-watchdog", daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        self._stopped.set()

    def watch(self, sock):
        with self._lock:
            self._deadlines[sock] = time.monotonic() + self.timeout

    def release(self, sock):
        with self._lock:
            self._deadlines.pop(sock, None)

    def _run(self):
        while not self._stopped.wait(min(self.timeout / 4, 1.0)):
            now = time.monotonic()
            with self._lock:
                late = [sock for sock, deadline in self._deadlines.items() if deadline <= now]
                for sock in late:
                    del self._deadlines[sock]
            for sock in late:
                try:
                    sock.shutdown(socket.SHUT_RDWR)     # its thread's read returns at once
                except OSError:
                    pass


class Headers(dict):
    """A request's headers by lower-cased name; of repeated ones, the first counts."""

    def add(self, name, value):
        """Keep value, unless it is a second, different Content-Length (a smuggling attempt)."""
        name = name.lower()
        if name in self:
            return name != "content-length" or self[name] == value
        self[name] = value
        return True

    def get(self, name, default=None):
        return super().get(name.lower(), default)

    def __contains__(self, name):
        return super().__contains__(name.lower())

    def __getitem__(self, name):
        return super().__getitem__(name.lower())


class ThreadPool:
    """Threads for connections, kept a while when idle: starting a thread costs more than a
    subscriber's whole sync. self._lock guards self._idle, the count of threads waiting for a job."""

    def __init__(self, idle_seconds=30.0):
        self.idle_seconds = idle_seconds
        self._jobs = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0

    def submit(self, function, *args):
        with self._lock:
            reuse = self._idle > 0
            if reuse:
                self._idle -= 1               # that worker is promised this job
        if reuse:
            self._jobs.put((function, args))
        else:
            threading.Thread(target=self._work, args=((function, args),), name="broker-thread", daemon=True).start()

    def _work(self, job):
        while True:
            function, args = job
            function(*args)
            with self._lock:
                self._idle += 1
            try:
                job = self._jobs.get(timeout=self.idle_seconds)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:        # nobody was promised to this worker: it may go
                        self._idle -= 1
                        return
                job = self._jobs.get()        # a job was promised as the wait ran out


def metric_slots(names, histograms, statuses):
    """{(name, status, bucket or "sum", or None): slot}: where each figure of Metrics is kept."""
    slots = {}
    for name in names:
        if name in histograms:
            keys = [*range(len(histograms[name]) + 1), "sum"]
        else:
            keys = statuses if name == "broker_inserts_refused_total" else [None]
        slots.update(((name, key), len(slots)) for key in keys)
    return slots


class Metrics:
    """What GET /metrics reports: counters, and histograms with fixed buckets, in the Prometheus
    text format 0.0.4. No label names an event or a client. Each figure is one integer slot of
    self.values (a sum of seconds is kept in nanoseconds), so under --workers every process can
    keep its own in a shared file and render the sum of all (SharedMetrics). self._lock guards
    this process's slots."""

    HISTOGRAMS = {
        "broker_commit_duration_seconds": (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        "broker_commit_rows": (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
    }
    HELP = {
        "broker_inserts_total": "records stored and acknowledged",
        "broker_inserts_refused_total": "POST /insert requests refused, by status",
        "broker_records_delivered_total": "records written to /events streams (sync, resume and live)",
        "broker_streams_opened_total": "/events streams opened",
        "broker_streams_dropped_total": "/events streams dropped for reading nothing for --write-timeout",
        "broker_records_pruned_total": "old versions deleted by --keep-versions and --keep-days",
        "broker_commit_duration_seconds": "time to write and commit one group of inserts",
        "broker_commit_rows": "records per group commit",
    }
    STATUSES = range(400, 600)            # a refusal is counted by its status
    SLOTS = metric_slots(HELP, HISTOGRAMS, STATUSES)

    def __init__(self, values=None):
        self.values = memoryview(bytearray(8 * len(self.SLOTS))).cast("q") if values is None else values
        self._lock = threading.Lock()

    def add(self, name, amount=1, status=None):
        if amount:
            with self._lock:
                self.values[self.SLOTS[name, status]] += amount

    def observe(self, name, value):
        bucket = bisect.bisect_left(self.HISTOGRAMS[name], value)
        with self._lock:
            self.values[self.SLOTS[name, bucket]] += 1
            self.values[self.SLOTS[name, "sum"]] += round(value * 1e9) if name.endswith("_seconds") else value

    def totals(self):
        """Every slot's value: this process's."""
        with self._lock:
            return list(self.values)

    def render(self, gauges):
        """The exposition: every counter and histogram, then gauges [(name, help, value)]."""
        totals = self.totals()
        lines = []
        for name in self.HELP:
            kind = "counter" if name.endswith("_total") else "histogram"
            lines += [f"# HELP {name} {self.HELP[name]}", f"# TYPE {name} {kind}"]
            if name == "broker_inserts_refused_total":
                lines += [f'{name}{{status="{status}"}} {totals[self.SLOTS[name, status]]}'
                          for status in self.STATUSES if totals[self.SLOTS[name, status]]]
            elif kind == "counter":
                lines.append(f"{name} {totals[self.SLOTS[name, None]]}")
            else:
                lines += self._histogram_lines(name, totals)
        for name, help_text, kind, value in gauges:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return ("\n".join(lines) + "\n").encode()

    def _histogram_lines(self, name, totals):
        lines, count = [], 0
        for bucket, bound in enumerate(self.HISTOGRAMS[name] + ("+Inf",)):
            count += totals[self.SLOTS[name, bucket]]
            lines.append(f'{name}_bucket{{le="{bound}"}} {count}')
        total = totals[self.SLOTS[name, "sum"]]
        return lines + [f"{name}_sum {total / 1e9 if name.endswith('_seconds') else total}", f"{name}_count {count}"]


class SharedMetrics(Metrics):
    """The Metrics of the whole broker under --workers: a file every process maps, one row of
    slots per process (row 0 the supervisor's, which counts commits and pruning; row k worker
    k's), and /metrics renders the sum of the rows. A row outlives its worker: the one that
    replaces it counts on, so no counter goes back."""

    def __init__(self, rows, fd=None, row=0):
        size = 8 * len(self.SLOTS) * rows
        if fd is None:                # the supervisor makes it; workers inherit the descriptor
            self._file = tempfile.TemporaryFile()
            fd = self._file.fileno()
            os.ftruncate(fd, size)
        self.fd, self.rows = fd, rows
        self._table = memoryview(mmap.mmap(fd, size)).cast("q")
        super().__init__(self._table[row * len(self.SLOTS):(row + 1) * len(self.SLOTS)])

    def totals(self):
        """Every slot's value, added up over the rows (an aligned 8-byte read never tears)."""
        width = len(self.SLOTS)
        table = self._table.tolist()
        return [sum(table[slot::width]) for slot in range(width)]


def process_gauges():
    """The standard process_* metrics, from /proc and resource (empty where /proc is missing)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    gauges = [("process_cpu_seconds_total", "user and system CPU time", "counter", usage.ru_utime + usage.ru_stime),
              ("process_max_fds", "the open-file limit", "gauge", resource.getrlimit(resource.RLIMIT_NOFILE)[0])]
    try:
        with open("/proc/self/stat") as file:
            fields = file.read().rsplit(")", 1)[1].split()
        with open("/proc/stat") as file:
            boot = next(int(line.split()[1]) for line in file if line.startswith("btime "))
        gauges += [
            ("process_virtual_memory_bytes", "virtual memory size", "gauge", int(fields[20])),
            ("process_resident_memory_bytes", "resident memory size", "gauge", int(fields[21]) * resource.getpagesize()),
            ("process_start_time_seconds", "start time since the Unix epoch", "gauge",
             boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")),
            ("process_open_fds", "open file descriptors", "gauge", len(os.listdir("/proc/self/fd")))]
    except (OSError, IndexError, StopIteration, ValueError):
        pass
    return gauges


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024        # socketserver's 5 stalls a crowd of connecting subscribers

    def __init__(self, address, broker, listener=None):
        self.broker = broker
        self.watchdog = Watchdog(broker.request_timeout)
        self.threads = broker.threads
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler, bind_and_activate=listener is None)
        if listener is not None:           # a worker's share of the supervisor's socket
            self.socket.close()
            self.socket, self.server_address = listener, listener.getsockname()
            listener.setblocking(False)    # another worker may take a connection first: no blocking accept

    def process_request(self, request, client_address):
        self.threads.submit(self.process_request_thread, request, client_address)

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)     # a hang-up is normal, the rest is not

    def shutdown_request(self, request):
        if not self.broker.fanout.owns(request):     # a live stream now belongs to the fan-out writer
            super().shutdown_request(request)


class HTTPHandler(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 mechanics, knowing nothing of the broker: the request line, headers and body,
    JSON errors, and bodies whole or of unknown length. A subclass answers requests: methods()
    maps each method allowed on a path to the bound method that answers it.

    A request's body is read (by an endpoint of a BODY_METHOD), discarded, or the connection is
    closed after the answer, so none of its bytes are ever taken for the next request (a body
    on a GET must not smuggle a second request past a proxy)."""

    protocol_version = "HTTP/1.1"          # chunked streams and keep-alive need it
    disable_nagle_algorithm = True         # else a small reply waits for the client's delayed ACK
    default_request_version = "HTTP/1.0"   # a reply to a garbled request line keeps its status line
    BODY_METHODS = ("POST",)               # the methods whose endpoints read a body
    max_body = 1 << 20                     # the largest body read or discarded
    _date = (0, "")                        # (second, Date header): shared, replaced whole

    def parse_request(self):
        """The request line and headers, as http.server's own method reads them, but with a plain
        header reader (the email package's parser cost a third of an insert's CPU time) and no
        100 Continue: read_body() invites the body once the request has passed its checks."""
        self.command, self.request_version, self.close_connection = None, self.default_request_version, True
        for _ in range(8):      # RFC 9112 2.2: ignore empty lines before the request line
            if self.raw_requestline not in (b"\r\n", b"\n"):
                break
            self.raw_requestline = self.rfile.readline(65537)
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        if not words:
            return False
        if len(words) != 3:     # HTTP/0.9 ("GET /path") has no headers, no status line: not served
            self.send_error(400, f"Bad request syntax ({self.requestline!r})")
            return False
        if not self._parse_version(words[2]):
            return False
        self.command, self.path = words[:2]
        if self.path.startswith("//"):
            self.path = "/" + self.path.lstrip("/")
        self.headers = self._read_headers()
        if self.headers is None:
            return False
        connection = self.headers.get("Connection", "").lower()
        if connection in ("close", "keep-alive"):
            self.close_connection = connection == "close" or self.request_version < "HTTP/1.1"
        return True

    def _parse_version(self, version):
        match = HTTP_VERSION.fullmatch(version)
        if not match:
            self.send_error(400, f"Bad request version ({version!r})")
            return False
        if (int(match[1]), int(match[2])) >= (2, 0):
            self.send_error(505, f"Invalid HTTP version ({version})")
            return False
        self.request_version = version
        self.close_connection = version < "HTTP/1.1"
        return True

    def _read_headers(self):
        """The request's headers, or None once an error has been sent."""
        headers = Headers()
        for _ in range(MAX_HEADERS + 1):
            line = self.rfile.readline(MAX_LINE + 1)
            if len(line) > MAX_LINE:
                self.send_error(431, "Line too long")
                return None
            if line in (b"\r\n", b"\n", b""):
                return headers
            name, colon, value = str(line, "iso-8859-1").partition(":")
            if not colon or not HEADER_NAME.fullmatch(name):
                self.send_error(400, "Bad header line")
                return None
            if not headers.add(name, value.strip()):
                self.send_error(400, f"Conflicting {name} headers")
                return None
        self.send_error(431, "Too many headers")
        return None

    def do_GET(self):
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def _dispatch(self):
        self._body_read, self._head_sent, self.body = False, False, None
        try:
            self._check_framing()
            if self.command not in self.BODY_METHODS:
                self._discard_body()
            self.answer(self._endpoint())
        except RequestError as error:
            self._refuse(error.status, error.message, error.headers)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True      # the client went away: normal, end quietly
        except Exception:
            traceback.print_exc()
            self.close_connection = True
            if not self._response_started():
                self._send_json(500, {"error": "internal error"})
        if self._body_unread():
            self.close_connection = True      # its bytes would be read as the next request

    def answer(self, endpoint):
        """Run the endpoint; a subclass may turn its own exceptions into RequestErrors here."""
        endpoint()

    def _check_framing(self):
        """Refuse a body whose end is in doubt, whatever the method."""
        if "Transfer-Encoding" in self.headers:
            raise RequestError(411, "Transfer-Encoding is not supported; send the body with Content-Length")
        self._content_length()

    def _endpoint(self):
        """The bound method for this request: HEAD is answered as GET, without the body."""
        try:
            self.url = urllib.parse.urlsplit(self.path)
        except ValueError:
            raise RequestError(400, "the request target is not a valid URL") from None
        self.query = urllib.parse.parse_qs(self.url.query, keep_blank_values=True)
        methods = self.methods(self.url.path)
        if "GET" in methods:
            methods.setdefault("HEAD", methods["GET"])
        if self.command not in methods:
            allowed = ", ".join(m for m in ("GET", "HEAD", "POST", "OPTIONS") if m in methods)
            raise RequestError(405, f"{self.command} is not allowed here; use {allowed}", [("Allow", allowed)])
        return methods[self.command]

    def methods(self, path):
        """{method: bound method} for path; raise RequestError(404) for a path not served."""
        raise RequestError(404, f"no such endpoint: {path}")

    def _content_length(self):
        """The Content-Length as an integer (0 when absent); 400 when it is not one."""
        text = self.headers.get("Content-Length", "0")
        if not (text.isascii() and text.isdigit()):
            raise RequestError(400, "Content-Length must be a non-negative integer")
        digits = text.lstrip("0")
        return int(digits or "0") if len(digits) <= 19 else 1 << 64      # int() refuses 4,300+ digits

    def _expects_continue(self):
        return self.headers.get("Expect", "").lower() == "100-continue" and self.request_version >= "HTTP/1.1"

    def read_body(self):
        """The request's body, up to max_body bytes: call once the request has passed every
        check, since a client waiting for 100 Continue is invited to send it only now."""
        if "Content-Length" not in self.headers:
            raise RequestError(411, "Content-Length is required")
        length = self._content_length()
        if length > self.max_body:
            raise RequestError(413, f"body is larger than {self.max_body} bytes")
        if self._expects_continue():
            self.wfile.write(b"%s 100 Continue\r\n\r\n" % self.protocol_version.encode())
        body = self.rfile.read(length)
        self._body_read = True
        self.request_read()
        if len(body) < length:
            self.close_connection = True
            raise RequestError(400, "body is shorter than its Content-Length")
        return body

    def _discard_body(self):
        """Read and drop the body of a method that takes none; one never invited or too large
        is left unread, and the connection then ends with the answer."""
        length = self._content_length()
        if length and not self._expects_continue() and length <= self.max_body:
            self._body_read = len(self.rfile.read(length)) == length
        elif not length:
            self._body_read = True
        self.request_read()

    def request_read(self):
        """Called once the request (and any body) has been read; a subclass may stop a timer."""

    def _body_unread(self):
        if self.headers is None or self._body_read:
            return False
        return self.headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in self.headers

    def _refuse(self, status, message, headers=()):
        if self._response_started():
            self.close_connection = True         # mid-response: ending it is all that is left
            return
        if self._body_unread():
            self.close_connection = True
        self.body = None                         # a body begun but not sent gives way to the error
        self._headers_buffer = []
        self._send_json(status, {"error": message}, headers)

    def _response_started(self):
        """True once any byte of a response has been sent: no other status can be sent then."""
        return self._head_sent or (self.body is not None and self.body.started)

    def send_error(self, code, message=None, explain=None):
        # The base class calls this for malformed requests too; they get JSON like the rest.
        self.close_connection = True
        self._send_json(code, {"error": message or http.HTTPStatus(code).phrase})

    def _send_json(self, status, value, headers=()):
        self.send_bytes(status, json_bytes(value), "application/json", headers)

    def send_bytes(self, status, body, content_type=None, headers=()):
        """A whole response; HEAD gets its headers alone."""
        self.send_response(status)
        if content_type is not None:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self._head_sent = True
        self.wfile.write(self._take_head() + (b"" if self.command == "HEAD" else body))

    def start_body(self, content_type, headers=()):
        """Begin a body of unknown length (chunked, or ended by closing for HTTP/1.0); write it
        with self.body, whose first write carries the head."""
        chunked = self.request_version != "HTTP/1.0"
        self.close_connection = self.close_connection or not chunked
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        for name, value in headers:
            self.send_header(name, value)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
        self.body = BodyWriter(self.connection, chunked, self._take_head(), head_only=self.command == "HEAD")

    def _take_head(self):
        """The status line and headers so far, to go out in one write with the body's start."""
        head = b"".join(self._headers_buffer) + b"\r\n"
        self._headers_buffer = []
        return head

    def date_time_string(self, timestamp=None):
        # The base class formats the Date header anew for every response; once a second will do.
        if timestamp is not None:
            return super().date_time_string(timestamp)
        second = int(time.time())
        cached = HTTPHandler._date
        if cached[0] != second:
            cached = HTTPHandler._date = (second, super().date_time_string(second))
        return cached[1]

    def log_error(self, format, *args):
        if not format.startswith("Request timed out"):    # an idle keep-alive connection: normal
            super().log_error(format, *args)

    def log_message(self, format, *args):
        # Escaped as http.server does since 3.12: a request line must not write raw ESC or CR.
        message = (format % args).translate(LOG_ESCAPES)
        sys.stderr.write(f"{self.address_string()} {self.log_ident()} - [{self.log_date_time_string()}] {message}\n")

    def log_ident(self):
        """The log line's second field (the common log format's ident): who served the request."""
        return "-"


class Handler(HTTPHandler):
    """The broker's endpoints, one method each, named verb-then-path; settings come from
    self.server.broker."""

    server_version = "broker.py"
    ROUTES = {
        "/insert": {"POST": "post_insert"},
        "/events": {"GET": "get_events"},
        "/healthz": {"GET": "get_healthz"},
        "/metrics": {"GET": "get_metrics"},
    }

    def setup(self):
        self.timeout = self.server.broker.request_timeout    # read by StreamRequestHandler.setup
        super().setup()

    @property
    def max_body(self):
        return self.server.broker.max_body

    def handle_one_request(self):
        self.server.watchdog.watch(self.request)      # released once the request has been read
        try:
            super().handle_one_request()
        finally:
            self.server.watchdog.release(self.request)

    def request_read(self):
        self.server.watchdog.release(self.request)

    def methods(self, path):
        names = self.ROUTES.get(path)
        if names is None and path.startswith("/audit/"):
            names = {"GET": "get_audit"}
        if names is None and self.server.broker.static:
            names = {"GET": "get_static"}
        if names is None and self.command != "OPTIONS":      # a preflight is answered anywhere
            raise RequestError(404, f"no such endpoint: {path}")
        names = names or {}
        return {**{method: getattr(self, name) for method, name in names.items()}, "OPTIONS": self.options_any}

    def answer(self, endpoint):
        try:
            endpoint()
        except StoreError as error:
            raise RequestError(503, str(error)) from None

    def options_any(self):
        self.send_bytes(204, b"", headers=[
            ("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
            ("Access-Control-Allow-Headers", "Content-Type, Authorization, Last-Event-ID"),
            ("Access-Control-Max-Age", "3600")])

    def post_insert(self):
        allowed = self._allowed("publish")
        content_type = self.headers.get("Content-Type", "")
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise RequestError(415, "Content-Type must be application/json")
        rows, is_batch = parse_insert(self.read_body())
        for index, (event, _) in enumerate(rows):
            if allowed is not None and not allowed.fullmatch(event):
                where = f"item {index}: " if is_batch else ""
                raise RequestError(403, f"{where}the token does not allow publishing {event!r}")
        records = self.server.broker.writer.insert_many(rows) if rows else []
        body = b"[" + b",".join(r.to_json() for r in records) + b"]" if is_batch else records[0].to_json()
        self.send_bytes(200, body, "application/json")

    def get_events(self):
        names, patterns = self._event_choice()
        wants = EventFilter(names, patterns, self._allowed("subscribe"))
        if wants.allowed is NOTHING:
            raise RequestError(403, "the token does not allow subscribing to any event")
        for name in wants.names or ():
            if not wants.matches(name):
                raise RequestError(403, f"the token does not allow subscribing to {name!r}")
        if self.command == "HEAD":
            self._start_stream()
            self.body.end()
            return
        broker = self.server.broker
        try:
            newest = broker.newest_id()       # PostgreSQL: the database answers, or come back later
        except StoreError as error:
            self._come_back_later(str(error))
            return
        if not broker.streams.open():
            self._come_back_later(f"too many subscribers (at most {broker.max_clients}); retry later")
            return
        broker.metrics.add("broker_streams_opened_total")
        handed_over = False
        try:
            self.connection.settimeout(broker.write_timeout)     # a reader may take its time, not forever
            self._start_stream()
            cursor = self._sync(broker, wants, newest)
            handed_over = broker.fanout.catch_up_and_join(self.connection, self.body, wants, cursor)
        except socket.timeout:
            broker.metrics.add("broker_streams_dropped_total")     # it read nothing for --write-timeout
            raise
        finally:
            self.close_connection = True
            if not handed_over:
                broker.streams.close()

    def _come_back_later(self, message):
        if "text/event-stream" not in self.headers.get("Accept", ""):
            raise RequestError(503, message, [("Retry-After", str(FULL_RETRY_MS // 1000))])
        # A 503 would end a browser's EventSource for good; a stream that only says when to
        # come back makes it reconnect later instead.
        self.close_connection = True
        self.start_body("text/event-stream", [("Cache-Control", "no-cache")])
        self.body.write(b"retry: %d\n\n" % FULL_RETRY_MS)
        self.body.end()

    def _event_choice(self):
        """The ?event= names (exact) and ?match= patterns (shell-style) of a stream; None when absent."""
        names, patterns = self.query.get("event"), self.query.get("match")
        if len(names or ()) + len(patterns or ()) > MAX_FILTERS:
            raise RequestError(400, f"at most {MAX_FILTERS} event and match filters per stream")
        if names is not None:
            names = frozenset(check_event_name(name) for name in names)
        if patterns is not None:
            patterns = tuple(sorted({check_event_name(pattern, '"match"') for pattern in patterns}))
        return names, patterns

    def _resume_id(self, newest):
        """The Last-Event-ID to resume after, or None for a full sync (the header wins)."""
        text = self.headers.get("Last-Event-ID")
        if text is None:
            text = (self.query.get("lastEventId") or self.query.get("last_event_id") or [None])[0]
        resume = None if text is None else int64(text.strip())
        return resume if resume is not None and resume <= newest else None   # larger: the database was replaced

    def _start_stream(self):
        self.start_body("text/event-stream", [("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no")])
        self.body.write(b"retry: %d\n\n" % RETRY_MS)

    def _sync(self, broker, wants, newest):
        """Write the sync (or the resume's replay) as of newest, and the id-only block; return its
        cursor. Nothing is sent before the first page is read, so a database error is still a 503."""
        resume = self._resume_id(newest)
        if resume is None and wants == EVERYTHING:
            self._send_full_sync(broker, newest)
        else:
            read_page = broker.store.latest if resume is None else broker.store.after
            for records in record_pages(read_page, resume or 0, newest, wants):
                broker.metrics.add("broker_records_delivered_total", write_records(self.body, records, wants))
        self.body.write(b"id: %d\n\n" % newest)
        return newest

    def _send_full_sync(self, broker, newest):
        # Built once per newest id and shared by every stream that connects meanwhile: a crowd
        # connecting at once costs one database read, not one each.
        cached = broker.hub.cached_sync(newest)
        if cached is not None:
            self.body.write(cached[0])
            broker.metrics.add("broker_records_delivered_total", cached[1])
            return
        messages, size = [], 0
        for records in record_pages(broker.store.latest, 0, newest):
            for record in records:
                message = record.to_sse()
                self.body.write(message)
                size += len(message)
                if size <= SYNC_CACHE_BYTES:
                    messages.append(message)
            broker.metrics.add("broker_records_delivered_total", len(records))
        if size <= SYNC_CACHE_BYTES:
            broker.hub.cache_sync(newest, (b"".join(messages), len(messages)))

    def get_audit(self):
        allowed = self._allowed("subscribe")
        event = check_event_name(self._path_event())
        if allowed is not None and not allowed.fullmatch(event):
            raise RequestError(403, f"the token does not allow reading {event!r}")
        since = non_negative_int(self._query_value("since", "0"), "since")
        limit = self._query_value("limit", None)
        limit = None if limit is None else non_negative_int(limit, "limit")
        self.connection.settimeout(self.server.broker.write_timeout)
        parts = audit_json(self.server.broker.store, event, since, limit)
        first = next(parts)          # the database is read before the status line is promised
        self.start_body("application/json")
        self.body.write(first)
        for part in parts:
            self.body.write(part)
        self.body.end()

    def _path_event(self):
        try:
            return urllib.parse.unquote(self.url.path[len("/audit/"):], errors="strict")
        except UnicodeDecodeError:
            raise RequestError(400, "event name in the path is not valid UTF-8") from None

    def _query_value(self, name, default):
        values = self.query.get(name)
        return default if not values else values[-1]

    def _allowed(self, action):
        """What this request may do for action ("publish" or "subscribe"): None for every
        event, else a regex of event names. 401 when credentials are needed and missing or bad."""
        broker = self.server.broker
        fixed = broker.publish_token if action == "publish" else broker.subscribe_token
        if fixed is None and broker.jwt_secret is None:
            return None
        token = self._bearer_token(allow_query=action == "subscribe")
        if token is None:
            raise RequestError(401, "a bearer token is required", [("WWW-Authenticate", "Bearer")])
        if fixed is not None and same_secret(token, fixed):
            return None
        if broker.jwt_secret is None:
            raise RequestError(401, "the bearer token is not valid", [("WWW-Authenticate", INVALID_TOKEN)])
        return patterns_regex(tuple(verify_jwt(token, broker.jwt_secret)[action]))

    def _bearer_token(self, allow_query):
        scheme, _, token = self.headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        if allow_query:           # an EventSource cannot set headers
            return self._query_value("access_token", None)
        return None

    def get_metrics(self):
        broker = self.server.broker
        if broker.subscribe_token is not None:       # else open, like /healthz
            token = self._bearer_token(allow_query=True)
            if token is None or not same_secret(token, broker.subscribe_token):
                raise RequestError(401, "the subscribe token is required", [("WWW-Authenticate", "Bearer")])
        self.send_bytes(200, broker.metrics_text(), "text/plain; version=0.0.4; charset=utf-8")

    def _refuse(self, status, message, headers=()):
        if self.command == "POST" and self._target_path() == "/insert":
            self.server.broker.metrics.add("broker_inserts_refused_total", status=status)
        super()._refuse(status, message, headers)

    def _target_path(self):
        try:
            return urllib.parse.urlsplit(self.path).path      # a proxy's absolute form too
        except ValueError:
            return None

    def get_healthz(self):
        broker = self.server.broker
        try:
            newest = broker.newest_id()
        except StoreError as error:
            self.send_bytes(503, json_bytes({"status": "unavailable", "store": broker.store.NAME, "error": str(error)}),
                            "application/json")
            return
        health = {"status": "ok", "store": broker.store.NAME, "subscribers": broker.streams.total(),
                  "last_id": newest, "workers": broker.streams.workers()}
        if broker.seat:
            health["worker"] = broker.seat.number
        self.send_bytes(200, json_bytes(health), "application/json")

    def get_static(self):
        path = static_file(self.server.broker.static, self.url.path)
        content_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
        if content_type.startswith("text/") or content_type in ("application/javascript", "application/json"):
            content_type += "; charset=utf-8"
        with open(path, "rb") as file:
            self.send_bytes(200, file.read(), content_type)

    def send_response(self, code, message=None):
        super().send_response(code, message)
        broker = self.server.broker
        self.send_header("Access-Control-Allow-Origin", broker.origin)
        if broker.origin != "*":
            self.send_header("Vary", "Origin")
        if broker.seat:
            self.send_header("Broker-Worker", str(broker.seat.number))

    def log_message(self, format, *args):
        broker = self.server.broker
        if not broker.quiet:
            super().log_message("%s", redact_tokens(format % args))

    def log_ident(self):
        return f"worker-{self.server.broker.seat.number}" if self.server.broker.seat else "-"


def static_file(root, url_path):
    """The file under root that url_path names; 404 for anything outside root (.., symlinks)."""
    relative = urllib.parse.unquote(url_path).lstrip("/")
    if "\x00" in relative:
        raise RequestError(404, f"no such file: {url_path}")
    root = os.path.realpath(root)
    path = os.path.join(root, relative)
    if os.path.isdir(path):
        path = os.path.join(path, "index.html")
    path = os.path.realpath(path)       # after choosing index.html: it may be a link out too
    if os.path.commonpath([root, path]) != root or not os.path.isfile(path):
        raise RequestError(404, f"no such file: {url_path}")
    return path


def record_pages(read_page, after_id, upto_id, wants=None):
    """Yield read_page's pages (each bounded in bytes) of records in (after_id, upto_id], in id order."""
    while after_id < upto_id:
        records = read_page(after_id, upto_id, wants)
        if not records:
            return
        yield records
        after_id = records[-1].id


def write_records(body, records, wants):
    """Write the SSE message of each record wants, one at a time so a page is never copied
    whole; return how many."""
    written = 0
    for record in records:
        if wants.matches(record.event):
            body.write(record.to_sse())
            written += 1
    return written


def audit_json(store, event, since=0, limit=None):
    """Yield GET /audit/{event} as pieces of one JSON object, reading a page of rows at a time."""
    separator = b"{"
    left = limit
    while left is None or left > 0:
        rows = store.audit(event, since, PAGE_ROWS if left is None else min(left, PAGE_ROWS))
        if not rows:
            break
        for ts, data in rows:          # key and data apart: a large record is never copied whole
            yield separator + json_bytes(f"{event}_v_{ts}") + b":"
            yield data.encode()
            separator = b","
        since = rows[-1][0]
        if left is not None:
            left -= len(rows)
    yield b"{}" if separator == b"{" else b"}"


class Broker:
    """The whole server: start/stop, and publish/latest/audit for a program embedding it."""

    def __init__(self, **options):
        unknown = set(options) - {name for name, *_ in OPTIONS}
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
        for name, _env, default, convert, _help in OPTIONS:
            value = options.get(name, default)
            if value is not None and convert is not str and convert is not bool:
                value = convert(value)
            setattr(self, name, value)
        if self.workers != 1:
            raise ValueError("workers are a command-line feature (python broker.py --workers N);"
                             " Broker(...) serves in one process")
        self.store = self.writer = self.link = self.hub = self.fanout = self.pruner = self._server = None
        self.seat = None                      # set in a worker process of python broker.py --workers N
        self.metrics = Metrics()
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

    def start(self, seat=None):
        """Open the database, listen, and serve in background threads; return self. A worker
        process of --workers passes its WorkerSeat: the writer commits its inserts."""
        self.seat = seat
        if seat:
            self.metrics = seat.metrics
        if self.db != ":memory:" and not is_postgres_url(self.db):
            os.makedirs(os.path.dirname(os.path.abspath(self.db)), exist_ok=True)
        if self.static is not None and not os.path.isdir(self.static):
            raise ValueError(f"static folder not found: {self.static}")
        # PostgreSQL: every process commits its own inserts, and learns of the others' from the
        # database. SQLite: a worker's inserts go to the supervisor, which sends every commit back.
        shared = is_postgres_url(self.db)
        self.store = self.writer = open_store(self.db, self.sync, self._count_commit, self._on_records,
                                              writes=seat is None or shared)
        if seat is None:
            newest = self.store.newest_id()
            self.streams = StreamCounts(self.max_clients or default_max_clients())
        else:
            self.link = CommitLink(seat.link, self._on_records, lost=self._writer_lost)
            newest, self.streams = self.link.join(), seat.streams
            if shared:
                newest = self.store.newest_id()
            else:
                self.writer = self.link
        self.max_clients = self.streams.limit
        self.hub = Hub(newest)
        self.threads = ThreadPool()
        self.fanout = Fanout(self.hub, self.store, self.heartbeat, self.write_timeout, self.threads.submit,
                             self.metrics, self.streams)
        keep = (None, None) if seat else (self.keep_versions, self.keep_days)   # the writer prunes for workers
        self.pruner = Pruner(self.store, *keep, self.metrics)
        self.store.follow(newest)
        if self.link:
            self.link.start()         # commits reach the hub from now on
        try:
            self._server = Server((self.host, self.port), self, seat and seat.listener)
        except OSError:
            self.store.close()
            raise
        self.fanout.start()
        self.pruner.start()
        self._server.watchdog.start()
        threading.Thread(target=self._server.serve_forever, name="broker-accept", daemon=True).start()
        return self

    def newest_id(self):
        """The newest id this broker's hub has, and so its streams: in a worker, or a node on
        PostgreSQL, once the hub has every record acknowledged so far by any process (on its
        way here, or here already)."""
        if self.seat is None and not self.store.SHARED:
            with self.hub.changed:
                return self.hub.newest
        return self.hub.wait_until(self.store.newest_id())

    def _writer_lost(self):
        print(f"broker.py: worker {self.seat.number}: its link to the writer closed; stopping", file=sys.stderr)
        threading.Thread(target=self.stop).start()

    def _on_records(self, records):
        self.hub.publish(records)
        self.pruner.note(records)

    def _count_commit(self, records, seconds):
        self.metrics.add("broker_inserts_total", len(records))
        self.metrics.observe("broker_commit_duration_seconds", seconds)
        self.metrics.observe("broker_commit_rows", len(records))

    def metrics_text(self):
        """GET /metrics: the Prometheus text exposition, also while the database is unreachable."""
        try:
            newest, size, up = self.newest_id(), self.store.size_bytes(), 1
        except StoreError:
            newest, size, up = self.hub.newest, 0, 0
        return self.metrics.render([
            ("broker_streams_open", "open /events streams", "gauge", self.streams.total()),
            ("broker_newest_id", "the newest record id", "gauge", newest),
            ("broker_database_bytes", "the database's size on disk", "gauge", size),
            ("broker_database_up", "1 if the database could be read just now, else 0", "gauge", up),
            *process_gauges()])

    def stop(self):
        """Stop accepting, end every stream, close the database. Safe to call twice, from any thread."""
        with self._stop_lock:
            if self._stopped.is_set() or self._server is None:
                self._stopped.set()
                return
            self._server.shutdown()
            self._server.server_close()
            self._server.watchdog.stop()
            self.pruner.stop()
            self.hub.close()
            self.fanout.join(timeout=5)
            if self.link:
                self.link.close()
            self.store.close()
            self._stopped.set()

    def serve_forever(self):
        """Serve until stop() is called (by a signal handler, say)."""
        if self._server is None:
            self.start()
        self._stopped.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    @property
    def url(self):
        return http_url(*self._server.server_address[:2])

    def publish(self, event, data):
        """Store and broadcast a record, exactly as POST /insert does; return the record."""
        record = self.writer.insert(check_event_name(event), encode_data(data))
        return record.to_dict()

    def publish_many(self, items):
        """Store [(event, data), ...] in one transaction, all or none, as a POST /insert array
        does; return the records, their ids consecutive in the order given."""
        items = list(items)
        if len(items) > MAX_BATCH_RECORDS:
            raise RequestError(400, f"a batch holds at most {MAX_BATCH_RECORDS} records")
        rows = []
        for index, (event, data) in enumerate(items):
            try:
                rows.append((check_event_name(event), encode_data(data)))
            except RequestError as error:
                raise RequestError(400, f"item {index}: {error.message}") from None
        return [record.to_dict() for record in self.writer.insert_many(rows)] if rows else []

    def latest(self):
        """{event: data} for the latest record of every event."""
        state, cursor, newest = {}, 0, self.newest_id()
        while True:
            records = self.store.latest(cursor, newest)
            if not records:
                return state
            state.update((r.event, json.loads(r.data)) for r in records)
            cursor = records[-1].id

    def audit(self, event, since=0, limit=None):
        """The same mapping as GET /audit/{event}."""
        return json.loads(b"".join(audit_json(self.store, check_event_name(event), since, limit)))

    def subscribe(self, events=None, last_event_id=None, timeout=None, token=None, match=None):
        """The records of this broker's /events, as broker.subscribe() yields them."""
        return subscribe(self.url, events, last_event_id, timeout, token, match)


class Link:
    """One end of the socket pair between a worker and the writer: each message is a tuple of
    plain values, marshal-encoded (both ends run the same interpreter), after its length.
    self._send_lock keeps messages whole when threads send at once; one thread receives."""

    def __init__(self, sock):
        self.sock = sock
        self.closed = False
        # A message left unread for LINK_TIMEOUT fails to send: the other side is stuck. Each
        # blocked send() gives up after a second (SO_SNDTIMEO, kept by the kernel: a Python
        # timeout would cost a poll() before every recv and send), and _send_all() counts them.
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 1, 0))
        self._send_lock = threading.Lock()
        self._received = bytearray()

    def send(self, message):
        data = marshal.dumps(message)
        size = len(data).to_bytes(8, "big")
        with self._send_lock:
            self._send_all(size + data if len(data) < WRITE_BYTES else size)
            if len(data) >= WRITE_BYTES:
                self._send_all(data)

    def _send_all(self, data):
        deadline, unsent = time.monotonic() + LINK_TIMEOUT, memoryview(data)
        while unsent:
            try:
                unsent = unsent[self.sock.send(unsent):]
            except BlockingIOError:      # a second went by and the other side took nothing
                pass
            if unsent and time.monotonic() > deadline:
                raise TimeoutError(f"the other process read nothing for {LINK_TIMEOUT:g} s")

    def receive(self):
        """The next message, waiting for it; None once either end has closed the link."""
        while True:
            message = self._take()
            if message is not None:
                return message
            if not self._fill():
                return None

    def received(self):
        """The messages that have arrived, for a reader told the socket is readable; None once
        either end has closed the link."""
        if not self._fill():
            return None
        messages = []
        message = self._take()
        while message is not None:
            messages.append(message)
            message = self._take()
        return messages

    def _fill(self):
        try:
            data = self.sock.recv(65536)
        except OSError:
            return False
        self._received += data
        return bool(data)

    def _take(self):
        if len(self._received) < 8:
            return None
        end = 8 + int.from_bytes(self._received[:8], "big")
        if len(self._received) < end:
            return None
        message = marshal.loads(self._received[8:end])
        del self._received[:end]
        return message

    def close(self):
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)     # wakes the thread receiving
        except OSError:
            pass
        self.sock.close()


class CommitLink:
    """In a worker: the inserts of its clients, committed by the writer process (CommitServer),
    and every commit of every worker coming back to on_records in commit order, so the hub learns
    of each at once. Same insert()/insert_many() as Store. self._lock guards self._waiting
    (request number -> PendingInsert), self._next, self._gone and self._closing."""

    def __init__(self, sock, on_records, lost):
        self._link = Link(sock)
        self._on_records, self._lost = on_records, lost
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)    # notified when self._waiting empties
        self._waiting = {}
        self._next = 0
        self._gone = self._closing = False
        self._thread = threading.Thread(target=self._run, name="broker-commits", daemon=True)

    def join(self):
        """Announce this worker to the writer; return the newest id committed before it did:
        every later commit comes through this link."""
        self._link.send(("hello",))
        message = self._link.receive()
        if message is None or message[0] != "welcome":
            raise StoreError("the writer process did not answer")
        return message[1]

    def start(self):
        self._thread.start()

    def close(self, timeout=LINK_TIMEOUT):
        """Wait (up to timeout) for the answers to inserts asked already, then close the link."""
        with self._drained:
            self._closing = True          # no insert is asked from now on
            self._drained.wait_for(lambda: not self._waiting, timeout)
        self._link.close()

    def insert(self, event, data):
        """Store one record and return it once the transaction holding it has committed."""
        return self.insert_many([(event, data)])[0]

    def insert_many(self, rows):
        """Store [(event, data)] in one transaction, all or none; return the records once committed."""
        pending = PendingInsert(rows)
        with self._lock:
            if self._closing:
                raise StoreError("the broker is shutting down")
            if self._gone:
                raise StoreError("the writer process is gone; this worker is stopping")
            number, self._next = self._next, self._next + 1
            self._waiting[number] = pending
        try:
            self._link.send(("insert", number, rows))
        except OSError:
            self._link.close()        # the receiving thread fails every waiting insert, this one too
        pending.wake.acquire()
        if pending.error:
            raise pending.error
        return pending.records

    def _run(self):
        while True:
            message = self._link.receive()
            if message is None:
                break
            _, rows, answers = message
            records = [Record(*row) for row in marshal.loads(rows)]
            if records:
                self._on_records(records)             # the hub first: an answered insert is visible
            for number, start, end, error in answers:
                with self._lock:
                    pending = self._waiting.pop(number)
                    if not self._waiting:
                        self._drained.notify_all()
                pending.records, pending.error = records[start:end], error and StoreError(error)
                pending.wake.release()
        with self._lock:
            self._gone = True
            waiting, self._waiting = self._waiting, {}
            self._drained.notify_all()
        for pending in waiting.values():
            pending.error = StoreError("the writer process is gone: the insert may or may not be stored")
            pending.wake.release()
        if not self._closing:
            self._lost()


class RemoteInsert(PendingInsert):
    """An insert a worker asked the writer for: its link and its number there. Nobody waits on
    it in this process (the worker does), so it has no wake lock."""
    __slots__ = ("link", "number")

    def __init__(self, rows, link, number):
        self.rows, self.records, self.error, self.wake = rows, None, None, None
        self.link, self.number = link, number


class CommitServer:
    """In the supervisor: the writer of every worker, on the one write connection. One thread
    waits for any worker's link to be readable, reads what every ready worker sent, writes all
    those inserts in one transaction (workers share each group commit: the next requests
    gather while one commits), then answers each worker its inserts and sends every worker the
    records, in commit order. self._lock guards self._joining and self._closed; the rest belongs
    to the thread."""

    def __init__(self, store, metrics, on_join):
        self.store, self.metrics = store, metrics
        self._on_join = on_join          # called with a worker's number once it gets every commit
        self._lock = threading.Lock()
        self._joining = []               # (Link, worker number) not yet watched
        self._closed = False
        self._links = []                 # links that said hello: each gets every commit
        self._newest = store.newest_id()
        self._selector = selectors.DefaultSelector()
        self._wake, self._woken = socket.socketpair()     # other threads interrupt select() through it
        self._selector.register(self._woken, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._run, name="broker-writer", daemon=True)

    def start(self):
        self._thread.start()

    def serve(self, sock, number):
        """Take the requests of worker number from its end of a socket pair, sock."""
        with self._lock:
            self._joining.append((Link(sock), number))
        self._wake.send(b"\0")

    def close(self):
        """Stop, once the workers have: what they asked for is committed by then."""
        with self._lock:
            self._closed = True
        self._wake.send(b"\0")
        self._thread.join()

    def _run(self):
        while True:
            hellos, inserts = [], []
            for key, _ in self._selector.select():
                if key.data is None:
                    if self._take_wake_up():
                        return self._close_links()
                    continue
                link, number = key.data
                messages = link.received()
                if messages is None:
                    self._forget(link)
                for message in messages or ():
                    if message[0] == "hello":
                        hellos.append((link, number))
                    else:
                        inserts.append(RemoteInsert(message[2], link, message[1]))
            for link, number in hellos:       # a hello is a link's first message: before its inserts
                self._welcome(link, number)
            for batch in self._batches(inserts):
                self._commit(batch)

    def _take_wake_up(self):
        """Watch the links that joined; True if close() was called."""
        self._woken.recv(4096)
        with self._lock:
            joining, self._joining = self._joining, []
            closed = self._closed
        for link, number in joining:
            self._selector.register(link.sock, selectors.EVENT_READ, (link, number))
        return closed

    @staticmethod
    def _batches(inserts):
        """inserts, in order, in transactions of about Store.MAX_BATCH rows."""
        batch, rows = [], 0
        for pending in inserts:
            if batch and rows + len(pending.rows) > Store.MAX_BATCH:
                yield batch
                batch, rows = [], 0
            batch.append(pending)
            rows += len(pending.rows)
        if batch:
            yield batch

    def _commit(self, batch):
        started = time.perf_counter()
        self.store.commit(batch)
        seconds = time.perf_counter() - started
        records, answers = [], collections.defaultdict(list)
        for pending in batch:
            if pending.error is None:
                answers[pending.link].append((pending.number, len(records), len(records) + len(pending.records), None))
                records += pending.records
            else:
                answers[pending.link].append((pending.number, 0, 0, str(pending.error)))
        if records:
            self._newest = records[-1].id
            self.metrics.add("broker_inserts_total", len(records))
            self.metrics.observe("broker_commit_duration_seconds", seconds)
            self.metrics.observe("broker_commit_rows", len(records))
        rows = marshal.dumps([tuple(record) for record in records])     # encoded once for every worker
        for link in list(self._links):
            if records or link in answers:
                self._send(link, ("commit", rows, answers.get(link, [])))

    def _welcome(self, link, number):
        if not link.closed and self._send(link, ("welcome", self._newest)):
            self._links.append(link)
            self._on_join(number)

    def _send(self, link, message):
        try:
            link.send(message)
            return True
        except OSError:               # gone, or stuck for LINK_TIMEOUT: it stops and is replaced
            self._forget(link)
            return False

    def _forget(self, link):
        if link in self._links:
            self._links.remove(link)
        if not link.closed:
            self._selector.unregister(link.sock)
            link.close()

    def _close_links(self):
        for key in list(self._selector.get_map().values()):
            if key.data is not None:
                self._forget(key.data[0])
        self._selector.close()
        self._wake.close()
        self._woken.close()


class SharedStreamCounts(StreamCounts):
    """StreamCounts for the whole broker across its worker processes: a small file that every
    process maps, holding each worker's open streams and whether it runs. A worker opens a
    stream while the total is under limit and its own count under own_limit (its open files).
    fcntl.lockf makes check-and-count atomic across processes, and self._lock across this
    process's threads (a process holds a lockf lock, not a thread)."""

    def __init__(self, limit, own_limit, workers, fd=None, number=0):
        self.limit, self.own_limit, self.number = limit, own_limit, number
        if fd is None:                # the supervisor makes it; workers inherit the descriptor
            self._file = tempfile.TemporaryFile()
            fd = self._file.fileno()
            os.ftruncate(fd, 16 * workers)
        self.fd = fd
        self._lock = threading.Lock()
        self._slots = memoryview(mmap.mmap(fd, 16 * workers)).cast("q")   # [open, running] per worker
        self._mine = 2 * (number - 1)

    def open(self):
        with self._locked():
            if self._slots[self._mine] >= self.own_limit or self._total() >= self.limit:
                return False
            self._slots[self._mine] += 1
            return True

    def close(self):
        with self._locked():
            self._slots[self._mine] -= 1

    def total(self):
        with self._locked():
            return self._total()

    def workers(self):
        return sum(self._slots[1::2])

    def mark(self, number, running):
        """In the supervisor: worker number runs now, or it stopped, and its streams with it."""
        slot = 2 * (number - 1)
        with self._locked():
            if not running:
                self._slots[slot] = 0
            self._slots[slot + 1] = int(running)

    def _total(self):
        return sum(self._slots[0::2])

    @contextlib.contextmanager
    def _locked(self):
        with self._lock:
            fcntl.lockf(self.fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(self.fd, fcntl.LOCK_UN)


class WorkerSeat(typing.NamedTuple):
    """What a worker process gets from its supervisor."""
    number: int                   # 1 to workers
    workers: int
    listener: socket.socket       # the supervisor's listening socket, shared by every worker
    link: socket.socket           # its end of the socket pair to the writer
    streams: SharedStreamCounts
    metrics: SharedMetrics


class Supervisor:
    """python broker.py --workers N: the parent process. It holds the listening socket and the
    writer (a CommitServer on the one write connection, and the Pruner), starts N workers (this
    file again, each an ordinary Broker handed a WorkerSeat), replaces a worker that exits
    (waiting longer after each quick failure, up to MAX_RESTART_DELAY), and on SIGINT or
    SIGTERM stops them all. Its main thread takes self._events one at a time; worker exits,
    restarts and signals only queue them."""

    WORKER_ENV = "BROKER_WORKER_SEAT"     # a worker's seat, as JSON: how main() knows it is one
    REUSE_PORT = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")   # and balances it
    MIN_RESTART_DELAY, MAX_RESTART_DELAY = 0.1, 10.0
    STOP_SECONDS = 10.0                   # a worker still running this long after SIGTERM is killed

    def __init__(self, settings):
        self.settings = settings
        self.count = settings["workers"]
        self._events = queue.SimpleQueue()
        self._processes = {}              # worker number -> its running subprocess.Popen
        self._started = {}                # worker number -> time.monotonic() of its start
        self._delays = {}                 # worker number -> the wait before its next restart

    def run(self):
        """Start, serve until SIGINT or SIGTERM, stop; return the exit code."""
        try:
            self._start()
        except (ImportError, OSError, sqlite3.Error, StoreError) as error:
            print(f"broker.py: error: {error}", file=sys.stderr)
            return 2 if isinstance(error, ImportError) else 1
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: self._events.put(("stop",)))
        for number in range(1, self.count + 1):
            self._spawn(number)
        code = self._supervise()
        self._stop()
        return code

    def _start(self):
        host, port = self.settings["host"], self.settings["port"]
        self.listener = self._claim_port(socket.AF_INET6 if ":" in host else socket.AF_INET, (host, port))
        try:
            if not self.REUSE_PORT:
                self.listener.listen(Server.request_queue_size)
            self.store = open_store(self.settings["db"], self.settings["sync"],
                                    on_records=lambda records: self.pruner.note(records))
        except BaseException:
            self.listener.close()
            raise
        self.metrics = SharedMetrics(rows=1 + self.count)
        self.pruner = Pruner(self.store, self.settings["keep_versions"], self.settings["keep_days"], self.metrics)
        self.commits = CommitServer(self.store, self.metrics, on_join=lambda number: self._events.put(("ready", number)))
        self.store.follow(self.store.newest_id())    # PostgreSQL: the pruner hears of every node's commits
        own_limit = default_max_clients()
        self.streams = SharedStreamCounts(self.settings["max_clients"] or own_limit * self.count, own_limit, self.count)
        self.commits.start()
        self.pruner.start()

    def _claim_port(self, family, address):
        """The supervisor's socket on address. A port in use is refused as without --workers,
        even when its holder would share it: first a socket that does not share binds it alone."""
        with socket.socket(family) as alone:
            alone.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            alone.bind(address)
            address = alone.getsockname()       # port 0: the free one it was given
        return self._bound_socket(family, address)

    def _bound_socket(self, family, address):
        sock = socket.socket(family)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.REUSE_PORT:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
        except OSError:
            sock.close()
            raise
        return sock

    def _worker_listener(self):
        """A worker's own listening socket on the supervisor's port (which only holds the port:
        the kernel spreads new connections evenly over the sockets that listen, and stops
        choosing a worker's once it exits); else the supervisor's socket, shared."""
        if not self.REUSE_PORT:
            return self.listener
        sock = self._bound_socket(self.listener.family, self.listener.getsockname())
        sock.listen(Server.request_queue_size)
        return sock

    def _supervise(self):
        """Take events until a signal's (return 0) or a worker's failure to start (return 1)."""
        ready, announced = set(), False
        while True:
            kind, *details = self._events.get()
            if kind == "stop":
                return 0
            if kind == "ready":
                self.streams.mark(details[0], running=True)
                ready.add(details[0])
                if len(ready) == self.count and not announced:
                    announced = True
                    host, port = self.listener.getsockname()[:2]
                    print(f"broker listening on {http_url(host, port)} (db {shown_db(self.settings['db'])},"
                          f" {self.count} workers)", flush=True)
            elif kind == "exited":
                number, process, reason = details
                if self._processes.get(number) is not process:
                    continue                  # not the worker now in that seat
                self.streams.mark(number, running=False)
                if not announced:
                    print(f"broker.py: error: worker {number} {reason} while starting", file=sys.stderr)
                    return 1
                self._schedule_restart(number, reason)
            elif kind == "restart":
                self._spawn(details[0])

    def _spawn(self, number):
        ours, theirs = socket.socketpair()
        listener = self._worker_listener()
        self.commits.serve(ours, number)
        seat = {"number": number, "workers": self.count, "listener": listener.fileno(),
                "link": theirs.fileno(), "streams": self.streams.fd, "limit": self.streams.limit,
                "own_limit": self.streams.own_limit, "metrics": self.metrics.fd, "settings": self.settings}
        self._started[number] = time.monotonic()
        try:
            process = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__)], stdin=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, self.WORKER_ENV: json.dumps(seat)}, pass_fds=(seat["listener"], seat["link"], seat["streams"], seat["metrics"]))
        except OSError as error:      # out of processes or memory, say: try again later
            self._processes[number] = None
            self._events.put(("exited", number, None, f"could not start ({error})"))
            return
        finally:
            theirs.close()            # the writer sees the link close if the worker never starts
            if listener is not self.listener:
                listener.close()      # the worker's now: it stops listening when the worker exits
        self._processes[number] = process
        threading.Thread(target=self._watch, args=(number, process), name="broker-watch", daemon=True).start()

    def _watch(self, number, process):
        process.wait()
        self._events.put(("exited", number, process, exit_reason(process.returncode)))

    def _schedule_restart(self, number, reason):
        # A worker that ran a while is replaced at once; one that keeps failing, ever more slowly.
        quick = time.monotonic() - self._started[number] < self.MAX_RESTART_DELAY
        delay = min(self._delays.get(number, self.MIN_RESTART_DELAY / 2) * 2, self.MAX_RESTART_DELAY) \
            if quick else self.MIN_RESTART_DELAY
        self._delays[number] = delay
        print(f"broker.py: worker {number} {reason}; starting another in {delay:g} s", file=sys.stderr, flush=True)
        timer = threading.Timer(delay, self._events.put, (("restart", number),))
        timer.daemon = True
        timer.start()

    def _stop(self):
        processes = [process for process in self._processes.values() if process is not None]
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.STOP_SECONDS
        for process in processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.pruner.stop()
        self.commits.close()
        self.store.close()
        self.listener.close()


def exit_reason(returncode):
    if returncode is not None and returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}"


def http_url(host, port):
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve_as_worker(seat_json):
    """A worker process of --workers: an ordinary Broker on the supervisor's socket."""
    seat = json.loads(seat_json)
    streams = SharedStreamCounts(seat["limit"], seat["own_limit"], seat["workers"], seat["streams"], seat["number"])
    metrics = SharedMetrics(1 + seat["workers"], seat["metrics"], seat["number"])
    broker = Broker(**{**seat["settings"], "workers": 1})
    try:
        broker.start(WorkerSeat(seat["number"], seat["workers"], socket.socket(fileno=seat["listener"]),
                                socket.socket(fileno=seat["link"]), streams, metrics))
    except (ImportError, OSError, ValueError, sqlite3.Error, StoreError) as error:
        print(f"broker.py: worker {seat['number']}: error: {error}", file=sys.stderr)
        return 1
    serve_until_signalled(broker, announce=False)
    return 0


def publish_to(url, event, data, timeout=10, token=None):
    """POST an insert to the broker at url and return the record; RequestError on a refusal."""
    return post_insert(url, {"event": event, "data": data}, timeout, token)


def publish_many(url, items, timeout=10, token=None):
    """POST [(event, data), ...] as one batch (stored all or none); return the records."""
    return post_insert(url, [{"event": event, "data": data} for event, data in items], timeout, token)


def post_insert(url, body, timeout, token):
    connection, prefix = connect(url, timeout)
    headers = {"Content-Type": "application/json", **bearer(token)}
    try:
        connection.request("POST", prefix + "/insert", json_bytes(body), headers)
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    if response.status != 200:
        raise RequestError(response.status, error_message(response.status, body))
    return json.loads(body)


def subscribe(url, events=None, last_event_id=None, timeout=None, token=None, match=None):
    """Yield records {"id", "event", "data"} from the broker at url, resuming after a drop.

    events: exact names; match: shell-style patterns (a record of either kind is yielded).
    timeout: seconds to wait for the next record (reconnecting included) before TimeoutError.
    """
    query = urllib.parse.urlencode([("event", name) for name in events or ()]
                                   + [("match", pattern) for pattern in match or ()])
    parser = EventStreamParser(last_event_id)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        # A fresh parser per connection, as a browser does: a record cut off by the drop is
        # discarded and asked for again, since the last id is that of the last whole record.
        parser = EventStreamParser(parser.last_event_id, parser.retry)
        try:
            for record in stream_once(url, query, parser, timeout, token):
                yield record
                deadline = None if timeout is None else time.monotonic() + timeout
        except (OSError, http.client.HTTPException):
            pass      # dropped or refused: reconnect with Last-Event-ID, as a browser does
        if deadline is not None and time.monotonic() + parser.retry > deadline:
            raise TimeoutError(f"no record from {url} within {timeout} seconds")
        time.sleep(parser.retry)


def stream_once(url, query, parser, timeout, token):
    """Yield the records of one /events connection until the server closes it."""
    connection, prefix = connect(url, timeout)
    try:
        headers = {"Accept": "text/event-stream", **bearer(token)}
        if parser.last_event_id:
            headers["Last-Event-ID"] = parser.last_event_id
        connection.request("GET", prefix + "/events" + ("?" + query if query else ""), headers=headers)
        response = connection.getresponse()
        if response.status != 200:
            raise RequestError(response.status, error_message(response.status, response.read()))
        while True:
            data = response.read1(65536)
            if not data:
                return
            yield from parser.feed(data)
    except socket.timeout:
        raise TimeoutError(f"no record from {url} within {timeout} seconds") from None
    finally:
        connection.close()


def bearer(token):
    return {} if token is None else {"Authorization": f"Bearer {token}"}


def connect(url, timeout):
    """An HTTP(S) connection to url's host, and url's path to put before each endpoint."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"broker url must start with http:// or https://, not {url!r}")
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    return kind(parts.hostname, parts.port, timeout=timeout), parts.path.rstrip("/")


def error_message(status, body):
    try:
        return json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {body[:200].decode('utf-8', 'replace')}"


class EventStreamParser:
    """Server-Sent Events on one connection, parsed as the WHATWG rules say: CRLF, LF or CR line
    ends, comments, multi-line data. last_event_id is that of the last event dispatched (an
    id: line counts only once its block is complete), to be sent as Last-Event-ID next time."""

    def __init__(self, last_event_id=None, retry=RETRY_MS / 1000):
        self.last_event_id = "" if last_event_id is None else str(last_event_id)
        self.retry = retry
        self._id = self.last_event_id          # the id buffer: the block being read may change it
        self._text = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._reset()

    def _reset(self):
        self._event, self._data = "", []

    def feed(self, data):
        """Return the records completed by these bytes."""
        self._text += self._decoder.decode(data)
        # A CR at the very end may be the first half of a CRLF: keep it for the next bytes.
        end = len(self._text) - self._text.endswith("\r")
        lines = LINE_END.split(self._text[:end])
        self._text = lines.pop() + self._text[end:]
        records = []
        for line in lines:
            record = self._line(line)
            if record is not None:
                records.append(record)
        return records

    def _line(self, line):
        if not line:
            return self._dispatch()
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value) / 1000
        return None          # a comment (name == "") or an unknown field

    def _dispatch(self):
        event, data = self._event or "message", self._data
        self.last_event_id = self._id
        self._reset()
        if not data:
            return None      # an id-only block moves the cursor and fires nothing
        text = "\n".join(data)
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        record_id = int(self.last_event_id) if self.last_event_id.isdigit() else self.last_event_id
        return {"id": record_id, "event": event, "data": value}


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_settings(argv, environ):
    parser = OneLineParser(prog="broker.py", description="A real-time, zero-code API server.")
    for name, env, default, convert, help_text in OPTIONS:
        flag = "--" + name.replace("_", "-")
        if convert is bool:
            parser.add_argument(flag, action="store_true", help=help_text)
            continue
        if env and env in environ:
            try:
                default = convert(environ[env])
            except ValueError as error:
                parser.error(f"{env}={environ[env]!r}: {error}")
        shown = f" (env {env}, default {default})"
        parser.add_argument(flag, default=default, type=named_type(convert), help=help_text + shown,
                            metavar=name.upper())
    settings = vars(parser.parse_args(argv))
    problem = path_problem(settings)
    if problem:
        parser.error(problem)
    return settings


def path_problem(settings):
    """Why the --db or --static path cannot work, or None."""
    static = settings["static"]
    if static is not None and not os.path.isdir(static):
        return f"argument --static: {static!r} is not a folder"
    if settings["db"] == ":memory:" and settings["workers"] > 1:
        return "argument --workers: needs a database file (--db): each process has its own :memory:"
    if settings["db"] != ":memory:" and not is_postgres_url(settings["db"]):
        folder = os.path.dirname(os.path.abspath(settings["db"]))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as error:
            return f"argument --db: cannot create folder {folder!r}: {error.strerror}"
    return None


def named_type(convert):
    """convert, raising the ArgumentTypeError that makes argparse show the reason."""
    def converted(text):
        try:
            return convert(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"{text!r}: {error}") from None
    return converted


def default_max_clients():
    # Each stream holds a socket; keep descriptors for the database, inserts and audits.
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(1, soft - max(64, soft // 10))


def raise_open_file_limit():
    # Each subscriber is an open socket: allow as many as the hard limit does.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass          # keep the soft limit; --max-clients follows it


def token_command(argv):
    parser = OneLineParser(prog="broker.py token", description="Print an HS256 JWT for --jwt-secret.")
    parser.add_argument("--secret", default=os.environ.get("BROKER_JWT_SECRET"),
                        help="the broker's --jwt-secret (env BROKER_JWT_SECRET)")
    parser.add_argument("--publish", action="append", default=[], metavar="PATTERN",
                        help="event names it may insert (shell-style: *, ? and [...]); repeatable")
    parser.add_argument("--subscribe", action="append", default=[], metavar="PATTERN",
                        help="event names it may read from /events and /audit; repeatable")
    parser.add_argument("--expires", type=named_type(positive_number(float)), metavar="SECONDS",
                        help="lifetime (default: no expiry)")
    options = parser.parse_args(argv)
    if not options.secret:
        parser.error("--secret (or BROKER_JWT_SECRET) is required")
    print(make_jwt(options.secret, options.publish, options.subscribe, options.expires))
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    seat = os.environ.pop(Supervisor.WORKER_ENV, None)
    if seat is not None:
        return serve_as_worker(seat)
    if argv[:1] == ["token"]:
        return token_command(argv[1:])
    settings = parse_settings(argv, os.environ)
    raise_open_file_limit()
    if settings["workers"] > 1:
        return Supervisor(settings).run()
    broker = Broker(**settings)
    try:
        broker.start()
    except (ImportError, OSError, ValueError, sqlite3.Error, StoreError) as error:
        print(f"broker.py: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, (ImportError, ValueError)) else 1
    serve_until_signalled(broker)
    return 0


def run(origin="*", **options):
    """Serve in the foreground until SIGINT or SIGTERM, with the options of Broker(...): the
    counterpart of the original Broker's broker_run(origin). Call it from the main thread."""
    serve_until_signalled(Broker(origin=origin, **options).start())


def serve_until_signalled(broker, announce=True):
    for signum in (signal.SIGINT, signal.SIGTERM):     # before the line: a reader may signal at once
        signal.signal(signum, lambda *_: threading.Thread(target=broker.stop).start())
    if announce:
        print(f"broker listening on {broker.url} (db {shown_db(broker.db)})", flush=True)
    broker.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
